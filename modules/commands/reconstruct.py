"""--reconstruct: encode and decode new simulations with the saved model, write them in physical units."""
from pathlib import Path

import numpy as np
import torch

from modules.storage.model_files import load_model
from modules.data.dataset import Crop, load_new_simulations
from modules.errors import InputError
from modules.evaluation.reconstruction_report import reconstruct, relative_l2


def check_new_output(out) -> Path:
    """The output path must be a new .npy file in an existing folder: never overwrite a user's file."""
    if out is None:
        raise InputError("command line", "--reconstruct needs --out", "add --out=OUT.npy")
    out = Path(out)
    if out.suffix != ".npy":
        raise InputError(out, "output must be an .npy file", "give --out a name ending in .npy")
    if out.exists():
        raise InputError(out, "already exists and would be overwritten", "choose another --out or move that file")
    if not out.parent.is_dir():
        raise InputError(out, f"folder {out.parent} does not exist", "create it or choose another --out")
    return out


def save_new(path: Path, values: np.ndarray) -> None:
    """Write through a temporary file, so an interrupted run never leaves a half-written output behind."""
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, values)
    temporary.replace(path)


def reconstruct_file(source, out, model_file, device, say=print) -> np.ndarray:
    """Reconstruct every design in `source` ([n, T, M] .npy); writes [n, T_used, M_used] to `out`; returns errors."""
    out = check_new_output(out)
    model, config, scaler = load_model(model_file, device)
    fields = load_new_simulations(source, Crop(config))
    if len(fields) == 0:
        raise InputError(source, f"holds no designs (shape {tuple(fields.shape)})",
                         "give at least one simulation, as an array of shape [n, T, M] with n >= 1")
    pieces = []
    with torch.no_grad():
        for start in range(0, len(fields), config.batch_size):
            batch = torch.from_numpy(scaler.transform(fields[start:start + config.batch_size])).to(device)
            pieces.append(scaler.inverse(reconstruct(model, batch).float().cpu().numpy()))
    reconstructions = np.concatenate(pieces)
    save_new(out, reconstructions)
    errors = relative_l2(reconstructions, fields)
    say(f"Reconstructed {len(fields)} designs -> {out} {tuple(reconstructions.shape)}; relative L2 error vs the "
        f"input: mean {errors.mean():.4%}, worst {errors.max():.4%}")
    return errors
