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


def test_pod_rbf_matches_explicit_pod_modes_and_scipys_thin_plate_spline():
    """The coefficients of the same POD interpolated by scipy's RBFInterpolator (thin-plate spline, linear
    polynomial); designs that determine no spline (two at the same parameters) leave it out rather than fail."""
    from scipy.interpolate import RBFInterpolator
    fields, parameters = fields_and_parameters()
    n_train, rank = 22, 4
    mean = fields[:n_train].mean(axis=0)
    _, _, modes = np.linalg.svd(fields[:n_train] - mean, full_matrices=False)
    coefficients = (fields[:n_train] - mean) @ modes[:rank].T
    spline = RBFInterpolator(parameters[:n_train], coefficients, kernel="thin_plate_spline")
    expected = mean + spline(parameters[n_train:]) @ modes[:rank]
    weights = baseline_weights(fields @ fields.T, n_train, {"pod": rank}, parameters=parameters, seed=0)
    assert np.allclose(weights["pod_rbf"] @ fields[:n_train], expected, rtol=1e-4, atol=1e-6)
    repeated = parameters.copy()
    repeated[1] = repeated[0]
    assert set(baseline_weights(fields @ fields.T, n_train, {"pod": rank}, parameters=repeated)) == {
        "pod", "mean_field", "pod_gpr"}


def test_the_prediction_report_says_why_a_pod_baseline_is_missing():
    """Images: neither POD baseline applies; parameters that determine no spline: POD + RBF alone is missing, and the
    row says which reason holds."""
    from modules.evaluation.report import prediction_rows
    report = {"conditioner": "MLP", "conditioner_val": 0.01, "conditioner_val_median": 0.01,
              "conditioner_val_worst": 0.02, "conditioner_val_worst_design": 3, "vae_reconstruction_val": 0.001,
              "latent_numbers_per_design": 8,
              "baselines": {"pod_gpr": 0.02, "pod_rbf": None, "nearest_neighbour": 0.05, "mean_field": 0.1}}
    rows = dict(prediction_rows(report))
    assert rows["POD (8 modes) + thin-plate-spline interpolation"] == \
        "n/a (the training designs determine no thin-plate spline)"
    report["baselines"]["pod_gpr"] = None
    rows = dict(prediction_rows(report))
    assert rows["POD (8 modes) + thin-plate-spline interpolation"] == "n/a (designs are defined by images)"
    assert rows["POD (8 modes) + Gaussian-process regression"] == "n/a (designs are defined by images)"
