"""--checkpoints=list|clean: what the checkpoint files of this case folder are good for, and removing the useless.

Looks at checkpoints/ and every archive/<stamp>/checkpoints/. Each file is one of:
- resumable: whole, with a training state, written by this config (--resume=PATH continues it);
- not resumable: whole, but written by another config, or holding no training state;
- corrupt: cannot be loaded (truncated, damaged, or not a SimulGenVAE checkpoint);
- leftover: the temporary file of a save that was killed before its rename.
Useless, and removed by clean: corrupt and leftover files anywhere, and in checkpoints/ the not resumable ones too
(nothing can resume them there). An archived run's checkpoints of another config are that run's record and are kept.
"""
import logging
from pathlib import Path

from modules.errors import InputError
from modules.storage.model_files import CHECKPOINT_FORMAT, CONDITIONER_FORMAT, read_payload
from modules.storage.model_format import FIT_FORMAT
from modules.storage.paths import ARCHIVE_DIR, CHECKPOINT_DIR, LAST_CHECKPOINT
from modules.training.state import check_resumable

log = logging.getLogger(__name__)

RESUMABLE, NOT_RESUMABLE, CORRUPT, LEFTOVER = "resumable", "not resumable", "corrupt", "leftover"


def survey(config) -> list:
    """[(path, status, why)] for every checkpoint file, checkpoints/ first, then the archives oldest first."""
    folders = [CHECKPOINT_DIR, *sorted(ARCHIVE_DIR.glob("*/checkpoints"))]
    return [(path, *status_of(path, config)) for folder in folders if folder.is_dir()
            for path in sorted(folder.iterdir()) if path.is_file() and not path.name.startswith(".")]


def status_of(path: Path, config):
    """(status, why) of one file."""
    if path.name.endswith(".tmp"):
        return LEFTOVER, "temporary file of an interrupted save"
    try:
        payload = read_payload(path, (CHECKPOINT_FORMAT, CONDITIONER_FORMAT, FIT_FORMAT), "python SimulGen-VAE.py")
    except InputError as error:
        return CORRUPT, error.problem
    if payload["format"] == FIT_FORMAT:  # continued by --resume of the run or conditioner it is a part of
        fit_of = payload.get("fit_of", "neural field")
        made = f"a {fit_of}'s fit after {payload['passes_made']} of {payload['facts']['passes']} passes"
        if fit_of == "neural field":
            return RESUMABLE, f"{made}: --resume of its conditioner continues it"
        if path.parent != CHECKPOINT_DIR:
            return NOT_RESUMABLE, f"{made}, of an archived run"
        if LAST_CHECKPOINT.exists():  # --resume continues the VAE, which has its codec
            return NOT_RESUMABLE, f"{made}; --resume continues {LAST_CHECKPOINT} instead"
        return RESUMABLE, f"{made}: --resume continues it, then the VAE"
    try:
        check_resumable(payload, path, config)
    except InputError as error:
        return NOT_RESUMABLE, error.problem
    return RESUMABLE, f"--resume={path} continues it"


def useless(path: Path, status: str) -> bool:
    in_live_folder = path.parent == CHECKPOINT_DIR
    return status in (CORRUPT, LEFTOVER) or (status == NOT_RESUMABLE and in_live_folder)


def checkpoints_command(action: str, dry_run: bool, config) -> list:
    """List every checkpoint with its status; with action 'clean', remove the useless ones (or, with dry_run, only
    say which). Returns the paths removed or, in a dry run, those that would be."""
    entries = survey(config)
    if not entries:
        log.info(f"No checkpoint files in {CHECKPOINT_DIR}/ or {ARCHIVE_DIR}/*/checkpoints/")
    for path, status, why in entries:
        log.info(f"{status:<13} {path}  ({why})")
    if action != "clean":
        return []
    doomed = [path for path, status, _ in entries if useless(path, status)]
    for path in doomed:
        if not dry_run:
            path.unlink()
        log.info(f"{'would remove' if dry_run else 'removed'} {path}")
    total = sum(path.stat().st_size for path in doomed) if dry_run else None
    if dry_run:
        log.info(f"Dry run: {len(doomed)} file(s), {total / 1e6:.1f} MB, would be removed; nothing was changed")
    else:
        log.info(f"Removed {len(doomed)} useless checkpoint file(s)")
    return doomed
