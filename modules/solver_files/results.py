"""What every reader of a solver's result files gives (DesignResults), the values picked from them (--fields) and
cell values averaged onto the nodes.

A design is read whole, one at a time: its mesh (points [M, 3] and cells), its time values [T], the names of its point
and cell variables, and the picked values [T, n_picks * M] float32, the variables side by side along the node axis
(as num_var means).
"""
import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modules.errors import InputError

AXES = {"x": 0, "y": 1, "z": 2}
MAGNITUDE = "magnitude"
FIELDS_FIX = "write --fields=NAME[,NAME] with the names found (a vector as NAME:magnitude or NAME:x, NAME:y, NAME:z)"
REEXPORT_FIX = ("check that the file is complete (a run stopped while writing leaves a truncated file) and written by "
                "the solver's own export, then run again")


@dataclass(frozen=True)
class Variable:
    """A variable of a design's results: its components per point (or cell) and whether it lives on cells (then
    averaged onto the nodes of each cell)."""
    components: int
    on_cells: bool = False

    def describe(self) -> str:
        kind = "scalar" if self.components == 1 else f"{self.components} components"
        return f"{kind}{', on cells' if self.on_cells else ''}"


@dataclass(frozen=True)
class Pick:
    """One variable to import: name, and for a vector a component index or "magnitude"."""
    name: str
    component: int | str | None = None

    def __str__(self) -> str:
        return self.name if self.component is None else f"{self.name}:{self.component}"

    def values(self, array: np.ndarray) -> np.ndarray:
        """One point (or cell) array [n] or [n, C] -> the picked values [n]."""
        array = np.asarray(array)
        if array.ndim == 1 or self.component is None:
            return array.reshape(len(array))
        if self.component == MAGNITUDE:
            return np.sqrt(np.einsum("ij,ij->i", array.reshape(len(array), -1), array.reshape(len(array), -1)))
        return array.reshape(len(array), -1)[:, self.component]


class DesignResults:
    """One design's results; subclasses read one format. name: how the design is called in messages and in the
    import record; path: the file (or folder) to name in messages."""
    format = ""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, Path(path)

    def points(self) -> np.ndarray:
        """The node positions [M, 3] float64."""
        raise NotImplementedError

    def cells(self) -> list:
        """[(meshio cell type, [n, nodes per cell] int64)] of the mesh file the case keeps."""
        raise NotImplementedError

    def times(self) -> np.ndarray:
        """The time value of each stored step [T] float64."""
        raise NotImplementedError

    def variables(self) -> dict:
        """{name: Variable} of the values the design holds."""
        raise NotImplementedError

    def read(self, picks: list) -> np.ndarray:
        """The picked values [T, len(picks) * M] float32, each pick's M nodes side by side, steps in time order."""
        raise NotImplementedError

    def missing(self, pick: Pick) -> InputError:
        found = ", ".join(sorted(self.variables())) or "none"
        return InputError(self.path, f"design {self.name} has no variable {pick.name} (it has: {found})",
                          "export every design with the same variables, or pick with --fields those they all have")


def parse_fields(text: str, design: DesignResults) -> list:
    """--fields=NAME[,NAME] (NAME:magnitude, NAME:x|y|z or NAME:K for a vector) -> [Pick], checked against the first
    design's variables. A vector needs its component said; a name not there is an error naming those that are."""
    variables = design.variables()
    picks = []
    for word in (part.strip() for part in text.split(",")):
        name, _, component = word.partition(":")
        if not name:
            raise InputError("--fields", f"'{text}' names an empty variable", FIELDS_FIX)
        if name not in variables:
            raise InputError("--fields", f"{design.path} has no variable {name} (it has: {listing(variables)})",
                             FIELDS_FIX)
        size = variables[name].components
        if not component and size > 1:
            raise InputError("--fields", f"{name} has {size} components", f"write {name}:magnitude or one component "
                             f"({', '.join(f'{name}:{axis}' for axis in component_names(size))})")
        if component:
            index = AXES.get(component.lower(), component.lower())
            if index not in (MAGNITUDE, *range(size)) and not (str(index).isdigit() and int(index) < size):
                raise InputError("--fields", f"{word}: {name} has {size} component(s), no '{component}'",
                                 f"write {name}:magnitude or one of {', '.join(component_names(size))}")
            component = index if index == MAGNITUDE else int(index)
        pick = Pick(name, component if size > 1 else None)
        if pick in picks:
            raise InputError("--fields", f"{word} is named twice", "name each value once")
        picks.append(pick)
    return picks


def component_names(size: int) -> list:
    return list(AXES)[:size] if size <= 3 else [str(index) for index in range(size)]


def listing(variables: dict) -> str:
    return "; ".join(f"{name} ({variable.describe()})" for name, variable in sorted(variables.items())) or "none"


def cell_average(cell_blocks: list, n_nodes: int):
    """An operator that averages cell values onto nodes: each node gets the mean over the cells that hold it (a
    node named twice by one degenerate cell counts that cell once; a node in no cell gets 0). cell_blocks: [[n, k]
    node indices] in the order the cell values come (block by block). Returns apply(values [..., cells]) ->
    [..., n_nodes]."""
    import scipy.sparse

    rows, columns, start = [], [], 0
    for block in cell_blocks:
        block = np.asarray(block, dtype=np.int64)
        rows.append(block.ravel())
        columns.append(np.repeat(np.arange(start, start + len(block)), block.shape[1] if block.ndim == 2 else 1))
        start += len(block)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    columns = np.concatenate(columns) if columns else np.zeros(0, np.int64)
    touches = scipy.sparse.coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(n_nodes, start)).tocsr()
    touches.sum_duplicates()
    touches.data[:] = 1.0
    counts = np.asarray(touches.sum(axis=1)).ravel()
    average = scipy.sparse.diags(np.divide(1.0, counts, out=np.zeros(n_nodes), where=counts > 0)) @ touches

    def apply(values):
        values = np.asarray(values, dtype=np.float64)
        flat = values.reshape(-1, values.shape[-1])
        return (average @ flat.T).T.reshape(*values.shape[:-1], n_nodes)

    return apply


@contextlib.contextmanager
def reading(path, what: str, capture: bool = True):
    """A reader's failure (any exception but InputError) becomes one line naming the file. capture: what a library
    prints on the way is kept out of the user's terminal and said in that line (it redirects the process's stdout:
    False for this project's own readers, which print nothing, so that they can run on threads)."""
    said = io.StringIO()
    quiet = logging.getLogger("lasso")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with (contextlib.redirect_stdout(said) if capture else contextlib.nullcontext()), \
                (contextlib.redirect_stderr(said) if capture else contextlib.nullcontext()):
            yield
    except InputError:
        raise
    except (Exception, SystemExit) as error:  # noqa: BLE001 - each library raises its own kinds for a bad file
        reason = " ".join(said.getvalue().split())[:200] or f"{type(error).__name__}: {error}"[:200]
        raise InputError(path, f"cannot be read as {what} ({reason})", REEXPORT_FIX) from None
    finally:
        quiet.setLevel(level)
