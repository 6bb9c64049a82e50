"""The memory a process may still use, what it uses, and what each phase of a run took.

A cluster job (SLURM's --mem, docker --memory: a memory cgroup) or a ulimit gives a run a memory limit, and the kernel
kills a run that passes it. host_memory_left says what this process may still allocate under every limit that
applies; MemoryWatch says what each phase took ("Memory: ..." lines), so that a user can size the next job from the
last one.

What is counted is the process's private memory (RssAnon + RssShmem in /proc/self/status): tensors, the heap,
pinned buffers. The page cache of memory-mapped data is not: the kernel reclaims it before it kills anything, which
is what lets a streamed run train on data larger than its limit.
"""
import ctypes
import logging
import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 0.05  # how often MemoryWatch reads /proc/self/status: a shorter peak can be missed


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

    def __init__(self, device: torch.device, speaks: bool = True):
        """speaks False: a watch that measures and says nothing (a DDP run's other processes)."""
        self.device = device
        self.peak = private_bytes() if speaks else None
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
        log.info(f"Memory: {name} peaked at {peak / 1e9:.2f} GB of private memory{device} ({held / 1e9:.2f} GB held "
                 "at its end)")


def batch_within_memory(batch: int, design_bytes: int) -> int:
    """The largest batch up to `batch` whose designs (design_bytes each, every copy a pass makes of one) take at most
    half of what this process may still allocate: the passes after training at the conditioner's batch (the choice
    of conditioner, the calibration) must fit where training did. With memory to spare, `batch` itself."""
    return int(max(1, min(batch, available_host_bytes() // (2 * design_bytes))))
