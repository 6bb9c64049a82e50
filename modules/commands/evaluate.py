"""--evaluate: the saved models scored anew on the case's data; an earlier evaluation is archived first."""
import logging

from modules.commands.train import check_plot_settings
from modules.data.conditions import read_conditions
from modules.errors import InputError
from modules.evaluation.evaluation import Evaluation, saved_conditions
from modules.evaluation.report import write_evaluation
from modules.machine.processes import start_runtime
from modules.storage.paths import MODEL_DIR, MODEL_FILE, archive_previous_evaluation, make_run_folders

log = logging.getLogger(__name__)


def evaluate_saved(config) -> dict:
    """Evaluate model_save/ (the VAE and, if there is one, its conditioner) with config's plot settings; returns the
    report. Refused, with nothing moved, when there is no trained VAE or a plot setting is wrong."""
    for needed in (MODEL_FILE, MODEL_DIR / "split.json"):
        if not needed.exists():
            raise InputError(needed, "not found: there is no trained VAE to evaluate in this case folder",
                             "train one first (python SimulGen-VAE.py), or run from the case folder that holds it")
    named_column = config.has_conditioner and config.plot_color_by and config.plot < 2
    check_plot_settings(config, read_conditions(config) if named_column else None)  # else only the evaluation reads
    runtime = start_runtime(config, use_ddp=False)
    evaluation = Evaluation(config, runtime, None, MODEL_FILE, saved_conditions(config))  # checks the data
    archived = archive_previous_evaluation()
    if archived is not None:
        log.info(f"The previous evaluation was moved to {archived}/")
    make_run_folders()
    return write_evaluation(evaluation, config)
