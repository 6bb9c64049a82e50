"""Evaluation figures are real PNGs whose content follows the data and layout; node layouts are read or refused."""
import types

import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from modules.config.keys import whole_numbers  # noqa: E402
from modules.data.field_layout import FieldLayout, read_field_layout  # noqa: E402
from modules.errors import InputError  # noqa: E402
from modules.evaluation import drawing as evaluation_plots  # noqa: E402
from modules.evaluation import figures  # noqa: E402

GRID = FieldLayout(1, grid_shape=(20, 20))
LINE = FieldLayout(1)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def structured_fields(n_designs, n_steps=4, n_nodes=400):
    """[n, T, M] smooth bumps (true) and a shifted copy (predicted): fields with visible structure and error."""
    nodes = np.linspace(0, 4 * np.pi, n_nodes)
    true = np.stack([[np.sin(nodes * (1 + d)) * (1 + t) for t in range(n_steps)] for d in range(n_designs)])
    return true, true + 0.1 * np.cos(nodes)


def png(path) -> np.ndarray:
    """The PNG at path as an [H, W, channels] array, after checking it is a PNG of a plausible size."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 300 and image.height >= 200
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def snapshots(tmp_path, layout, n_designs=1, steps=(0,), fields=None, name="snap.png"):
    true, predicted = fields or structured_fields(n_designs)
    return png(evaluation_plots.field_snapshots(plt, layout, list(range(n_designs)), list(steps), true, predicted,
                                                "VAE reconstruction", tmp_path / name))


def test_grid_snapshot_shows_the_field_structure(tmp_path):
    structured = snapshots(tmp_path, GRID, name="structured.png")
    flat = np.full((1, 4, 400), 2.0)
    constant = snapshots(tmp_path, GRID, fields=(flat, flat), name="constant.png")
    assert structured.shape == constant.shape
    assert (np.abs(structured - constant).sum(axis=2) > 30).mean() > 0.05


@pytest.mark.slow
def test_snapshot_titles_name_design_step_variable_and_predictor(tmp_path):
    layout = FieldLayout(2, grid_shape=(20, 10))
    snapshots(tmp_path, layout, n_designs=2, steps=(1, 3))
    titles = [axis.get_title() for axis in plt.gcf().axes if axis.get_title()]
    assert "design 1, step 3 var 1: simulation" in titles
    assert titles.count("VAE reconstruction") == 8 and titles.count("|error|") == 8


@pytest.mark.slow
def test_more_designs_and_steps_make_a_taller_picture(tmp_path):
    one = snapshots(tmp_path, GRID, name="one.png")
    four = snapshots(tmp_path, GRID, n_designs=2, steps=(0, 2), name="four.png")
    assert four.shape[1] == one.shape[1]
    assert four.shape[0] > 3 * one.shape[0]


def test_two_variables_double_the_rows(tmp_path):
    one = snapshots(tmp_path, GRID, name="one_var.png")
    two = snapshots(tmp_path, FieldLayout(2, grid_shape=(20, 10)), name="two_vars.png")
    assert two.shape[0] == pytest.approx(2 * one.shape[0], abs=2)


def test_line_layout_draws_two_columns_instead_of_three(tmp_path):
    maps = snapshots(tmp_path, GRID, name="maps.png")
    lines = snapshots(tmp_path, LINE, name="lines.png")
    assert lines.shape[0] == maps.shape[0]
    assert lines.shape[1] == pytest.approx(maps.shape[1] * 2 / 3, abs=2)
    assert len(plt.gcf().axes[0].get_lines()) == 2  # simulation and prediction share the first panel


def test_scattered_and_collinear_coordinates_both_draw(tmp_path):
    rng = np.random.default_rng(0)
    scattered = snapshots(tmp_path, FieldLayout(1, coordinates=rng.uniform(size=(400, 2))), name="scattered.png")
    on_a_line = np.stack([np.arange(400.0), np.zeros(400)], axis=1)  # Delaunay fails: nodes are drawn as points
    collinear = snapshots(tmp_path, FieldLayout(1, coordinates=on_a_line), name="collinear.png")
    assert scattered.shape == collinear.shape
    assert np.abs(scattered - collinear).sum() > 0


def test_too_many_snapshot_rows_are_refused(tmp_path):
    true, predicted = structured_fields(5, n_steps=5)
    with pytest.raises(ValueError, match="at most 24"):
        evaluation_plots.field_snapshots(plt, GRID, list(range(5)), list(range(5)), true, predicted, "VAE",
                                         tmp_path / "many.png")
    assert not (tmp_path / "many.png").exists()


def unlabelled(figure) -> list:
    """The titles of the figure's panels whose x or y axis has no label, and of colourbars without a label."""
    missing = []
    for axis in figure.axes:
        if axis.get_label() == "<colorbar>":
            if not (axis.get_ylabel() or axis.get_xlabel()):
                missing.append(f"colourbar {len(missing)}")
        elif axis.axison and not (axis.get_xlabel() and axis.get_ylabel()):
            missing.append(axis.get_title() or f"panel {len(missing)}")
    return missing


