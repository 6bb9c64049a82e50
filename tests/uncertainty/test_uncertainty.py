"""A prediction's uncertainty: the ensemble of conditioners, the GP's posterior spread, their calibration on the
validation designs, and what --predict --samples writes of it."""
import json
import re
import shutil
from contextlib import chdir

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import as_version_1, evaluation_report, sklearn_gpr
from modules.cli import main
from modules.data.scaling import ColumnScaler
from modules.models.conditioners import ConditionerSpec, build_conditioner
from modules.models.gaussian_process import GPRConditioner
from modules.storage.model_files import load_conditioner, save_conditioner
from modules.uncertainty.calibration import CoverageCounts, fit_calibration
from modules.uncertainty.next_designs import pick_diverse, sobol_candidates, variance_reduction_picks


# -------------------------------------------------------------------------------------------------- calibration
def counted(errors, std, parts=2):
    counts = CoverageCounts(*errors.shape[:2])
    for rows in np.array_split(np.arange(len(errors)), parts):  # added a batch of designs at a time, as in training
        counts.add(rows, errors[rows], std[rows])
    return counts


def test_calibration_scales_a_spread_too_narrow_by_step_to_the_observed_error_and_covers_95_percent():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 2.0, size=(12, 4, 300))
    factor = np.array([3.0, 3.0, 1.0, 0.5])[None, :, None]  # the raw spread is off by another factor at each step
    result = fit_calibration(counted(rng.normal(size=std.shape) * std * factor, std))
    assert result["per_step"] and np.allclose(result["scales"], factor.ravel(), rtol=0.05)
    assert result["coverage"]["raw"]["2 sigma"] < 0.85
    assert abs(result["coverage"]["calibrated"]["2 sigma"] - 0.9545) < 0.01
    assert abs(result["coverage"]["calibrated"]["1 sigma"] - 0.6827) < 0.02
    assert np.allclose(result["reliability"]["calibrated"], result["reliability"]["levels"], atol=0.02)


def test_one_scale_serves_every_step_when_each_step_is_off_by_the_same_factor():
    rng = np.random.default_rng(1)
    std = rng.uniform(0.5, 2.0, size=(10, 5, 200))
    result = fit_calibration(counted(rng.normal(size=std.shape) * std * 2.0, std))
    assert not result["per_step"] and len(set(result["scales"])) == 1 and abs(result["scales"][0] - 2.0) < 0.05


def test_the_two_sigma_band_holds_its_share_also_where_the_errors_have_heavier_tails_than_the_spread_says():
    """Half the values predicted almost exactly, half off by a Gaussian of the spread's size (a feature slightly out
    of place): a scale that matched the variance (0.71) would leave the +-2 sigma band holding 92 %. The fitted scale
    puts 95.4 % of the held-out values inside it, and the +-1 sigma band then holds about 80 %, as reported."""
    rng = np.random.default_rng(3)
    std = np.ones((12, 3, 400))
    errors = rng.normal(size=std.shape) * (rng.uniform(size=std.shape) < 0.5) + 1e-3 * rng.normal(size=std.shape)
    result = fit_calibration(counted(errors, std))
    assert not result["per_step"] and abs(result["scales"][0] - 0.845) < 0.03
    assert abs(result["coverage"]["calibrated"]["2 sigma"] - 0.9545) < 0.01
    assert abs(result["coverage"]["calibrated"]["1 sigma"] - 0.80) < 0.02


def test_a_value_without_spread_is_inside_the_band_only_when_its_error_is_zero_too():
    std, errors = np.zeros((2, 1, 4)), np.array([[[0.0, 0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 1.0]]])
    result = fit_calibration(counted(errors, std))
    assert result["scales"] == [1.0] and result["coverage"]["raw"]["2 sigma"] == 0.75


def test_calibrated_coverage_is_measured_on_designs_held_out_of_the_fit():
    """Each design's coverage comes from scales fitted on the others: two designs whose errors differ by a factor
    of 10 are each judged by the other's scale, so neither is covered as well as an in-sample fit would claim."""
    std = np.ones((2, 1, 2000))
    errors = np.random.default_rng(2).normal(size=std.shape) * np.array([1.0, 10.0])[:, None, None]
    result = fit_calibration(counted(errors, std))
    assert result["coverage"]["calibrated"]["2 sigma"] < 0.8


