"""A case: the dataset, its train/validation split, the field scaler fitted on the training designs, and batch
sources for both sides. The split is saved beside the VAE (model_save/split.json), so the conditioner and every
evaluation later use the designs the VAE never trained on as theirs."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modules.config.settings import data_changes
from modules.data.batches import check_preload_fits, make_batches
from modules.data.dataset import SimulationArray, find_dataset, scan_and_fit_scaler, split_indices
from modules.errors import InputError
from modules.storage.atomic import save_json


@dataclass
class Case:
    array: SimulationArray
    train_indices: np.ndarray   # dataset indices, sorted
    val_indices: np.ndarray
    scaler: object              # MinMaxScaler of the fields, fitted on the training designs
    train: object               # batch sources (data.batches) of the scaled training and validation designs
    val: object


def prepare_case(config, runtime) -> Case:
    """Open and check the dataset (one streamed pass: shape, NaN/Inf, scaler fit on training designs only)."""
    array = SimulationArray(find_dataset(config.data_no), config)
    train_indices, val_indices = split_indices(config.n_designs, config.val_fraction, config.seed)
    scaler = scan_and_fit_scaler(array, train_indices, config.n_vars)
    return case_of(array, (train_indices, val_indices), scaler, config, runtime)


def case_of(array, split, scaler, config, runtime) -> Case:
    """Batch sources for both sides of a (train indices, validation indices) split, scaled by `scaler`."""
    if config.load_all:
        check_preload_fits(array, sum(len(indices) for indices in split), runtime)
    batches = [make_batches(array, indices, scaler, runtime, bool(config.load_all)) for indices in split]
    return Case(array, *split, scaler, *batches)


def saved_case(config, runtime, scaler, vae_file) -> Case:
    """The case a saved VAE was trained on: the data condition.txt describes, with the VAE's scaler and the split
    saved beside it."""
    split = read_split(Path(vae_file).parent / "split.json", config)
    return case_of(SimulationArray(find_dataset(config.data_no), config), split, scaler, config, runtime)


def check_same_data(config, vae_config, vae_file) -> None:
    """The VAE must have been trained on the dataset condition.txt describes now (same file, shape and crop)."""
    changed = data_changes(vae_config, config)
    if changed:
        raise InputError(vae_file, f"was trained on other data than condition.txt/preset.txt now describe "
                         f"({', '.join(changed)})", "restore those settings, or retrain the VAE with --lc_only=0")


def save_split(path, train_indices, val_indices) -> None:
    save_json(path, {"train": [int(i) for i in train_indices], "val": [int(i) for i in val_indices]})


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
