"""--predict: new designs (CSV rows or geometry images) -> their full transient fields, in physical units.

    python SimulGen-VAE.py --predict=new_designs.csv --out=fields.npy [--samples=K]

The conditioner maps each design to latents, the VAE decoder maps latents to the [T, M] field. With --samples=K it
also draws K fields per design from the prediction's uncertainty (an ensemble's disagreement, a GP's posterior, or
for a single network the decoder prior's spread: uncertainty.spread), calibrated on the validation designs when
the conditioner was trained; their mean and the calibrated standard deviation around the prediction are written
beside the samples. OUT_report.json says where each new design lies against the training designs (and, with
--samples, how uncertain its prediction is), and the designs outside what was learnt are named in a warning
(uncertainty.design_range).
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modules.config import Config
from modules.data.design_inputs import read_condition_images, read_parameters
from modules.data.scaling import ColumnScaler
from modules.errors import InputError
from modules.models.conditioners import CONDITIONERS
from modules.models.latents import decode_latents
from modules.storage.atomic import array_written_in_place, save_array, save_json
from modules.storage.model_files import checked_vae_file, load_conditioner, load_model
from modules.storage.paths import new_output_file
from modules.uncertainty.design_range import FAR, design_spaces, placement, placement_summary
from modules.uncertainty.spread import SPREAD_WORDS, calibration_scales, field_draws, relative_norm


def predict_file(source, out, samples: int, conditioner_file, device, say=print) -> np.ndarray:
    """Predict every design in `source`; writes `out` [n, T, M], OUT_report.json (how far each design lies from the
    training designs) and the sample files; returns the fields."""
    outputs = output_paths(out, samples)
    conditioner, facts = load_conditioner(conditioner_file, device)
    config = Config.from_dict(facts["config"])
    vae, _, field_scaler = load_model(checked_vae_file(facts, conditioner_file), device)
    inputs, raw, labels = read_inputs(source, config, facts)
    inputs = inputs.to(device)
    latent_scaler = ColumnScaler.from_dict(facts["latent_scaler"])
    scaled, seconds = predict_fields(conditioner, vae, latent_scaler, inputs, config.batch_size)
    fields = field_scaler.inverse(scaled)
    save_array(outputs["out"], fields)
    say(f"Predicted {len(fields)} designs -> {outputs['out']} {tuple(fields.shape)} in {seconds:.3f} s of model "
        f"time ({len(fields) / max(seconds, 1e-9):,.0f} designs/s on {device})")
    spread = None
    if samples:
        spread = draw_samples(conditioner, vae, latent_scaler, field_scaler, inputs, samples, config, facts, outputs,
                              say)
    report_design_range(conditioner, facts, config, inputs, raw, labels, outputs["report"], spread, say)
    return fields


def output_paths(out, samples: int) -> dict:
    """OUT.npy, OUT_report.json, and with samples OUT_samples.npy, OUT_mean.npy, OUT_std.npy; none may exist yet."""
    out = new_output_file(out, "--predict")
    paths = {"out": out, "report": new_output_file(out.with_name(f"{out.stem}_report.json"), "--predict",
                                                              ".json")}
    if samples:
        for kind in ("samples", "mean", "std"):
            paths[kind] = new_output_file(out.with_name(f"{out.stem}_{kind}.npy"), "--predict")
    return paths


def read_inputs(source, config, facts, flag="--predict"):
    """The new designs' conditions, prepared exactly as in training (standardised parameters or [0, 1] images), their
    raw parameters (None for images) and how the user names each design (its CSV row or image file). flag: the
    command-line flag that named source (--predict, or --suggest's --candidates)."""
    if CONDITIONERS[config.input_type].reads == "parameters":
        if not Path(source).is_file():  # read_parameters' own message points at param_dir, the training CSV
            raise InputError(source, "not found" if not Path(source).exists() else "is a folder, not a CSV file",
                             f"give {flag} the path of a CSV of new designs (one row of parameters per design)")
        scaler = ColumnScaler.from_dict(facts["input_scaler"])
        values, names = read_parameters(source)
        if values.shape[1] != len(scaler.mean):
            raise InputError(source, f"has {values.shape[1]} columns but the conditioner was trained on "
                             f"{len(scaler.mean)} parameters", "give one column per training parameter, in order")
        trained_names = facts["param_names"]
        if names and trained_names and [n.strip().lower() for n in names] != [n.strip().lower()
                                                                              for n in trained_names]:
            raise InputError(source, f"has columns {', '.join(names)} but the conditioner was trained on "
                             f"{', '.join(trained_names)}", "give the parameters in the training CSV's order")
        return torch.from_numpy(scaler.transform(values)), values, [f"row {row}" for row in range(1, len(values) + 1)]
    images, paths, _ = read_condition_images(source, config.condition_extension, config.image_size, facts["channels"])
    return torch.from_numpy(images), None, [Path(path).name for path in paths]


def report_design_range(conditioner, facts, config, inputs, raw, labels, path, spread, say) -> None:
    """OUT_report.json: where each new design lies against the training designs (uncertainty.design_range) and, with
    --samples (spread: each design's |OUT_std| / |OUT|), its predicted uncertainty; a warning names the designs
    outside what was learnt. A conditioner saved before the check existed gets a note."""
    reference = facts.get("design_range")
    if reference is None:
        say("note: no out-of-range check: the conditioner was saved before the check existed (retrain it with "
            "--lc_only=1 to get one)")
        if spread is not None:
            save_json(path, {"about": "predicted_relative_std: the norm of the design's calibrated standard deviation "
                                      "(OUT_std) over the norm of its predicted field (OUT)",
                             "designs": [{"design": label, "predicted_relative_std": relative}
                                         for label, relative in zip(labels, spread)]})
        return
    spaces = design_spaces(conditioner, CONDITIONERS[config.input_type].reads, inputs, config.batch_size)
    rows = placement(reference, spaces, labels, raw)
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
        print(f"warning: {summary}; see {path}", file=sys.stderr)
    else:
        say(f"Every design lies within what the conditioner was trained on (see {path})")


@torch.no_grad()
def predict_fields(conditioner, vae, latent_scaler, inputs, batch_size: int):
    """Conditions [n, ...] -> (scaled fields [n, T, M] float32 numpy, seconds of model time)."""
    pieces, seconds = [], 0.0
    for start in range(0, len(inputs), batch_size):
        began = time.perf_counter()
        field = decode_latents(vae, latent_scaler, conditioner(inputs[start:start + batch_size]))
        synchronise(field.device)
        seconds += time.perf_counter() - began
        pieces.append(field.float().cpu().numpy())
    return np.concatenate(pieces), seconds


def synchronise(device) -> None:
    """GPU work is asynchronous: wait for it so the timing covers the computation, not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def draw_samples(conditioner, vae, latent_scaler, field_scaler, inputs, samples: int, config, facts, outputs,
                 say) -> list:
    """K draws per design from the prediction's calibrated uncertainty (uncertainty.spread), written to
    OUT_samples.npy [n, K, T, M] a batch at a time (never all in memory), with their mean (OUT_mean) and the
    calibrated standard deviation around the prediction (OUT_std). Each draw's deviation from the prediction is
    multiplied by the time step's calibration scale, so the samples spread as OUT_std says. Repeatable: the draws come
    from a generator seeded by `seed`. Returns each design's |OUT_std| / |OUT|."""
    generator = torch.Generator().manual_seed(config.seed)
    n, (steps, nodes) = len(inputs), (config.n_steps_used, config.n_nodes_used)
    calibration, scales = facts.get("calibration"), calibration_scales(facts, steps, say)
    mean, std = np.empty((n, steps, nodes), np.float32), np.empty((n, steps, nodes), np.float32)
    relative = np.empty(n)
    with array_written_in_place(outputs["samples"], (n, samples, steps, nodes)) as written:  # renamed once whole
        for start in range(0, n, config.batch_size):
            prediction, draws = field_draws(conditioner, vae, latent_scaler, inputs[start:start + config.batch_size],
                                            samples, generator)
            predicted = field_scaler.inverse(prediction.cpu().numpy())
            stop = start + len(predicted)
            total, squares = np.zeros(predicted.shape), np.zeros(predicted.shape)
            for draw_index, draw in enumerate(draws):
                deviation = (field_scaler.inverse(draw.cpu().numpy()) - predicted) * scales[None, :, None]
                written[start:stop, draw_index] = predicted + deviation
                total += deviation
                squares += np.square(deviation, dtype=np.float64)
            mean[start:stop] = predicted + total / samples
            std[start:stop] = np.sqrt(squares / samples)
            relative[start:stop] = relative_norm(std[start:stop], predicted)
    save_array(outputs["mean"], mean)
    save_array(outputs["std"], std)
    source = SPREAD_WORDS[calibration["source"]] if calibration else "an uncalibrated spread"
    say(f"{samples} samples per design from {source} -> {outputs['samples']} {(n, samples, steps, nodes)}, their "
        f"mean -> {outputs['mean']}, the calibrated standard deviation around the prediction -> {outputs['std']} "
        f"(largest {float(std.max()):.4g})")
    return relative.tolist()
