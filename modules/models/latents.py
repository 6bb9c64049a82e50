"""The VAE's latents as one vector per design, which is what a conditioner predicts.

A design's latents are its main latent [D] followed by every hierarchical level's latent [L, d] (coarsest level
first), flattened to D + L*d numbers. The VAE run saves them as model_save/latent_vectors.npy and xs.npy.
"""
from pathlib import Path

import numpy as np
import torch

from modules.errors import InputError
from modules.storage.atomic import save_array


def join_latents(main: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """[N, D] and [N, L, d] -> [N, D + L*d]."""
    return np.concatenate([main, levels.reshape(len(levels), -1)], axis=1)


def split_latents(latents: torch.Tensor, spec):
    """[B, D + L*d] -> (main [B, D], levels [B, L, d]) for a VAE of this ModelSpec."""
    main = latents[:, :spec.main_latent_dim]
    # unflatten, not reshape(len(latents), ...): an exported model (commands.export) keeps its batch axis free
    return main, latents[:, spec.main_latent_dim:].unflatten(1, (spec.n_levels, spec.level_latent_dim))


def decode_latents(vae, latent_scaler, standardised: torch.Tensor, decode=True) -> torch.Tensor:
    """Standardised latents [B, D + L*d] -> field [B, T, M] in the VAE's scaled units (decode False: what the VAE's
    decoder writes, the codes of a VAE on snapshot codes). Differentiable, so a loss on the field trains whatever
    produced the latents (end-to-end training)."""
    return vae.decode(*split_latents(latent_scaler.inverse(standardised), vae.spec), decode=decode)


def save_latents(folder, main: np.ndarray, levels: np.ndarray) -> None:
    """The latents of every design, [N, D] and [N, L, d], as latent_vectors.npy and xs.npy in folder."""
    save_array(Path(folder) / "latent_vectors.npy", main)
    save_array(Path(folder) / "xs.npy", levels)


def read_saved_latents(folder, spec, n_designs: int) -> np.ndarray:
    """latent_vectors.npy and xs.npy of a VAE run in `folder`, joined and checked against the VAE and the data."""
    paths = [Path(folder) / "latent_vectors.npy", Path(folder) / "xs.npy"]
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
