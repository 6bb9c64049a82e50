"""What the data pipeline promises: every format reads the same, crops are right, bad data is refused with a message,
the scaler is fitted on training designs only and inverts exactly, and every loader serves the same batches."""
import dataclasses
import json
import logging
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import said, smooth_fields, write_case
from modules.cli import main
from modules.config import load_config
from modules.config.settings import changed_settings, data_changes
from modules.data import dataset as data_module
from modules.data.augment import augment_batch
from modules.data.batches import (CPU_READ_AHEAD, GPU_READ_AHEAD, BatchReader, PreloadedBatches, StreamedBatches,
                                  batch_order, make_batches)
from modules.data.dataset import Crop, NewSimulations, SimulationArray, find_dataset, scan_and_fit_scaler, split_indices
from modules.data.scaling import MinMaxScaler
from modules.errors import InputError
from modules.machine.device import Runtime
from modules.storage.atomic import save_json


def quiet_config(notes=None):
    """load_config on the case folder; its notes appended to the list notes, or, without notes, none allowed."""
    with said(logging.WARNING) as lines:
        config = load_config()
    if notes is None:
        assert lines == [], f"unexpected warning: {lines}"
    else:
        notes.extend(lines)
    return config


def open_case(folder, monkeypatch, data=None, fmt="npy", extra="", notes=None):
    """Write a case with this data (default: smooth [12, 6, 20] fields) into folder, work there; return (data, config).
    notes: a list that receives the config's notes (default: none expected)."""
    monkeypatch.chdir(folder)
    data = smooth_fields(12, 6, 20) if data is None else data
    n, t, m = data.shape
    write_case(folder, n=n, t=t, m=m, fmt=fmt, extra=extra, data=data)
    return data, quiet_config(notes)


def counting_fields(n=5, t=10, m=16):
    """[n, t, m] float32 whose every value is unique, so any wrong index shows."""
    return np.arange(n * t * m, dtype=np.float32).reshape(n, t, m)


def refused(call, *args) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args)
    return caught.value


# ------------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["npy", "h5", "hdf5", "pickle"])
def test_every_format_reads_the_same_float32_values(tmp_path, monkeypatch, fmt):
    stored = smooth_fields(12, 6, 20).astype(np.float64)
    _, config = open_case(tmp_path, monkeypatch, data=stored, fmt=fmt)
    path = find_dataset(1)
    assert path.suffix == f".{fmt}"
    indices = [5, 0, 11, 5, 2, 0]  # out of order and repeated
    values = SimulationArray(path, config).read(indices)
    assert values.dtype == np.float32 and values.shape == (6, 6, 20)
    np.testing.assert_array_equal(values, stored[indices].astype(np.float32))


def write_two_dataset_h5(folder, monkeypatch, extra=""):
    import h5py

    first, second = counting_fields(), -counting_fields()
    open_case(folder, monkeypatch, data=first, extra=extra)
    (folder / "input_data" / "dataset1.npy").unlink()
    with h5py.File(folder / "input_data" / "dataset1.h5", "w") as handle:
        handle.create_dataset("first", data=first)
        handle.create_dataset("second", data=second)
    return second, quiet_config()


def test_hdf5_dataset_key_picks_the_named_dataset(tmp_path, monkeypatch):
    second, config = write_two_dataset_h5(tmp_path, monkeypatch, extra="hdf5_dataset second\n")
    np.testing.assert_array_equal(SimulationArray(find_dataset(1), config).read([3, 1]), second[[3, 1]])


def test_hdf5_with_two_datasets_and_no_key_is_refused(tmp_path, monkeypatch):
    _, config = write_two_dataset_h5(tmp_path, monkeypatch)
    error = refused(SimulationArray, find_dataset(1), config)
    assert "dataset1.h5" in str(error) and "first, second" in error.problem and "hdf5_dataset" in error.fix


def test_hdf5_dataset_key_naming_no_dataset_is_refused(tmp_path, monkeypatch):
    _, config = write_two_dataset_h5(tmp_path, monkeypatch, extra="hdf5_dataset third\n")
    error = refused(SimulationArray, find_dataset(1), config)
    assert "'third'" in error.problem and "first, second" in error.problem and "hdf5_dataset" in error.fix


def test_several_dataset_files_for_one_data_no_are_refused(case):
    np.save(case / "input_data" / "dataset1.npy", smooth_fields(12, 6, 20))
    (case / "input_data" / "dataset1.pickle").write_bytes(b"")
    error = refused(find_dataset, 1)
    assert "dataset1.npy" in error.problem and "dataset1.pickle" in error.problem and "only one" in error.fix


def test_missing_dataset_file_is_refused(case):
    error = refused(find_dataset, 2)
    assert error.path == str(Path("input_data/dataset2.npy")) and "not found" in error.problem
    assert "data_No" in error.fix


