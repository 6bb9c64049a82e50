"""What a user would do without a conditioner, on the same split, so the conditioner's error has a yardstick.

- Nearest neighbour: a new design gets the field of the training design whose condition (scaled parameters or
  image pixels) is closest.
- POD + Gaussian-process regression and POD + RBF (when the designs are defined by parameters): the training fields'
  POD coefficients, as many as the VAE has latent numbers, are regressed on the parameters with a GP per coefficient,
  or interpolated by a thin-plate spline (the usual two POD surrogates; which is the better depends on the family).

Each baseline's field is a weighted sum of the training designs, the weights computed from the Gram matrix of the
designs' fields (models.pod), so scoring streams the data once and never holds the [N, T, M] array in memory.
"""
import numpy as np
import torch

from modules.data.dataset import READ_CHUNK_BYTES
from modules.evaluation.metrics import FieldErrors
from modules.models.conditioners import LATENT_RBF, ConditionerSpec
from modules.models.gaussian_process import fit_gpr
from modules.models.pod import combination_weights, pod_coefficients
from modules.models.radial_basis import RBFConditioner


def nearest_training_designs(n_train: int, conditions: np.ndarray) -> np.ndarray:
    """[n_val] position (in the training rows) of each validation design's nearest training design in condition
    space; conditions: [n_train + n_val, ...], training rows first."""
    flat = conditions.reshape(len(conditions), -1).astype(np.float64)
    train, val = flat[:n_train], flat[n_train:]
    # ||v - t||^2 up to the ||v||^2 that every candidate shares: no [n_val, n_train, pixels] array for images
    distances = (train ** 2).sum(axis=1)[None, :] - 2 * val @ train.T
    return distances.argmin(axis=1)


def pod_gpr_coefficients(gram: np.ndarray, n_train: int, parameters: np.ndarray, rank: int, seed: int):
    """The validation designs' POD coefficients [n_val, min(rank, modes)] predicted from their standardised
    parameters [n_train + n_val, P] (order of gram). Each coefficient gets its own GP with an anisotropic RBF kernel
    (one length scale per parameter) plus noise: the usual POD + GPR surrogate, and the stronger one (a single GP
    shared by all coefficients cannot give each mode its own length scales)."""
    train_coefficients = pod_coefficients(gram, n_train)[0]
    return np.stack([fit_gpr(parameters[:n_train], train_coefficients[:, mode], seed).predict(parameters[n_train:])
                     for mode in range(min(rank, train_coefficients.shape[1]))], axis=1)


def pod_rbf_coefficients(gram: np.ndarray, n_train: int, parameters: np.ndarray, rank: int):
    """The validation designs' POD coefficients [n_val, min(rank, modes)] interpolated from the training designs'
    by a thin-plate spline on the standardised parameters [n_train + n_val, P] (models.radial_basis); None where
    the training designs do not determine one (said in the report)."""
    train_coefficients = pod_coefficients(gram, n_train)[0][:, :rank]
    spec = ConditionerSpec(LATENT_RBF.kind, (parameters.shape[1],), train_coefficients.shape[1], (), gp_points=n_train)
    try:
        spline = RBFConditioner(spec).fit(parameters[:n_train], train_coefficients)
    except np.linalg.LinAlgError:
        return None
    return spline(torch.as_tensor(parameters[n_train:])).double().numpy()


def baseline_weights(gram: np.ndarray, n_train: int, pod_ranks: dict, conditions=None, parameters=None,
                     seed: int = 0):
    """{name: weights [n_val, n_train]}: each baseline's field of every validation design as a weighted sum of the
    training designs. pod_ranks {name: rank}: the design's own projection on `rank` POD modes (a reconstruction: the
    yardstick of the VAE); "mean_field"; with conditions, "nearest_neighbour"; with standardised parameters,
    "pod_gpr" and "pod_rbf" (as many modes as the largest POD rank; no "pod_rbf" where the designs do not
    determine a spline)."""
    n_val = len(gram) - n_train
    coefficients = pod_coefficients(gram, n_train)[1]
    weights = {name: combination_weights(gram, n_train, coefficients[:, :rank]) for name, rank in pod_ranks.items()}
    weights["mean_field"] = np.full((n_val, n_train), 1.0 / n_train)
    rank = max(pod_ranks.values())
    if conditions is not None:
        weights["nearest_neighbour"] = np.eye(n_train)[nearest_training_designs(n_train, conditions)]
    if parameters is not None:
        weights["pod_gpr"] = combination_weights(gram, n_train, pod_gpr_coefficients(gram, n_train, parameters, rank,
                                                                                     seed))
        interpolated = pod_rbf_coefficients(gram, n_train, parameters, rank)
        if interpolated is not None:
            weights["pod_rbf"] = combination_weights(gram, n_train, interpolated)
    return weights


def score_combinations(array, train_indices, val_indices, weights: dict, n_vars: int) -> dict:
    """{name: FieldErrors of the validation designs} for fields = weights[name] @ training fields, in one pass over
    the data streamed over time steps (the per-step and max-abs errors need the fields, not just inner products)."""
    n_steps, n_nodes = array.sample_shape
    errors = {name: FieldErrors.empty(val_indices, n_steps, n_vars) for name in weights}
    steps_per_read = max(1, READ_CHUNK_BYTES // (4 * n_nodes * (len(train_indices) + 2 * len(val_indices))))
    for first in range(0, n_steps, steps_per_read):
        steps = slice(first, first + steps_per_read)
        training = array.read(train_indices, steps=steps)
        simulated = array.read(val_indices, steps=steps)
        flat = training.reshape(len(training), -1)
        for name, combination in weights.items():
            predicted = (combination.astype(np.float32) @ flat).reshape(simulated.shape)
            errors[name].add(slice(None), predicted, simulated, steps)
    return errors
