"""Data larger than the memory a process may use: streamed training works under a hard memory limit three times
smaller than the dataset, and load_all 1 is refused. (Under DDP each rank reads only its shard of every batch:
tests/machine/test_distributed.py.)

The limit is RLIMIT_DATA, which the kernel enforces on a process's private memory (heap, anonymous maps, tensors)
but not on the memory-mapped dataset file, whose pages the kernel can always drop and re-read: exactly the memory
that --load_all=0 relies on. Where the machine allows it (root, cgroup v1), the same run also goes under a real
memory cgroup, which counts the page cache too and kills rather than refuses: what SLURM's --mem does.
"""
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, said

LIMIT_BYTES = 10**9  # 1 GB
N, T, M = 150, 50, 100_000  # 3.0 GB of float32
CONDITION = f"""Dim1 {N}
Dim2 {T}
Dim3 {M}
Training_epochs 1
Batch_size 2
Latent_dim 4
Latent_dim_end 8
projection_rank 8
alpha 1e4
val_fraction 0.1
"""


def run_limited(command, folder, group=None, data_limit=True):
    """The command in folder under the memory limit (its children inherit it): RLIMIT_DATA (unless not
    data_limit), and the memory cgroup `group` when given."""
    def limit_memory():
        if data_limit:
            resource.setrlimit(resource.RLIMIT_DATA, (LIMIT_BYTES, LIMIT_BYTES))
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env=environment, timeout=600,
                          stdin=subprocess.DEVNULL, preexec_fn=limit_memory)


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory):
    """A smooth [150, 50, 100000] float32 dataset written design by design; removed after the module."""
    path = tmp_path_factory.mktemp("big") / "dataset1.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, T, M))
    space = np.linspace(0, 2 * np.pi, M, dtype=np.float32)
    time = np.linspace(0, 1, T, dtype=np.float32)[:, None]
    rng = np.random.default_rng(0)
    for design in range(N):
        amplitude, phase = rng.uniform(0.5, 1.5), rng.uniform(0, np.pi)
        array[design] = amplitude * np.sin(space + phase) * (0.5 + time) + 3.0
    array.flush()
    del array
    assert path.stat().st_size >= 3 * LIMIT_BYTES
    yield path
    path.unlink()


def case_folder(folder, dataset):
    """A case whose dataset is a link to the big file (no second copy on disk)."""
    (folder / "input_data").mkdir(parents=True)
    (folder / "preset.txt").write_text("data_No init_beta_divisor filters conditioner_filters\n1\n0\n16 8\n16 32\n")
    (folder / "input_data" / "condition.txt").write_text(CONDITION)
    (folder / "input_data" / "dataset1.npy").symlink_to(dataset)
    return folder


@pytest.mark.slow
def test_streamed_training_and_evaluation_fit_under_a_memory_limit_a_third_of_the_data(big_dataset, memory_group,
                                                                                       tmp_path):
    """The whole run, the end-of-run evaluation included, under RLIMIT_DATA and, where the machine allows it, in a
    real 1 GB memory cgroup too, which also counts the page cache of the memory-mapped data and kernel memory and
    kills the process when its usage cannot be brought under the limit (no OOM kill may happen). load_all 1 is then
    refused before anything moves."""
    folder = case_folder(tmp_path / "case", big_dataset)
    trained = run_limited([sys.executable, str(REPO / "SimulGen-VAE.py"), "--load_all=0"], folder, memory_group)
    assert trained.returncode == 0, trained.stderr[-3000:]
    if memory_group is not None:
        events = dict(line.split() for line in (memory_group / "memory.oom_control").read_text().splitlines())
        assert int(events.get("oom_kill", 0)) == 0
        assert int((memory_group / "memory.max_usage_in_bytes").read_text()) <= LIMIT_BYTES
    assert (folder / "model_save" / "SimulGen-VAE").exists() and (folder / "output" / "reconstruction_error.json").exists()
    assert (folder / "output" / "evaluation.json").exists() and (folder / "output" / "memorization.json").exists()
    assert np.load(folder / "model_save" / "latent_vectors.npy").shape == (N, 8)
    saved = {path: path.read_bytes() for path in (folder / "model_save").iterdir()}

    preloaded = run_limited([sys.executable, str(REPO / "SimulGen-VAE.py"), "--load_all=1"], folder)
    assert preloaded.returncode == 2
    assert "load_all 1 would keep 150 designs (3.00 GB)" in preloaded.stderr
    assert preloaded.stderr.count("\n") == 1 and "Traceback" not in preloaded.stderr
    assert {path: path.read_bytes() for path in (folder / "model_save").iterdir()} == saved
    assert not (folder / "archive").exists()


