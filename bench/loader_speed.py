"""How fast the streamed loader (data.batches.StreamedBatches, load_all 0) delivers batches into host memory, next to
a plain sequential read of the same file, at a given design size (default 200 steps x 95,008 nodes: 76 MB per design
in float32, the users' scale), with the page cache warm or cold, for 1, 2 or 4 DDP ranks on this machine and for the
float32 dataset or its half-size copy (--store_half).

    python bench/loader_speed.py                                   # 32 designs, warm and cold, 1/2/4 ranks
    python bench/loader_speed.py --designs 16 --ranks 1 --cache warm --readers 0 1 2 --json loader.json

Each measurement is one shuffled pass over every design in batches of --batch (after an untimed one), through the
project's own code, two ways: the loader alone (data.batches.BatchReader as for a GPU: the designs as stored, into
the buffers it keeps, pinned where a GPU is there; what the copies to a GPU read) and the whole streamed path for
--device (data.batches.StreamedBatches: for the CPU, float32 batches in fresh memory, widened and scaled in place;
for a GPU, copied there, widened and scaled). Under several ranks each rank is a process that reads its shard of
every batch (machine.processes.shard), as under torchrun; they start together and the pass ends with the last one.
Rates:
file GB/s (bytes read from the file per second of the pass) and the share of the plain read's GB/s; the plain read
is one process reading the whole file front to back in 64 MB pieces into one buffer (`readinto`), the disk's speed
as this machine sees it.
- warm: the file is read once before (it must fit in free memory); cold: every page of the file is dropped from the
  page cache (posix_fadvise DONTNEED, which needs no root) before each pass. On a virtual machine the host may still
  cache the disk, so a "cold" read can be faster than the physical disk.
- The data is synthetic (bench/benchmark.py's smooth fields) in a temporary folder, or --data FILE.npy.
The numbers describe this run on this machine; they change with the disk, the memory and what else is running.
"""
import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PLAIN_READ_BYTES = 64 * 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=95008)
    parser.add_argument("--data", type=Path, help="a real [N, T, M] float32 .npy instead of synthetic data")
    parser.add_argument("--batch", type=int, default=4, help="designs per batch (all ranks together)")
    parser.add_argument("--readers", type=int, nargs="+", default=[0, 2], help="reader threads per rank")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"])
    parser.add_argument("--storage", nargs="+", choices=("float32", "float16", "bfloat16"),
                        default=["float32", "float16"])
    parser.add_argument("--device", default="cpu", help="where the batches go: cpu, or cuda for a GPU")
    parser.add_argument("--repeats", type=int, default=2, help="passes per configuration; the best is kept")
    parser.add_argument("--workdir", type=Path, help="where the synthetic data goes (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="simulgen-loader-", dir=args.workdir) as folder:
        case = Path(folder)
        shape = write_case(case, args)
        rows = []
        for storage in args.storage:
            path = case / "input_data" / ("dataset1.npy" if storage == "float32" else f"dataset1.{storage}.npy")
            for cache in args.cache:
                plain = best(args.repeats, lambda: plain_read(path, cache))
                rows.append({"storage": storage, "cache": cache, "ranks": 1, "readers": "plain read", "to": "host",
                             "file_gb_s": plain, "share_of_plain": 1.0})
                print(table_row(rows[-1]), file=sys.stderr, flush=True)  # progress; the table follows at the end
                for ranks in args.ranks:
                    for readers in args.readers:
                        for stage in ("host", args.device):
                            rate = best(args.repeats, lambda: loader_pass(case, path, storage, cache, ranks, readers,
                                                                          stage, args))
                            rows.append({"storage": storage, "cache": cache, "ranks": ranks, "readers": readers,
                                         "to": stage, "file_gb_s": rate, "share_of_plain": rate / plain})
                            print(table_row(rows[-1]), file=sys.stderr, flush=True)
    report = {"shape": list(shape), "design_mb": shape[1] * shape[2] * 4 / 1e6, "batch": args.batch,
              "device": args.device, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                 "python": platform.python_version()}, "rows": rows}
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def write_case(case: Path, args) -> tuple:
    """A case folder whose input_data/ holds the float32 dataset and each half-size copy asked for."""
    from benchmark import write_synthetic

    data = case / "input_data"
    data.mkdir()
    if args.data is not None:
        os.symlink(args.data.resolve(), data / "dataset1.npy")
    else:
        write_synthetic(data / "dataset1.npy", (args.designs, args.steps, args.nodes))
    shape = np.load(data / "dataset1.npy", mmap_mode="r").shape
    (case / "preset.txt").write_text("data_No init_beta_divisor filters conditioner_filters\n1\n0\n"
                                     "64 32\n32 64\n")
    (data / "condition.txt").write_text(f"Dim1 {shape[0]}\nDim2 {shape[1]}\nDim3 {shape[2]}\nTraining_epochs 1\n"
                                        "plot 2\n")
    for storage in args.storage:
        if storage != "float32":
            in_case(case, lambda: store(storage))
    return shape


