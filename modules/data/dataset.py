"""Simulation data: find and open the dataset file, check it, split it, and serve scaled batches.

The dataset is one array [N designs, T time steps, M nodes] in input_data/dataset{data_No}.npy (memory-mapped),
.h5/.hdf5 (read lazily with h5py) or the original SimulGenVAE's .pickle (a pickled numpy array, read by an unpickler
that builds numpy arrays and nothing else: a pickle is a program, and one from elsewhere must not run); the file may
also lie in the case folder itself, where the original kept it. Reads always go through SimulationArray.read (or
read_design_into, the streamed loader's), which apply the config's time subsampling and node crop, so a dataset larger
than RAM is never loaded whole unless --load_all=1 asks for it.

With data_storage float16 or bfloat16 the run reads a half-size copy instead, input_data/dataset{data_No}.float16.npy
or .bfloat16.npy (written by --store_half, commands/store_half), widened to float32 exactly as it is read. numpy has no
bfloat16, so that file holds each value's 16 bits as uint16: the upper half of its float32.
"""
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import torch

from modules.data.scaling import MinMaxScaler
from modules.errors import InputError

DATA_DIR = Path("input_data")
FORMATS = (".npy", ".h5", ".hdf5", ".pickle")
READ_CHUNK_BYTES = 64 * 2**20  # per streamed read: big enough for sequential I/O, small beside RAM
HALF_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}  # data_storage -> the .npy's dtype
_OPENING = threading.Lock()


def find_dataset(data_no: int, storage: str = "float32", folders=(DATA_DIR, Path("."))) -> Path:
    """Return the one file dataset{data_no}.{npy,h5,hdf5,pickle} in input_data/ or, where the original SimulGenVAE
    kept it, in the case folder itself; with storage float16 or bfloat16, its half-size copy in input_data/."""
    if storage in HALF_DTYPES:
        path = folders[0] / half_name(data_no, storage)
        if not path.exists():
            raise InputError(path, f"data_storage {storage} reads this file, which does not exist",
                             f"write it from the float32 dataset with python SimulGen-VAE.py --store_half={storage}, "
                             "or set data_storage float32")
        return path
    names = [f"dataset{data_no}{ext}" for ext in FORMATS]
    found = [folder / name for folder in folders for name in names if (folder / name).exists()]
    if not found:
        places = " or ".join(f"{folder}/" for folder in folders)
        raise InputError(folders[0] / names[0], "dataset file not found",
                         f"put the data in {places} as dataset{data_no}.npy (or .h5/.hdf5/.pickle), or change data_No "
                         "in preset.txt")
    if len(found) > 1:
        raise InputError(found[0], f"several dataset files for data_No {data_no}: {', '.join(map(str, found))}",
                         "keep only one of them")
    return found[0]


def half_name(data_no: int, storage: str) -> str:
    return f"dataset{data_no}.{storage}.npy"


def open_dataset(config) -> "SimulationArray":
    """The case's dataset, in the storage its config names."""
    return SimulationArray(find_dataset(config.data_no, config.data_storage), config, config.data_storage)


class Crop:
    """Which time steps (Dim2_red of them: the first, or spread evenly with Dim2_spacing even) and which nodes
    (Dim3_start..Dim3_end) a run keeps."""

    def __init__(self, config):
        self.raw_shape = (config.n_steps, config.n_nodes)
        if config.steps_spacing == "even":
            self.time_index = np.round(np.linspace(0, config.n_steps - 1, config.n_steps_used)).astype(np.int64)
        else:
            self.time_index = np.arange(config.n_steps_used, dtype=np.int64)
        self.nodes = slice(config.node_start, config.node_end)
        self.shape = (len(self.time_index), config.node_end - config.node_start)

    @property
    def steps_said(self) -> str:
        """Which steps are kept, in words: '24 steps', 'the first 5 of 10 steps (0-4)', '5 of 10 steps, evenly
        spaced (0, 2, 4, 7, 9)'."""
        kept, total = len(self.time_index), self.raw_shape[0]
        if kept == total:
            return f"{kept} steps"
        if self.time_index[-1] == kept - 1:
            return f"the first {kept} of {total} steps (0-{kept - 1})"
        shown = ", ".join(map(str, self.time_index[:6])) + (", ..." if kept > 6 else "")
        return f"{kept} of {total} steps, evenly spaced ({shown})"


