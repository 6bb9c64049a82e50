"""--store_half=float16|bfloat16: a half-size copy of the case's dataset, input_data/dataset{data_No}.{storage}.npy,
for data_storage to train on (half the bytes to read per pass: a streamed run whose disk is its limit reads twice as
many designs a second).

It reads the float32 dataset a chunk of designs at a time (any size of data, in any of its formats, whole: every
step and node, so Dim1-Dim3 hold for both files), rounds each value to the nearest half-size one (ties to even, as
the hardware does), and says per variable the largest rounding error, next to the variable's range (both on the
steps and nodes the config keeps, which make the variables). A value beyond the half type's range, or a NaN/Inf,
is refused with the design it is in; the file is written whole or not at all, and an existing one is never
overwritten.
"""
import numpy as np

from modules.data.dataset import (DATA_DIR, HALF_DTYPES, READ_CHUNK_BYTES, SimulationArray, find_dataset, half_name,
                                  refuse_non_finite, to_float32)
from modules.errors import InputError
from modules.storage.atomic import array_written_in_place

LARGEST = {"float16": "65504", "bfloat16": "3.39e38"}


def store_half(config, storage: str) -> str:
    """Write the half-size copy; return what was written and the rounding, in a few lines."""
    source = find_dataset(config.data_no)
    target = DATA_DIR / half_name(config.data_no, storage)
    if target.exists():
        raise InputError(target, "already exists, and --store_half never overwrites a file",
                         "remove or rename it first, then run the same command again")
    array = SimulationArray(source, config)  # checks the shape against Dim1-Dim3
    n_designs, n_steps, n_nodes = config.n_designs, config.n_steps, config.n_nodes
    per_chunk = max(1, READ_CHUNK_BYTES // (4 * n_steps * n_nodes))
    n_vars = config.n_vars
    low, high, largest = (np.full(n_vars, value) for value in (np.inf, -np.inf, 0.0))
    with array_written_in_place(target, (n_designs, n_steps, n_nodes), HALF_DTYPES[storage]) as out:
        for start in range(0, n_designs, per_chunk):
            designs = np.arange(start, min(start + per_chunk, n_designs))
            block = array.whole_designs(start, designs[-1] + 1)
            refuse_non_finite(source, block, designs)
            half = rounded(block, storage)
            widened = to_float32(half, storage)
            if not np.isfinite(widened).all():
                design, step, node = (int(i) for i in np.argwhere(~np.isfinite(widened))[0])
                raise InputError(source, f"design {designs[design]} holds {block[design, step, node]:g} at step "
                                 f"{step}, node {node}, beyond {storage}'s largest value ({LARGEST[storage]})",
                                 "use --store_half=bfloat16 (float32's range, 8 bits of precision)"
                                 if storage == "float16" else "keep the float32 dataset")
            out[start:designs[-1] + 1] = half
            kept = (slice(None), array.crop.time_index, array.crop.nodes)  # the variables: the kept nodes, side by side
            by_variable = block[kept].reshape(len(block), len(array.crop.time_index), n_vars, -1)
            low = np.minimum(low, by_variable.min(axis=(0, 1, 3)))
            high = np.maximum(high, by_variable.max(axis=(0, 1, 3)))
            error = np.abs(widened[kept] - block[kept]).reshape(by_variable.shape)
            largest = np.maximum(largest, error.max(axis=(0, 1, 3)))
    span = np.where(high > low, high - low, 1.0)
    lines = [f"Wrote {target} ({storage}, {target.stat().st_size / 1e9:.3g} GB) from {source}: {n_designs} designs "
             f"x {n_steps} steps x {n_nodes} nodes. The largest rounding error of each variable, next to its range:"]
    lines += [f"  variable {v + 1}: {largest[v]:.3g} ({100 * largest[v] / span[v]:.3g} % of {low[v]:.6g} .. "
              f"{high[v]:.6g})" for v in range(n_vars)]
    lines.append(f"Train on it with data_storage {storage} in input_data/condition.txt (or --data_storage={storage}); "
                 "where a model reconstructs within a few times that error, the rounding is part of its error.")
    return "\n".join(lines)


def rounded(values: np.ndarray, storage: str) -> np.ndarray:
    """float32 -> the stored half-size values: float16, or bfloat16's bits as uint16 (round to nearest, ties to
    even: the upper 16 bits of the float32 after adding 0x7FFF and the lowest kept bit)."""
    if storage == "float16":
        with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf, which store_half refuses
            return values.astype(np.float16)
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
