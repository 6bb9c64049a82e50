"""Fields [n, T, M] written as they are produced, a batch of designs at a time, in the format --out's suffix names.

    .npy           OUT.npy [n, T, M]; with --samples also OUT_samples.npy [n, K, T, M], OUT_mean.npy, OUT_std.npy
    .h5 / .hdf5    one HDF5 file: datasets fields [n, T, M] (chunked per design), with --samples also samples
                   [n, K, T, M], mean and std; time_steps (the kept step indices), designs (names), parameters [n, P]
                   (attribute names) when the designs are CSV rows, node_coordinates [M / n_vars, 2 or 3] when known
    .xdmf          OUT.xdmf + OUT.h5 (meshio's XDMF time series): ParaView opens OUT.xdmf directly; one time step per
                   kept step, on the real mesh (mesh_file), the grid (grid_shape) or the nodes (node_coordinates), a
                   line of nodes otherwise; one point array per design (and variable), with --samples also its draws,
                   mean and std. For looking at a few designs: at most XDMF_MAX_ARRAYS arrays per step
    .pvd           OUT.pvd + OUT/OUT_0000.vtu, ... (a ParaView collection of one VTU file per kept step), holding what
                   .xdmf holds
    The times of .xdmf and .pvd are the simulation's (time_values) when the case has them, else the step numbers.

Nothing is held whole in memory: .npy and .h5 are written in design order straight to disk (.xdmf, which is ordered by
time step, gathers each step from memory-mapped scratch arrays at the end). Every file is written under a temporary
name and renamed only once complete, so a failed or interrupted run leaves no partial result and never replaces a
user's file (the paths are checked to be new before anything is computed). The disk writes run on one background
thread, overlapping the next batch's computation.
"""
import errno
import logging
import mmap
import os
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from modules.errors import InputError
from modules.storage.atomic import check_room, disk_full_as, temporary_path
from modules.storage.paths import new_output_file

log = logging.getLogger(__name__)

SUFFIXES = (".npy", ".h5", ".hdf5", ".xdmf", ".pvd")
DIRECT_ALIGNMENT = 4096  # O_DIRECT writes whole blocks from block-aligned memory at block-aligned offsets
STAGING_BYTES = 8 * 2**20
XDMF_MAX_ARRAYS = 1024
PENDING_WRITES = 2  # batches handed to the writer thread and not yet on disk: bounds the memory they hold
HEADER_BYTES = 4096


@dataclass
class FieldFacts:
    """What an output carries beside the fields: how the user names each design, the raw design parameters
    [n, P] and their names (CSV designs; None for images), the kept time step indices [T], and the layout
    (data.field_layout.FieldLayout) that places the nodes; read_layout is only called by formats that need it."""
    designs: list
    time_steps: np.ndarray
    n_vars: int = 1
    parameters: np.ndarray | None = None
    parameter_names: list | None = None
    read_layout: object = None
    read_times: object = None
    _layout: object = field(default=None, init=False, repr=False)

    def layout(self):
        if self._layout is None and self.read_layout is not None:
            self._layout = self.read_layout()
        return self._layout

    def step_times(self) -> np.ndarray:
        """The time of each kept step: read_times() (the simulation's times of all Dim2 steps, None when the case has
        none) at time_steps, else the step numbers."""
        times = self.read_times() if self.read_times is not None else None
        return np.asarray(self.time_steps, dtype=np.float64) if times is None else times[self.time_steps]


def output_files(out, command: str, samples: int = 0, report: bool = True) -> dict:
    """{kind: path} of every file a prediction (or reconstruction) to `out` writes, the report (OUT_report.json)
    when asked: out's suffix must be one of SUFFIXES, its folder must exist, and none of the files may exist yet
    (never overwrite a user's file). InputError otherwise, before anything is computed."""
    out = new_output_file(out, command, SUFFIXES)
    paths = {"out": out, **({"report": out.with_name(f"{out.stem}_report.json")} if report else {})}
    if out.suffix == ".npy":
        paths.update({kind: out.with_name(f"{out.stem}_{kind}.npy") for kind in ("samples", "mean", "std")
                      if samples})
    elif out.suffix == ".xdmf":
        paths["heavy_data"] = out.with_suffix(".h5")  # meshio names it after the .xdmf
    elif out.suffix == ".pvd":
        paths["heavy_data"] = out.with_suffix("")  # the folder of .vtu files, named as ParaView names it
    for path in paths.values():
        for taken in (path, temporary_path(path)):  # the temporary name is removed after a failure: never a user's
            if taken.exists():
                raise InputError(taken, "already exists and would be overwritten",
                                 "choose another --out or move that file")
    return paths


