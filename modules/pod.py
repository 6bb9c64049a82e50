"""Proper orthogonal decomposition: the basis that initialises the node projections, and the POD baseline.

Both stream the dataset in bounded chunks, so they work on designs far larger than RAM:
- pod_node_basis: snapshot POD over (design, time step) rows of the scaled training data -> M x R basis.
- design_gram + pod_errors: POD over whole designs (each [T, M] field one vector), computed from the Gram matrix of
  inner products, which gives the exact rank-r projection error of every validation design without ever forming
  the modes. This is the baseline a VAE with r latent numbers per design must beat.
"""
import numpy as np
import torch

CHUNK_BYTES = 256 * 2**20


def pod_node_basis(array, train_indices, scaler, rank: int, seed: int):
    """Snapshot POD of scaled training fields over nodes.

    Returns torch float32 (mean [M], modes [M, rank] orthonormal, scales [rank] = std of each coefficient).
    Rows are (design, time step) snapshots, subsampled to fit CHUNK_BYTES; missing modes (fewer snapshots than
    rank) are filled with random orthonormal directions at a small scale.
    """
    n_steps, n_nodes = array.sample_shape
    snapshots = _training_snapshots(array, train_indices, scaler, max(rank, CHUNK_BYTES // (4 * n_nodes)), seed)
    mean = snapshots.mean(axis=0)
    centred = torch.from_numpy(snapshots - mean).double()
    eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T)  # Gram of the rows: rows x rows, cheap
    keep = torch.flip(torch.argsort(eigenvalues), [0])[:rank]
    keep = keep[eigenvalues[keep] > eigenvalues.max() * 1e-12]
    singular = eigenvalues[keep].sqrt()
    modes = (centred.T @ vectors[:, keep]) / singular
    modes = _complete_basis(modes, rank, seed)
    scales = torch.cat([singular, torch.zeros(rank - len(singular), dtype=singular.dtype)]) / np.sqrt(len(centred))
    scales = scales.clamp_min(max(float(scales.max()) * 1e-3, 1e-6))
    return torch.from_numpy(mean).float(), modes.float(), scales.float()


def _training_snapshots(array, train_indices, scaler, max_rows: int, seed: int) -> np.ndarray:
    """Scaled snapshot rows [rows, M]: all time steps of all training designs, or a stratified random subsample
    (each design its own steps, spread over the whole time axis, so every phase of the transient is represented)."""
    n_steps, _ = array.sample_shape
    rng = np.random.default_rng(seed)
    designs = np.sort(rng.permutation(train_indices)[:max_rows]) if len(train_indices) > max_rows else train_indices
    steps_per_design = max(1, min(n_steps, max_rows // len(designs)))
    strata = np.linspace(0, n_steps, steps_per_design, endpoint=False)
    rows = []
    per_read = max(1, CHUNK_BYTES // (4 * int(np.prod(array.sample_shape))))
    for start in range(0, len(designs), per_read):
        block = scaler.transform(array.read(designs[start:start + per_read]))
        offsets = rng.uniform(0, n_steps / steps_per_design, size=(len(block), 1))
        picks = np.minimum((strata[None, :] + offsets).astype(int), n_steps - 1)
        rows.append(np.take_along_axis(block, picks[:, :, None], axis=1).reshape(-1, block.shape[-1]))
    return np.concatenate(rows)


def _complete_basis(modes, rank: int, seed: int):
    """Pad [M, k] orthonormal columns to [M, rank] with random directions orthogonal to them."""
    n_nodes, found = modes.shape
    if found >= rank:
        return modes
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(n_nodes, rank - found, generator=generator, dtype=modes.dtype)
    extra -= modes @ (modes.T @ extra)
    extra, _ = torch.linalg.qr(extra)
    return torch.cat([modes, extra], dim=1)


def design_gram(array, indices) -> np.ndarray:
    """Inner products <x_i, x_j> of whole designs [T, M] (physical units), float64 [n, n], streamed over time."""
    n_steps, n_nodes = array.sample_shape
    steps_per_read = max(1, CHUNK_BYTES // (4 * n_nodes * len(indices)))
    gram = np.zeros((len(indices), len(indices)))
    for first in range(0, n_steps, steps_per_read):
        block = array.read(indices, steps=slice(first, first + steps_per_read)).reshape(len(indices), -1)
        block = block.astype(np.float64)
        gram += block @ block.T
    return gram


def pod_errors(gram: np.ndarray, n_train: int, ranks) -> dict:
    """Relative L2 error of each validation design projected on the training designs' first r POD modes.

    gram: design_gram of [training designs..., validation designs...]. POD is centred on the training mean.
    Returns {r: float array [n_val]}; r = 0 is the training mean field itself.
    """
    _, coefficients, centred_norm2, norm2 = pod_coefficients(gram, n_train)
    errors = {}
    for rank in ranks:
        residual = centred_norm2 - (coefficients[:, :rank] ** 2).sum(axis=1)
        errors[rank] = np.sqrt(np.clip(residual, 0, None) / norm2)
    return errors


def pod_coefficients(gram: np.ndarray, n_train: int):
    """POD of the training designs computed from the Gram matrix alone (no mode is ever formed).

    gram: design_gram of [training designs..., other designs...], physical units. Returns
    (training coefficients [n_train, K], other designs' coefficients [n_other, K] on the same orthonormal modes,
    ||x - training mean||^2 of the other designs [n_other], ||x||^2 of the other designs [n_other]);
    K is the number of modes with non-negligible energy, strongest first.
    """
    train_gram, cross, other_norm2 = gram[:n_train, :n_train], gram[n_train:, :n_train], np.diag(gram)[n_train:]
    row_means, total_mean = train_gram.mean(axis=1), train_gram.mean()
    centring = np.eye(n_train) - 1.0 / n_train
    eigenvalues, vectors = np.linalg.eigh(centring @ train_gram @ centring)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    useful = eigenvalues > eigenvalues[0] * 1e-12
    eigenvalues, vectors = eigenvalues[useful], vectors[:, useful]
    cross_centred = cross - cross.mean(axis=1, keepdims=True) - row_means[None, :] + total_mean
    other_centred_norm2 = other_norm2 - 2 * cross.mean(axis=1) + total_mean
    train_coefficients = vectors * np.sqrt(eigenvalues)
    other_coefficients = (cross_centred @ vectors) / np.sqrt(eigenvalues)
    return train_coefficients, other_coefficients, other_centred_norm2, other_norm2
