"""bench/benchmark.py measures every asked-for combination with the real training code and reports it as JSON and
as a markdown table. Nothing here asserts a speed: the numbers depend on the machine."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, smooth_fields

sys.path.insert(0, str(REPO / "bench"))

TINY = ["--filters", "16", "8", "--batch", "4", "--epochs", "2", "--device", "cpu"]


def run_benchmark(*arguments):
    """Run the script; one OpenMP thread per process, because tiny tensors gain nothing from more and threads that
    spin against other busy processes on a small machine make each step orders of magnitude slower."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "benchmark.py"), *arguments], capture_output=True,
                          text=True, env=environment, timeout=300)


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("|")]


@pytest.mark.slow
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


@pytest.mark.slow
def test_real_data_file_gives_the_shape(tmp_path):
    np.save(tmp_path / "fields.npy", smooth_fields(10, 5, 30))
    done = run_benchmark("--data", str(tmp_path / "fields.npy"), *TINY, "--amp", "off", "--loading", "preloaded")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("\n{") + 1:])  # no --json: the JSON follows the table
    assert report["inputs"]["shape"] == [10, 5, 30]
    assert len(report["rows"]) == 1 and report["rows"][0]["samples_per_s"] > 0
    assert len(table_lines(done.stdout)) == 2 + 1


@pytest.mark.slow
def test_the_loader_benchmark_reads_every_configuration_next_to_the_plain_read(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "loader_speed.py"), "--designs", "6", "--steps", "4",
                           "--nodes", "500", "--batch", "2", "--ranks", "1", "2", "--readers", "0", "2",
                           "--repeats", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "l.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "l.json").read_text())
    assert report["shape"] == [6, 4, 500] and report["batch"] == 2
    measured = {(row["storage"], row["cache"], row["ranks"], row["readers"], row["to"]) for row in report["rows"]}
    expected = {(storage, cache, 1, "plain read", "host") for storage in ("float32", "float16")
                for cache in ("warm", "cold")}
    expected |= {(storage, cache, ranks, readers, to) for storage in ("float32", "float16")
                 for cache in ("warm", "cold") for ranks in (1, 2) for readers in (0, 2) for to in ("host", "cpu")}
    assert measured == expected and len(report["rows"]) == len(expected)
    assert all(row["file_gb_s"] > 0 for row in report["rows"])
    assert len(table_lines(done.stdout)) == 2 + len(expected)
    assert list(tmp_path.iterdir()) == [tmp_path / "l.json"]  # its data removed


def test_the_import_benchmark_imports_its_vtu_family_next_to_the_plain_read(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "import_speed.py"), "--designs", "3", "--steps", "2",
                           "--side", "6", "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "i.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "i.json").read_text())
    assert (report["designs"], report["steps"], report["nodes"], report["encoding"]) == (3, 2, 36, "none")
    assert [row["cache"] for row in report["rows"]] == ["warm", "cold"]
    assert all(row["seconds"] > 0 and 0 < row["peak_resident_GB"] < 4 for row in report["rows"])
    assert "Imported 3 designs" in done.stdout
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["results_none"]  # the case removed


# ---------------------------------------------------------------------------------------------- accuracy benchmark
@pytest.mark.slow
def test_the_accuracy_benchmark_trains_every_case_and_reports_it_next_to_pod_and_pod_gpr(tmp_path):
    """A smoke run of bench/accuracy.py on tiny versions of its cases: each is trained by the real command line in
    its own case folder, and every row carries the run's own evaluation numbers."""
    from accuracy import pod_on_parameters

    arguments = ["--designs", "16", "--steps", "6", "--grid", "6", "--line", "24", "--epochs", "2", "--lc_epochs", "2",
                 "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "accuracy.json")]
    done = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), *arguments], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [row["case"] for row in rows] == ["demo", "pulse", "burgers", "beam", "shear", "plate"]
    assert rows[1]["shape"] == rows[4]["shape"] == rows[5]["shape"] == [16, 6, 36]
    assert rows[2]["shape"] == rows[3]["shape"] == [16, 6, 24]
    for row in rows:
        evaluation = json.loads((tmp_path / "work" / row["case"] / "output" / "evaluation.json").read_text())
        assert row["vae"] == evaluation["reconstruction"]["vae"]["relative_l2"]["mean"]
        if row["case"] == "plate":  # images: the run has no parameters, the benchmark scores them itself
            assert "pod_gpr" not in evaluation["prediction"] and 0 < row["pod_gpr"] < row["mean_field"]
            continue
        assert row["pod_gpr"] == evaluation["prediction"]["pod_gpr"]["relative_l2"]["mean"]
        assert 0 <= row["pod"] < row["mean_field"]
        assert row["conditioner_label"] == evaluation["labels"]["conditioner"]
        # the generated cases say where their nodes are (a grid, a line's coordinates), so a neural field is tried
        # there (kept as a candidate, or stopped early as losing); the demo's condition.txt turns it off
        assert ("neural_field" in row["candidates"] or row["stopped"] is not None) == (row["case"] != "demo")
    table = table_lines(done.stdout)
    assert table[0].startswith("| case | designs") and len(table) == 2 + 6
    # the plate's POD surrogates on its parameters are the report's own: on the demo they give the report's numbers
    demo = pod_on_parameters(tmp_path / "work" / "demo", "input_data/parameters.csv", rows[0]["latent_numbers"])
    assert demo["pod_gpr"]["relative_l2"]["mean"] == pytest.approx(rows[0]["pod_gpr"], rel=1e-9)
    assert demo["pod_rbf"]["relative_l2"]["mean"] == pytest.approx(rows[0]["pod_rbf"], rel=1e-9)
    assert all(row["time_spent"]["kept_s"] > 0 and row["time_spent"]["discarded_s"] >= 0 for row in rows)
    assert all(line.endswith(f"{row['time_spent']['kept_s']:.0f} s / {row['time_spent']['discarded_s']:.0f} s |")
               for line, row in zip(table[2:], rows))
    again = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), *arguments], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr  # an earlier benchmark's folders are never overwritten


