"""--export: the whole prediction as one model file for deployment, checked against --predict before it is kept.

    python SimulGen-VAE.py --export=surrogate.onnx      (ONNX, for onnxruntime from Python, C++, C#, Java, ...)
    python SimulGen-VAE.py --export=surrogate.pt2       (torch.export, for torch.export.load in Python)

Input: raw design parameters [n, P] float32 in the training CSV's column order (named "parameters"), or images
[n, C, H, W] float32 in [0, 1] at the conditioner's image size ("images"); output: "fields" [n, T, M] float32 in
physical units. The input standardisation, the conditioner, the latent scaling, the VAE decoder and the field scaling
are all inside; the number of designs n is free. The export runs on the CPU (the file runs wherever its runtime does).

The check: CHECK_DESIGNS designs (drawn around the training designs, seeded) go through the exported file (onnxruntime
on the CPU, or the loaded ExportedProgram) and through --predict's own code; the largest difference, relative to the
largest value of the design's predicted field, must stay below TOLERANCE, or nothing is kept.
"""
import io
import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from modules.commands.predict import FieldPrediction
from modules.errors import InputError
from modules.storage.atomic import temporary_path
from modules.storage.model_files import load_surrogate
from modules.storage.paths import new_output_file

log = logging.getLogger(__name__)

SUFFIXES = (".onnx", ".pt2")
TOLERANCE = 1e-4
CHECK_DESIGNS = 64
EXPORT_DESIGNS = 2  # the example the graph is traced with; the check uses another count: the batch axis is free
ONNX_OPSET = 18


def export_surrogate(path, conditioner_file) -> Path:
    """Write the exported model to path (.onnx or .pt2, a new file in an existing folder) once it matches --predict
    on CHECK_DESIGNS designs; returns the path."""
    began = time.perf_counter()
    path = new_output_file(path, "--export", SUFFIXES, "--export")
    surrogate, facts, config = load_surrogate(conditioner_file, "cpu")
    reads = config.design_inputs
    raw, check_designs = check_inputs(facts, config)
    temporary = temporary_path(path)
    try:
        write_model(surrogate, raw[:EXPORT_DESIGNS], temporary, reads)
        exported = run_exported(temporary, raw, reads)
        predicted = FieldPrediction(surrogate, "cpu")(check_designs)["fields"]
        difference = largest_relative_difference(exported, predicted)
        if not difference < TOLERANCE:
            raise InputError(path, f"the exported model differs from --predict by {difference:.3g} of the field's "
                             f"largest value (at most {TOLERANCE:g} allowed); nothing was kept",
                             "use --predict, and report this with the case's model_save/ folder")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    name = "parameters" if reads == "parameters" else "images"
    log.info(f"Exported the surrogate -> {path} ({path.stat().st_size / 1e6:.1f} MB): input '{name}' "
             f"{['n', *raw.shape[1:]]} float32{' (raw, as in the CSV)' if reads == 'parameters' else ' in [0, 1]'}, "
             f"output 'fields' [n, {predicted.shape[1]}, {predicted.shape[2]}] float32 in physical units; it matches "
             f"--predict on {len(raw)} designs to {difference:.2g} of each field's largest value "
             f"({time.perf_counter() - began:.1f} s)")
    return path


def check_inputs(facts, config):
    """(raw inputs [CHECK_DESIGNS, ...] float32 numpy, the same as --predict reads them): parameters drawn uniformly
    within two standard deviations of the training designs' mean, or images of uniform noise in [0, 1]."""
    generator = np.random.default_rng(config.seed)
    if config.design_inputs == "parameters":
        mean, std = (np.asarray(facts["input_scaler"][key]) for key in ("mean", "std"))
        raw = (mean + std * generator.uniform(-2, 2, (CHECK_DESIGNS, len(mean)))).astype(np.float32)
        return raw, torch.from_numpy(raw.astype(np.float64))
    size = config.image_size or facts["spec"]["input_shape"][-1]
    raw = generator.uniform(0, 1, (CHECK_DESIGNS, facts["channels"], size, size)).astype(np.float32)
    return raw, torch.from_numpy(raw)


def write_model(surrogate, example: np.ndarray, path: Path, reads: str) -> None:
    name = "parameters" if reads == "parameters" else "images"
    designs = torch.export.Dim("designs", min=1)
    example = torch.from_numpy(example)
    with torch.no_grad():
        if path.name.endswith(".pt2.tmp"):
            program = torch.export.export(surrogate, (example,), dynamic_shapes=({0: designs},))
            buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2, or a buffer
            torch.export.save(program, buffer)
            path.write_bytes(buffer.getbuffer())
            return
        with quiet_exporter():
            torch.onnx.export(surrogate, (example,), path, input_names=[name], output_names=["fields"],
                              dynamic_shapes=({0: designs},), opset_version=ONNX_OPSET, dynamo=True,
                              external_data=False, verbose=False)


@contextmanager
def quiet_exporter():
    """torch.onnx's exporter logs notes that are not the user's concern (operators of torchvision, which is not
    used here; deprecations inside torch): kept off the terminal while it runs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def run_exported(path: Path, inputs: np.ndarray, reads: str) -> np.ndarray:
    """The exported file's fields for inputs, run as a user would run it."""
    if path.name.endswith(".pt2.tmp"):
        program = torch.export.load(io.BytesIO(path.read_bytes()))
        with torch.no_grad():
            return program.module()(torch.from_numpy(inputs)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["fields"], {"parameters" if reads == "parameters" else "images": inputs})[0]


def largest_relative_difference(exported: np.ndarray, predicted: np.ndarray) -> float:
    """Over designs: the largest |exported - predicted| over the largest |predicted| of the same design."""
    exported, predicted = exported.reshape(len(exported), -1), predicted.reshape(len(predicted), -1)
    scale = np.maximum(np.abs(predicted).max(axis=1), 1e-30)
    return float((np.abs(exported.astype(np.float64) - predicted).max(axis=1) / scale).max())
