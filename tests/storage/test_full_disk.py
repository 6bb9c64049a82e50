"""A full file system is one line naming the file and the space, exit code 2; the earlier files stay intact and no
half-written file is left under a final name (nor a '.tmp' beside it)."""
import errno
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, write_case
from modules.storage import atomic
from modules.storage.atomic import DiskFull, array_written_in_place, save_bytes, write_atomically
from modules.storage.metrics_log import MetricsLog


def test_a_file_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.write_bytes(b"earlier")
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 1500)
    with pytest.raises(DiskFull) as full:
        save_bytes(target, b"x" * 300_000)
    assert full.value.message().startswith(f"{target}: no space left on the device to write it (needs 0.3 MB, 1.5 kB "
                                           f"free in {tmp_path}/)")
    assert target.read_bytes() == b"earlier" and sorted(tmp_path.iterdir()) == [target]


def test_a_write_that_runs_out_of_space_leaves_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"earlier")

    def write(handle):
        handle.write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull):
        write_atomically(target, write)
    assert target.read_bytes() == b"earlier" and sorted(tmp_path.iterdir()) == [target]


def test_a_memory_mapped_result_checks_its_room_first(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 10_000)
    with pytest.raises(DiskFull) as full:
        with array_written_in_place(tmp_path / "samples.npy", (10, 4, 100)):
            pytest.fail("a memory map was opened without room for it (SIGBUS when it fills the disk)")
    assert "needs 16.0 kB" in full.value.problem and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- a real full file system (tmpfs)
@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs mounted at tmp_path/disk (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def train(folder, *flags):
    return subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), *flags], cwd=folder, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)


def fill(disk, leave_kb):
    """Fill the file system but leave_kb kilobytes (a file 'filler' holds the rest)."""
    (disk / "filler").unlink(missing_ok=True)
    free = (atomic.shutil.disk_usage(disk).free // 1024 - leave_kb) * 1024
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free))


def digests(folder: Path) -> dict:
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# free space left: none (the run's record cannot be made), a few kB (TensorBoard's first events, the metrics CSV),
# tens of kB (the first checkpoint, 0.3 MB)
@pytest.mark.slow
@pytest.mark.parametrize("leave_kb", [0, 16, 40])
def test_training_on_a_full_disk_fails_cleanly_and_the_earlier_run_stays_intact(small_disk, leave_kb):
    write_case(small_disk, epochs=2)
    assert train(small_disk).returncode == 0
    earlier = {name: digests(small_disk / name) for name in ("model_save", "checkpoints", "output")}
    fill(small_disk, leave_kb)

    result = train(small_disk)

    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no space left on the device to write it" in result.stderr and "Fix: free some space" in result.stderr
    assert not list(small_disk.rglob("*.tmp"))
    archived = list((small_disk / "archive").iterdir())  # the new run moved the earlier one aside, then failed
    assert len(archived) == 1
    assert {name: digests(archived[0] / name) for name in earlier} == earlier
    torch.load(archived[0] / "model_save" / "SimulGen-VAE", weights_only=True)
    for path in small_disk.rglob("*.json"):
        json.loads(path.read_text())  # every JSON under its final name is whole
    for path in small_disk.rglob("*metrics.csv"):
        rows = path.read_text().splitlines()
        assert len({row.count(",") for row in rows}) == 1  # no half row
    for path in small_disk.rglob("*.npy"):
        np.load(path)

    (small_disk / "filler").unlink()
    again = train(small_disk)  # with room again, the same command works
    assert again.returncode == 0, again.stderr[-2000:]


class FillingFile:
    """An unbuffered file on a disk that fills up: the first write takes half the bytes, the next finds no room."""

    def __init__(self, real):
        self.real, self.writes = real, 0

    def write(self, data):
        self.writes += 1
        if self.writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(bytes(data[:len(data) // 2]))

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_the_metrics_csv_is_cut_back_to_its_last_whole_row_when_the_disk_fills_mid_row(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv", tmp_path / "events")
    log.log(1, {"train/loss": 1.0, "lr": 0.001})
    whole = (tmp_path / "metrics.csv").read_bytes()
    log._csv_file = FillingFile(log._csv_file)
    with pytest.raises(DiskFull) as full:
        log.log(2, {"train/loss": 0.5, "lr": 0.001})
    assert str(tmp_path / "metrics.csv") in full.value.message()
    assert (tmp_path / "metrics.csv").read_bytes() == whole == b"epoch,train/loss,lr\r\n1,1.0,0.001\r\n"
    log._csv_file = log._csv_file.real
    log.close()
