"""--import on real files that third-party solvers wrote (OpenGeoSys, FEniCS, MOOSE, LS-DYNA), each checked against
the format's own reader (meshio, h5py, scipy's netCDF reader, lasso-python). The files are not in this repository
(files fetched from other repositories are kept in the steering repository's shared/): they are read from
../shared/solver_files, or from $SIMULGEN_SOLVER_FILES; tests/data/README.md lists each file, where it comes from and
its licence. Without them these tests are skipped, saying so."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from modules.cli import main

SOLVER_FILES = Path(os.environ.get("SIMULGEN_SOLVER_FILES", REPO.parent / "shared" / "solver_files"))
pytestmark = pytest.mark.skipif(not SOLVER_FILES.is_dir(), reason=f"no third-party solver files in {SOLVER_FILES} "
                                "(tests/data/README.md lists them)")


def family_of(tmp_path, monkeypatch, source: Path, copies=3, as_folder=True) -> Path:
    """A results folder of `copies` designs, each a copy of one real design (a folder, or one file and the files
    beside it that it names), and the working directory set to a new case folder."""
    results = tmp_path / "results"
    for index in range(1, copies + 1):
        if as_folder:
            shutil.copytree(source, results / f"design_{index}")
        else:
            results.mkdir(exist_ok=True)
            shutil.copy(source, results / f"design_{index}{source.suffix}")
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)
    return results


def imported(results, fields, capsys) -> np.ndarray:
    code = main([f"--import={results}", f"--fields={fields}"])
    err = capsys.readouterr().err
    assert code == 0, err
    return np.load("input_data/dataset1.npy")


def test_opengeosys_vtu_series_with_pvd(tmp_path, monkeypatch, capsys):
    import meshio

    source = SOLVER_FILES / "pvd" / "vtuinterface_square"
    dataset = imported(family_of(tmp_path, monkeypatch, source), "pressure,v:magnitude", capsys)
    steps = ["square_1e2_pcs_0_ts_0_t_0.000000.vtu", "square_1e2_pcs_0_ts_1_t_1.000000.vtu"]
    for step, file in enumerate(steps):
        truth = meshio.read(source / file)
        assert np.allclose(dataset[:, step, :121], truth.point_data["pressure"][None], rtol=1e-6)
        assert np.allclose(dataset[:, step, 121:], np.linalg.norm(truth.point_data["v"], axis=1)[None], rtol=1e-6)
    assert np.array_equal(np.loadtxt("input_data/times1.csv", skiprows=1), [0.0, 1.0])
    assert np.allclose(meshio.read("input_data/mesh1.vtu").points, meshio.read(source / steps[0]).points)


def test_opengeosys_pvd_of_97_steps_and_its_fracture_mesh(tmp_path, monkeypatch, capsys):
    import xml.etree.ElementTree as ElementTree

    import meshio

    source = SOLVER_FILES / "pvd" / "ogstools_single_fracture"
    pvd = source / "2D_single_fracture_HT_2D_single_fracture.pvd"
    dataset = imported(family_of(tmp_path, monkeypatch, source, copies=2), "temperature", capsys)
    listed = sorted(((float(item.get("timestep")), item.get("file")) for item in
                     ElementTree.parse(pvd).getroot().iter("DataSet")), key=lambda entry: entry[0])
    assert dataset.shape == (2, 97, 190)
    for step in (0, 40, 96):
        truth = meshio.read(source / listed[step][1]).point_data["temperature"]
        assert np.allclose(dataset[1, step], truth, rtol=1e-6)


def test_opengeosys_xdmf_with_hyperslabs_and_a_mixed_topology(tmp_path, monkeypatch, capsys):
    import h5py

    source = SOLVER_FILES / "xdmf" / "ogstools_elder_v3"
    dataset = imported(family_of(tmp_path, monkeypatch, source), "Si", capsys)
    with h5py.File(source / "elder.h5") as file:
        truth = file["meshes/elder_0_0/Si"][()]
    assert dataset.shape == (3, 13, 8385)
    assert np.allclose(dataset, truth[None], rtol=1e-6)


def test_legacy_fenics_xdmf_time_series(tmp_path, monkeypatch, capsys):
    import h5py

    source = SOLVER_FILES / "xdmf" / "festim_legacy_fenics_v3"
    dataset = imported(family_of(tmp_path, monkeypatch, source), "mobile_concentration", capsys)
    with h5py.File(source / "mobile.h5") as file:
        truth = np.stack([file[f"VisualisationVector/{step}"][()].ravel() for step in range(38)])
    assert np.allclose(dataset[0], truth, rtol=1e-6)


def test_moose_exodus_nodal_and_element_variables_at_every_step(tmp_path, monkeypatch, capsys):
    from scipy.io import netcdf_file

    source = SOLVER_FILES / "exodus" / "zapdos_ion-loss-for-IonOnlyPlasma_out.e"
    dataset = imported(family_of(tmp_path, monkeypatch, source, as_folder=False), "potential,Ar+_density", capsys)
    with netcdf_file(source, "r", mmap=False) as file:
        names = [row.tobytes().split(b"\0")[0].decode() for row in file.variables["name_nod_var"].data]
        potential = file.variables[f"vals_nod_var{names.index('potential') + 1}"].data.copy()
        elements = [row.tobytes().split(b"\0")[0].decode() for row in file.variables["name_elem_var"].data]
        density = file.variables[f"vals_elem_var{elements.index('Ar+_density') + 1}eb1"].data.copy()
        cells = file.variables["connect1"].data.copy() - 1
        times = file.variables["time_whole"].data.copy()
    n_nodes = potential.shape[1]
    assert dataset.shape == (3, len(times), 2 * n_nodes)
    assert np.allclose(dataset[:, :, :n_nodes], potential[None], rtol=1e-6)
    counts = np.bincount(cells.ravel(), minlength=n_nodes)
    averaged = np.stack([np.bincount(cells.ravel(), weights=np.repeat(step, cells.shape[1]), minlength=n_nodes)
                         for step in density]) / counts
    assert np.allclose(dataset[:, :, n_nodes:], averaged[None], rtol=1e-5)
    assert np.allclose(np.loadtxt("input_data/times1.csv", skiprows=1), times)


def test_lsdyna_d3plot_with_solids_and_shells(tmp_path, monkeypatch, capsys):
    from lasso.dyna import D3plot

    source = SOLVER_FILES / "d3plot" / "d3plot_solid_int"
    dataset = imported(family_of(tmp_path, monkeypatch, source), "displacement:x,plastic_strain", capsys)
    arrays = D3plot(str(source / "d3plot")).arrays
    positions = arrays["node_displacement"]
    n_nodes = len(arrays["node_coordinates"])
    assert dataset.shape == (3, 22, 2 * n_nodes)
    assert np.allclose(dataset[:, :, :n_nodes], (positions - positions[0])[None, :, :, 0], atol=1e-5)
    solids = arrays["element_solid_effective_plastic_strain"].mean(axis=2)
    shells = arrays["element_shell_effective_plastic_strain"].mean(axis=2)
    sums = np.zeros((22, n_nodes))
    counts = np.zeros(n_nodes)
    for values, cells in ((solids, arrays["element_solid_node_indexes"]),
                          (shells, arrays["element_shell_node_indexes"])):
        for cell, nodes in enumerate(cells):
            for node in set(nodes.tolist()):
                sums[:, node] += values[:, cell]
                counts[node] += 1
    assert np.allclose(dataset[0, :, n_nodes:], sums / np.maximum(counts, 1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("source, fields, says", [
    ("d3plot/femzip", "displacement:x", "is femzip-compressed, which only SIDACT's proprietary library reads"),
    ("pvd/ogstools_2D_PETSC_pvtu", "pressure", "lists square_1e1_neumann_ts_0_t_0_000000.pvtu, not a .vtu file"),
])
def test_real_files_that_cannot_be_read_are_refused_in_one_line(tmp_path, monkeypatch, capsys, source, fields, says):
    results = family_of(tmp_path, monkeypatch, SOLVER_FILES / source, copies=2)
    if source == "d3plot/femzip":
        for design in results.iterdir():
            (design / "d3plot.fz").rename(design / "d3plot")
    assert main([f"--import={results}", f"--fields={fields}"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not Path("input_data").exists()
