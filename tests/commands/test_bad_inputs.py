"""A catalogue of broken inputs, each run through the command line's main (a few also through SimulGen-VAE.py in a
process of its own, so that the exit code and the line reach the shell as they are).

It pins the promise of the README: every bad input (config, data, CSV, images, flags, the files given to --predict
and --reconstruct) stops the program with ONE line on stderr, `error: <file>[:<line>]: <problem>. Fix: <fix>`,
naming the file (and the line or key where there is one), with exit code 2, no traceback, and every file of the
earlier run in the case folder exactly as it was (nothing changed, moved to archive/, added or deleted).
"""
import argparse
import hashlib
import shutil
import subprocess
import sys
from contextlib import chdir

import numpy as np
import pytest
import torch

from conftest import REPO, design_parameters, smooth_fields, write_case, write_conditions
from modules.cli import main
from modules.storage.case_lock import LOCK_FILE

N_DESIGNS = 12  # write_case's default case: 12 designs of 6 steps x 20 nodes
CONDITIONERS = {
    "vae": "",
    "csv": "input_type csv\nparam_dir input_data/parameters.csv\nn_epoch 1\nlatent_conditioner_batch 4\n",
    "image": "input_type image\nparam_dir images\nimage_size 16\nn_epoch 1\nlatent_conditioner_batch 4\n",
}
RUN_FOLDERS = ("model_save", "checkpoints", "output")


def fresh_case(folder, conditioner):
    """A valid tiny case: the VAE keys of write_case plus the conditioner block ('vae' for none)."""
    write_case(folder, epochs=1, extra=CONDITIONERS[conditioner])
    write_conditions(folder, design_parameters(N_DESIGNS))


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A real trained run (VAE and CSV conditioner) of the valid case: its model_save/, checkpoints/ and output/
    are what a bad run must leave alone, and --predict/--reconstruct reach their input checks with it."""
    folder = tmp_path_factory.mktemp("earlier")
    fresh_case(folder, "csv")
    with chdir(folder):
        assert main(["--plot=2"]) == 0
    return folder


def snapshot(folder):
    """Every file (relative path -> sha256) and every folder under folder, but the case folder's lock file, which
    any writing command creates (empty again once it lets go: tests/storage/test_case_lock.py)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(folder.rglob("*")) if path.name != LOCK_FILE.name}


# ---- ways to break a valid case folder
def remove(relative):
    return lambda folder: (folder / relative).unlink()


def replace(relative, old, new):
    def apply(folder):
        text = (folder / relative).read_text()
        assert old in text, f"{old!r} not in {relative}"
        (folder / relative).write_text(text.replace(old, new, 1))
    return apply


def append(relative, text):
    return lambda folder: (folder / relative).write_text((folder / relative).read_text() + text)


def replace_line(relative, number, text):
    def apply(folder):
        lines = (folder / relative).read_text().splitlines()
        lines[number - 1] = text
        (folder / relative).write_text("\n".join(lines) + "\n")
    return apply


def drop_last_line(relative):
    return lambda folder: (folder / relative).write_text(
        "".join((folder / relative).read_text().splitlines(keepends=True)[:-1]))


def write_bytes(relative, data):
    return lambda folder: (folder / relative).write_bytes(data)


def save_array(relative, array):
    return lambda folder: np.save(folder / relative, array)


