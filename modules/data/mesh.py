"""The real mesh of a case (condition.txt `mesh_file`): any mesh meshio reads (.vtu, .vtk, .msh, .inp, .xdmf, ...)
whose points are the nodes of one variable, in node order.

It gives the plots coordinates and cells (fields drawn on the cells, not as scattered points) and gives the .xdmf
outputs the mesh ParaView shows. Only the points and cells are used; the file's own point or cell data is ignored.
"""
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modules.errors import InputError

MESH_FIX = ("give a mesh meshio reads (.vtu, .vtk, .msh, .inp, .xdmf, ...) whose points are the nodes of one "
            "variable, in node order, or leave mesh_file empty")
# corner nodes of each 2-D cell type, as triangles (higher-order cells are drawn by their corners)
TRIANGLES_OF = {"triangle": [(0, 1, 2)], "triangle6": [(0, 1, 2)], "triangle7": [(0, 1, 2)],
                "quad": [(0, 1, 2), (0, 2, 3)], "quad8": [(0, 1, 2), (0, 2, 3)], "quad9": [(0, 1, 2), (0, 2, 3)]}


@dataclass(frozen=True, eq=False)
class Mesh:
    """points [P, 2 or 3] float64 and cells ((meshio cell type, [n, nodes per cell] int64), ...), read-only."""
    points: np.ndarray
    cells: tuple

    def triangles(self) -> np.ndarray | None:
        """The 2-D cells as triangles [n, 3] for drawing in x-y; None when the mesh has none (a volume or line
        mesh is drawn from its points)."""
        pieces = [cells[:, list(corners)] for kind, cells in self.cells for corners in TRIANGLES_OF.get(kind, [])]
        return np.concatenate(pieces) if pieces else None


def read_mesh(path: Path, n_nodes: int) -> Mesh:
    """The mesh in path, checked: readable, finite points, exactly n_nodes points (the nodes of one variable), cells
    that name existing points. InputError (naming the file and the fix) otherwise."""
    import meshio  # imported here: only cases with a mesh_file pay for it

    if not path.is_file():
        raise InputError(path, "mesh_file does not exist", "give a path relative to the working directory, or leave "
                         "mesh_file empty")
    said = io.StringIO()
    try:  # meshio prints its reasons and, for a file no reader takes, calls sys.exit: both are kept here
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            mesh = meshio.read(path)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - ReadError, KeyError, ValueError, ... by format
        reason = " ".join(said.getvalue().split()) or f"{type(error).__name__}: {error}"
        raise InputError(path, f"cannot be read as a mesh ({reason})", MESH_FIX) from None
    points = np.ascontiguousarray(mesh.points, dtype=np.float64)
    if len(points) != n_nodes:
        raise InputError(path, f"has {len(points)} points but each variable has {n_nodes} nodes", MESH_FIX)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise InputError(path, f"has points of {points.shape[1:]} coordinates, not 2 or 3", MESH_FIX)
    if not np.isfinite(points).all():
        raise InputError(path, "holds NaN or infinite point coordinates", "give a finite position for every point")
    cells = []
    for block in mesh.cells:
        data = np.ascontiguousarray(block.data, dtype=np.int64)
        if data.size and (data.min() < 0 or data.max() >= n_nodes):
            raise InputError(path, f"has {block.type} cells that name points outside 0..{n_nodes - 1}", MESH_FIX)
        data.setflags(write=False)
        cells.append((block.type, data))
    points.setflags(write=False)
    return Mesh(points, tuple(cells))


def grid_mesh(grid_shape) -> Mesh:
    """An H x W grid of nodes (row-major: node index row * W + column) at integer positions, with quad cells."""
    rows, columns = grid_shape
    column, row = np.meshgrid(np.arange(columns, dtype=np.float64), np.arange(rows, dtype=np.float64))
    points = np.stack([column.ravel(), row.ravel()], axis=1)
    corner = (np.arange(rows - 1)[:, None] * columns + np.arange(columns - 1)[None, :]).ravel()
    quads = np.stack([corner, corner + 1, corner + columns + 1, corner + columns], axis=1)
    return Mesh(points, (("quad", quads),) if len(quads) else (("vertex", np.arange(rows * columns)[:, None]),))


def point_mesh(points: np.ndarray) -> Mesh:
    """Scattered nodes without cells (node_coordinates): one vertex cell per node, so ParaView shows the points."""
    return Mesh(points, (("vertex", np.arange(len(points))[:, None]),))


def line_mesh(n_nodes: int) -> Mesh:
    """Nodes without a known position: a line of nodes at x = node index, joined by line cells."""
    points = np.stack([np.arange(n_nodes, dtype=np.float64), np.zeros(n_nodes)], axis=1)
    if n_nodes < 2:
        return point_mesh(points)
    return Mesh(points, (("line", np.stack([np.arange(n_nodes - 1), np.arange(1, n_nodes)], axis=1)),))