def open_field_file(paths: dict, shape, samples: int, facts: FieldFacts):
    """The writer for paths (output_files) of n fields [T, M] (shape [n, T, M]); use it as a context manager:
    complete files appear when the block ends without error, nothing otherwise."""
    writer = {".npy": NpyFieldFile, ".xdmf": XdmfFieldFile, ".pvd": PvdFieldFile}.get(paths["out"].suffix,
                                                                                     H5FieldFile)
    return writer(paths, tuple(shape), samples, facts)


class FieldFile:
    """write(start, fields [b, T, M], samples [b, K, T, M], mean, std) in design order, from a context block. A
    format opens its files in open() and either fills targets ({kind: an [n, ...] array or dataset}) there, which
    write_batch writes into, or writes its own write_batch; close() commits or discards."""

    def __init__(self, paths: dict, shape: tuple, samples: int, facts: FieldFacts):
        self.paths, self.shape, self.samples, self.facts = paths, shape, samples, facts
        self.written = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="field-writer")
        self._pending = []

    def __enter__(self):
        try:
            with disk_full_as(self.paths["out"]):
                self.open()
        except BaseException:
            self._writer.shutdown()
            self.close(commit=False)
            raise
        return self

    def write(self, start: int, fields, samples=None, mean=None, std=None) -> None:
        """The next batch of designs (start must follow the last batch), float32 numpy arrays owned by the writer
        from now on; written on the background thread (an error there is raised here or at the end)."""
        if start != self.written:
            raise ValueError(f"designs are written in order: expected {self.written}, got {start}")
        self.written += len(fields)
        arrays = {kind: values for kind, values in (("fields", fields), ("samples", samples), ("mean", mean),
                                                    ("std", std)) if kind in self.kinds()}
        self._pending.append(self._writer.submit(self.write_batch, start, arrays))
        while len(self._pending) > PENDING_WRITES:
            self._pending.pop(0).result()

    def __exit__(self, kind, error, trace):
        failure = None  # a write that failed on the writer thread and has not been raised yet
        for pending in self._pending:
            try:
                pending.result()
            except BaseException as raised:  # noqa: BLE001 - raised below, once the files are cleaned up
                failure = failure or raised
        self._writer.shutdown()
        with disk_full_as(self.paths["out"]):
            if kind is None and failure is None and self.written != self.shape[0]:
                failure = ValueError(f"{self.written} of {self.shape[0]} designs were written")
            self.close(commit=kind is None and failure is None)
            if kind is None and failure is not None:
                raise failure
        return False

    def kinds(self) -> dict:
        """{name: shape} of the arrays written: fields, and with samples samples, mean, std."""
        n, steps, nodes = self.shape
        arrays = {"fields": self.shape}
        if self.samples:
            arrays.update({"samples": (n, self.samples, steps, nodes), "mean": self.shape, "std": self.shape})
        return arrays

    def open(self) -> None:
        raise NotImplementedError

    def write_batch(self, start: int, arrays: dict) -> None:
        """Each of arrays ({kind: [b, ...]}) into its target (an HDF5 dataset, a memory map) from design start on."""
        for kind, values in arrays.items():
            self.targets[kind][start:start + len(values)] = values

    def close(self, commit: bool) -> None:
        raise NotImplementedError


