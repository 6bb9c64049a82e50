"""Where and how a run computes: device, rank, precision and data-loading choices, decided once and passed down;
and its memory: what it may still allocate, what training will need (checked before it starts) and what each
phase used (said as it goes).

A cluster job (SLURM's --mem, docker --memory: a memory cgroup) or a ulimit gives a run a memory limit, and the kernel
kills a run that passes it. So a training run estimates what its largest phase will allocate and refuses to start,
with the numbers and a Batch_size that fits, when that is more than what the process may still allocate
(available_host_bytes: MemAvailable, the cgroup's limit, RLIMIT_DATA, RLIMIT_AS). And each phase says what
it took ("Memory: ..." lines), so that a user can size the next job from the last one.

What is counted is the process's private memory (RssAnon + RssShmem in /proc/self/status): tensors, the heap,
pinned buffers. The page cache of the memory-mapped data is not: the kernel reclaims it before it kills anything,
which is what lets --load_all=0 train on data larger than the limit.
"""
import ctypes
import os
import random
import resource
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.config import CONDITION_FILE
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
    """Memory this process may still allocate (host_memory_left's bytes)."""
    return host_memory_left()[0]


def host_memory_left() -> tuple[int, str]:
    """(bytes this process may still allocate, the limit that sets it, in words): the smallest of MemAvailable, what
    its memory cgroup leaves (cgroup_memory_left: what SLURM's --mem and docker --memory set), what RLIMIT_DATA
    leaves of the private memory and what RLIMIT_AS leaves of the address space (ulimit -d, ulimit -v)."""
    available, said = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the free memory"
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
            said = "the machine's available memory"
    except (OSError, StopIteration):
        pass
    candidates = [(available, said)]
    left = cgroup_memory_left()
    if left is not None:
        candidates.append((left, "what its memory cgroup's limit leaves"))
    for name, status_key, said in ((resource.RLIMIT_DATA, "VmData", "what RLIMIT_DATA (ulimit -d) leaves"),
                                   (resource.RLIMIT_AS, "VmSize", "what RLIMIT_AS (ulimit -v) leaves")):
        limit = resource.getrlimit(name)[0]
        if limit != resource.RLIM_INFINITY:
            candidates.append((max(0, limit - _status_bytes(status_key)), said))
    return min(candidates, key=lambda candidate: candidate[0])


CGROUP_ROOT = Path("/sys/fs/cgroup")
# (limit, usage, and memory.stat's keys of the clean file cache: on the file LRU lists, less what is dirty or under
# writeback) per cgroup version
CGROUP_FILES = {2: ("memory.max", "memory.current", ("active_file", "inactive_file"), ("file_dirty", "file_writeback")),
                1: ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_active_file", "total_inactive_file"),
                    ("total_dirty", "total_writeback"))}
