"""Small design families written as solvers' result files, by the formats' own writers where Python has one (meshio
for VTU and XDMF, lasso-python for d3plot); Exodus II by scipy's netCDF writer following the Exodus conventions.

Every family: n designs on one mesh of 5 x 4 nodes (12 quads, z = 0), t steps at times 0.5, 1.0, ...; per design a
point scalar "temperature" [t, 20], a point vector "velocity" [t, 20, 3] and a cell scalar "pressure" [t, 12] (in
d3plot: the displacement, and the stress of 2 x 12 solid elements instead)."""
from contextlib import chdir
from pathlib import Path

import numpy as np

NX, NY = 5, 4


def mesh():
    """(points [20, 3], quads [12, 4])."""
    x, y = np.meshgrid(np.linspace(0, 1, NX), np.linspace(0, 0.6, NY))
    points = np.stack([x.ravel(), y.ravel(), np.zeros(NX * NY)], axis=1)
    corner = (np.arange(NY - 1)[:, None] * NX + np.arange(NX - 1)[None, :]).ravel()
    return points, np.stack([corner, corner + 1, corner + NX + 1, corner + NX], axis=1)


def values(n, t, seed=0):
    """{name: [n, t, ...]} float32 of each variable, smooth in the design and the time."""
    points, quads = mesh()
    rng = np.random.default_rng(seed)
    amplitude = rng.uniform(0.5, 2.0, size=(n, 1, 1))
    time = np.linspace(0.5, 1.0, t)[None, :, None]
    x, y = points[None, None, :, 0], points[None, None, :, 1]
    temperature = 300 + amplitude * np.sin(3 * x + time) * (1 + y)
    velocity = np.stack([temperature - 300, (temperature - 300) * 0.5, np.zeros_like(temperature)], axis=-1)
    pressure = amplitude * time * np.arange(1, len(quads) + 1)[None, None, :]
    return {"temperature": temperature.astype(np.float32), "velocity": velocity.astype(np.float32),
            "pressure": pressure.astype(np.float32), "amplitude": amplitude.ravel()}


def times(t):
    return 0.5 * np.arange(1, t + 1)


def write_pvd(folder: Path, name: str, steps: list) -> Path:
    """A ParaView collection of (time, file relative to folder)."""
    rows = "\n".join(f'    <DataSet timestep="{float(time)!r}" group="" part="0" file="{file}"/>'
                     for time, file in steps)
    path = folder / f"{name}.pvd"
    path.write_text(f'<?xml version="1.0"?>\n<VTKFile type="Collection" version="0.1" byte_order="LittleEndian">\n'
                    f"  <Collection>\n{rows}\n  </Collection>\n</VTKFile>\n")
    return path


def write_vtu_family(root: Path, n=5, t=4, points=None, seed=0) -> dict:
    """root/design_K/design_K.pvd + design_K_S.vtu (meshio's VTU writer), one folder per design."""
    import meshio

    base, quads = mesh()
    data = values(n, t, seed)
    for design in range(n):
        folder = root / f"design_{design + 1}"
        folder.mkdir(parents=True)
        steps = []
        for step, time in enumerate(times(t)):
            file = f"design_{design + 1}_{step}.vtu"
            meshio.write(folder / file, meshio.Mesh(
                base if points is None else points, [("quad", quads)],
                point_data={"temperature": data["temperature"][design, step],
                            "velocity": data["velocity"][design, step]},
                cell_data={"pressure": [data["pressure"][design, step]]}))
            steps.append((time, file))
        write_pvd(folder, f"design_{design + 1}", steps)
    return data


def write_xdmf_family(root: Path, n=4, t=3) -> dict:
    """root/run_K.xdmf + run_K.h5, meshio's XDMF 3 time series writer."""
    import meshio

    points, quads = mesh()
    data = values(n, t)
    root.mkdir(parents=True, exist_ok=True)
    for design in range(n):
        with chdir(root), meshio.xdmf.TimeSeriesWriter(f"run_{design + 1}.xdmf") as writer:  # its .h5 goes to the cwd
            writer.write_points_cells(points, [("quad", quads)])
            for step, time in enumerate(times(t)):
                writer.write_data(time, point_data={"temperature": data["temperature"][design, step],
                                                    "velocity": data["velocity"][design, step]},
                                  cell_data={"pressure": [data["pressure"][design, step]]})
    return data


