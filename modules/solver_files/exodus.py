"""A design as an Exodus II file (MOOSE, Sierra, Cubit, SEACAS) with every stored time step. meshio keeps only the
first step, so the netCDF variables are read directly: netCDF classic through scipy, netCDF-4 (HDF5) through h5py.

What is read: the node coordinates (coordx/y/z, or coord), the element blocks (connect1, connect2, ... with their
elem_type), time_whole, the nodal variables (name_nod_var, vals_nod_var1.. or the old vals_nod_var [T, V, M]) and the
element variables (name_elem_var, vals_elem_varKebB per block), which are averaged onto the nodes.
"""
from pathlib import Path

import numpy as np

from modules.errors import InputError
from modules.solver_files.results import REEXPORT_FIX, DesignResults, Variable, cell_average, reading

CLASSIC = (b"CDF\x01", b"CDF\x02")
# what the mesh and the variables' names come from (with the blocks' connectK)
LAYOUT_VARIABLES = ("coordx", "coordy", "coordz", "coord", "time_whole", "name_nod_var", "name_elem_var")
NETCDF4 = b"\x89HDF"
# Exodus element types -> meshio cell types by nodes per element (corner nodes first in both)
CELL_TYPES = {("TRI", 3): "triangle", ("TRI", 6): "triangle6", ("TRI", 7): "triangle7", ("QUAD", 4): "quad",
              ("QUAD", 8): "quad8", ("QUAD", 9): "quad9", ("SHELL", 4): "quad", ("SHELL", 3): "triangle",
              ("TET", 4): "tetra", ("TET", 10): "tetra10", ("HEX", 8): "hexahedron", ("HEX", 20): "hexahedron20",
              ("HEX", 27): "hexahedron27", ("WEDGE", 6): "wedge", ("PYRAMID", 5): "pyramid", ("BAR", 2): "line",
              ("BEAM", 2): "line", ("TRUSS", 2): "line", ("EDGE", 2): "line", ("BAR", 3): "line3",
              ("EDGE", 3): "line3"}


