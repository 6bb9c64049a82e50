"""What a VAE run leaves in model_save/ beside its model file, read by the conditioner and every later evaluation:
the train/validation split (split.json), so that they use the designs the VAE never trained on as theirs; every
design's latents (latent_vectors.npy [N, D] and xs.npy [N, L, d], as the original SimulGenVAE names them), which a
conditioner regresses; and the field scaler as JSON (scaler.json, for the user's own scripts: the model file holds
it too)."""
import json
from pathlib import Path

import numpy as np

from modules.data.case import Case, case_of
from modules.data.dataset import open_dataset
from modules.errors import InputError
from modules.models.latents import join_latents
from modules.storage.atomic import save_array, save_json

SPLIT_FILE, SCALER_FILE = "split.json", "scaler.json"
MAIN_LATENTS_FILE, LEVEL_LATENTS_FILE = "latent_vectors.npy", "xs.npy"


def save_vae_companions(folder, case: Case) -> None:
    """The split and the scaler of the case the VAE in folder was trained on."""
    save_json(Path(folder) / SCALER_FILE, case.scaler.to_dict())
    save_split(Path(folder) / SPLIT_FILE, case.train_indices, case.val_indices)


def saved_case(config, runtime, scaler, vae_file) -> Case:
    """The case a saved VAE was trained on: the data condition.txt describes, with the VAE's scaler and the split
    saved beside it."""
    split = read_split(Path(vae_file).parent / SPLIT_FILE, config)
    return case_of(open_dataset(config), split, scaler, config, runtime)


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


def save_latents(folder, main: np.ndarray, levels: np.ndarray) -> None:
    """The latents of every design, [N, D] and [N, L, d], as latent_vectors.npy and xs.npy in folder."""
    save_array(Path(folder) / MAIN_LATENTS_FILE, main)
    save_array(Path(folder) / LEVEL_LATENTS_FILE, levels)


def read_saved_latents(folder, spec, n_designs: int) -> np.ndarray:
    """latent_vectors.npy and xs.npy of a VAE run in `folder`, joined and checked against the VAE and the data."""
    paths = [Path(folder) / MAIN_LATENTS_FILE, Path(folder) / LEVEL_LATENTS_FILE]
    expected = [(n_designs, spec.main_latent_dim), (n_designs, spec.n_levels, spec.level_latent_dim)]
    arrays = []
    for path, shape in zip(paths, expected):
        if not path.exists():
            raise InputError(path, "the VAE's latents are missing", "train the VAE first (--lc_only=0)")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(path, f"cannot be read ({error})", "re-run the VAE training (--lc_only=0)") from None
        if array.shape != shape or not np.isfinite(array).all():
            raise InputError(path, f"has shape {array.shape} (or non-finite values), expected {shape} for this VAE "
                             "and Dim1", "re-run the VAE training (--lc_only=0)")
        arrays.append(array)
    return join_latents(*arrays)
