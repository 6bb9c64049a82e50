"""A case: the dataset, its train/validation split, the field scaler fitted on the training designs, and batch
sources for both sides."""
import logging
from dataclasses import dataclass

import numpy as np

from modules.data.batches import check_preload_fits, make_batches
from modules.data.dataset import open_dataset, rounding_of_storage, scan_and_fit_scaler, split_indices
from modules.errors import InputError

log = logging.getLogger(__name__)
# A half-size dataset whose rounding reaches this share of a variable's range is refused: its variation is lost (a
# small change on a large offset), not merely blurred below what a surrogate can reach.
HALF_ROUNDING_LIMIT = 0.01


@dataclass
class Case:
    array: object               # data.dataset.SimulationArray
    train_indices: np.ndarray   # dataset indices, sorted
    val_indices: np.ndarray
    scaler: object              # MinMaxScaler of the fields, fitted on the training designs
    train: object               # batch sources (data.batches) of the scaled training and validation designs
    val: object


def prepare_case(config, runtime) -> Case:
    """Open and check the dataset (one streamed pass: shape, NaN/Inf, scaler fit on training designs only)."""
    array = open_dataset(config)
    train_indices, val_indices = split_indices(config.n_designs, config.val_fraction, config.seed)
    scaler = scan_and_fit_scaler(array, train_indices, config.n_vars)
    if config.data_storage != "float32":
        say_storage_rounding(array.path, config.data_storage, scaler)
    return case_of(array, (train_indices, val_indices), scaler, config, runtime)


def case_of(array, split, scaler, config, runtime) -> Case:
    """Batch sources for both sides of a (train indices, validation indices) split, scaled by `scaler`."""
    if config.load_all:
        check_preload_fits(array, sum(len(indices) for indices in split), runtime)
    batches = [make_batches(array, indices, scaler, runtime, bool(config.load_all)) for indices in split]
    return Case(array, *split, scaler, *batches)


def say_storage_rounding(path, storage: str, scaler) -> None:
    """The half-size dataset's rounding, at most, as a share of each variable's range on the training designs: said
    in one line, or refused from HALF_ROUNDING_LIMIT on."""
    share = rounding_of_storage(storage, scaler.data_min, scaler.data_max)
    said = ", ".join(f"{100 * value:.2g} %" for value in share)
    if share.max() >= HALF_ROUNDING_LIMIT:
        worst = int(share.argmax())
        raise InputError(path, f"stored in {storage}, variable {worst + 1} ({scaler.data_min[worst]:.6g} .. "
                         f"{scaler.data_max[worst]:.6g}) is rounded by up to {100 * share[worst]:.2g} % of its range: "
                         "the fields' variation is lost", "train on the float32 dataset (data_storage float32)")
    log.info("Data stored in %s (%s): rounded by at most %s of each variable's range; errors near that are the "
             "storage's, not the model's", storage, path, said)
