"""Proper orthogonal decomposition: the basis that initialises the node projections, and the POD baseline.

Both stream the dataset in bounded chunks, so they work on designs far larger than RAM:
- pod_node_basis: snapshot POD over (design, time step) rows of the scaled training data -> M x R basis.
- design_pod_basis: POD over whole designs inside that node basis -> the VAE's frozen linear path (models.pod_path).
- design_gram + pod_coefficients: POD over whole designs (each [T, M] field one vector), computed from the Gram matrix
  of inner products without ever forming the modes; combination_weights writes a projection on r modes as a
  weighted sum of the training designs. This is the baseline a VAE with r latent numbers per design must beat.
"""
import numpy as np
import torch

from modules.data.dataset import READ_CHUNK_BYTES
from modules.machine.memory import available_host_bytes

SNAPSHOT_BYTES = 256 * 2**20  # snapshot rows kept for the node basis, at most (less when memory is short)


def pod_node_basis(array, train_indices, scaler, rank: int, seed: int):
    """Snapshot POD of scaled training fields over nodes.

    Returns torch float32 (mean [M], modes [M, rank] orthonormal, scales [rank] = std of each coefficient).
    Rows are (design, time step) snapshots, subsampled to fit snapshot_budget(); missing modes (fewer snapshots than
    rank) are filled with random orthonormal directions at a small scale. The snapshots are the only large array
    (float32); the modes are summed in float64 (snapshot_modes): modes summed in float32 project a field with an error
    of a few 1e-6 of its norm, above what POD reaches on smooth families."""
    n_steps, n_nodes = array.sample_shape
    snapshots = _training_snapshots(array, train_indices, scaler, max(rank, snapshot_budget() // (4 * n_nodes)), seed)
    mean = snapshots.mean(axis=0, dtype=np.float64).astype(np.float32)
    snapshots -= mean
    centred = torch.from_numpy(snapshots)
    eigenvalues, modes = snapshot_modes(centred, rank)
    singular = eigenvalues.sqrt()
    modes = _complete_basis(modes, rank, seed)
    scales = torch.cat([singular, torch.zeros(rank - len(singular), dtype=singular.dtype)]) / np.sqrt(len(centred))
    scales = scales.clamp_min(max(float(scales.max()) * 1e-3, 1e-6))
    return torch.from_numpy(mean).float(), modes.float(), scales.float()


def snapshot_modes(centred, rank: int):
    """(eigenvalues [k], orthonormal modes [M, k]) of the centred snapshot rows [rows, M] (float32), the strongest
    k <= rank, summed in float64 a slice at a time: from the rows' Gram matrix (rows x rows) when there are fewer
    rows than nodes, else from the nodes' covariance (M x M), never a matrix larger than the smaller side squared."""
    rows, n_nodes = centred.shape
    if rows > n_nodes:
        covariance = torch.zeros(n_nodes, n_nodes, dtype=torch.float64)
        per_slice = max(1, READ_CHUNK_BYTES // (8 * n_nodes))  # float64 slices of the rows, one at a time
        for start in range(0, rows, per_slice):
            piece = centred[start:start + per_slice].double()
            covariance += piece.T @ piece
        eigenvalues, vectors = torch.linalg.eigh(covariance)
    else:
        gram = torch.zeros(rows, rows, dtype=torch.float64)
        columns = max(1, READ_CHUNK_BYTES // (8 * rows))  # float64 slices of the nodes, one at a time
        for start in range(0, n_nodes, columns):
            piece = centred[:, start:start + columns].double()
            gram += piece @ piece.T
        eigenvalues, vectors = torch.linalg.eigh(gram)
    keep = torch.flip(torch.argsort(eigenvalues), [0])[:rank]
    # below this share of the strongest, a mode is the float32 snapshots' rounding, not the field's
    keep = keep[eigenvalues[keep] > eigenvalues.max() * 1e-10]
    if rows > n_nodes:
        return eigenvalues[keep], vectors[:, keep]
    modes = torch.empty(n_nodes, len(keep), dtype=torch.float64)
    columns = max(1, READ_CHUNK_BYTES // (8 * rows))
    for start in range(0, n_nodes, columns):
        modes[start:start + columns] = (centred[:, start:start + columns].double().T @ vectors[:, keep]
                                        / eigenvalues[keep].sqrt())
    return eigenvalues[keep], modes


def snapshot_budget() -> int:
    """Bytes of snapshot rows for the node basis: SNAPSHOT_BYTES, or a quarter of the memory this process may still
    use when that is less (a job under a tight memory limit gets a basis from fewer snapshots rather than dying)."""
    return min(SNAPSHOT_BYTES, available_host_bytes() // 4)


def _training_snapshots(array, train_indices, scaler, max_rows: int, seed: int) -> np.ndarray:
    """Scaled snapshot rows [rows, M]: all time steps of all training designs, or a stratified random subsample
    (each design its own steps, spread over the whole time axis, so every phase of the transient is represented)."""
    n_steps, _ = array.sample_shape
    rng = np.random.default_rng(seed)
    designs = np.sort(rng.permutation(train_indices)[:max_rows]) if len(train_indices) > max_rows else train_indices
    steps_per_design = max(1, min(n_steps, max_rows // len(designs)))
    strata = np.linspace(0, n_steps, steps_per_design, endpoint=False)
    rows = np.empty((len(designs) * steps_per_design, array.sample_shape[1]), dtype=np.float32)
    per_read = max(1, READ_CHUNK_BYTES // (4 * int(np.prod(array.sample_shape))))
    for start in range(0, len(designs), per_read):
        block = scaler.transform(array.read(designs[start:start + per_read]))
        offsets = rng.uniform(0, n_steps / steps_per_design, size=(len(block), 1))
        picks = np.minimum((strata[None, :] + offsets).astype(int), n_steps - 1)
        rows[start * steps_per_design:(start + len(block)) * steps_per_design] = \
            np.take_along_axis(block, picks[:, :, None], axis=1).reshape(-1, block.shape[-1])
    return rows


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


def design_pod_basis(array, train_indices, scaler, node_mean, node_modes, rank: int):
    """POD over whole training designs, computed inside the node basis so that it stays small at any mesh size.

    node_mean [M], node_modes [M, R] (orthonormal, pod_node_basis): each scaled design x [T, M] becomes its node
    coefficients a = (x - node_mean) node_modes [T, R]; POD over those vectors of T * R numbers gives the design modes.
    Returns torch float32 (coefficient_mean [T, R], modes [rank, T, R] (orthonormal, strongest first), scales
    [rank] = std of the training designs' coefficient on each mode, residual_mse = the mean squared error per
    value of the rank-mode reconstruction of the training designs, node truncation included). The whole design
    POD costs one streamed pass over the training designs and N * T * R floats in memory.
    Modes the training designs do not have (rank above their number less one) are zero with a scale of 1: those
    latent numbers carry nothing on the linear path and are left to the network (a random direction instead would
    make them noise that a conditioner, after standardising each latent number, regresses at full weight).
    """
    n_steps, n_nodes = array.sample_shape
    node_mean64, node_modes64 = node_mean.double().numpy(), node_modes.double().numpy()
    coefficients = np.empty((len(train_indices), n_steps * node_modes.shape[1]))
    centred_energy = 0.0  # sum of ||x - node_mean||^2 over the training designs
    per_read = max(1, READ_CHUNK_BYTES // (8 * n_steps * n_nodes))  # the float64 block; the float32 read is half
    for start in range(0, len(train_indices), per_read):
        block = scaler.transform(array.read(train_indices[start:start + per_read])).astype(np.float64)
        block -= node_mean64
        centred_energy += float(np.vdot(block, block))
        coefficients[start:start + len(block)] = (block @ node_modes64).reshape(len(block), -1)
    coefficient_mean = coefficients.mean(axis=0)
    coefficients -= coefficient_mean
    eigenvalues, vectors = np.linalg.eigh(coefficients @ coefficients.T)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    kept = int(min(rank, np.sum(eigenvalues > max(eigenvalues[0], 0.0) * 1e-12)))
    singular = np.sqrt(eigenvalues[:kept])
    modes = np.zeros((coefficients.shape[1], rank))
    modes[:, :kept] = (coefficients.T @ vectors[:, :kept]) / singular
    scales = np.ones(rank)
    scales[:kept] = singular / np.sqrt(len(train_indices))
    node_energy = float(np.sum(coefficients ** 2)) + len(train_indices) * float(coefficient_mean @ coefficient_mean)
    residual = centred_energy - node_energy + float(np.sum(eigenvalues[kept:].clip(min=0)))
    residual_mse = max(residual, 0.0) / (len(train_indices) * n_steps * n_nodes)
    return (torch.from_numpy(coefficient_mean).float().view(n_steps, -1),
            torch.from_numpy(modes.T).float().reshape(rank, n_steps, -1), torch.from_numpy(scales).float(),
            residual_mse)


def design_gram(array, indices) -> np.ndarray:
    """Inner products <x_i, x_j> of whole designs [T, M] (physical units), float64 [n, n], streamed over time."""
    n_steps, n_nodes = array.sample_shape
    steps_per_read = max(1, READ_CHUNK_BYTES // (4 * n_nodes * len(indices)))
    gram = np.zeros((len(indices), len(indices)))
    columns = max(1, READ_CHUNK_BYTES // (16 * len(indices)))  # float64 slices of a quarter of a read
    for first in range(0, n_steps, steps_per_read):
        block = array.read(indices, steps=slice(first, first + steps_per_read)).reshape(len(indices), -1)
        for start in range(0, block.shape[1], columns):
            piece = block[:, start:start + columns].astype(np.float64)  # float64 sums: POD errors subtract them
            gram += piece @ piece.T
    return gram


def pod_coefficients(gram: np.ndarray, n_train: int):
    """POD of the training designs computed from the Gram matrix alone (no mode is ever formed).

    gram: design_gram of [training designs..., other designs...], physical units. Returns
    (training coefficients [n_train, K], other designs' coefficients [n_other, K] on the same orthonormal modes,
    ||x - training mean||^2 of the other designs [n_other], ||x||^2 of the other designs [n_other]);
    K is the number of modes with non-negligible energy, strongest first.
    """
    train_gram, cross, other_norm2 = gram[:n_train, :n_train], gram[n_train:, :n_train], np.diag(gram)[n_train:]
    row_means, total_mean = train_gram.mean(axis=1), train_gram.mean()
    eigenvalues, vectors = _centred_eigen(train_gram)
    cross_centred = cross - cross.mean(axis=1, keepdims=True) - row_means[None, :] + total_mean
    other_centred_norm2 = other_norm2 - 2 * cross.mean(axis=1) + total_mean
    train_coefficients = vectors * np.sqrt(eigenvalues)
    other_coefficients = (cross_centred @ vectors) / np.sqrt(eigenvalues)
    return train_coefficients, other_coefficients, other_centred_norm2, other_norm2


def _centred_eigen(train_gram: np.ndarray):
    """Eigenvalues (strongest first, negligible ones dropped) and eigenvectors [n_train, K] of the centred Gram
    matrix of the training designs: mode k is u_k = sum_j vectors[j, k] (x_j - mean) / sqrt(eigenvalues[k])."""
    n_train = len(train_gram)
    centring = np.eye(n_train) - 1.0 / n_train
    eigenvalues, vectors = np.linalg.eigh(centring @ train_gram @ centring)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    useful = eigenvalues > eigenvalues[0] * 1e-12
    return eigenvalues[useful], vectors[:, useful]


def combination_weights(gram: np.ndarray, n_train: int, coefficients: np.ndarray) -> np.ndarray:
    """The field mean + sum_k coefficients[:, k] u_k (POD modes of pod_coefficients, strongest first) written as a
    weighted sum of the training designs: weights [n, n_train] with field = weights @ training fields. This is how
    the baselines' fields are formed without ever forming a mode (see baselines.score_combinations)."""
    eigenvalues, vectors = _centred_eigen(gram[:n_train, :n_train])
    rank = coefficients.shape[1]
    weights = (coefficients / np.sqrt(eigenvalues[:rank])) @ vectors[:, :rank].T  # on (x_j - mean)
    return weights + (1.0 - weights.sum(axis=1, keepdims=True)) / n_train  # mean = sum_j x_j / n_train