# ---------------------------------------------------------------------------------------------- the two sources
def test_the_gp_posterior_std_is_sklearns_without_the_observation_noise_and_grows_away_from_the_designs():
    rng = np.random.default_rng(0)
    inputs, far = rng.normal(size=(30, 2)), np.array([[8.0, 8.0], [-8.0, 8.0], [8.0, -8.0], [-8.0, -8.0]])
    targets = np.stack([np.sin(inputs[:, 0]), inputs[:, 0] * inputs[:, 1]], axis=1)
    spec = ConditionerSpec(kind="gpr", input_shape=(2,), output_dim=2, filters=(8,), gp_points=30)
    gp = GPRConditioner(spec).fit(inputs, targets, seed=0)
    queries = np.concatenate([inputs[:3] + 0.01, far])
    mean, std = gp.latent_spread(torch.from_numpy(queries))
    for dim in range(2):
        model = sklearn_gpr(inputs, targets[:, dim], seed=0)
        expected_mean, expected_std = model.predict(queries, return_std=True)
        noise = model.kernel_.k2.noise_level * float(np.asarray(model._y_train_std).reshape(-1)[0]) ** 2
        assert np.allclose(mean[:3, dim].numpy(), expected_mean[:3], atol=1e-5)
        # far from the designs the mean follows the amplitude, which the likelihood leaves flat to the optimiser's
        # tolerance: there to 1e-3 of itself
        assert np.allclose(mean[3:, dim].numpy(), expected_mean[3:], rtol=1e-3)
        assert np.allclose(std[:, dim].numpy() ** 2, expected_std ** 2 - noise, rtol=1e-3, atol=1e-8)
    assert (std[3:] > 10 * std[:3].max()).all()


def test_an_ensemble_predicts_its_members_mean_they_start_apart_and_it_is_saved_and_loaded_whole(tmp_path):
    torch.manual_seed(0)
    spec = ConditionerSpec(kind="mlp", input_shape=(3,), output_dim=5, filters=(8, 8), members=3)
    ensemble = build_conditioner(spec).eval()
    for member in ensemble.members:  # heads start near zero: give them weights to tell the members apart
        torch.nn.init.normal_(member.head[1].weight)
    inputs = torch.randn(4, 3)
    each = ensemble(inputs, every_member=True)
    assert each.shape == (3, 4, 5) and torch.allclose(ensemble(inputs), each.mean(0))
    assert not torch.allclose(each[0], each[1])
    mean, std = ensemble.latent_spread(inputs)
    assert torch.allclose(std, each.std(0)) and (std > 0).all()
    save_conditioner(tmp_path / "ensemble", ensemble, spec, {})
    loaded, facts = load_conditioner(tmp_path / "ensemble")
    assert facts["spec"]["members"] == 3 and torch.equal(loaded(inputs), ensemble(inputs))


def test_a_gp_file_saved_before_the_posterior_was_kept_loads_and_has_no_spread_of_its_own(tmp_path):
    spec = ConditionerSpec(kind="gpr", input_shape=(2,), output_dim=1, filters=(8,), gp_points=5)
    rng = np.random.default_rng(0)
    gp = GPRConditioner(spec).fit(rng.normal(size=(5, 2)), rng.normal(size=(5, 1)), seed=0)
    save_conditioner(tmp_path / "gp", gp, spec, {})
    payload = as_version_1(torch.load(tmp_path / "gp", weights_only=True))
    del payload["state_dict"]["noise_levels"]
    torch.save(payload, tmp_path / "gp")
    loaded, _ = load_conditioner(tmp_path / "gp")
    assert loaded.latent_spread(torch.zeros(1, 2))[1] is None


# ------------------------------------------------------------------------------------------- what to simulate next
def test_the_greedy_picks_leave_the_most_uncertain_spot_once_it_holds_a_pick():
    """All the spread is near one corner of a dense grid: the K largest spreads are K neighbours there; the diversity
    term keeps the picks apart (a pick at half the spacing from another counts half its spread)."""
    axis = np.linspace(0.0, 4.0, 41)
    points = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    spread = np.exp(-np.linalg.norm(points, axis=1))
    picks = pick_diverse(spread, points, 5, spacing=1.0)
    assert picks[0] == int(np.argmax(spread)) and len(set(picks)) == 5
    apart = np.linalg.norm(points[picks][:, None] - points[picks][None], axis=2) + np.eye(5) * 99
    assert apart.min() > 0.45
    top_five = np.argsort(-spread, kind="stable")[:5]
    assert (np.linalg.norm(points[top_five][:, None] - points[top_five][None], axis=2) + np.eye(5) * 99).min() < 0.2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the GP's buffers on a GPU are checked where there is one"))])
