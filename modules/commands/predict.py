"""--predict: new designs (CSV rows or geometry images) -> their full transient fields, in physical units.

    python SimulGen-VAE.py --predict=new_designs.csv --out=fields.npy [--samples=K]     (or --out=fields.h5, .xdmf)

The conditioner maps each design to latents, the VAE decoder maps latents to the [T, M] field. With --samples=K it
also draws K fields per design from the prediction's uncertainty (an ensemble's disagreement, a GP's posterior, or
for a single network the decoder prior's spread: uncertainty.spread), calibrated on the validation designs when
the conditioner was trained; their mean and the calibrated standard deviation around the prediction are written
beside the samples. OUT_report.json says where each new design lies against the training designs (and, with
--samples, how uncertain its prediction is), and the designs outside what was learnt are named in a warning
(uncertainty.design_range). The fields are written as they are predicted (storage.field_files), so a prediction of
many designs needs no more memory than one of a few.
"""
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from modules.data.dataset import Crop
from modules.data.design_inputs import read_condition_images, read_parameters
from modules.data.field_layout import read_saved_layout
from modules.data.time_values import case_time_values
from modules.errors import InputError
from modules.machine.device import full_float32
from modules.machine.logs import shows_progress
from modules.machine.memory import available_host_bytes
from modules.storage.atomic import save_json
from modules.storage.field_files import PENDING_WRITES, FieldFacts, open_field_file, output_files
from modules.storage.model_files import load_surrogate
from modules.uncertainty.design_range import FAR, design_spaces, placement, placement_summary
from modules.uncertainty.spread import SPREAD_WORDS, DesignNoise, calibration_scales, missing_uncertainty, relative_norm

log = logging.getLogger(__name__)

HOST_BATCH_BYTES = 32 * 2**20  # results per batch on the CPU: larger batches leave the caches and run slower
HOST_SHARE = 4                 # a batch's results take at most 1 / HOST_SHARE of the memory left, ...
PENDING_BATCHES = PENDING_WRITES + 2  # ... counting the batches waiting for the writer and the one being made
MAX_DEVICE_BATCH = 4096


def predict_file(source, out, samples: int, conditioner_file, device) -> Path:
    """Predict every design in `source` and write them to `out` as they come (storage.field_files: .npy, .h5 or
    .xdmf by its suffix), with OUT_report.json (how far each design lies from the training designs) and, with
    samples, the draws, their mean and the calibrated std; returns the path of the fields. Memory does not grow with
    the number of designs: a batch at a time, sized from the free memory."""
    began = time.perf_counter()
    paths = output_files(out, "--predict", samples)
    full_float32(device)
    surrogate, facts, config = load_surrogate(conditioner_file, device)
    missing = missing_uncertainty(surrogate, facts) if samples else None
    if missing:
        raise InputError(conditioner_file, f"{missing[0]} to draw --samples from",
                         f"predict without --samples, or {missing[1]}")
    inputs, raw, labels = read_inputs(source, config, facts)
    shape = (len(inputs), config.n_steps_used, config.n_nodes_used)
    described = FieldFacts(labels, Crop(config).time_index, config.n_vars, raw, facts["param_names"],
                           lambda: read_saved_layout(config), lambda: case_time_values(config))
    placed = design_placement(surrogate, facts, config, inputs, raw, labels)
    prediction = FieldPrediction(surrogate, device)
    batch = prediction_batch_size(prediction, inputs, shape, samples, device)
    spread = None
    if samples:
        spread = prediction.with_samples(samples, calibration_scales(facts, config.n_steps_used), config.seed)
    with open_field_file(paths, shape, samples, described) as written:
        with progress_bar(len(inputs), "--predict") as bar:
            for start in range(0, len(inputs), batch):
                written.write(start, **prediction(inputs[start:start + batch]))
                bar.update(min(batch, len(inputs) - start))
    seconds = time.perf_counter() - began
    log.info(f"Predicted {len(inputs)} designs -> {paths['out']} {shape} in {seconds:.2f} s "
             f"({len(inputs) / seconds:,.0f} designs/s from loading the model to the last field written; the model's "
             f"share {prediction.seconds:.2f} s, batches of {batch} on {device})")
    if samples:
        source_words = SPREAD_WORDS[facts["calibration"]["source"]] if facts["calibration"] else \
            "an uncalibrated spread"
        where = paths["out"] if paths["out"].suffix != ".npy" else \
            f"{paths['samples']}, their mean -> {paths['mean']}, the std -> {paths['std']}"
        log.info(f"{samples} samples per design from {source_words}, with their mean and the calibrated standard "
                 f"deviation around the prediction -> {where} (largest std {spread.largest:.4g})")
    report_design_range(placed, labels, paths["report"], spread.relative.tolist() if samples else None)
    return paths["out"]


