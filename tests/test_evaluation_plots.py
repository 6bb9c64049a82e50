"""Evaluation figures are real PNGs whose content follows the data and layout; node layouts are read or refused."""
import types

import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from modules.data.field_layout import FieldLayout, read_field_layout  # noqa: E402
from modules.errors import InputError  # noqa: E402
from modules.evaluation import drawing as evaluation_plots  # noqa: E402

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


def test_snapshot_titles_name_design_step_variable_and_predictor(tmp_path):
    layout = FieldLayout(2, grid_shape=(20, 10))
    snapshots(tmp_path, layout, n_designs=2, steps=(1, 3))
    titles = [axis.get_title() for axis in plt.gcf().axes if axis.get_title()]
    assert "design 1, step 3 var 1: simulation" in titles
    assert titles.count("VAE reconstruction") == 8 and titles.count("|error|") == 8


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
    assert pca.get_xlabel().startswith("PC1 (") and pca.get_xlabel().endswith("% of variance)")
    assert len(tsne.collections) == 2  # training circles and validation triangles
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


def config(**changes):
    return types.SimpleNamespace(**{"n_vars": 1, "n_nodes_used": 400, "grid_shape": "", "node_coordinates": "",
                                    **changes})


def test_layout_kind_follows_the_config(tmp_path):
    assert read_field_layout(config()).kind == "line"
    layout = read_field_layout(config(n_vars=2, grid_shape="10 20"))
    assert (layout.kind, layout.grid_shape) == ("grid", (10, 20))
    assert [len(part) for part in layout.variables(np.arange(400))] == [200, 200]
    assert read_field_layout(config(n_vars=2, grid_shape="10, 20")).grid_shape == (10, 20)  # as the config accepts


def test_coordinates_read_from_npy_relative_to_the_working_directory(tmp_path, monkeypatch):
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