def test_shape_not_matching_dims_is_refused(case):
    config = dataclasses.replace(quiet_config(), n_designs=13)
    error = refused(SimulationArray, find_dataset(1), config)
    assert "(12, 6, 20)" in error.problem and "[13, 6, 20]" in error.problem and "Dim1" in error.fix


@pytest.mark.parametrize("suffix", ["npy", "h5"])
def test_corrupt_file_is_refused_without_traceback(tmp_path, monkeypatch, suffix):
    _, config = open_case(tmp_path, monkeypatch)
    target = tmp_path / "input_data" / f"dataset1.{suffix}"
    (tmp_path / "input_data" / "dataset1.npy").unlink()
    target.write_bytes(np.random.default_rng(0).bytes(4096))
    error = refused(SimulationArray, find_dataset(1), config)
    assert f"dataset1.{suffix}" in str(error) and "cannot read" in error.problem


# -------------------------------------------------------------------------------------------- crop and subsampling
def test_dim2_red_keeps_the_first_steps_as_the_original_simulgenvae(tmp_path, monkeypatch):
    stored, config = open_case(tmp_path, monkeypatch, data=counting_fields(t=10), extra="Dim2_red 4\n")
    assert Crop(config).time_index.tolist() == [0, 1, 2, 3]
    assert Crop(config).steps_said == "the first 4 of 10 steps (0-3)"
    np.testing.assert_array_equal(SimulationArray(find_dataset(1), config).read([1, 0]), stored[[1, 0], :4])


@pytest.mark.parametrize("fmt", ["npy", "h5"])
def test_dim2_spacing_even_keeps_evenly_spaced_steps_with_first_and_last(tmp_path, monkeypatch, fmt):
    stored, config = open_case(tmp_path, monkeypatch, data=counting_fields(t=10), fmt=fmt,
                               extra="Dim2_red 4\nDim2_spacing even\n")
    assert Crop(config).time_index.tolist() == [0, 3, 6, 9]
    assert Crop(config).steps_said == "4 of 10 steps, evenly spaced (0, 3, 6, 9)"
    np.testing.assert_array_equal(SimulationArray(find_dataset(1), config).read([1, 0]),
                                  stored[[1, 0]][:, [0, 3, 6, 9]])


def test_a_model_saved_before_dim2_spacing_kept_evenly_spaced_steps(tmp_path, monkeypatch):
    _, config = open_case(tmp_path, monkeypatch, data=counting_fields(t=10), extra="Dim2_red 4\n")
    saved = {field: value for field, value in config.to_dict().items() if field != "steps_spacing"}
    assert type(config).from_dict(saved).steps_spacing == "even"
    assert data_changes(type(config).from_dict(saved), config) == ["Dim2_spacing even -> first"]


@pytest.mark.parametrize("written", ["", "Dim2_spacing even\n"])
def test_with_every_step_kept_dim2_spacing_never_tells_two_configs_apart(tmp_path, monkeypatch, written):
    notes = []
    _, config = open_case(tmp_path, monkeypatch, data=counting_fields(t=10), extra=written, notes=notes)
    saved = {field: value for field, value in config.to_dict().items() if field != "steps_spacing"}  # before the key
    assert config.steps_spacing == type(config).from_dict(saved).steps_spacing == "first"
    assert data_changes(type(config).from_dict(saved), config) == []
    assert changed_settings(saved, config) == []
    assert ("has no effect" in " ".join(notes)) == bool(written)


@pytest.mark.parametrize("fmt", ["npy", "h5"])
def test_dim3_start_and_end_crop_the_nodes(tmp_path, monkeypatch, fmt):
    stored, config = open_case(tmp_path, monkeypatch, data=counting_fields(), fmt=fmt,
                               extra="Dim3_start 3\nDim3_end 11\n")
    values = SimulationArray(find_dataset(1), config).read([4, 2])
    assert values.shape == (2, 10, 8)
    np.testing.assert_array_equal(values, stored[[4, 2], :, 3:11])


@pytest.mark.parametrize("fmt", ["npy", "h5"])
@pytest.mark.parametrize("steps", [slice(0, 2), slice(1, 4), slice(3, 5)])
def test_read_steps_equals_slicing_the_full_read(tmp_path, monkeypatch, fmt, steps):
    _, config = open_case(tmp_path, monkeypatch, data=counting_fields(t=10), fmt=fmt,
                          extra="Dim2_red 5\nDim3_start 2\n")
    array = SimulationArray(find_dataset(1), config)
    indices = [3, 0, 3]
    part = array.read(indices, steps=steps)
    assert part.shape[1] == steps.stop - steps.start
    np.testing.assert_array_equal(part, array.read(indices)[:, steps])


