"""Shared helpers: a tiny synthetic case written into a temporary folder that the test then works in."""
import logging
import os
import shutil
import sys
from contextlib import chdir, contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
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
    the VAE keeps its POD start in 5 epochs and the GP on the latents is kept as the conditioner. Shared by every
    test module that reads it (tests that write in it work on a copy)."""
    from modules.cli import main

    folder = tmp_path_factory.mktemp("demo")
    shutil.copy(REPO / "preset.txt", folder)
    shutil.copytree(REPO / "input_data", folder / "input_data", ignore=shutil.ignore_patterns("*.py"))
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("Training_epochs 300", "Training_epochs 5")
                         .replace("n_epoch         400", "n_epoch 5"))
    with chdir(folder):
        assert main(["--plot=1"]) == 0
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
    return {**payload, "format": payload["format"] + "-v1"}


def tensorboard_dir(folder, part="vae"):
    """The TensorBoard folder of `part` ('vae' or 'conditioner') of the one run recorded in folder/runs/."""
    runs = sorted(path for path in (Path(folder) / "runs").iterdir() if path.is_dir())
    assert len(runs) == 1, f"expected one run in {folder}/runs, found {[run.name for run in runs]}"
    return runs[0] / part
