"""--predict: new designs (CSV rows or geometry images) -> their full transient fields, in physical units.

    python SimulGen-VAE.py --predict=new_designs.csv --out=fields.npy [--samples=K]

The conditioner maps each design to latents, the VAE decoder maps latents to the [T, M] field. With --samples=K the
decoder also draws K fields per design: the main latent stays the conditioner's prediction and every hierarchical
level's latent is the predicted one plus noise of the decoder prior's standard deviation at that level (the spread
the VAE allows in the finer detail, centred on the prediction); their mean and standard deviation are written
beside the samples.
"""
import time
from pathlib import Path

import numpy as np
import torch

from modules.config import Config
from modules.data.design_inputs import read_condition_images, read_parameters
from modules.data.scaling import ColumnScaler
from modules.errors import InputError
from modules.models.conditioners import CONDITIONERS
from modules.models.latents import decode_latents, split_latents
from modules.storage.atomic import array_written_in_place, save_array
from modules.storage.model_files import checked_vae_file, load_conditioner, load_model
from modules.storage.paths import new_output_file


def predict_file(source, out, samples: int, conditioner_file, device, say=print) -> np.ndarray:
    """Predict every design in `source`; writes `out` [n, T, M] (and the sample files); returns the fields."""
    outputs = output_paths(out, samples)
    conditioner, facts = load_conditioner(conditioner_file, device)
    config = Config.from_dict(facts["config"])
    vae, _, field_scaler = load_model(checked_vae_file(facts, conditioner_file), device)
    inputs = read_inputs(source, config, facts).to(device)
    latent_scaler = ColumnScaler.from_dict(facts["latent_scaler"])
    scaled, seconds = predict_fields(conditioner, vae, latent_scaler, inputs, config.batch_size)
    fields = field_scaler.inverse(scaled)
    save_array(outputs["out"], fields)
    say(f"Predicted {len(fields)} designs -> {outputs['out']} {tuple(fields.shape)} in {seconds:.3f} s of model "
        f"time ({len(fields) / max(seconds, 1e-9):,.0f} designs/s on {device})")
    if samples:
        draw_samples(conditioner, vae, latent_scaler, field_scaler, inputs, samples, config, outputs, say)
    return fields


def output_paths(out, samples: int) -> dict:
    """OUT.npy, and with samples OUT_samples.npy, OUT_mean.npy, OUT_std.npy; none may exist yet."""
    out = new_output_file(out, "--predict")
    paths = {"out": out}
    if samples:
        for kind in ("samples", "mean", "std"):
            paths[kind] = new_output_file(out.with_name(f"{out.stem}_{kind}.npy"), "--predict")
    return paths


def read_inputs(source, config, facts) -> torch.Tensor:
    """The new designs' conditions, prepared exactly as in training: standardised parameters or [0, 1] images."""
    if CONDITIONERS[config.input_type].reads == "parameters":
        if not Path(source).is_file():  # read_parameters' own message points at param_dir, the training CSV
            raise InputError(source, "not found" if not Path(source).exists() else "is a folder, not a CSV file",
                             "give --predict the path of a CSV of new designs (one row of parameters per design)")
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
        return torch.from_numpy(scaler.transform(values))
    images, _, _ = read_condition_images(source, config.condition_extension, config.image_size, facts["channels"])
    return torch.from_numpy(images)


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
def draw_samples(conditioner, vae, latent_scaler, field_scaler, inputs, samples: int, config, outputs, say) -> None:
    """K decoder draws per design, written to OUT_samples.npy [n, K, T, M] one draw at a time (never all in memory),
    with their mean and standard deviation. Repeatable: the draws come from a generator seeded by `seed`."""
    generator = torch.Generator().manual_seed(config.seed)
    spec = vae.spec
    n, (steps, nodes) = len(inputs), (config.n_steps_used, config.n_nodes_used)
    mean, std = np.empty((n, steps, nodes), np.float32), np.empty((n, steps, nodes), np.float32)
    with array_written_in_place(outputs["samples"], (n, samples, steps, nodes)) as written:  # renamed once whole
        for start in range(0, n, config.batch_size):
            main, levels = split_latents(latent_scaler.inverse(conditioner(inputs[start:start + config.batch_size])),
                                         spec)
            stop = start + len(main)
            total, total_squares = np.zeros((len(main), steps, nodes)), np.zeros((len(main), steps, nodes))
            for draw in range(samples):
                noise = torch.randn(len(main), spec.n_levels, spec.level_latent_dim, generator=generator)
                field = vae.decode_around(main, levels, noise.to(main.device))
                field = field_scaler.inverse(field.float().cpu().numpy())
                written[start:stop, draw] = field
                total += field
                total_squares += np.square(field, dtype=np.float64)
            mean[start:stop] = total / samples
            std[start:stop] = np.sqrt(np.clip(total_squares / samples - np.square(total / samples), 0, None))
    save_array(outputs["mean"], mean)
    save_array(outputs["std"], std)
    say(f"{samples} samples per design -> {outputs['samples']} {(n, samples, steps, nodes)}, their mean -> "
        f"{outputs['mean']}, standard deviation -> {outputs['std']} (largest std {float(std.max()):.4g})")