@pytest.mark.slow
def test_the_spatial_decoder_benchmark_reports_each_case_next_to_the_reports_pod(tmp_path):
    """A smoke run of bench/spatial_decoders.py: each row's POD error is POD of the designs with K modes computed
    here from an SVD (so the benchmark's baselines are the report's), and a declared periodic parameter adds a
    prediction row only where the case has it."""
    from cases import pulse_fields, pulse_parameters

    from modules.data.dataset import split_indices

    arguments = ["--cases", "pulse", "burgers", "--designs", "16", "--steps", "4", "--grid", "6", "--line", "16",
                 "--epochs", "1", "--fit_epochs", "1", "--direct_epochs", "1", "--periodic", "theta=6.2831853", "--json",
                 str(tmp_path / "decoders.json")]
    done = subprocess.run([sys.executable, str(REPO / "bench" / "spatial_decoders.py"), *arguments],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    pulse, burgers = json.loads((tmp_path / "decoders.json").read_text())["rows"]
    assert pulse["shape"] == [16, 4, 36] and burgers["shape"] == [16, 4, 16] and pulse["latent_size"] == 12
    assert list(pulse["prediction"]) == ["parameters", "parameters, direct", "periodic parameters",
                                         "periodic parameters, direct"]
    assert list(burgers["prediction"]) == ["parameters", "parameters, direct"]
    train, val = split_indices(16, 0.2, 42)
    fields = pulse_fields(pulse_parameters(16, 0), 4, 6).reshape(16, -1).astype(np.float64)
    mean = fields[train].mean(axis=0)
    modes = np.linalg.svd(fields[train] - mean, full_matrices=False)[2][:12]
    projected = (fields[val] - mean) @ modes.T @ modes + mean
    errors = np.linalg.norm(projected - fields[val], axis=1) / np.linalg.norm(fields[val], axis=1)
    assert np.isclose(pulse["pod"], errors.mean(), rtol=1e-6)
    for row in (pulse, burgers):
        assert all(value > 0 for value in (row["field_codes"], row["field_k"], row["pod_gpr"],
                                           *row["prediction"].values()))
    assert len(table_lines(done.stdout)) == 2 + 2 and "G multiply-adds per design" in done.stdout


def test_generated_cases_are_the_physics_they_claim():
    from cases import burgers_fields, burgers_parameters, pulse_fields, pulse_parameters

    parameters = pulse_parameters(3, 0)
    pulse = pulse_fields(parameters, steps=4, grid=32)
    times = np.arange(1, 5) / 4
    peak = 0.08 ** 2 / (0.08 ** 2 + 2 * parameters[:, 4:5] * times)  # the peak falls as the pulse spreads
    assert np.all(pulse.max(axis=2) <= peak + 1e-6) and np.all(pulse.max(axis=2) >= 0.85 * peak)  # nodes miss it
    assert np.allclose(pulse.sum(axis=2), pulse.sum(axis=2)[:, :1], rtol=1e-3)  # mass is conserved
    parameters = burgers_parameters(3, 0)
    burgers = burgers_fields(parameters, steps=4, nodes=128)
    assert np.allclose(burgers.mean(axis=2), parameters[:, :1], atol=1e-6)  # a conservative scheme keeps the mean
    assert np.all(burgers.max(axis=2) <= (parameters[:, 0] + parameters[:, 1])[:, None] + 1e-5)  # no new extrema


def test_the_active_learning_benchmark_simulates_added_designs_as_the_demo_did_and_appends_them(tmp_path):
    import active_learning
    shipped = REPO / "input_data"
    k_max = float(active_learning.demo.conductivity_fields(active_learning.read_rows(shipped / "parameters.csv"),
                                                           active_learning.GRID).max())
    new = active_learning.read_rows(shipped / "new_designs" / "parameters.csv")  # written to 6 digits
    assert np.allclose(active_learning.simulate(new, k_max), np.load(shipped / "new_designs" / "fields.npy"),
                       atol=1e-4)
    base = tmp_path / "base"
    (base / "input_data").mkdir(parents=True)
    (base / "preset.txt").write_text((REPO / "preset.txt").read_text())
    for name in ("condition.txt", "dataset1.npy", "parameters.csv", "plate.vtu"):
        (base / "input_data" / name).write_bytes((shipped / name).read_bytes())
    folder = active_learning.case_with(tmp_path / "arm", base, new[:3], k_max)
    fields = np.load(folder / "input_data" / "dataset1.npy")
    assert fields.shape[0] == 99 and np.array_equal(fields[:96], np.load(shipped / "dataset1.npy"))
    assert np.allclose(fields[96:], np.load(shipped / "new_designs" / "fields.npy")[:3], atol=1e-4)
    assert np.array_equal(active_learning.read_rows(folder / "input_data" / "parameters.csv")[96:], new[:3])
    assert "Dim1            99" in (folder / "input_data" / "condition.txt").read_text().splitlines()
