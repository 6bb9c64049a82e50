"""A design as an XDMF 3 time series (.xdmf with its HDF5 heavy data), as FEniCS, dolfinx, OpenGeoSys, ParaView and
meshio write it: a temporal collection of grids, each a time step with its point (and cell) values, on one mesh.

Read here rather than by meshio, whose reader takes neither OpenGeoSys's hyperslab shorthand
("file.h5:/path|start:stride:count:dims") nor legacy FEniCS's PolyLine cells. The mesh is the first Geometry and
Topology of the file (later steps include it by xi:include); values are read from inline XML or HDF5 DataItems, whole
or through a hyperslab.
"""
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from modules.errors import InputError
from modules.solver_files.results import REEXPORT_FIX, DesignResults, Variable, cell_average, reading

# XDMF cell types -> (meshio type, nodes per cell); Mixed topologies give these by number
TOPOLOGIES = {"polyvertex": ("vertex", 1), "polyline": ("line", 2), "triangle": ("triangle", 3),
              "quadrilateral": ("quad", 4), "tetrahedron": ("tetra", 4), "pyramid": ("pyramid", 5),
              "wedge": ("wedge", 6), "hexahedron": ("hexahedron", 8), "edge_3": ("line3", 3),
              "triangle_6": ("triangle6", 6), "quadrilateral_8": ("quad8", 8), "quadrilateral_9": ("quad9", 9),
              "tetrahedron_10": ("tetra10", 10), "hexahedron_20": ("hexahedron20", 20),
              "hexahedron_27": ("hexahedron27", 27)}
MIXED_CODES = {1: "polyvertex", 2: "polyline", 4: "triangle", 5: "quadrilateral", 6: "tetrahedron", 7: "pyramid",
               8: "wedge", 9: "hexahedron", 34: "edge_3", 35: "quadrilateral_9", 36: "triangle_6",
               37: "quadrilateral_8", 38: "tetrahedron_10", 48: "hexahedron_20", 50: "hexahedron_27"}
XDMF_FIX = "export an XDMF 3 time series with HDF5 or XML data (ParaView, dolfinx, FEniCS, meshio), or a .pvd of .vtu"


