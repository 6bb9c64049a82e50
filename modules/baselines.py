"""What a user would do without a conditioner, on the same split, so the conditioner's error has a yardstick.

- Nearest neighbour: a new design gets the field of the training design whose condition (scaled parameters or
  image pixels) is closest.
- POD + Gaussian-process regression (when the designs are defined by parameters): the training fields' POD
  coefficients, as many as the VAE has latent numbers, are regressed on the parameters with a GP.

Both are computed from the Gram matrix of the designs' fields (modules/pod.py), so they stream the data once and
never hold the [N, T, M] array in memory.
"""
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

from modules.pod import pod_coefficients


def nearest_neighbour_errors(gram: np.ndarray, n_train: int, conditions: np.ndarray) -> np.ndarray:
    """Relative L2 error [n_val] of predicting each validation design by its nearest training design.

    gram: design_gram of [training..., validation...]; conditions: [n_train + n_val, ...] in the same order.
    """
    flat = conditions.reshape(len(conditions), -1).astype(np.float64)
    train, val = flat[:n_train], flat[n_train:]
    # ||v - t||^2 up to the ||v||^2 that every candidate shares: no [n_val, n_train, pixels] array for images
    distances = (train ** 2).sum(axis=1)[None, :] - 2 * val @ train.T
    nearest = distances.argmin(axis=1)
    val_rows = np.arange(n_train, len(gram))
    squared = gram[val_rows, val_rows] + gram[nearest, nearest] - 2 * gram[val_rows, nearest]
    return np.sqrt(np.clip(squared, 0, None) / gram[val_rows, val_rows])


def pod_gpr_errors(gram: np.ndarray, n_train: int, parameters: np.ndarray, rank: int, seed: int) -> np.ndarray:
    """Relative L2 error [n_val] of POD (rank modes of the training designs) + GP regression of the coefficients.

    parameters: standardised [n_train + n_val, P] in the order of gram. Each coefficient gets its own GP with an
    anisotropic RBF kernel (one length scale per parameter) plus noise: the usual POD + GPR surrogate. (One GP shared
    by all coefficients measured worse on the demo case, 1.0 % against 0.85 %.)
    """
    train_coefficients, val_coefficients, val_centred_norm2, val_norm2 = pod_coefficients(gram, n_train)
    rank = min(rank, train_coefficients.shape[1])
    predicted = np.stack([fit_gpr(parameters[:n_train], train_coefficients[:, mode], seed).predict(
        parameters[n_train:]) for mode in range(rank)], axis=1)
    # ||x - mean - sum_k c~_k u_k||^2 with orthonormal modes u_k and true coefficients c_k = <x - mean, u_k>
    squared = val_centred_norm2 - 2 * (predicted * val_coefficients[:, :rank]).sum(axis=1) + (predicted ** 2).sum(1)
    return np.sqrt(np.clip(squared, 0, None) / val_norm2)


def fit_gpr(inputs: np.ndarray, targets: np.ndarray, seed: int) -> GaussianProcessRegressor:
    n_params = inputs.shape[1]
    kernel = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.ones(n_params), (1e-2, 1e3))
              + WhiteKernel(1e-4, (1e-8, 1e-1)))
    model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=1, random_state=seed)
    with warnings.catch_warnings():  # a length scale at its bound is a fact of the data, not a failure
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(inputs, targets)
