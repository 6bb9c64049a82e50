"""--import: a case folder from the solver's own result files (VTU series with a .pvd, XDMF 3, Exodus II, LS-DYNA
d3plot), checked against what the files' writers were given; every refusal one line, exit 2, nothing written."""
import json
import subprocess
import sys

import meshio
import numpy as np
import pytest
from families import (mesh, times, values, write_d3plot_family, write_exodus_family, write_pvd, write_vtu_family,
                      write_xdmf_family)

from modules.cli import main


def node_average(cell_values, cells, n_nodes):
    """Each node's mean over the cells that hold it, by a plain loop: the reference for the import's averaging."""
    sums, counts = np.zeros(cell_values.shape[:-1] + (n_nodes,)), np.zeros(n_nodes)
    for cell, nodes in enumerate(cells):
        for node in set(int(node) for node in nodes):
            sums[..., node] += cell_values[..., cell]
            counts[node] += 1
    return sums / np.maximum(counts, 1)


def imported(folder, *flags, capsys=None):
    """Run --import in folder; returns (exit code, what was printed, what was said on stderr)."""
    code = main(["--import=results", *flags])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def files_in(folder) -> dict:
    """{path: bytes} of every file under folder but the case folder's lock (storage.case_lock), which stays."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != ".simulgen.lock"}


def case_files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if "results" not in path.parts and path.name != ".simulgen.lock")


def test_vtu_series_with_pvd_import_points_vectors_and_cells_and_set_the_case(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_vtu_family(tmp_path / "results", n=5, t=4)
    code, out, err = imported(tmp_path, "--fields=temperature,velocity:magnitude,pressure", capsys=capsys)
    assert code == 0, err
    points, quads = mesh()
    dataset = np.load("input_data/dataset1.npy")
    assert dataset.shape == (5, 4, 60) and dataset.dtype == np.float32
    assert np.array_equal(dataset[:, :, :20], data["temperature"])
    assert np.allclose(dataset[:, :, 20:40], np.linalg.norm(data["velocity"], axis=-1), rtol=1e-6)
    assert np.allclose(dataset[:, :, 40:], node_average(data["pressure"], quads, 20), rtol=1e-6)
    assert np.allclose(np.loadtxt("input_data/times1.csv", skiprows=1), times(4))
    written = meshio.read("input_data/mesh1.vtu")
    assert np.allclose(written.points, points) and np.array_equal(written.cells[0].data, quads)
    condition = (tmp_path / "input_data/condition.txt").read_text()
    for line in ("Dim1            5", "Dim2            4", "Dim3            60", "num_var         3",
                 "mesh_file       input_data/mesh1.vtu", "time_values     input_data/times1.csv"):
        assert line in condition
    record = json.loads((tmp_path / "input_data/import1.json").read_text())
    assert [design["name"] for design in record["designs"]] == [f"design_{k}" for k in range(1, 6)]
    assert record["averaged_from_cells"] == ["pressure"] and record["format"] == "VTU series"
    assert "Imported 5 designs" in out and "4 time steps (t = 0.5 to 2)" in out and "20 nodes" in out
    assert "averaged onto the nodes" in out
    assert (tmp_path / "preset.txt").is_file()


def test_a_vector_component_and_natural_order_of_ten_and_more_designs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_vtu_family(tmp_path / "results", n=11, t=2)
    assert imported(tmp_path, "--fields=velocity:y", capsys=capsys)[0] == 0
    record = json.loads((tmp_path / "input_data/import1.json").read_text())
    assert [design["name"] for design in record["designs"]][:3] == ["design_1", "design_2", "design_3"]
    assert np.array_equal(np.load("input_data/dataset1.npy"), data["velocity"][..., 1])


def test_xdmf_time_series_import(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_xdmf_family(tmp_path / "results", n=4, t=3)
    code, _, err = imported(tmp_path, "--fields=velocity:x,pressure", capsys=capsys)
    assert code == 0, err
    _, quads = mesh()
    dataset = np.load("input_data/dataset1.npy")
    assert np.array_equal(dataset[:, :, :20], data["velocity"][..., 0])
    assert np.allclose(dataset[:, :, 20:], node_average(data["pressure"], quads, 20), rtol=1e-6)
    assert np.allclose(np.loadtxt("input_data/times1.csv", skiprows=1), times(3))


def test_exodus_with_every_time_step_and_element_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_exodus_family(tmp_path / "results", n=4, t=5)
    code, out, err = imported(tmp_path, capsys=capsys)
    assert code == 2 and out == ""
    assert "holds 4 designs (Exodus II) with the variables: pressure (scalar, on cells); temperature (scalar); " \
           "velocity_x (scalar)" in err and "--fields=NAME" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "input_data").exists()
    assert imported(tmp_path, "--fields=temperature,pressure", capsys=capsys)[0] == 0
    _, quads = mesh()
    dataset = np.load("input_data/dataset1.npy")
    assert np.array_equal(dataset[:, :, :20], data["temperature"])
    assert np.allclose(dataset[:, :, 20:], node_average(data["pressure"], quads, 20), rtol=1e-6)
    assert np.allclose(np.loadtxt("input_data/times1.csv", skiprows=1), times(5))


def test_exodus_in_netcdf4_is_read_through_h5py(tmp_path, monkeypatch, capsys):
    from families import write_exodus_netcdf4

    monkeypatch.chdir(tmp_path)
    points, quads = mesh()
    data = values(3, 4)
    (tmp_path / "results").mkdir()
    for design in range(3):
        write_exodus_netcdf4(tmp_path / "results" / f"run{design + 1}.exo", points, quads, times(4),
                             {"temperature": data["temperature"][design]})
    code, _, err = imported(tmp_path, "--fields=temperature", capsys=capsys)
    assert code == 0, err
    assert np.array_equal(np.load("input_data/dataset1.npy"), data["temperature"])
    assert np.allclose(np.loadtxt("input_data/times1.csv", skiprows=1), times(4))
    assert [block.type for block in meshio.read("input_data/mesh1.vtu").cells] == ["quad"]


def test_d3plot_displacement_von_mises_and_plastic_strain_at_nodes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_d3plot_family(tmp_path / "results", n=3, t=4)
    code, _, err = imported(tmp_path, "--fields=displacement:magnitude,displacement:z,von_mises,plastic_strain",
                            capsys=capsys)
    assert code == 0, err
    dataset = np.load("input_data/dataset1.npy")
    n_nodes = len(data["points"])
    assert dataset.shape == (3, 4, 4 * n_nodes)
    for design in range(3):
        moved = data["positions"][design] - data["positions"][design][0]
        assert np.allclose(dataset[design, :, :n_nodes], np.linalg.norm(moved, axis=-1), atol=1e-6)
        assert np.allclose(dataset[design, :, n_nodes:2 * n_nodes], moved[..., 2], atol=1e-6)
        xx, yy, zz, xy, yz, zx = np.moveaxis(data["stress"][design][:, :, 0].astype(np.float64), -1, 0)
        mises = np.sqrt(((xx - yy) ** 2 + (yy - zz) ** 2 + (zz - xx) ** 2) / 2 + 3 * (xy ** 2 + yz ** 2 + zx ** 2))
        assert np.allclose(dataset[design, :, 2 * n_nodes:3 * n_nodes], node_average(mises, data["hexes"], n_nodes),
                           rtol=1e-5)
        assert np.allclose(dataset[design, :, 3 * n_nodes:], node_average(data["strain"][design][..., 0],
                                                                          data["hexes"], n_nodes), rtol=1e-5)
    assert [block.type for block in meshio.read("input_data/mesh1.vtu").cells] == ["hexahedron"]


def test_an_existing_condition_txt_keeps_its_lines_and_old_data_keys_are_turned_off(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_vtu_family(tmp_path / "results", n=3, t=2)
    (tmp_path / "input_data").mkdir()
    (tmp_path / "input_data/condition.txt").write_text("# my case\nDim1 100\nTraining_epochs 7   # short\n"
                                                       "grid_shape 10 10\nDim3_end 50\n")
    assert imported(tmp_path, "--fields=temperature", capsys=capsys)[0] == 0
    lines = (tmp_path / "input_data/condition.txt").read_text().splitlines()
    assert lines[:3] == ["# my case", "Dim1            3   # set by --import", "Training_epochs 7   # short"]
    assert lines[3].startswith("# grid_shape 10 10") and lines[4].startswith("# Dim3_end 50")
    assert "Dim2            2   # set by --import" in lines


def test_order_by_a_csv_column_orders_the_designs_and_writes_their_parameters(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_vtu_family(tmp_path / "results", n=4, t=2)
    (tmp_path / "runs.csv").write_text("width,run,load\n1.5,design_3,10\n2.5,design_1,20\n3.5,design_4,30\n"
                                       "4.5,design_2,40\n")
    assert imported(tmp_path, "--fields=temperature", "--order_by=runs.csv:run", capsys=capsys)[0] == 0
    assert np.array_equal(np.load("input_data/dataset1.npy"), data["temperature"][[2, 0, 3, 1]])
    assert (tmp_path / "input_data/parameters1.csv").read_text() == "width,load\n1.5,10.0\n2.5,20.0\n3.5,30.0\n" \
                                                                     "4.5,40.0\n"
    condition = (tmp_path / "input_data/condition.txt").read_text()
    assert "input_type      csv" in condition and "param_dir       input_data/parameters1.csv" in condition


# ------------------------------------------------------------------------------------------------- refusals
def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def femzip_marker(path):
    """The header word that femzip sets in a compressed d3plot (NMMAT = 76,893,465), as lasso-python reads it."""
    raw = bytearray(path.read_bytes())
    raw[51 * 4:52 * 4] = np.int32(76_893_465).tobytes()
    path.write_bytes(bytes(raw))


def refuse_vtu(root, problem):
    write_vtu_family(root, n=4, t=3)
    design = root / "design_3"
    if problem == "more nodes":
        (root / "design_3").rename(root / "old")
        bigger = np.concatenate([mesh()[0], [[2.0, 2.0, 0.0]]])
        import meshio
        design.mkdir()
        steps = []
        for step, time in enumerate(times(3)):
            meshio.write(design / f"s{step}.vtu", meshio.Mesh(bigger, [("quad", mesh()[1])],
                                                              point_data={"temperature": np.ones(21)}))
            steps.append((time, f"s{step}.vtu"))
        write_pvd(design, "design_3", steps)
    elif problem == "moved nodes":
        import meshio
        for file in sorted(design.glob("*.vtu")):
            moved = meshio.read(file)
            moved.points[7, 0] += 0.01
            meshio.write(file, moved)
    elif problem == "fewer steps":
        text = (design / "design_3.pvd").read_text().splitlines()
        (design / "design_3.pvd").write_text("\n".join(line for line in text if "design_3_2.vtu" not in line))
    elif problem == "other times":
        pvd = design / "design_3.pvd"
        pvd.write_text(pvd.read_text().replace('timestep="1.0"', 'timestep="1.25"'))
    elif problem == "missing variable":
        import meshio
        for file in design.glob("*.vtu"):
            stripped = meshio.read(file)
            stripped.point_data.pop("temperature")
            meshio.write(file, stripped)
    elif problem == "NaN":
        import meshio
        file = design / "design_3_1.vtu"
        broken = meshio.read(file)
        broken.point_data["temperature"][4] = np.nan
        meshio.write(file, broken)
    elif problem == "truncated":
        truncate(design / "design_3_1.vtu")


REFUSALS = [
    ("vtu", "more nodes", "design design_3 has 21 nodes, design design_1 20"),
    ("vtu", "moved nodes", "design design_3's node 7 is at"),
    ("vtu", "fewer steps", "design design_3 has 2 time steps, design design_1 3"),
    ("vtu", "other times", "design design_3's step 1 is at time 1.25, design design_1's at 1"),
    ("vtu", "missing variable", "design design_3: time step 0 has no variable temperature"),
    ("vtu", "NaN", "design design_3: temperature is NaN or infinite at time step 1 (time 1), node 4"),
    ("vtu", "truncated", "design_3_1.vtu: cannot be read as a VTU file"),
    ("empty", "", "results: holds no simulation results"),
    ("exodus", "truncated", "case2.e: cannot be read as Exodus II"),
    ("exodus", "not netCDF", "case2.e: is not an Exodus II (netCDF) file"),
    ("d3plot", "truncated", "cannot be read as an LS-DYNA d3plot"),
    ("d3plot", "femzip", "design crash_2 is femzip-compressed, which only SIDACT's proprietary library reads"),
    ("xdmf", "version 2", "run_2.xdmf: is XDMF version 2.0; only XDMF 3 time series are read"),
]


@pytest.mark.parametrize("kind, problem, says", REFUSALS, ids=[f"{k}-{p}" for k, p, _ in REFUSALS])
def test_a_bad_family_is_one_line_exit_2_and_leaves_the_case_folder_as_it_was(tmp_path, monkeypatch, capsys, kind,
                                                                              problem, says):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "results"
    if kind != "vtu":  # the VTU refusals start from an empty folder, where the import would make input_data/
        (tmp_path / "input_data").mkdir()
        (tmp_path / "input_data/condition.txt").write_text("Dim1 9\nTraining_epochs 3\n")
    fields = "--fields=temperature"
    if kind == "vtu":
        refuse_vtu(root, problem)
    elif kind == "empty":
        root.mkdir()
        (root / "notes.txt").write_text("nothing here")
    elif kind == "exodus":
        write_exodus_family(root, n=3, t=2)
        truncate(root / "case2.e") if problem == "truncated" else (root / "case2.e").write_bytes(b"not a netCDF")
    elif kind == "d3plot":
        write_d3plot_family(root, n=3, t=3)
        fields = "--fields=von_mises"
        (truncate(root / "crash_2" / "d3plot", 0.3) if problem == "truncated" else
         femzip_marker(root / "crash_2" / "d3plot"))
    elif kind == "xdmf":
        write_xdmf_family(root, n=3, t=2)
        run = root / "run_2.xdmf"
        run.write_text(run.read_text().replace('Version="3.0"', 'Version="2.0"'))
    before = files_in(tmp_path)
    code, out, err = imported(tmp_path, fields, capsys=capsys)
    assert code == 2 and out == "", err
    assert says in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "Fix:" in err
    assert files_in(tmp_path) == before
    assert (tmp_path / "input_data").exists() == (kind != "vtu")


def test_fields_that_name_nothing_or_a_vector_without_its_component_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_vtu_family(tmp_path / "results", n=2, t=2)
    for fields, says in (("velocity", "velocity has 3 components. Fix: write velocity:magnitude or one component "
                                      "(velocity:x, velocity:y, velocity:z)"),
                         ("heat", "has no variable heat (it has: pressure (scalar, on cells); temperature (scalar); "
                                  "velocity (3 components))"),
                         ("velocity:w", "velocity:w: velocity has 3 component(s), no 'w'"),
                         ("temperature,temperature", "temperature is named twice")):
        code, _, err = imported(tmp_path, f"--fields={fields}", capsys=capsys)
        assert code == 2 and says in err, err
    assert case_files(tmp_path) == []
    assert main(["--fields=temperature"]) == 2
    assert "--fields says what --import reads, but --import is not given" in capsys.readouterr().err


def test_an_import_never_overwrites_a_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_vtu_family(tmp_path / "results", n=2, t=2)
    assert imported(tmp_path, "--fields=temperature", capsys=capsys)[0] == 0
    first = (tmp_path / "input_data/dataset1.npy").read_bytes()
    code, _, err = imported(tmp_path, "--fields=pressure", capsys=capsys)
    assert code == 2 and "input_data/dataset1.npy: already exists and an import never overwrites a file" in err
    assert (tmp_path / "input_data/dataset1.npy").read_bytes() == first


@pytest.mark.slow
def test_an_imported_family_trains_and_predicts_into_a_pvd_that_meshio_reads_back_equal(tmp_path, monkeypatch,
                                                                                         capsys):
    from conftest import CONDITION

    monkeypatch.chdir(tmp_path)
    data = write_vtu_family(tmp_path / "results", n=12, t=3)
    rows = "".join(f"design_{k + 1},{float(amplitude)!r}\n" for k, amplitude in enumerate(data["amplitude"]))
    (tmp_path / "runs.csv").write_text("name,amplitude\n" + rows)
    (tmp_path / "input_data").mkdir()
    (tmp_path / "input_data/condition.txt").write_text(CONDITION.format(n=0, t=0, m=0, epochs=2) + "n_epoch 3\n"
                                                       "field_conditioner_epochs 0\nfield_codec_epochs 0\nplot 2\n")
    assert imported(tmp_path, "--fields=temperature", "--order_by=runs.csv:name", capsys=capsys)[0] == 0
    assert main([]) == 0
    (tmp_path / "new.csv").write_text("amplitude\n0.7\n1.9\n")
    assert main(["--predict=new.csv", "--out=p.npy"]) == 0
    assert main(["--predict=new.csv", "--out=q.pvd"]) == 0
    fields = np.load("p.npy")
    collection = (tmp_path / "q.pvd").read_text()
    for step, time in enumerate(times(3)):
        assert f'timestep="{float(time)!r}"' in collection and f'file="q/q_{step:04d}.vtu"' in collection
        written = meshio.read(tmp_path / "q" / f"q_{step:04d}.vtu")
        assert np.allclose(written.points, mesh()[0])
        assert np.array_equal(written.point_data["row_1"], fields[0, step])
        assert np.array_equal(written.point_data["row_2"], fields[1, step])
    assert not list(tmp_path.glob("*.tmp"))
    assert main(["--predict=new.csv", "--out=r.xdmf"]) == 0  # the .xdmf carries the simulation's times too
    with meshio.xdmf.TimeSeriesReader(tmp_path / "r.xdmf") as series:
        series.read_points_cells()
        for step, time in enumerate(times(3)):
            time_value, point_data, _ = series.read_data(step)
            assert time_value == time and np.array_equal(point_data["row_2"], fields[1, step])


def test_the_readme_demo_import_gives_back_the_shipped_case(tmp_path, monkeypatch, capsys):
    """The README's commands: the demo's simulations written as ParaView files, then imported in their CSV's order."""
    from conftest import REPO

    export = REPO / "input_data" / "export_demo_results.py"
    done = subprocess.run([sys.executable, str(export), "demo_results", "--designs=12"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (tmp_path / "imported").mkdir()
    monkeypatch.chdir(tmp_path / "imported")
    assert main(["--import=../demo_results", "--fields=temperature",
                 "--order_by=../demo_results/runs.csv:run"]) == 0, capsys.readouterr().err
    assert np.array_equal(np.load("input_data/dataset1.npy"), np.load(REPO / "input_data" / "dataset1.npy")[:12])
    shipped = np.loadtxt(REPO / "input_data" / "parameters.csv", delimiter=",", skiprows=1)[:12]
    assert np.allclose(np.loadtxt("input_data/parameters1.csv", delimiter=",", skiprows=1), shipped)
    plate = meshio.read(REPO / "input_data" / "plate.vtu")
    assert np.allclose(meshio.read("input_data/mesh1.vtu").points, plate.points)
    assert np.allclose(np.loadtxt("input_data/times1.csv", skiprows=1), np.arange(1, 25) * 0.4 / 24)


@pytest.mark.parametrize("times_text, says", [
    ("time\n0.1\n0.2\n", "holds 2 time values for 6 steps (Dim2)"),
    ("0.1\n0.3\n0.2\n0.4\n0.5\n0.6\n", "holds times that are not finite and increasing"),
    (None, "time_values file does not exist")])
def test_a_bad_time_values_file_stops_training_before_anything_runs(case, capsys, times_text, says):
    if times_text is not None:
        (case / "input_data/times.csv").write_text(times_text)
    with open(case / "input_data/condition.txt", "a") as condition:
        condition.write("time_values input_data/times.csv\n")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert f"input_data/times.csv: {says}" in err and len(err.strip().splitlines()) == 1, err
    assert not (case / "model_save").exists()