class SimulationArray:
    """Read-only, lazily opened view of the [N, T, M] dataset, cropped to the steps and nodes the config keeps.

    Picklable: the open file handles are dropped and reopened in each process. storage float16 or bfloat16: the
    file holds half-size values (HALF_DTYPES), which every read widens to float32 exactly.
    """

    def __init__(self, path: Path, config, storage: str = "float32"):
        self.path = Path(path)
        self.hdf5_dataset = config.hdf5_dataset
        self.crop = Crop(config)
        self.n_designs = config.n_designs
        self.storage = storage
        self._array = None
        self._opened_by = None
        self._file = None  # a raw descriptor for read_design_into, opened in the process that reads
        self._check_shape((config.n_designs, config.n_steps, config.n_nodes))

    @property
    def sample_shape(self):
        return self.crop.shape

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype read_design_into fills: the file's own where its bytes are copied as they lie (a float32 or
        half-size .npy in C order; bfloat16's bits as int16), float32 otherwise (values converted as read)."""
        return self._copied_as() or torch.float32

    def read_design_into(self, index: int, out: np.ndarray, steps=slice(None)) -> None:
        """Design index's kept nodes at its kept steps (steps: a slice of them) into out ([steps, M_used] of
        stored_dtype), by positioned reads of the .npy straight into out where its bytes are copied as they lie (a
        read releases the GIL, so several threads read at once, and no page of the file is mapped into this
        process), through read() otherwise."""
        if self._copied_as() is None:
            out[...] = self.read([index], steps)[0]
            return
        array = self._opened()
        n_steps, n_nodes = array.shape[1:]
        item = array.dtype.itemsize
        first_node, kept_nodes = self.crop.nodes.start, out.shape[1]
        flat = out.reshape(-1).view(np.uint8)
        time_index = self.crop.time_index[steps]
        if kept_nodes == n_nodes:  # whole rows: one read per run of consecutive kept steps
            runs = np.split(np.arange(len(time_index)), np.flatnonzero(np.diff(time_index) != 1) + 1)
        else:
            runs = [[k] for k in range(len(time_index))]
        for run in runs:
            start = array.offset + ((index * n_steps + int(time_index[run[0]])) * n_nodes + first_node) * item
            _read_exactly(self._descriptor(), flat[run[0] * kept_nodes * item:(run[-1] + 1) * kept_nodes * item],
                          start, self.path)

    def read(self, indices, steps=slice(None)) -> np.ndarray:
        """float32 [len(indices), T_used, M_used] in physical units, in the order asked for.

        steps optionally picks some of the kept time steps (a slice), for streaming passes over huge designs.
        """
        indices = np.asarray(indices, dtype=np.int64)
        unique, inverse = np.unique(indices, return_inverse=True)
        time_index = self.crop.time_index[steps]
        array = self._opened()
        if self.path.suffix == ".npy":
            block = array[unique[:, None], time_index[None, :], self.crop.nodes]
        else:  # h5py takes one increasing index list per read: read the step range, then pick
            first, last = int(time_index.min()), int(time_index.max()) + 1
            block = np.asarray(array[unique.tolist(), first:last, self.crop.nodes])[:, time_index - first]
        if len(unique) < len(indices) or not np.array_equal(unique, indices):
            block = block[inverse]  # a copy: only when the order asked for is not already sorted and unique
        return to_float32(block, self.storage)

    def whole_designs(self, start: int, stop: int) -> np.ndarray:
        """Designs start..stop-1 with every step and node, uncropped, as float32 (for a copy of the dataset)."""
        return to_float32(np.asarray(self._opened()[start:stop]), self.storage)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        if self.path.suffix != ".pickle":
            state["_array"] = None
        return state

    def _copied_as(self) -> torch.dtype | None:
        """The dtype the file's bytes are copied as, by read_design_into; None where they must be converted."""
        array = self._opened()
        if self.path.suffix != ".npy" or not array.flags.c_contiguous:
            return None
        if self.storage == "bfloat16":  # _check_shape made sure the file holds uint16
            return torch.int16
        return {np.dtype("<f4"): torch.float32, np.dtype("<f2"): torch.float16}.get(array.dtype)

    def __del__(self):
        if getattr(self, "_file", None) is not None and self._file[0] == os.getpid():
            os.close(self._file[1])

    def _descriptor(self) -> int:
        """This process's read-only descriptor of the file, opened once (reader threads may ask at once)."""
        with _OPENING:
            if self._file is None or self._file[0] != os.getpid():
                self._file = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return self._file[1]

    def _opened(self):
        # An HDF5 handle must not be shared with a forked process (a DDP rank started by fork): each opens its own.
        stale_hdf5 = self.path.suffix in (".h5", ".hdf5") and self._opened_by != os.getpid()
        if self._array is None or stale_hdf5:
            self._array = _open_array(self.path, self.hdf5_dataset)
            self._opened_by = os.getpid()
        return self._array

    def _check_shape(self, expected):
        array = self._opened()
        if tuple(array.shape) != expected:
            raise InputError(self.path, f"data has shape {tuple(array.shape)} but condition.txt says "
                             f"[Dim1, Dim2, Dim3] = {list(expected)}", "make Dim1, Dim2, Dim3 match the data")
        if not np.issubdtype(array.dtype, np.number):
            raise InputError(self.path, f"data type {array.dtype} is not numeric", "store the results as floats")
        if self.storage in HALF_DTYPES and array.dtype != HALF_DTYPES[self.storage]:
            raise InputError(self.path, f"holds {array.dtype} values, not {self.storage} as data_storage says",
                             f"write it again with python SimulGen-VAE.py --store_half={self.storage}")