NO_CGROUP_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_memory_left(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup, and each cgroup above it, still allows: the smallest limit - usage, the
    usage without the clean file cache (the page cache of files read or memory-mapped, active or not, which the
    kernel reclaims before it kills anything; a streamed run's data fills it); None where no cgroup sets a limit or
    none can be read. Both cgroup v2 (memory.max) and v1 (memory.limit_in_bytes)."""
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


def _cgroup_left(folder: Path, limit_file: str, usage_file: str, file_keys: tuple, unclean_keys: tuple) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= NO_CGROUP_LIMIT:
            return None
        usage = int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return None
    clean_cache = sum(int(stat.get(key, 0)) for key in file_keys) - sum(int(stat.get(key, 0)) for key in unclean_keys)
    return max(0, int(limit) - usage + max(0, clean_cache))


def _status_bytes(key: str) -> int:
    """A size in /proc/self/status (0 where it says nothing): VmData is what RLIMIT_DATA counts (private writable
    memory, not memory-mapped input files), VmSize what RLIMIT_AS counts (the whole address space, mapped files
    included)."""
    return (_status_sizes() or {}).get(key, 0)


def _status_sizes() -> dict | None:
    """{key: bytes} of /proc/self/status's sizes (the lines in kB), or None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            return {key: int(value.split()[0]) * 1024 for key, value in (line.split(":", 1) for line in status)
                    if value.strip().endswith(" kB")}
    except OSError:
        return None


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


# ------------------------------------------------------------------------------- memory: needed and used
SAMPLE_SECONDS = 0.05
# One design in a training batch costs about this many float32 copies of its field [T, M] per forward pass kept for
# the backward pass (the reconstruction, the loss's difference and their gradients), plus one for the batch itself;
# from the "Memory:" lines of real runs at 5 million values a design, filters 256 128 64 32: 3.8 copies in all at
# batch 8, 4.0 to 5.3 at batch 16 (README, "Memory in each phase"). Too low lets a run start that the kernel then
# kills, too high refuses a run that would have fitted: the refusal says "about".
FIELD_COPIES_PER_PASS = 4
# What the process may allocate beyond the estimate before the refusal: the allocator's slack, the interpreter's
# growth, small tensors. A run refused needs more than the limit by at least the estimate's own error.
ALLOCATOR_SLACK = 1.1


def private_bytes() -> int | None:
    """This process's private resident memory (RssAnon + RssShmem), or None where /proc says nothing (not Linux)."""
    sizes = _status_sizes()
    if not sizes or "RssAnon" not in sizes:
        return None
    return sizes["RssAnon"] + sizes.get("RssShmem", 0)


def release_freed_memory() -> None:
    """Hand the memory freed inside the C heap back to the kernel (glibc's malloc_trim): a phase's large temporaries
    (the POD basis's 256 MB of snapshots, a batch's fields) otherwise stay in the heap, counted against the limit,
    which the next phase and the page cache of streamed data then lack. Nothing where glibc is not the C library."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryWatch:
    """The peak private memory of this process (and, on a GPU, the device's allocated peak) per phase: a daemon
    thread samples /proc/self/status every SAMPLE_SECONDS (a peak shorter than that can be missed; a training
    step's activations live for its whole backward pass)."""

    def __init__(self, device: torch.device, say=print):
        """say None: a watch that measures and says nothing (a DDP run's other processes)."""
        self.device, self.say = device, say
        self.peak = private_bytes() if say is not None else None
        self._lock = threading.Lock()
        if self.peak is not None:
            threading.Thread(target=self._sample, daemon=True, name="memory-watch").start()

    def _sample(self) -> None:
        while True:
            now = private_bytes() or 0
            with self._lock:
                self.peak = max(self.peak, now)
            time.sleep(SAMPLE_SECONDS)

    @contextmanager
    def phase(self, name: str):
        """Measure the block; then say its peak: 'Memory: <name> peaked at X GB of private memory'."""
        if self.peak is None:
            yield
            return
        with self._lock:
            self.peak = private_bytes() or 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        release_freed_memory()
        held = private_bytes() or 0
        with self._lock:
            peak = max(self.peak, held)
        device = (f", {torch.cuda.max_memory_allocated(self.device) / 1e9:.2f} GB allocated on {self.device}"
                  if self.device.type == "cuda" else "")
        self.say(f"Memory: {name} peaked at {peak / 1e9:.2f} GB of private memory{device} ({held / 1e9:.2f} GB held "
                 "at its end)")


# float32 copies of its field one design takes in a pass without gradients after training (the choice between the
# conditioner network and the GP, at latent_conditioner_batch): the batch, the decoder's activations, the
# reconstruction scaled and in physical units, the simulated field and the error
EVALUATION_COPIES = 8


def batch_within_memory(batch: int, design_bytes: int) -> int:
    """The largest batch up to `batch` whose designs (design_bytes each, every copy a pass makes of one) take at most
    half of what this process may still allocate: the passes after training at the conditioner's batch (the choice
    of conditioner, the calibration) must fit where training did. With memory to spare, `batch` itself."""
    return int(max(1, min(batch, available_host_bytes() // (2 * design_bytes))))


@dataclass(frozen=True)
class PhaseNeeds:
    """Bytes one phase of training will still allocate in each process, beyond what the process holds when checked
    (the data, preloaded or memory-mapped, is already there)."""

    name: str
    fixed: int           # weights, and for what trains its gradients and AdamW's two moments (16 bytes a parameter)
    per_design: int      # one design of a batch: its field copies, and the batches DataLoader workers prefetch
    batch: int           # designs per (micro-)batch: gradient accumulation does not add to it
    batch_key: str       # the condition.txt key that sets it

    @property
    def total(self) -> int:
        return self.fixed + self.per_design * self.batch


def training_needs(config, vae_parameters: int, runtime) -> list[PhaseNeeds]:
    """What the phases of a training run that allocate with the batch will need in this process: the VAE's steps,
    and the conditioner's when it trains end to end through the decoder (its own weights are left out: a few
    million parameters, small next to a batch of fields). On its own, on CSV parameters or images, the conditioner is
    far smaller; the evaluation reads Batch_size designs without gradients, and the conditioner's passes after
    training size their batches from the memory left (batch_within_memory). On a GPU, what the host still needs is
    what the DataLoader workers prefetch."""
    field_bytes = 4 * config.n_steps_used * config.n_nodes_used
    on_host = runtime.device.type == "cpu"
    prefetch = 2 * runtime.num_workers * field_bytes  # DataLoader's prefetch_factor 2, per design of a batch

    def copies(passes: int) -> int:  # the batch itself, then FIELD_COPIES_PER_PASS per forward pass kept
        return (1 + FIELD_COPIES_PER_PASS * passes) * field_bytes if on_host else 0

    phases = [PhaseNeeds("the VAE", 16 * vae_parameters if on_host else 0,
                         copies(config.recon_samples) + prefetch, config.batch_size, "Batch_size")]
    if config.has_conditioner and config.use_e2e_training:
        phases.append(PhaseNeeds("the conditioner, end to end through the decoder",
                                 4 * vae_parameters if on_host else 0, copies(1), config.lc_batch_size,
                                 "latent_conditioner_batch"))
    return phases


def check_training_fits(phases: list, runtime, left: tuple | None = None) -> InputError | None:
    """The refusal of a run whose largest phase needs more than what each of its processes may still allocate
    (left: host_memory_left()'s (bytes, the limit in words)), with both numbers and the largest batch that fits;
    None when it fits."""
    available, limit_said = left or host_memory_left()
    available //= runtime.world_size
    largest = max(phases, key=lambda phase: phase.total)
    if ALLOCATOR_SLACK * largest.total <= available:
        return None
    fitting = int((available / ALLOCATOR_SLACK - largest.fixed) // largest.per_design) if largest.per_design else 0
    shared = f" among {runtime.world_size} processes" if runtime.world_size > 1 else ""
    fix = (f"set {largest.batch_key} {fitting} or less in input_data/condition.txt (grad_accum_steps keeps the "
           "effective batch), or give the job more memory" if fitting >= 1 else "give the job more memory")
    return InputError(CONDITION_FILE, f"training {largest.name} needs about {ALLOCATOR_SLACK * largest.total / 1e9:.2f}"
                      f" GB more per process ({largest.fixed / 1e9:.2f} GB for the model and its optimiser, "
                      f"{largest.per_design * largest.batch / 1e9:.2f} GB for a batch of {largest.batch} designs), "
                      f"but it may allocate only {available / 1e9:.2f} GB ({limit_said}{shared})", fix)
