"""Training and prediction speed and memory of SimulGenVAE at a given [N designs, T steps, M nodes], model size and
precision, measured with the project's own training code (prepare_case, build_model, train_epoch).

    python bench/benchmark.py --designs 64 --steps 200 --nodes 95008 --filters 1024 512 256 128 --batch 8
    python bench/benchmark.py --data input_data/dataset1.npy --amp off bf16 --loading lazy preloaded --json b.json
    python bench/benchmark.py --designs 32 --steps 50 --nodes 20000 --filters 128 64 32 --device cpu

Every combination of --loading, --amp, --grad_checkpointing and --compile runs in a fresh subprocess, so its peak
host memory (ru_maxrss) is its own. Each one builds a temporary case folder (preset.txt, input_data/condition.txt,
the dataset linked as input_data/dataset1.npy), trains --epochs epochs, of which the first is an untimed warm-up
(torch.compile, the allocator, the page cache), then times prediction: an untrained MLP conditioner (4 parameters ->
latents) followed by the VAE decoder, with the fields copied to the host, over at least 64 designs.

Reported per configuration: training designs/s, the share of training time the loop spends blocked waiting for the
next batch (lazy = streamed from the memory-mapped file, load_all 0; preloaded = load_all 1), the activations kept
for the backward pass of one batch (what gradient checkpointing reduces), peak host and device memory, prediction
designs/s and the setup time (prepare_case: one streamed scan of the data). Notes:
- Peak host memory includes pages of a memory-mapped dataset the process touched (file cache, reclaimable), and the
  streamed batches' buffers (read ahead by threads of the same process).
- Peak device memory is torch.cuda.max_memory_allocated() over training (tensors only, not the CUDA context).
- Without --data, synthetic float32 fields are written to a temporary .npy (under $TMPDIR); it needs N*T*M*4 bytes.
- On a small, busy CPU machine torch's threads contend with other processes and timings can drop many times over;
  the load average at the start and torch's thread count are printed with the results (OMP_NUM_THREADS sets it).
The numbers describe this run on this machine; they change with hardware, data size and what else is running.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYNTHETIC_CHUNK_BYTES = 64 * 2**20
PREDICT_DESIGNS = 64
CONDITIONER_INPUTS = 4
CONDITIONER_FILTERS = (32, 64, 128, 256)
DEFAULT_SHAPE = (64, 200, 95008)
LABELS = ("loading", "amp", "grad_checkpointing", "compile")  # the settings that vary from row to row


# ------------------------------------------------------------------------------------------------- parent process
def parse_args(argv=None):
    """The command line; --amp, --grad_checkpointing, --compile and --loading take several values each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", type=int, help=f"N of synthetic data (default {DEFAULT_SHAPE[0]})")
    parser.add_argument("--steps", type=int, help=f"T of synthetic data (default {DEFAULT_SHAPE[1]})")
    parser.add_argument("--nodes", type=int, help=f"M of synthetic data (default {DEFAULT_SHAPE[2]})")
    parser.add_argument("--data", type=Path, help="a real [N, T, M] .npy dataset (its shape replaces the three above)")
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--filters", type=int, nargs="+", default=[1024, 512, 256, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="the first is an untimed warm-up (at least 2)")
    parser.add_argument("--amp", nargs="+", choices=("auto", "bf16", "fp16", "off"), default=["auto"])
    parser.add_argument("--grad_checkpointing", type=int, nargs="+", choices=(0, 1), default=[0])
    parser.add_argument("--compile", type=int, nargs="+", choices=(0, 1), default=[0])
    parser.add_argument("--loading", nargs="+", choices=("lazy", "preloaded"), default=["lazy", "preloaded"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", default="auto", help="reader threads when streaming (num_workers): auto or a count")
    parser.add_argument("--json", type=Path, help="write the full results here (default: print them after the table)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one configuration as JSON: run in the child process
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    """Refuse what would waste a long run: too few epochs to time, or a shape given twice."""
    if args.one is not None:
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is a warm-up and is not timed")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    given = [name for name in ("designs", "steps", "nodes") if getattr(args, name) is not None]
    if args.data is not None and given:
        parser.error(f"--data takes N, T, M from the file's shape; drop --{', --'.join(given)}")
    if args.data is not None and args.data.suffix != ".npy":
        parser.error("--data must be an .npy file")


def dataset(args, folder: Path):
    """(absolute path of the .npy to train on, its shape (N, T, M), a description). Synthetic data goes in folder."""
    if args.data is not None:
        shape = np.load(args.data, mmap_mode="r").shape
        if len(shape) != 3:
            raise SystemExit(f"{args.data}: shape {shape} is not [N, T, M]")
        return args.data.resolve(), tuple(int(n) for n in shape), str(args.data)
    shape = tuple(value if value is not None else default
                  for value, default in zip((args.designs, args.steps, args.nodes), DEFAULT_SHAPE))
    path = folder / "synthetic.npy"
    write_synthetic(path, shape)
    return path, shape, "synthetic"


def write_synthetic(path: Path, shape, seed: int = 0) -> None:
    """float32 [N, T, M] smooth fields sin(k_i x + phase_i) * (0.5 + t) plus small noise, written a few designs at a
    time so the whole array is never in RAM; smooth fields give the POD initialisation real structure to find."""
    n_designs, n_steps, n_nodes = shape
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(seed)
    space = np.linspace(0, 2 * np.pi, n_nodes, dtype=np.float32)[None, None, :]
    growth = (0.5 + np.linspace(0, 1, n_steps, dtype=np.float32))[None, :, None]
    per_chunk = max(1, SYNTHETIC_CHUNK_BYTES // (4 * n_steps * n_nodes))
    for start in range(0, n_designs, per_chunk):
        count = min(per_chunk, n_designs - start)
        wave = rng.uniform(1, 4, (count, 1, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (count, 1, 1)).astype(np.float32)
        block = np.sin(space * wave + phase) * growth
        data[start:start + count] = block + 0.01 * rng.standard_normal(block.shape, dtype=np.float32)
    data.flush()
    del data


def configurations(args, data: Path, shape) -> list:
    """One settings dict per combination of loading x amp x grad_checkpointing x compile: what a child measures."""
    common = {"data": str(data), "shape": list(shape), "size": args.size, "filters": args.filters,
              "batch": args.batch, "epochs": args.epochs, "device": args.device, "workers": args.workers}
    return [{**common, "loading": loading, "amp": amp, "grad_checkpointing": checkpointing, "compile": compiled}
            for loading, amp, checkpointing, compiled in
            itertools.product(args.loading, args.amp, args.grad_checkpointing, args.compile)]


def run_child(settings: dict) -> dict:
    """Measure one configuration in a fresh interpreter; a failure becomes a row with its error, not a crash."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True)
    labels = {key: settings[key] for key in LABELS}
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit code {done.returncode}"  # a kill for memory leaves no message
        return {**labels, "error": error.replace("|", "/")}  # the error goes into a markdown table cell
    return {**labels, **json.loads(done.stdout.strip().splitlines()[-1])}


def host_hardware() -> dict:
    """What this machine is, as far as the host can tell without torch."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "logical_cores": os.cpu_count(), "ram_gb": total_ram_gb(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}  # other work on the machine skews timings


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def total_ram_gb():
    try:
        with open("/proc/meminfo") as meminfo:
            return round(next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")) * 1024 / 1e9, 1)
    except (OSError, StopIteration):
        return None


def hardware(host: dict, rows) -> dict:
    """The host's description plus torch, the device and the runtime line that the first successful child saw."""
    info = dict(host)
    measured = next((row for row in rows if "error" not in row), None)
    if measured is not None:
        info.update(measured["device_info"])
    return info


# -------------------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    """The readable summary: what was measured on what, then one table row per configuration."""
    inputs, info = report["inputs"], report["hardware"]
    gpu = (f"; GPU {info['gpu']} ({info['gpu_memory_gb']} GB)" if info.get("gpu") else
           "; no GPU used" if info.get("device") else "; device unknown (no configuration finished)")
    lines = [
        "Benchmark numbers measured by this run on this hardware (other machines, data sizes or load will differ):",
        f"- host: {info['cpu']}, {info['logical_cores']} logical cores, {info['ram_gb']} GB RAM{gpu}; load average "
        f"{info['load_average_1min_at_start']} when the run started",
        f"- software: Python {info['python']}, torch {info.get('torch', '?')} ({info.get('torch_threads', '?')} CPU "
        f"threads), {info['platform']}",
        f"- runtime (first configuration): {info.get('runtime_summary', '?')}",
        f"- data: [N, T, M] = {inputs['shape']} ({inputs['data']}); model size {inputs['size']}, filters "
        f"{inputs['filters']}, batch {inputs['batch']}; {inputs['epochs'] - 1} timed epoch(s) after 1 warm-up epoch",
        "",
        "| loading | precision | grad ckpt | compile | train samples/s | data-loading share | kept for backward GB "
        "| peak host GB | peak device GB | predict designs/s | setup s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(lines + [table_row(row) for row in report["rows"]])


def table_row(row: dict) -> str:
    head = f"| {row['loading']} | "
    if "error" in row:
        return head + f"{row['amp']} | {row['grad_checkpointing']} | {row['compile']} | failed: {row['error']} " \
                      "| | | | | | |"
    device = "-" if row["peak_device_gb"] is None else f"{row['peak_device_gb']:.2f}"
    return head + (f"{row['precision']} | {row['grad_checkpointing']} | {row['compile']} | "
                   f"{row['samples_per_s']:.1f} | {100 * row['data_share']:.1f} % | {row['activations_gb']:.3f} | "
                   f"{row['peak_host_gb']:.2f} | "
                   f"{device} | {row['predict_designs_per_s']:.1f} | {row['setup_s']:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    host = host_hardware()  # before the runs: its load average is the state of the machine they started in
    with tempfile.TemporaryDirectory(prefix="simulgen-bench-data-") as folder:
        data, shape, source = dataset(args, Path(folder))
        settings = configurations(args, data, shape)
        rows = run_all(settings)
    inputs = {key: value for key, value in settings[0].items() if key not in LABELS}
    report = {"inputs": {**inputs, "data": source}, "hardware": hardware(host, rows), "rows": rows}
    publish(report, args.json)
    return 1 if any("error" in row for row in rows) else 0


def run_all(settings) -> list:
    """One row per configuration, each measured in its own child process, one after the other."""
    rows = []
    for number, one in enumerate(settings, start=1):
        print(f"[{number}/{len(settings)}] " + ", ".join(f"{key} {one[key]}" for key in LABELS), file=sys.stderr,
              flush=True)
        rows.append(run_child(one))
    return rows


def publish(report: dict, json_path) -> None:
    """The table on stdout; the full JSON into json_path, or after the table when there is none."""
    print(markdown(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nFull results: {json_path}")
    else:
        print("\n" + json.dumps(report, indent=2))


# -------------------------------------------------------------------------------------------------- child process
def write_case(folder: Path, settings: dict) -> None:
    """preset.txt, input_data/condition.txt and input_data/dataset1.npy (a link to the data) for one configuration."""
    n_designs, n_steps, n_nodes = settings["shape"]
    (folder / "input_data").mkdir()
    (folder / "preset.txt").write_text("data_No init_beta_divisor filters conditioner_filters\n1\n0\n"
                                       f"{' '.join(map(str, settings['filters']))}\n"
                                       f"{' '.join(map(str, CONDITIONER_FILTERS))}\n")
    condition = {"Dim1": n_designs, "Dim2": n_steps, "Dim3": n_nodes, "Training_epochs": settings["epochs"],
                 "Batch_size": settings["batch"], "size": settings["size"],
                 "load_all": int(settings["loading"] == "preloaded"), "amp": settings["amp"],
                 "grad_checkpointing": settings["grad_checkpointing"], "compile": settings["compile"],
                 "num_workers": settings["workers"], "device": settings["device"], "plot": 2, "val_fraction": 0.1}
    (folder / "input_data" / "condition.txt").write_text("".join(f"{k} {v}\n" for k, v in condition.items()))
    os.symlink(settings["data"], folder / "input_data" / "dataset1.npy")


def measure(settings: dict) -> dict:
    """Run one configuration in a temporary case folder (the project reads its settings from the working
    directory) and return its measurements."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="simulgen-bench-case-") as folder:
        write_case(Path(folder), settings)
        os.chdir(folder)
        try:
            return measure_case(settings["batch"])
        finally:
            os.chdir(previous)


def measure_case(batch_size: int) -> dict:
    """Setup, training and prediction of the case in the working directory, with the project's own code."""
    import torch

    from modules.config import load_config
    from modules.data.case import prepare_case
    from modules.machine.device import PRECISION_NAMES
    from modules.machine.processes import start_runtime
    from modules.machine.reproducibility import seed_everything
    from modules.training.vae_training import build_model

    config = load_config(1)
    runtime = start_runtime(config, use_ddp=False)
    seed_everything(config.seed)
    start = time.perf_counter()
    case = prepare_case(config, runtime)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    model = build_model(config, case, runtime)
    model_init_s = time.perf_counter() - start
    activations = activation_gb(model, case, config, runtime)
    training = time_training(model, case, config, runtime)
    prediction = time_prediction(model, config, runtime, batch_size)
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KB on Linux
    return {"precision": PRECISION_NAMES[runtime.amp_dtype], "setup_s": setup_s, "model_init_s": model_init_s,
            **training, **prediction, "activations_gb": activations, "peak_host_gb": peak_host,
            "parameters": sum(p.numel() for p in model.parameters()), "runtime_summary": runtime.summary,
            "device_info": device_info(runtime, torch)}


class TimedBatches:
    """A batch source that counts how long the training loop is blocked waiting for each batch."""

    def __init__(self, source):
        self.source, self.wait_s = source, 0.0

    def __len__(self):
        return len(self.source)

    def batches(self, order):
        """Yields the wrapped source's [b, T, M] batches for order, adding each next()'s blocking time to wait_s."""
        batches = self.source.batches(order)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - start
            yield batch


def activation_gb(model, case, config, runtime) -> float:
    """GB that autograd keeps for the backward pass of one training batch: the activations that gradient
    checkpointing trades for recomputation (weights and tensors counted twice are left out). Peak host memory hides
    them on the CPU, where the allocator keeps freed memory and the memory-mapped data counts too."""
    import numpy as np
    import torch

    from modules.models.grad_checkpointing import enable_grad_checkpointing

    if config.grad_checkpointing:
        enable_grad_checkpointing(model)
    weights = {parameter.data_ptr() for parameter in model.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            kept[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    batch = next(case.train.batches([np.arange(min(config.batch_size, len(case.train)))]))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), runtime.autocast():
        model(batch)
    return sum(kept.values()) / 1e9


def time_training(model, case, config, runtime) -> dict:
    """config.epochs epochs of train_epoch; all but the first (warm-up) are timed. Returns training rates."""
    import torch

    from modules.training.guard import Guard, StopRequest
    from modules.training.loop import train_epoch
    from modules.training.optimizer_step import Updater, make_optimizer, training_module
    from modules.training.state import Progress
    from modules.training.vae_training import VAETraining

    trainer = training_module(model, config, runtime)
    optimizer = make_optimizer(model.parameters(), config.lr, config.weight_decay)  # as train_vae
    updater = Updater(trainer, optimizer, runtime, config.grad_clip)
    guard = Guard(config, runtime, StopRequest())  # never entered: the benchmark sets no signal handlers
    timed = dataclasses.replace(case, train=TimedBatches(case.train))
    job = VAETraining(model, timed, config, runtime)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    wall_s = wait_s = 0.0
    for epoch in range(config.epochs):
        timed.train.wait_s = 0.0
        start = time.perf_counter()
        train_epoch(job, trainer, updater, guard, Progress(epoch=epoch), config, runtime)
        synchronize(runtime, torch)
        if epoch > 0:  # the warm-up epoch pays for compilation, allocator growth and a cold page cache
            wall_s += time.perf_counter() - start
            wait_s += timed.train.wait_s
    designs = len(case.train) * (config.epochs - 1)
    peak_device = torch.cuda.max_memory_allocated(runtime.device) / 1e9 if runtime.device.type == "cuda" else None
    return {"train_designs": len(case.train), "timed_epochs": config.epochs - 1, "train_s": wall_s,
            "samples_per_s": designs / wall_s, "data_wait_s": wait_s, "data_share": min(1.0, wait_s / wall_s),
            "peak_device_gb": peak_device}


def synchronize(runtime, torch) -> None:
    """CUDA kernels run asynchronously: wait for them, or the clock stops before the work does."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def time_prediction(model, config, runtime, batch_size: int) -> dict:
    """Design parameters [B, 4] -> MLP conditioner -> VAE decoder -> fields [B, T, M] float32 on the host, over
    ceil(PREDICT_DESIGNS / batch_size) timed batches after one untimed warm-up batch. Returns designs/s."""
    import torch

    from modules.models.conditioners import ConditionerSpec, build_conditioner

    spec = ConditionerSpec(kind="mlp", input_shape=(CONDITIONER_INPUTS,), output_dim=config.latent_size,
                           filters=CONDITIONER_FILTERS)
    conditioner = build_conditioner(spec).to(runtime.device).eval()
    model.eval()
    n_batches = math.ceil(PREDICT_DESIGNS / batch_size)
    params = torch.rand(n_batches + 1, batch_size, CONDITIONER_INPUTS, device=runtime.device)
    with torch.no_grad():
        predict_batch(conditioner, model, params[0], runtime)
        start = time.perf_counter()
        for batch in params[1:]:
            predict_batch(conditioner, model, batch, runtime)
        elapsed = time.perf_counter() - start  # no sync needed: each batch ends in a blocking copy to the host
    return {"predict_designs": n_batches * batch_size, "predict_s": elapsed,
            "predict_designs_per_s": n_batches * batch_size / elapsed}


def predict_batch(conditioner, model, params, runtime):
    """params [B, 4] -> fields [B, T, M] float32 on the host."""
    from modules.models.latents import split_latents

    with runtime.autocast():
        main, levels = split_latents(conditioner(params), model.spec)
        fields = model.decode(main, levels)
    return fields.float().cpu()


def device_info(runtime, torch) -> dict:
    """torch's version and the device the child trained on (name and memory for a GPU)."""
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(runtime.device),
            "runtime_summary": runtime.summary}
    if runtime.device.type == "cuda":
        properties = torch.cuda.get_device_properties(runtime.device)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 1e9, 1))
    return info


if __name__ == "__main__":
    sys.exit(main())
