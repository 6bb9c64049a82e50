"""--reconstruct: encode and decode new simulations with the saved model, write them in physical units."""

import numpy as np
import torch

from modules.data.dataset import Crop, load_new_simulations
from modules.errors import InputError
from modules.evaluation.metrics import relative_l2
from modules.storage.atomic import save_array
from modules.storage.model_files import load_model
from modules.storage.paths import new_output_file


def reconstruct_file(source, out, model_file, device, say=print) -> np.ndarray:
    """Reconstruct every design in `source` ([n, T, M] .npy); writes [n, T_used, M_used] to `out`; returns errors."""
    out = new_output_file(out, "--reconstruct")
    model, config, scaler = load_model(model_file, device)
    fields = load_new_simulations(source, Crop(config))
    if len(fields) == 0:
        raise InputError(source, f"holds no designs (shape {tuple(fields.shape)})",
                         "give at least one simulation, as an array of shape [n, T, M] with n >= 1")
    pieces = []
    with torch.no_grad():
        for start in range(0, len(fields), config.batch_size):
            batch = torch.from_numpy(scaler.transform(fields[start:start + config.batch_size])).to(device)
            pieces.append(scaler.inverse(model(batch, sample=False)["recon"].float().cpu().numpy()))
    reconstructions = np.concatenate(pieces)
    save_array(out, reconstructions)
    errors = relative_l2(reconstructions, fields)
    say(f"Reconstructed {len(fields)} designs -> {out} {tuple(reconstructions.shape)}; relative L2 error vs the "
        f"input: mean {errors.mean():.4%}, worst {errors.max():.4%}")
    return errors