# --------------------------------------------------------------------------------------------- how .npy is opened
def test_npy_is_memory_mapped(case):
    array = SimulationArray(find_dataset(1), quiet_config())
    assert isinstance(array._opened(), np.memmap)


class _TouchOnUnpickle:
    """Unpickling this object creates a file: evidence that a pickle inside the .npy was run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_dataset_in_the_case_folder_itself_is_found_as_the_original_kept_it(case):
    (case / "input_data" / "dataset1.npy").rename(case / "dataset1.npy")
    assert find_dataset(1) == Path("dataset1.npy")
    np.save(case / "input_data" / "dataset1.npy", smooth_fields(12, 6, 20))
    error = refused(find_dataset, 1)
    assert "input_data/dataset1.npy" in error.problem and "dataset1.npy, " in error.problem


def test_a_missing_dataset_names_both_places(case):
    (case / "input_data" / "dataset1.npy").unlink()
    error = refused(find_dataset, 1)
    assert "input_data/ or ./" in error.fix and "dataset1.npy" in error.fix


def test_object_npy_is_refused_and_never_unpickled(case):
    evidence = case / "unpickled"
    objects = np.empty((12, 6, 20), dtype=object)
    objects[0, 0, 0] = _TouchOnUnpickle(evidence)
    np.save(case / "input_data" / "dataset1.npy", objects, allow_pickle=True)
    error = refused(SimulationArray, find_dataset(1), quiet_config())
    assert "dataset1.npy" in str(error) and "cannot read" in error.problem
    assert not evidence.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_legacy_pickle_of_an_array_is_read_with_any_protocol(case, protocol):
    data = smooth_fields(12, 6, 20)
    (case / "input_data" / "dataset1.npy").unlink()
    (case / "input_data" / "dataset1.pickle").write_bytes(pickle.dumps(data, protocol=protocol))
    array = SimulationArray(find_dataset(1), quiet_config())
    assert np.array_equal(array.read(range(12)), data)


def test_a_legacy_pickle_holding_anything_but_arrays_is_refused_without_running_it(case, capsys):
    evidence = case / "unpickled"
    (case / "input_data" / "dataset1.npy").unlink()
    (case / "input_data" / "dataset1.pickle").write_bytes(pickle.dumps([_TouchOnUnpickle(evidence)]))
    assert main([]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dataset1.pickle" in error and "pathlib" in error and "not only numpy" in error
    assert not evidence.exists()


def test_npy_is_loaded_memory_mapped_without_pickles(case, monkeypatch):
    calls = []
    original = np.load
    monkeypatch.setattr(data_module.np, "load", lambda *a, **k: (calls.append(k), original(*a, **k))[1])
    SimulationArray(find_dataset(1), quiet_config()).read([0])
    assert calls and all(k.get("mmap_mode") == "r" and k.get("allow_pickle") is False for k in calls)


# ------------------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("chunk_bytes", [data_module.READ_CHUNK_BYTES, 1], ids=["one_chunk", "chunk_per_design"])
def test_non_finite_values_are_refused_naming_the_design(tmp_path, monkeypatch, chunk_bytes):
    stored = smooth_fields(12, 6, 20)
    stored[7, 2, 3] = np.nan
    stored[9, 0, 0] = np.inf
    _, config = open_case(tmp_path, monkeypatch, data=stored)
    monkeypatch.setattr(data_module, "READ_CHUNK_BYTES", chunk_bytes)
    error = refused(scan_and_fit_scaler, SimulationArray(find_dataset(1), config), np.arange(12), 1)
    assert "design (sample index) 7 " in error.problem and "dataset1.npy" in str(error)
    if chunk_bytes > 1:
        assert "[7, 9]" in error.problem


# ------------------------------------------------------------------------------------------------------- scaler
def fitted(folder, monkeypatch, stored, extra="", train=None):
    _, config = open_case(folder, monkeypatch, data=stored, extra=extra)
    array = SimulationArray(find_dataset(1), config)
    train = np.arange(len(stored)) if train is None else train
    return array, scan_and_fit_scaler(array, train, config.n_vars)


def test_scaler_is_fitted_on_training_designs_only(tmp_path, monkeypatch):
    stored = smooth_fields(12, 6, 20)
    train, val = split_indices(12, 0.25, 42)
    stored[val[0], 1, 1] = 1e6
    stored[val[-1], 2, 2] = -1e6
    _, scaler = fitted(tmp_path, monkeypatch, stored, train=train)
    assert scaler.data_min.tolist() == [float(stored[train].min())]
    assert scaler.data_max.tolist() == [float(stored[train].max())]


@pytest.mark.parametrize("chunk_bytes", [data_module.READ_CHUNK_BYTES, 1], ids=["one_chunk", "chunk_per_design"])
def test_scaler_maps_training_data_onto_minus_to_plus_0_7(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(data_module, "READ_CHUNK_BYTES", chunk_bytes)
    train = np.array([0, 2, 3, 5, 8, 11])
    array, scaler = fitted(tmp_path, monkeypatch, smooth_fields(12, 6, 20), train=train)
    scaled = scaler.transform(array.read(train))
    assert scaled.dtype == np.float32
    assert scaled.min() == pytest.approx(-0.7, abs=1e-6) and scaled.max() == pytest.approx(0.7, abs=1e-6)


def test_inverse_undoes_transform_for_numpy_and_torch(tmp_path, monkeypatch):
    array, scaler = fitted(tmp_path, monkeypatch, smooth_fields(12, 6, 20) * 1000 - 50)
    physical = array.read(np.arange(12))
    back = scaler.inverse(scaler.transform(physical))
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_allclose(back, physical, rtol=1e-6, atol=1e-6 * np.abs(physical).max())
    tensor = torch.from_numpy(physical)
    back_tensor = scaler.inverse(scaler.transform(tensor))
    assert isinstance(back_tensor, torch.Tensor) and back_tensor.dtype == torch.float32
    np.testing.assert_allclose(back_tensor.numpy(), physical, rtol=1e-5, atol=1e-5 * np.abs(physical).max())
    np.testing.assert_allclose(scaler.transform(tensor).numpy(), scaler.transform(physical), atol=1e-6)


def test_each_variable_gets_its_own_range(tmp_path, monkeypatch):
    stored = smooth_fields(12, 6, 20)
    stored[:, :, 10:] = stored[:, :, 10:] * 1e4 + 5e4  # variable 2: a very different magnitude
    array, scaler = fitted(tmp_path, monkeypatch, stored, extra="num_var 2\n")
    assert scaler.n_vars == 2 and scaler.data_max[1] > 1e4 > scaler.data_max[0]
    scaled = scaler.transform(array.read(np.arange(12)))
    for variable in (scaled[..., :10], scaled[..., 10:]):
        assert variable.min() == pytest.approx(-0.7, abs=1e-6) and variable.max() == pytest.approx(0.7, abs=1e-6)


def test_constant_field_does_not_divide_by_zero(tmp_path, monkeypatch):
    array, scaler = fitted(tmp_path, monkeypatch, np.full((12, 6, 20), 3.5, dtype=np.float32))
    scaled = scaler.transform(array.read([0, 1]))
    assert np.isfinite(scaled).all() and np.all(scaled == 0.0)
    np.testing.assert_array_equal(scaler.inverse(scaled), np.full((2, 6, 20), 3.5, dtype=np.float32))


def test_scaler_saves_and_loads_as_json(tmp_path):
    scaler = MinMaxScaler([-1.5, 2.0], [4.0, 2.0])
    path = tmp_path / "scaler.json"
    save_json(path, scaler.to_dict())  # as a VAE run writes model_save/scaler.json
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")  # a pickle starts with its protocol byte
    assert json.loads(raw)["data_min"] == [-1.5, 2.0]
    loaded = MinMaxScaler.from_dict(json.loads(raw))
    values = np.linspace(-2, 5, 24, dtype=np.float32).reshape(3, 8)
    assert loaded.to_dict() == scaler.to_dict()
    np.testing.assert_array_equal(loaded.transform(values), scaler.transform(values))


# -------------------------------------------------------------------------------------------------------- split
def test_split_is_reproducible_for_a_seed_and_changes_with_it():
    first, again, other = split_indices(20, 0.25, 7), split_indices(20, 0.25, 7), split_indices(20, 0.25, 8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("n, fraction", [(20, 0.25), (12, 0.2), (2, 0.01), (2, 0.5), (2, 0.99), (3, 0.99)])
def test_split_is_disjoint_complete_and_leaves_both_sides(n, fraction):
    train, val = split_indices(n, fraction, 3)
    assert len(train) >= 1 and len(val) >= 1
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    if n == 20:
        assert len(val) == 5


# ------------------------------------------------------------------------------------------------------- loaders
def test_batch_order_depends_on_seed_and_epoch_and_covers_every_position_once():
    order = batch_order(10, 4, True, seed=1, epoch=3)
    assert [len(b) for b in order] == [4, 4, 2]
    assert sorted(np.concatenate(order).tolist()) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(order, batch_order(10, 4, True, seed=1, epoch=3)))
    assert not np.array_equal(np.concatenate(order), np.concatenate(batch_order(10, 4, True, seed=1, epoch=4)))
    assert np.concatenate(batch_order(10, 4, False, seed=1, epoch=3)).tolist() == list(range(10))


@pytest.mark.parametrize("fmt, readers, extra", [("npy", 0, "Dim2_red 4\nDim3_start 2\n"),
                                                 ("npy", 2, "Dim2_red 4\nDim3_start 2\n"),
                                                 ("npy", 3, "Dim2_red 4\nDim2_spacing even\n"), ("npy", 1, ""),
                                                 ("h5", 2, "Dim2_red 4\nDim3_start 2\n")])
def test_preloaded_and_streamed_batches_are_identical(tmp_path, monkeypatch, fmt, readers, extra):
    _, config = open_case(tmp_path, monkeypatch, fmt=fmt, extra=extra)
    array = SimulationArray(find_dataset(1), config)
    train, _ = split_indices(12, 0.25, 42)
    scaler = scan_and_fit_scaler(array, train, 1)
    streamed = StreamedBatches(array, train, scaler, "cpu", readers=readers)
    for epoch in (1, 2, 3):  # later passes fill the buffers of earlier ones
        order = batch_order(len(train), 4, True, seed=5, epoch=epoch)
        preloaded = list(PreloadedBatches(array, train, scaler, "cpu").batches(order))
        batches = [batch.clone() for batch in streamed.batches(order)]
        assert len(preloaded) == len(batches) == len(order)
        for positions, pre, stream in zip(order, preloaded, batches):
            assert torch.equal(pre, stream)
            assert torch.equal(stream, torch.from_numpy(scaler.transform(array.read(train[positions]))))


@pytest.mark.parametrize("stored", ["float64", "fortran"])
def test_a_dataset_the_reads_cannot_copy_as_it_lies_streams_the_same_values(tmp_path, monkeypatch, stored):
    data = smooth_fields(12, 6, 20).astype(np.float64)
    _, config = open_case(tmp_path, monkeypatch, data=np.asfortranarray(data) if stored == "fortran" else data)
    array = SimulationArray(find_dataset(1), config)
    assert array.stored_dtype == torch.float32  # converted as read, through read()
    scaler = scan_and_fit_scaler(array, np.arange(12), 1)
    order = batch_order(12, 5, True, seed=0, epoch=0)
    batches = list(StreamedBatches(array, np.arange(12), scaler, "cpu", readers=2).batches(order))
    assert all(torch.equal(batch, torch.from_numpy(scaler.transform(data[positions].astype(np.float32))))
               for batch, positions in zip(batches, order))


def test_reader_threads_serve_every_pass_and_an_abandoned_pass_does_not_leak_into_the_next(tmp_path, monkeypatch):
    _, config = open_case(tmp_path, monkeypatch)
    array = SimulationArray(find_dataset(1), config)
    scaler = scan_and_fit_scaler(array, np.arange(12), 1)
    streamed = StreamedBatches(array, np.arange(12), scaler, "cpu", readers=2)
    expected = lambda positions: torch.from_numpy(scaler.transform(array.read(positions)))
    first = streamed.batches(batch_order(12, 3, True, seed=0, epoch=0))
    next(first)  # a pass stopped after one batch, its readers reading ahead
    threads = streamed.reader._threads
    for epoch in (1, 2):
        order = batch_order(12, 5, True, seed=0, epoch=epoch)
        batches = list(streamed.batches(order))
        assert len(batches) == len(order)
        assert all(torch.equal(batch, expected(positions)) for batch, positions in zip(batches, order))
    assert streamed.reader._threads is threads  # not new ones per pass
    older = streamed.batches(batch_order(12, 3, False, seed=0, epoch=0))
    next(older)
    next(streamed.batches(batch_order(12, 3, True, seed=0, epoch=9)))
    with pytest.raises(RuntimeError, match="resumed after a newer pass"):
        next(older)  # an older pass cannot take the newer pass's batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the pinned buffers and the copy stream)")
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_streamed_batches_on_a_gpu_equal_the_preloaded_ones(tmp_path, monkeypatch, storage):
    open_case(tmp_path, monkeypatch, data=smooth_fields(40, 6, 20))
    if storage != "float32":
        assert main([f"--store_half={storage}"]) == 0
    config = dataclasses.replace(quiet_config(), data_storage=storage)
    array = data_module.open_dataset(config)
    scaler = scan_and_fit_scaler(array, np.arange(40), 1)
    streamed = StreamedBatches(array, np.arange(40), scaler, "cuda", readers=2, pin_memory=True)
    for epoch in (0, 1, 2):  # later passes fill the pinned buffers of earlier ones again
        order = batch_order(40, 4, True, seed=0, epoch=epoch)
        preloaded = list(PreloadedBatches(array, np.arange(40), scaler, "cuda").batches(order))
        for pre, batch in zip(preloaded, streamed.batches(order)):
            assert batch.device.type == "cuda" and torch.equal(pre, batch)


def test_the_buffers_kept_for_a_gpu_are_filled_again_but_never_under_a_batch_its_caller_keeps(tmp_path, monkeypatch):
    _, config = open_case(tmp_path, monkeypatch, data=smooth_fields(40, 6, 20))
    array = SimulationArray(find_dataset(1), config)
    reader = BatchReader(array, np.arange(40), readers=2, gpu=True)  # as for a GPU, without pinning (no GPU here)
    expected = lambda positions: torch.from_numpy(array.read(positions))
    kept = list(reader.batches(batch_order(40, 4, True, seed=0, epoch=0)))  # the caller holds all ten
    values = [batch.clone() for batch in kept]
    kept_memory = {batch.data_ptr() for batch in kept}
    for epoch in (1, 2):
        order = batch_order(40, 4, True, seed=0, epoch=epoch)
        memory = set()
        for batch, positions in zip(reader.batches(order), order):  # each dropped before the next is read
            assert torch.equal(batch, expected(positions))
            memory.add(batch.data_ptr())
    assert all(torch.equal(batch, value) for batch, value in zip(kept, values))
    assert not memory & kept_memory  # the kept batches' memory was not lent to the later passes
    assert len(memory) <= GPU_READ_AHEAD + 2  # ten batches a pass, from the few buffers filled again


def test_for_the_cpu_no_buffer_outlives_its_batch(tmp_path, monkeypatch):
    _, config = open_case(tmp_path, monkeypatch, data=smooth_fields(40, 6, 20))
    array = SimulationArray(find_dataset(1), config)
    scaler = scan_and_fit_scaler(array, np.arange(40), 1)
    streamed = StreamedBatches(array, np.arange(40), scaler, "cpu", readers=2)
    buffers = []
    for batch in streamed.batches(batch_order(40, 4, True, seed=0, epoch=0)):
        buffers.append(weakref.ref(batch if batch._base is None else batch._base))
    del batch
    assert streamed.reader.ahead == CPU_READ_AHEAD and len(buffers) == 10
    assert all(buffer() is None for buffer in buffers)  # each freed with its batch: none kept for the next steps


def test_a_pass_given_up_frees_what_it_read_ahead(tmp_path, monkeypatch):
    _, config = open_case(tmp_path, monkeypatch, data=smooth_fields(40, 6, 20))
    array = SimulationArray(find_dataset(1), config)
    scaler = scan_and_fit_scaler(array, np.arange(40), 1)
    streamed = StreamedBatches(array, np.arange(40), scaler, "cpu", readers=2)
    batches = streamed.batches(batch_order(40, 4, True, seed=0, epoch=0))
    next(batches)
    ahead = [future.result()[0] for future in streamed.reader._pending]
    assert len(ahead) == CPU_READ_AHEAD
    read_ahead = weakref.ref(ahead.pop())
    del batches  # a stop: the pass is never resumed, and no later pass comes to clean up after it
    assert streamed.reader._pending == [] and read_ahead() is None


def test_a_file_cut_short_while_streaming_is_refused_naming_it(tmp_path, monkeypatch):
    _, config = open_case(tmp_path, monkeypatch)
    array = SimulationArray(find_dataset(1), config)
    scaler = scan_and_fit_scaler(array, np.arange(12), 1)
    path = find_dataset(1)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)  # the last design loses its end
    batches = StreamedBatches(array, np.arange(12), scaler, "cpu", readers=2).batches([np.arange(12)])
    with pytest.raises(InputError, match="truncated") as caught:
        next(batches)
    assert "dataset1.npy" in caught.value.message()


def test_make_batches_picks_the_kind_load_all_asks_for(case):
    array = SimulationArray(find_dataset(1), quiet_config())
    scaler = MinMaxScaler([0.0], [1.0])
    runtime = Runtime(device=torch.device("cpu"), readers=1)
    assert isinstance(make_batches(array, [0, 1], scaler, runtime, load_all=True), PreloadedBatches)
    streamed = make_batches(array, [0, 1], scaler, runtime, load_all=False)
    assert isinstance(streamed, StreamedBatches) and streamed.reader.readers == 1


def test_streaming_reads_nothing_until_batches_are_asked_for(case, monkeypatch):
    array = SimulationArray(find_dataset(1), quiet_config())
    reads = []
    original = SimulationArray.read_design_into
    monkeypatch.setattr(SimulationArray, "read_design_into", lambda self, index, *a, **k: (
        reads.append(index), original(self, index, *a, **k))[1])
    scaler = MinMaxScaler([0.0], [5.0])
    streamed = StreamedBatches(array, np.arange(12), scaler, "cpu")
    PreloadedBatches(array, np.arange(12), scaler, "cpu")
    assert reads == []
    order = batch_order(12, 5, True, seed=0, epoch=0)
    batches = list(streamed.batches(order))
    assert reads == np.concatenate(order).tolist() and len(batches) == 3  # each design once, when asked for


# ------------------------------------------------------------------------------------------------ half storage
def store(storage):
    with said(logging.INFO):
        return main([f"--store_half={storage}"])


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_store_half_rounds_every_value_to_nearest_and_training_reads_it_widened(tmp_path, monkeypatch, capsys,
                                                                               storage):
    data, _ = open_case(tmp_path, monkeypatch, data=smooth_fields(12, 6, 20) * 1000 + 3)
    assert main([f"--store_half={storage}"]) == 0
    said_lines = capsys.readouterr().out
    expected = torch.from_numpy(data).to(getattr(torch, storage)).float().numpy()  # torch's own rounding
    largest = np.abs(expected - data).max()
    assert f"variable 1: {largest:.3g} (" in said_lines and f"data_storage {storage}" in said_lines
    stored = np.load(tmp_path / "input_data" / f"dataset1.{storage}.npy")
    assert stored.dtype == {"float16": np.float16, "bfloat16": np.uint16}[storage] and stored.shape == data.shape
    config = quiet_config(notes=[])
    config = dataclasses.replace(config, data_storage=storage)
    array = data_module.open_dataset(config)
    np.testing.assert_array_equal(array.read(np.arange(12)), expected)
    scaler = scan_and_fit_scaler(array, np.arange(12), 1)
    order = batch_order(12, 5, True, seed=0, epoch=0)
    preloaded = list(PreloadedBatches(array, np.arange(12), scaler, "cpu").batches(order))
    for readers in (0, 2):
        streamed = list(StreamedBatches(array, np.arange(12), scaler, "cpu", readers=readers).batches(order))
        assert all(torch.equal(a, b) for a, b in zip(preloaded, streamed))
        assert all(torch.equal(batch, torch.from_numpy(scaler.transform(expected[positions])))
                   for batch, positions in zip(streamed, order))


def test_a_run_on_half_storage_says_its_rounding_and_trains(tmp_path, monkeypatch):
    open_case(tmp_path, monkeypatch)
    assert main(["--store_half=float16"]) == 0
    with said(logging.INFO) as lines:
        assert main(["--data_storage=float16"]) == 0
    line = next(line for line in lines if "Data stored in float16" in line)
    assert "dataset1.float16.npy" in line and "of each variable's range" in line


def test_store_half_never_overwrites_and_refuses_what_float16_cannot_hold(tmp_path, monkeypatch, capsys):
    data = smooth_fields(12, 6, 20)
    data[7, 2, 3] = 1e6
    open_case(tmp_path, monkeypatch, data=data)
    assert main(["--store_half=float16"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "design 7" in error and "65504" in error and "bfloat16" in error
    assert sorted(path.name for path in (tmp_path / "input_data").iterdir()) == ["condition.txt", "dataset1.npy"]
    assert main(["--store_half=bfloat16"]) == 0
    written = (tmp_path / "input_data" / "dataset1.bfloat16.npy").read_bytes()
    assert main(["--store_half=bfloat16"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "input_data" / "dataset1.bfloat16.npy").read_bytes() == written


def test_store_half_says_the_rounding_of_the_variables_the_config_keeps(tmp_path, monkeypatch, capsys):
    data = smooth_fields(12, 6, 21)
    data[:, :, 0] = 1e4  # a node the crop leaves out: the kept variables' ranges do not include it
    open_case(tmp_path, monkeypatch, data=data, extra="num_var 2\nDim3_start 1\n")
    assert main(["--store_half=float16"]) == 0
    said_lines = capsys.readouterr().out
    kept = data[:, :, 1:].reshape(12, 6, 2, 10)
    for variable in (0, 1):
        low, high = kept[:, :, variable].min(), kept[:, :, variable].max()
        assert f"variable {variable + 1}: " in said_lines and f"of {low:.6g} .. {high:.6g})" in said_lines
    assert np.load(tmp_path / "input_data" / "dataset1.float16.npy").shape == (12, 6, 21)  # every node written


def test_half_storage_that_loses_the_fields_variation_is_refused(tmp_path, monkeypatch, capsys):
    open_case(tmp_path, monkeypatch, data=300 + 0.01 * smooth_fields(12, 6, 20))  # float16's spacing at 300: 0.25
    assert main(["--store_half=float16"]) == 0
    capsys.readouterr()
    assert main(["--data_storage=float16"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dataset1.float16.npy" in error and "variable 1" in error
    assert "data_storage float32" in error and not (tmp_path / "model_save").exists()


@pytest.mark.parametrize("written", [None, np.float32])
def test_half_storage_without_its_file_or_of_another_dtype_is_refused(tmp_path, monkeypatch, capsys, written):
    data, _ = open_case(tmp_path, monkeypatch)
    if written is not None:
        np.save(tmp_path / "input_data" / "dataset1.float16.npy", data.astype(written))
    assert main(["--data_storage=float16"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dataset1.float16.npy" in error and "--store_half=float16" in error


# ------------------------------------------------------------------------------------------------- augmentation
def augment_config(case, **settings):
    return dataclasses.replace(quiet_config(), **settings)


def test_augmentation_is_off_by_default(case):
    batch = torch.randn(4, 6, 20)
    inputs, targets = augment_batch(batch, augment_config(case))
    assert inputs is batch and targets is batch


def test_noise_goes_on_inputs_only(case):
    torch.manual_seed(0)
    batch = torch.randn(8, 6, 20)
    original = batch.clone()
    inputs, targets = augment_batch(batch, augment_config(case, augment_noise_std=0.1))
    assert torch.equal(targets, original) and torch.equal(batch, original)
    assert float((inputs - original).std()) == pytest.approx(0.1, rel=0.15)


def residual_outside_batch_span(batch, outputs):
    """How far each output row lies from the span of the batch's rows; also the mixing coefficients [B_in, B_out]."""
    basis = batch.reshape(len(batch), -1).double().T
    rows = outputs.reshape(len(outputs), -1).double().T
    coefficients = torch.linalg.lstsq(basis, rows).solution
    return (basis @ coefficients - rows).abs().max().item(), coefficients


