"""Batches of scaled designs for training and evaluation passes: which designs go together, and where they come
from (preloaded on the device, or streamed from the memory-mapped file by DataLoader workers)."""
import numpy as np
import torch

from modules.data.dataset import READ_CHUNK_BYTES, SimulationArray
from modules.data.scaling import MinMaxScaler
from modules.errors import InputError
from modules.machine.memory import available_host_bytes


def batch_order(n_items: int, batch_size: int, shuffle: bool, seed: int, epoch: int):
    """Positions 0..n_items-1 cut into batches; shuffled by (seed, epoch) so every loader sees the same batches."""
    positions = np.arange(n_items)
    if shuffle:
        positions = np.random.default_rng([seed, epoch]).permutation(n_items)
    return [positions[i:i + batch_size] for i in range(0, n_items, batch_size)]


def in_order(n_items: int, batch_size: int):
    """Every position once, in order: the batches of evaluation passes."""
    return batch_order(n_items, batch_size, shuffle=False, seed=0, epoch=0)


class PreloadedBatches:
    """--load_all=1: the scaled designs live on the training device; a batch is an index into that tensor.
    Uploaded in bounded chunks, so the host never holds a second copy of the whole set on its way to a GPU."""

    def __init__(self, array: SimulationArray, indices, scaler: MinMaxScaler, device):
        self.indices = np.asarray(indices)
        self.data = torch.empty((len(self.indices), *array.sample_shape), dtype=torch.float32, device=device)
        per_chunk = max(1, READ_CHUNK_BYTES // (4 * int(np.prod(array.sample_shape))))
        for start in range(0, len(self.indices), per_chunk):
            chunk = scaler.transform(array.read(self.indices[start:start + per_chunk]))
            self.data[start:start + len(chunk)] = torch.from_numpy(chunk)

    def __len__(self):
        return len(self.indices)

    def batches(self, order):
        for positions in on_device(order, self.data.device):
            yield self.data[positions]


def on_device(index_arrays, device) -> list:
    """Integer arrays -> tensors on device, all in one host-to-device copy: a small copy per step from pageable
    memory would make the host wait for the GPU at every step."""
    if not len(index_arrays):
        return []
    flat = torch.as_tensor(np.concatenate(index_arrays).astype(np.int64), device=device)
    return list(flat.split([len(indices) for indices in index_arrays]))


class StreamedBatches:
    """--load_all=0: each batch is read from the (memory-mapped) file when it is needed, by num_workers DataLoader
    processes ahead of the training step, and scaled on the training device: the workers only copy raw values (on
    the host, scaling was three more passes over every value, and on a GPU it is free). The same float32 operations
    as MinMaxScaler.transform, so batches equal the preloaded ones bit for bit. The workers start with the first pass
    and serve every later one (persistent): starting them for every epoch and validation pass took longer than
    reading a small case's batches. Pinned host memory makes the copy to a GPU non-blocking."""

    def __init__(self, array: SimulationArray, indices, scaler: MinMaxScaler, device, num_workers=0,
                 pin_memory=False):
        self.reader = _BatchReader(array, np.asarray(indices))
        self.scaler = scaler
        self.device = torch.device(device)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._order = _PassOrder()
        self._loader = None
        self._passes = 0  # passes started: an older pass resumed after a newer one began would read its batches

    def __len__(self):
        return len(self.reader.indices)

    def batches(self, order):
        """Scaled batches [b, T, M] on the device, one per position array of order. A pass left unfinished (a
        stop, an early exit) is dropped by the next one: the persistent workers discard what they had read ahead."""
        self._passes += 1
        this_pass = self._passes
        self._order.batches = list(order)
        for batch in self._loaded():
            if self._passes != this_pass:
                raise RuntimeError("a pass over streamed batches was resumed after a newer pass began")
            scaled = self.scaler.transform(batch.to(self.device, non_blocking=self.pin_memory))
            del batch  # the raw batch is not kept while the caller works on the scaled one: one copy less at a time
            yield scaled

    def _loaded(self):
        # A private generator: otherwise each DataLoader iterator draws its seed from torch's global RNG, and a
        # streamed run would sample different latent noise than a preloaded one.
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.reader, sampler=self._order, batch_size=None, num_workers=self.num_workers,
                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, generator=torch.Generator())
        return self._loader


class _PassOrder(torch.utils.data.Sampler):
    """The batches (position arrays) of the current pass; the one loader of a StreamedBatches reads it anew at each
    pass, so its persistent workers serve a new order without restarting."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _BatchReader(torch.utils.data.Dataset):
    """Dataset whose item is a whole batch in physical units: one read per batch keeps memory-mapped I/O
    sequential-ish."""

    def __init__(self, array, indices):
        self.array, self.indices = array, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, positions):
        return torch.from_numpy(self.array.read(self.indices[positions]))


def make_batches(array, indices, scaler, runtime, load_all: bool):
    """The batch source the config asks for, loading as runtime chose; both kinds give identical batches for the
    same order."""
    if load_all:
        return PreloadedBatches(array, indices, scaler, runtime.device)
    return StreamedBatches(array, indices, scaler, runtime.device, runtime.num_workers, runtime.pin_memory)


def check_preload_fits(array: SimulationArray, n_designs: int, runtime) -> None:
    """load_all 1 on data that would not fit is refused before anything is read, with the numbers.
    The designs must fit in 80 % of what is free on the device (a GPU's free memory, or the host memory this process
    may still use, shared among the processes of a run), leaving room for the model."""
    needed = 4 * n_designs * int(np.prod(array.sample_shape))
    if runtime.device.type == "cuda":
        free, where = torch.cuda.mem_get_info(runtime.device)[0], f"{runtime.device}'s free memory"
    else:
        free, where = available_host_bytes() // runtime.world_size, "the host memory available to each process"
    if needed > 0.8 * free:
        raise InputError("load_all setting", f"load_all 1 would keep {n_designs} designs ({needed / 1e9:.2f} GB) in "
                         f"{where}, but only {free / 1e9:.2f} GB is free there",
                         "set load_all 0 in input_data/condition.txt (or --load_all=0) to stream batches from the file")