@pytest.mark.slow
def test_a_batch_that_cannot_fit_is_refused_after_the_data_checks_with_the_batch_that_fits(memory_group, tmp_path):
    """A batch of 16 designs of 5 million values (about 1.3 GB with their copies) cannot fit under the 1 GB limit:
    the run is refused after the data checks, before anything is trained or moved, with the Batch_size that fits and
    the limit that binds named: RLIMIT_DATA, then (where the machine allows it) the memory cgroup alone. The data
    need not be larger than the limit here, so the case has 20 designs (0.4 GB) and each refusal scans only those."""
    dataset = tmp_path / "dataset1.npy"
    array = np.lib.format.open_memmap(dataset, mode="w+", dtype=np.float32, shape=(20, T, M))
    array[:] = np.sin(np.linspace(0, 2 * np.pi, M, dtype=np.float32)) * np.linspace(1, 2, 20)[:, None, None]
    array.flush()
    del array
    folder = case_folder(tmp_path / "case", dataset)
    (folder / "input_data" / "condition.txt").write_text(
        CONDITION.replace(f"Dim1 {N}", "Dim1 20").replace("Batch_size 2", "Batch_size 16"))
    (folder / "model_save").mkdir()
    (folder / "model_save" / "SimulGen-VAE").write_bytes(b"an earlier run's model")
    limits = [("RLIMIT_DATA", None)] + ([("memory cgroup", memory_group)] if memory_group is not None else [])
    for limit, group in limits:
        refused = run_limited([sys.executable, str(REPO / "SimulGen-VAE.py"), "--load_all=0"], folder, group,
                              data_limit=group is None)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith("error: input_data/condition.txt: training the VAE needs about ")
        assert limit in refused.stderr
        fitting = int(re.search(r"set Batch_size (\d+) or less", refused.stderr)[1])
        assert 2 <= fitting < 16  # a batch of 2 trains under this limit (the test above)
        assert sorted(path.name for path in folder.iterdir()) == [".simulgen.lock", "input_data", "model_save",
                                                                  "preset.txt"]  # the lock is the run's own
        assert (folder / "model_save" / "SimulGen-VAE").read_bytes() == b"an earlier run's model"


def fake_cgroup(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_the_memory_left_counts_the_cgroup_limit_of_the_process_and_of_its_parents(tmp_path):
    """What SLURM's --mem and docker --memory set: v2 memory.max (here on the job, the parent of the step the process
    runs in), v1 memory.limit_in_bytes; the clean file cache, active or not, counts as free (the kernel reclaims it
    before it kills), dirty pages and pages under writeback do not."""
    from modules.machine.memory import cgroup_memory_left
    membership = tmp_path / "cgroup"
    membership.write_text("0::/job/step\n")
    fake_cgroup(tmp_path / "v2" / "job", {"memory.max": "3000000000\n", "memory.current": "1000000000\n",
                                          "memory.stat": "anon 600000000\nactive_file 70000000\n"
                                                         "inactive_file 250000000\nfile_dirty 20000000\n"})
    fake_cgroup(tmp_path / "v2" / "job" / "step", {"memory.max": "max\n", "memory.current": "900000000\n",
                                                   "memory.stat": "inactive_file 100\n"})
    assert cgroup_memory_left(tmp_path / "v2", membership) == 3_000_000_000 - 1_000_000_000 + 300_000_000
    membership.write_text("12:cpu,cpuacct:/other\n4:memory:/slurm/job\n")
    fake_cgroup(tmp_path / "v1" / "memory" / "slurm" / "job", {
        "memory.limit_in_bytes": "2000000000\n", "memory.usage_in_bytes": "1500000000\n",
        "memory.stat": "cache 900000000\ntotal_active_file 300000000\ntotal_inactive_file 400000000\n"
                       "total_writeback 100000000\n"})
    fake_cgroup(tmp_path / "v1" / "memory", {"memory.limit_in_bytes": "9223372036854771712\n",
                                             "memory.usage_in_bytes": "5\n", "memory.stat": ""})
    assert cgroup_memory_left(tmp_path / "v1", membership) == 2_000_000_000 - 1_500_000_000 + 600_000_000
    membership.write_text("0::/\n")
    assert cgroup_memory_left(tmp_path / "none", membership) is None  # no limit anywhere: MemAvailable decides


def test_the_memory_left_counts_an_address_space_limit():
    """ulimit -v (RLIMIT_AS) counts the whole address space, the memory-mapped data included: what is left of it
    binds when it is the smallest limit, and the refusal names it."""
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from modules.machine.memory import "
            "host_memory_left, _status_bytes; limit = _status_bytes('VmSize') + 300 * 2**20; "
            "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); left, said = host_memory_left(); "
            "print(round(left / 2**20), said)")
    said = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split(maxsplit=1)
    assert 250 <= int(said[0]) <= 300 and said[1].strip() == "what RLIMIT_AS (ulimit -v) leaves"