class NpyFieldFile(FieldFile):
    """One .npy per array (OUT.npy, OUT_samples.npy, ...), each a header and then the values in design order."""

    PATH_OF = {"fields": "out", "samples": "samples", "mean": "mean", "std": "std"}

    def __init__(self, *args):
        super().__init__(*args)
        self.handles = {}

    def open(self) -> None:
        for kind, shape in self.kinds().items():
            path = self.paths[self.PATH_OF[kind]]
            check_room(path, shape)
            self.handles[kind] = DirectFile(temporary_path(path), npy_header(shape))

    def write_batch(self, start: int, arrays: dict) -> None:
        for kind, values in arrays.items():  # appended: the designs come in order
            self.handles[kind].write(memoryview(np.ascontiguousarray(values, dtype=np.float32)).cast("B"))

    def close(self, commit: bool) -> None:
        """Every handle closed, then either every file renamed into place or every temporary file removed."""
        temporaries = {self.paths[self.PATH_OF[kind]]: temporary_path(self.paths[self.PATH_OF[kind]])
                       for kind in self.handles}
        renamed = []
        try:
            for handle in self.handles.values():
                handle.close()
            if commit:
                for target, temporary in temporaries.items():
                    os.replace(temporary, target)
                    renamed.append(target)
        except BaseException:
            for target in renamed:  # all or nothing: output_files checked that none of them existed before
                target.unlink(missing_ok=True)
            raise
        finally:
            for temporary in temporaries.values():
                temporary.unlink(missing_ok=True)