@pytest.mark.parametrize("settings", [{"augment_mixup_prob": 1.0}, {"augment_amplitude": 0.5},
                                      {"augment_mixup_prob": 0.7, "augment_amplitude": 0.3, "augment_noise_std": 0.0}],
                         ids=["mixup", "amplitude", "both"])
def test_mixup_and_amplitude_only_combine_rows_of_the_batch(case, settings):
    torch.manual_seed(1)
    train_batch, validation_design = torch.randn(4, 6, 20), torch.randn(1, 6, 20)
    config = augment_config(case, **settings)
    for _ in range(20):
        inputs, targets = augment_batch(train_batch, config)
        assert not torch.equal(targets, train_batch)
        for outputs in (inputs, targets):
            residual, coefficients = residual_outside_batch_span(train_batch, outputs)
            assert residual < 1e-5
            if settings == {"augment_mixup_prob": 1.0}:
                assert torch.allclose(coefficients.sum(dim=0), torch.ones(4, dtype=torch.float64), atol=1e-6)
                assert coefficients.min() > -1e-6
    # the check can fail: a batch row mixed with a design from outside the batch leaves the span
    leaked = 0.5 * train_batch[:1] + 0.5 * validation_design
    assert residual_outside_batch_span(train_batch, leaked)[0] > 0.1


