"""The designs of a results folder, in order, read one at a time and checked to form one family: the same mesh (node
count and positions), the same time values, the chosen variables present and finite. Any break is one InputError
naming the design and its file.

A results folder holds one entry per design: files (.pvd, .xdmf, Exodus .e/.exo/.ex2) each a design, or, when it has
none, folders, each holding one design's .pvd, .xdmf, Exodus file, d3plot series or .vtu files.
"""
from pathlib import Path

import numpy as np

from modules.data.design_inputs import natural_key
from modules.errors import InputError
from modules.solver_files.d3plot import D3plotSeries
from modules.solver_files.exodus import ExodusFile
from modules.solver_files.vtu_series import VtuSeries
from modules.solver_files.xdmf_series import XdmfSeries

EXODUS_SUFFIXES = (".e", ".exo", ".ex2", ".exodus")
DESIGN_SUFFIXES = (".pvd", ".xdmf", *EXODUS_SUFFIXES)
LAYOUT_FIX = ("put one entry per design in the folder: a .pvd, .xdmf or Exodus file each, or a folder each holding "
              "that design's .pvd, .xdmf, Exodus file, d3plot series or .vtu files")
# a design's node positions may differ from the first design's by this share of the mesh's size (float32 rounding
# of coordinates is 6e-8 of it), and its time values by this share of the time span
POSITION_TOLERANCE = 1e-6
TIME_TOLERANCE = 1e-6


def find_designs(folder: Path) -> list:
    """The designs in folder, in natural order of their names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder of simulation results", LAYOUT_FIX)
    entries = sorted((path for path in folder.iterdir() if not path.name.startswith(".")),
                     key=lambda path: natural_key(path.name))
    files = [path for path in entries if path.is_file() and path.suffix.lower() in DESIGN_SUFFIXES]
    if files:
        return [open_design(path.stem, path) for path in files]
    folders = [path for path in entries if path.is_dir()]
    if not folders:
        vtu = any(path.suffix.lower() == ".vtu" for path in entries)
        raise InputError(folder, "holds .vtu files but no design folders" if vtu else
                         "holds no simulation results (no .pvd, .xdmf, Exodus or d3plot)", LAYOUT_FIX)
    return [open_design(path.name, path) for path in folders]


def open_design(name: str, path: Path):
    """The reader of one entry: a file by its suffix, a folder by what it holds."""
    if path.is_file():
        suffix = path.suffix.lower()
        return (VtuSeries.from_pvd(name, path) if suffix == ".pvd" else XdmfSeries(name, path) if suffix == ".xdmf"
                else ExodusFile(name, path))
    inside = {item.name: item for item in path.iterdir()}
    found = [item for item in inside.values() if item.suffix.lower() in DESIGN_SUFFIXES]
    if len(found) > 1:
        names = ", ".join(sorted(item.name for item in found))
        raise InputError(path, f"design {name} holds {len(found)} result files ({names})", "keep one per design folder")
    if found:
        return open_design(name, found[0])
    if "d3plot" in inside:
        return D3plotSeries(name, inside["d3plot"])
    if any(item.suffix.lower() == ".vtu" for item in inside.values()):
        return VtuSeries.from_folder(name, path)
    raise InputError(path, f"design {name} holds no simulation results (no .pvd, .xdmf, Exodus, d3plot or .vtu)",
                     "remove the folder or put the design's results in it")


def order_by_column(designs: list, table_path: Path, column: str):
    """The designs in the row order of a CSV whose column names each row's design (by its entry name, with or
    without suffix). Returns (designs, the other columns' names, their values [n, P] float64)."""
    import csv

    with open(table_path, newline="") as handle:
        rows = list(csv.reader(handle))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows or column not in [cell.strip() for cell in rows[0]]:
        raise InputError(table_path, f"has no column '{column}' in its header line",
                         "give --order_by=FILE.csv:COLUMN with a column that names each row's design")
    header = [cell.strip() for cell in rows[0]]
    at = header.index(column)
    by_name = {}
    for design in designs:
        by_name[design.name] = by_name[design.path.name] = design
    ordered, parameters = [], []
    for line, row in enumerate(rows[1:], start=2):
        name = row[at].strip() if at < len(row) else ""
        if name not in by_name:
            raise InputError(table_path, f"names design '{name}', which is not in the results folder",
                             "fix the name or add that design's results", line=line)
        if by_name[name] in ordered:
            raise InputError(table_path, f"names design '{name}' twice", "give each design one row", line=line)
        ordered.append(by_name[name])
        try:
            parameters.append([float(cell) for index, cell in enumerate(row) if index != at])
        except ValueError:
            raise InputError(table_path, "has a parameter that is not a number", "give numbers in every column but "
                             f"{column}", line=line) from None
    left = [design.name for design in designs if design not in ordered]
    if left:
        raise InputError(table_path, f"has no row for design{'s' if len(left) > 1 else ''} {', '.join(left[:3])}"
                         f"{' ...' if len(left) > 3 else ''}", "add a row for every design in the results folder")
    return ordered, [name for index, name in enumerate(header) if index != at], np.array(parameters)


class Family:
    """Checks each design against the first: call check(design) before read, checked_values(design, values) after."""

    def __init__(self, first):
        self.first = first
        self.points, self.times = first.points(), first.times()
        if len(self.times) == 0:
            raise InputError(first.path, f"design {first.name} holds no time step", "export the time steps")
        self.size = float(np.linalg.norm(np.ptp(self.points, axis=0))) or 1.0
        self.span = float(np.ptp(self.times)) or 1.0

    def check(self, design) -> None:
        points, times = design.points(), design.times()
        if len(points) != len(self.points):
            raise InputError(design.path, f"design {design.name} has {len(points)} nodes, design {self.first.name} "
                             f"{len(self.points)}", "a family shares one mesh: map the designs onto one mesh first "
                             "(or import the designs of each mesh as a case of their own)")
        moved = np.abs(points - self.points).max(axis=1)
        if moved.max() > POSITION_TOLERANCE * self.size:
            node = int(moved.argmax())
            raise InputError(design.path, f"design {design.name}'s node {node} is at {points[node].tolist()}, design "
                             f"{self.first.name}'s at {self.points[node].tolist()} (the meshes differ)",
                             "a family shares one mesh: map the designs onto one mesh first")
        if len(times) != len(self.times):
            raise InputError(design.path, f"design {design.name} has {len(times)} time steps, design "
                             f"{self.first.name} {len(self.times)}", "export every design at the same output times")
        shift = np.abs(times - self.times)
        if shift.max() > TIME_TOLERANCE * self.span:
            step = int(shift.argmax())
            raise InputError(design.path, f"design {design.name}'s step {step} is at time {times[step]:g}, design "
                             f"{self.first.name}'s at {self.times[step]:g}", "export every design at the same "
                             "output times")

    def checked_values(self, design, values: np.ndarray, picks: list) -> np.ndarray:
        if not np.isfinite(values).all():
            step, column = (int(index[0]) for index in np.nonzero(~np.isfinite(values)))
            pick = picks[column // len(self.points)]
            raise InputError(design.path, f"design {design.name}: {pick} is NaN or infinite at time step {step} "
                             f"(time {self.times[step]:g}), node {column % len(self.points)}",
                             "re-run or leave out that design")
        return values