@pytest.mark.parametrize("layout", [GRID, LINE, FieldLayout(1, coordinates=np.random.default_rng(0).uniform(
    size=(400, 2)))], ids=["grid", "line", "coordinates"])
def test_every_snapshot_axis_and_colourbar_says_what_it_shows_and_in_which_unit(tmp_path, layout):
    snapshots(tmp_path, layout)
    figure = plt.gcf()
    assert unlabelled(figure) == []
    labels = {axis.get_ylabel() for axis in figure.axes}
    assert "value (physical units)" in labels and "|error| (physical units)" in labels


def test_error_per_step_is_in_percent_and_says_so(tmp_path):
    report = {"labels": {"vae": "VAE", "pod": "POD", "mean_field": "mean field", "conditioner": "MLP"},
              "reconstruction": {"vae": {"per_step": {"relative_l2": [0.01, None, 0.02]}},
                                 "pod": {"per_step": {"relative_l2": [0.5, 0.25, 0.125]}}},
              "prediction": {"note": None, "conditioner": {"per_step": {"relative_l2": [0.03, 0.04, 0.05]}},
                             "mean_field": {"per_step": {"relative_l2": [1.0, 1.0, 1.0]}}}}
    curves = figures.error_curves(report)
    assert list(curves) == ["reconstruction: VAE", "reconstruction: POD", "prediction: MLP"]
    np.testing.assert_allclose(curves["reconstruction: VAE"], [1.0, np.nan, 2.0])  # 0.01 of the field: 1 %
    np.testing.assert_allclose(curves["prediction: MLP"], [3.0, 4.0, 5.0])
    png(evaluation_plots.error_per_step(plt, curves, tmp_path / "errors.png"))
    axis = plt.gcf().axes[0]
    assert axis.get_ylabel() == "relative L2 error (%)" and axis.get_xlabel() == "time step index"
    assert axis.get_title() == "relative L2 error per time step"
    assert max(np.nanmax(line.get_ydata()) for line in axis.get_lines()) == pytest.approx(50.0)


def test_error_per_step_tolerates_undefined_steps(tmp_path):
    curves = {"VAE": np.array([0.1, np.nan, 0.05, 0.02]), "mean field": np.array([np.nan, 0.3, 0.2, 0.4])}
    png(evaluation_plots.error_per_step(plt, curves, tmp_path / "errors.png"))
    assert plt.gcf().axes[0].get_yscale() == "log"
    png(evaluation_plots.error_per_step(plt, {"VAE": np.array([0.0, 0.1])}, tmp_path / "zero.png", ylabel="MSE"))
    assert plt.gcf().axes[0].get_yscale() == "linear"
    assert plt.gcf().axes[0].get_ylabel() == "MSE"


def test_latent_maps_with_few_designs_explain_the_missing_t_sne(tmp_path):
    latents = np.arange(12.0).reshape(3, 4) ** 1.5
    png(evaluation_plots.latent_maps(plt, latents, np.arange(3.0), "amplitude", np.array([0, 0, 1], bool),
                                     tmp_path / "few.png"))
    texts = [text.get_text() for text in plt.gcf().axes[1].texts]
    assert texts == ["t-SNE needs at least 4 designs"]


