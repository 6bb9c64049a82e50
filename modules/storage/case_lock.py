"""One writer per case folder: a training, --evaluate or --checkpoints=clean holds an exclusive lock on
.simulgen.lock in the case folder while it runs, so a second one cannot archive or overwrite the first's files.

The lock is an advisory lock of the operating system on the open file (flock on POSIX, msvcrt on Windows): the
kernel releases it when the process ends, however it ends, so the lock of a crashed or killed run is never stale.
The file itself stays (removing it would let two processes lock two different files); it names the holder while
one holds it, and is emptied when it lets go.
"""
import errno
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from modules.errors import InputError

log = logging.getLogger(__name__)

LOCK_FILE = Path(".simulgen.lock")

# what a non-blocking lock held by another process fails with (flock: EAGAIN; msvcrt: EACCES or EDEADLOCK)
HELD_ELSEWHERE = (errno.EAGAIN, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EAGAIN))

if sys.platform == "win32":
    import msvcrt

    def _lock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
else:
    import fcntl

    def _lock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _try_lock(handle) -> bool:
    """True once locked; False when another process holds the lock. A file system without locks (Lustre mounted
    noflock, some NFS and FUSE mounts) is said once and counts as locked: the run goes on unprotected."""
    try:
        _lock(handle)
        return True
    except OSError as error:
        if error.errno in HELD_ELSEWHERE:
            return False
        log.warning(f"note: this file system cannot lock {LOCK_FILE} ({error.strerror}): nothing stops a second run "
                    "in this case folder meanwhile")
        return True


@contextmanager
def case_folder_lock(what: str):
    """Hold the case folder's lock for the duration of the block, recording what holds it; a folder another process
    holds raises InputError naming that process. The lock is released on leaving the block or when the process
    ends."""
    handle = _locked()
    record = f"pid {os.getpid()} on {socket.gethostname()}, {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(record.encode())
    except OSError:
        pass  # a full disk: the lock holds all the same, only the record of who holds it is missing
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()  # an empty record: nobody holds it (a killed process leaves its record, but not the lock)
        handle.close()  # closing the file releases the lock


def check_case_folder_free() -> None:
    """Raise the same InputError as case_folder_lock when another process holds the lock; keep nothing."""
    _locked().close()


def _locked():
    """The lock file, open and locked by this process; InputError naming the holder when another one holds it."""
    try:
        handle = open(LOCK_FILE, "a+b", buffering=0)  # unbuffered: a write fails at once or not at all
    except OSError as error:
        raise InputError(Path.cwd() / LOCK_FILE, f"cannot create the case folder's lock file ({error.strerror})",
                         "run from a case folder you can write to") from None
    if not _try_lock(handle):
        holder = _holder(handle)
        handle.close()
        raise InputError(Path.cwd(), f"another SimulGenVAE process is writing in this case folder ({holder})",
                         "wait until it finishes (or stop it), or run in a copy of the case folder")
    return handle


def _holder(handle) -> str:
    try:
        handle.seek(0)
        return handle.read().decode(errors="replace").strip() or "it has just started"
    except OSError:  # Windows locks the bytes themselves
        return "its record cannot be read while it runs"
