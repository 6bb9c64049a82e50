"""Command line of SimulGen-VAE.py: parse flags, load the config, run the chosen command (from commands).

Every bad input ends here as one line on stderr and exit code 2 (no traceback); nothing on disk has been changed by
then, because the config and the data are checked before an earlier run's results are archived.
"""
import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from modules.config import FLAG_KEYS, check_flag, load_config
from modules.config.keys import add_key_flags
from modules.errors import InputError, Stopped
from modules.machine.device import pick_device
from modules.machine.logs import setup_logging
from modules.machine.memory import MemoryWatch
from modules.storage.atomic import DiskFull, is_out_of_space
from modules.storage.case_lock import case_folder_lock
from modules.storage.paths import AUTO_RESUME, CONDITIONER_FILE, MODEL_FILE
from modules.storage.runs import SORT_KEYS, list_runs

EXIT_BAD_INPUT = 2
# flags that only training reads (device also serves --reconstruct, --predict and --suggest, plot --evaluate)
TRAINING_ONLY_FLAGS = (*(key.field for key in FLAG_KEYS if key.field != "device"), "use_ddp", "lc_only", "resume")


class OneLineParser(argparse.ArgumentParser):
    """A bad flag gets the same one-line error and exit code 2 as any other bad input."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: command line: {message}. Fix: see 'python SimulGen-VAE.py -h'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="SimulGen-VAE.py",
        description="Train a hierarchical VAE surrogate of the simulations in the current case folder "
                    "(preset.txt, input_data/condition.txt, input_data/dataset{data_No}.npy|.h5|.hdf5|.pickle, or that "
                    "file in the case folder itself).",
        epilog=f"Flags that are also condition.txt keys ({', '.join(key.field for key in FLAG_KEYS)}) override the "
               "file.")
    parser.add_argument("--preset", type=int, default=1, help="which 4-line preset of preset.txt to use (default 1)")
    add_key_flags(parser)
    parser.add_argument("--use_ddp", action="store_true",
                        help="train with DistributedDataParallel in each process that torchrun starts (torchrun "
                             "--nproc_per_node=K SimulGen-VAE.py --use_ddp, or python launch_ddp.py --gpus=K)")
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
                             "default), by the VAE's reconstruction error of the validation designs (val_loss: mean "
                             "relative L2, %%) or by the conditioner's prediction error of them (lc_val_loss)")
    parser.add_argument("--dry_run", action="store_true",
                        help="with --checkpoints=clean: say what would be removed, remove nothing")
    parser.add_argument("--reconstruct", metavar="PATH.npy",
                        help="instead of training: encode and decode the simulations in PATH.npy ([n, T, M]) with "
                             "model_save/SimulGen-VAE and write them, in physical units, to --out (.npy, .h5, .xdmf, "
                             ".pvd)")
    parser.add_argument("--predict", metavar="PATH",
                        help="instead of training: the fields of new designs, from a CSV of their parameters or a "
                             "folder (or one file) of their images, with model_save/latent_conditioner; "
                             "written in physical units to --out (.npy, .h5, .xdmf or .pvd) as they are predicted")
    parser.add_argument("--samples", type=int, metavar="K", default=0,
                        help="with --predict: also draw K samples per design from the prediction's calibrated "
                             "uncertainty, written with their mean and standard deviation (beside an .npy --out, "
                             "inside an .h5, .xdmf or .pvd)")
    parser.add_argument("--suggest", type=int, metavar="K",
                        help="instead of training: pick K designs to simulate next, those whose simulation would "
                             "remove most of the conditioner's uncertainty; written as a CSV to --out (default "
                             "output/suggested_designs.csv)")
    parser.add_argument("--candidates", metavar="PATH.csv",
                        help="with --suggest: pick from the designs in this CSV (the training parameters' columns) "
                             "instead of a Sobol sample of the training parameter box")
    parser.add_argument("--out", metavar="OUT",
                        help="output file of --reconstruct or --predict (.npy, .h5 or .hdf5, .xdmf or .pvd for "
                             "ParaView: chosen by the suffix) or --suggest (.csv); must not exist yet")
    parser.add_argument("--quiet", action="store_true",
                        help="print only warnings, errors and the notes on the settings files (no reports, summary "
                             "lines or progress bars; the files are written as always)")
    parser.add_argument("--store_half", choices=("float16", "bfloat16"),
                        help="instead of training: write input_data/dataset{data_No}.float16.npy (or .bfloat16.npy), "
                             "a half-size copy of the dataset, and say its largest rounding error per variable; "
                             "data_storage then trains on it")
    parser.add_argument("--import", dest="import_results", metavar="RESULTS_DIR",
                        help="instead of training: build the case from a folder of simulation results, one entry per "
                             "design (.pvd of .vtu files, XDMF 3 time series, Exodus II, LS-DYNA d3plot series): "
                             "writes input_data/dataset{data_No}.npy, the mesh and the time values, and sets "
                             "condition.txt's Dim1, Dim2, Dim3, num_var, mesh_file and time_values")
    parser.add_argument("--fields", metavar="NAME[,NAME]",
                        help="with --import: the variables to import, side by side (num_var); a vector as "
                             "NAME:magnitude or NAME:x|y|z; without it the names found are listed")
    parser.add_argument("--order_by", metavar="FILE.csv:COLUMN",
                        help="with --import: the designs in this CSV's row order, COLUMN naming each row's design "
                             "(its folder or file name); the other columns become input_data/parameters{data_No}.csv "
                             "and the conditioner's input")
    parser.add_argument("--export", metavar="PATH.onnx|PATH.pt2",
                        help="instead of training: write the whole prediction (design parameters or images in, "
                             "fields in physical units out) as one ONNX model (or torch.export .pt2), checked "
                             "against --predict")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(quiet=args.quiet)
    try:
        refuse_flags_of_the_other_mode(args)
        run_command(args, sys.argv[1:] if argv is None else argv)
    except InputError as error:
        print(f"error: {error.message()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        if not is_out_of_space(error):
            raise
        # a write that storage.atomic does not make (TensorBoard events, a memory-mapped output, archiving)
        print(f"error: {DiskFull(error.filename or Path.cwd()).message()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"{stop}; the training state is saved in {stop.checkpoint}. Continue with the same command plus "
                  "--resume", file=sys.stderr)
        return 128 + stop.signal_number
    return 0


def run_command(args, argv) -> None:
    """The mode the flags chose. Each command is imported when it runs: --predict then starts without training's
    libraries (plots, TensorBoard, scikit-learn), whose import is a noticeable part of a prediction's time."""
    device = args.device or "auto"
    if args.list_runs:
        print(list_runs(args.list_runs))
    elif args.reconstruct is not None:
        from modules.commands.reconstruct import reconstruct_file
        device = pick_device(check_flag("device", device))
        with MemoryWatch(device).phase("--reconstruct"):
            reconstruct_file(args.reconstruct, args.out, MODEL_FILE, device)
    elif args.predict is not None:
        from modules.commands.predict import predict_file
        device = pick_device(check_flag("device", device))
        with MemoryWatch(device).phase("--predict"):
            predict_file(args.predict, args.out, args.samples, CONDITIONER_FILE, device)
    elif args.export is not None:
        from modules.commands.export import export_surrogate
        export_surrogate(args.export, CONDITIONER_FILE)
    elif args.suggest is not None:
        from modules.commands.suggest import suggest_designs
        with writing_in_the_case_folder(argv):  # output/ by default
            suggest_designs(args.suggest, args.candidates, args.out, CONDITIONER_FILE,
                            pick_device(check_flag("device", device)))
    elif args.import_results is not None:
        from modules.commands.import_results import import_results
        with writing_in_the_case_folder(argv):
            print(import_results(args.import_results, args.fields, args.order_by, args.preset))
    elif args.store_half is not None:
        from modules.commands.store_half import store_half
        with writing_in_the_case_folder(argv):
            print(store_half(load_config(args.preset), args.store_half))
    elif args.checkpoints == "list" or (args.checkpoints and args.dry_run):
        from modules.commands.checkpoints import checkpoints_command
        checkpoints_command(args.checkpoints, args.dry_run, load_config(args.preset))
    else:
        with writing_in_the_case_folder(argv):
            run_writer(args)