def test_latent_maps_draw_pca_and_t_sne(tmp_path):
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(20, 6)) * np.array([5, 2, 1, 1, 1, 1])
    png(evaluation_plots.latent_maps(plt, latents, rng.uniform(size=20), "amplitude", np.arange(20) >= 15,
                                     tmp_path / "latents.png"))
    pca, tsne = plt.gcf().axes[:2]
    assert pca.get_xlabel().startswith("PC1 (latent units; ") and pca.get_xlabel().endswith("% of variance)")
    assert len(tsne.collections) == 2  # training circles and validation triangles
    assert unlabelled(plt.gcf()) == [] and tsne.get_ylabel() == "t-SNE 2 (no unit)"
    png(evaluation_plots.latent_maps(plt, latents[:, :1], latents[:, 0], "z", np.zeros(20, bool),
                                     tmp_path / "one_dim.png"))


def test_active_units_show_every_group(tmp_path):
    summary = {"main": {"units": 4, "active": 3, "kl": 2.1, "kl_dims": [1.0, 0.6, 0.5, 1e-4]},
               "level0": {"units": 3, "active": 1, "kl": 0.4, "kl_dims": [0.4, 1e-5, 2e-5]},
               "level1": {"units": 3, "active": 0, "kl": 3e-5, "kl_dims": [1e-5, 1e-5, 1e-5]}}
    png(evaluation_plots.active_units(plt, summary, tmp_path / "active.png"))
    bars, kl = plt.gcf().axes[:2]
    assert [text.get_text() for text in bars.texts] == ["3 / 4", "1 / 3", "0 / 3"]
    assert [label.get_text() for label in kl.get_xticklabels()] == ["main", "level0", "level1"]
    assert kl.get_yscale() == "log"
    assert unlabelled(plt.gcf()) == [] and bars.get_ylabel() == "latent units (count)"


def config(**changes):
    settings = {"n_vars": 1, "n_nodes_used": 400, "grid_shape": "", "node_coordinates": "", "mesh_file": "", **changes}
    return types.SimpleNamespace(**settings, grid=whole_numbers(settings["grid_shape"]))


def test_layout_kind_follows_the_config(tmp_path):
    assert read_field_layout(config()).kind == "line"
    layout = read_field_layout(config(n_vars=2, grid_shape="10 20"))
    assert (layout.kind, layout.grid_shape) == ("grid", (10, 20))
    assert [len(part) for part in layout.variables(np.arange(400))] == [200, 200]
    assert read_field_layout(config(n_vars=2, grid_shape="10, 20")).grid_shape == (10, 20)  # as the config accepts


def test_coordinates_read_from_npy_relative_to_the_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    xy = np.random.default_rng(0).uniform(size=(200, 2))
    np.save("nodes.npy", xy)
    layout = read_field_layout(config(n_vars=2, node_coordinates="nodes.npy"))
    assert layout.kind == "coordinates"
    np.testing.assert_array_equal(layout.coordinates, xy)


def test_coordinates_csv_may_have_a_header_and_a_z_column(tmp_path):
    xyz = np.random.default_rng(0).uniform(size=(400, 3))
    path = tmp_path / "nodes.csv"
    np.savetxt(path, xyz, delimiter=",", header="x,y,z", comments="")
    layout = read_field_layout(config(node_coordinates=str(path)))
    assert layout.coordinates.shape == (400, 2)
    np.testing.assert_allclose(layout.coordinates, xyz[:, :2])


