"""Command line of SimulGen-VAE.py: parse flags, load the config, run the chosen mode.

Every bad input ends here as one line on stderr and exit code 2 (no traceback); nothing on disk has been changed by
then, because the config and the data are checked before an earlier run's results are archived.
"""
import argparse
import sys

from modules.config import check_flag, load_config
from modules.errors import InputError
from modules.outputs import MODEL_FILE, archive_previous_run, make_run_folders
from modules.reconstruct import reconstruct_file
from modules.distributed import barrier, start_runtime, stop_runtime
from modules.runtime import pick_device
from modules.train_vae import prepare_case, train_vae

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """A bad flag gets the same one-line error and exit code 2 as any other bad input."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: command line: {message}. Fix: see 'python SimulGen-VAE.py -h'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="SimulGen-VAE.py",
        description="Train a hierarchical VAE surrogate of the simulations in the current case folder "
                    "(preset.txt, input_data/condition.txt, input_data/dataset{data_No}.npy|.h5|.hdf5|.pickle).",
        epilog="Flags that are also condition.txt keys (plot, size, load_all, device) override the file.")
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
    parser.add_argument("--use_ddp", action="store_true",
                        help="train with DistributedDataParallel in each process that torchrun starts "
                             "(torchrun --nproc_per_node=K SimulGen-VAE.py --use_ddp, or python launch_ddp.py --gpus=K)")
    parser.add_argument("--reconstruct", metavar="PATH.npy",
                        help="instead of training: encode and decode the simulations in PATH.npy ([n, T, M]) with "
                             "model_save/SimulGen-VAE and write them, in physical units, to --out")
    parser.add_argument("--out", metavar="OUT.npy", help="output file of --reconstruct (must not exist yet)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_flags_of_the_other_mode(args)
        if args.reconstruct:
            device = pick_device(check_flag("device", args.device or "auto"))
            reconstruct_file(args.reconstruct, args.out, MODEL_FILE, device)
        else:
            train(args)
    except InputError as error:
        print(f"error: {error.message()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def refuse_flags_of_the_other_mode(args) -> None:
    """A flag that the chosen mode would not use is an error, never silently ignored."""
    if args.reconstruct:
        unused = [f"--{name}" for name in ("plot", "size", "load_all", "use_ddp") if getattr(args, name) not in
                  (None, False)]
        if unused:
            raise InputError("command line", f"{', '.join(unused)} only apply to training, not to --reconstruct "
                             "(it uses the saved model's settings)", "drop them")
    elif args.out:
        raise InputError("command line", "--out is where --reconstruct writes, but --reconstruct is not given",
                         "add --reconstruct=PATH.npy or drop --out")


def train(args) -> None:
    overrides = {"plot": args.plot, "size": args.size, "load_all": args.load_all, "device": args.device}
    config = load_config(args.preset, overrides, warn=lambda text: print(text, file=sys.stderr))
    runtime = start_runtime(config.device, args.use_ddp)
    try:
        case = prepare_case(config, runtime)  # every input check happens before anything on disk moves
        if runtime.is_main:
            archived = archive_previous_run()
            if archived is not None:
                print(f"The previous run's results were moved to {archived}/")
            make_run_folders()
        barrier(runtime)
        train_vae(config, runtime, case)
    finally:
        stop_runtime()
