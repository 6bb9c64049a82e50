"""A whole run on data larger than its memory limit, as a cluster job runs it: how much memory each phase takes and
whether the run survives a memory cgroup (what SLURM's --mem and docker --memory set).

    sudo python bench/memory_limit.py                      (the case of issue #16: 403 x 100 x 50,000, 7.5 GB, 2.5 GB)
    sudo python bench/memory_limit.py --designs 150 --steps 50 --nodes 100000 --limit_gb 1 --json memory.json

It writes a case of smooth travelling-wave fields (4 parameters per design in parameters.csv, the CSV conditioner),
design by design, then runs in fresh processes:
- the full training run with --load_all=0 (VAE, conditioner, end-of-run evaluation) inside a new memory cgroup
  limited to --limit_gb; then --evaluate, --predict of the designs' parameters and --reconstruct of a tenth of the
  designs, each inside it too. For each: the exit code, wall seconds, the cgroup's peak usage (page cache included,
  as the kernel counts it for the limit), whether the kernel killed it, and the run's own per-phase peaks (its
  "Memory:" lines);
- the same training preloaded (--load_all=1) without a limit, for the wall-time ratio (issue target: <= 1.2).
A memory cgroup needs root and cgroup v1 (memory.limit_in_bytes) or v2 (memory.max) with the memory controller;
without one the script says so and stops.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CONDITION = """Dim1 {designs}
Dim2 {steps}
Dim3 {nodes}
Training_epochs {epochs}
Batch_size {batch}
LearningR 0.002
Latent_dim 8
Latent_dim_end 32
alpha auto
val_fraction 0.1
plot 2
input_type csv
param_dir input_data/parameters.csv
n_epoch {lc_epochs}
"""
PRESET = "data_No, init_beta_divisor, encoder_filters, conditioner_filters\n1\n0\n{filters}\n32 64 128 256\n"


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", type=int, default=403)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=50_000)
    parser.add_argument("--limit_gb", type=float, default=2.5, help="the memory cgroup's limit")
    parser.add_argument("--batch", type=int, default=16, help="Batch_size")
    parser.add_argument("--filters", default="256 128 64 32")
    parser.add_argument("--epochs", type=int, default=2, help="VAE epochs")
    parser.add_argument("--lc_epochs", type=int, default=50, help="conditioner epochs")
    parser.add_argument("--skip_preloaded", action="store_true", help="do not run the unlimited preloaded training")
    parser.add_argument("--workdir", default="bench_memory", help="where the case is written (a new folder)")
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def write_case(folder: Path, args) -> None:
    """Fields u(x, t) = a + b sin(k x - c t) exp(-t / 4) on x in [0, 2 pi), one design at a time (the file may be
    larger than memory)."""
    data = folder / "input_data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parameters = np.column_stack([rng.uniform(0, 1, args.designs), rng.uniform(0.5, 1.5, args.designs),
                                  rng.integers(1, 4, args.designs), rng.uniform(0, 3, args.designs)])
    np.savetxt(data / "parameters.csv", parameters, delimiter=",", header="a,b,k,c", comments="", fmt="%.8g")
    fields = np.lib.format.open_memmap(data / "dataset1.npy", mode="w+", dtype=np.float32,
                                       shape=(args.designs, args.steps, args.nodes))
    x = np.linspace(0, 2 * np.pi, args.nodes, endpoint=False, dtype=np.float32)
    t = np.linspace(0, 1, args.steps, dtype=np.float32)[:, None]
    for design, (a, b, k, c) in enumerate(parameters.astype(np.float32)):
        fields[design] = a + b * np.sin(k * x - c * t) * np.exp(-t / 4)
    fields.flush()
    del fields
    (folder / "preset.txt").write_text(PRESET.format(filters=args.filters))
    (data / "condition.txt").write_text(CONDITION.format(**vars(args)))
    np.save(folder / "new_simulations.npy", np.load(data / "dataset1.npy", mmap_mode="r")[:max(1, args.designs // 10)])


def memory_cgroup(limit_bytes: int) -> tuple:
    """A new memory cgroup below this process's own, limited to limit_bytes: (folder, its file names for the limit,
    the peak usage and the OOM events), or None where this machine does not allow one."""
    membership = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in membership if ":memory:" in line]
    root, files = (Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.max_usage_in_bytes",
                                                   "memory.oom_control")) if v1 else \
        (Path("/sys/fs/cgroup"), ("memory.max", "memory.peak", "memory.events"))
    own = v1[0] if v1 else next((line.split(":", 2)[2] for line in membership if line.startswith("0::")), "/")
    folder = root / own.strip().strip("/") / f"simulgen-bench-{os.getpid()}"
    try:
        folder.mkdir()
        (folder / files[0]).write_text(str(limit_bytes))
    except OSError:
        if folder.exists():
            folder.rmdir()
        return None
    return folder, files


def run(command: list, folder: Path, group=None) -> dict:
    """One command in folder (inside the cgroup when given): exit code, wall seconds, its stdout's "Memory:" lines,
    and with a cgroup its peak usage and whether the kernel killed a process of it."""
    if group is not None and group[1][1] == "memory.max_usage_in_bytes":
        (group[0] / group[1][1]).write_text("0")  # v1: the peak restarts for this command
    began = time.perf_counter()
    enter = (lambda: (group[0] / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    done = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), *command], cwd=folder, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, preexec_fn=enter)
    result = {"command": " ".join(command), "exit_code": done.returncode,
              "seconds": round(time.perf_counter() - began, 1),
              "memory_lines": [line.strip() for line in done.stdout.splitlines() if line.startswith("Memory:")],
              "last_error": done.stderr.strip().splitlines()[-1] if done.returncode and done.stderr.strip() else None}
    (folder / f"{command[0].strip('-').split('=')[0] or 'train'}.log").write_text(done.stdout + done.stderr)
    if group is not None:
        events = dict(line.split() for line in (group[0] / group[1][2]).read_text().splitlines())
        result["cgroup_peak_gb"] = round(int((group[0] / group[1][1]).read_text()) / 1e9, 2)
        result["oom_killed"] = int(events.get("oom_kill", 0)) > 0
    return result


def main(argv=None) -> int:
    args = parse_arguments(argv)
    folder = Path(args.workdir)
    if folder.exists():
        raise SystemExit(f"error: {folder} exists. Fix: remove it or give another --workdir")
    group = memory_cgroup(int(args.limit_gb * 1e9))
    if group is None:
        raise SystemExit("error: this machine does not let this process make a memory cgroup. Fix: run as root on a "
                         "machine with the cgroup memory controller")
    try:
        write_case(folder, args)
        size_gb = (folder / "input_data" / "dataset1.npy").stat().st_size / 1e9
        print(f"case: {args.designs} x {args.steps} x {args.nodes} ({size_gb:.2f} GB), limit {args.limit_gb} GB")
        runs = []
        for command in (["--load_all=0"], ["--evaluate"], ["--predict=input_data/parameters.csv",
                                                            "--out=predicted.npy"],
                        ["--reconstruct=new_simulations.npy", "--out=reconstructed.npy"]):
            runs.append(run(command, folder, group))
            print(json.dumps(runs[-1]))
            if runs[-1]["exit_code"] != 0:
                break
    finally:
        group[0].rmdir()
    for written in ("predicted.npy", "reconstructed.npy"):
        (folder / written).unlink(missing_ok=True)
    report = {"case": {"designs": args.designs, "steps": args.steps, "nodes": args.nodes, "data_gb": round(size_gb, 2),
                       "filters": args.filters, "batch": args.batch, "epochs": args.epochs,
                       "lc_epochs": args.lc_epochs}, "limit_gb": args.limit_gb, "limited": runs}
    if not args.skip_preloaded and runs[0]["exit_code"] == 0:
        report["preloaded_unlimited"] = run(["--load_all=1"], folder)
        report["ratio_streamed_limited_to_preloaded"] = round(runs[0]["seconds"]
                                                              / report["preloaded_unlimited"]["seconds"], 2)
        print(json.dumps(report["preloaded_unlimited"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