def test_a_mesh_file_draws_fields_on_its_own_cells_not_on_a_triangulation_of_the_nodes(tmp_path):
    """3 x 3 nodes with three quads: the missing corner quad stays empty (Delaunay would fill the square)."""
    import meshio
    points = np.array([[x, y, 0.0] for y in range(3) for x in range(3)])
    quads = np.array([[0, 1, 4, 3], [1, 2, 5, 4], [3, 4, 7, 6]])
    meshio.write(tmp_path / "l.vtu", meshio.Mesh(points, [("quad", quads)]))
    layout = read_field_layout(config(n_nodes_used=9, mesh_file=str(tmp_path / "l.vtu")))
    figure, axis = plt.subplots()
    shown = evaluation_plots._draw_map(axis, layout, np.arange(9.0), None, None)
    assert len(shown.get_array()) == 6  # two triangles per quad, one value each (flat shading)
    assert axis.get_xlabel() == "x (units of mesh_file)"
    plt.close(figure)
    np.save(tmp_path / "xy.npy", points[:, :2])  # the same nodes as a point cloud: Delaunay fills the square
    layout = read_field_layout(config(n_nodes_used=9, node_coordinates=str(tmp_path / "xy.npy")))
    figure, axis = plt.subplots()
    assert len(evaluation_plots._draw_map(axis, layout, np.arange(9.0), None, None).get_array()) == 8
    plt.close(figure)


def write_npy(values):
    return lambda path: np.save(path, values)


def write_text(text):
    return lambda path: path.write_text(text)


@pytest.mark.parametrize("name, write, problem", [
    ("missing.npy", None, "does not exist"),
    ("garbage.npy", write_text("not an array"), "cannot be read"),
    ("words.csv", write_text("x,y\na,b\nc,d\n"), "cannot be read"),
    ("flat.npy", write_npy(np.zeros(400)), "not rows of 2 or 3 columns"),
    ("wide.npy", write_npy(np.zeros((400, 4))), "not rows of 2 or 3 columns"),
    ("short.csv", write_text("x,y\n" + "0.5,1.5\n" * 399), "has 399 rows but each variable has 400 nodes"),
    ("holes.npy", write_npy(np.where(np.eye(400, 2) > 0, np.nan, 1.0)), "NaN or infinite"),
    ("strings.npy", write_npy(np.full((400, 2), "a")), "real numbers"),
    ("nodes.txt", write_text("0,0\n" * 400), "not .npy or .csv"),
])
def test_bad_coordinate_files_name_the_file_and_the_problem(tmp_path, name, write, problem):
    path = tmp_path / name
    if write:
        write(path)
    with pytest.raises(InputError) as caught:
        read_field_layout(config(node_coordinates=str(path)))
    assert name in str(caught.value) and problem in str(caught.value)
    assert caught.value.fix


# ---------------------------------------------------------------------- the plots of a training run (output/*.png)
VAE_HISTORY = [{"epoch": epoch, "train/loss": 60.0 / epoch, "val/loss": 70.0 / epoch, "train/recon": 1e-4 / epoch,
                "val/recon": 2e-4 / epoch, "train/kl_main": 3.0, "train/kl_level0": 1.0, "beta": min(1.0, epoch / 3),
                "lr": 1e-3} for epoch in range(1, 6)]


def conditioner_history(end_to_end):
    """Epochs of a conditioner's metrics: the field loss 1e5 times below the latent MSE when trained end to end (with
    latent regularisation weight 0.1), else 0, as the training loop logs it."""
    rows = []
    for epoch in range(1, 6):
        latent, field = 0.5 / epoch, (2e-6 / epoch if end_to_end else 0.0)
        loss = field + 0.1 * latent if end_to_end else latent
        rows.append({"epoch": epoch, "train/loss": loss, "train/latent_mse": latent, "train/field_loss": field,
                     "val/loss": 1.5 * loss, "val/latent_mse": 1.5 * latent, "val/field_loss": 1.5 * field,
                     "lr": 1e-3})
    return rows


def run_config(**changes):
    return config(**{"plot_steps": "", "loss_type": 1, "fixed_recon_weight": None, **changes})


