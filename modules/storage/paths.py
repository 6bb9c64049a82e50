"""The run's folders (relative to the working directory, so one checkout serves many case folders).

A new training run first moves an earlier run's results into archive/<time stamp>/, so nothing is ever deleted;
a conditioner-only run (--lc_only=1) moves only the earlier conditioner's files and the evaluation (which it
writes anew) and leaves the VAE's in place; --evaluate moves only an earlier evaluation.
"""
import shutil
import time
from pathlib import Path

from modules.errors import InputError

MODEL_DIR = Path("model_save")
CHECKPOINT_DIR = Path("checkpoints")
OUTPUT_DIR = Path("output")
ARCHIVE_DIR = Path("archive")
MODEL_FILE = MODEL_DIR / "SimulGen-VAE"
RUN_FOLDERS = (MODEL_DIR, CHECKPOINT_DIR, OUTPUT_DIR)
CONDITIONER_FILE = MODEL_DIR / "latent_conditioner"
BEST_CHECKPOINT = CHECKPOINT_DIR / "best.pt"    # the VAE's full training state at its best validation loss
LAST_CHECKPOINT = CHECKPOINT_DIR / "last.pt"    # ... at the latest save: what --resume continues from
CONDITIONER_CHECKPOINT = CHECKPOINT_DIR / "conditioner_best.pt"
CONDITIONER_LAST = CHECKPOINT_DIR / "conditioner_last.pt"
FIELD_FIT_CHECKPOINT = CHECKPOINT_DIR / "neural_field_fit.pt"  # the neural-field candidate's fit after its last pass
AUTO_RESUME = "last"  # --resume without a path: the run's own last checkpoint (LAST_CHECKPOINT, CONDITIONER_LAST)
CONDITIONER_NAME = "conditioner"  # output/conditioner_metrics.csv, runs/<run id>/conditioner/
PREDICTION_REPORT = OUTPUT_DIR / "prediction_report"  # .json and .md
PREDICTION_PLOT = OUTPUT_DIR / "prediction_samples.png"
SUGGESTIONS_FILE = OUTPUT_DIR / "suggested_designs.csv"  # --suggest without --out
EVALUATION_OUTPUTS = tuple(OUTPUT_DIR / name for name in (
    "evaluation.json", "evaluation.md", "memorization.json", "evaluation_reconstruction_fields.png",
    "evaluation_prediction_fields.png", "evaluation_error_per_step.png", "latent_space.png", "active_units.png"))
CONDITIONER_OUTPUTS = (CONDITIONER_FILE, CONDITIONER_CHECKPOINT, CONDITIONER_LAST, FIELD_FIT_CHECKPOINT,
                       OUTPUT_DIR / f"{CONDITIONER_NAME}_metrics.csv", PREDICTION_REPORT.with_suffix(".json"),
                       PREDICTION_REPORT.with_suffix(".md"), PREDICTION_PLOT,
                       OUTPUT_DIR / "conditioner_loss_curves.png", SUGGESTIONS_FILE, *EVALUATION_OUTPUTS)


def archive_previous_run(stamp: str | None = None):
    """Move every non-hidden entry of model_save/, checkpoints/ and output/ into archive/<stamp>/.

    Returns the archive folder, or None when there was nothing to keep. Hidden files (.gitkeep) stay.
    """
    entries = [entry for folder in RUN_FOLDERS if folder.is_dir()
               for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")]
    return _archive(entries, stamp)


def archive_previous_conditioner(stamp: str | None = None):
    """Move an earlier conditioner's model, checkpoint, logs and report into archive/<stamp>/ (same layout);
    the VAE's files stay where they are. Returns the archive folder, or None when there was nothing to keep."""
    return _archive([entry for entry in CONDITIONER_OUTPUTS if entry.exists()], stamp)


def archive_previous_evaluation(stamp: str | None = None):
    """Move an earlier evaluation's report and plots into archive/<stamp>/ before --evaluate writes new ones."""
    return _archive([entry for entry in EVALUATION_OUTPUTS if entry.exists()], stamp)


def _archive(entries, stamp):
    if not entries:
        return None
    target = _fresh_folder(ARCHIVE_DIR / (stamp or time.strftime("%Y%m%d-%H%M%S")))
    for entry in entries:
        destination = target / entry.parent
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


def new_output_file(out, command: str, suffixes=(".npy",), flag: str = "--out") -> Path:
    """The output path of command (--reconstruct, --predict, --suggest, --export), given by flag, must be a new file
    ending in one of suffixes (a string or a tuple of them) in an existing folder: never overwrite a user's file."""
    suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
    if out is None:
        raise InputError("command line", f"{command} needs {flag}", f"add {flag}=OUT{suffixes[0]}")
    out = Path(out)
    if out.suffix not in suffixes:
        raise InputError(out, f"has suffix '{out.suffix}', which {command} does not write",
                         f"give {flag} a name ending in {', '.join(suffixes)}")
    if out.exists():
        raise InputError(out, "already exists and would be overwritten", f"choose another {flag} or move that file")
    if not out.parent.is_dir():
        raise InputError(out, f"folder {out.parent} does not exist", f"create it or choose another {flag}")
    return out


def codec_fit_checkpoint(code: int, modulation: str) -> Path:
    """Where the fit of the snapshot codec with codes of `code` numbers and that modulation (models.neural_field) is
    saved, before the VAE's first checkpoint (one file per codec its fit tries: training.codec_choice)."""
    return CHECKPOINT_DIR / f"snapshot_codec_fit_{modulation}_{code}.pt"


def codec_fit_checkpoints() -> list:
    """The snapshot codec's fit files in checkpoints/."""
    return sorted(CHECKPOINT_DIR.glob("snapshot_codec_fit_*.pt"))
