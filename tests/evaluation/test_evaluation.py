"""The evaluation report: error bookkeeping, the streamed baselines against their exact fields, --evaluate, and the
plot settings (grid, coordinates, designs, steps) checked before anything trains."""
import json
import os
import subprocess
import sys
from contextlib import chdir

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, evaluation_report, said, smooth_fields, write_case
from modules.cli import main
from modules.config import load_config
from modules.data.case import prepare_case
from modules.evaluation.baselines import baseline_weights, score_combinations
from modules.evaluation.metrics import FieldErrors, relative_l2
from modules.evaluation.report import not_learnt_warnings
from modules.machine.device import Runtime
from modules.models.gaussian_process import fit_gpr
from modules.models.pod import design_gram


def small_case(folder, n=20, t=6, m=20):
    """A case whose fields are the smooth family plus noise: no small POD basis is exact."""
    noise = np.random.default_rng(5).normal(scale=0.3, size=(n, t, m))
    write_case(folder, n=n, t=t, m=m, epochs=1, data=(smooth_fields(n, t, m) + noise).astype(np.float32))
    with chdir(folder):
        return prepare_case(load_config(1), Runtime(torch.device("cpu")))


# ------------------------------------------------------------------------------------------------ FieldErrors
def test_field_errors_by_design_batches_and_by_time_chunks_agree_with_direct_numbers():
    rng = np.random.default_rng(0)
    simulated = rng.normal(size=(5, 7, 12)).astype(np.float32)
    predicted = simulated + rng.normal(scale=0.1, size=simulated.shape).astype(np.float32)
    by_designs, by_steps = FieldErrors.empty(range(5), 7, 2), FieldErrors.empty(range(5), 7, 2)
    by_designs.add(slice(0, 2), predicted[:2], simulated[:2])
    by_designs.add(slice(2, 5), predicted[2:], simulated[2:])
    for first in range(0, 7, 3):
        by_steps.add(slice(None), predicted[:, first:first + 3], simulated[:, first:first + 3], slice(first, first + 3))
    for errors in (by_designs, by_steps):
        assert np.allclose(errors.relative_l2(), relative_l2(predicted, simulated), rtol=1e-6)
        difference = np.abs(predicted - simulated)
        assert np.allclose(errors.max_abs, np.stack([difference[:, :, :6].max(axis=(1, 2)),
                                                     difference[:, :, 6:].max(axis=(1, 2))], axis=1))
        per_step = np.sqrt(((predicted - simulated) ** 2).sum(axis=(0, 2)) / (simulated ** 2).sum(axis=(0, 2)))
        assert np.allclose(errors.relative_l2_per_step(), per_step, rtol=1e-6)


