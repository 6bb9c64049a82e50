"""Where the nodes of a field sit in space, so a field row [M] can be drawn as 2-D maps.

A field stores its n_vars variables side by side along the node axis, M / n_vars nodes each. Each variable's nodes
are either an H x W grid (row-major), a mesh (mesh_file: points and cells), scattered points with x, y coordinates
read from a file, or, with none of them, a line of nodes in index order.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modules.data.mesh import Mesh, grid_mesh, line_mesh, point_mesh, read_mesh
from modules.errors import InputError

COORDINATES_FIX = "give one row of x, y (or x, y, z) per node of one variable, in node order, in a .npy or .csv file"


@dataclass(frozen=True)
class FieldLayout:
    """n_vars variables side by side along the node axis; grid_shape (H, W) or coordinates [M / n_vars, 2] say where
    each variable's nodes are. At most one of the two is set. With coordinates, mesh holds the nodes' full positions
    (x, y or x, y, z) and the cells when mesh_file gave them; position_key names the condition.txt key they came
    from."""
    n_vars: int
    grid_shape: tuple | None = None
    coordinates: np.ndarray | None = None
    mesh: Mesh | None = None
    position_key: str = "node_coordinates"

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

    def triangles(self) -> np.ndarray | None:
        """The mesh's 2-D cells as triangles [n, 3] to draw fields on; None without cells (Delaunay then)."""
        return None if self.mesh is None else self.mesh.triangles()

    def output_mesh(self, n_nodes: int) -> Mesh:
        """What the .xdmf outputs show the fields on: the mesh, the grid as quads, the scattered nodes as points,
        or a line of nodes in index order."""
        if self.mesh is not None:
            return self.mesh
        if self.grid_shape is not None:
            return grid_mesh(self.grid_shape)
        return line_mesh(n_nodes)


def node_positions(layout: FieldLayout) -> np.ndarray | None:
    """Each variable's node positions [M / n_vars, 2]: a grid's (column, row) indices or the coordinates; None for a
    line of nodes (no position known)."""
    if layout.grid_shape is not None:
        rows, columns = np.meshgrid(np.arange(layout.grid_shape[0]), np.arange(layout.grid_shape[1]), indexing="ij")
        return np.stack([columns.ravel(), rows.ravel()], axis=1).astype(np.float64)
    return layout.coordinates


def read_field_layout(config) -> FieldLayout:
    """The layout that config.grid_shape ("H W"), config.mesh_file (a mesh meshio reads) or config.node_coordinates
    (a .npy or .csv path) describe, paths relative to the working directory; a line of nodes when all are empty.
    Raises InputError for a bad coordinates or mesh file."""
    nodes = config.n_nodes_used // config.n_vars
    if config.grid:
        return FieldLayout(config.n_vars, grid_shape=config.grid)
    if config.mesh_file:
        mesh = read_mesh(Path(config.mesh_file), nodes)
        return FieldLayout(config.n_vars, coordinates=_read_only(mesh.points[:, :2]), mesh=mesh,
                           position_key="mesh_file")
    if config.node_coordinates:
        points = read_points(Path(config.node_coordinates), nodes)
        return FieldLayout(config.n_vars, coordinates=_read_only(points[:, :2]), mesh=point_mesh(points))
    return FieldLayout(config.n_vars)


def read_saved_layout(config) -> FieldLayout:
    """read_field_layout for the config saved with a model (--predict, --reconstruct): its mesh_file or
    node_coordinates path is relative to the case folder the model was trained in, which the fix says."""
    try:
        return read_field_layout(config)
    except InputError as error:
        raise InputError(error.path, error.problem, "run the command from the case folder the model was trained in "
                         "(the saved config's paths are relative to it), or write .npy, which needs no mesh") from None


def read_points(path: Path, n_nodes: int) -> np.ndarray:
    """A .npy or .csv file (a CSV may start with one header line) with one row per node of one variable and 2 or 3
    columns (x, y[, z]) -> read-only float64 [n_nodes, 2 or 3]."""
    table = _load_table(path)
    if table.ndim != 2 or table.shape[1] not in (2, 3):
        raise InputError(path, f"has shape {list(table.shape)}, not rows of 2 or 3 columns", COORDINATES_FIX)
    if len(table) != n_nodes:
        raise InputError(path, f"has {len(table)} rows but each variable has {n_nodes} nodes", COORDINATES_FIX)
    if not np.isfinite(table).all():
        raise InputError(path, "holds NaN or infinite coordinates", "give a finite x, y for every node")
    return _read_only(table)


def _read_only(values: np.ndarray) -> np.ndarray:
    """A contiguous float64 copy that cannot be written: the layout is frozen, its arrays must not change either."""
    values = np.array(values, dtype=np.float64, order="C")
    values.setflags(write=False)
    return values


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
