"""Gather what conditioner training needs: the designs' conditions, the trained VAE, its latents, split and data.

read_conditions() runs before anything on disk moves (it is part of the input checks); prepare_conditioner_case()
runs once the VAE exists: straight after VAE training (--lc_only=0) or from model_save/ (--lc_only=1).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.storage.model_files import load_model
from modules.data.dataset import SimulationArray, find_dataset
from modules.data.design_inputs import (check_image_count, image_channels, image_files, read_images,
                                   read_parameters)
from modules.errors import InputError
from modules.models.latents import read_saved_latents
from modules.data.scaling import ColumnScaler
from modules.training.conditioner_training import ConditionerCase
from modules.training.vae_training import Case, case_of

DATA_KEYS = ("data_no", "n_designs", "n_steps", "n_nodes", "n_steps_used", "node_start", "node_end", "n_vars")


@dataclass
class Conditions:
    """What defines each design, in dataset order."""

    values: np.ndarray          # [N, P] parameters or [N, C, S, S] images in [0, 1]
    param_names: list | None    # the CSV header, if any
    channels: int | None        # images only


def read_conditions(config) -> Conditions:
    """The CSV rows or images at param_dir, checked against Dim1 and num_param."""
    path = Path(config.param_dir)
    if config.input_type == "csv":
        csv_path = _single_csv(path) if path.is_dir() else path
        values, names = read_parameters(csv_path, config.num_param or None)
        if len(values) != config.n_designs:
            raise InputError(csv_path, f"has {len(values)} data rows but Dim1 is {config.n_designs}",
                             "give one row per design, in dataset order")
        return Conditions(values, names, None)
    files = image_files(path, config.condition_extension)
    check_image_count(files, config.n_designs, path, config.condition_extension)
    channels = image_channels(files)
    return Conditions(read_images(files, config.image_size, channels), None, channels)


def _single_csv(folder: Path) -> Path:
    files = sorted(folder.glob("*.csv"))
    if len(files) != 1:
        raise InputError(folder, f"param_dir is a folder holding {len(files)} .csv files",
                         "point param_dir at the parameter CSV itself")
    return files[0]


def prepare_conditioner_case(config, runtime, conditions: Conditions, vae_file, fields: Case | None = None):
    """The trained VAE (frozen), its standardised latents and the conditions on the device.

    fields: the VAE run's Case when it was just trained in this process; otherwise the data is opened with the
    saved VAE's scaler and split (model_save/scaler in the model file, split.json beside it).
    """
    vae_file = Path(vae_file)
    vae, vae_config, field_scaler = load_model(vae_file, runtime.device)
    check_same_data(config, vae_config, vae_file)
    vae.requires_grad_(False)  # frozen: end-to-end gradients pass through it to the conditioner, never into it
    latents = read_saved_latents(vae_file.parent, vae.spec, config.n_designs)
    if fields is None:
        fields = open_fields(config, runtime, field_scaler, read_split(vae_file.parent / "split.json", config))
    train = fields.train_indices
    latent_scaler = ColumnScaler.fit(latents[train])
    input_scaler = ColumnScaler.fit(conditions.values[train]) if conditions.channels is None else None
    inputs = conditions.values if input_scaler is None else input_scaler.transform(conditions.values)
    return ConditionerCase(
        fields=fields, conditions=torch.as_tensor(inputs, dtype=torch.float32, device=runtime.device),
        raw_conditions=conditions.values, input_scaler=input_scaler, channels=conditions.channels,
        param_names=conditions.param_names,
        targets=torch.as_tensor(latent_scaler.transform(latents), device=runtime.device),
        latent_scaler=latent_scaler, vae=vae, vae_file=vae_file)


def check_same_data(config, vae_config, vae_file) -> None:
    """The VAE must have been trained on the dataset condition.txt describes now (same file, shape and crop)."""
    changed = [f"{key} {getattr(vae_config, key)} -> {getattr(config, key)}" for key in DATA_KEYS
               if getattr(vae_config, key) != getattr(config, key)]
    if changed:
        raise InputError(vae_file, f"was trained on other data than condition.txt/preset.txt now describe "
                         f"({', '.join(changed)})", "restore those settings, or retrain the VAE with --lc_only=0")


def read_split(path: Path, config):
    """(train indices, validation indices) of the VAE run, checked against Dim1."""
    try:
        split = json.loads(path.read_text())
        train, val = np.asarray(split["train"], dtype=np.int64), np.asarray(split["val"], dtype=np.int64)
    except FileNotFoundError:
        raise InputError(path, "the VAE run's train/validation split is missing",
                         "train the VAE first (--lc_only=0)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"cannot be read ({type(error).__name__})", "re-run the VAE training") from None
    together = np.sort(np.concatenate([train, val]))
    if len(train) == 0 or len(val) == 0 or not np.array_equal(together, np.arange(config.n_designs)):
        raise InputError(path, f"is not a split of the {config.n_designs} designs", "re-run the VAE training")
    return train, val


def open_fields(config, runtime, scaler, split) -> Case:
    return case_of(SimulationArray(find_dataset(config.data_no), config), split, scaler, config, runtime)
