"""The feature-frame GP (feature_frame_gp): each snapshot brought to its feature's frame by its first two moments, the
POD of the frames' fields and a GP per number of each time step, drawn back on the grid. What it promises: a
snapshot's frame is its feature's centroid and covariance (across the edges of a periodic grid), in which the feature
sits at the grid's centre with the reference spread, and drawing it back gives the snapshot; on a family whose
feature moves, turns and stretches it predicts new designs far better than POD + GPR; a run keeps it where it
predicts best, and it is then evaluated, predicted, exported, drawn from and asked for next designs as --predict
computes."""
import json

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import said, write_case
from modules.cli import main
from modules.config import load_config
from modules.models.conditioners import ConditionerSpec, build_conditioner
from modules.models.feature_frame import REFERENCE_SPREAD, frame_targets
from modules.models.gaussian_process import fit_gpr
from modules.training.feature_frame_fit import fit_feature_frame, into_frame


def blob(height, width, centre, sigmas, angle, periodic):
    """[H, W]: a Gaussian with axes sigmas (grid cells) turned by angle, centred at centre = (x, y) in cells (x along
    a row), on a periodic grid at the nearest image."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = columns - centre[0], rows - centre[1]
    if periodic:
        dx, dy = (dx + width / 2) % width - width / 2, (dy + height / 2) % height - height / 2
    along, across = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    return np.exp(-along ** 2 / (2 * sigmas[0] ** 2) - across ** 2 / (2 * sigmas[1] ** 2))


def turning_blobs(n, steps, height, width, seed=0):
    """([n, steps, H * W] float32, parameters [n, 5]): a blob that starts at (x0, y0), moves along theta and, as it
    goes, stretches by 1 + s t along one axis, shrinks across it and turns at omega (the benchmark's shear family, on
    a small periodic grid)."""
    rng = np.random.default_rng(seed)
    parameters = np.stack([rng.uniform(0, width, n), rng.uniform(0, height, n), rng.uniform(0, 2 * np.pi, n),
                           rng.uniform(0.5, 2.0, n), rng.uniform(-2, 2, n)], axis=1)
    sigma = 0.1 * min(height, width)
    fields = np.zeros((n, steps, height * width))
    for design, (x0, y0, theta, stretch, omega) in enumerate(parameters):
        for step, t in enumerate(np.linspace(0, 1, steps)):
            centre = (x0 + 0.3 * width * t * np.cos(theta), y0 + 0.3 * height * t * np.sin(theta))
            sigmas = (sigma * (1 + stretch * t), sigma / np.sqrt(1 + stretch * t))
            fields[design, step] = blob(height, width, centre, sigmas, theta + omega * t, True).ravel()
    return fields.astype(np.float32), parameters


def frame_model(height, width, n_vars, periodic, modes=1, n_steps=1, n_params=2, gp_points=1):
    spec = ConditionerSpec("feature_frame", (n_params,), 4, (), gp_points=gp_points,
                           field_shape=(n_steps, n_vars * height * width, n_vars),
                           frame=(height, width, modes, int(periodic)))
    return build_conditioner(spec).eval()


def moments(field):
    """(centroid (x, y), covariance [2, 2]) of a non-negative [H, W] field, positions in cells."""
    rows, columns = np.mgrid[0:field.shape[0], 0:field.shape[1]].astype(np.float64)
    total = field.sum()
    centre = np.array([(field * columns).sum(), (field * rows).sum()]) / total
    offsets = np.stack([columns - centre[0], rows - centre[1]])
    return centre, np.einsum("ahw,bhw,hw->ab", offsets, offsets, field) / total


@pytest.mark.parametrize("periodic, centre", [(True, (30.6, 0.8)), (False, (12.3, 9.7))])
def test_a_snapshot_in_its_frame_sits_centred_and_round_and_is_drawn_back_where_it_was(periodic, centre):
    """On a 24 x 32 grid (not square: x and y cannot be swapped unseen), a turned, stretched blob on a background,
    with a second variable of opposite sign: its frame's centroid is the blob's centre (across both edges of the
    periodic grid), its covariance the blob's; in its frame it sits at the grid's centre with the reference spread
    in every direction; drawn back from its frame it is the snapshot again."""
    height, width, sigmas, angle = 24, 32, (3.5, 1.5), 0.6
    shape = blob(height, width, centre, sigmas, angle, periodic)
    snapshot = np.stack([0.3 + shape, 1 - 2 * shape])
    found, log_covariance, moved = into_frame(snapshot, periodic)

    assert found == pytest.approx(centre, abs=0.02)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    covariance = turn @ np.diag(np.square(sigmas)) @ turn.T + np.eye(2) / 12  # the moments' cell variance added
    spread = REFERENCE_SPREAD * min(height, width)
    variances, axes = np.linalg.eigh(covariance / spread ** 2)
    logarithm = (axes * np.log(variances)) @ axes.T
    assert log_covariance == pytest.approx([logarithm[0, 0], logarithm[0, 1], logarithm[1, 1]], abs=0.02)

    in_frame_centre, in_frame_covariance = moments(moved[0] - 0.3)
    assert in_frame_centre == pytest.approx([(width - 1) / 2, (height - 1) / 2], abs=0.05)
    assert np.abs(in_frame_covariance / spread ** 2 - np.eye(2)).max() < 0.1  # round, of the reference spread
    assert np.allclose(moved[1], 1 - 2 * (moved[0] - 0.3), atol=1e-6)  # the variables share the frame

    model = frame_model(height, width, 2, periodic)
    with torch.no_grad():
        model.mode_mean.copy_(torch.as_tensor(moved.reshape(-1)))
        model.background.copy_(torch.tensor([0.3, 1.0]))
        back = model.drawn_back(torch.tensor(found)[None, None], torch.tensor(log_covariance)[None, None],
                                torch.zeros(1, 1, 1))[0, 0].numpy()
    assert np.linalg.norm(back - snapshot.reshape(-1)) < 0.01 * np.linalg.norm(snapshot)


class Constant(torch.nn.Module):
    """Stands in for the GPs: gives the same numbers for every design."""

    def __init__(self, numbers):
        super().__init__()
        self.register_buffer("value", torch.as_tensor(numbers, dtype=torch.float32))

    def forward(self, params):
        return self.value.expand(len(params), -1)


@pytest.mark.parametrize("periodic", [True, False])
def test_a_feature_moving_across_the_edge_is_predicted_as_moves_from_its_first_place(periodic):
    """On a periodic grid what the GPs predict of a feature's place is the first step's angle (cosine and sine) and
    then each step's move from there, unwrapped through the steps: continuous while the feature crosses an edge (its
    angle's cosine and sine turn fast with the parameters when it moves far). Decoded, the places are the centroids
    again (on the grid: modulo its size); off a periodic grid the places are the centroids in grid sizes."""
    width, height, steps = 32, 24, 5
    x = np.array([29.0, 31.5, 33.9, 36.5, 39.0])  # crosses the right edge between the second and third step
    y = np.array([3.0, 2.0, 0.5, -1.0, -2.5])     # crosses the bottom edge (row 0) between the third and fourth
    centres = np.stack([x % width, y % height], axis=1)[None] if periodic else np.stack([x - 10, y + 5], 1)[None]
    log_covariances = np.tile([0.1, -0.2, 0.3], (1, steps, 1))
    targets = frame_targets(centres, log_covariances, np.zeros((1, steps, 1)), (width, height), periodic)
    if periodic:
        moves = targets[0, 4:].reshape(steps, 6)[:, :2] * [width, height]
        assert moves == pytest.approx(np.stack([x - x[0], y - y[0]], 1))  # no jump at the edges
        assert targets[0, :4] == pytest.approx([np.cos(2 * np.pi * 29 / 32), np.cos(2 * np.pi * 3 / 24),
                                                np.sin(2 * np.pi * 29 / 32), np.sin(2 * np.pi * 3 / 24)])
    model = frame_model(height, width, 1, periodic, n_steps=steps)
    assert model.numbers.weights.shape[1] == targets.shape[1]
    model.numbers = Constant(targets[0])
    taken = {}
    model.drawn_back = lambda centres, logs, coefficients: taken.update(centres=centres, logs=logs) or centres
    model(torch.zeros(2, 2))
    decoded = taken["centres"].numpy()
    expected = centres[0] % [width, height] if periodic else centres[0]
    assert decoded.shape == (2, steps, 2)
    assert (decoded[1] % [width, height] if periodic else decoded[1]) == pytest.approx(expected, abs=1e-4)
    assert taken["logs"][0].numpy() == pytest.approx(log_covariances[0])


def training_case(fields, parameters, n_train):
    """What fit_feature_frame reads of a ConditionerCase: training designs 0..n_train-1 and their standardised
    parameters."""
    from types import SimpleNamespace
    train = np.arange(n_train)

    def batches(order):
        for positions in order:
            yield torch.as_tensor(fields[train[positions]])
    standardised = (parameters - parameters[:n_train].mean(0)) / parameters[:n_train].std(0)
    return SimpleNamespace(fields=SimpleNamespace(train_indices=train, train=SimpleNamespace(batches=batches)),
                           conditions=torch.as_tensor(standardised, dtype=torch.float32))


def test_it_predicts_a_feature_that_turns_and_stretches_far_better_than_pod_and_a_gp():
    """On 60 designs of the turning, stretching blob (48 to fit, 12 to predict) its error on the new designs is under
    a third of POD + GPR's (the same GP, on as many POD coefficients of the whole field as the frame's numbers of a
    design, within rounding), and it reproduces its training designs closely."""
    height, width, steps, n_train = 20, 24, 5, 48
    fields, parameters = turning_blobs(60, steps, height, width)
    case = training_case(fields, parameters, n_train)
    config = type("Config", (), {"grid": (height, width), "n_steps_used": steps, "n_nodes_used": height * width,
                                 "n_vars": 1, "grid_periodic": 1, "lc_batch_size": 16, "seed": 0})()
    spec = ConditionerSpec("mlp", (5,), 8, (16,))
    model, fitted_spec = fit_feature_frame(spec, case, config)
    assert fitted_spec.kind == "feature_frame" and fitted_spec.frame[:2] == (height, width)
    assert fitted_spec.gp_points == n_train and fitted_spec.output_dim == 8  # what a carried spread is fitted on

    def errors(predicted, designs):
        simulated = fields[designs]
        return (np.linalg.norm((predicted - simulated).reshape(len(designs), -1), axis=1)
                / np.linalg.norm(simulated.reshape(len(designs), -1), axis=1))

    new = np.arange(n_train, 60)
    with torch.no_grad():
        predicted = model(case.conditions[new]).numpy()
        refitted = model(case.conditions[:8]).numpy()
    flat = fields[:n_train].reshape(n_train, -1).astype(np.float64)
    mean = flat.mean(0)
    _, _, modes = np.linalg.svd(flat - mean, full_matrices=False)
    rank = model.numbers.weights.shape[1]  # as many modes as the frame's GPs
    modes = modes[:rank]
    inputs = case.conditions.double().numpy()
    coefficients = np.stack([fit_gpr(inputs[:n_train], (flat - mean) @ mode, 0).predict(inputs[new]) for mode in modes],
                            1)
    pod_gpr = (mean + coefficients @ modes).reshape(len(new), steps, -1)
    assert errors(predicted, new).mean() < errors(pod_gpr, new).mean() / 3
    assert errors(refitted, np.arange(8)).mean() < 0.05


def test_feature_frame_gp_without_a_grid_is_noted(case):
    condition = case / "input_data" / "condition.txt"
    condition.write_text(condition.read_text() + "input_type csv\nparam_dir p.csv\nfeature_frame_gp 1\n"
                         "grid_periodic 1\n")
    with said() as notes:
        load_config()
    assert any("'feature_frame_gp' has no effect because input_type is not csv or grid_shape is not given" in note
               for note in notes)
    assert any("'grid_periodic' has no effect because grid_shape is not given" in note for note in notes)


@pytest.mark.slow
def test_a_run_keeps_it_where_it_predicts_best_and_it_predicts_draws_suggests_and_exports(tmp_path, monkeypatch,
                                                                                         capsys):
    """On the turning blob (a periodic grid), with a GP on the latents beside it, the run keeps the feature-frame GP
    (it predicts the validation designs better than the MLP and the GP); the evaluation of the saved file finds the
    error the choice measured; it carries the GP's spread, calibrated on its own errors, so --samples and --suggest
    work; the ONNX export gives --predict's fields."""
    monkeypatch.chdir(tmp_path)
    height, width, steps = 12, 14, 4
    fields, parameters = turning_blobs(40, steps, height, width)
    write_case(tmp_path, n=40, t=steps, m=height * width, epochs=2, data=fields,
               extra=f"grid_shape {height} {width}\ngrid_periodic 1\ninput_type csv\nparam_dir "
                     "input_data/parameters.csv\nn_epoch 1\nfield_conditioner_epochs 0\nlatent_rbf 0\nplot 2\n")
    names = "x0,y0,theta,s,omega"
    np.savetxt(tmp_path / "input_data" / "parameters.csv", parameters, delimiter=",", header=names, comments="",
               fmt="%.17g")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "Fitting the feature-frame GP on the 30 training designs" in out
    assert "Kept the feature-frame GP as the conditioner" in out
    report = json.loads((tmp_path / "output" / "prediction_report.json").read_text())
    choice = report["conditioner_choice"]
    errors = choice["validation_relative_l2"]
    assert choice["kept"] == "feature_frame" and set(errors) == {"mlp", "gpr", "feature_frame"}
    assert errors["feature_frame"] < min(errors["mlp"], errors["gpr"]) and choice["spread_from"] == "gpr"
    assert report["conditioner"] == "feature-frame GP"
    assert report["conditioner_val"] == pytest.approx(errors["feature_frame"], rel=1e-4)  # the saved file's
    saved = torch.load(tmp_path / "model_save" / "latent_conditioner", weights_only=True)
    assert saved["spec"]["frame"][:2] == [height, width] and saved["spec"]["frame"][3] == 1
    assert saved["spec"]["spread_kind"] == "gpr" and saved["calibration"]["source"] == "field_gp"
    spent = json.loads((tmp_path / "output" / "evaluation.json").read_text())["time_spent"]["parts"]
    assert spent["feature-frame GP"]["kept"] is True and spent["GP on latents"]["kept"] is True  # it carries it

    np.savetxt("new.csv", parameters[:3], delimiter=",", header=names, comments="")
    assert main(["--predict=new.csv", "--out=p.npy"]) == 0 and main(["--export=s.onnx"]) == 0
    session = onnxruntime.InferenceSession("s.onnx", providers=["CPUExecutionProvider"])
    exported = session.run(["fields"], {"parameters": parameters[:3].astype(np.float32)})[0]
    expected = np.load("p.npy")
    assert exported.shape == expected.shape == (3, steps, height * width) and np.isfinite(expected).all()
    assert np.abs(exported - expected).max() < 1e-4 * np.abs(expected).max()
    assert main(["--predict=new.csv", "--out=q.npy", "--samples=4"]) == 0 and main(["--suggest=2"]) == 0
    assert np.array_equal(np.load("q.npy"), expected)  # the prediction is its own, draws or not
    std = np.load("q_std.npy")
    assert std.shape == expected.shape and np.isfinite(std).all() and std.max() > 0
    assert (tmp_path / "output" / "suggested_designs.csv").read_text().count("\n") == 3