class ExodusFile(DesignResults):
    format = "Exodus II"

    def __init__(self, name: str, path: Path):
        super().__init__(name, path)
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"CDF\x05":
            raise InputError(path, "is a netCDF-5 (CDF-5) Exodus file, which scipy and h5py do not read",
                             "convert it to netCDF-4 or 64-bit offset (nccopy -k nc4 IN OUT, or -k nc6) and import "
                             "that")
        if magic not in (*CLASSIC, NETCDF4):
            raise InputError(path, "is not an Exodus II (netCDF) file", REEXPORT_FIX)
        self._netcdf4 = magic == NETCDF4

    def _read(self, wanted) -> tuple:
        """(every variable name of the file, {name: (values, attributes)} of the names wanted(those names) picks, char
        arrays as lists of strings), from one opening of the file: scipy reads every variable of a netCDF file it
        opens without a memory map, so each opening costs a read of the whole file."""
        with reading(self.path, "Exodus II (netCDF)"):
            if self._netcdf4:
                import h5py

                with h5py.File(self.path, "r") as file:
                    names = list(file.keys())
                    return names, {name: _as_values(file[name][()], dict(file[name].attrs)) for name in wanted(names)}
            from scipy.io import netcdf_file

            with netcdf_file(self.path, "r", mmap=False) as file:
                names = list(file.variables)
                return names, {name: _as_values(np.array(file.variables[name].data), file.variables[name]._attributes)
                               for name in wanted(names)}

    def _layout(self):
        if not hasattr(self, "_cached"):
            def layout_names(names):
                return [name for name in names if name in LAYOUT_VARIABLES or _block_number(name) is not None]

            names, found = self._read(layout_names)
            blocks = sorted((name for name in names if _block_number(name) is not None), key=_block_number)
            if "coordx" in found:
                points = np.stack([found[axis][0] for axis in ("coordx", "coordy", "coordz") if axis in found], axis=1)
            elif "coord" in found:
                points = np.asarray(found["coord"][0]).T
            else:
                raise InputError(self.path, f"design {self.name} has no node coordinates (coordx or coord)",
                                 REEXPORT_FIX)
            points = np.pad(np.asarray(points, dtype=np.float64), ((0, 0), (0, 3 - points.shape[1])))
            connectivity = [(found[block][0] - 1, found[block][1].get("elem_type", "")) for block in blocks]
            self._cached = (points, connectivity, np.asarray(found.get("time_whole", (np.zeros(0),))[0], np.float64),
                            found.get("name_nod_var", ([], {}))[0], found.get("name_elem_var", ([], {}))[0])
        return self._cached

    def points(self) -> np.ndarray:
        return self._layout()[0]

    def cells(self) -> list:
        kept = []
        for nodes, elem_type in self._layout()[1]:
            base = next((prefix for prefix, _ in CELL_TYPES if str(elem_type).upper().startswith(prefix)), None)
            kind = CELL_TYPES.get((base, nodes.shape[1]))
            if kind is not None and len(nodes):
                kept.append((kind, nodes.astype(np.int64)))
        return kept

    def times(self) -> np.ndarray:
        return self._layout()[2]

    def variables(self) -> dict:
        _, _, _, nodal, elemental = self._layout()
        found = {name: Variable(1) for name in nodal}
        found.update({name: Variable(1, on_cells=True) for name in elemental if name not in found})
        return found

    def read(self, picks: list) -> np.ndarray:
        points, connectivity, times, nodal, elemental = self._layout()
        n_nodes, order = len(points), np.argsort(times, kind="stable")

        def sources(pick) -> list:
            """The netCDF variables that hold a pick's values: its nodal variable (one per variable, or the old
            [T, V, M] one), or its element variable in each block."""
            if pick.name in nodal:
                return [f"vals_nod_var{nodal.index(pick.name) + 1}", "vals_nod_var"]
            index = elemental.index(pick.name) + 1
            return [f"vals_elem_var{index}eb{block + 1}" for block in range(len(connectivity))]

        wanted = {name for pick in picks for name in sources(pick)}
        _, found = self._read(lambda names: [name for name in names if name in wanted])
        values = np.empty((len(times), len(picks) * n_nodes), dtype=np.float32)
        for slot, pick in enumerate(picks):
            own = sources(pick)
            if pick.name not in nodal:
                column = self._element_values(pick, own, found, connectivity, n_nodes, len(times))
            elif own[0] in found:
                column = found[own[0]][0]
            elif own[1] in found:
                column = found[own[1]][0][:, nodal.index(pick.name)]
            else:
                raise InputError(self.path, f"design {self.name} names {pick.name} but holds no values of it",
                                 REEXPORT_FIX)
            column = np.asarray(column, dtype=np.float64).reshape(len(times), -1)
            if column.shape[1] != n_nodes:
                raise InputError(self.path, f"design {self.name}: {pick.name} has {column.shape[1]} values per step "
                                 f"for {n_nodes} nodes", REEXPORT_FIX)
            values[:, slot * n_nodes:(slot + 1) * n_nodes] = column[order]
        return values

    def _element_values(self, pick, per_block: list, found: dict, connectivity: list, n_nodes: int, n_steps: int):
        """An element variable in every block that has it (per_block: its netCDF name in each block), averaged onto
        the nodes of those blocks [T, M]."""
        blocks = [(connectivity[block][0], found[name][0]) for block, name in enumerate(per_block) if name in found]
        if not blocks:
            raise InputError(self.path, f"design {self.name} names element variable {pick.name} but no block holds "
                             "its values", REEXPORT_FIX)
        average = cell_average([nodes for nodes, _ in blocks], n_nodes)
        return average(np.concatenate([np.asarray(block).reshape(n_steps, -1) for _, block in blocks], axis=1))


def _block_number(name: str) -> int | None:
    """K of an element block's connectivity variable connectK, None for any other name."""
    return int(name[7:]) if name.startswith("connect") and name[7:].isdigit() else None


def _as_values(data, attributes):
    """A netCDF variable as (numbers, attributes), or (list of strings, attributes) for a char array [n, len]."""
    attributes = {key: (value.decode() if isinstance(value, bytes) else
                        value.tobytes().decode(errors="replace").strip("\x00 ") if getattr(value, "dtype", None) is not
                        None and value.dtype.kind == "S" else value) for key, value in attributes.items()}
    data = np.asarray(data)
    if data.dtype.kind == "S":
        rows = data.reshape(len(data), -1) if data.ndim else data.reshape(1, -1)
        # a name ends at its first NUL: solvers leave stray bytes after it
        return [row.tobytes().split(b"\0")[0].decode(errors="replace").strip() for row in rows], attributes
    return data, attributes