def test_the_gp_picks_the_design_that_most_reduces_the_variance_averaged_over_the_candidates_not_the_largest(device):
    """Training designs cover [-1.5, 0] of a 1-D parameter, candidates [-1.5, 1.5]: the largest posterior variance
    is at the far end, but a design inside the gap informs more candidates. The first pick is the brute-force
    optimum of the mean variance reduction, each later pick is computed with the earlier ones observed."""
    train = np.linspace(-1.5, 0.0, 8)[:, None]
    spec = ConditionerSpec(kind="gpr", input_shape=(1,), output_dim=2, filters=(8,), gp_points=8)
    gp = GPRConditioner(spec).fit(train, np.concatenate([np.sin(2 * train), train ** 2], axis=1), seed=0)
    candidates = torch.linspace(-1.5, 1.5, 201, dtype=torch.float64)[:, None]
    weights = np.array([1.0, 0.5])
    picks = variance_reduction_picks(gp.to(device), candidates, weights, 3, seed=0)
    gp = gp.cpu()

    def mean_variance(observed):
        total = 0.0
        for dim in range(2):
            scale, amplitude = gp.length_scales[dim, 0].item(), gp.amplitudes[dim].item()
            kernel = lambda a, b: amplitude * np.exp(-0.5 * ((a[:, None] - b[None, :]) / scale) ** 2)  # noqa: E731
            points, grid = np.asarray(observed, dtype=np.float64), candidates[:, 0].numpy()
            covariance = kernel(points, points) + np.eye(len(points)) * (gp.noise_levels[dim].item() + 1e-10)
            cross = kernel(points, grid)
            variance = amplitude - np.sum(cross * np.linalg.solve(covariance, cross), axis=0)
            total += weights[dim] * gp.target_std[dim].item() ** 2 * variance.mean()
        return total

    known = list(train[:, 0])
    after = [mean_variance(known + [float(x)]) for x in candidates[:, 0]]
    assert picks[0] == int(np.argmin(after))
    _, std = gp.latent_spread(candidates)
    assert int(torch.argmax(std[:, 0])) == 200 and 0.2 < candidates[picks[0], 0] < 1.4  # not the far end
    assert mean_variance(known + [float(candidates[picks[0], 0])]) < mean_variance(known + [1.5])
    second = [mean_variance(known + [float(candidates[picks[0], 0]), float(x)]) for x in candidates[:, 0]]
    assert picks[1] == int(np.argmin(second)) and len(set(picks)) == 3


def test_sobol_candidates_fill_the_training_box_and_repeat_for_a_seed():
    low, high = np.array([0.0, 10.0, 5.0]), np.array([1.0, 20.0, 5.0])  # the third parameter never varied
    sample = sobol_candidates(low, high, 256, seed=3)
    assert sample.shape == (256, 3) and (sample >= low).all() and (sample <= high).all()
    assert np.allclose(sample[:, 2], 5.0) and np.histogram(sample[:, 0], bins=4, range=(0, 1))[0].tolist() == [64] * 4
    assert np.array_equal(sample, sobol_candidates(low, high, 256, seed=3))
    assert not np.array_equal(sample, sobol_candidates(low, high, 256, seed=4))


# ------------------------------------------------------------------------------------------------ on the demo
@pytest.mark.slow
def test_the_demos_gp_spread_calibrated_holds_95_percent_of_the_validation_values_in_its_2_sigma_band(demo):
    uncertainty = evaluation_report(demo)["uncertainty"]
    assert uncertainty["source"] == "gp" and len(uncertainty["scales"]) == 24
    assert abs(uncertainty["coverage"]["calibrated"]["2 sigma"] - 0.9545) < 0.03
    assert "## Uncertainty of the prediction" in (demo / "output" / "evaluation.md").read_text()
    with Image.open(demo / "output" / "calibration.png") as image:
        assert image.size[0] > 300


@pytest.mark.slow
def test_predict_samples_writes_a_calibrated_std_that_covers_the_new_designs_true_fields(demo, tmp_path):
    with chdir(demo):
        assert main(["--predict=input_data/new_designs/parameters.csv", f"--out={tmp_path / 'new.npy'}",
                     "--samples=32"]) == 0
    true = np.load(demo / "input_data" / "new_designs" / "fields.npy")
    error = np.abs(np.load(tmp_path / "new.npy") - true)
    std = np.load(tmp_path / "new_std.npy")
    assert 0.85 < np.mean(error <= 2 * std) < 1.0  # 8 designs never seen: near the 95 % the calibration aims at
    assert np.mean(error <= 2 * std / np.asarray(evaluation_report(demo)["uncertainty"]["scales"])[:, None]) < np.mean(
        error <= 2 * std)  # the scale widened the raw spread


