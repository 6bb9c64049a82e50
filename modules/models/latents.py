"""The VAE's latents as one vector per design, which is what a conditioner predicts.

A design's latents are its main latent [D] followed by every hierarchical level's latent [L, d] (coarsest level
first), flattened to D + L*d numbers. The VAE run saves them as model_save/latent_vectors.npy and xs.npy.
"""
import numpy as np
import torch


def join_latents(main: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """[N, D] and [N, L, d] -> [N, D + L*d]."""
    return np.concatenate([main, levels.reshape(len(levels), -1)], axis=1)


def split_latents(latents: torch.Tensor, spec):
    """[B, D + L*d] -> (main [B, D], levels [B, L, d]) for a VAE of this ModelSpec."""
    main = latents[:, :spec.main_latent_dim]
    # unflatten, not reshape(len(latents), ...): an exported model (commands.export) keeps its batch axis free
    return main, latents[:, spec.main_latent_dim:].unflatten(1, (spec.n_levels, spec.level_latent_dim))
