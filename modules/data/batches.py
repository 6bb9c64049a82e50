"""Batches of scaled designs for training and evaluation passes: which designs go together, and where they come
from (preloaded on the device, or streamed from the file by reader threads)."""
import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from modules.data.dataset import READ_CHUNK_BYTES, SimulationArray, widen_into, widened
from modules.data.scaling import MinMaxScaler
from modules.errors import InputError
from modules.machine.memory import available_host_bytes

GPU_READ_AHEAD = 3  # batches read ahead of the one in use for a GPU: enough to keep a disk busy while a step runs
CPU_READ_AHEAD = 1  # for the CPU, whose steps take far longer than a read
WIDENED_PIECE_BYTES = 2**20  # a half-size file is read and widened this much at a time: a piece within the cache


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


class BatchReader:
    """The streamed loader's reading: batches of designs in host memory, read by `readers` threads ahead of the one
    in use (0: in the caller's thread, when asked for).

    Designs are read by positioned reads straight into a batch's buffer (SimulationArray.read_design_into; the reads
    release the GIL, so threads read at once): no copy between processes, no page of the file mapped.

    For a GPU (gpu): batches as the file stores them (a half-size file: half the bytes to copy, widened there),
    GPU_READ_AHEAD batches ahead, in buffers (pinned where pinned) kept from pass to pass, since pinning memory takes
    long: a buffer is filled again once nothing holds the batch it served and its last copy to the GPU is done (a
    batch its caller keeps is never written over; it only costs a new buffer). For the CPU: float32 batches, a
    half-size file widened piece by piece as it is read (each piece while it is in the processor's cache),
    CPU_READ_AHEAD batch ahead (the step computes on the same cores), each in memory of its own that is given back
    when its batch is dropped: buffers kept for the next batches would add to every step's peak, which is what a
    memory limit sees (a filled buffer would read twice as fast as fresh memory, a gain lost in a CPU step's time)."""

    def __init__(self, array: SimulationArray, indices, readers: int = 0, gpu: bool = False, pinned: bool = False,
                 cuda_device=None):
        self.array, self.indices = array, np.asarray(indices)
        self.readers = readers
        self.cuda_device = cuda_device  # the reader threads' current GPU (a new thread's is cuda:0): events wait there
        self.pinned = pinned and gpu
        self.dtype = array.stored_dtype if gpu else torch.float32
        self.ahead = GPU_READ_AHEAD if gpu else CPU_READ_AHEAD
        self.keep_buffers = gpu
        self._threads = None       # started with the first pass that uses them
        self._buffers = {}         # for a GPU: id -> [buffer, the event of its last copy there or None]
        self._in_flight = set()    # ids of the buffers being filled or not yet handed out
        self._pending = []         # the futures of the pass in progress, awaited by the next one
        self._passes = 0           # passes started: an older pass resumed after a newer one began would read theirs

    def batches(self, order):
        """Batches [b, T, M] of self.dtype, one per position array of order, in host memory. A pass left unfinished
        (a stop, an early exit) drops what it read ahead when it is closed, or else when the next pass starts; either
        first waits for the reads it had started."""
        self._passes += 1
        this_pass = self._passes
        self._drop_pending()
        order = list(order)
        if not self.readers:
            for positions in order:
                yield self._handed_out(self._read(*self._claim(self.indices[positions])))
        else:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.readers, thread_name_prefix="batch-reader",
                                                   initializer=_on_gpu, initargs=(self.cuda_device,))
            ahead = collections.deque()
            try:
                for number in range(len(order)):
                    if self._passes != this_pass:
                        raise RuntimeError("a pass over streamed batches was resumed after a newer pass began")
                    while len(ahead) <= self.ahead and number + len(ahead) < len(order):
                        designs = self.indices[order[number + len(ahead)]]
                        ahead.append(self._threads.submit(self._read, *self._claim(designs)))
                    self._pending = list(ahead)[1:]
                    yield self._handed_out(ahead.popleft().result())
            finally:  # ended, given up or failed: what it read ahead is dropped (not a newer pass's reads)
                if self._passes == this_pass:
                    self._drop_pending()

    def copied(self, batch: torch.Tensor, event) -> None:
        """batch is being copied to a GPU until event: its buffer is not filled again before."""
        for entry in self._buffers.values():
            if entry[0].data_ptr() == batch.data_ptr():
                entry[1] = event

    def _claim(self, designs):
        """(designs, a buffer for them and the event to wait for): one nothing else uses, or a new one."""
        for key, (buffer, event) in self._buffers.items():
            if key not in self._in_flight and buffer.shape[0] >= len(designs) and _unused(buffer):
                break
        else:
            buffer, event = torch.empty((len(designs), *self.array.sample_shape), dtype=self.dtype,
                                        pin_memory=self.pinned), None
            held = [key for key in self._buffers if key not in self._in_flight]
            if len(self._buffers) >= self.ahead + 2 and held:
                del self._buffers[held[0]]  # a batch its caller keeps: it stays the caller's, the room goes to this
            if self.keep_buffers and len(self._buffers) < self.ahead + 2:
                self._buffers[id(buffer)] = [buffer, None]
        self._in_flight.add(id(buffer))
        return designs, buffer, event

    def _read(self, designs, buffer, event):
        if event is not None:
            event.synchronize()
        batch = buffer[:len(designs)]
        stored = self.array.stored_dtype
        if batch.dtype == stored:
            for row, design in zip(batch.numpy(), designs):
                self.array.read_design_into(int(design), row)
            return batch, buffer
        n_steps, n_nodes = self.array.sample_shape
        rows = max(1, WIDENED_PIECE_BYTES // (2 * n_nodes))
        piece = np.empty((rows, n_nodes), dtype=np.float16 if stored == torch.float16 else np.uint16)
        for field, design in zip(batch.numpy(), designs):
            for first in range(0, n_steps, rows):
                target = field[first:first + rows]
                read = piece[:len(target)]
                self.array.read_design_into(int(design), read, slice(first, first + len(target)))
                widen_into(target, read)  # numpy, one thread: torch would start a thread team in each reader
        return batch, buffer

    def _handed_out(self, read):
        batch, buffer = read
        self._in_flight.discard(id(buffer))
        return batch

    def _drop_pending(self):
        for future in self._pending:
            future.cancel() or future.exception()  # a failed read of a pass given up is not news
        self._pending = []
        self._in_flight.clear()


class StreamedBatches:
    """--load_all=0: each batch read from the file when it is needed (BatchReader, `readers` threads ahead), then
    widened (a half-size dataset) and scaled on the training device. For a GPU the batch goes there from pinned
    memory as the file stores it, on a CUDA stream of its own, overlapping the step in progress; for the CPU it is
    read as float32 (widened by the reader) and scaled in place, in the buffer it was read into. The same float32
    operations as MinMaxScaler.transform, so batches equal the preloaded ones bit for bit, whatever the number of
    readers. Under DDP each rank reads only its own designs (the callers pass its shard)."""

    def __init__(self, array: SimulationArray, indices, scaler: MinMaxScaler, device, readers=0, pin_memory=False):
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        self.reader = BatchReader(array, indices, readers, gpu=gpu, pinned=pin_memory,
                                  cuda_device=self.device if gpu else None)
        self.scaler = scaler
        self._copies = None  # the CUDA stream of the copies to the GPU

    def __len__(self):
        return len(self.reader.indices)

    def batches(self, order):
        """Scaled float32 batches [b, T, M] on the device, one per position array of order."""
        for batch in self.reader.batches(order):
            yield self.scaler.transform(widened(self._on_device(batch)), in_place=True)

    def _on_device(self, batch):
        if self.device.type != "cuda":
            return batch
        if not batch.is_pinned():  # an ordinary, blocking copy
            return batch.to(self.device)
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copies):
            moved = batch.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copies)
        self.reader.copied(batch, done)
        torch.cuda.current_stream(self.device).wait_stream(self._copies)
        moved.record_stream(torch.cuda.current_stream(self.device))
        return moved