def run_writer(args) -> None:
    """The modes that write in the case folder: training, --evaluate and --checkpoints=clean."""
    if args.evaluate:
        from modules.commands.evaluate import evaluate_saved
        config = load_config(args.preset, {"plot": args.plot, "device": args.device})
        with MemoryWatch(pick_device(config.device)).phase("--evaluate"):
            evaluate_saved(config)
    elif args.checkpoints:
        from modules.commands.checkpoints import checkpoints_command
        checkpoints_command(args.checkpoints, args.dry_run, load_config(args.preset))
    else:
        from modules.commands.train import train_all, train_conditioner_only
        train = train_conditioner_only if args.lc_only else train_all
        train(load_config(args.preset, overrides(args)), args.use_ddp, args.resume)


def writing_in_the_case_folder(argv):
    """The case folder's lock (storage.case_lock), taken by the main process; the other processes of a DDP run
    write nothing there."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return case_folder_lock(shlex.join(["SimulGen-VAE.py", *argv]))


def refuse_flags_of_the_other_mode(args) -> None:
    """A flag that the chosen mode would not use is an error, never silently ignored."""
    empty = [f"--{name}" for name in ("reconstruct", "predict", "candidates", "out", "export", "fields", "order_by")
             if getattr(args, name) == ""]
    if args.import_results == "":
        empty.insert(0, "--import")
    if empty:
        raise InputError("command line", f"{empty[0]} is given no path", f"write {empty[0]}=PATH, or drop it")
    modes = [f"--{name}" for name in ("checkpoints", "reconstruct", "predict", "evaluate", "list_runs", "suggest",
                                      "export", "store_half")
             if getattr(args, name) is not None and getattr(args, name) is not False]
    if args.import_results is not None:
        modes.append("--import")
    if len(modes) > 1:
        raise InputError("command line", f"{' and '.join(modes)} are different modes", "give one of them")
    mode = modes[0] if modes else None
    if args.dry_run and args.checkpoints != "clean":
        raise InputError("command line", "--dry_run only applies to --checkpoints=clean", "add it, or drop --dry_run")
    if mode:
        unused = [f"--{name}" for name in TRAINING_ONLY_FLAGS
                  if flag_given(args, name) and not (name == "plot" and mode == "--evaluate")]
        if mode in ("--list_runs", "--export", "--store_half", "--import") and args.device:
            unused.append("--device")  # --export runs on the CPU: its file runs wherever its runtime does
        if unused:
            where = {("--plot",): "training and --evaluate",
                     ("--device",): "training, --evaluate, --predict, --reconstruct and --suggest"}.get(
                         tuple(unused), "training")
            raise InputError("command line", f"{', '.join(unused)} only apply to {where}, not to {mode}",
                             "drop them")
    if args.out is not None and mode not in ("--reconstruct", "--predict", "--suggest"):
        raise InputError("command line", "--out is where --reconstruct, --predict or --suggest writes, but none of "
                         "them is given", "add --reconstruct=PATH.npy, --predict=PATH or --suggest=K, or drop --out")
    for name in ("fields", "order_by"):
        if getattr(args, name) is not None and mode != "--import":
            raise InputError("command line", f"--{name} says what --import reads, but --import is not given",
                             f"add --import=RESULTS_DIR, or drop --{name}")
    if args.candidates is not None and mode != "--suggest":
        raise InputError("command line", "--candidates are the designs --suggest picks from, but --suggest is not "
                         "given", "add --suggest=K, or drop --candidates")
    if args.lc_only and args.size:
        raise InputError("command line", "--size sets the VAE, which --lc_only=1 does not train",
                         "drop --size (the saved VAE keeps its size)")
    if args.samples < 0 or (args.samples and not args.predict):
        raise InputError("command line", f"--samples={args.samples} needs --predict and a count >= 1",
                         "use --samples=K together with --predict, or drop it")
    if args.suggest is not None and args.suggest <= 0:
        raise InputError("command line", f"--suggest={args.suggest} asks for no designs", "give --suggest=K, K >= 1")


def flag_given(args, name: str) -> bool:
    """Whether the user gave this flag (an explicit --plot=0 counts; --lc_only=0 is the default mode)."""
    value = getattr(args, name)
    return value is not None and value is not False and not (name == "lc_only" and value == 0)


def overrides(args) -> dict:
    """The flags that are also condition.txt keys; those given override the file."""
    return {key.field: getattr(args, key.field) for key in FLAG_KEYS}

