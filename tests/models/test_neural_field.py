"""The neural-field conditioner (field_conditioner_epochs): design parameters and time -> a code that phase-shifts
a sine network over the node coordinates, trained on the fields themselves. What it promises: its values at some
nodes are exactly those of the whole field, decoded in bounded pieces and in float32; it is tried only where the
nodes' positions are known and kept only when it predicts the validation designs better; a kept one is evaluated,
predicts and exports as --predict computes; and what it cannot do (--samples, --suggest) is refused in one line."""
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from conftest import REPO, Died, as_version_1, die_on_call, said, write_case, write_conditions
from modules.cli import main
from modules.config import load_config
from modules.data.field_layout import FieldLayout, node_positions
from modules.errors import InputError
from modules.models import neural_field
from modules.models.conditioners import ConditionerSpec, build_conditioner
from modules.models.neural_field import node_columns
from modules.training.field_fitter import SampledFieldFit, sampled_pass


def training_case(fields, conditions, read=None):
    """What fit_neural_field and sampled_pass read of a ConditionerCase: training designs 0..n-1 whose scaled
    fields [n, T, M] are read by position (each batch's positions appended to read), and the conditions."""
    from types import SimpleNamespace

    def batches(order):
        for positions in order:
            if read is not None:
                read.append(positions.tolist())
            yield fields[torch.as_tensor(positions)]
    return SimpleNamespace(fields=SimpleNamespace(train_indices=np.arange(len(fields)),
                                                  train=SimpleNamespace(batches=batches)), conditions=conditions)