def in_case(case: Path, call):
    previous = os.getcwd()
    os.chdir(case)
    try:
        return call()
    finally:
        os.chdir(previous)


def store(storage: str) -> None:
    from modules.commands.store_half import store_half
    from modules.config import load_config

    store_half(load_config(1), storage)


def best(repeats: int, measure) -> float:
    return max(measure() for _ in range(repeats))


def drop_from_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def prepare_cache(path: Path, cache: str) -> None:
    if cache == "cold":
        drop_from_cache(path)
    else:
        plain_read(path, "warm")


def plain_read(path: Path, cache: str) -> float:
    """GB/s of one sequential read of the whole file into one reused buffer."""
    if cache == "cold":
        drop_from_cache(path)
    buffer = bytearray(PLAIN_READ_BYTES)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            total += count
    return total / (time.perf_counter() - start) / 1e9


def loader_pass(case: Path, path: Path, storage: str, cache: str, ranks: int, readers: int, stage: str,
                args) -> float:
    """File GB/s of one pass of every rank's loader over the designs (ranks processes started together, each after
    an untimed first pass, as every epoch after a training's first finds its loader)."""
    context = multiprocessing.get_context("spawn")
    warmed, start_line = context.Barrier(ranks + 1), context.Barrier(ranks + 1)
    results = context.Queue()
    processes = [context.Process(target=rank_pass, args=(str(case), storage, rank, ranks, readers, args.batch,
                                                         stage, (warmed, start_line), results))
                 for rank in range(ranks)]
    for process in processes:
        process.start()
    warmed.wait()
    prepare_cache(path, cache)
    start_line.wait()
    start = time.perf_counter()
    read = sum(results.get() for _ in processes)
    elapsed = time.perf_counter() - start
    for process in processes:
        process.join()
    return read / elapsed / 1e9


def rank_pass(case, storage, rank, ranks, readers, batch, stage, barriers, results) -> None:
    """One rank: an untimed pass, then a timed pass over its shard of every batch, to host memory (stage host: the
    loader alone) or scaled on a device (stage cpu or cuda); puts the bytes it read from the file in the timed
    pass."""
    os.chdir(case)
    import torch

    from modules.config import load_config
    from modules.data.batches import BatchReader, StreamedBatches, batch_order
    from modules.data.dataset import open_dataset
    from modules.data.scaling import MinMaxScaler
    from modules.machine.device import Runtime
    from modules.machine.processes import shard

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    config = load_config(1, {"data_storage": storage})
    array = open_dataset(config)
    pinned = torch.cuda.is_available()
    if stage == "host":
        loader = BatchReader(array, np.arange(config.n_designs), readers, gpu=True, pinned=pinned)
    else:
        loader = StreamedBatches(array, np.arange(config.n_designs), MinMaxScaler([-2.0], [2.0]), stage, readers,
                                 pinned)
    runtime = Runtime(device=torch.device("cpu"), rank=rank, world_size=ranks)
    order = [shard(positions, runtime)[0] for positions in batch_order(config.n_designs, batch, True, 0, 0)]
    design_bytes = int(np.prod(array.sample_shape)) * torch.empty(0, dtype=array.stored_dtype).element_size()
    for timed in (False, True):
        if timed:  # the first pass done, the parent empties the page cache (cold) between these two
            barriers[0].wait()
            barriers[1].wait()
        for scaled in loader.batches(order):
            if scaled.device.type == "cuda":
                torch.cuda.synchronize(scaled.device)
        del scaled
    results.put(sum(len(positions) for positions in order) * design_bytes)


def table_row(row: dict) -> str:
    to = {"host": "host memory (the loader)", "cpu": "scaled on the CPU", "cuda": "scaled on the GPU"}.get(
        row["to"], row["to"])
    return (f"| {row['storage']} | {row['cache']} | {row['ranks']} | {row['readers']} | {to} | "
            f"{row['file_gb_s']:.2f} | {100 * row['share_of_plain']:.0f} % |")


def markdown(report: dict) -> str:
    n, t, m = report["shape"]
    lines = [f"{n} designs x {t} steps x {m} nodes ({report['design_mb']:.0f} MB per design in float32), batches of "
             f"{report['batch']}, to {report['device']}; {report['machine']['cpus']} CPUs",
             "", "| storage | page cache | ranks | reader threads | to | file GB/s | of the plain read |",
             "|---|---|---:|---|---|---:|---:|"]
    return "\n".join(lines + [table_row(row) for row in report["rows"]])


if __name__ == "__main__":
    sys.exit(main())