def read_inputs(source, config, facts, flag="--predict"):
    """The new designs' inputs as the surrogate takes them (raw parameters float64 [n, P], or images float32 [n, C,
    S, S] in [0, 1] read as in training), their raw parameters as numpy (None for images) and how the user names
    each design (its CSV row or image file). flag: the command-line flag that named source (--predict, or
    --suggest's --candidates)."""
    if config.design_inputs == "parameters":
        if not Path(source).is_file():  # read_parameters' own message points at param_dir, the training CSV
            raise InputError(source, "not found" if not Path(source).exists() else "is a folder, not a CSV file",
                             f"give {flag} the path of a CSV of new designs (one row of parameters per design)")
        trained = len(facts["input_scaler"]["mean"])
        values, names = read_parameters(source)
        if values.shape[1] != trained:
            raise InputError(source, f"has {values.shape[1]} columns but the conditioner was trained on "
                             f"{trained} parameters", "give one column per training parameter, in order")
        trained_names = facts["param_names"]
        if names and trained_names and [n.strip().lower() for n in names] != [n.strip().lower()
                                                                              for n in trained_names]:
            raise InputError(source, f"has columns {', '.join(names)} but the conditioner was trained on "
                             f"{', '.join(trained_names)}", "give the parameters in the training CSV's order")
        return torch.from_numpy(values), values, [f"row {row}" for row in range(1, len(values) + 1)]
    images, paths, _ = read_condition_images(source, config.condition_extension, config.image_size, facts["channels"])
    return torch.from_numpy(images), None, [Path(path).name for path in paths]


def design_placement(surrogate, facts, config, inputs, raw, labels) -> list | None:
    """Per new design, where it lies against the training designs (uncertainty.design_range), computed before any
    field is written so that a failure here leaves no output; None for a conditioner file that holds no record of its
    training designs."""
    reference = facts["design_range"]
    if reference is None:
        return None
    if surrogate.reads_parameters:
        inputs = surrogate.standardised(inputs.to(surrogate.input_mean.device)).cpu()
    spaces = design_spaces(surrogate.conditioner, config.design_inputs, inputs, config.batch_size)
    return placement(reference, spaces, labels, raw)


def report_design_range(rows, labels, path, spread) -> None:
    """OUT_report.json: where each new design lies (rows: design_placement) and, with --samples (spread: each
    design's |OUT_std| / |OUT|), its predicted uncertainty; a warning names the designs outside what was learnt. A
    conditioner file that holds no record of its training designs gets a note."""
    if rows is None:
        log.info("note: no out-of-range check: the conditioner file holds no record of its training designs, as files "
                 "written before the check existed do (retrain it with --lc_only=1 to get one)")
        if spread is not None:
            save_json(path, {"about": "predicted_relative_std: the norm of the design's calibrated standard deviation "
                                      "(OUT_std) over the norm of its predicted field (OUT)",
                             "designs": [{"design": label, "predicted_relative_std": relative}
                                         for label, relative in zip(labels, spread)]})
        return
    if spread is not None:
        for row, relative in zip(rows, spread):
            row["predicted_relative_std"] = relative
    save_json(path, {"about": "per new design and space (standardised parameters; or an image's pooled pixels and "
                              "the conditioner's features): the nearest training design (dataset index), the distance "
                              "to it and the typical distance between neighbouring training designs; the parameters "
                              "outside the training range; whether it is outside what was learnt (a parameter "
                              f"outside, or a distance ratio above {FAR}); with --samples, predicted_relative_std: "
                              "the norm of the design's calibrated standard deviation (OUT_std) over the norm of its "
                              "predicted field (OUT)",
                     "designs": rows})
    summary = placement_summary(rows)
    if summary:
        log.warning(f"warning: {summary}; see {path}")
    else:
        log.info(f"Every design lies within what the conditioner was trained on (see {path})")