def rounding_of_storage(storage: str, data_min, data_max) -> np.ndarray:
    """The largest rounding error of a half-size storage on values in [data_min, data_max], per variable, as a share
    of the range: half the spacing of representable values at the largest magnitude (float16 below its smallest
    normal value: half its fixed spacing)."""
    low, high = np.asarray(data_min, dtype=np.float64), np.asarray(data_max, dtype=np.float64)
    largest = np.maximum(np.abs(low), np.abs(high)).astype(np.float32)
    if storage == "float16":
        spacing = np.spacing(largest.astype(np.float16)).astype(np.float64)
    else:
        spacing = np.spacing(largest).astype(np.float64) * 2.0 ** 16
    return 0.5 * spacing / np.where(high > low, high - low, 1.0)


def to_float32(values: np.ndarray, storage: str) -> np.ndarray:
    """Values as a file of this storage holds them -> float32, contiguous, exactly (bfloat16: its bits shifted)."""
    if storage != "bfloat16":
        return np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty(values.shape, dtype=np.float32)
    widen_into(out, values)
    return out


def widen_into(out: np.ndarray, stored: np.ndarray) -> None:
    """float16, or bfloat16's bits as uint16, into the float32 array out, exactly (bfloat16: its bits shifted up)."""
    if stored.dtype == np.float16:
        out[...] = stored
    else:
        bits = out.view(np.uint32)
        bits[...] = stored
        bits <<= 16


def widened(stored: torch.Tensor) -> torch.Tensor:
    """A batch as read_design_into stored it -> float32, exactly (bfloat16 bits as int16 become their bfloat16)."""
    if stored.dtype == torch.int16:
        return stored.view(torch.bfloat16).float()
    return stored.float()


def _read_exactly(descriptor: int, out: np.ndarray, offset: int, path: Path) -> None:
    """Fill out (bytes) from the file at offset; a file that ends before is refused as truncated."""
    view = memoryview(out)
    while len(view):
        count = os.preadv(descriptor, [view], offset)
        if count == 0:
            raise InputError(path, f"ends before byte {offset + len(view)}: the file is truncated",
                             "write the dataset again (it is shorter than its header says)")
        view, offset = view[count:], offset + count


def _open_array(path: Path, hdf5_dataset: str):
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if path.suffix in (".h5", ".hdf5"):
            return _open_hdf5(path, hdf5_dataset)
        with open(path, "rb") as handle:
            array = _ArrayUnpickler(handle).load()
    except InputError:
        raise
    except _Refused as refused:
        raise InputError(path, f"holds a {refused} object, not only numpy arrays: refused without unpickling it "
                         "(unpickling can run any code)", "save the results as an [N, T, M] .npy array (numpy.save) "
                         "or HDF5 dataset") from None
    except Exception as error:  # any unreadable file ends up here: say which and why
        raise InputError(path, f"cannot read the dataset ({type(error).__name__}: {error})",
                         "check the file is a complete .npy/.h5 array of shape [N, T, M]") from None
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        raise InputError(path, "the pickle does not hold a 3-D numpy array", "save the results as an [N, T, M] array")
    return array