# ----------------------------------------------------------------------------------------------- new simulations
@pytest.fixture
def cropped(case):
    config = dataclasses.replace(quiet_config(), n_steps_used=3, node_start=2, node_end=12)
    return Crop(config)


@pytest.mark.parametrize("spacing, steps", [("first", [0, 1, 2]), ("even", [0, 2, 5])])
def test_new_simulations_may_be_raw_or_already_cropped(case, spacing, steps):
    cropped = Crop(dataclasses.replace(quiet_config(), n_steps_used=3, node_start=2, node_end=12,
                                       steps_spacing=spacing))
    raw = smooth_fields(2, 6, 20, seed=3).astype(np.float64)
    np.save(case / "raw.npy", raw)
    expected = raw[:, steps, 2:12].astype(np.float32)
    from_raw = NewSimulations(case / "raw.npy", cropped).batch(0, 2)
    assert from_raw.dtype == np.float32 and from_raw.shape == (2, 3, 10)
    np.testing.assert_array_equal(from_raw, expected)
    np.save(case / "kept.npy", expected)
    np.testing.assert_array_equal(NewSimulations(case / "kept.npy", cropped).batch(0, 2), expected)
    np.testing.assert_array_equal(NewSimulations(case / "kept.npy", cropped).batch(1, 2), expected[1:])


@pytest.mark.parametrize("shape", [(2, 6, 19), (2, 3, 20), (6, 20)])
def test_new_simulations_of_another_shape_are_refused(case, cropped, shape):
    np.save(case / "other.npy", np.zeros(shape, dtype=np.float32))
    error = refused(NewSimulations, case / "other.npy", cropped)
    assert str(shape) in error.problem and "other.npy" in str(error)
    assert "[n, 6, 20]" in error.problem and "[n, 3, 10]" in error.problem
