"""The prediction baselines, computed from the Gram matrix, equal the same predictors computed on explicit fields."""
import numpy as np

from modules.evaluation.baselines import fit_gpr, nearest_neighbour_errors, pod_gpr_errors


def fields_and_parameters(n=30, size=50, seed=0):
    rng = np.random.default_rng(seed)
    parameters = rng.uniform(-1, 1, size=(n, 2))
    basis = rng.normal(size=(3, size))
    fields = 5 + np.sin(parameters[:, :1] * 2) * basis[0] + parameters[:, 1:] ** 2 * basis[1] + 0.01 * rng.normal(
        size=(n, size))
    return fields, parameters


def relative(predicted, true):
    return np.linalg.norm(predicted - true, axis=1) / np.linalg.norm(true, axis=1)


def test_nearest_neighbour_matches_the_explicit_nearest_training_design():
    fields, parameters = fields_and_parameters()
    n_train = 22
    nearest = [np.argmin(((parameters[:n_train] - p) ** 2).sum(axis=1)) for p in parameters[n_train:]]
    expected = relative(fields[nearest], fields[n_train:])
    assert np.allclose(nearest_neighbour_errors(fields @ fields.T, n_train, parameters), expected, rtol=1e-6)


def test_pod_gpr_matches_explicit_pod_modes_and_per_mode_gps():
    fields, parameters = fields_and_parameters()
    n_train, rank = 22, 4
    mean = fields[:n_train].mean(axis=0)
    _, _, modes = np.linalg.svd(fields[:n_train] - mean, full_matrices=False)
    coefficients = (fields[:n_train] - mean) @ modes[:rank].T
    predicted = np.stack([fit_gpr(parameters[:n_train], coefficients[:, k], 0).predict(parameters[n_train:])
                          for k in range(rank)], axis=1)
    expected = relative(mean + predicted @ modes[:rank], fields[n_train:])
    result = pod_gpr_errors(fields @ fields.T, n_train, parameters, rank, seed=0)
    assert np.allclose(result, expected, rtol=1e-4, atol=1e-7)
    assert result.mean() < 0.5 * relative(np.repeat(mean[None], 8, 0), fields[n_train:]).mean()