class _Refused(Exception):
    """A pickle asked for something other than what a numpy array is made of."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (any pickle protocol, numpy 1 or 2) and refuses every other class or function before
    calling it."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _open_hdf5(path: Path, name: str):
    import h5py  # imported here: only HDF5 users need it

    handle = h5py.File(path, "r")
    names = [key for key in handle if isinstance(handle[key], h5py.Dataset)]
    if not name:
        if len(names) != 1:
            raise InputError(path, f"holds {len(names)} top-level datasets ({', '.join(names) or 'none'})",
                             "name the one to use with the key hdf5_dataset in condition.txt")
        name = names[0]
    if name not in handle:
        raise InputError(path, f"has no dataset '{name}' (it has: {', '.join(names)})", "fix hdf5_dataset")
    return handle[name]


def split_indices(n_designs: int, val_fraction: float, seed: int):
    """Reproducible split: (train indices, validation indices), each sorted. At least one design in each."""
    n_val = min(max(1, round(n_designs * val_fraction)), n_designs - 1)
    order = np.random.default_rng(seed).permutation(n_designs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def scan_and_fit_scaler(array: SimulationArray, train_indices, n_vars: int) -> MinMaxScaler:
    """One pass over every design: refuse NaN/Inf (naming the design), fit the scaler on the training designs only."""
    per_chunk = max(1, READ_CHUNK_BYTES // (4 * int(np.prod(array.sample_shape))))
    is_train = np.zeros(array.n_designs, dtype=bool)
    is_train[train_indices] = True
    low = np.full(n_vars, np.inf)
    high = np.full(n_vars, -np.inf)
    for start in range(0, array.n_designs, per_chunk):
        chunk_indices = np.arange(start, min(start + per_chunk, array.n_designs))
        block = array.read(chunk_indices)
        refuse_non_finite(array.path, block, chunk_indices)
        train_block = block[is_train[chunk_indices]].reshape(-1, array.sample_shape[0], n_vars,
                                                             block.shape[-1] // n_vars)
        if len(train_block):
            low = np.minimum(low, train_block.min(axis=(0, 1, 3)))
            high = np.maximum(high, train_block.max(axis=(0, 1, 3)))
    return MinMaxScaler(low, high)


def refuse_non_finite(path, block, indices):
    """InputError naming the first design with a NaN or Inf value (indices: the block's designs)."""
    finite = np.isfinite(block)
    if finite.all():
        return
    design, step, node = (int(i) for i in np.argwhere(~finite)[0])
    bad_designs = [int(indices[i]) for i in np.flatnonzero(~finite.all(axis=(1, 2)))]
    raise InputError(path, f"design (sample index) {indices[design]} has a non-finite value "
                     f"({block[design, step, node]}) at kept time step {step}, node {node}; designs with NaN/Inf "
                     f"here: {bad_designs[:10]}",
                     "repair or remove those designs from the dataset")


class NewSimulations:
    """An .npy of new simulations for --reconstruct, raw [n, T, M] or already cropped [n, T_used, M_used], read a
    batch of designs at a time from a memory map (never whole), cropped and checked for NaN/Inf as it is read."""

    def __init__(self, path, crop: Crop):
        self.path, self.crop = Path(path), crop
        try:
            self.data = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except Exception as error:
            raise InputError(self.path, f"cannot read it as a .npy array ({type(error).__name__}: {error})",
                             "give an .npy file of shape [n, T, M]") from None
        shape = self.data.shape
        self.cropped = self.data.ndim == 3 and shape[1:] == crop.shape
        if not self.cropped and not (self.data.ndim == 3 and shape[1:] == crop.raw_shape):
            raise InputError(self.path, f"shape {shape} matches neither the case's [n, T, M] = [n, "
                             f"{crop.raw_shape[0]}, {crop.raw_shape[1]}] nor its kept [n, {crop.shape[0]}, "
                             f"{crop.shape[1]}]", "give simulations of the training case's shape")
        if self.data.dtype.kind not in "iuf":
            raise InputError(self.path, f"holds {self.data.dtype} values, not real numbers",
                             "give an .npy file of real numbers")

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, start: int, stop: int) -> np.ndarray:
        """Designs start..stop-1 as float32 [b, T_used, M_used]; InputError naming the design for NaN or Inf."""
        rows = self.data[start:stop]
        block = np.array(rows if self.cropped else rows[:, self.crop.time_index, self.crop.nodes], np.float32)
        refuse_non_finite(self.path, block, np.arange(start, start + len(block)))
        return block