def write_exodus(path: Path, points, quads, step_times, nodal: dict, elemental: dict) -> None:
    """An Exodus II file (netCDF 64-bit offset) with one quad block, every time step, nodal and element variables."""
    from scipy.io import netcdf_file

    def names(words):
        table = np.zeros((len(words), 33), dtype="S1")
        for row, word in enumerate(words):
            table[row, :len(word)] = np.frombuffer(word.encode(), dtype="S1")
        return table

    with netcdf_file(path, "w", version=2) as file:
        file.title = "test family"
        file.api_version = np.float32(8.11)
        file.version = np.float32(8.11)
        file.floating_point_word_size = 8
        for dimension, size in (("time_step", None), ("len_string", 33), ("len_name", 33), ("num_dim", 3),
                                ("num_nodes", len(points)), ("num_elem", len(quads)), ("num_el_blk", 1),
                                ("num_el_in_blk1", len(quads)), ("num_nod_per_el1", 4), ("num_nod_var", len(nodal)),
                                ("num_elem_var", len(elemental))):
            file.createDimension(dimension, size)
        for axis, name in enumerate(("coordx", "coordy", "coordz")):
            file.createVariable(name, "d", ("num_nodes",))[:] = points[:, axis]
        connect = file.createVariable("connect1", "i", ("num_el_in_blk1", "num_nod_per_el1"))
        connect[:] = quads + 1
        connect.elem_type = "QUAD4"
        file.createVariable("time_whole", "d", ("time_step",))[:] = step_times
        file.createVariable("name_nod_var", "c", ("num_nod_var", "len_name"))[:] = names(list(nodal))
        file.createVariable("name_elem_var", "c", ("num_elem_var", "len_name"))[:] = names(list(elemental))
        for index, values_of in enumerate(nodal.values(), start=1):
            file.createVariable(f"vals_nod_var{index}", "d", ("time_step", "num_nodes"))[:] = values_of
        for index, values_of in enumerate(elemental.values(), start=1):
            file.createVariable(f"vals_elem_var{index}eb1", "d", ("time_step", "num_el_in_blk1"))[:] = values_of


def write_exodus_netcdf4(path: Path, points, quads, step_times, nodal: dict) -> None:
    """The same as write_exodus in netCDF-4's HDF5 layout (each netCDF variable an HDF5 dataset of its name, char
    arrays as fixed bytes), written with h5py as the netCDF library lays it out."""
    import h5py

    with h5py.File(path, "w") as file:
        for axis, name in enumerate(("coordx", "coordy", "coordz")):
            file[name] = points[:, axis]
        file["connect1"] = (quads + 1).astype(np.int32)
        file["connect1"].attrs["elem_type"] = np.bytes_("QUAD4")
        file["time_whole"] = np.asarray(step_times, dtype=np.float64)
        table = np.zeros((len(nodal), 33), dtype="S1")
        for row, word in enumerate(nodal):
            table[row, :len(word)] = np.frombuffer(word.encode(), dtype="S1")
        file["name_nod_var"] = table
        for index, values_of in enumerate(nodal.values(), start=1):
            file[f"vals_nod_var{index}"] = np.asarray(values_of, dtype=np.float64)


def write_exodus_family(root: Path, n=4, t=3) -> dict:
    points, quads = mesh()
    data = values(n, t)
    root.mkdir(parents=True, exist_ok=True)
    for design in range(n):
        write_exodus(root / f"case{design + 1}.e", points, quads, times(t),
                     {"temperature": data["temperature"][design], "velocity_x": data["velocity"][design, ..., 0]},
                     {"pressure": data["pressure"][design]})
    return data


def write_d3plot_family(root: Path, n=3, t=4) -> dict:
    """root/crash_K/d3plot (+ d3plot01, ...), lasso-python's writer: 2 x 12 hexahedra over two layers of the grid."""
    from lasso.dyna import ArrayType, D3plot

    points, quads = mesh()
    solid_points = np.concatenate([points, points + [0, 0, 0.2]]).astype(np.float32)
    hexes = np.concatenate([quads, quads + len(points)], axis=1).astype(np.int32)
    rng = np.random.default_rng(1)
    data = {"positions": [], "stress": [], "strain": []}
    root.mkdir(parents=True, exist_ok=True)
    for design in range(n):
        plot = D3plot()
        motion = (design + 1) * 0.01 * np.arange(t)[:, None, None] * solid_points[None, :, :]
        positions = (solid_points[None] + motion).astype(np.float32)
        stress = rng.normal(size=(t, len(hexes), 1, 6)).astype(np.float32)
        strain = np.abs(rng.normal(size=(t, len(hexes), 1))).astype(np.float32)
        plot.arrays.update({ArrayType.node_coordinates: solid_points, ArrayType.element_solid_node_indexes: hexes,
                            ArrayType.element_solid_part_indexes: np.zeros(len(hexes), np.int32),
                            ArrayType.global_timesteps: times(t).astype(np.float32),
                            ArrayType.node_displacement: positions, ArrayType.element_solid_stress: stress,
                            ArrayType.element_solid_effective_plastic_strain: strain})
        (root / f"crash_{design + 1}").mkdir()
        plot.write_d3plot(str(root / f"crash_{design + 1}" / "d3plot"))
        for key, value in (("positions", positions), ("stress", stress), ("strain", strain)):
            data[key].append(value)
    data.update({"hexes": hexes, "points": solid_points})
    return data
