"""Simulation data: find and open the dataset file, check it, split it, and serve scaled batches.

The dataset is one array [N designs, T time steps, M nodes] in input_data/dataset{data_No}.npy (memory-mapped),
.h5/.hdf5 (read lazily with h5py) or the original SimulGenVAE's .pickle (a pickled numpy array, read by an unpickler
that builds numpy arrays and nothing else: a pickle is a program, and one from elsewhere must not run); the file may
also lie in the case folder itself, where the original kept it. Reads always go through SimulationArray.read, which
applies the config's time subsampling and node crop, so a dataset larger than RAM is never loaded whole unless
--load_all=1 asks for it.
"""
import os
import pickle
from pathlib import Path

import numpy as np

from modules.data.scaling import MinMaxScaler
from modules.errors import InputError

DATA_DIR = Path("input_data")
FORMATS = (".npy", ".h5", ".hdf5", ".pickle")
READ_CHUNK_BYTES = 64 * 2**20  # per streamed read: big enough for sequential I/O, small beside RAM


def find_dataset(data_no: int, folders=(DATA_DIR, Path("."))) -> Path:
    """Return the one file dataset{data_no}.{npy,h5,hdf5,pickle} in input_data/ or, where the original SimulGenVAE
    kept it, in the case folder itself."""
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

    Picklable (for DataLoader workers): the open file handle is dropped and reopened in each process.
    """

    def __init__(self, path: Path, config):
        self.path = Path(path)
        self.hdf5_dataset = config.hdf5_dataset
        self.crop = Crop(config)
        self.n_designs = config.n_designs
        self._array = None
        self._opened_by = None
        self._check_shape((config.n_designs, config.n_steps, config.n_nodes))

    @property
    def sample_shape(self):
        return self.crop.shape

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
        return np.ascontiguousarray(block, dtype=np.float32)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path.suffix != ".pickle":
            state["_array"] = None
        return state

    def _opened(self):
        # An HDF5 handle must not be shared with forked DataLoader workers: each process opens its own.
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
        _refuse_non_finite(array.path, block, chunk_indices)
        train_block = block[is_train[chunk_indices]].reshape(-1, array.sample_shape[0], n_vars,
                                                             block.shape[-1] // n_vars)
        if len(train_block):
            low = np.minimum(low, train_block.min(axis=(0, 1, 3)))
            high = np.maximum(high, train_block.max(axis=(0, 1, 3)))
    return MinMaxScaler(low, high)


def _refuse_non_finite(path, block, indices):
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
        _refuse_non_finite(self.path, block, np.arange(start, start + len(block)))
        return block