def field_conditioner(n_params=3, n_steps=6, n_nodes=30, n_vars=2):
    torch.manual_seed(0)
    spec = ConditionerSpec(kind="neural_field", input_shape=(n_params,), output_dim=0, filters=(),
                           field_shape=(n_steps, n_nodes, n_vars))
    network = build_conditioner(spec)
    network.field.set_coordinates(np.random.default_rng(0).uniform(-3, 5, (n_nodes // n_vars, 2)))
    return network.eval()


def test_its_values_at_some_nodes_are_exactly_those_nodes_of_the_whole_field():
    network = field_conditioner()
    params, nodes = torch.randn(4, 3), torch.tensor([0, 4, 5, 14])
    whole = network(params).detach()
    some = network(params, nodes).detach()
    assert whole.shape == (4, 6, 30) and some.shape == (4, 6, 8)
    columns = node_columns(nodes, 30, 2)  # both variables at those nodes, variable by variable
    assert columns.tolist() == [0, 4, 5, 14, 15, 19, 20, 29]
    assert torch.allclose(some, whole[..., columns], rtol=1e-5, atol=1e-6)
    each = torch.stack([nodes, nodes.flip(0), nodes, nodes.roll(1), nodes, nodes]).expand(4, 6, 4)  # [B, T, P]
    per_row = network(params, each).detach()
    assert per_row.shape == (4, 6, 8) and torch.allclose(per_row, whole.gather(2, node_columns(each, 30, 2)),
                                                        rtol=1e-5, atol=1e-6)
    assert torch.allclose(per_row[:, 1, :4], whole[:, 1, nodes.flip(0)], rtol=1e-5, atol=1e-6)


def test_a_designs_field_does_not_depend_on_the_batch_or_on_decoding_in_pieces(monkeypatch):
    network = field_conditioner()
    params = torch.randn(5, 3)
    whole = network(params).detach()  # with gradients: one piece
    monkeypatch.setattr(neural_field, "DECODE_BYTES", 4 * 2 * neural_field.WIDTH * 15 * 7)  # 7 rows a piece
    with torch.no_grad():
        assert torch.allclose(network(params), whole, atol=1e-6)
        assert torch.allclose(network(params[2:3]), whole[2:3], atol=1e-6)


def test_decoding_many_designs_without_gradients_holds_about_one_pieces_activations():
    """In a fresh process whose heap serves large blocks (glibc does after one is freed), 150 designs x 24 steps x
    2304 nodes decoded in pieces: the peak grows by tens of MB, not by a piece's activations per piece (4 GB when
    each piece's small result sat between the next pieces' temporaries)."""
    script = """
import resource, sys, numpy as np, torch
from modules.models.conditioners import ConditionerSpec, build_conditioner
spec = ConditionerSpec(kind="neural_field", input_shape=(6,), output_dim=0, filters=(), field_shape=(24, 2304, 1))
network = build_conditioner(spec).eval()
network.field.set_coordinates(np.random.default_rng(0).uniform(0, 1, (2304, 2)))
block = np.ones(3 * 2 ** 20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    network(torch.randn(150, 6))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * (1 if sys.platform == "darwin" else 1024))
"""
    grown = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert int(grown.stdout) < 300 * 2 ** 20  # the 150 fields themselves are 33 MB


def test_it_decodes_in_float32_under_mixed_precision():
    network = field_conditioner()
    codes = torch.randn(2, 6, neural_field.CODE).bfloat16()
    with torch.no_grad():
        plain = network.field(codes.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = network.field(codes)
            whole = network(torch.randn(2, 3))
    assert mixed.dtype == whole.dtype == torch.float32 and torch.equal(mixed, plain)


def test_it_reads_where_the_nodes_are():
    network = field_conditioner()
    params = torch.randn(2, 3)
    with torch.no_grad():
        before = network(params)
        network.field.set_coordinates(np.random.default_rng(1).uniform(0, 1, (15, 2)))
        assert not torch.allclose(network(params), before)
    coordinates = network.field.coordinates
    assert coordinates.min() == -1 and coordinates.max() == 1  # each axis onto [-1, 1], SIREN's range


def test_the_frame_modulation_maps_the_coordinates_affinely_and_shifts_only_the_deeper_phases():
    """FRAME's map (I + D(c)) x + e(c) of the coordinates: where the code sets D and e, the field at x is the one
    the same network with D and e at zero draws at (I + D) x + e. The code shifts the phases of the deeper layers
    only (the frame's translation moves the first)."""
    from modules.models.neural_field import FRAME, LAYERS, WIDTH, NeuralFieldNodes
    torch.manual_seed(0)
    points = torch.rand(30, 2).numpy()
    frame = NeuralFieldNodes(3, 30, 1, modulation=FRAME)
    frame.set_coordinates(points)
    assert frame.shifts.out_features == WIDTH * (LAYERS - 1)
    codes = torch.randn(2, 4, 3)
    with torch.no_grad():
        moved = NeuralFieldNodes(3, 30, 1, modulation=FRAME)
        moved.load_state_dict(frame.state_dict())
        before = frame(codes)
        frame.translation.bias.copy_(torch.tensor([0.3, -0.2]))
        frame.warp.bias.copy_(torch.tensor([0.25, 0.1, 0.0, -0.2]))  # row-major D
        matrix = torch.eye(2) + frame.warp.bias.view(2, 2)
        moved.coordinates.copy_(moved.coordinates @ matrix.T + torch.tensor([0.3, -0.2]))
        assert torch.allclose(frame(codes), moved(codes), atol=1e-5)
        assert not torch.allclose(frame(codes), before, atol=1e-2)


def test_grid_positions_are_column_and_row_and_a_line_of_nodes_has_none():
    assert node_positions(FieldLayout(1, grid_shape=(2, 3))).tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1],
                                                                          [2, 1]]  # node iy * W + ix
    assert node_positions(FieldLayout(1)) is None


def csv_case(folder, extra, n=16):
    rng = np.random.default_rng(0)
    parameters = np.stack([rng.uniform(0.5, 2.0, n), rng.uniform(0, np.pi, n)], axis=1)
    write_case(folder, n=n, t=6, m=20, epochs=2, extra="input_type csv\nparam_dir input_data/parameters.csv\n"
               + extra)
    write_conditions(folder, parameters)
    return parameters


@pytest.mark.slow
def test_without_node_positions_it_is_not_tried_and_the_run_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv_case(tmp_path, "n_epoch 2\n")
    assert main([]) == 0
    assert "note: no neural-field conditioner: where the nodes are is not known" in capsys.readouterr().out
    choice = json.loads((tmp_path / "output" / "prediction_report.json").read_text())["conditioner_choice"]
    assert "neural_field" not in choice["validation_relative_l2"]


def test_field_conditioner_epochs_without_a_conditioner_is_noted(case):
    condition = case / "input_data" / "condition.txt"
    condition.write_text(condition.read_text() + "field_conditioner_epochs 10\n")
    with said() as notes:
        load_config()
    assert len(notes) == 1 and "'field_conditioner_epochs' has no effect because input_type is none" in notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("carried", [None, "gpr", "rbf"])
def test_a_neural_field_that_predicts_better_is_kept_evaluated_predicted_and_exported(carried, tmp_path, monkeypatch,
                                                                                      capsys):
    """Against an MLP of one epoch (about the mean field) the neural field trained 100 passes is kept: the
    evaluation, --predict and the ONNX export then all run through it and agree. Alone, it has no uncertainty model:
    --samples and --suggest are refused in one line each. With a GP or a spline fitted beside it (here made to lose
    the contest, whatever this tiny case would say), it carries that one's spread: calibrated on its own errors,
    --samples and --suggest work, and the export is the same field."""
    from modules.training import conditioner_choice
    monkeypatch.chdir(tmp_path)
    fitted = {None: "latent_gp 0\nlatent_rbf 0\n", "gpr": "latent_gp 1\nlatent_rbf 0\n",
              "rbf": "latent_gp 0\nlatent_rbf 1\n"}[carried]
    parameters = csv_case(tmp_path, f"grid_shape 4 5\nn_epoch 1\n{fitted}field_conditioner_epochs 100\nplot 1\n"
                                    "feature_frame_gp 0\n")
    real = conditioner_choice.validation_field_errors
    monkeypatch.setattr(conditioner_choice, "validation_field_errors", lambda networks, *args: {
        name: error * (1 if name in ("mlp", "neural_field") else 100) for name, error in real(networks, *args).items()})
    assert main([]) == 0
    said = capsys.readouterr().out
    assert "a neural-field conditioner on the fields of the 12 training designs, from their parameters (100 passes, " \
           "every node of each" in said
    assert "Kept the neural field as the conditioner" in said
    report = json.loads((tmp_path / "output" / "prediction_report.json").read_text())
    choice = report["conditioner_choice"]
    errors = choice["validation_relative_l2"]
    assert choice["kept"] == "neural_field" and set(errors) == {"mlp", "neural_field", *([carried] if carried else [])}
    assert report["conditioner"] == "neural field" and errors["neural_field"] < errors["mlp"]
    assert report["conditioner_val"] == pytest.approx(errors["neural_field"], rel=1e-4)  # the evaluation's own pass
    assert choice.get("spread_from") == carried
    saved = torch.load(tmp_path / "model_save" / "latent_conditioner", weights_only=True)
    assert saved["spec"]["kind"] == "neural_field" and saved["spec"]["field_shape"] == [6, 20, 1]
    assert saved["spec"]["spread_kind"] == (carried or "") and saved["spec"]["field_modulation"] == "frame"
    assert saved["state_dict"]["field.coordinates"].shape == (20, 2)
    with Image.open(tmp_path / "output" / "conditioner_loss_curves.png") as image:  # the plots draw it too
        assert image.format == "PNG"
    uncertainty = json.loads((tmp_path / "output" / "evaluation.json").read_text())["uncertainty"]
    if carried is None:
        assert saved["calibration"] is None
        assert uncertainty["note"].startswith("no uncertainty: the neural field kept as the conditioner")
    else:
        source = {"gpr": "field_gp", "rbf": "field_rbf"}[carried]
        assert saved["calibration"]["source"] == uncertainty["source"] == source

    np.savetxt("new.csv", parameters[:3], delimiter=",", header="amplitude,phase", comments="")
    assert main(["--predict=new.csv", "--out=p.npy"]) == 0 and main(["--export=s.onnx"]) == 0
    session = onnxruntime.InferenceSession("s.onnx", providers=["CPUExecutionProvider"])
    exported = session.run(["fields"], {"parameters": parameters[:3].astype(np.float32)})[0]
    expected = np.load("p.npy")
    assert exported.shape == expected.shape == (3, 6, 20) and np.isfinite(expected).all()
    assert np.abs(exported - expected).max() < 1e-4 * np.abs(expected).max()

    capsys.readouterr()
    asked = (["--predict=new.csv", "--out=q.npy", "--samples=4"], ["--suggest=2"])
    if carried is None:
        for flags in asked:
            assert main(flags) == 2
            error = capsys.readouterr().err.strip().splitlines()
            assert len(error) == 1 and "latent_conditioner" in error[0] and "predicts the field itself" in error[0]
            assert "latent_gp 1 or latent_rbf 1" in error[0]
        assert not (tmp_path / "q.npy").exists() and not (tmp_path / "output" / "suggested_designs.csv").exists()
        return
    for flags in asked:
        assert main(flags) == 0
    assert np.array_equal(np.load("q.npy"), expected)  # the prediction is the neural field's, draws or not
    std = np.load("q_std.npy")
    assert std.shape == expected.shape and np.isfinite(std).all() and std.max() > 0
    assert (tmp_path / "output" / "suggested_designs.csv").read_text().count("\n") == 3


def test_a_conditioner_file_saved_before_the_neural_field_reads_back(tmp_path):
    from modules.storage.model_files import load_conditioner, save_conditioner
    spec = ConditionerSpec(kind="mlp", input_shape=(3,), output_dim=8, filters=(16,))
    save_conditioner(tmp_path / "old", build_conditioner(spec), spec, {})
    payload = as_version_1(torch.load(tmp_path / "old", weights_only=True))
    del payload["spec"]["field_shape"]
    torch.save(payload, tmp_path / "old")
    _, facts = load_conditioner(tmp_path / "old")
    assert ConditionerSpec.from_dict(facts["spec"]) == dataclasses.replace(spec, field_shape=())


def test_each_pass_reads_every_training_snapshot_at_random_nodes_of_its_own():
    """sampled_pass (what the neural-field conditioner and the snapshot codec train on): snapshot s is time step
    s % T of training design s // T, read at its own node indices in every variable, and encoded whole where asked; a
    variable with no more nodes than those asked for is read whole."""
    n_train, n_steps, n_nodes, n_vars = 5, 4, 30, 2
    fields = torch.randn(n_train, n_steps, n_nodes)
    read = []
    source = training_case(fields, torch.zeros(n_train, 2), read).fields.train
    generator = torch.Generator().manual_seed(0)
    nodes, values, encoded = sampled_pass(source, n_train, (n_steps, n_nodes, n_vars), 6, 2, generator,
                                                       "cpu", encode=lambda batch: batch.sum(2, keepdim=True))
    assert read == [[0, 1], [2, 3], [4]]  # every training design once, in batches of 2
    assert nodes.shape == (n_train * n_steps, 6) and values.shape == (n_train * n_steps, 12)
    assert nodes.max() < n_nodes // n_vars and len(set(map(tuple, nodes.tolist()))) > n_train  # per snapshot
    for snapshot in (0, 7, 19):
        design, step = divmod(snapshot, n_steps)
        assert torch.equal(values[snapshot], fields[design, step, node_columns(nodes[snapshot], n_nodes, n_vars)])
    assert torch.allclose(encoded, fields.sum(2, keepdim=True).flatten(0, 1))  # the whole snapshot, in order
    nodes, values, encoded = sampled_pass(source, n_train, (n_steps, n_nodes, n_vars), 15, 2, generator,
                                                       "cpu")
    assert nodes is None and torch.equal(values, fields.flatten(0, 1)) and encoded is None


def test_the_field_is_fitted_in_its_training_values_units():
    """set_value_statistics: each variable's output is the sine network's times the training values' spread plus
    their mean, so the network fits standardised values whatever the scaled range."""
    network = field_conditioner()
    params = torch.randn(3, 3)
    with torch.no_grad():
        plain = network(params)  # offset 0, spread 1
        values = torch.cat([torch.full((50, 15), 2.0), torch.full((50, 15), -1.0)], dim=1)
        values[:25] += torch.cat([torch.full((25, 15), 3.0), torch.full((25, 15), 0.5)], dim=1)
        network.field.set_value_statistics(values)
        means, spreads = torch.tensor([3.5, -0.75]), torch.tensor([1.5, 0.25]) * (750 / 749) ** 0.5
        assert torch.allclose(network.field.value_offset, means) and torch.allclose(network.field.value_scale, spreads)
        scaled = network(params)
    expected = plain.unflatten(2, (2, 15)) * spreads[:, None] + means[:, None]
    assert torch.allclose(scaled, expected.flatten(2), atol=1e-5)


def test_a_neural_field_saved_before_its_value_statistics_reads_back_unscaled(tmp_path):
    from modules.storage.model_files import load_conditioner, save_conditioner
    spec = ConditionerSpec(kind="neural_field", input_shape=(3,), output_dim=0, filters=(), field_shape=(6, 30, 2))
    network = field_conditioner()
    params = torch.randn(2, 3)
    with torch.no_grad():
        plain = network(params)
        network.field.set_value_statistics(torch.randn(10, 30) * 3 + 1)
    save_conditioner(tmp_path / "old", network, spec, {})
    payload = as_version_1(torch.load(tmp_path / "old", weights_only=True))
    del payload["state_dict"]["field.value_offset"], payload["state_dict"]["field.value_scale"]
    torch.save(payload, tmp_path / "old")
    loaded, _ = load_conditioner(tmp_path / "old")
    assert loaded.field.value_offset.tolist() == [0, 0] and loaded.field.value_scale.tolist() == [1, 1]
    with torch.no_grad():
        assert torch.allclose(loaded(params), plain, atol=1e-6)
    del payload["state_dict"]["field.out.weight"]  # a missing weight is still refused
    torch.save(payload, tmp_path / "old")
    with pytest.raises(InputError, match="is not a complete latent conditioner"):
        load_conditioner(tmp_path / "old")


def test_trained_at_sampled_nodes_it_fits_every_node_of_its_training_designs():
    """fit_neural_field where each variable has more nodes than a pass samples (two variables): trained only on
    random nodes, it predicts every node of its training designs far better than their mean field does."""
    from types import SimpleNamespace

    from modules.training.conditioner_choice import fit_neural_field
    n_train, n_steps, per_variable = 12, 4, 20
    rng = np.random.default_rng(0)
    params = torch.tensor(rng.uniform(-1, 1, (n_train, 2)), dtype=torch.float32)
    x = torch.linspace(0, 1, per_variable)
    t = torch.linspace(0, 1, n_steps)[:, None]
    first = torch.sin(3 * x + params[:, 0, None, None] + t)                                  # [n, T, 20]
    fields = torch.cat([first, 0.5 * first * params[:, 1, None, None]], dim=2)               # [n, T, 40]
    case = training_case(fields, params)
    spec = ConditionerSpec(kind="neural_field", input_shape=(2,), output_dim=0, filters=(),
                           field_shape=(n_steps, 2 * per_variable, 2))
    config = SimpleNamespace(seed=0, batch_size=5)
    network, _ = fit_neural_field(spec, np.stack([x.numpy(), np.zeros(20)], 1), case, config,
                                  SampledFieldFit(passes=150, nodes=8))
    with torch.no_grad():
        predicted = network(params)
    error = ((predicted - fields) ** 2).mean()
    assert error < 0.05 * ((fields - fields.mean(0)) ** 2).mean()
    per_variable_values = fields.unflatten(2, (2, per_variable)).transpose(0, 2).flatten(1)   # [2, n * T * 20]
    assert torch.allclose(network.field.value_offset, per_variable_values.mean(1), atol=0.1)  # from a pass's sample
    assert torch.allclose(network.field.value_scale, per_variable_values.std(1), rtol=0.2)
    assert not network.training


def image_case(folder, extra, n=16):
    """csv_case's designs given by their images (conftest.design_image, 16 x 16) instead of the CSV."""
    rng = np.random.default_rng(0)
    parameters = np.stack([rng.uniform(0.5, 2.0, n), rng.uniform(0, np.pi, n)], axis=1)
    write_case(folder, n=n, t=6, m=20, epochs=2, extra="input_type image\nparam_dir images\nimage_size 16\n" + extra)
    write_conditions(folder, parameters)
    return parameters


@pytest.mark.slow
@pytest.mark.parametrize("winner", ["neural_field", "gpr"])
def test_on_images_the_neural_field_trains_an_encoder_whose_embedding_the_gp_and_spline_read(winner, tmp_path,
                                                                                             monkeypatch, capsys):
    """Designs given by images: the neural field reads them through a CNN encoder trained with it, then a GP and a
    thin-plate spline are fitted on that encoder's embedding; all four are candidates. Whichever is kept (here made
    to win, whatever this tiny case would say) predicts from a folder of images as the evaluation scored it, draws
    --samples around its prediction, exports to ONNX as --predict computes, and places a training image inside what
    was learnt and pixel noise outside, in its own features."""
    from modules.training import conditioner_choice
    monkeypatch.chdir(tmp_path)
    # 28 designs: a spline on the 16 numbers of the embedding needs more than 17 training designs
    image_case(tmp_path, "grid_shape 4 5\nn_epoch 1\nfield_conditioner_epochs 20\n", n=28)
    real = conditioner_choice.validation_field_errors
    factor = {"neural_field": 3, winner: 1}  # a losing neural field would be stopped before the GP's fit
    monkeypatch.setattr(conditioner_choice, "validation_field_errors", lambda networks, *args: {
        name: error * factor.get(name, 100) for name, error in real(networks, *args).items()})
    assert main([]) == 0
    said = capsys.readouterr().out
    assert "neural-field conditioner on the fields of the 21 training designs, from their images through a CNN " \
           "encoder (20 passes" in said
    assert "Fitting the GP on latents (16 latent numbers) on the 21 training designs, from the neural field's " \
           "embedding of their images" in said
    report = json.loads((tmp_path / "output" / "prediction_report.json").read_text())
    choice = report["conditioner_choice"]
    assert set(choice["validation_relative_l2"]) == {"cnn", "neural_field", "gpr", "rbf"} and choice["kept"] == winner
    assert report["conditioner_val"] == pytest.approx(choice["validation_relative_l2"][winner], rel=1e-4)
    saved = torch.load(tmp_path / "model_save" / "latent_conditioner", weights_only=True)
    assert saved["spec"]["kind"] == winner and saved["spec"]["encoder"] == "cnn"
    carried = choice.get("spread_from")  # a kept neural field carries the GP or spline on its own embedding
    assert saved["calibration"]["source"] == {"gpr": "field_gp", "rbf": "field_rbf", None: "gp"}[carried]
    assert (carried in ("gpr", "rbf")) == (winner == "neural_field") and saved["spec"]["spread_kind"] == (carried or "")
    spent = json.loads((tmp_path / "output" / "evaluation.json").read_text())["time_spent"]
    assert spent["parts"]["neural field"]["kept"]  # a GP on its embedding needs the neural field's fit: kept time
    assert not spent["parts"]["CNN"]["kept"]

    (tmp_path / "new").mkdir()
    for number in (2, 5, 7):
        shutil.copy(tmp_path / "images" / f"design_{number:03d}.png", tmp_path / "new")
    assert main(["--predict=new", "--out=p.npy", "--samples=4"]) == 0 and main(["--export=s.onnx"]) == 0
    expected, std = np.load("p.npy"), np.load("p_std.npy")
    assert expected.shape == std.shape == (3, 6, 20) and np.isfinite(expected).all() and std.max() > 0
    images = np.stack([np.asarray(Image.open(tmp_path / "new" / name), dtype=np.float32)[None] / 255
                       for name in sorted(p.name for p in (tmp_path / "new").iterdir())])
    session = onnxruntime.InferenceSession("s.onnx", providers=["CPUExecutionProvider"])
    exported = session.run(["fields"], {"images": images})[0]
    assert np.abs(exported - expected).max() < 1e-4 * np.abs(expected).max()

    (tmp_path / "check").mkdir()
    train = json.loads((tmp_path / "model_save" / "split.json").read_text())["train"]
    shutil.copy(tmp_path / "images" / f"design_{train[0] + 1:03d}.png", tmp_path / "check" / "a_training.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(
        tmp_path / "check" / "b_noise.png")
    assert main(["--predict=check", "--out=check.npy"]) == 0
    placed = json.loads((tmp_path / "check_report.json").read_text())["designs"]
    assert [(row["design"], row["outside"]) for row in placed] == [("a_training.png", False), ("b_noise.png", True)]
    assert placed[0]["spaces"]["features"]["distance_ratio"] == pytest.approx(0, abs=1e-6)


def test_an_image_encoders_steps_draw_their_snapshots_from_a_few_designs_and_every_snapshot_once_a_pass():
    from modules.training.field_fitter import step_batches
    fit = SampledFieldFit(passes=1, snapshots=64, designs_per_step=16)
    batches = step_batches(fit, 40, 24, torch.Generator().manual_seed(0))
    every = torch.cat(batches)
    assert sorted(every.tolist()) == list(range(40 * 24))
    assert max(len(batch) for batch in batches) == 64
    assert max(len((batch // 24).unique()) for batch in batches) <= 16
    across = step_batches(dataclasses.replace(fit, designs_per_step=0), 40, 24, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat(across), torch.randperm(40 * 24, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_an_image_neural_field_reads_images_through_its_encoder_and_saves_and_loads_as_any_conditioner(encoder,
                                                                                                       tmp_path):
    """The network input_type names embeds each image in EMBEDDING numbers that the code network reads in place of
    parameters; its features are the encoder's; a GP carried for its spread reads the same images; the file
    rebuilds the same network."""
    from modules.models.image_embedding import EMBEDDING, FittedOnEmbedding
    from modules.storage.model_files import load_conditioner, save_conditioner
    torch.manual_seed(0)
    spec = ConditionerSpec(kind="neural_field", input_shape=(1, 16, 16), output_dim=6, filters=(8, 16),
                           vit_patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2, field_shape=(5, 20, 1),
                           encoder=encoder, spread_kind="gpr", gp_points=7)
    network = build_conditioner(spec).eval()
    images = torch.rand(3, 1, 16, 16)
    assert network.codes[0].in_features == EMBEDDING + 1 and isinstance(network.spread, FittedOnEmbedding)
    assert network(images).shape == (3, 5, 20)
    assert torch.equal(network.features(images), network.encoder.features(images))
    assert torch.equal(network(images), network.from_numbers(network.encoder(images)))
    save_conditioner(tmp_path / "saved", network, spec, {})
    loaded, facts = load_conditioner(tmp_path / "saved")
    assert ConditionerSpec.from_dict(facts["spec"]) == spec and torch.equal(loaded(images), network(images))


def test_an_image_neural_fields_fit_killed_midway_resumes_to_the_network_of_an_uninterrupted_fit(tmp_path,
                                                                                                 monkeypatch):
    """An image encoder's dropout draws from the global generators: the fit checkpoint keeps them, so a fit killed in
    its 4th pass and resumed ends with the network of one never interrupted, bit for bit."""
    from types import SimpleNamespace

    from modules.training import conditioner_choice, field_fitter
    from modules.training.field_fitter import FitCheckpoint

    torch.manual_seed(0)
    n_designs, n_steps, n_nodes = 10, 4, 20
    case = training_case(torch.rand(n_designs, n_steps, n_nodes), torch.rand(n_designs, 1, 16, 16))
    spec = ConditionerSpec(kind="neural_field", input_shape=(1, 16, 16), output_dim=4, filters=(8, 16), dropout=0.5,
                           field_shape=(n_steps, n_nodes, 1), encoder="cnn")
    positions = np.random.default_rng(0).uniform(size=(n_nodes, 2))

    def fitted(path, resume=False):
        checkpoint = FitCheckpoint(path, {"case": "this one"}, resume)
        return conditioner_choice.fit_neural_field(spec, positions, case, SimpleNamespace(batch_size=4, seed=0),
                                                   SampledFieldFit(passes=6, designs_per_step=4),
                                                   checkpoint=checkpoint)[0]

    whole = fitted(tmp_path / "whole.pt").state_dict()
    real = die_on_call(monkeypatch, field_fitter, "sampled_pass", 4)
    with pytest.raises(Died):
        fitted(tmp_path / "killed.pt")
    monkeypatch.setattr(field_fitter, "sampled_pass", real)
    torch.manual_seed(123)  # whatever the process drew in between: the fit puts back what it had
    resumed = fitted(tmp_path / "killed.pt", resume=True).state_dict()
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[name], resumed[name]) for name in whole)
