"""The same numbers from the same seed: every random generator seeded at once, and torch's deterministic kernels on
request (deterministic 1)."""
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """torch's deterministic kernels where they exist; an op without one warns instead of failing (on a GPU, e.g. the
    backward pass of adaptive pooling), so a run on request never dies for it. cuBLAS needs its workspace fixed
    before its first use for deterministic matmuls."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
