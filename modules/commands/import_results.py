"""--import=RESULTS_DIR: a case folder built from the solver's own result files (solver_files), streamed one design
at a time whatever their number.

Writes into input_data/: dataset{N}.npy [designs, steps, variables x nodes] float32, mesh{N}.vtu (the first design's
mesh: plots, .xdmf/.pvd outputs and the neural field use the real node positions), times{N}.csv (the steps' time
values), import{N}.json (where each design came from, in dataset order), with --order_by also parameters{N}.csv (the
CSV's other columns, in dataset order); then sets condition.txt's keys (Dim1, Dim2, Dim3, num_var, mesh_file,
time_values; input_type and param_dir with --order_by) and writes preset.txt when the folder has none.

All or nothing: every file is written under a temporary name and renamed into place only when every design has been
read and checked (condition.txt last); a refused design leaves the case folder as it was. No existing file is
overwritten except condition.txt, whose other lines are kept.
"""
import csv
import io
import json
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from modules.config.files import CONDITION_FILE, PRESET_FILE, read_preset, set_condition_keys
from modules.data.dataset import DATA_DIR, FORMATS
from modules.errors import InputError
from modules.solver_files.family import Family, find_designs, order_by_column
from modules.solver_files.results import listing, parse_fields
from modules.storage.atomic import check_room, disk_full_as, temporary_path
from modules.storage.field_files import DirectFile, npy_header

NOTE = "set by --import"
# keys that described the earlier dataset's steps, nodes or file: commented out by an import
RETIRED_KEYS = ("Dim2_red", "Dim2_spacing", "Dim3_start", "Dim3_end", "grid_shape", "node_coordinates",
                "hdf5_dataset", "data_storage")
NEW_PRESET = "data_No, init_beta_divisor, encoder_filters, conditioner_filters\n1\n0\n64 64 32\n32 64 128 256\n"
NEW_CONDITION = ("# Written by --import; every key and its default: docs/configuration.md.\n"
                 "Training_epochs 300\n")


def import_results(results_dir, fields: str | None, order_by: str | None, preset_index: int) -> str:
    """Read every design of results_dir, check them as one family and write the case (see the module's docstring);
    returns the lines that say what was found and written."""
    began = time.perf_counter()
    data_no = read_preset(PRESET_FILE, preset_index).data_no if PRESET_FILE.exists() else 1
    designs = find_designs(Path(results_dir))
    parameter_names, parameters = None, None
    if order_by:
        designs, parameter_names, parameters = order_by_column(designs, *_split_order_by(order_by))
    first = designs[0]
    if not fields:
        raise InputError(results_dir, f"holds {len(designs)} designs ({first.format}) with the variables: "
                         f"{listing(first.variables())}", "choose what to import with --fields=NAME[,NAME] (a vector "
                         "as NAME:magnitude or NAME:x, NAME:y, NAME:z)")
    picks = parse_fields(fields, first)
    family = Family(first)
    cells = first.cells()
    n_nodes = len(family.points)
    shape = (len(designs), len(family.times), len(picks) * n_nodes)
    paths = _new_files(data_no, with_parameters=order_by is not None)
    averaged = [str(pick) for pick in picks if first.variables()[pick.name].on_cells]
    made_folder, written = not DATA_DIR.exists(), []
    try:
        DATA_DIR.mkdir(exist_ok=True)
        check_room(paths["dataset"], shape)
        with disk_full_as(paths["dataset"]):
            dataset = DirectFile(temporary_path(paths["dataset"]), npy_header(shape))
            written.append(paths["dataset"])
            try:
                for design in designs:
                    if design is not first:
                        family.check(design)
                    values = family.checked_values(design, design.read(picks), picks)
                    dataset.write(memoryview(np.ascontiguousarray(values)).cast("B"))
            finally:
                dataset.close()
            _write_mesh(temporary_path(paths["mesh"]), family.points, cells)
            written.append(paths["mesh"])
            _write_text(paths["times"], "time\n" + "".join(f"{value!r}\n" for value in family.times.tolist()), written)
            record = {"source": str(Path(results_dir).resolve()), "format": first.format,
                      "fields": [str(pick) for pick in picks], "averaged_from_cells": averaged,
                      "designs": [{"name": design.name, "path": str(design.path)} for design in designs],
                      "times": family.times.tolist(), "imported": datetime.now().isoformat(timespec="seconds")}
            _write_text(paths["record"], json.dumps(record, indent=2) + "\n", written)
            keys = {"Dim1": shape[0], "Dim2": shape[1], "Dim3": shape[2], "num_var": len(picks),
                    "mesh_file": paths["mesh"].as_posix(), "time_values": paths["times"].as_posix()}
            if parameters is not None:
                table = io.StringIO()
                csv.writer(table, lineterminator="\n").writerows([parameter_names, *parameters.tolist()])
                _write_text(paths["parameters"], table.getvalue(), written)
                keys.update({"input_type": "csv", "param_dir": paths["parameters"].as_posix()})
            if not PRESET_FILE.exists():
                _write_text(PRESET_FILE, NEW_PRESET, written)  # data_No 1, as without preset.txt
            text = CONDITION_FILE.read_text() if CONDITION_FILE.exists() else NEW_CONDITION
            CONDITION_FILE.parent.mkdir(parents=True, exist_ok=True)
            temporary_path(CONDITION_FILE).write_text(set_condition_keys(text, keys, RETIRED_KEYS, NOTE))
        _commit(written, CONDITION_FILE)
    except BaseException:
        for path in [*written, CONDITION_FILE]:
            temporary_path(path).unlink(missing_ok=True)
        if made_folder and not any(DATA_DIR.iterdir()):
            DATA_DIR.rmdir()
        raise
    seconds = time.perf_counter() - began
    size = shape[0] * shape[1] * shape[2] * 4
    return "\n".join([
        f"Imported {shape[0]} designs from {results_dir} ({first.format}) in {seconds:.1f} s: {shape[1]} time steps "
        f"(t = {family.times[0]:g} to {family.times[-1]:g}), {n_nodes} nodes, "
        f"{', '.join(str(pick) for pick in picks)}",
        *([f"Cell values averaged onto the nodes of their cells: {', '.join(averaged)}"] if averaged else []),
        f"Wrote {paths['dataset']} {list(shape)} ({size / 2**20:,.1f} MiB), {paths['mesh']}, {paths['times']}, "
        f"{paths['record']}" + (f", {paths['parameters']}" if parameters is not None else "")
        + (f", {PRESET_FILE}" if PRESET_FILE in written else ""),
        f"{CONDITION_FILE}: " + ", ".join(f"{key} {value}" for key, value in keys.items())])


