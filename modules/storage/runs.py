"""Run records: every training run gets an id and a folder runs/<id>/ (relative to the working directory).

runs/<id>/ holds run.json (kind, command, times, status, final numbers), config.json, copies of the inputs
(preset.txt, condition.txt) and, once the run ends, of its metrics; TensorBoard event files go to runs/<id>/vae/ and
runs/<id>/conditioner/, so `tensorboard --logdir runs` shows all runs side by side. `--list_runs` prints list_runs();
the command line opens a run with start_run() and wraps its work in recording(), which marks how it ended.
"""
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from modules.errors import InputError, Stopped
from modules.storage.atomic import DiskFull, save_bytes, save_json
from modules.storage.paths import OUTPUT_DIR

RUNS_DIR = Path("runs")
RUN_FILE = "run.json"
SORT_KEYS = ("date", "val_loss", "lc_val_loss")  # the names users' scripts pass
# what the two 'loss' sorts order by: the validation designs' errors in %, not the (alpha-weighted) training losses
SORTED_BY = {"val_loss": "vae_val_error", "lc_val_loss": "prediction_val_error"}
KINDS = ("vae", "vae+conditioner", "conditioner")
ID_FORMAT = "%Y%m%d-%H%M%S"
HEADER = ("run", "started", "status", "kind", "VAE epochs", "VAE val error", "POD val error", "prediction val error")
ERRORS_NOTE = ("val error: mean relative L2 error of the validation designs' fields in physical units (VAE, POD: "
               "reconstruction; prediction: from each design's condition)")
NUMERIC_FROM = 4  # columns from here on hold numbers and are right-aligned


@dataclass(frozen=True)
class Run:
    id: str
    folder: Path

    def log_dir(self, part: str) -> Path:
        """Where the TensorBoard events of one part ('vae' or 'conditioner') of this run go."""
        return self.folder / part


def new_run_id(now: datetime | None = None, runs_dir=RUNS_DIR) -> str:
    """'YYYYMMDD-HHMMSS' in local time; a second run in the same second gets '-2', then '-3', ... (first free)."""
    base = (now or datetime.now()).strftime(ID_FORMAT)
    candidate, count = base, 1
    while (Path(runs_dir) / candidate).exists():
        count += 1
        candidate = f"{base}-{count}"
    return candidate


def start_run(kind: str, command: list, config: dict, copies: list, run_id: str | None = None,
              vae_run: str | None = None, runs_dir=RUNS_DIR) -> Run:
    """Record a new run (run_id None), or reopen run_id when a run is resumed.

    kind is 'vae', 'vae+conditioner' or 'conditioner' (--lc_only=1: a conditioner on the VAE of run vae_run, None when
    that VAE predates run ids). A new run gets config.json, a copy of each existing path in copies and run.json with
    status 'unfinished'. A reopened run keeps its results, config and copies; its resume time is appended to
    'resumed'. A run_id whose run.json is gone (or unreadable) is recorded afresh under that id.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; expected one of {KINDS}")
    identifier = run_id or new_run_id(runs_dir=runs_dir)
    run = Run(identifier, Path(runs_dir) / identifier)
    record = _read(run.folder / RUN_FILE) if run_id else None
    if record is not None:
        record.update(status="unfinished", ended=None, detail=None)
        earlier = record.get("resumed")
        record["resumed"] = [*(earlier if isinstance(earlier, list) else []), _now()]
    else:
        record = _new_record(run, kind, vae_run, command, config, copies)
    save_json(run.folder / RUN_FILE, record)
    return run


def _new_record(run: Run, kind: str, vae_run, command: list, config: dict, copies) -> dict:
    run.folder.mkdir(parents=True, exist_ok=True)
    save_json(run.folder / "config.json", config)
    _copy_existing(copies, run.folder)
    return {"id": run.id, "kind": kind, "vae_run": vae_run, "command": " ".join(str(part) for part in command),
            "started": _now(), "ended": None, "status": "unfinished", "detail": None, "resumed": [], "results": {}}


def update_run(run: Run, **results) -> None:
    """Merge results (plain JSON numbers, strings or None) into run.json's 'results'."""
    record = _read(run.folder / RUN_FILE) or {}
    record["results"] = {**_results(record), **results}
    save_json(run.folder / RUN_FILE, record)


