"""Command line of SimulGen-VAE.py: parse flags, load the config, run the chosen mode.

Every bad input ends here as one line on stderr and exit code 2 (no traceback); nothing on disk has been changed by
then, because the config and the data are checked before an earlier run's results are archived.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from modules.commands import checkpoints as checkpoint_files
from modules.storage.model_files import CHECKPOINT_FORMAT, CONDITIONER_FORMAT, read_payload
from modules.training.conditioner_case import prepare_conditioner_case, read_conditions
from modules.config.settings import CONDITION_FILE, PRESET_FILE, check_flag, load_config
from modules.training.distributed import barrier, start_runtime, stop_runtime
from modules.errors import InputError
from modules.evaluation.report import evaluate_and_write
from modules.data.field_layout import read_field_layout
from modules.training.guard import Stopped
from modules.storage.paths import (CONDITIONER_FILE, CONDITIONER_LAST, LAST_CHECKPOINT, MODEL_DIR, MODEL_FILE,
                             archive_previous_conditioner, archive_previous_evaluation, archive_previous_run,
                             make_run_folders)
from modules.evaluation.figures import parameter_column
from modules.commands.predict import predict_file
from modules.commands.reconstruct import reconstruct_file
from modules.storage.runs import (CONDITIONER_RUN_FILES, EVALUATION_RUN_FILES, SORT_KEYS, VAE_RUN_FILES, list_runs,
                          note_conditioner, note_vae, recording, run_of, start_run)
from modules.training.runtime import pick_device
from modules.training.conditioner_training import train_conditioner
from modules.training.vae_training import prepare_case, train_vae
from modules.training.state import read_checkpoint

EXIT_BAD_INPUT = 2
AUTO_RESUME = "last"  # --resume without a path: the run's own last checkpoint
CONDITIONER_HINT = "python SimulGen-VAE.py (or --lc_only=1) with input_type set"


class OneLineParser(argparse.ArgumentParser):
    """A bad flag gets the same one-line error and exit code 2 as any other bad input."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: command line: {message}. Fix: see 'python SimulGen-VAE.py -h'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="SimulGen-VAE.py",
        description="Train a hierarchical VAE surrogate of the simulations in the current case folder "
                    "(preset.txt, input_data/condition.txt, input_data/dataset{data_No}.npy|.h5|.hdf5|.pickle).",
        epilog="Flags that are also condition.txt keys (plot, size, load_all, device, amp, grad_checkpointing, "
               "compile, grad_accum_steps) override the file.")
    parser.add_argument("--preset", type=int, default=1, help="which 4-line preset of preset.txt to use (default 1)")
    parser.add_argument("--plot", type=int, choices=(0, 1, 2), default=None,
                        help="0: save PNG plots and show them at the end (only with a screen and a terminal); "
                             "1: save PNGs in output/; 2: no plots (default 2)")
    parser.add_argument("--size", choices=("small", "large"), default=None,
                        help="model depth/width: small = 1 residual block per level, large = 2 and wider latent "
                             "heads (default small)")
    parser.add_argument("--load_all", type=int, choices=(0, 1), default=None,
                        help="1: preload the scaled data on the training device; 0: stream batches from the "
                             "memory-mapped file, for data larger than RAM (default 0)")
    parser.add_argument("--device", default=None,
                        help="auto (this process's GPU if there is one, else CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=None,
                        help="mixed precision: auto = bf16 on a GPU that supports it, fp16 with loss scaling on "
                             "older GPUs, float32 on the CPU; bf16 or fp16 force it; off = float32 (default auto)")
    parser.add_argument("--grad_checkpointing", type=int, choices=(0, 1), nargs="?", const=1, default=None,
                        help="recompute the activations of each level (and of the conditioner's blocks) in the "
                             "backward pass instead of keeping them: less memory, about one more forward pass "
                             "(default 0)")
    parser.add_argument("--compile", type=int, choices=(0, 1), nargs="?", const=1, default=None,
                        help="train through torch.compile of the model (the first steps compile; default 0)")
    parser.add_argument("--grad_accum_steps", type=int, metavar="K", default=None,
                        help="sum the gradients of K batches before each optimiser step: the effective batch is "
                             "K x Batch_size designs (default 1)")
    parser.add_argument("--use_ddp", action="store_true",
                        help="train with DistributedDataParallel in each process that torchrun starts "
                             "(torchrun --nproc_per_node=K SimulGen-VAE.py --use_ddp, or python launch_ddp.py --gpus=K)")
    parser.add_argument("--lc_only", type=int, choices=(0, 1), default=0,
                        help="0: train the VAE, then the latent conditioner when input_type is set; 1: train only "
                             "the conditioner, on the VAE in model_save/ (its files are left as they are)")
    parser.add_argument("--resume", nargs="?", const=AUTO_RESUME, default=None, metavar="PATH",
                        help="continue an interrupted training from its last checkpoint: checkpoints/last.pt (with "
                             "--lc_only=1: checkpoints/conditioner_last.pt), or the checkpoint PATH; the config must "
                             "be the one that wrote it (device, amp and other runtime settings may differ)")
    parser.add_argument("--checkpoints", choices=("list", "clean"), default=None,
                        help="instead of training: list the checkpoints in checkpoints/ and archive/*/checkpoints/ "
                             "as resumable, not resumable, corrupt or leftover; clean: also remove the useless ones "
                             "(corrupt and leftover files; in checkpoints/ also those this config cannot resume)")
    parser.add_argument("--evaluate", action="store_true",
                        help="instead of training: score the VAE (and conditioner) in model_save/ on the case's "
                             "data next to POD, POD + Gaussian-process regression and nearest-neighbour baselines; "
                             "writes output/evaluation.json and .md, and plots with --plot=0/1 (every training run "
                             "ends with this)")
    parser.add_argument("--list_runs", nargs="?", const="date", choices=SORT_KEYS, default=None,
                        help="instead of training: list the runs recorded in runs/, newest first (date, the "
                             "default), by the VAE's best validation loss (val_loss) or by the conditioner's "
                             "(lc_val_loss)")
    parser.add_argument("--dry_run", action="store_true",
                        help="with --checkpoints=clean: say what would be removed, remove nothing")
    parser.add_argument("--reconstruct", metavar="PATH.npy",
                        help="instead of training: encode and decode the simulations in PATH.npy ([n, T, M]) with "
                             "model_save/SimulGen-VAE and write them, in physical units, to --out")
    parser.add_argument("--predict", metavar="PATH",
                        help="instead of training: the fields of new designs, from a CSV of their parameters or a "
                             "folder (or one file) of their images, with model_save/latent_conditioner; "
                             "written in physical units to --out")
    parser.add_argument("--samples", type=int, metavar="K", default=0,
                        help="with --predict: also draw K decoder samples per design, written with their mean and "
                             "standard deviation beside --out")
    parser.add_argument("--out", metavar="OUT.npy",
                        help="output file of --reconstruct or --predict (must not exist yet)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_flags_of_the_other_mode(args)
        if args.list_runs:
            print(list_runs(args.list_runs))
        elif args.evaluate:
            evaluate_only(args)
        elif args.checkpoints:
            checkpoint_files.run(args.checkpoints, args.dry_run, load_config(args.preset, warn=warn))
        elif args.reconstruct:
            reconstruct_file(args.reconstruct, args.out, MODEL_FILE, pick_device(check_flag("device",
                                                                                            args.device or "auto")))
        elif args.predict:
            predict_file(args.predict, args.out, args.samples, CONDITIONER_FILE,
                         pick_device(check_flag("device", args.device or "auto")))
        elif args.lc_only:
            train_conditioner_only(args)
        else:
            train(args)
    except InputError as error:
        print(f"error: {error.message()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"{stop}; the training state is saved in {stop.checkpoint}. Continue with the same command plus "
                  "--resume", file=sys.stderr)
        return 128 + stop.signal_number
    return 0


def refuse_flags_of_the_other_mode(args) -> None:
    """A flag that the chosen mode would not use is an error, never silently ignored."""
    modes = [f"--{name}" for name in ("checkpoints", "reconstruct", "predict", "evaluate", "list_runs")
             if getattr(args, name)]
    if len(modes) > 1:
        raise InputError("command line", f"{' and '.join(modes)} are different modes", "give one of them")
    mode = modes[0] if modes else None
    if args.dry_run and args.checkpoints != "clean":
        raise InputError("command line", "--dry_run only applies to --checkpoints=clean", "add it, or drop --dry_run")
    if mode:
        unused = [f"--{name}" for name in ("plot", "size", "load_all", "use_ddp", "lc_only", "amp",
                                           "grad_checkpointing", "compile", "grad_accum_steps", "resume")
                  if flag_given(args, name) and not (name == "plot" and mode == "--evaluate")]
        if mode == "--list_runs" and args.device:
            unused.append("--device")
        if unused:
            where = "training and --evaluate" if unused == ["--plot"] else "training"
            raise InputError("command line", f"{', '.join(unused)} only apply to {where}, not to {mode}",
                             "drop them")
    if args.out and mode not in ("--reconstruct", "--predict"):
        raise InputError("command line", "--out is where --reconstruct or --predict writes, but neither is given",
                         "add --reconstruct=PATH.npy or --predict=PATH, or drop --out")
    if args.lc_only and args.size:
        raise InputError("command line", "--size sets the VAE, which --lc_only=1 does not train",
                         "drop --size (the saved VAE keeps its size)")
    if args.samples < 0 or (args.samples and not args.predict):
        raise InputError("command line", f"--samples={args.samples} needs --predict and a count >= 1",
                         "use --samples=K together with --predict, or drop it")


def flag_given(args, name: str) -> bool:
    """Whether the user gave this flag (an explicit --plot=0 counts; --lc_only=0 is the default mode)."""
    value = getattr(args, name)
    return value is not None and value is not False and not (name == "lc_only" and value == 0)


def train(args) -> None:
    """--lc_only=0: the VAE, then (when input_type is set) the latent conditioner on it, then the evaluation, in one
    run recorded in runs/<id>/; with --resume, from where the checkpoint stood (a finished VAE is not trained again)
    and in the same run record."""
    config = load_config(args.preset, overrides(args), warn=warn)
    if config.use_e2e_training and config.e2e_vae_model_path:
        raise InputError(CONDITION_FILE, "e2e_vae_model_path names a VAE to train through, but a full run trains "
                         "through the VAE it has just trained", "remove e2e_vae_model_path, or run with --lc_only=1")
    runtime = start_runtime(config, args.use_ddp)
    try:
        announce_setup(runtime)
        plan = resume_plan(args.resume, config) if args.resume else None
        case = prepare_case(config, runtime)  # every input check happens before anything on disk moves
        conditions = read_conditions(config) if config.has_conditioner else None
        check_plot_settings(config, conditions)
        if runtime.is_main and plan is None:
            announce(archive_previous_run())
        run = open_run(config, runtime, "vae+conditioner" if conditions is not None else "vae", plan and plan.run_id)
        with recording(run, VAE_RUN_FILES + CONDITIONER_RUN_FILES + EVALUATION_RUN_FILES):
            barrier(runtime)
            if plan is None or not plan.vae_finished:
                note_vae(run, train_vae(config, runtime, case, run, resume=plan and plan.vae))
            elif runtime.is_main:
                print(f"The VAE of this run has finished ({MODEL_FILE}); it is not trained again")
            if conditions is not None:
                barrier(runtime)  # rank 0 has written the VAE and its latents, which every rank reads now
                note_conditioner(run, train_conditioner(
                    config, runtime, prepare_conditioner_case(config, runtime, conditions, MODEL_FILE, fields=case),
                    run, resume=plan and plan.conditioner))
            stop_runtime()  # the other processes are done: the main one evaluates alone
            if runtime.is_main:
                evaluate_and_write(config, runtime, case)
    finally:
        stop_runtime()


def train_conditioner_only(args) -> None:
    """--lc_only=1: the conditioner on the saved VAE, then the evaluation, as a run of its own (runs/<id>/); only an
    earlier conditioner's files and evaluation are archived (none with --resume, which continues
    checkpoints/conditioner_last.pt or the checkpoint given, in its run record)."""
    config = load_config(args.preset, overrides(args), warn=warn)
    if not config.has_conditioner:
        raise InputError(CONDITION_FILE, "--lc_only=1 trains the latent conditioner, but input_type is none",
                         "set input_type csv, image or image_vit (and param_dir)")
    through_other_vae = config.use_e2e_training and config.e2e_vae_model_path
    vae_file = Path(config.e2e_vae_model_path if through_other_vae else MODEL_FILE)
    runtime = start_runtime(config, args.use_ddp)
    try:
        announce_setup(runtime)
        resume, run_id = None, None
        if args.resume:
            resume = CONDITIONER_LAST if args.resume == AUTO_RESUME else Path(args.resume)
            run_id = run_of(read_checkpoint(resume, config, (CONDITIONER_FORMAT,), CONDITIONER_HINT))
        conditions = read_conditions(config)
        check_plot_settings(config, conditions)
        case = prepare_conditioner_case(config, runtime, conditions, vae_file)
        if runtime.is_main and resume is None:
            announce(archive_previous_conditioner())
        run = open_run(config, runtime, "conditioner", run_id, vae_file)
        with recording(run, CONDITIONER_RUN_FILES + EVALUATION_RUN_FILES):
            barrier(runtime)
            note_conditioner(run, train_conditioner(config, runtime, case, run, resume=resume))
            stop_runtime()
            if runtime.is_main:
                evaluate_and_write(config, runtime, case.fields, vae_file)
    finally:
        stop_runtime()


def evaluate_only(args) -> None:
    """--evaluate: the saved models scored anew; an earlier evaluation is archived first."""
    config = load_config(args.preset, {"plot": args.plot, "device": args.device}, warn=warn)
    for needed in (MODEL_FILE, MODEL_DIR / "split.json"):
        if not needed.exists():
            raise InputError(needed, "not found: there is no trained VAE to evaluate in this case folder",
                             "train one first (python SimulGen-VAE.py), or run from the case folder that holds it")
    named_column = config.has_conditioner and config.plot_color_by and config.plot < 2
    check_plot_settings(config, read_conditions(config) if named_column else None)  # else only the evaluation reads
    runtime = start_runtime(config, use_ddp=False)
    archived = archive_previous_evaluation()
    if archived is not None:
        print(f"The previous evaluation was moved to {archived}/")
    make_run_folders()
    evaluate_and_write(config, runtime)


def check_plot_settings(config, conditions) -> None:
    """The plot settings that need files (node_coordinates, the CSV's columns) are checked with the other inputs,
    before anything trains, so a typo cannot end a long run."""
    if config.plot == 2:
        return
    read_field_layout(config)
    if config.plot_color_by:
        if conditions is None or conditions.channels is not None:
            raise InputError(CONDITION_FILE, f"plot_color_by {config.plot_color_by} names a parameter, but the "
                             "designs are not defined by a parameter CSV", "drop plot_color_by")
        parameter_column(config.plot_color_by, conditions.param_names, conditions.values.shape[1])


def open_run(config, runtime, kind: str, run_id=None, vae_file=None):
    """The main process records the run in runs/<id>/ (a resumed run keeps its id; a conditioner-only run names the
    run that trained vae_file, its VAE); other processes get None."""
    if not runtime.is_main:
        return None
    make_run_folders()
    vae_run = read_payload(vae_file).get("run_id") if vae_file else None
    run = start_run(kind, sys.argv, config.to_dict(), [PRESET_FILE, CONDITION_FILE], run_id=run_id, vae_run=vae_run)
    print(f"Run {run.id}: recorded in {run.folder}/ (python SimulGen-VAE.py --list_runs compares runs)")
    return run


@dataclass(frozen=True)
class ResumePlan:
    vae: Path | None             # VAE checkpoint to continue from
    vae_finished: bool           # its training is over and model_save/ holds the result: go on to the conditioner
    conditioner: Path | None     # conditioner checkpoint to continue from (None: start the conditioner afresh)
    run_id: str | None = None    # the run record the checkpoint belongs to (continued in runs/<id>/)


def resume_plan(given: str, config) -> ResumePlan:
    """What --resume[=PATH] of a full run continues: each checkpoint is checked here, before anything runs."""
    path = LAST_CHECKPOINT if given == AUTO_RESUME else Path(given)
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


TRAINING_FLAGS = ("plot", "size", "load_all", "device", "amp", "grad_checkpointing", "compile", "grad_accum_steps")


def overrides(args) -> dict:
    """The flags that are also condition.txt keys; those given override the file."""
    return {name: getattr(args, name) for name in TRAINING_FLAGS}


def warn(text: str) -> None:
    print(text, file=sys.stderr)


def announce_setup(runtime) -> None:
    if runtime.is_main:
        print(runtime.summary, flush=True)


def announce(archived) -> None:
    if archived is not None:
        print(f"The previous run's results were moved to {archived}/")
