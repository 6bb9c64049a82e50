"""Where the nodes of a field sit in space, so a field row [M] can be drawn as 2-D maps.

A field stores its n_vars variables side by side along the node axis, M / n_vars nodes each. Each variable's nodes
are either an H x W grid (row-major), scattered points with x, y coordinates read from a file, or, with neither, a
line of nodes in index order.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modules.config.keys import whole_numbers
from modules.errors import InputError

COORDINATES_FIX = "give one row of x, y (or x, y, z) per node of one variable, in node order, in a .npy or .csv file"


@dataclass(frozen=True)
class FieldLayout:
    """n_vars variables side by side along the node axis; grid_shape (H, W) or coordinates [M / n_vars, 2] say where
    each variable's nodes are. At most one of the two is set."""
    n_vars: int
    grid_shape: tuple | None = None
    coordinates: np.ndarray | None = None

    def __post_init__(self):
        if self.grid_shape is not None and self.coordinates is not None:
            raise ValueError("a field layout is a grid or scattered coordinates, not both")

    @property
    def kind(self) -> str:
        """"grid", "coordinates" or "line" (nodes in index order: no 2-D position known)."""
        if self.grid_shape is not None:
            return "grid"
        return "line" if self.coordinates is None else "coordinates"

    def variables(self, field_row: np.ndarray) -> list:
        """One row of nodes [M] -> n_vars arrays of M / n_vars nodes, in variable order."""
        return np.split(np.asarray(field_row), self.n_vars)


def read_field_layout(config) -> FieldLayout:
    """The layout that config.grid_shape ("H W") or config.node_coordinates (a .npy or .csv path, relative to the
    working directory) describe; a line of nodes when both are empty. Raises InputError for a bad coordinates file."""
    if config.grid_shape:
        return FieldLayout(config.n_vars, grid_shape=whole_numbers(config.grid_shape))
    if config.node_coordinates:
        nodes = config.n_nodes_used // config.n_vars
        return FieldLayout(config.n_vars, coordinates=read_coordinates(Path(config.node_coordinates), nodes))
    return FieldLayout(config.n_vars)


def read_coordinates(path: Path, n_nodes: int) -> np.ndarray:
    """A .npy or .csv file with one row per node of one variable and 2 or 3 columns -> read-only float64
    [n_nodes, 2]: x, y. With 3 columns (x, y, z) only x and y are kept, so a 3-D mesh is drawn from above.
    A CSV file may start with one header line."""
    table = _load_table(path)
    if table.ndim != 2 or table.shape[1] not in (2, 3):
        raise InputError(path, f"has shape {list(table.shape)}, not rows of 2 or 3 columns", COORDINATES_FIX)
    if len(table) != n_nodes:
        raise InputError(path, f"has {len(table)} rows but each variable has {n_nodes} nodes", COORDINATES_FIX)
    if not np.isfinite(table).all():
        raise InputError(path, "holds NaN or infinite coordinates", "give a finite x, y for every node")
    coordinates = np.ascontiguousarray(table[:, :2], dtype=np.float64)
    coordinates.setflags(write=False)  # the layout is frozen: its coordinates must not change under it either
    return coordinates


def _load_table(path: Path) -> np.ndarray:
    """The numbers in a .npy or .csv file as float64; InputError when it is missing, unreadable or not numeric."""
    if not path.is_file():
        raise InputError(path, "node_coordinates file does not exist",
                         "give a path relative to the working directory, or leave node_coordinates empty")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise InputError(path, f"has suffix '{path.suffix}', not .npy or .csv", COORDINATES_FIX)
    try:
        table = np.load(path, allow_pickle=False) if suffix == ".npy" else _load_csv(path)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(path, f"cannot be read as a {suffix} table ({error})", COORDINATES_FIX) from None
    if not isinstance(table, np.ndarray) or table.dtype.kind not in "iuf":
        # np.load hands back an NpzFile for a zip archive; strings, booleans and complex numbers are no coordinates
        raise InputError(path, "does not hold one array of real numbers", COORDINATES_FIX)
    return table.astype(np.float64)


def _load_csv(path: Path) -> np.ndarray:
    """Comma-separated numbers, skipping the first line when it is a header (does not parse as numbers)."""
    with open(path) as file:
        first = file.readline()
    try:
        [float(cell) for cell in first.split(",")]
        header = 0
    except ValueError:
        header = 1
    return np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2)
