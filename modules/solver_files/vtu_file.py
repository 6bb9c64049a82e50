"""One VTK XML unstructured grid file (.vtu), its arrays decoded only when asked.

meshio decodes every array of a file (and turns raw appended data into base64 before reading it), several times slower
than reading the file: a series of a few thousand files would import far below the disk's speed. Here the file is
read once, its tags are found by a scan of the bytes, and only the arrays asked for are decoded. Every encoding VTK
writes is read: ascii, inline base64 ("binary"), appended raw or base64; uncompressed or zlib/lzma-compressed blocks;
UInt32 or UInt64 headers; either byte order.
"""
import base64
import lzma
import re
import zlib
from pathlib import Path

import numpy as np

from modules.errors import InputError
from modules.solver_files.results import REEXPORT_FIX

DTYPES = {"Int8": "i1", "UInt8": "u1", "Int16": "i2", "UInt16": "u2", "Int32": "i4", "UInt32": "u4", "Int64": "i8",
          "UInt64": "u8", "Float32": "f4", "Float64": "f8"}
COMPRESSORS = {"vtkZLibDataCompressor": zlib.decompress, "vtkLZMADataCompressor": lzma.decompress}
# VTK cell type numbers -> meshio cell types (cells of other types are averaged over but not kept in the mesh file)
CELL_TYPES = {1: "vertex", 3: "line", 5: "triangle", 9: "quad", 10: "tetra", 12: "hexahedron", 13: "wedge",
              14: "pyramid", 21: "line3", 22: "triangle6", 23: "quad8", 24: "tetra10", 25: "hexahedron20",
              28: "quad9", 29: "hexahedron27"}
SECTIONS = (b"PointData", b"CellData", b"Points", b"Cells", b"FieldData")
TAG = re.compile(rb"<(/?)(VTKFile|Piece|PointData|CellData|Points|Cells|FieldData|DataArray|AppendedData)\b"
                 rb"([^>]*?)(/?)>")
ATTRIBUTE = re.compile(rb'([A-Za-z_]+)\s*=\s*"([^"]*)"')


