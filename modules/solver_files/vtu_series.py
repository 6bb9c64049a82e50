"""A design as a series of VTU files, one per time step: listed with their times by a ParaView .pvd collection, or a
folder of .vtu files taken in natural order (times from each file's TimeValue, else the step numbers)."""
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from modules.data.design_inputs import natural_key
from modules.errors import InputError
from modules.solver_files.results import REEXPORT_FIX, DesignResults, Variable, cell_average, reading
from modules.solver_files.vtu_file import VtuFile

READERS = 2  # threads that read and decode a design's step files
PVD_FIX = ("give a .pvd that lists one .vtu per time step (ParaView: File > Save Data as a .pvd), or a folder of .vtu "
           "files")


class VtuSeries(DesignResults):
    format = "VTU series"

    def __init__(self, name: str, path: Path, steps: list, times: np.ndarray | None):
        super().__init__(name, path)
        self.steps, self._times = steps, times
        self._first, self._average = None, None

    @classmethod
    def from_pvd(cls, name: str, pvd: Path) -> "VtuSeries":
        """The .vtu files and times a .pvd lists (one part per time step), in time order."""
        with reading(pvd, "a ParaView .pvd collection"):
            root = ElementTree.parse(pvd).getroot()
        if root.tag != "VTKFile" or root.get("type") != "Collection":
            raise InputError(pvd, "is not a ParaView collection (<VTKFile type=\"Collection\">)", PVD_FIX)
        try:
            entries = [(float(item.get("timestep", index)), item.get("part", "0"), item.get("file"))
                       for index, item in enumerate(root.iter("DataSet"))]
        except ValueError as error:
            raise InputError(pvd, f"has a DataSet timestep that is not a number ({error})", PVD_FIX) from None
        if not entries or any(file is None for _, _, file in entries):
            raise InputError(pvd, "lists no DataSet file" if not entries else "has a DataSet without a file", PVD_FIX)
        if len({part for _, part, _ in entries}) > 1:
            raise InputError(pvd, "lists several parts per time step (a partitioned mesh)", "merge the parts into one "
                             ".vtu per time step (ParaView: Merge Blocks, then save), then import again")
        entries.sort(key=lambda entry: entry[0])
        steps = [pvd.parent / file for _, _, file in entries]
        for step in steps:
            if step.suffix.lower() != ".vtu":
                raise InputError(pvd, f"lists {step.name}, not a .vtu file", "export the time steps as .vtu (a "
                                 ".pvtu of pieces: merge them into one .vtu per step first)")
            if not step.is_file():
                raise InputError(pvd, f"lists {step}, which does not exist", REEXPORT_FIX)
        return cls(name, pvd, steps, np.array([time for time, _, _ in entries], dtype=np.float64))

    @classmethod
    def from_folder(cls, name: str, folder: Path) -> "VtuSeries":
        steps = sorted((path for path in folder.iterdir() if path.suffix.lower() == ".vtu"),
                       key=lambda path: natural_key(path.name))
        return cls(name, folder, steps, None)

    @staticmethod
    def _open(path: Path) -> VtuFile:
        with reading(path, "a VTU file", capture=False):
            return VtuFile(path)

    def first(self) -> VtuFile:
        if self._first is None:
            self._first = self._open(self.steps[0])
        return self._first

    def points(self) -> np.ndarray:
        with reading(self.steps[0], "a VTU file"):
            return self.first().points()

    def cells(self) -> list:
        with reading(self.steps[0], "a VTU file"):
            return [(kind, nodes) for kind, nodes in self.first().cell_blocks() if isinstance(kind, str)]

    def times(self) -> np.ndarray:
        if self._times is None:  # a folder of .vtu: each file's TimeValue when every one has it
            values = [self._open(step).time_value() for step in self.steps]
            self._times = (np.array(values, dtype=np.float64) if None not in values
                           else np.arange(len(self.steps), dtype=np.float64))
        return self._times

    def variables(self) -> dict:
        first = self.first()
        found = {name: Variable(size) for name, size in first.names(b"PointData").items()}
        found.update({name: Variable(size, on_cells=True) for name, size in first.names(b"CellData").items()
                      if name not in found})
        return found

    def read(self, picks: list) -> np.ndarray:
        first = self.first()
        n_nodes, self._average = first.n_points, None
        if any(pick.name in first.names(b"CellData") for pick in picks):
            with reading(self.steps[0], "a VTU file", capture=False):
                self._average = cell_average([nodes for _, nodes in first.cell_blocks()], n_nodes)
        values = np.empty((len(self.steps), len(picks) * n_nodes), dtype=np.float32)
        self._take(first, 0, picks, values)
        self._first = None  # read: the file's bytes are not held while the rest is read
        # the other steps on READERS threads, each reading (the GIL released), inflating and writing its own row
        with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="vtu-reader") as readers:
            steps = [readers.submit(self._take, None, index, picks, values) for index in range(1, len(self.steps))]
            try:
                for step in steps:
                    step.result()
            except BaseException:
                readers.shutdown(cancel_futures=True)
                raise
        return values

    def _take(self, step: VtuFile | None, index: int, picks: list, values: np.ndarray) -> None:
        """Step index's picked values into values[index] (the step's file opened here when step is None), cell values
        averaged onto the nodes."""
        path = self.steps[index]
        step = self._open(path) if step is None else step
        n_nodes = values.shape[1] // len(picks)
        if step.n_points != n_nodes:
            raise InputError(path, f"design {self.name}: time step {index} has {step.n_points} nodes, its first step "
                             f"{n_nodes}", "export every step on the design's one mesh")
        point_names, cell_names = step.names(b"PointData"), step.names(b"CellData")
        for slot, pick in enumerate(picks):
            with reading(path, "a VTU file", capture=False):
                if pick.name in point_names:
                    column = pick.values(step.array(b"PointData", pick.name))
                elif pick.name in cell_names and self._average is not None:
                    column = self._average(pick.values(step.array(b"CellData", pick.name)))
                else:
                    raise InputError(path, f"design {self.name}: time step {index} has no variable {pick.name}",
                                     "export every step with the same variables")
            if len(column) != n_nodes:
                raise InputError(path, f"design {self.name}: {pick.name} has {len(column)} values at time step "
                                 f"{index} for {n_nodes} {'cells' if pick.name in cell_names else 'nodes'}",
                                 REEXPORT_FIX)
            values[index, slot * n_nodes:(slot + 1) * n_nodes] = column