def _split_order_by(text: str):
    path, _, column = text.rpartition(":")
    if not path or not column:
        raise InputError("--order_by", f"'{text}' is not FILE.csv:COLUMN", "give the CSV and the column that names "
                         "each row's design, e.g. --order_by=runs.csv:run")
    if not Path(path).is_file():
        raise InputError(path, "does not exist", "give --order_by=FILE.csv:COLUMN with an existing CSV")
    return Path(path), column


def _new_files(data_no: int, with_parameters: bool) -> dict:
    """{kind: path} of the files an import writes; none may exist (nor another dataset{data_No} file)."""
    paths = {"dataset": DATA_DIR / f"dataset{data_no}.npy", "mesh": DATA_DIR / f"mesh{data_no}.vtu",
             "times": DATA_DIR / f"times{data_no}.csv", "record": DATA_DIR / f"import{data_no}.json"}
    if with_parameters:
        paths["parameters"] = DATA_DIR / f"parameters{data_no}.csv"
    taken = [path for path in paths.values() if path.exists()]
    taken += [DATA_DIR / f"dataset{data_no}{suffix}" for suffix in FORMATS
              if (DATA_DIR / f"dataset{data_no}{suffix}").exists() and suffix != ".npy"]
    if taken:
        raise InputError(taken[0], "already exists and an import never overwrites a file",
                         f"import into a new case folder, or move {taken[0].name} (or set another data_No in "
                         "preset.txt)")
    return paths


def _write_mesh(path: Path, points: np.ndarray, cells: list) -> None:
    import meshio

    mesh = meshio.Mesh(points, cells or [("vertex", np.arange(len(points))[:, None])])
    meshio.write(path, mesh, file_format="vtu")


def _write_text(path: Path, text: str, written: list) -> None:
    temporary_path(path).write_text(text)
    written.append(path)


def _commit(written: list, condition: Path) -> None:
    """Every file renamed into place, condition.txt last; a failed rename removes those already placed (they did not
    exist before: _new_files checked)."""
    placed = []
    try:
        for path in written:
            os.replace(temporary_path(path), path)
            placed.append(path)
        os.replace(temporary_path(condition), condition)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
