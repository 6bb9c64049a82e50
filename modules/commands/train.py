"""Training runs: the VAE, then the conditioner (python SimulGen-VAE.py), or the conditioner alone on the saved VAE
(--lc_only=1), each recorded in runs/<id>/ and ending with the evaluation of what it saved.

Every input check happens before anything on disk moves: the config, the data, the conditions, the plot settings
and any checkpoint to resume; only then is an earlier run's output archived.
"""
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from modules.config import CONDITION_FILE, PRESET_FILE
from modules.config.settings import changed_settings
from modules.data.case import prepare_case
from modules.data.conditions import read_conditions
from modules.data.field_layout import read_field_layout
from modules.data.time_values import case_time_values
from modules.errors import InputError
from modules.evaluation import figures
from modules.evaluation.evaluation import Evaluation
from modules.evaluation.report import write_evaluation, write_prediction_report, write_reconstruction_report
from modules.machine.device import runtime_for
from modules.machine.memory import MemoryWatch
from modules.machine.processes import any_rank, barrier, start_runtime, stop_runtime
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.storage.model_files import CHECKPOINT_FORMAT, CONDITIONER_FORMAT, read_payload
from modules.storage.model_folder import save_latents
from modules.storage.model_format import FIT_FORMAT
from modules.storage.paths import (AUTO_RESUME, CONDITIONER_LAST, LAST_CHECKPOINT, MODEL_DIR, MODEL_FILE,
                                   archive_previous_conditioner, archive_previous_run, codec_fit_checkpoints,
                                   make_run_folders)
from modules.storage.runs import (CONDITIONER_RUN_FILES, EVALUATION_RUN_FILES, VAE_RUN_FILES, note_conditioner,
                                  note_vae, recording, run_of, start_run, time_spent)
from modules.training.conditioner_training import prepare_conditioner_case, train_conditioner
from modules.training.memory_needs import check_training_fits, training_needs
from modules.training.state import read_checkpoint, refuse_changes
from modules.training.vae_training import train_vae

log = logging.getLogger(__name__)

CONDITIONER_HINT = "python SimulGen-VAE.py (or --lc_only=1) with input_type set"


def train_all(config, use_ddp: bool, resume) -> None:
    """--lc_only=0: the VAE, then (when input_type is set) the latent conditioner on it, then the evaluation, in one
    run recorded in runs/<id>/; with resume (--resume's value), from where the checkpoint stood (a finished VAE is not
    trained again) and in the same run record."""
    runtime = start_runtime(config, use_ddp)
    try:
        announce_setup(runtime)
        watch = MemoryWatch(runtime.device, speaks=runtime.is_main)
        with watch.phase("the setup (data checks, scaler)"):
            plan, case, conditions = full_run_inputs(config, runtime, resume)
        refuse_what_cannot_fit(config, runtime, vae_trains=plan is None or not plan.vae_finished)
        if runtime.is_main and plan is None:
            announce(archive_previous_run())
        run = open_run(config, runtime, "vae+conditioner" if conditions is not None else "vae",
                       plan and plan.run_id)
        with recording(run, VAE_RUN_FILES + CONDITIONER_RUN_FILES + EVALUATION_RUN_FILES):
            barrier(runtime)
            vae_result = None
            if plan is None or not plan.vae_finished:
                vae_result = train_vae(config, runtime, case, run, resume=plan and plan.vae, watch=watch,
                                       codec_fit=bool(plan and plan.codec_fit))
            elif runtime.is_main:
                log.info(f"The VAE of this run has finished ({MODEL_FILE}); it is not trained again")
            evaluation = None
            if runtime.is_main:
                with watch.phase("the VAE's evaluation (latents, baselines, memorization)"):
                    evaluation = Evaluation(config, runtime, case, MODEL_FILE, conditions)
                    if vae_result is not None:
                        progress, history = vae_result
                        save_latents(MODEL_DIR, evaluation.encoding.main_latents, evaluation.encoding.level_latents)
                        note_vae(run, progress, write_reconstruction_report(evaluation))
                        if config.plot < 2:
                            figures.training_plots(history, evaluation, show=config.plot == 0,
                                                   config=config)
            if conditions is not None:
                barrier(runtime)  # rank 0 has written the VAE and its latents, which every rank reads now
                with watch.phase("the conditioner's training"):
                    conditioner_case = prepare_conditioner_case(config, runtime, conditions, MODEL_FILE, fields=case)
                    conditioner_result = train_conditioner(config, runtime, conditioner_case, run,
                                                           resume=plan and plan.conditioner)
                    if runtime.is_main:
                        report_conditioner(evaluation, run, *conditioner_result, config)
            stop_runtime()  # the other processes are done: the main one evaluates alone
            if runtime.is_main:
                with watch.phase("the evaluation report"):
                    write_evaluation(evaluation, config, time_spent(run))
    finally:
        stop_runtime()


