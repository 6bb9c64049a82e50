"""Where and how a run computes: device, rank, precision and data-loading choices, decided once and passed down."""
import os
import random
import resource
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.errors import InputError

PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SMALL_DATA_BYTES = 256 * 2**20  # below this, streamed batches are read without DataLoader workers (pick_workers)


@dataclass(frozen=True)
class Runtime:
    """Set once at start-up (training.distributed.start_runtime) and passed down; nothing below re-detects it.

    amp_dtype: autocast dtype of training forward passes (None: float32). num_workers, pin_memory: how streamed
    batches are loaded; pinned host memory is what makes the host-to-GPU copies non-blocking.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    num_workers: int = 0
    pin_memory: bool = False
    summary: str = ""  # what was chosen and why, printed once at start-up
    control_group: object = None  # process group for host-side flags under DDP (None: the default group)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0

    def autocast(self):
        """Context of a training forward pass: mixed precision when amp_dtype is set, plain float32 otherwise."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling (its range is too small for small gradients); bf16 and float32 do not."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def adapted(device: torch.device, config, rank=0, world_size=1, local_world_size=1) -> Runtime:
    """The runtime for this device and config: precision, loader workers and pinned memory from the hardware."""
    amp_dtype, amp_reason = pick_precision(config.amp, device)
    data_bytes = 4 * config.n_designs * config.n_steps_used * config.n_nodes_used
    workers, workers_reason = pick_workers(config.num_workers, device, bool(config.load_all), local_world_size,
                                           data_bytes)
    pin_memory = device.type == "cuda" and not config.load_all
    if config.deterministic:
        use_deterministic_algorithms()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls and convolutions in TF32 on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    where = str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    loading = ("data preloaded on the device" if config.load_all else
               f"streaming with {workers} DataLoader worker(s) ({workers_reason})"
               + (", pinned memory, non-blocking copies" if pin_memory else ""))
    summary = (f"Device setup: {where}; precision {PRECISION_NAMES[amp_dtype]} ({amp_reason}); {loading}; "
               f"gradient checkpointing {'on' if config.grad_checkpointing else 'off'}; "
               f"torch.compile {'on' if config.compile else 'off'}; "
               f"gradient accumulation over {config.grad_accum_steps} batch(es)"
               + ("; deterministic algorithms" if config.deterministic else ""))
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype, num_workers=workers,
                   pin_memory=pin_memory, summary=summary)


def full_float32(device: torch.device) -> None:
    """Float32 matrix products and convolutions in full float32 on a GPU, not TF32 (which cuDNN uses for
    convolutions by default): TF32 moved the demo's predicted fields by up to 3.8e-4 of their largest value on an
    H200 (the VAE's mean relative L2 error is 1.5e-3). For --predict, --reconstruct and --suggest, where the cost is
    small; training keeps TF32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    """'auto' takes this process's own GPU when there is one (never a hard-coded cuda:0), else the CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("device setting", f"device '{setting}' asked for, but no CUDA GPU is visible",
                         "use --device=auto or cpu (or the key device in condition.txt)")
    index = local_rank if setting in ("auto", "cuda") else int(setting.split(":")[1])
    if index >= torch.cuda.device_count():
        raise InputError("device setting", f"device cuda:{index} asked for, but only "
                         f"{torch.cuda.device_count()} GPU(s) are visible", "pick an existing GPU index")
    return torch.device("cuda", index)


def pick_precision(setting: str, device: torch.device):
    """The autocast dtype for amp = auto|bf16|fp16|off on this device, and why (for the start-up line).

    auto: bf16 on a GPU that supports it (no loss scaling needed), fp16 with a grad scaler on older GPUs, float32 on
    the CPU (CPU autocast is slower than float32 on most CPUs). bf16 and fp16 can be forced on the CPU too.
    """
    if setting == "off":
        return None, "amp off"
    cuda = device.type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if setting == "bf16" and not bf16_ok:
        raise InputError("amp setting", f"amp bf16 asked for, but {torch.cuda.get_device_name(device)} has no bf16",
                         "use --amp=fp16 or --amp=auto")
    if setting == "auto":
        if not cuda:
            return None, "amp auto: float32 on the CPU"
        return (torch.bfloat16, "amp auto: the GPU supports bf16") if bf16_ok else \
            (torch.float16, "amp auto: no bf16 on this GPU, fp16 with loss scaling")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting], f"amp {setting}"


def pick_workers(setting: str, device: torch.device, load_all: bool, local_world_size: int, data_bytes: int):
    """DataLoader workers for streamed batches, and why. auto: none when the data is preloaded, when the model trains
    on the CPU (workers would take the cores the training threads use) or when the whole dataset is under
    SMALL_DATA_BYTES (reading it in this process costs less than handing batches over from other processes: a pass
    over the demo's data took 2.4 ms without workers and 18 ms with 4 kept running, on 2 CPU cores); otherwise, on a
    GPU, up to 4 per loader from the cores this machine's processes share, so reading the next batch overlaps the
    current step."""
    if setting != "auto":
        return int(setting), "num_workers set"
    if load_all:
        return 0, "data preloaded"
    if device.type != "cuda":
        return 0, "training on the CPU"
    if data_bytes < SMALL_DATA_BYTES:
        return 0, f"auto: the data is small ({data_bytes / 2**20:.0f} MB), read in this process"
    return min(4, max(1, (os.cpu_count() or 2) // local_world_size - 1)), "auto"


def available_host_bytes() -> int:
    """Memory this process may still allocate: the smallest of MemAvailable, what its RLIMIT_DATA leaves and what its
    memory cgroup leaves (cgroup_memory_left: what SLURM's --mem and docker --memory set)."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        pass
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    if limit != resource.RLIM_INFINITY:
        available = min(available, max(0, limit - _data_segment_bytes()))
    left = cgroup_memory_left()
    return available if left is None else min(available, left)


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
NO_CGROUP_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_memory_left(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup, and each cgroup above it, still allows: the smallest limit - usage, the
    usage without the inactive file cache (reclaimed before the kernel kills anything); None where no cgroup sets a
    limit or none can be read. Both cgroup v2 (memory.max) and v1 (memory.limit_in_bytes)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        base = root if version == 2 else root / "memory"
        folder = base / path.strip("/")
        while True:
            left.append(_cgroup_left(folder, *CGROUP_FILES[version]))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    known = [value for value in left if value is not None]
    return min(known) if known else None


def _cgroup_left(folder: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= NO_CGROUP_LIMIT:
            return None
        usage = int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - usage + int(stat.get(cache_key, 0)))


def _data_segment_bytes() -> int:
    """VmData of this process: what RLIMIT_DATA counts (private writable memory; not memory-mapped input files)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData"))
    except (OSError, StopIteration):
        return 0


def use_deterministic_algorithms() -> None:
    """torch's deterministic kernels where they exist; an op without one warns instead of failing (on a GPU, e.g. the
    backward pass of adaptive pooling), so a run on request never dies for it. cuBLAS needs its workspace fixed
    before its first use for deterministic matmuls."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
