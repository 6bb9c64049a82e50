"""Results where engineers look and models where they deploy: --predict and --reconstruct write .npy, .h5 and .xdmf
(read back with h5py and meshio, the same numbers), streamed a batch at a time; the real mesh (mesh_file) carries
into the plots and the .xdmf; --export writes ONNX (run with onnxruntime) and torch.export files that match
--predict."""
import types
from contextlib import chdir

import h5py
import meshio
import numpy as np
import onnxruntime
import pytest
import torch

from modules.cli import main
from modules.commands import predict, reconstruct
from modules.data.field_layout import read_field_layout
from modules.errors import InputError
from modules.storage import field_files

NEW = "input_data/new_designs/parameters.csv"


def predicted(demo, tmp_path, name, *flags):
    """--predict of the demo's new designs to tmp_path / name (on the GPU where there is one)."""
    with chdir(demo):
        assert main([f"--predict={NEW}", f"--out={tmp_path / name}", *flags]) == 0
    return tmp_path / name


@pytest.mark.slow
def test_h5_and_xdmf_outputs_hold_the_npy_numbers_on_the_demo_mesh_with_samples(demo, tmp_path):
    fields = np.load(predicted(demo, tmp_path, "p.npy", "--samples=2"))  # each stem has its OUT_report.json
    with h5py.File(predicted(demo, tmp_path, "h.h5", "--samples=2")) as file:
        for name in ("", "_samples", "_mean", "_std"):
            assert np.array_equal(file["fields" if not name else name[1:]][:], np.load(tmp_path / f"p{name}.npy"))
        assert file["fields"].chunks == (1, 24, 400)  # one design read without the rest
        assert list(file["designs"].asstr()[:3]) == ["row 1", "row 2", "row 3"]
        assert list(file["parameters"].attrs["names"]) == ["cx", "cy", "radius", "conductivity"]
        assert np.allclose(file["parameters"][:], np.loadtxt(demo / NEW, delimiter=",", skiprows=1))
        assert np.array_equal(file["time_steps"][:], np.arange(24))
        assert np.allclose(file["node_coordinates"][:, :2], np.loadtxt(demo / "input_data/node_coordinates.csv",
                                                                       delimiter=",", skiprows=1), atol=1e-6)
    xdmf = predicted(demo, tmp_path, "q.xdmf", "--samples=2")
    assert (tmp_path / "q.h5").is_file() and not list(tmp_path.glob("*.tmp*"))
    with meshio.xdmf.TimeSeriesReader(xdmf) as series:
        points, cells = series.read_points_cells()
        assert points.shape == (400, 3) and [(block.type, len(block.data)) for block in cells] == [("quad", 361)]
        assert series.num_steps == 24
        for step in (0, 23):
            time_value, point_data, _ = series.read_data(step)
            assert time_value == step
            assert np.array_equal(point_data["row_2"], fields[1, step])
            assert np.array_equal(point_data["row_2_std"], np.load(tmp_path / "p_std.npy")[1, step])
            assert np.array_equal(point_data["row_8_sample1"], np.load(tmp_path / "p_samples.npy")[7, 1, step])


@pytest.mark.slow
def test_prediction_is_streamed_in_batches_from_the_memory_left_and_batching_changes_no_number(demo, tmp_path,
                                                                                               monkeypatch):
    whole = np.load(predicted(demo, tmp_path, "whole.npy", "--samples=2", "--device=cpu"))  # the CPU's rule
    batches = []
    original = field_files.FieldFile.write

    def write(self, start, fields, **arrays):
        batches.append(len(fields))
        return original(self, start, fields, **arrays)

    monkeypatch.setattr(field_files.FieldFile, "write", write)
    monkeypatch.setattr(predict, "HOST_BATCH_BYTES", 3 * 24 * 400 * 4 * (1 + 2 + 3))  # 3 designs with 2 samples
    pieces = np.load(predicted(demo, tmp_path, "pieces.npy", "--samples=2", "--device=cpu"))
    assert batches == [3, 3, 2]
    assert np.allclose(pieces, whole, atol=1e-6)
    # each design's draws come from its own seeded generator: the samples do not depend on the batches either
    assert np.allclose(np.load(tmp_path / "pieces_samples.npy"), np.load(tmp_path / "whole_samples.npy"), atol=1e-5)
    monkeypatch.setattr(predict, "available_host_bytes", lambda: 24 * 400 * 4 * 6 * 4 * 4)  # 1 design's share
    assert predict.prediction_batch_size(None, range(8), (8, 24, 400), 2, torch.device("cpu")) == 1