class FieldPrediction:
    """The surrogate on batches of new designs (raw inputs [b, ...]) -> {"fields": [b, T, M]} in physical units as
    float32 numpy arrays; with_samples adds "samples" [b, K, T, M] drawn from the prediction's calibrated
    uncertainty, their "mean" and the calibrated standard deviation around the prediction ("std"). Everything runs
    on the device; only the results come to the host. seconds: the time spent computing (the GPU waited for), not
    writing."""

    def __init__(self, surrogate, device):
        self.surrogate, self.device = surrogate, torch.device(device)
        self.seconds, self.samples = 0.0, 0

    def with_samples(self, samples: int, scales: np.ndarray, seed: int) -> "FieldPrediction":
        """K draws per design. Each draw's deviation from the prediction is multiplied by the time step's calibration
        scale (scales [T]), so the samples spread as OUT_std says. Repeatable: the draws come from generators seeded
        by seed, each design's the same whatever its batch (spread.DesignNoise). self.relative: each design's
        |OUT_std| / |OUT|, self.largest: the largest std, both filled as designs are predicted."""
        self.samples, self.seed, self.designs_drawn = samples, seed, 0
        self.scales = torch.as_tensor(scales, device=self.device)[None, :, None]
        self.relative, self.largest = np.zeros(0), 0.0
        return self

    @torch.no_grad()
    def __call__(self, raw) -> dict:
        began = time.perf_counter()
        raw = raw.to(self.device)
        result = {"fields": self.to_host(self.surrogate(raw))} if not self.samples else self._with_draws(raw)
        self.seconds += time.perf_counter() - began
        return result

    def _with_draws(self, raw) -> dict:
        noise = DesignNoise(self.seed, self.designs_drawn, len(raw))
        self.designs_drawn += len(raw)
        surrogate = self.surrogate
        prediction, draws = surrogate.draws(surrogate.standardised(raw), self.samples, noise.randn)
        predicted = surrogate.physical(prediction)
        total = torch.zeros(predicted.shape, dtype=torch.float64, device=self.device)
        squares = torch.zeros_like(total)
        drawn = np.empty((len(predicted), self.samples, *predicted.shape[1:]), np.float32)
        for index, draw in enumerate(draws):
            deviation = (surrogate.physical(draw) - predicted) * self.scales
            drawn[:, index] = self.to_host(predicted + deviation)
            total += deviation.double()
            squares += deviation.double().square()
        std = self.to_host((squares / self.samples).sqrt())
        fields = self.to_host(predicted)
        self.relative = np.concatenate([self.relative, relative_norm(std, fields)])
        self.largest = max(self.largest, float(std.max()))
        return {"fields": fields, "samples": drawn, "mean": self.to_host(predicted + (total / self.samples).float()),
                "std": std}

    @staticmethod
    def to_host(values) -> np.ndarray:
        return values.float().cpu().numpy()


def designs_the_host_holds(bytes_per_design: int) -> int:
    """The most designs a batch may have whose host arrays (bytes_per_design each) take at most 1 / HOST_SHARE of the
    memory this process may use, counting the batches waiting for the writer and the one being made; at least 1."""
    return max(1, available_host_bytes() // (HOST_SHARE * PENDING_BATCHES * bytes_per_design))


def prediction_batch_size(prediction, inputs, shape, samples: int, device) -> int:
    """Designs per batch, from the free memory rather than Batch_size. On the CPU, batches of about
    HOST_BATCH_BYTES of results (larger batches leave the caches and run slower), fewer when the memory this
    process may use (cgroup, rlimit) is short. On a GPU, what a quarter of the free device memory holds, from the
    memory one probe design takes, also bounded by the host memory its results need."""
    design_bytes = shape[1] * shape[2] * 4 * (1 + (samples + 3 if samples else 0))
    host = designs_the_host_holds(design_bytes)
    if torch.device(device).type != "cuda":
        return int(max(1, min(len(inputs), host, HOST_BATCH_BYTES // design_bytes)))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    prediction(inputs[:1])  # a probe design, before any sampling: what one costs on the device, activations included
    prediction.seconds = 0.0
    per_design = max(torch.cuda.max_memory_allocated(device) - before, design_bytes)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(len(inputs), host, free // (4 * per_design), MAX_DEVICE_BATCH)))


def progress_bar(total: int, command: str):
    """A progress bar on stderr for a long prediction at a terminal; silent in batch jobs, logs and under --quiet
    (machine.logs.shows_progress)."""
    return tqdm(total=total, desc=command, unit=" designs", file=sys.stderr, disable=shows_progress(), leave=False,
                mininterval=1.0)
