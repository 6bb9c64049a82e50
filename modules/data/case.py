"""A case: the dataset, its train/validation split, the field scaler fitted on the training designs, and batch
sources for both sides."""
from dataclasses import dataclass

import numpy as np

from modules.data.batches import check_preload_fits, make_batches
from modules.data.dataset import SimulationArray, find_dataset, scan_and_fit_scaler, split_indices


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
