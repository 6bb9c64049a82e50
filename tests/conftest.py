"""Shared helpers: a tiny synthetic case written into a temporary folder that the test then works in."""
import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import chdir, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs a worker per core: one thread each (and in the programs they start), or the workers' threads
    # spin waiting on each other's cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
sys.path.insert(0, str(REPO))
os.environ.setdefault("MPLBACKEND", "Agg")


class Lines(logging.Handler):
    def __init__(self, lines: list):
        super().__init__()
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextmanager
def said(level=logging.INFO):
    """What the program says (every logger under "modules", at level and above) while the block runs: a list of its
    lines, filled as they come."""
    lines, logger = [], logging.getLogger("modules")
    handler, previous = Lines(lines), logger.level
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(level, previous) if previous else level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def design_parameters(n_designs, seed=0):
    """[n, 2] (amplitude, phase): what defines each design of smooth_fields with the same seed."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0.5, 2.0, size=n_designs), rng.uniform(0, np.pi, size=n_designs)], axis=1)


def smooth_fields(n_designs, n_steps, n_nodes, seed=0, parameters=None):
    """[n, T, M] float32 fields that depend smoothly on two parameters per design (learnable, not noise)."""
    parameters = design_parameters(n_designs, seed) if parameters is None else parameters
    amplitude, phase = parameters[:, 0, None, None], parameters[:, 1, None, None]
    time = np.linspace(0, 1, n_steps)[None, :, None]
    space = np.linspace(0, 2 * np.pi, n_nodes)[None, None, :]
    return (amplitude * np.sin(space + phase) * (0.5 + time) + 3.0).astype(np.float32)


CONDITION = """\
Dim1 {n}
Dim2 {t}
Dim3 {m}
Training_epochs {epochs}
Batch_size 4
LearningR 0.003
Latent_dim 4
Latent_dim_end 8
alpha 1e4
projection_rank 8
val_fraction 0.25
start_patience 0
"""


def write_case(folder, n=12, t=6, m=20, epochs=2, fmt="npy", extra="", filters="16 8", data=None):
    """Write preset.txt, input_data/condition.txt and input_data/dataset1.<fmt> into folder; return the data."""
    folder = Path(folder)
    (folder / "input_data").mkdir(parents=True, exist_ok=True)
    (folder / "preset.txt").write_text(f"data_No init_beta_divisor filters conditioner_filters\n1\n0\n{filters}\n"
                                       "16 32\n")
    (folder / "input_data" / "condition.txt").write_text(CONDITION.format(n=n, t=t, m=m, epochs=epochs) + extra)
    data = smooth_fields(n, t, m) if data is None else data
    target = folder / "input_data" / f"dataset1.{fmt}"
    if fmt == "npy":
        np.save(target, data)
    elif fmt in ("h5", "hdf5"):
        import h5py
        with h5py.File(target, "w") as handle:
            handle.create_dataset("fields", data=data, chunks=(1,) + data.shape[1:])
    elif fmt == "pickle":
        import pickle
        with open(target, "wb") as handle:
            pickle.dump(data, handle)
    return data


@pytest.fixture
def case(tmp_path, monkeypatch):
    """A tiny .npy case in a temporary folder, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    write_case(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The shipped demo case (heat conduction, 96 designs, parameters in a CSV, the plate mesh), trained briefly:
    the VAE keeps its POD start in its one epoch and the GP on the latents is kept as the conditioner. Trained once
    per test session, by whichever worker asks first, and shared by every test module that reads it (tests that
    write in it work on a copy)."""
    from filelock import FileLock

    from modules.cli import main

    session = tmp_path_factory.getbasetemp()
    session = session.parent if os.environ.get("PYTEST_XDIST_WORKER") else session  # the workers' shared folder
    folder = session / "demo"
    with FileLock(str(session / "demo.lock")):
        if not (folder / "trained").exists():
            folder.mkdir(exist_ok=True)
            shutil.copy(REPO / "preset.txt", folder)
            shutil.copytree(REPO / "input_data", folder / "input_data", ignore=shutil.ignore_patterns("*.py"),
                            dirs_exist_ok=True)
            condition = folder / "input_data" / "condition.txt"
            condition.write_text(condition.read_text().replace("Training_epochs 300", "Training_epochs 1")
                                 .replace("n_epoch         400", "n_epoch 2"))
            with chdir(folder):
                assert main(["--plot=1"]) == 0
            (folder / "trained").touch()
    return folder


def design_image(amplitude, phase, size=16, rgb=False):
    """A geometry-like picture of one design: a soft vertical band whose position encodes the phase and whose
    brightness encodes the amplitude (continuous gray levels, as real geometry images have). uint8 [S, S(, 3)]."""
    x = np.arange(size)[None, :]
    band = np.exp(-((x - (2 + phase / np.pi * (size - 4))) ** 2) / 4.0) * np.ones((size, 1))
    gray = np.rint(255 * band * amplitude / 2.0).astype(np.uint8)
    if not rgb:
        return gray
    return np.stack([gray, np.rint(255 * band * 0.5).astype(np.uint8), np.full_like(gray, 30)], axis=-1)


def write_conditions(folder, parameters, header=True, images="images", rgb=False, csv="input_data/parameters.csv"):
    """The designs' parameters as a CSV and as one PNG per design (design_001.png, ...) under folder."""
    from PIL import Image
    folder = Path(folder)
    lines = (["amplitude,phase"] if header else []) + [f"{a:.17g},{p:.17g}" for a, p in parameters]
    (folder / csv).parent.mkdir(parents=True, exist_ok=True)
    (folder / csv).write_text("\n".join(lines) + "\n")
    (folder / images).mkdir(parents=True, exist_ok=True)
    for number, (amplitude, phase) in enumerate(parameters, start=1):
        Image.fromarray(design_image(amplitude, phase, rgb=rgb)).save(folder / images / f"design_{number:03d}.png")


def as_version_1(payload: dict) -> dict:
    """A model file's payload as format version 1 wrote it (storage.model_format): no format_version, its kind's
    name ending in -v1. Deleting an entry from it then gives a file of an older version 1 that lacked it."""
    payload = {key: value for key, value in payload.items() if key != "format_version"}
    if "spread_kind" in payload.get("spec", {}):  # a conditioner spec's entries that versions 2, 3, 5 and 6 added
        payload["spec"] = {key: value for key, value in payload["spec"].items()
                           if key not in ("spread_kind", "encoder", "field_modulation", "frame")}
    return {**payload, "format": payload["format"] + "-v1"}


class Died(Exception):
    """What a test raises inside a run to kill it where it stands (the files saved so far stay)."""


def die_on_call(monkeypatch, module, name: str, call: int):
    """Make module.name raise Died on its call-th call (the calls before it go through); returns the real one, to put
    back with monkeypatch.setattr before the run is resumed."""
    real, calls = getattr(module, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Died()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)
    return real


def tensorboard_dir(folder, part="vae"):
    """The TensorBoard folder of `part` ('vae' or 'conditioner') of the one run recorded in folder/runs/."""
    runs = sorted(path for path in (Path(folder) / "runs").iterdir() if path.is_dir())
    assert len(runs) == 1, f"expected one run in {folder}/runs, found {[run.name for run in runs]}"
    return runs[0] / part


# ---- running the program and reading what it wrote
def metrics(folder):
    """The rows of output/metrics.csv (one per epoch) as dicts of strings."""
    with open(Path(folder) / "output" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def column(csv_path, name) -> np.ndarray:
    """One column of a metrics CSV, as numbers."""
    with open(csv_path, newline="") as handle:
        return np.array([float(row[name]) for row in csv.DictReader(handle)])


def evaluation_report(folder) -> dict:
    """output/evaluation.json of the case in folder."""
    return json.loads((Path(folder) / "output" / "evaluation.json").read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_program(command, folder):
    """A command in its own process in folder, one thread each (two ranks share these 2 cores), no stdin."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env=environment, timeout=300,
                          stdin=subprocess.DEVNULL)


def one_and_two_processes(folder, *flags):
    """The program run in folder/one as one process and in folder/two through launch_ddp on 2 (gloo), both checked to
    succeed: (the one's, the two's completed processes)."""
    single = run_program([sys.executable, str(REPO / "SimulGen-VAE.py"), *flags], folder / "one")
    double = run_program([sys.executable, str(REPO / "launch_ddp.py"), "--gpus=2", *flags,
                          f"--master_port={free_port()}"], folder / "two")
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    return single, double


# The DDP equivalence tests train the network alone (pod_path 0). On the POD path a fresh model's residual target is
# the posterior-sampling noise, so the zero-started last layer's first gradient is a sum that nearly cancels: its
# float rounding depends on the summation order, and Adam turns it into full-size steps of either sign between 1 and
# 2 processes (1 process through torchrun matches 1 process exactly). The DDP arithmetic they check is the same on
# both paths.
NETWORK_ALONE = "pod_path 0\n"


def stop_at_step(monkeypatch, count: int):
    """Make the count-th optimiser step of this process ask to stop, as SIGTERM would; returns the real
    Guard.after_step, to set back before resuming."""
    import modules.training.guard as guard
    steps, real = [], guard.Guard.after_step

    def after_step(self, skipped):
        steps.append(1)
        if len(steps) == count:
            self.stop.signal_number = signal.SIGTERM
        return real(self, skipped)

    monkeypatch.setattr(guard.Guard, "after_step", after_step)
    return real


def sklearn_gpr(inputs, target, seed):
    """The scikit-learn fit that fit_gpr writes out: the same kernel, bounds, starts and optimiser."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.ones(inputs.shape[1]), (1e-2, 1e3))
              + WhiteKernel(1e-4, (1e-8, 1e-1)))
    return GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=1, random_state=seed).fit(
        inputs, target)
