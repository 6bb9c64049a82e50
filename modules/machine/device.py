"""Where and how a process computes: its device, the precision of training's forward passes and how streamed batches
are loaded, decided once at start-up (Runtime) and passed down; nothing below detects them again."""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from modules.errors import InputError
from modules.machine.reproducibility import use_deterministic_algorithms

PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Below this, streamed batches are read in the training thread when asked for: such data sits in the page cache and a
# batch of it reads in well under a millisecond, less than handing it over from a reader thread.
SMALL_DATA_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run (machine.processes.start_runtime sets it once).

    amp_dtype: autocast dtype of training forward passes (None: float32). readers, pin_memory: how streamed batches
    are loaded (threads reading ahead, 0: none); pinned host memory is what makes the host-to-GPU copies
    non-blocking.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    readers: int = 0
    pin_memory: bool = False
    summary: str = ""  # what was chosen and why, said once at start-up
    control_group: object = None  # process group for host-side flags under DDP (None: the default group)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and speaks."""
        return self.rank == 0

    def autocast(self):
        """Context of a training forward pass: mixed precision when amp_dtype is set, plain float32 otherwise."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling (its range is too small for small gradients); bf16 and float32 do not."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def runtime_for(device: torch.device, config, rank=0, world_size=1, local_world_size=1) -> Runtime:
    """The runtime for this device and config: precision, reader threads and pinned memory from the hardware."""
    amp_dtype, amp_reason = pick_precision(config.amp, device)
    data_bytes = 4 * config.n_designs * config.n_steps_used * config.n_nodes_used
    readers, readers_reason = pick_readers(config.num_workers, bool(config.load_all), local_world_size, data_bytes)
    pin_memory = device.type == "cuda" and not config.load_all
    if config.deterministic:
        use_deterministic_algorithms()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls and convolutions in TF32 on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    where = str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    loading = ("data preloaded on the device" if config.load_all else
               f"streaming with {readers} reader thread(s) ({readers_reason})"
               + (", pinned memory, non-blocking copies" if pin_memory else ""))
    summary = (f"Device setup: {where}; precision {PRECISION_NAMES[amp_dtype]} ({amp_reason}); {loading}; "
               f"gradient checkpointing {'on' if config.grad_checkpointing else 'off'}; "
               f"torch.compile {'on' if config.compile else 'off'}; "
               f"gradient accumulation over {config.grad_accum_steps} batch(es)"
               + ("; deterministic algorithms" if config.deterministic else ""))
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype, readers=readers,
                   pin_memory=pin_memory, summary=summary)


def full_float32(device: torch.device) -> None:
    """Float32 matrix products and convolutions in full float32 on a GPU, not TF32 (which cuDNN uses for
    convolutions by default): TF32 moves predicted fields by more than the model's own error. For --predict,
    --reconstruct and --suggest, where the cost is small; training keeps TF32."""
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


def pick_readers(setting: str, load_all: bool, local_world_size: int, data_bytes: int):
    """Threads that read streamed batches ahead of the training step (the key num_workers), and why. auto: none when
    the data is preloaded or under SMALL_DATA_BYTES; otherwise 2 to 4 per process, from the cores this machine's
    processes share: a reader mostly waits for the disk or copies pages, so two keep even a 2-core machine's
    training fed, and more keep a fast disk's queue full."""
    if setting != "auto":
        return int(setting), "num_workers set"
    if load_all:
        return 0, "data preloaded"
    if data_bytes < SMALL_DATA_BYTES:
        return 0, f"auto: the data is small ({data_bytes / 2**20:.0f} MB), read when needed"
    return min(4, max(2, (os.cpu_count() or 2) // local_world_size)), "auto"