class VtuFile:
    """arrays: {(section, name): (attributes, start, end)} of the DataArray tags (section: b"PointData", b"CellData",
    b"Points", b"Cells" or b"FieldData"; start:end the inline text); n_points and n_cells of its one piece."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.raw = self.path.read_bytes()
        self.arrays, self.appended, self.n_points, self.n_cells = {}, None, None, None
        header = {}
        sections = []
        at = 0
        while (match := TAG.search(self.raw, at)) is not None:  # each array's text is stepped over, not scanned
            closing, name, attributes, empty = match.groups()
            at = match.end()
            if name == b"AppendedData":
                if not closing:
                    encoding = dict(ATTRIBUTE.findall(attributes)).get(b"encoding", b"raw")
                    start = self.raw.index(b"_", match.end()) + 1
                    self.appended = (encoding, start)
                break  # nothing but data after it
            if name in SECTIONS:
                if closing:
                    sections.pop() if sections else None
                elif not empty:
                    sections.append(name)
            elif name == b"VTKFile" and not closing:
                header = {key.decode(): value.decode() for key, value in ATTRIBUTE.findall(attributes)}
            elif name == b"Piece" and not closing:
                if self.n_points is not None:
                    raise InputError(self.path, "holds several pieces", "merge them into one piece (ParaView: Merge "
                                     "Blocks), then import again")
                values = dict(ATTRIBUTE.findall(attributes))
                self.n_points = int(values.get(b"NumberOfPoints", 0))
                self.n_cells = int(values.get(b"NumberOfCells", 0))
            elif name == b"DataArray" and not closing and sections:
                values = {key.decode(): value.decode() for key, value in ATTRIBUTE.findall(attributes)}
                # an array's text (numbers or base64) holds no '<': a search for one byte finds its end fast
                end = match.end() if empty else self.raw.index(b"<", match.end())
                self.arrays[(sections[-1], values.get("Name", ""))] = (values, match.end(), end)
                at = end
        if header.get("type") != "UnstructuredGrid" or self.n_points is None:
            raise InputError(self.path, "is not a VTK XML unstructured grid (<VTKFile type=\"UnstructuredGrid\">)",
                             REEXPORT_FIX)
        order = "<" if header.get("byte_order", "LittleEndian") == "LittleEndian" else ">"
        self.order = order
        self.header_type = np.dtype(order + DTYPES[header.get("header_type", "UInt32")])
        compressor = header.get("compressor")
        if compressor and compressor not in COMPRESSORS:
            raise InputError(self.path, f"is compressed with {compressor}, which this reader does not take",
                             "write it with zlib (ParaView's default) or without compression")
        self.decompress = COMPRESSORS.get(compressor)

    def names(self, section: bytes) -> dict:
        """{array name: components} of a section."""
        return {name: int(values.get("NumberOfComponents", 1)) for (where, name), (values, _, _) in self.arrays.items()
                if where == section}

    def array(self, section: bytes, name: str | None = None) -> np.ndarray:
        """The array (the section's first when name is None) [n] or [n, components], in its own dtype."""
        key = next((key for key in self.arrays if key[0] == section and (name is None or key[1] == name)), None)
        if key is None:
            raise InputError(self.path, f"has no {section.decode()} array {name or ''}".rstrip(), REEXPORT_FIX)
        values, start, end = self.arrays[key]
        dtype = np.dtype(self.order + DTYPES[values.get("type", "Float32")])
        kind = values.get("format", "ascii")
        try:
            if kind == "ascii":
                data = np.array(self.raw[start:end].split(), dtype=np.float64).astype(dtype)
            elif kind == "binary":
                data = self._base64(b"".join(self.raw[start:end].split()), dtype)
            elif kind == "appended" and self.appended is not None:
                encoding, origin = self.appended
                at = origin + int(values.get("offset", 0))
                data = self._raw(at, dtype) if encoding == b"raw" else self._base64(self.raw[at:], dtype)
            else:
                raise ValueError(f"unknown format '{kind}'")
        except (ValueError, IndexError, zlib.error, lzma.LZMAError) as error:
            raise InputError(self.path, f"has an array {key[1]} that cannot be decoded ({error})",
                             REEXPORT_FIX) from None
        components = int(values.get("NumberOfComponents", 1))
        return data.reshape(-1, components) if components > 1 else data

    def _raw(self, at: int, dtype) -> np.ndarray:
        size = self.header_type.itemsize
        if self.decompress is None:
            count = int(np.frombuffer(self.raw, self.header_type, 1, at)[0])
            return _exact(np.frombuffer(self.raw, np.uint8, count, at + size), dtype)
        blocks = int(np.frombuffer(self.raw, self.header_type, 1, at)[0])
        sizes = np.frombuffer(self.raw, self.header_type, blocks, at + 3 * size).astype(np.int64)
        start = at + (3 + blocks) * size
        edges = start + np.concatenate([[0], np.cumsum(sizes)])
        return _exact(b"".join(self.decompress(self.raw[a:b]) for a, b in zip(edges[:-1], edges[1:])), dtype)

    def _base64(self, text: bytes, dtype) -> np.ndarray:
        """Base64 data: a header then the values, encoded apart (VTK) or together (meshio, uncompressed)."""
        size = self.header_type.itemsize
        head = _b64_chars(size)
        first = np.frombuffer(base64.b64decode(text[:head])[:size], self.header_type)[0]
        if self.decompress is None:
            count = int(first)
            if text[head - 1:head] == b"=":  # the header was encoded on its own
                return _exact(base64.b64decode(text[head:head + _b64_chars(count)])[:count], dtype)
            return _exact(base64.b64decode(text[:_b64_chars(size + count)])[size:size + count], dtype)
        head = _b64_chars(size * (3 + int(first)))
        sizes = np.frombuffer(base64.b64decode(text[:head]), self.header_type)[3:].astype(np.int64)
        packed = base64.b64decode(text[head:head + _b64_chars(int(sizes.sum()))])
        edges = np.concatenate([[0], np.cumsum(sizes)])
        return _exact(b"".join(self.decompress(packed[a:b]) for a, b in zip(edges[:-1], edges[1:])), dtype)

    def points(self) -> np.ndarray:
        points = np.asarray(self.array(b"Points"), dtype=np.float64).reshape(self.n_points, -1)
        return np.pad(points, ((0, 0), (0, 3 - points.shape[1])))

    def cell_blocks(self) -> list:
        """[(meshio type or VTK type number, [n, nodes per cell])] in the file's cell order, runs of one type."""
        connectivity = np.asarray(self.array(b"Cells", "connectivity"), dtype=np.int64)
        ends = np.asarray(self.array(b"Cells", "offsets"), dtype=np.int64)
        if len(ends) == self.n_cells + 1 and ends[0] == 0:
            ends = ends[1:]  # offsets that also give the first cell's start
        types = np.asarray(self.array(b"Cells", "types"), dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        widths = ends - starts
        change = np.flatnonzero((np.diff(types) != 0) | (np.diff(widths) != 0)) + 1
        blocks = []
        for first, last in zip(np.concatenate([[0], change]), np.concatenate([change, [len(types)]])):
            width = int(widths[first])
            nodes = connectivity[starts[first]:starts[first] + width * (last - first)].reshape(last - first, width)
            blocks.append((CELL_TYPES.get(int(types[first]), int(types[first])), nodes))
        return blocks

    def time_value(self) -> float | None:
        """The file's TimeValue field, when it has one."""
        if (b"FieldData", "TimeValue") not in self.arrays:
            return None
        return float(np.ravel(self.array(b"FieldData", "TimeValue"))[0])


def _b64_chars(size: int) -> int:
    return -(-size // 3) * 4


def _exact(data, dtype) -> np.ndarray:
    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    return np.frombuffer(data[:len(data) // dtype.itemsize * dtype.itemsize], dtype)