def batches_held_by_reader(device_type: str, readers: int) -> int:
    """The batches a streamed loader holds in host memory besides the one a training step uses: the one read ahead
    for the CPU; for a GPU its pinned buffers, kept between passes (BatchReader), at most."""
    if device_type == "cuda":
        return GPU_READ_AHEAD + 2
    return CPU_READ_AHEAD if readers else 0


def _on_gpu(device) -> None:
    """A reader thread's start: the GPU its CUDA calls go to, where there is one."""
    if device is not None:
        torch.cuda.set_device(device)


def _unused(buffer: torch.Tensor) -> bool:
    """Whether nothing but this tensor holds its memory: no batch handed out, no view of one, is still alive."""
    return _use_count(buffer) <= _ALONE


def _use_count(tensor: torch.Tensor) -> int:
    """How many tensors (and storage objects) hold this tensor's memory; a large number where this torch cannot
    say, so that its buffers are never reused (each batch allocated anew: slower, still right)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return 2**62
    storage = tensor.untyped_storage()  # kept alive through the call: its address is what use_count reads
    return use_count(storage._cdata)


def make_batches(array, indices, scaler, runtime, load_all: bool):
    """The batch source the config asks for, loading as runtime chose; both kinds give identical batches for the
    same order."""
    if load_all:
        return PreloadedBatches(array, indices, scaler, runtime.device)
    return StreamedBatches(array, indices, scaler, runtime.device, runtime.readers, runtime.pin_memory)


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


_ALONE = _use_count(torch.empty(1))  # the use count of memory that only its tensor holds