def end_run(run: Run, status: str, detail: str | None = None, files=()) -> None:
    """Mark the run 'finished', 'stopped' or 'failed' (detail: the error line, 'SIGTERM', ...) and copy each existing
    path in files (output/metrics.csv, ...) into its folder, replacing an earlier copy; missing files are skipped."""
    record = _read(run.folder / RUN_FILE) or {"id": run.id}
    record.update(ended=_now(), status=status, detail=detail)
    save_json(run.folder / RUN_FILE, record)
    _copy_existing(files, run.folder)


def list_runs(sort: str = "date", runs_dir=RUNS_DIR) -> str:
    """The text of a table of every run under runs_dir, sorted by 'date' (newest first), 'val_loss' (the VAE's
    reconstruction error of the validation designs, in %) or 'lc_val_loss' (the conditioner's prediction error of
    them), runs without that error (runs recorded before it was, runs without that part) last. Never raises on a
    damaged run.json (it gets a line of its own); raises ValueError for an unknown sort."""
    if sort not in SORT_KEYS:
        raise ValueError(f"unknown sort {sort!r}; expected one of {SORT_KEYS}")
    runs_dir = Path(runs_dir)
    records = [_read(path) or {"id": path.parent.name, "status": "unreadable run.json"}
               for path in sorted(runs_dir.glob(f"*/{RUN_FILE}"))]
    if not records:
        return f"No runs yet in {runs_dir}/: a training run (python SimulGen-VAE.py) records one."
    rows = [_row(record) for record in _sorted(records, sort)]
    return "\n".join([*_align([HEADER, *rows]), ERRORS_NOTE,
                      f"TensorBoard, all runs side by side: tensorboard --logdir {runs_dir}"])


def _sorted(records: list, sort: str) -> list:
    # Sorting by date first and then (stably) by error puts runs without that error last, newest first among them.
    by_date = sorted(records, key=lambda r: (str(r.get("started") or ""), str(r.get("id"))), reverse=True)
    if sort == "date":
        return by_date
    return sorted(by_date, key=lambda r: _missing_last(_results(r).get(SORTED_BY[sort])))


def _missing_last(value):
    return (0, value) if _is_plain_number(value) else (1, 0)


def _row(record: dict) -> tuple:
    results = _results(record)
    kind = record.get("kind")
    if kind == "conditioner":
        kind = f"conditioner on {record.get('vae_run') or '?'}"
    return (str(record.get("id")), _date(record.get("started")), str(record.get("status") or "-"), str(kind or "-"),
            _formatted(results.get("vae_epochs"), "{:.0f}"), _percent(results.get("vae_val_error")),
            _percent(results.get("pod_val_error")), _percent(results.get("prediction_val_error")))


def _align(rows: list) -> list:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) if column >= NUMERIC_FROM else cell.ljust(width)
                      for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]


def _date(started) -> str:
    try:
        return datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return "-"


def _formatted(value, form: str) -> str:
    return form.format(value) if _is_plain_number(value) else "-"


def _percent(value) -> str:
    """A fraction as percent to 3 significant digits (0.0153 -> '1.53%', 0.0001525 -> '0.0152%', 17.65 -> '1765%');
    '-' when it is missing (a run recorded before it was)."""
    if not _is_plain_number(value):
        return "-"
    return f"{100 * value:.0f}%" if abs(value) >= 1 else f"{100 * value:#.3g}%"


