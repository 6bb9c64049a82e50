"""bench/benchmark.py measures every asked-for combination with the real training code and reports it as JSON and
as a markdown table. Nothing here asserts a speed: the numbers depend on the machine."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO, smooth_fields

TINY = ["--filters", "16", "8", "--batch", "4", "--epochs", "2", "--device", "cpu"]


def run_benchmark(*arguments):
    """Run the script; one OpenMP thread per process, because tiny tensors gain nothing from more and threads that
    spin against other busy processes on a small machine make each step orders of magnitude slower."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "benchmark.py"), *arguments], capture_output=True,
                          text=True, env=environment, timeout=300)


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("|")]


def test_every_combination_gets_a_measured_row_in_json_and_table(tmp_path):
    done = run_benchmark("--designs", "12", "--steps", "6", "--nodes", "40", *TINY, "--amp", "off", "bf16",
                         "--loading", "lazy", "preloaded", "--json", str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    rows = report["rows"]
    assert sorted((row["loading"], row["amp"]) for row in rows) == [
        ("lazy", "bf16"), ("lazy", "off"), ("preloaded", "bf16"), ("preloaded", "off")]
    assert {row["precision"] for row in rows if row["amp"] == "off"} == {"float32"}
    for row in rows:
        assert row["samples_per_s"] > 0 and row["predict_designs_per_s"] > 0
        assert 0 <= row["data_share"] <= 1
        assert row["peak_host_gb"] > 0 and row["peak_device_gb"] is None and row["activations_gb"] > 0
    assert report["inputs"]["shape"] == [12, 6, 40] and report["inputs"]["data"] == "synthetic"
    assert report["hardware"]["cpu"] and report["hardware"]["torch"]
    table = table_lines(done.stdout)
    assert table[0].startswith("| loading | precision") and len(table) == 2 + 4  # header, separator, 4 rows
    assert "this run on this hardware" in done.stdout


def test_real_data_file_gives_the_shape(tmp_path):
    np.save(tmp_path / "fields.npy", smooth_fields(10, 5, 30))
    done = run_benchmark("--data", str(tmp_path / "fields.npy"), *TINY, "--amp", "off", "--loading", "preloaded")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("\n{") + 1:])  # no --json: the JSON follows the table
    assert report["inputs"]["shape"] == [10, 5, 30]
    assert len(report["rows"]) == 1 and report["rows"][0]["samples_per_s"] > 0
    assert len(table_lines(done.stdout)) == 2 + 1