def test_the_largest_phase_that_cannot_fit_is_refused_with_both_numbers_and_the_batch_that_fits():
    from modules.machine.device import Runtime
    from modules.training.memory_needs import PhaseNeeds, check_training_fits

    runtime = Runtime(device=torch.device("cpu"))
    vae = PhaseNeeds("the VAE", fixed=200_000_000, per_design=100_000_000, batch=16, batch_key="Batch_size")
    conditioner = PhaseNeeds("the conditioner, end to end through the decoder", 50_000_000, 100_000_000, 32,
                             "latent_conditioner_batch")
    assert check_training_fits([vae, conditioner], runtime, (4_000_000_000, "what its memory cgroup's limit leaves"))\
        is None  # 1.1 x 3.25 GB fits in 4 GB
    refusal = check_training_fits([vae, conditioner], runtime, (2_000_000_000, "what its memory cgroup's limit "
                                                                               "leaves"))
    assert refusal.message() == (
        "input_data/condition.txt: training the conditioner, end to end through the decoder needs about 3.58 GB more "
        "per process (0.05 GB for the model and its optimiser, 3.20 GB for a batch of 32 designs), but it may "
        "allocate only 2.00 GB (what its memory cgroup's limit leaves). Fix: set latent_conditioner_batch 17 or less "
        "in input_data/condition.txt (grad_accum_steps keeps the effective batch), or give the job more memory")
    assert 1.1 * (50_000_000 + 17 * 100_000_000) <= 2_000_000_000 < 1.1 * (50_000_000 + 18 * 100_000_000)
    two = Runtime(device=torch.device("cpu"), world_size=2)
    assert "among 2 processes" in check_training_fits([vae], two, (3_000_000_000, "the machine's available "
                                                                                  "memory")).message()


def test_each_phase_says_its_peak_private_memory():
    """A watch sees what a phase allocates and frees again (a peak between two samples of the same size), and not
    what an earlier phase held."""
    from modules.machine.memory import MemoryWatch
    watch = MemoryWatch(torch.device("cpu"))
    with said() as lines:
        with watch.phase("a 400 MB array"):
            array = np.ones(100 * 2**20, dtype=np.float32)  # touched: resident
            time.sleep(0.3)
            del array
        with watch.phase("nothing"):
            time.sleep(0.3)
    first, second = (re.fullmatch(r"Memory: .+ peaked at (\S+) GB of private memory \((\S+) GB held at its end\)",
                                  line).groups() for line in lines)
    assert lines[0].startswith("Memory: a 400 MB array peaked at ")
    assert float(first[0]) - float(second[0]) >= 0.4  # GB (1e9 bytes): 0.42 of them were allocated
    assert float(first[0]) - float(first[1]) >= 0.4  # and freed before the phase's end


@pytest.fixture
def memory_group():
    """A new memory cgroup v1 below this process's own, limited to LIMIT_BYTES, as SLURM's --mem or docker --memory
    make one: its folder, or None where the machine does not let this process make one (not root, no cgroup v1
    memory controller, a read-only /sys/fs/cgroup). Removed after the test (the runs in it have ended)."""
    try:
        own = next(line.split(":", 2)[2] for line in open("/proc/self/cgroup") if ":memory:" in line)
        folder = Path("/sys/fs/cgroup/memory") / own.strip().strip("/") / f"simulgen-test-{os.getpid()}"
        folder.mkdir()
    except (OSError, StopIteration):
        yield None
        return
    try:
        (folder / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
    except OSError:
        folder.rmdir()
        yield None
        return
    yield folder
    folder.rmdir()