def npy_header(shape) -> bytes:
    """The .npy (format 1.0) header of a C-ordered float32 array of shape, padded with spaces to DIRECT_ALIGNMENT
    bytes (the format allows any length), so that the values start on a block boundary."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                 "shape": tuple(int(size) for size in shape)}).encode("latin1")
    length = -(-(len(text) + 11) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT - 10  # magic, version and length: 10 bytes
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length) + text.ljust(length - 1) + b"\n"


class DirectFile:
    """A new file written from start to end, its data with O_DIRECT where the file system takes it: no copy into the
    page cache and no write-back by the kernel, whose copies take CPU time the model needs on a machine of few cores
    (docs/performance.md).
    The bytes go through a page-aligned staging buffer; the last partial block is written without O_DIRECT. Falls
    back to ordinary writes where O_DIRECT is refused (tmpfs, some network file systems)."""

    def __init__(self, path: Path, header: bytes):
        self.path, self.offset, self.filled = path, 0, 0
        self.staging = mmap.mmap(-1, STAGING_BYTES)  # anonymous maps are page-aligned, as O_DIRECT needs
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = False
        if len(header) % DIRECT_ALIGNMENT == 0 and hasattr(os, "O_DIRECT"):
            try:
                direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
                os.close(self.fd)
                self.fd, self.direct = direct, True
            except OSError:
                pass
        self.write(memoryview(header))

    def write(self, data: memoryview) -> None:
        while len(data):
            if not self.direct:  # from the start, or since a write with O_DIRECT was refused
                self._write_all(data)
                return
            taken = min(len(data), STAGING_BYTES - self.filled)
            self.staging[self.filled:self.filled + taken] = data[:taken]
            self.filled, data = self.filled + taken, data[taken:]
            if self.filled == STAGING_BYTES:
                self._flush_blocks()

    def close(self) -> None:
        """Writes what is staged and closes the file (also after an error)."""
        try:
            if self.direct:
                self._flush_blocks()
                if self.filled:  # the last partial block, which O_DIRECT cannot write
                    os.close(self.fd)
                    self.fd, self.direct = os.open(self.path, os.O_WRONLY), False
                    self._write_all(memoryview(self.staging)[:self.filled])
        finally:
            os.close(self.fd)
            self.staging.close()

    def _flush_blocks(self) -> None:
        whole = self.filled // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        view = memoryview(self.staging)
        try:
            self._write_all(view[:whole])
        except OSError as error:
            if error.errno != errno.EINVAL:  # a file system that opens with O_DIRECT but refuses its writes
                raise
            os.close(self.fd)
            self.fd, self.direct = os.open(self.path, os.O_WRONLY), False
            self._write_all(view[:self.filled])
            self.filled = 0
            return
        self.staging.move(0, whole, self.filled - whole)
        self.filled -= whole

    def _write_all(self, data: memoryview) -> None:
        while len(data):
            written = os.pwrite(self.fd, data, self.offset)
            self.offset, data = self.offset + written, data[written:]


class H5FieldFile(FieldFile):
    """One HDF5 file; each array a dataset chunked per design (a reader takes one design without the rest)."""

    def open(self) -> None:
        import h5py

        size = sum(int(np.prod(shape)) * 4 for shape in self.kinds().values())
        check_room(self.paths["out"], (size + HEADER_BYTES,), np.uint8)
        self.file = h5py.File(temporary_path(self.paths["out"]), "w")
        self.targets = {kind: self.file.create_dataset(kind, shape=shape, dtype=np.float32,
                                                        chunks=(1,) * (len(shape) - 2) + shape[-2:])
                         for kind, shape in self.kinds().items()}
        describe(self.file, self.facts, self.shape, self.paths["out"])

    def close(self, commit: bool) -> None:
        temporary = temporary_path(self.paths["out"])
        try:
            if hasattr(self, "file"):
                self.file.close()  # HDF5 writes its metadata here: this can fail on a full disk too
            if commit:
                os.replace(temporary, self.paths["out"])
        finally:
            temporary.unlink(missing_ok=True)


def describe(file, facts: FieldFacts, shape, path) -> None:
    """The datasets that say what the fields are (file: the open h5py.File that becomes path): time_steps, designs,
    parameters, node_coordinates."""
    import h5py

    file.attrs["about"] = ("fields [design, time step, node] in physical units (predicted or reconstructed); variables "
                           "side by side along the node axis, node_coordinates per node of one variable")
    file.attrs["n_vars"] = facts.n_vars
    file.create_dataset("time_steps", data=np.asarray(facts.time_steps, dtype=np.int64))
    file.create_dataset("designs", data=[str(name) for name in facts.designs], dtype=h5py.string_dtype())
    if facts.parameters is not None:
        parameters = file.create_dataset("parameters", data=np.asarray(facts.parameters, dtype=np.float64))
        parameters.attrs["names"] = [str(name) for name in facts.parameter_names or []]
    try:
        layout = facts.layout()
    except InputError as error:  # the fields do not need it: the file is written without node_coordinates
        log.warning(f"warning: {path} has no node_coordinates: {error.path}: {error.problem}")
        layout = None
    if layout is not None and layout.kind != "line":
        file.create_dataset("node_coordinates", data=layout.output_mesh(shape[2] // facts.n_vars).points)


class XdmfFieldFile(FieldFile):
    """meshio's XDMF time series (OUT.xdmf + OUT.h5). The fields come by design but XDMF is ordered by time step,
    so batches go to memory-mapped scratch arrays first; close() writes each step from them. Everything is made in
    the folder OUT.xdmf.tmp/, which is removed at the end."""

    def __init__(self, *args):
        super().__init__(*args)
        self.folder, self.targets, self.made_folder = temporary_path(self.paths["out"]), {}, False

    def open(self) -> None:
        n, steps, nodes = self.shape
        arrays = n * self.facts.n_vars * (1 + (self.samples + 2 if self.samples else 0))
        if arrays > XDMF_MAX_ARRAYS:
            raise InputError(self.paths["out"], f"would hold {arrays} point arrays per time step ({n} designs x "
                             f"{self.facts.n_vars} variables{' x (samples + mean + std)' if self.samples else ''}),"
                             f" more than ParaView lists usefully ({XDMF_MAX_ARRAYS})",
                             f"write many designs to .h5 (or .npy), and {self.paths['out'].suffix} for the few you "
                             "want to look at")
        self.mesh = self.facts.layout().output_mesh(nodes // self.facts.n_vars)
        self.step_times = self.facts.step_times()  # before any work: a bad time_values file stops the run here
        total = sum(int(np.prod(shape)) * 4 for shape in self.kinds().values())
        check_room(self.paths["out"], (2 * total + HEADER_BYTES,), np.uint8)  # the scratch, then the .h5
        self.folder.mkdir()  # output_files checked that it does not exist: only this run's files are removed
        self.made_folder = True
        self.targets = {kind: np.lib.format.open_memmap(self.folder / f"scratch_{kind}.npy", mode="w+",
                                                        dtype=np.float32, shape=shape)
                        for kind, shape in self.kinds().items()}

    def close(self, commit: bool) -> None:
        try:
            if commit:
                self._write_series()
                final = {self.paths["heavy_data"]: self.folder / self.paths["heavy_data"].name,
                         self.paths["out"]: self.folder / self.paths["out"].name}
                try:
                    for target, written in final.items():  # the .xdmf last: it names the .h5
                        os.replace(written, target)
                except BaseException:  # output_files checked that it was not there before
                    shutil.rmtree(self.paths["heavy_data"], ignore_errors=True)
                    self.paths["heavy_data"].unlink(missing_ok=True)
                    raise
        finally:
            self.targets = {}
            if self.made_folder:
                shutil.rmtree(self.folder, ignore_errors=True)

    def _write_series(self) -> None:
        import meshio

        names = array_names(self.facts.designs)
        points = np.asarray(self.mesh.points)
        with chdir(self.folder):  # meshio writes its .h5 into the working directory
            with meshio.xdmf.TimeSeriesWriter(self.paths["out"].name) as series:
                series.write_points_cells(points, [(kind, np.asarray(cells)) for kind, cells in self.mesh.cells])
                for step_index, time in enumerate(self.step_times):
                    series.write_data(float(time), point_data=self._step_arrays(names, step_index))

    def _step_arrays(self, names, step_index) -> dict:
        """{array name: one variable's values [M / n_vars]} of every design at one time step."""
        arrays = {}
        for index, name in enumerate(names):
            per_kind = {"": self.targets["fields"][index, step_index]}
            if self.samples:
                per_kind.update({f"_sample{k}": self.targets["samples"][index, k, step_index]
                                 for k in range(self.samples)})
                per_kind.update({"_mean": self.targets["mean"][index, step_index],
                                 "_std": self.targets["std"][index, step_index]})
            for suffix, values in per_kind.items():
                for var, part in enumerate(np.split(np.asarray(values), self.facts.n_vars)):
                    label = f"{name}{suffix}" + (f"_var{var}" if self.facts.n_vars > 1 else "")
                    while label in arrays:  # a design named like another's draw ("x_mean"): never overwrite it
                        label = f"{label}_{index + 1}"
                    arrays[label] = np.ascontiguousarray(part)
        return arrays


class PvdFieldFile(XdmfFieldFile):
    """A ParaView collection: OUT.pvd lists OUT/OUT_0000.vtu, ... (one VTU file per kept step, with its time), each
    holding what a step of the .xdmf holds. Made in OUT.pvd.tmp/ like the .xdmf, the folder renamed before the .pvd."""

    def _write_series(self) -> None:
        import meshio

        names, stem = array_names(self.facts.designs), self.paths["out"].stem
        (self.folder / stem).mkdir()
        points = np.asarray(self.mesh.points)
        cells = [(kind, np.asarray(cells)) for kind, cells in self.mesh.cells]
        listed = []
        for step_index, time in enumerate(self.step_times):
            name = f"{stem}/{stem}_{step_index:04d}.vtu"
            step = meshio.Mesh(points, cells, point_data=self._step_arrays(names, step_index))
            meshio.write(self.folder / name, step, file_format="vtu")
            listed.append(f'    <DataSet timestep="{float(time)!r}" part="0" file="{quoteattr(name)[1:-1]}"/>')
        (self.folder / self.paths["out"].name).write_text(
            '<?xml version="1.0"?>\n<VTKFile type="Collection" version="0.1">\n  <Collection>\n'
            + "\n".join(listed) + "\n  </Collection>\n</VTKFile>\n")


def array_names(designs) -> list:
    """Design names as XDMF array names (letters, digits, '_', '-', '.'), made unique: 'row 3' -> 'row_3'."""
    names, seen = [], set()
    for design in designs:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(design)).stem if "." in str(design) else str(design))
        unique, count = name, 1
        while unique in seen:
            count += 1
            unique = f"{name}_{count}"
        seen.add(unique)
        names.append(unique)
    return names