def fake_evaluation(n_steps=4, end_to_end=False, val_indices=(2, 4, 6)):
    """What the training plots read of an evaluation: the case's validation designs and fields [7, T, 400], their
    reconstruction and prediction, and the saved conditioner's facts."""
    true, predicted = structured_fields(7, n_steps=n_steps)
    array = types.SimpleNamespace(sample_shape=(n_steps, 400), read=lambda designs: true[np.asarray(designs)])
    facts = {"spec": {"kind": "mlp"}, "config": {"e2e_loss_function": "MSE", "use_latent_regularization": end_to_end,
                                                  "latent_reg_weight": 0.1}}
    return types.SimpleNamespace(case=types.SimpleNamespace(val_indices=np.array(val_indices), array=array),
                                 reconstruct=lambda designs: predicted[np.asarray(designs)],
                                 predict=lambda designs: predicted[np.asarray(designs)],
                                 conditioner=types.SimpleNamespace(facts=facts), config=run_config())


def sample_titles():
    return [axis.get_title() for axis in plt.gcf().axes if axis.get_title()]


@pytest.mark.slow
def test_training_samples_are_maps_at_a_few_steps_when_the_layout_is_known(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    evaluation = fake_evaluation(n_steps=8, val_indices=(2, 4))
    paths = figures.training_plots(VAE_HISTORY, evaluation,
                                   config=run_config(grid_shape="20 20"))
    assert [str(path) for path in paths] == ["output/loss_curves.png", "output/reconstruction_samples.png"]
    maps = png(tmp_path / "output" / "reconstruction_samples.png")
    # 2 validation designs x steps 2, 4 and 7 (a quarter, half way, the last), 3 maps each
    assert maps.shape[0] >= 6 * evaluation_plots.ROW_HEIGHT * evaluation_plots.DPI - 2
    assert maps.shape[1] >= 3 * evaluation_plots.COLUMN_WIDTH * evaluation_plots.DPI - 2
    figures.training_plots(VAE_HISTORY, evaluation, config=run_config())
    images = png(tmp_path / "output" / "reconstruction_samples.png")
    assert images.shape[0] < 2 * 3.2 * evaluation_plots.DPI + 2  # without a layout: one time x node row per design


def test_sample_maps_name_design_and_step_and_draw_on_the_nodes(tmp_path):
    evaluation = fake_evaluation(n_steps=8, val_indices=(4,))
    np.save(tmp_path / "nodes.npy", np.random.default_rng(0).uniform(size=(400, 2)))
    figures.field_samples(plt, evaluation, run_config(node_coordinates=str(tmp_path / "nodes.npy")),
                          evaluation.reconstruct, "VAE reconstruction", tmp_path / "maps.png")
    png(tmp_path / "maps.png")
    assert sample_titles() == [title for step in (2, 4, 7) for title in
                               (f"design 4, step {step}: simulation", "VAE reconstruction", "|error|")]
    assert plt.gcf().axes[0].get_xlabel() == "x (units of node_coordinates)" and unlabelled(plt.gcf()) == []


def test_training_samples_without_a_layout_stay_time_by_node_images(tmp_path):
    evaluation = fake_evaluation()
    figures.field_samples(plt, evaluation, run_config(), evaluation.reconstruct, "VAE reconstruction",
                          tmp_path / "images.png")
    png(tmp_path / "images.png")
    panels = [axis for axis in plt.gcf().axes if axis.get_label() != "<colorbar>"]
    assert len(panels) == 9 and panels[0].get_title() == "design 2: simulation"
    assert (panels[0].get_xlabel(), panels[0].get_ylabel()) == ("node index", "time step index")
    assert panels[0].get_images()[0].get_array().shape == (4, 400) and unlabelled(plt.gcf()) == []


@pytest.mark.slow
def test_many_steps_or_variables_show_fewer_sample_designs_and_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation_plots, "MAX_SNAPSHOT_ROWS", 4)  # rows of maps allowed in one picture
    evaluation = fake_evaluation(n_steps=12)

    def titles(**settings):
        figures.field_samples(plt, evaluation, run_config(**settings), evaluation.reconstruct, "VAE",
                              tmp_path / "samples.png")
        return [title for title in sample_titles() if title.startswith("design")]
    assert titles(grid_shape="20 20", plot_steps="0 5 9") == [f"design 2, step {step}: simulation"
                                                              for step in (0, 5, 9)]
    assert titles(n_vars=4, grid_shape="10 10") == [f"design 2, step 11 var {var}: simulation" for var in range(4)]
    assert titles(n_vars=8, grid_shape="5 10") == [f"design {design}: simulation" for design in (2, 4, 6)]


