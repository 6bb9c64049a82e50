"""The baselines' fields, written as weighted sums of the training designs from the Gram matrix alone, equal the same
predictors computed on explicit fields."""
import numpy as np

from modules.evaluation.baselines import baseline_weights
from modules.models.gaussian_process import fit_gpr


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
    weights = baseline_weights(fields @ fields.T, n_train, {"pod": 3}, conditions=parameters)["nearest_neighbour"]
    assert np.allclose(weights @ fields[:n_train], fields[nearest])


def test_pod_gpr_matches_explicit_pod_modes_and_per_mode_gps():
    fields, parameters = fields_and_parameters()
    n_train, rank = 22, 4
    mean = fields[:n_train].mean(axis=0)
    _, _, modes = np.linalg.svd(fields[:n_train] - mean, full_matrices=False)
    coefficients = (fields[:n_train] - mean) @ modes[:rank].T
    predicted = np.stack([fit_gpr(parameters[:n_train], coefficients[:, k], 0).predict(parameters[n_train:])
                          for k in range(rank)], axis=1)
    expected = mean + predicted @ modes[:rank]
    weights = baseline_weights(fields @ fields.T, n_train, {"pod": rank}, parameters=parameters, seed=0)["pod_gpr"]
    assert np.allclose(weights @ fields[:n_train], expected, rtol=1e-4, atol=1e-6)
    result = relative(weights @ fields[:n_train], fields[n_train:])
    assert result.mean() < 0.5 * relative(np.repeat(mean[None], 8, 0), fields[n_train:]).mean()