def test_error_per_step_is_undefined_not_infinite_where_the_field_is_zero():
    simulated = np.ones((2, 3, 4), np.float32)
    simulated[:, 0] = 0
    errors = FieldErrors.empty([7, 9], 3, 1)
    errors.add(slice(None), simulated + 0.1, simulated)
    summary = errors.summary(n_nodes=4)
    assert summary["per_step"]["relative_l2"][0] is None and summary["per_step"]["relative_l2"][1] == pytest.approx(0.1)
    assert summary["per_step"]["rms_error"] == pytest.approx([0.1] * 3)
    json.dumps(summary)  # valid JSON: no NaN
    assert summary["worst_designs"][0]["design"] in (7, 9) and summary["max_abs_error"][0]["max"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- streamed baselines
def test_streamed_baseline_fields_match_the_same_predictors_on_explicit_fields(tmp_path):
    """POD by an explicit SVD, the mean field, the nearest training design and POD + GPR on explicit POD
    coefficients, against the errors scored by streaming the data over time steps (weights from the Gram matrix)."""
    case = small_case(tmp_path)
    n_train = len(case.train_indices)
    gram = design_gram(case.array, np.concatenate([case.train_indices, case.val_indices]))
    parameters = np.random.default_rng(1).normal(size=(len(gram), 2))
    weights = baseline_weights(gram, n_train, {"pod": 3}, conditions=parameters, parameters=parameters, seed=0)
    errors = score_combinations(case.array, case.train_indices, case.val_indices, weights, n_vars=1)
    train = case.array.read(case.train_indices).reshape(n_train, -1).astype(np.float64)
    val = case.array.read(case.val_indices).reshape(len(case.val_indices), -1).astype(np.float64)
    mean = train.mean(axis=0)
    modes = np.linalg.svd(train - mean, full_matrices=False)[2][:3]
    nearest = [np.argmin(((parameters[:n_train] - p) ** 2).sum(axis=1)) for p in parameters[n_train:]]
    coefficients = (train - mean) @ modes.T
    gpr = np.stack([fit_gpr(parameters[:n_train], coefficients[:, k], 0).predict(parameters[n_train:])
                    for k in range(3)], axis=1)
    explicit = {"pod": mean + (val - mean) @ modes.T @ modes, "mean_field": np.repeat(mean[None], len(val), 0),
                "nearest_neighbour": train[nearest], "pod_gpr": mean + gpr @ modes}
    for name, fields in explicit.items():
        expected = np.linalg.norm(fields - val, axis=1) / np.linalg.norm(val, axis=1)
        assert np.allclose(errors[name].relative_l2(), expected, rtol=1e-4), name
        # the max-abs error needs the fields themselves, not only inner products
        assert np.allclose(errors[name].max_abs[:, 0], np.abs(fields - val).max(axis=1), rtol=1e-3, atol=1e-5), name


# ------------------------------------------------------------------------------------------------- --evaluate
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VAE-only run, with plots on a 4 x 5 grid."""
    folder = tmp_path_factory.mktemp("evaluated")
    write_case(folder, n=16, epochs=3, extra="grid_shape 4 5\n")
    with chdir(folder):
        assert main(["--plot=1"]) == 0
    return folder


def test_a_training_run_ends_with_the_evaluation_next_to_pod(trained):
    report = evaluation_report(trained)
    reconstruction = json.loads((trained / "output" / "reconstruction_error.json").read_text())
    assert set(report["reconstruction"]) == {"vae", "pod", "mean_field"} and report["prediction"] is None
    assert report["reconstruction"]["vae"]["relative_l2"]["mean"] == pytest.approx(reconstruction["vae_val"], rel=1e-6)
    assert report["reconstruction"]["pod"]["relative_l2"]["mean"] == pytest.approx(
        reconstruction["pod_val"][str(report["latent_numbers_per_design"])], rel=1e-4, abs=1e-6)
    vae = report["reconstruction"]["vae"]
    assert len(vae["per_step"]["relative_l2"]) == 6 and len(vae["max_abs_error"]) == 1
    assert vae["worst_designs"][0]["relative_l2"] == vae["relative_l2"]["max"]
    assert {row["design"] for row in vae["worst_designs"]} <= set(json.loads(
        (trained / "model_save" / "split.json").read_text())["val"])
    assert report["memorization"]["n_samples"] == 4 and set(report["active_units"]) == {"main", "level0", "level1"}
    text = (trained / "output" / "evaluation.md").read_text()
    assert "| POD, 16 modes |" in text and "## Worst validation designs" in text and "## Memorization" in text


def test_the_evaluation_plots_are_real_pngs_and_the_fields_are_grid_maps(trained):
    for name in ("evaluation_reconstruction_fields", "evaluation_error_per_step", "latent_space", "active_units"):
        with Image.open(trained / "output" / f"{name}.png") as image:
            assert image.width > 300 and image.height > 200
            assert np.asarray(image.convert("L")).std() > 5  # a picture, not a blank canvas
    # 2 designs (median and worst) x 3 steps, 3 panels each (a line plot would have 2 panels)
    with Image.open(trained / "output" / "evaluation_reconstruction_fields.png") as image:
        assert image.width > 1200 and image.height > 6 * 250


def test_evaluate_scores_the_saved_model_again_and_archives_the_earlier_report(trained, tmp_path, capsys):
    folder = tmp_path / "again"
    import shutil
    shutil.copytree(trained, folder)
    before = evaluation_report(folder)
    with chdir(folder):
        assert main(["--evaluate"]) == 0
    after = evaluation_report(folder)
    assert after["reconstruction"] == before["reconstruction"] and after["memorization"] == before["memorization"]
    archived = list((folder / "archive").glob("*/output/evaluation.json"))
    assert len(archived) == 1 and json.loads(archived[0].read_text()) == before
    assert not (folder / "output" / "latent_space.png").exists()  # --plot defaults to 2; the old one is archived
    assert "written to output/evaluation.json" in capsys.readouterr().out


def test_evaluate_without_a_model_or_with_training_flags_is_one_line(tmp_path, capsys):
    write_case(tmp_path)
    with chdir(tmp_path):
        assert main(["--evaluate"]) == 2
        assert main(["--evaluate", "--size=large"]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error[0].startswith("error: model_save/SimulGen-VAE: not found") and "train one first" in error[0]
    assert "--size only apply to training" in error[1]
    assert not (tmp_path / "archive").exists() and not (tmp_path / "output").exists()


@pytest.mark.slow
def test_plot_0_of_evaluate_does_not_block_without_a_terminal(trained, tmp_path):
    import shutil
    folder = tmp_path / "shown"
    shutil.copytree(trained, folder)
    environment = {**os.environ, "DISPLAY": ":99"}  # a screen is claimed, but stdin is not a terminal: no window
    result = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), "--evaluate", "--plot=0"], cwd=folder,
                            env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "only saved" in result.stdout and (folder / "output" / "latent_space.png").exists()


# ---------------------------------------------------------------------------------- plot settings, checked early
@pytest.mark.parametrize("extra, message", [
    ("grid_shape 3 5\n", "grid_shape 3 x 5 holds 15 nodes, but each variable has 20"),
    ("grid_shape 4 5\nnode_coordinates xy.npy\n", "grid_shape and node_coordinates each say where the nodes are"),
    ("plot_designs 3 99\n", "plot_designs 3 99 names a design beyond Dim1 = 12"),
    ("plot_steps 6\n", "plot_steps 6 names a step beyond the 6 time steps"),
    # 2 designs by default x 4 steps x 4 variables: 32 rows of maps
    ("num_var 4\nplot_steps 0 1 2 3\n", "plot_designs (2 when not given) x plot_steps x num_var asks for more than 24"),
    ("node_coordinates missing.npy\n", "missing.npy"),
    ("node_coordinates xy.npy\n", "xy.npy: has 19 rows"),
    ("plot_color_by amplitude\n", "plot_color_by amplitude names a parameter"),
])
def test_bad_plot_settings_stop_before_anything_moves(tmp_path, capsys, extra, message):
    write_case(tmp_path, extra=extra)
    np.save(tmp_path / "xy.npy", np.zeros((19, 2)))
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "metrics.csv").write_text("an earlier run\n")
    with chdir(tmp_path):
        assert main(["--plot=1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "Traceback" not in error
    assert (tmp_path / "output" / "metrics.csv").read_text() == "an earlier run\n"
    assert not (tmp_path / "archive").exists() and not (tmp_path / "runs").exists()


def test_plot_settings_without_plots_get_a_note(tmp_path):
    write_case(tmp_path, extra="plot_steps 2\ngrid_shape 4 5\n")
    with chdir(tmp_path), said() as lines:
        load_config(1)
    out = "\n".join(lines)  # where the nodes are also places the .xdmf outputs: never "no effect"
    assert "'plot_steps' has no effect because plot is 2" in out and "grid_shape" not in out


@pytest.mark.slow
def test_node_coordinates_draw_maps_on_the_mesh_for_chosen_designs_and_steps(tmp_path):
    angle = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    write_case(tmp_path, n=12, epochs=1, extra="node_coordinates input_data/xy.csv\nplot_designs 0 5\nplot_steps 5\n")
    (tmp_path / "input_data" / "xy.csv").write_text("x,y\n" + "".join(
        f"{np.cos(a) * (1 + i % 3)},{np.sin(a) * (1 + i % 3)}\n" for i, a in enumerate(angle)))
    with chdir(tmp_path):
        assert main(["--plot=1"]) == 0
    with Image.open(tmp_path / "output" / "evaluation_reconstruction_fields.png") as image:
        assert image.width > 1200 and 2 * 250 < image.height < 3 * 400  # 2 designs x 1 step, 3 panels


def summary(error):
    return {"relative_l2": {"mean": error}}


@pytest.mark.parametrize("vae, conditioner, said", [
    (0.01, 0.02, []),
    (0.095, None, ["the VAE's reconstruction of the validation designs (9.5000%) is hardly better than"]),
    (0.2, 0.05, ["the VAE's reconstruction of the validation designs (20.0000%) is worse than"]),
    (0.01, 0.3, ["the conditioner's prediction of the validation designs (30.0000%) is worse than the training "
                 "designs' mean field (10.0000%)"]),
])
def test_a_model_not_clearly_better_than_the_mean_field_is_warned_about(vae, conditioner, said):
    report = {"reconstruction": {"vae": summary(vae), "mean_field": summary(0.1)},
              "prediction": None if conditioner is None else {"conditioner": summary(conditioner)}}
    warnings = not_learnt_warnings(report)
    assert len(warnings) == len(said)
    for warning, start in zip(warnings, said):
        assert warning.startswith(start) and "this model has not learnt the case" in warning


def test_errors_are_said_in_percent_with_the_digits_a_near_exact_family_needs():
    from modules.evaluation.metrics import as_percent
    assert [as_percent(value) for value in (0.008488262, 0.51208, 3.886e-6, 2.4e-7, 0.0)] == [
        "0.8488%", "51.2080%", "0.000389%", "2.4e-05%", "0.0000%"]