@pytest.mark.slow
def test_a_prediction_that_fails_while_writing_or_renaming_leaves_no_file(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "HOST_BATCH_BYTES", 3 * 24 * 400 * 4 * (1 + 2 + 3))  # 3 batches, with 2 samples
    calls = []

    def failing_second_batch(original):
        def write_batch(self, *arrays):
            calls.append(1)
            if len(calls) % 3 == 2:
                raise OSError(5, "Input/output error")
            return original(self, *arrays)
        return write_batch

    for writer in (field_files.NpyFieldFile, field_files.H5FieldFile, field_files.XdmfFieldFile):
        monkeypatch.setattr(writer, "write_batch", failing_second_batch(writer.write_batch))
    for name in ("f.npy", "f.h5", "g.xdmf"):
        calls.clear()
        with chdir(demo), pytest.raises(OSError, match="Input/output error"):
            main([f"--predict={NEW}", f"--out={tmp_path / name}", "--samples=2", "--device=cpu"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    replaced = []
    real_replace = field_files.os.replace

    def replace_failing_the_second(source, target):
        replaced.append(target)
        if len(replaced) == 2:  # OUT.npy is in place already: it must go too
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(field_files.os, "replace", replace_failing_the_second)
    with chdir(demo), pytest.raises(OSError):
        main([f"--predict={NEW}", f"--out={tmp_path / 'f.npy'}", "--samples=2"])
    assert len(replaced) == 2 and list(tmp_path.iterdir()) == []


def test_each_designs_draws_depend_on_the_seed_and_the_design_not_on_its_batch():
    from modules.uncertainty.spread import DesignNoise
    whole = DesignNoise(42, 0, 5).randn((5, 3))
    assert torch.equal(DesignNoise(42, 2, 3).randn((3, 3)), whole[2:])
    assert not torch.allclose(DesignNoise(43, 0, 5).randn((5, 3)), whole)  # the seed is not lost
    assert not torch.allclose(whole[0], whole[1])


@pytest.mark.slow
def test_the_demo_mesh_gives_the_plots_its_cells(demo):
    config = types.SimpleNamespace(n_vars=1, n_nodes_used=400, grid_shape="", grid=(), node_coordinates="",
                                   mesh_file=str(demo / "input_data" / "plate.vtu"))
    layout = read_field_layout(config)
    assert layout.kind == "coordinates" and layout.position_key == "mesh_file"
    assert layout.triangles().shape == (722, 3)  # each of the 361 quads as two triangles
    assert layout.output_mesh(400) is layout.mesh
    assert (demo / "output" / "evaluation_prediction_fields.png").is_file()  # drawn on them by the fixture's run
    with pytest.raises(InputError, match="has 400 points but each variable has 200 nodes"):
        read_field_layout(types.SimpleNamespace(**{**vars(config), "n_vars": 2}))


@pytest.mark.slow
def test_reconstruct_writes_h5_with_the_npy_numbers_in_batches_from_the_memory_left(demo, tmp_path, monkeypatch):
    with chdir(demo):
        assert main(["--reconstruct=input_data/new_designs/fields.npy", f"--out={tmp_path / 'r.npy'}"]) == 0
        assert main(["--reconstruct=input_data/new_designs/fields.npy", f"--out={tmp_path / 'r.h5'}"]) == 0
    with h5py.File(tmp_path / "r.h5") as file:
        assert np.array_equal(file["fields"][:], np.load(tmp_path / "r.npy"))
        assert list(file["designs"].asstr()[:2]) == ["design 0", "design 1"] and "parameters" not in file
    # not Batch_size (16 in the demo): 32 MB of fields on the CPU, fewer when the memory left is short
    design_bytes = 24 * 400 * 4
    assert reconstruct.reconstruction_batch_size(5000, (24, 400), "cpu") == predict.HOST_BATCH_BYTES // design_bytes
    assert reconstruct.reconstruction_batch_size(3, (24, 400), "cpu") == 3
    monkeypatch.setattr(predict, "available_host_bytes",
                        lambda: 5 * design_bytes * 2 * predict.HOST_SHARE * predict.PENDING_BATCHES)
    assert reconstruct.reconstruction_batch_size(5000, (24, 400), "cpu") == 5
    batches, original = [], field_files.FieldFile.write
    monkeypatch.setattr(field_files.FieldFile, "write",
                        lambda self, start, fields: batches.append(len(fields)) or original(self, start, fields))
    with chdir(demo):
        assert main(["--reconstruct=input_data/new_designs/fields.npy", f"--out={tmp_path / 'pieces.npy'}"]) == 0
    assert max(batches) == 5 and sum(batches) == len(np.load(tmp_path / "r.npy"))
    assert np.allclose(np.load(tmp_path / "pieces.npy"), np.load(tmp_path / "r.npy"), atol=1e-6)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_and_matches_predict(demo, tmp_path, capsys):
    with chdir(demo):
        assert main([f"--export={tmp_path / 'surrogate.onnx'}"]) == 0
    said = capsys.readouterr().out
    assert "matches --predict on 64 designs" in said and "input 'parameters' ['n', 4]" in said
    session = onnxruntime.InferenceSession(str(tmp_path / "surrogate.onnx"), providers=["CPUExecutionProvider"])
    assert [(node.name, node.shape[1:]) for node in session.get_inputs()] == [("parameters", [4])]
    raw = np.loadtxt(demo / NEW, delimiter=",", skiprows=1, dtype=np.float32)
    fields = session.run(["fields"], {"parameters": raw})[0]
    expected = np.load(predicted(demo, tmp_path, "p.npy"))
    assert fields.shape == expected.shape == (8, 24, 400)
    assert np.abs(fields - expected).max() < 1e-4 * np.abs(expected).max()  # float32 input rows vs the CSV's float64


@pytest.mark.slow
def test_torch_export_file_loads_and_matches_predict(demo, tmp_path):
    with chdir(demo):
        assert main([f"--export={tmp_path / 'surrogate.pt2'}"]) == 0
    program = torch.export.load(tmp_path / "surrogate.pt2")
    raw = torch.from_numpy(np.loadtxt(demo / NEW, delimiter=",", skiprows=1, dtype=np.float32))
    with torch.no_grad():  # the parameters are exported as trainable: no graph for the backward pass
        fields = program.module()(raw[:5]).numpy()
    expected = np.load(predicted(demo, tmp_path, "p.npy"))[:5]
    assert np.abs(fields - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.mark.slow
def test_an_export_that_differs_from_predict_is_not_kept(demo, tmp_path, monkeypatch, capsys):
    from modules.commands import export
    monkeypatch.setattr(export, "largest_relative_difference", lambda exported, predicted: 0.5)
    with chdir(demo):
        assert main([f"--export={tmp_path / 's.onnx'}"]) == 2
    assert "differs from --predict by 0.5" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_the_docs_document_the_output_formats_and_export():
    from conftest import REPO
    page = (REPO / "docs" / "prediction.md").read_text()
    for words in ("--out=fields.h5", "--out=fields.xdmf", "--export=surrogate.onnx", "mesh_file",
                  "Ort::Session", "InferenceSession"):
        assert words in page, words


@pytest.mark.parametrize("refuse_direct_writes", [False, True])
def test_npy_files_are_written_directly_in_blocks_and_read_back_by_numpy(tmp_path, monkeypatch, refuse_direct_writes):
    """O_DIRECT through a page-aligned staging buffer (the header padded to a block), the last partial block
    written plainly; a file system that refuses O_DIRECT writes (EINVAL) gets ordinary ones, the same bytes."""
    import fcntl
    import os
    values = np.random.default_rng(0).normal(size=(7, 5, 333)).astype(np.float32)  # not a multiple of a block
    real_pwrite, direct_writes = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(len(data))
            if refuse_direct_writes:
                raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(field_files, "STAGING_BYTES", 3 * field_files.DIRECT_ALIGNMENT)  # several flushes
    monkeypatch.setattr(field_files.os, "pwrite", pwrite)
    written = field_files.DirectFile(tmp_path / "v.npy", field_files.npy_header(values.shape))
    for part in np.array_split(values.reshape(-1), 5):
        written.write(memoryview(part).cast("B"))
    written.close()
    assert direct_writes and all(size % field_files.DIRECT_ALIGNMENT == 0 for size in direct_writes)
    full_stagings = (field_files.DIRECT_ALIGNMENT + values.nbytes) // (3 * field_files.DIRECT_ALIGNMENT)
    assert len(direct_writes) == (1 if refuse_direct_writes else full_stagings)  # then the partial rest, plainly
    assert np.array_equal(np.load(tmp_path / "v.npy"), values)
    assert (tmp_path / "v.npy").stat().st_size == field_files.DIRECT_ALIGNMENT + values.nbytes
