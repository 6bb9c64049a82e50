"""Where a run computes: the device (and, under torchrun, rank and world size), decided once and passed down."""
import random
from dataclasses import dataclass

import numpy as np
import torch

from modules.errors import InputError


@dataclass(frozen=True)
class Runtime:
    """Set once at start-up (modules/distributed.py) and passed down; nothing below re-detects it."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0


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


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