def train_conditioner_only(config, use_ddp: bool, resume) -> None:
    """--lc_only=1: the conditioner on the saved VAE, then the evaluation, as a run of its own (runs/<id>/); only an
    earlier conditioner's files and evaluation are archived (none with resume, which continues
    checkpoints/conditioner_last.pt or the checkpoint given, in its run record)."""
    runtime = start_runtime(config, use_ddp)
    try:
        announce_setup(runtime)
        watch = MemoryWatch(runtime.device, speaks=runtime.is_main)
        with watch.phase("the setup (data checks, latents)"):
            checkpoint, run_id, conditions, conditioner_case = conditioner_only_inputs(config, runtime, resume)
        refuse_what_cannot_fit(config, runtime, vae_trains=False)
        vae_file = conditioner_case.vae_file
        if runtime.is_main and checkpoint is None:
            announce(archive_previous_conditioner())
        run = open_run(config, runtime, "conditioner", run_id, vae_file)
        with recording(run, CONDITIONER_RUN_FILES + EVALUATION_RUN_FILES):
            barrier(runtime)
            with watch.phase("the conditioner's training"):
                conditioner_result = train_conditioner(config, runtime, conditioner_case, run, resume=checkpoint)
            stop_runtime()
            if runtime.is_main:
                with watch.phase("the evaluation"):
                    evaluation = Evaluation(config, runtime, conditioner_case.fields, vae_file, conditions)
                    report_conditioner(evaluation, run, *conditioner_result, config)
                    write_evaluation(evaluation, config, time_spent(run))
    finally:
        stop_runtime()


def full_run_inputs(config, runtime, resume):
    """Every check of a full run's inputs, before anything on disk moves: (the resume plan or None, the Case, the
    Conditions or None)."""
    if config.use_e2e_training and config.e2e_vae_model_path and not names_model_file(config.e2e_vae_model_path):
        raise InputError(CONDITION_FILE, f"e2e_vae_model_path names another VAE to train through "
                         f"({config.e2e_vae_model_path}), but a full run trains through the VAE it has just trained "
                         f"({MODEL_FILE})", "remove e2e_vae_model_path, or run with --lc_only=1")
    plan = resume_plan(resume, config) if resume else None
    case = prepare_case(config, runtime)
    conditions = read_conditions(config) if config.has_conditioner else None
    check_plot_settings(config, conditions)
    return plan, case, conditions


def conditioner_only_inputs(config, runtime, resume):
    """Every check of a --lc_only=1 run's inputs, before anything on disk moves: (the checkpoint to resume or None,
    its run id or None, the Conditions, the ConditionerCase on the saved VAE)."""
    if not config.has_conditioner:
        raise InputError(CONDITION_FILE, "--lc_only=1 trains the latent conditioner, but input_type is none",
                         "set input_type csv, image or image_vit (and param_dir)")
    through_other_vae = config.use_e2e_training and config.e2e_vae_model_path
    vae_file = Path(config.e2e_vae_model_path if through_other_vae else MODEL_FILE)
    checkpoint, run_id = None, None
    if resume:
        checkpoint = CONDITIONER_LAST if resume == AUTO_RESUME else Path(resume)
        run_id = run_of(read_checkpoint(checkpoint, config, (CONDITIONER_FORMAT,), CONDITIONER_HINT))
    conditions = read_conditions(config)
    check_plot_settings(config, conditions)
    return checkpoint, run_id, conditions, prepare_conditioner_case(config, runtime, conditions, vae_file)


def refuse_what_cannot_fit(config, runtime, vae_trains: bool) -> None:
    """Before anything on disk moves: refuse a run whose largest phase would need more memory than each process may
    allocate (training.memory_needs.training_needs), on every rank when any rank would have to (one rank alone stopping
    would leave the others waiting)."""
    with torch.device("meta"):  # shapes only: counting parameters allocates nothing
        vae_parameters = sum(p.numel() for p in HierarchicalVAE(ModelSpec.from_config(config)).parameters())
    phases = training_needs(config, vae_parameters, runtime)[0 if vae_trains else 1:]
    refusal = check_training_fits(phases, runtime) if phases else None
    if any_rank(refusal is not None, runtime):
        raise refusal or InputError(CONDITION_FILE, "another process of this run has too little memory to train",
                                    "see its message; give the job more memory or lower Batch_size")


