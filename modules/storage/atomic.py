"""Files written whole or not at all: into a temporary file beside the target, then renamed over it. A job killed
mid-write leaves the earlier file (or none), never half of a new one; the temporary file ends in '.tmp'.

A full file system (or quota) is said before writing when the size is known and the free space is short, and when
a write fails for lack of space: DiskFull, one line naming the file, the space it needs and the space free; the
temporary file is removed and the earlier file stays as it was.
"""
import errno
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from modules.errors import InputError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(InputError):
    """The file system (or the user's quota) has no room for a file: the user must make room, then run again."""

    def __init__(self, path, needed_bytes: int | None = None):
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        needs = f"needs {_size(needed_bytes)}, " if needed_bytes is not None else ""
        free = _free_bytes(folder)
        room = f"{_size(free)} free" if free is not None else "free space unknown"
        super().__init__(path, f"no space left on the device to write it ({needs}{room} in {folder}/); the earlier "
                         "file, if any, is as it was",
                         "free some space there (or move the case folder), then run the same command again (a "
                         "training with --resume continues from checkpoints/last.pt when it has one)")


def is_out_of_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE


@contextmanager
def disk_full_as(path, needed_bytes: int | None = None):
    """Running out of space (or quota) in the block is DiskFull naming path; any other error passes unchanged."""
    try:
        yield
    except OSError as error:
        if is_out_of_space(error):
            raise DiskFull(path, needed_bytes) from None
        raise


def temporary_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_atomically(path, write, size: int | None = None) -> None:
    """write(binary file handle) fills the temporary file; then it replaces path. The folder is made if needed.
    size: the bytes it will write, when known, so that a file system without that much room is said before
    writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path, size) as temporary:
        if size is not None and not _has_room(path.parent, size):
            raise DiskFull(path, size)
        with open(temporary, "wb") as handle:
            write(handle)


@contextmanager
def _replacing(path: Path, size: int | None):
    """The temporary path to fill in the block, renamed over path when the block ends without error and removed
    otherwise; running out of space in the block is DiskFull."""
    temporary = temporary_path(path)
    with disk_full_as(path, size):
        try:
            yield temporary
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def save_bytes(path, data: bytes) -> None:
    write_atomically(path, lambda handle: handle.write(data), size=len(data))


def save_torch(path, payload: dict) -> None:
    """torch.save of plain tensors and types, serialised in memory first so that its size is known."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    save_bytes(path, buffer.getbuffer())


def save_array(path, values: np.ndarray) -> None:
    write_atomically(path, lambda handle: np.save(handle, values), size=values.nbytes + 4096)


@contextmanager
def array_written_in_place(path, shape, dtype=np.float32):
    """A .npy memory map to fill piece by piece (for results larger than memory), renamed to path once the block
    ends without error; removed otherwise. Its room is checked first (check_room)."""
    path = Path(path)
    size = check_room(path, shape, dtype)
    with _replacing(path, size) as temporary:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=tuple(shape))
        yield array
        array.flush()
        del array


def check_room(path, shape, dtype=np.float32) -> int:
    """The bytes of a .npy of that shape, after checking that path's file system has room for them (DiskFull if
    not): a memory map that meets a full file system kills the process (SIGBUS), with no error to catch."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not _has_room(Path(path).parent, size + 4096):
        raise DiskFull(path, size)
    return size


def save_json(path, data) -> None:
    save_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def save_text(path, text: str) -> None:
    save_bytes(path, text.encode())


def save_figure(path, figure, dpi) -> None:
    """A matplotlib figure as a PNG, whole or not at all."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png")
    save_bytes(path, buffer.getbuffer())


def _free_bytes(folder) -> int | None:
    """The bytes free in folder's file system; None when it cannot be asked."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _has_room(folder, size: int) -> bool:
    free = _free_bytes(folder)
    return free is None or free >= size  # unknown: write, and let the file system say


def _size(count) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"