def truncate(relative):
    def apply(folder):
        data = (folder / relative).read_bytes()
        (folder / relative).write_bytes(data[: len(data) // 2])
    return apply


def pickled_model(relative):
    """A whole pickled Python object in place of the model file, as the original SimulGenVAE saves its models."""
    def apply(folder):
        torch.save(argparse.Namespace(encoder="a pickled network"), folder / relative)
    return apply


def nothing(folder):
    pass


def mesh_of(relative, n_points, key=True):
    """A real mesh file (meshio) of n_points points in a line, named by mesh_file in condition.txt when key."""
    def apply(folder):
        import meshio
        points = np.stack([np.arange(n_points, dtype=float), np.zeros(n_points)], axis=1)
        meshio.write(folder / relative, meshio.Mesh(points, [("line", np.stack([np.arange(n_points - 1),
                                                                              np.arange(1, n_points)], axis=1))]))
        if key:
            append(CONDITION, f"mesh_file {relative}\n")(folder)
    return apply


def both(*breakages):
    def apply(folder):
        for breakage in breakages:
            breakage(folder)
    return apply


def with_nan(design, step, node):
    data = smooth_fields(N_DESIGNS, 6, 20)
    data[design, step, node] = np.nan
    return data


DATASET, CONDITION, CSV = "input_data/dataset1.npy", "input_data/condition.txt", "input_data/parameters.csv"

CASES = [
    # (valid case it starts from, how it is broken, command-line arguments, words the one line must contain; id)
    pytest.param("vae", remove(DATASET), [], ["input_data/dataset1.npy", "not found"], id="missing-dataset"),
    pytest.param("vae", save_array(DATASET, smooth_fields(N_DESIGNS, 6, 21)), [],
                 ["input_data/dataset1.npy", "(12, 6, 21)", "Dim1, Dim2, Dim3"], id="dataset-of-the-wrong-shape"),
    pytest.param("vae", save_array(DATASET, with_nan(5, 2, 3)), [],
                 ["input_data/dataset1.npy", "design (sample index) 5", "nan"], id="nan-in-the-data"),
    pytest.param("vae", replace("preset.txt", "\n16 8\n", "\n16 x\n"), [], ["preset.txt:4", "encoder filters"],
                 id="preset-filter-line-not-numbers"),
    pytest.param("vae", replace(CONDITION, "Batch_size 4", "Batch_size -4"), [],
                 ["input_data/condition.txt:5", "Batch_size"], id="negative-batch-size"),
    pytest.param("vae", append(CONDITION, "Loss_type 7\n"), [], ["input_data/condition.txt:13", "Loss_type"],
                 id="unknown-loss-type"),
    pytest.param("vae", replace(CONDITION, "LearningR 0.003", "LearningR fast"), [],
                 ["input_data/condition.txt:6", "LearningR", "'fast'"], id="non-numeric-value"),
    pytest.param("vae", replace(CONDITION, "Training_epochs 1\n", ""), [],
                 ["input_data/condition.txt", "Training_epochs", "missing"], id="missing-required-key"),
    pytest.param("csv", write_bytes(CSV, b""), [], ["input_data/parameters.csv", "no data rows"], id="empty-csv"),
    pytest.param("csv", replace_line(CSV, 4, "1.5,abc"), [], ["input_data/parameters.csv:4", "column 2 (phase)"],
                 id="csv-cell-not-a-number"),
    pytest.param("csv", drop_last_line(CSV), [], ["input_data/parameters.csv", "11 data rows", "Dim1"],
                 id="csv-one-row-too-few"),
    pytest.param("image", write_bytes("images/design_003.png", bytes([7, 200, 13, 99, 1, 0, 255, 42])), [],
                 ["images/design_003.png", "cannot read it as an image"], id="corrupt-image"),
    pytest.param("image", remove("images/design_005.png"), [], ["images", "Dim1", "design_005.png is missing"],
                 id="one-image-too-few"),
    pytest.param("vae", nothing, ["--plot=5"], ["command line", "--plot"], id="bad-flag-value"),
    pytest.param("csv", nothing, ["--predict=missing.csv", "--out=fields.npy"], ["missing.csv", "not found"],
                 id="predict-a-missing-file"),
    pytest.param("csv", nothing, ["--predict=input_data/parameters.csv", "--out=nowhere/f.h5"],
                 ["nowhere/f.h5", "folder nowhere does not exist"], id="predict-into-a-missing-folder"),
    pytest.param("csv", nothing, ["--predict=input_data/parameters.csv", "--out=f.vtk"],
                 ["f.vtk", "suffix '.vtk'", ".npy, .h5, .hdf5, .xdmf"], id="predict-to-an-unknown-suffix"),
    pytest.param("csv", write_bytes("f.h5", b"kept"), ["--predict=input_data/parameters.csv", "--out=f.xdmf"],
                 ["f.h5", "already exists"], id="predict-to-xdmf-whose-h5-exists"),
    pytest.param("csv", nothing, ["--predict=input_data/parameters.csv", "--out=f.xdmf", "--samples=90"],
                 ["f.xdmf", "1116 point arrays per time step", ".h5"], id="predict-too-many-arrays-for-xdmf"),
    pytest.param("csv", mesh_of("m.vtu", 19), [], ["m.vtu", "has 19 points but each variable has 20 nodes"],
                 id="mesh-of-another-point-count"),
    pytest.param("csv", both(write_bytes("m.vtu", b"<VTKFile>not a mesh"), append(CONDITION, "mesh_file m.vtu\n")),
                 [], ["m.vtu", "cannot be read as a mesh"], id="mesh-file-unreadable"),
    pytest.param("csv", write_bytes("s.onnx", b"kept"), ["--export=s.onnx"], ["s.onnx", "already exists"],
                 id="export-onto-an-existing-file"),
    pytest.param("csv", nothing, ["--export=s.zip"], ["s.zip", ".onnx"], id="export-to-an-unknown-suffix"),
    pytest.param("vae", save_array("wrong.npy", smooth_fields(3, 5, 20)), ["--reconstruct=wrong.npy", "--out=r.npy"],
                 ["wrong.npy", "(3, 5, 20)"], id="reconstruct-an-array-of-the-wrong-shape"),
    pytest.param("vae", save_array("empty.npy", smooth_fields(0, 6, 20)), ["--reconstruct=empty.npy", "--out=r.npy"],
                 ["empty.npy"], id="reconstruct-an-array-of-no-designs"),
    pytest.param("vae", append(CONDITION, "Dim2_red 1\n"), [], ["input_data/condition.txt:13", "Dim2_red"],
                 id="one-time-step-kept"),
    pytest.param("csv", replace(CONDITION, "Latent_dim 4", "Latent_dim 6"), ["--resume"],
                 ["checkpoints/last.pt", "another config", "Latent_dim 4 -> 6"], id="checkpoint-of-another-config"),
    pytest.param("csv", truncate("checkpoints/last.pt"), ["--resume"],
                 ["checkpoints/last.pt", "cannot be loaded safely"], id="truncated-checkpoint"),
    pytest.param("csv", write_bytes("cands.csv", b"amplitude,phase,width\n1,2,3\n"),
                 ["--suggest=1", "--candidates=cands.csv"], ["cands.csv", "3 columns", "2 parameters"],
                 id="suggest-from-candidates-with-another-column"),
    pytest.param("csv", write_bytes("cands.csv", b"phase,amplitude\n1,2\n"), ["--suggest=1", "--candidates=cands.csv"],
                 ["cands.csv", "columns phase, amplitude", "amplitude, phase"], id="suggest-from-candidates-swapped"),
    pytest.param("csv", write_bytes("cands.csv", b"amplitude,phase\n1,2\n1.5,1\n"),
                 ["--suggest=3", "--candidates=cands.csv"], ["cands.csv", "2 candidate designs", "--suggest=2"],
                 id="suggest-more-designs-than-candidates"),
    pytest.param("csv", nothing, ["--suggest=0"], ["command line", "--suggest=0", "K >= 1"], id="suggest-no-designs"),
    pytest.param("csv", remove("model_save/latent_conditioner"), ["--suggest=2"],
                 ["model_save/latent_conditioner", "--lc_only=1"], id="suggest-without-a-conditioner"),
    pytest.param("csv", write_bytes("next.csv", b"kept\n"), ["--suggest=2", "--out=next.csv"],
                 ["next.csv", "already exists"], id="suggest-onto-an-existing-file"),
    pytest.param("csv", nothing, ["--candidates=cands.csv"], ["command line", "--suggest is not given"],
                 id="candidates-without-suggest"),
    pytest.param("csv", nothing, ["--suggest=0", "--predict=p.csv", "--out=p.npy"],
                 ["command line", "--predict and --suggest are different modes"], id="suggest-zero-and-predict"),
    pytest.param("csv", nothing, ["--suggest=2", "--samples=3"], ["command line", "--samples=3 needs --predict"],
                 id="suggest-with-samples"),
    pytest.param("csv", nothing, ["--suggest=2", "--candidates="], ["command line", "--candidates is given no path"],
                 id="candidates-of-no-path"),
    pytest.param("csv", nothing, ["--suggest=2000"], ["command line", "1024 candidate designs", "--candidates=PATH"],
                 id="suggest-more-designs-than-sobol-candidates"),
    pytest.param("vae", pickled_model("model_save/SimulGen-VAE"), ["--evaluate"],
                 ["model_save/SimulGen-VAE", "pickled Python object (argparse.Namespace)", "original SimulGenVAE",
                  "retrain"], id="a-model-file-of-the-original-simulgenvae"),
]


def broken_case(earlier_run, folder, conditioner, breakage):
    """A valid case beside a copy of the earlier run, then broken; returns every file's digest before the command."""
    fresh_case(folder, conditioner)
    for name in RUN_FOLDERS:
        shutil.copytree(earlier_run / name, folder / name)
    breakage(folder)
    return snapshot(folder)


def assert_one_line(code, stdout, stderr, words):
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Fix:" in lines[0], lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"


@pytest.mark.parametrize("conditioner, breakage, argv, words", CASES)
def test_a_bad_input_is_one_line_exit_code_2_and_leaves_the_earlier_run_alone(earlier_run, tmp_path, capsys,
                                                                               conditioner, breakage, argv, words):
    """In this process (the command line's main), so that the catalogue costs no interpreter start per input."""
    folder = tmp_path / "case"
    before = broken_case(earlier_run, folder, conditioner, breakage)
    capsys.readouterr()
    with chdir(folder):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own refusals exit from inside parse_args
            code = exit_.code
    captured = capsys.readouterr()
    assert_one_line(code, captured.out, captured.err, words)
    assert snapshot(folder) == before


@pytest.mark.parametrize("case_id", ["missing-dataset", "bad-flag-value", "csv-cell-not-a-number",
                                     "a-model-file-of-the-original-simulgenvae"])
@pytest.mark.slow
def test_through_the_real_entry_point_a_bad_input_is_one_line_and_exit_code_2(earlier_run, tmp_path, case_id):
    """SimulGen-VAE.py in a process of its own: the exit code and the single line reach the shell as they are."""
    conditioner, breakage, argv, words = next(case.values for case in CASES if case.id == case_id)
    folder = tmp_path / "case"
    before = broken_case(earlier_run, folder, conditioner, breakage)
    result = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), *argv], cwd=folder,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert_one_line(result.returncode, result.stdout, result.stderr, words)
    assert snapshot(folder) == before