def check_training_inputs(config, lc_only: bool, resume) -> None:
    """The checks of a training's inputs without the training, on the CPU (launch_ddp.py runs them before starting
    torchrun, so that a case this script would refuse starts no process). Streams the data once; preloads nothing."""
    streaming = dataclasses.replace(config, load_all=0, amp="off", num_workers="0")  # all resumable: same checks
    runtime = runtime_for(torch.device("cpu"), streaming)
    if lc_only:
        conditioner_only_inputs(streaming, runtime, resume)
    else:
        full_run_inputs(streaming, runtime, resume)


def report_conditioner(evaluation, run, progress, history, config) -> None:
    """The prediction report, the run record's numbers and the conditioner's plots, once it is saved."""
    note_conditioner(run, progress, write_prediction_report(evaluation))
    if config.plot < 2:
        figures.conditioner_plots(history, evaluation, show=config.plot == 0, config=config)


def check_plot_settings(config, conditions) -> None:
    """The settings that need files (mesh_file, node_coordinates, the CSV's columns for plot_color_by) are checked
    with the other inputs, before anything trains, so a typo cannot end a long run. Where the nodes are is read with
    or without plots: --predict's .xdmf and .h5 outputs need it too."""
    read_field_layout(config)
    case_time_values(config)
    if config.plot == 2:
        return
    if config.plot_color_by:
        if conditions is None or conditions.channels is not None:
            raise InputError(CONDITION_FILE, f"plot_color_by {config.plot_color_by} names a parameter, but the "
                             "designs are not defined by a parameter CSV", "drop plot_color_by")
        figures.parameter_column(config.plot_color_by, conditions.param_names, conditions.values.shape[1])


def open_run(config, runtime, kind: str, run_id=None, vae_file=None):
    """The main process records the run in runs/<id>/ (a resumed run keeps its id; a conditioner-only run names the
    run that trained vae_file, its VAE); other processes get None."""
    if not runtime.is_main:
        return None
    make_run_folders()
    vae_run = read_payload(vae_file).get("run_id") if vae_file else None
    run = start_run(kind, sys.argv, config.to_dict(), [PRESET_FILE, CONDITION_FILE], run_id=run_id, vae_run=vae_run)
    log.info(f"Run {run.id}: recorded in {run.folder}/ (python SimulGen-VAE.py --list_runs compares runs)")
    return run


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    vae: Path | None             # VAE checkpoint to continue from
    vae_finished: bool           # its training is over and model_save/ holds the result: go on to the conditioner
    conditioner: Path | None     # conditioner checkpoint to continue from (None: start the conditioner afresh)
    run_id: str | None = None    # the run record the checkpoint belongs to (continued in runs/<id>/)
    codec_fit: bool = False      # no VAE checkpoint yet: continue the snapshot codec's fit (codec_fit_checkpoint)


def names_model_file(path: str) -> bool:
    """Whether path is the VAE file a run writes (the original SimulGenVAE's condition.txt names it for e2e)."""
    return Path(path).resolve() == MODEL_FILE.resolve()


def resume_plan(given: str, config) -> ResumePlan:
    """What --resume[=PATH] of a full run continues: each checkpoint is checked here, before anything runs."""
    path = LAST_CHECKPOINT if given == AUTO_RESUME else Path(given)
    codec_fits = codec_fit_checkpoints()
    if given == AUTO_RESUME and not path.exists() and codec_fits:  # stopped in the codec's fit
        for fit_path in codec_fits:
            fit = read_payload(fit_path, formats=(FIT_FORMAT,))
            refuse_changes(changed_settings(fit["config"], config), fit_path)
        return ResumePlan(None, False, None, fit["run_id"], codec_fit=True)
    payload = read_checkpoint(path, config, (CHECKPOINT_FORMAT, CONDITIONER_FORMAT), "python SimulGen-VAE.py")
    if payload["format"] == CONDITIONER_FORMAT:
        if not MODEL_FILE.exists():
            raise InputError(path, f"is a conditioner checkpoint, but the VAE it needs ({MODEL_FILE}) is missing",
                             "resume the VAE first (--resume), or train it again")
        return ResumePlan(None, True, path, run_of(payload))
    finished = payload["training"]["progress"]["finished"] and MODEL_FILE.exists()
    conditioner = None
    if finished and config.has_conditioner and CONDITIONER_LAST.exists():
        read_checkpoint(CONDITIONER_LAST, config, (CONDITIONER_FORMAT,), CONDITIONER_HINT)
        conditioner = CONDITIONER_LAST
    return ResumePlan(path, finished, conditioner, run_of(payload))


def announce_setup(runtime) -> None:
    if runtime.is_main:
        log.info(runtime.summary)  # before the first slow step


def announce(archived) -> None:
    if archived is not None:
        log.info(f"The previous run's results were moved to {archived}/")
