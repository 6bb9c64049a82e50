"""Multi-process training under torchrun: process group, this rank's share of each batch, cross-rank sums.

    torchrun --nproc_per_node=4 SimulGen-VAE.py --use_ddp        (or: python launch_ddp.py --gpus=4)

Every rank computes; only rank 0 writes files and prints. Each global batch (the same on every rank) is cut into
per-rank shards, each rank reads only its shard, and the loss is weighted so that DistributedDataParallel's gradient
average equals the gradient of the whole batch: K processes train the same model as one process with the same batch.
"""
import dataclasses
import datetime
import gc
import os

import numpy as np
import torch
import torch.distributed as dist

from modules.errors import InputError
from modules.machine.device import Runtime, pick_device, runtime_for

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for the slowest rank. Between the VAE and the conditioner the main process alone saves
# the model and scores it (streamed passes over the whole dataset: minutes at 484 x 200 x 95,008) while the others
# wait at a barrier; NCCL's default of 10 minutes could end a large run there.
WAIT_FOR_MAIN = datetime.timedelta(hours=2)


def start_runtime(config, use_ddp: bool) -> Runtime:
    """The runtime of this process; with use_ddp, join torchrun's process group (NCCL on CUDA, gloo on CPU)."""
    if not use_ddp:
        return runtime_for(pick_device(config.device), config)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError("command line", f"--use_ddp needs torchrun's environment ({', '.join(missing)} not set)",
                         "start it with 'torchrun --nproc_per_node=K SimulGen-VAE.py --use_ddp' or "
                         "'python launch_ddp.py --gpus=K'")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(config.device, int(os.environ["LOCAL_RANK"]))
    runtime = runtime_for(device, config, rank, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=WAIT_FOR_MAIN)
    # host-side decisions (stop requests) travel over gloo on the CPU; with NCCL they would make the host wait
    control_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN) if device.type == "cuda" else None
    return dataclasses.replace(runtime, control_group=control_group)


def stop_runtime() -> None:
    """Leave the process group while the interpreter is fully alive. DDP wrappers sit in reference cycles: left to
    the collector at exit, their gloo work objects are freed during interpreter finalisation, where taking the GIL
    aborts the process ("terminate called without an active exception"), seen once in CI as a failed rank."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


def sum_over_ranks(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.world_size > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True in every process if flag is true in any: a host-side decision (a stop request) shared without touching
    the GPU, over the CPU control group."""
    if runtime.world_size == 1:
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=runtime.control_group)
    return bool(value[0] > 0)


def shard(positions: np.ndarray, runtime: Runtime):
    """This rank's part of a global batch, and the weight that makes the ranks' mean gradient the batch's gradient.

    Returns (positions, weight). A rank left without designs (a last batch smaller than the world) takes one
    design with weight 0, because every rank must join each gradient all-reduce.
    """
    local = positions[runtime.rank::runtime.world_size]
    if len(local) == 0:
        return positions[:1], 0.0
    return local, len(local) * runtime.world_size / len(positions)


def wrap_model(model, runtime: Runtime):
    """The module to train: DistributedDataParallel over the model under torchrun, the model itself otherwise."""
    if runtime.world_size == 1:
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Buffers are not re-sent before every forward: the model's are the frozen POD path (tens of MB at 95k nodes) and
    # the likelihood's noise scale, which every rank sets alike from all-reduced numbers. DDP's construction sends
    # rank 0's parameters and buffers once, so every rank starts from rank 0's POD basis.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