def test_vae_loss_curves_label_every_axis_with_its_unit(tmp_path):
    png(figures.loss_curves(plt, VAE_HISTORY, run_config(), tmp_path / "loss.png"))
    panels = {axis.get_title(): axis for axis in plt.gcf().axes}
    assert unlabelled(plt.gcf()) == [] and {axis.get_xlabel() for axis in panels.values()} == {"epoch"}
    assert panels["total loss"].get_ylabel() == "loss per design (nats)"
    assert panels["reconstruction"].get_ylabel() == "mean MSE per value (scaled units²)"
    assert panels["KL (training)"].get_ylabel() == "KL per design (nats)"
    png(figures.loss_curves(plt, VAE_HISTORY, run_config(loss_type=2, fixed_recon_weight=1e4), tmp_path / "b.png"))
    panels = {axis.get_title(): axis for axis in plt.gcf().axes}
    assert panels["total loss"].get_ylabel() == "loss per design (alpha-weighted)"
    assert panels["reconstruction"].get_ylabel() == "mean MAE per value (scaled units)"


@pytest.mark.slow
def test_the_field_loss_has_a_panel_of_its_own_so_the_objective_stays_readable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    history = conditioner_history(end_to_end=True)
    evaluation = fake_evaluation(end_to_end=True)
    png(figures.curves(plt, history, figures.conditioner_panels(history, evaluation), tmp_path / "curves.png",
                       columns=2))
    lines = {line.get_label(): axis for axis in plt.gcf().axes for line in axis.get_lines()}
    assert set(lines) == {"train/loss", "val/loss", "train/field_loss", "val/field_loss", "train/latent_mse",
                          "val/latent_mse", "lr"}
    assert lines["train/loss"] is lines["val/loss"]
    assert lines["train/field_loss"] is lines["val/field_loss"] is not lines["train/loss"]
    assert lines["train/latent_mse"] is not lines["train/loss"] and lines["train/latent_mse"] is not lines["lr"]
    assert lines["train/field_loss"].get_ylabel() == "field MSE per value (scaled units²)"
    assert unlabelled(plt.gcf()) == []
    figures.conditioner_plots(history, evaluation, config=run_config())
    png(tmp_path / "output" / "conditioner_loss_curves.png")
    png(tmp_path / "output" / "prediction_samples.png")


def test_conditioner_curves_without_end_to_end_training_show_the_objective_and_the_learning_rate(tmp_path):
    history = conditioner_history(end_to_end=False)
    png(figures.curves(plt, history, figures.conditioner_panels(history, fake_evaluation()), tmp_path / "c.png"))
    axes = [axis for axis in plt.gcf().axes if axis.axison]
    assert [axis.get_title() for axis in axes] == ["conditioner objective", "learning rate"]
    assert [line.get_label() for line in axes[0].get_lines()] == ["train/loss", "val/loss"]
    assert axes[0].get_ylabel() == "MSE of the standardised latents (no unit)" and unlabelled(plt.gcf()) == []


def test_a_conditioner_not_kept_says_so_in_a_title_that_fits(tmp_path):
    evaluation = fake_evaluation()
    evaluation.conditioner.facts["spec"]["kind"] = figures.LATENT_GP.kind
    history = conditioner_history(end_to_end=False)
    png(figures.curves(plt, history, figures.conditioner_panels(history, evaluation), tmp_path / "c.png", columns=2))
    objective = plt.gcf().axes[0]
    assert objective.get_title().splitlines() == [
        "conditioner objective", "(this network was not kept: the GP on the latents predicts better)"]
    assert [tick for tick in objective.get_xticks() if tick != int(tick)] == []  # whole epochs