@pytest.mark.slow
def test_an_ensemble_of_conditioners_is_reported_against_its_members_calibrated_and_suggests(demo, tmp_path,
                                                                                             capsys):
    folder = tmp_path / "demo"
    shutil.copytree(demo, folder)
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("n_epoch 2", "n_epoch 40")
                         + "latent_gp 0\nlatent_rbf 0\nlc_ensemble 3\n")
    with chdir(folder):
        assert main(["--lc_only=1", "--plot=2"]) == 0
    report = json.loads((folder / "output" / "prediction_report.json").read_text())
    assert report["conditioner"] == "ensemble of 3 MLPs, end to end"
    ensemble = report["ensemble"]
    assert ensemble["members"] == 3 and ensemble["ensemble_val"] < np.mean(ensemble["members_val"])
    assert abs(report["conditioner_val"] - ensemble["ensemble_val"]) < 1e-6
    uncertainty = evaluation_report(folder)["uncertainty"]
    assert uncertainty["source"] == "ensemble"
    assert uncertainty["coverage"]["raw"]["2 sigma"] < uncertainty["coverage"]["calibrated"]["2 sigma"]
    assert abs(uncertainty["coverage"]["calibrated"]["2 sigma"] - 0.9545) < 0.05
    with chdir(folder):  # without a GP, --suggest picks by the members' spread and keeps picks apart
        assert main(["--suggest=3"]) == 0
    _, rows = suggestions(folder / "output" / "suggested_designs.csv")
    assert rows.shape == (3, 5) and rows[0, 4] == rows[:, 4].max()  # the most uncertain candidate first
    assert "the disagreement of the conditioner ensemble's members), with a diversity term" in capsys.readouterr().out


@pytest.mark.slow
def test_a_conditioner_saved_before_calibration_existed_still_draws_samples_and_says_they_are_not_calibrated(
        demo, tmp_path, capsys):
    folder = tmp_path / "demo"
    shutil.copytree(demo, folder)
    payload = as_version_1(torch.load(folder / "model_save" / "latent_conditioner", weights_only=True))
    del payload["calibration"]
    torch.save(payload, folder / "model_save" / "latent_conditioner")
    with chdir(folder):
        assert main(["--predict=input_data/new_designs/parameters.csv", f"--out={tmp_path / 'new.npy'}",
                     "--samples=2"]) == 0
        assert "the spread is not calibrated" in capsys.readouterr().out
        assert main(["--evaluate", "--plot=2"]) == 0
    assert "written before calibration existed" in evaluation_report(folder)["uncertainty"]["note"]


