"""The run's folders (relative to the working directory, so one checkout serves many case folders).

A new training run first moves an earlier run's results into archive/<time stamp>/, so nothing is ever deleted.
"""
import shutil
import time
from pathlib import Path

MODEL_DIR = Path("model_save")
CHECKPOINT_DIR = Path("checkpoints")
OUTPUT_DIR = Path("output")
ARCHIVE_DIR = Path("archive")
MODEL_FILE = MODEL_DIR / "SimulGen-VAE"
RUN_FOLDERS = (MODEL_DIR, CHECKPOINT_DIR, OUTPUT_DIR)


def archive_previous_run(stamp: str | None = None):
    """Move every non-hidden entry of model_save/, checkpoints/ and output/ into archive/<stamp>/.

    Returns the archive folder, or None when there was nothing to keep. Hidden files (.gitkeep) stay.
    """
    entries = [entry for folder in RUN_FOLDERS if folder.is_dir()
               for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")]
    if not entries:
        return None
    target = _fresh_folder(ARCHIVE_DIR / (stamp or time.strftime("%Y%m%d-%H%M%S")))
    for entry in entries:
        destination = target / entry.parent.name
        destination.mkdir(parents=True, exist_ok=True)
        shutil.move(str(entry), str(destination / entry.name))
    return target


def _fresh_folder(base: Path) -> Path:
    candidate, count = base, 1
    while candidate.exists():
        count += 1
        candidate = base.with_name(f"{base.name}-{count}")
    candidate.mkdir(parents=True)
    return candidate


def make_run_folders() -> None:
    for folder in RUN_FOLDERS:
        folder.mkdir(parents=True, exist_ok=True)