class XdmfSeries(DesignResults):
    format = "XDMF time series"

    def __init__(self, name: str, path: Path):
        super().__init__(name, path)
        with reading(path, "XDMF"):
            root = ElementTree.parse(path).getroot()
        version = root.get("Version", "2")
        if root.tag != "Xdmf" or version.split(".")[0] != "3":
            raise InputError(path, f"is XDMF version {version}; only XDMF 3 time series are read",
                             "write it again as XDMF 3 (ParaView: File > Save Data > .xdmf; dolfinx and meshio "
                             "write XDMF 3), or export a .pvd of .vtu files")
        self.root = root
        self._mesh = None

    def _steps(self) -> list:
        """(time, grid) of every time step, in time order."""
        collection = next((grid for grid in self.root.iter("Grid") if grid.get("GridType") == "Collection"
                           and grid.get("CollectionType", "Temporal") == "Temporal"), None)
        grids = ([grid for grid in collection if grid.tag == "Grid"] if collection is not None else
                 [grid for grid in self.root.iter("Grid") if grid.get("GridType", "Uniform") == "Uniform"][:1])
        if not grids:
            raise InputError(self.path, f"design {self.name} holds no grid (no time step)", XDMF_FIX)
        steps = []
        for index, grid in enumerate(grids):
            time = grid.find("Time")
            steps.append((float(time.get("Value")) if time is not None and time.get("Value") else float(index), grid))
        return sorted(steps, key=lambda step: step[0])

    def _read_mesh(self):
        if self._mesh is None:
            geometry, topology = self.root.find(".//Geometry"), self.root.find(".//Topology")
            if geometry is None or topology is None:
                raise InputError(self.path, f"design {self.name} has no Geometry or Topology", XDMF_FIX)
            with reading(self.path, "an XDMF 3 time series"):
                points = self._geometry(geometry)
                blocks = self._topology(topology)
            self._mesh = (np.pad(points, ((0, 0), (0, 3 - points.shape[1]))), blocks)
        return self._mesh

    def _geometry(self, geometry) -> np.ndarray:
        kind = (geometry.get("GeometryType") or geometry.get("Type") or "XYZ").upper()
        items = geometry.findall("DataItem")
        if kind in ("X_Y_Z", "X_Y"):
            return np.stack([self._data(item).ravel() for item in items], axis=1).astype(np.float64)
        if kind not in ("XYZ", "XY"):
            raise InputError(self.path, f"has geometry of type {kind}, not XYZ, XY or X_Y_Z", XDMF_FIX)
        return self._data(items[0]).reshape(-1, len(kind)).astype(np.float64)

    def _topology(self, topology) -> list:
        """[(meshio type, [n, k] nodes)] in the file's cell order (runs of one type for a Mixed topology)."""
        kind = (topology.get("TopologyType") or topology.get("Type") or "").lower()
        data = self._data(topology.find("DataItem")).astype(np.int64).ravel()
        if kind != "mixed":
            if kind not in TOPOLOGIES:
                raise InputError(self.path, f"has cells of type {kind or 'none'}, which this reader does not know",
                                 XDMF_FIX)
            cell_type, width = TOPOLOGIES[kind]
            width = int(topology.get("NodesPerElement", width))
            return [(cell_type, data.reshape(-1, width))]
        blocks, at = [], 0
        while at < len(data):
            name = MIXED_CODES.get(int(data[at]))
            if name is None:
                raise InputError(self.path, f"has a Mixed topology with cell code {data[at]}, which this reader "
                                 "does not know", XDMF_FIX)
            cell_type, width = TOPOLOGIES[name]
            if name in ("polyvertex", "polyline"):
                at, width = at + 1, int(data[at + 1])
            nodes = data[at + 1:at + 1 + width]
            if blocks and blocks[-1][0] == cell_type and len(blocks[-1][1][-1]) == width:
                blocks[-1][1].append(nodes)
            else:
                blocks.append((cell_type, [nodes]))
            at += 1 + width
        return [(cell_type, np.array(rows)) for cell_type, rows in blocks]

    def _data(self, item) -> np.ndarray:
        """The values of a DataItem: inline XML or HDF5, whole or through a hyperslab (ItemType="HyperSlab" or
        OpenGeoSys's "file.h5:/path|start:stride:count:dims"), shaped by its Dimensions."""
        dimensions = [int(size) for size in (item.get("Dimensions") or "").split()]
        if item.get("ItemType", "").lower() == "hyperslab":
            slab, source = item.findall("DataItem")
            start, stride, count = np.array(slab.text.split(), dtype=np.int64).reshape(3, -1)
            return self._data(source)[_slices(start, stride, count)].reshape(dimensions or count)
        kind = item.get("Format", "XML").upper()
        text = (item.text or "").strip()
        if kind == "XML":
            values = np.array(text.split(), dtype=np.float64)
        elif kind == "HDF":
            values = self._hdf(text)
        else:
            raise InputError(self.path, f"keeps its values in {kind} format, which this reader does not read",
                             XDMF_FIX)
        return values.reshape(dimensions) if dimensions and values.size == np.prod(dimensions) else values

    def _hdf(self, text: str) -> np.ndarray:
        import h5py

        location, _, slab = text.partition("|")
        file, _, dataset = location.partition(":")
        with h5py.File(self.path.parent / file.strip(), "r") as handle:
            if not slab:
                return np.asarray(handle[dataset.strip()][()])
            start, stride, count, _ = (np.array(part.split(), dtype=np.int64) for part in slab.split(":"))
            return np.asarray(handle[dataset.strip()][_slices(start, stride, count)])

    def points(self) -> np.ndarray:
        return self._read_mesh()[0]

    def cells(self) -> list:
        return [(cell_type, nodes) for cell_type, nodes in self._read_mesh()[1]]

    def times(self) -> np.ndarray:
        return np.array([time for time, _ in self._steps()])

    def variables(self) -> dict:
        found = {}
        for attribute in self._steps()[0][1].iter("Attribute"):
            center = attribute.get("Center", "Node")
            if center not in ("Node", "Cell"):
                continue
            dimensions = [int(size) for size in (attribute.find("DataItem").get("Dimensions") or "1").split()]
            found[attribute.get("Name")] = Variable(int(np.prod(dimensions[1:])) if len(dimensions) > 1 else 1,
                                                    on_cells=center == "Cell")
        return found

    def read(self, picks: list) -> np.ndarray:
        points, blocks = self._read_mesh()
        n_nodes, average = len(points), None
        steps = self._steps()
        values = np.empty((len(steps), len(picks) * n_nodes), dtype=np.float32)
        for row, (time, grid) in enumerate(steps):
            attributes = {attribute.get("Name"): attribute for attribute in grid.iter("Attribute")}
            for slot, pick in enumerate(picks):
                if pick.name not in attributes:
                    raise InputError(self.path, f"design {self.name}: the step at time {time:g} has no variable "
                                     f"{pick.name}", "export every step with the same variables")
                attribute = attributes[pick.name]
                with reading(self.path, "an XDMF 3 time series"):
                    data = self._data(attribute.find("DataItem"))
                on_cells = attribute.get("Center", "Node") == "Cell"
                data = data.reshape(len(data), -1) if data.ndim > 1 or not on_cells else data
                column = pick.values(data)
                if on_cells:
                    if average is None:
                        average = cell_average([nodes for _, nodes in blocks], n_nodes)
                    column = average(column)
                if len(column) != n_nodes:
                    raise InputError(self.path, f"design {self.name}: {pick.name} has {len(column)} values at time "
                                     f"{time:g} for {n_nodes} {'nodes' if not on_cells else 'cells'}", REEXPORT_FIX)
                values[row, slot * n_nodes:(slot + 1) * n_nodes] = column
        return values


def _slices(start, stride, count) -> tuple:
    return tuple(slice(int(a), int(a) + int(n) * int(s), int(s)) for a, s, n in zip(start, stride, count))