@pytest.mark.slow
def test_an_ensemble_that_the_gp_beats_leaves_a_gp_that_predicts_and_is_reported_as_not_kept(demo, tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(demo, folder)
    with open(folder / "input_data" / "condition.txt", "a") as condition:
        condition.write("lc_ensemble 2\nlatent_rbf 0\n")  # latent_gp 1 (the default): 2 epochs leave the networks
        # far behind
    with chdir(folder):
        assert main(["--lc_only=1", "--plot=2"]) == 0
        assert main(["--predict=input_data/new_designs/parameters.csv", f"--out={tmp_path / 'new.npy'}",
                     "--samples=2"]) == 0
    report = json.loads((folder / "output" / "prediction_report.json").read_text())
    assert report["conditioner"] == "GP on latents" and report["ensemble"]["kept"] is False
    assert report["ensemble"]["label"] == "ensemble of 2 MLPs"
    assert evaluation_report(folder)["uncertainty"]["source"] == "gp"
    assert "(not kept: the GP on latents predicts better)" in (folder / "output" / "evaluation.md").read_text()


def suggestions(path):
    lines = path.read_text().splitlines()
    return lines[0].split(","), np.array([[float(cell) for cell in line.split(",")] for line in lines[1:]])


@pytest.mark.slow
def test_suggest_is_repeatable_stays_in_the_training_box_and_keeps_its_picks_apart(demo, tmp_path):
    with chdir(demo):
        assert main(["--suggest=6", f"--out={tmp_path / 'a.csv'}"]) == 0
        assert main(["--suggest=6", f"--out={tmp_path / 'b.csv'}"]) == 0
        _, facts = load_conditioner("model_save/latent_conditioner")
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    header, rows = suggestions(tmp_path / "a.csv")
    assert header == ["cx", "cy", "radius", "conductivity", "predicted_relative_std"] and rows.shape == (6, 5)
    reference = facts["design_range"]
    picks = tmp_path / "picks.csv"  # the column is what --predict --samples reports for the same designs
    picks.write_text("\n".join(line.rsplit(",", 1)[0] for line in (tmp_path / "a.csv").read_text().splitlines()))
    with chdir(demo):
        assert main([f"--predict={picks}", f"--out={tmp_path / 'p.npy'}", "--samples=16"]) == 0
    report = json.loads((tmp_path / "p_report.json").read_text())["designs"]
    assert np.allclose([row["predicted_relative_std"] for row in report], rows[:, 4], rtol=0.2)
    points = ColumnScaler.from_dict(facts["input_scaler"]).transform(rows[:, :4]).astype(np.float64)
    spacing = reference["spaces"]["parameters"]["typical_distance"]
    apart = np.linalg.norm(points[:, None] - points[None], axis=2) + np.eye(6) * 99
    assert apart.min() >= 0.5 * spacing
    training = np.asarray(reference["spaces"]["parameters"]["points"])  # standardised alike
    nearest = np.linalg.norm(points[:, None] - training[None], axis=2).min(axis=1)
    assert np.median(nearest) > spacing  # where the training designs are not


@pytest.mark.slow
def test_suggest_from_candidates_picks_rows_of_the_file_the_farthest_first_and_warns_it_is_outside(demo, tmp_path,
                                                                                                    capsys):
    candidates = tmp_path / "candidates.csv"
    known = np.loadtxt(demo / "input_data" / "parameters.csv", delimiter=",", skiprows=1)[:5]
    far = known[:1] * [1.0, 1.0, 1.0, 0.0] + [0.0, 0.0, 0.0, 9.9]  # the first design, conductivity at the top
    rows = np.concatenate([known, far])
    lines = [",".join(f"{value:.17g}" for value in row) for row in rows]
    candidates.write_text("\n".join(["cx,cy,radius,conductivity", *lines]) + "\n")
    with chdir(demo):
        assert main(["--suggest=2", f"--candidates={candidates}", f"--out={tmp_path / 'next.csv'}"]) == 0
    _, picked = suggestions(tmp_path / "next.csv")
    assert np.array_equal(picked[0, :4], far[0])
    assert any(np.array_equal(picked[1, :4], row) for row in known)  # to the last digit: ready for the solver
    assert "suggestion 1: conductivity = 9.9 outside [" in capsys.readouterr().err


@pytest.mark.slow
def test_a_kept_rbf_on_latents_has_a_calibrated_spread_that_covers_new_designs_and_suggests(demo, tmp_path):
    """The thin-plate spline kept (the MLP left at 2 epochs, no GP): its kriging spread is calibrated on the
    validation designs, --samples writes a standard deviation whose 2-sigma band holds the new designs' true fields
    near the calibration's 95 %, and --suggest picks designs by it."""
    folder = tmp_path / "demo"
    shutil.copytree(demo, folder)
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(re.sub(r"(?m)^n_epoch .*$", "n_epoch 2", condition.read_text()) + "latent_gp 0\n")
    with chdir(folder):
        assert main(["--lc_only=1", "--plot=2"]) == 0
        assert main(["--predict=input_data/new_designs/parameters.csv", f"--out={tmp_path / 'new.npy'}",
                     "--samples=32"]) == 0
        assert main(["--suggest=3", f"--out={tmp_path / 'next.csv'}"]) == 0
    assert json.loads((folder / "output" / "prediction_report.json").read_text())["conditioner"] == "RBF on latents"
    uncertainty = evaluation_report(folder)["uncertainty"]
    assert uncertainty["source"] == "rbf" and abs(uncertainty["coverage"]["calibrated"]["2 sigma"] - 0.95) < 0.05
    true = np.load(demo / "input_data" / "new_designs" / "fields.npy")
    error = np.abs(np.load(tmp_path / "new.npy") - true)
    assert 0.85 < np.mean(error <= 2 * np.load(tmp_path / "new_std.npy")) < 1.0
    _, rows = suggestions(tmp_path / "next.csv")
    assert rows.shape == (3, 5) and bool((rows[:, 4] > 0).all())
