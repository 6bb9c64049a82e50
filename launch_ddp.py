"""Start multi-process training through torchrun, without typing its arguments.

    python launch_ddp.py --gpus=4                     # one process per GPU on this machine
    python launch_ddp.py --gpus=4 --lc_only=1         # only the latent conditioner, on the saved VAE
    python launch_ddp.py --gpus=4 --amp=bf16 --grad_accum_steps=2   # speed flags are passed to every process
    python launch_ddp.py --gpus=4 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1   # first of two machines

First makes every check of the case's inputs that SimulGen-VAE.py makes before training (config, data, design
inputs, the VAE a --lc_only=1 run uses, a checkpoint to --resume, another run writing in the case folder): what it
would refuse gets one line and exit code 2, and no process is started. Then it runs
`python -m torch.distributed.run ... SimulGen-VAE.py --use_ddp ...`, prints that command, and exits with its exit
code (torchrun's: 1 when a worker failed). On a machine without GPUs, --gpus=K starts K CPU processes that train with
the gloo backend.
"""
import argparse
import shlex
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "SimulGen-VAE.py"
sys.path.insert(0, str(SCRIPT.parent))

from modules.config import FLAG_KEYS, load_config  # noqa: E402
from modules.config.keys import add_key_flags  # noqa: E402
from modules.errors import InputError  # noqa: E402
from modules.machine.logs import setup_logging, silenced  # noqa: E402

CONFIG_FLAGS = tuple(key.field for key in FLAG_KEYS if key.launched)  # condition.txt keys passed on as flags
PASSED_FLAGS = ("preset", *CONFIG_FLAGS, "lc_only", "resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, required=True, help="processes on this machine (one per GPU)")
    parser.add_argument("--preset", type=int, help="passed to SimulGen-VAE.py")
    add_key_flags(parser, [key for key in FLAG_KEYS if key.launched])  # passed to SimulGen-VAE.py
    parser.add_argument("--lc_only", type=int, choices=(0, 1), help="passed to SimulGen-VAE.py (1: train only the "
                        "latent conditioner on the saved VAE)")
    parser.add_argument("--resume", nargs="?", const="last", metavar="PATH",
                        help="passed to SimulGen-VAE.py (continue from checkpoints/last.pt, or from PATH)")
    parser.add_argument("--quiet", action="store_true", help="passed to SimulGen-VAE.py; this launcher then prints "
                        "only errors")
    parser.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    parser.add_argument("--node_rank", type=int, default=0, help="this machine's index, 0..nnodes-1 (default 0)")
    parser.add_argument("--master_addr", default="127.0.0.1", help="address of the node_rank 0 machine")
    parser.add_argument("--master_port", type=int, default=29500, help="free TCP port on that machine (default 29500)")
    parser.add_argument("--train_latent_conditioner_only", help=argparse.SUPPRESS)  # the original's: refused below
    return parser


def torchrun_command(args) -> list:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.gpus}",
               f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", f"--master_addr={args.master_addr}",
               f"--master_port={args.master_port}", str(SCRIPT), "--use_ddp"]
    for flag in PASSED_FLAGS:
        if getattr(args, flag) is not None:
            command.append(f"--{flag}={getattr(args, flag)}")
    if args.quiet:
        command.append("--quiet")
    return command


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpus < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        print("error: command line: need --gpus >= 1, --nnodes >= 1 and 0 <= --node_rank < --nnodes. "
              "Fix: correct those flags", file=sys.stderr)
        return 2
    if args.train_latent_conditioner_only is not None:
        print("error: command line: --train_latent_conditioner_only is the original SimulGenVAE launcher's flag. "
              f"Fix: use --lc_only={args.train_latent_conditioner_only}", file=sys.stderr)
        return 2
    if args.lc_only and args.size:
        print("error: command line: --size sets the VAE, which --lc_only=1 does not train. Fix: drop --size",
              file=sys.stderr)
        return 2
    try:
        setup_logging(quiet=args.quiet)
        with silenced("modules.config"):  # the workers say the config's notes
            config = load_config(args.preset or 1, {flag: getattr(args, flag) for flag in CONFIG_FLAGS})
        from modules.commands.train import check_training_inputs  # imports torch: --help stays fast without it
        from modules.storage.case_lock import check_case_folder_free
        check_case_folder_free()
        if not args.quiet:
            print("Checking the case's inputs as SimulGen-VAE.py will (the data is read once)...", flush=True)
        check_training_inputs(config, bool(args.lc_only), args.resume)
    except InputError as error:
        print(f"error: {error.message()}", file=sys.stderr)
        return 2
    import torch  # only here: --help stays fast

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available and args.gpus > available:
        print(f"error: command line: --gpus={args.gpus} but this machine has {available} GPU(s). "
              f"Fix: use --gpus={available} or fewer", file=sys.stderr)
        return 2
    command = torchrun_command(args)
    if not args.quiet:
        if not available:
            print(f"No GPU found: starting {args.gpus} CPU process(es) with the gloo backend.")
        print("Running: " + shlex.join(command), flush=True)
    return run_forwarding_sigterm(command)


def run_forwarding_sigterm(command) -> int:
    """Run torchrun and pass a SIGTERM sent to this launcher on to it (torchrun then stops its workers, which save
    their state). Ctrl-C reaches torchrun and the workers from the terminal already, so SIGINT is not forwarded."""
    process = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda number, frame: process.send_signal(number))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return process.wait()


if __name__ == "__main__":
    sys.exit(main())
