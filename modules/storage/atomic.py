"""Files written whole or not at all: into a temporary file beside the target, then renamed over it. A job killed
mid-write leaves the earlier file (or none), never half of a new one; the temporary file ends in '.tmp'."""
import json
import os
from pathlib import Path

import numpy as np
import torch


def temporary_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_atomically(path, write) -> None:
    """write(binary file handle) fills the temporary file; then it replaces path. The folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


def save_torch(path, payload: dict) -> None:
    write_atomically(path, lambda handle: torch.save(payload, handle))


def save_array(path, values: np.ndarray) -> None:
    write_atomically(path, lambda handle: np.save(handle, values))


def save_json(path, data) -> None:
    write_atomically(path, lambda handle: handle.write((json.dumps(data, indent=2) + "\n").encode()))