def _is_plain_number(value) -> bool:
    """A finite int or float (not a bool, not NaN): what a table cell shows and a sort orders."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _results(record: dict) -> dict:
    results = record.get("results")
    return results if isinstance(results, dict) else {}


def _read(path: Path) -> dict | None:
    """The JSON object in path, or None when it is missing, unreadable or not an object."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _copy_existing(paths, folder: Path) -> None:
    for path in map(Path, paths):
        if path.is_file():
            save_bytes(folder / path.name, path.read_bytes())  # whole or not at all, like every file we write


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ------------------------------------------------------------------- a run's life, as the command line drives it
# what recording() copies into the run's folder when it ends, by part of the run
VAE_RUN_FILES = tuple(OUTPUT_DIR / name for name in ("metrics.csv", "reconstruction_error.json"))
CONDITIONER_RUN_FILES = tuple(OUTPUT_DIR / name for name in ("conditioner_metrics.csv", "prediction_report.json"))
EVALUATION_RUN_FILES = tuple(OUTPUT_DIR / name for name in ("evaluation.json", "evaluation.md", "memorization.json"))


@contextmanager
def recording(run, files):
    """Mark the run finished, stopped or failed as the block ends, and copy its metrics and reports into its folder.
    run None (processes other than the main one): nothing is recorded."""
    if run is None:
        yield
        return
    try:
        yield
    except Stopped as stop:
        end_run(run, "stopped", str(stop), files)
        raise
    except BaseException as error:
        detail = error.message() if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
        try:
            end_run(run, "failed", detail.splitlines()[0] if detail else type(error).__name__, files)
        except DiskFull:
            pass  # no room even for the record: the error that stopped the run is the one to report
        raise
    end_run(run, "finished", None, files)


def note_vae(run, progress, reconstruction: dict) -> None:
    """The VAE's final numbers into the run record: its training (a Progress) and its reconstruction report."""
    update_run(run, vae_epochs=progress.epoch, vae_best_epoch=progress.best_epoch,
               vae_best_val_loss=progress.best_val_loss, vae_val_error=reconstruction["vae_val"],
               pod_val_error=reconstruction["pod_val"].get(str(reconstruction["latent_numbers_per_design"])))


def note_conditioner(run, progress, prediction: dict) -> None:
    """The conditioner's final numbers into the run record: its training (of the network, even when the GP on the
    latents or another candidate was kept instead: conditioner_kept says which) and its prediction report."""
    update_run(run, conditioner_kept=prediction["conditioner"], conditioner_epochs=progress.epoch,
               conditioner_best_epoch=progress.best_epoch,
               conditioner_best_val_loss=progress.best_val_loss, prediction_val_error=prediction["conditioner_val"],
               pod_gpr_val_error=prediction["baselines"]["pod_gpr"],
               pod_rbf_val_error=prediction["baselines"]["pod_rbf"],
               nearest_neighbour_val_error=prediction["baselines"]["nearest_neighbour"])


def note_time(run, part: str, seconds: float, kept: bool) -> None:
    """Add seconds spent on one part of the surrogate (a candidate fitted or trained) to run.json's "time_spent"
    {part: {"seconds", "kept"}}: a resumed run adds to what its earlier part recorded, and kept is the latest word.
    run None (processes other than the main one): nothing."""
    if run is None:
        return
    record = _read(run.folder / RUN_FILE) or {}
    spent = dict(record.get("time_spent") or {})
    earlier = spent.get(part, {}).get("seconds", 0.0)
    spent[part] = {"seconds": round(earlier + seconds, 3), "kept": bool(kept)}
    record["time_spent"] = spent
    save_json(run.folder / RUN_FILE, record)


def time_spent(run) -> dict | None:
    """What note_time recorded for this run, with the totals: {"parts": {part: {"seconds", "kept"}}, "kept_s",
    "discarded_s"}; None where nothing was recorded (or run is None)."""
    parts = ((_read(run.folder / RUN_FILE) or {}).get("time_spent") if run is not None else None) or {}
    if not parts:
        return None
    return {"parts": parts, "kept_s": round(sum(part["seconds"] for part in parts.values() if part["kept"]), 3),
            "discarded_s": round(sum(part["seconds"] for part in parts.values() if not part["kept"]), 3)}


def run_of(payload: dict):
    """The run id a checkpoint was written by (None for checkpoints older than run records)."""
    return payload["training"]["progress"].get("run_id") or None
