"""Run records (modules/runs.py): ids, run folders, run.json through a run's life, and the --list_runs table."""
import json
from contextlib import chdir
from datetime import datetime

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_case
from modules import cli
from modules.cli import main
from modules.commands import train as train_command
from modules.storage.runs import (RUN_FILE, end_run, list_runs, new_run_id, note_time, start_run, time_spent,
                                  update_run)

NOON = datetime(2024, 5, 17, 12, 30, 5)


def read_record(run):
    return json.loads((run.folder / RUN_FILE).read_text())


def new_run(tmp_path, kind="vae", **options):
    return start_run(kind, ["SimulGen-VAE.py", "--preset=1"], {"epochs": 2}, [], runs_dir=tmp_path / "runs",
                     **options)


def set_started(run, started, **results):
    """Give a run a chosen start time and results, as if it had been recorded then."""
    record = read_record(run)
    record.update(started=started, results=results)
    (run.folder / RUN_FILE).write_text(json.dumps(record))


def table_ids(text, ids):
    """The ids in the order the table lists them (each line starts with its run's id)."""
    return [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in ids]


def test_run_id_is_the_time_and_a_second_run_in_the_same_second_gets_a_suffix(tmp_path):
    runs_dir = tmp_path / "runs"
    assert new_run_id(NOON, runs_dir) == "20240517-123005"
    (runs_dir / "20240517-123005").mkdir(parents=True)
    assert new_run_id(NOON, runs_dir) == "20240517-123005-2"
    (runs_dir / "20240517-123005-2").mkdir()
    assert new_run_id(NOON, runs_dir) == "20240517-123005-3"


def test_new_run_writes_config_copies_and_an_unfinished_record(tmp_path):
    (tmp_path / "preset.txt").write_text("preset\n")
    (tmp_path / "input_data").mkdir()
    (tmp_path / "input_data" / "condition.txt").write_text("Dim1 12\n")
    run = start_run("vae+conditioner", ["SimulGen-VAE.py", "--preset=1"], {"epochs": 2, "lr": 0.003},
                    [tmp_path / "preset.txt", tmp_path / "input_data" / "condition.txt", tmp_path / "missing.txt"],
                    runs_dir=tmp_path / "runs")
    assert run.folder == tmp_path / "runs" / run.id and run.log_dir("vae") == run.folder / "vae"
    assert json.loads((run.folder / "config.json").read_text()) == {"epochs": 2, "lr": 0.003}
    assert (run.folder / "preset.txt").read_text() == "preset\n"
    assert (run.folder / "condition.txt").read_text() == "Dim1 12\n"
    assert not (run.folder / "missing.txt").exists()
    record = read_record(run)
    assert record["id"] == run.id and record["kind"] == "vae+conditioner" and record["vae_run"] is None
    assert record["command"] == "SimulGen-VAE.py --preset=1"
    assert (record["status"], record["ended"], record["detail"], record["resumed"], record["results"]) == (
        "unfinished", None, None, [], {})
    datetime.fromisoformat(record["started"])
    assert not list(run.folder.glob("*.tmp"))


def test_resuming_reopens_the_record_and_keeps_results(tmp_path):
    run = new_run(tmp_path)
    update_run(run, vae_best_val_loss=0.5)
    end_run(run, "stopped", "SIGTERM")
    started = read_record(run)["started"]
    again = start_run("vae", ["SimulGen-VAE.py", "--resume=1"], {"epochs": 99}, [], run_id=run.id,
                      runs_dir=tmp_path / "runs")
    assert again == run
    record = read_record(run)
    assert (record["status"], record["ended"], record["detail"]) == ("unfinished", None, None)
    assert record["results"] == {"vae_best_val_loss": 0.5} and record["started"] == started
    assert len(record["resumed"]) == 1 and record["command"] == "SimulGen-VAE.py --preset=1"
    assert json.loads((run.folder / "config.json").read_text()) == {"epochs": 2}
    start_run("vae", [], {}, [], run_id=run.id, runs_dir=tmp_path / "runs")
    assert len(read_record(run)["resumed"]) == 2


def test_resuming_a_deleted_run_records_it_afresh_under_its_id(tmp_path):
    run = start_run("conditioner", ["x"], {"a": 1}, [], run_id="20240101-000000", vae_run="20231231-235959",
                    runs_dir=tmp_path / "runs")
    record = read_record(run)
    assert run.id == record["id"] == "20240101-000000" and record["vae_run"] == "20231231-235959"
    assert record["resumed"] == [] and (run.folder / "config.json").exists()


def test_update_run_merges_results(tmp_path):
    run = new_run(tmp_path)
    update_run(run, vae_epochs=3, vae_best_val_loss=0.25)
    update_run(run, vae_best_val_loss=0.125, pod_val_error=None)
    assert read_record(run)["results"] == {"vae_epochs": 3, "vae_best_val_loss": 0.125, "pod_val_error": None}


def test_end_run_sets_status_and_copies_only_existing_files(tmp_path):
    run = new_run(tmp_path)
    (run.folder / "metrics.csv").write_text("old\n")
    (tmp_path / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    end_run(run, "failed", "RuntimeError: CUDA out of memory", files=[tmp_path / "metrics.csv",
                                                                      tmp_path / "evaluation.json"])
    record = read_record(run)
    assert (record["status"], record["detail"]) == ("failed", "RuntimeError: CUDA out of memory")
    datetime.fromisoformat(record["ended"])
    assert (run.folder / "metrics.csv").read_text() == "epoch,loss\n1,0.5\n"
    assert not (run.folder / "evaluation.json").exists()


@pytest.fixture
def three_runs(tmp_path):
    """Oldest: validation errors 3 % (VAE) / 1 % (prediction); middle: none; newest: VAE 2 % only. Their losses
    rank the other way round, so the sorts show which number they follow. Returns (runs_dir, ids by age)."""
    runs = [start_run("vae", [], {}, [], run_id=run_id, runs_dir=tmp_path / "runs")
            for run_id in ("old", "middle", "new")]
    set_started(runs[0], "2024-01-01T10:00:00", vae_val_error=0.03, prediction_val_error=0.01,
                vae_best_val_loss=10.0, conditioner_best_val_loss=0.5)
    set_started(runs[1], "2024-02-01T10:00:00")
    set_started(runs[2], "2024-03-01T10:00:00", vae_val_error=0.02, vae_best_val_loss=20.0)
    return tmp_path / "runs", ["old", "middle", "new"]


@pytest.mark.parametrize("sort, order", [("date", ["new", "middle", "old"]),
                                         ("val_loss", ["new", "old", "middle"]),
                                         ("lc_val_loss", ["old", "new", "middle"])])
def test_list_runs_order(three_runs, sort, order):
    runs_dir, ids = three_runs
    assert table_ids(list_runs(sort, runs_dir), ids) == order


def test_list_runs_formats_numbers_and_marks_missing_ones(tmp_path):
    run = start_run("conditioner", [], {}, [], run_id="20240517-123005", runs_dir=tmp_path / "runs")
    update_run(run, vae_epochs=120, vae_best_val_loss=0.000123456, vae_val_error=0.0069, prediction_val_error=0.1234,
               conditioner_best_val_loss=63.4)
    lines = list_runs(runs_dir=tmp_path / "runs").splitlines()
    assert len(lines) == 4 and lines[0].startswith("run ")
    assert lines[-1] == f"TensorBoard, all runs side by side: tensorboard --logdir {tmp_path / 'runs'}"
    assert lines[-2].startswith("val error: mean relative L2 error of the validation designs' fields")
    row = lines[1]
    assert row.startswith("20240517-123005") and "conditioner on ?" in row and "unfinished" in row
    assert row.split()[-4:] == ["120", "0.690%", "-", "12.3%"]
    assert "0.0001235" not in row and "63.4" not in row  # the losses mean nothing to a user: not shown
    assert len(lines[0]) == len(row)  # aligned: the last column is right-aligned under its header
    assert "best val loss" not in lines[0] and lines[0].split("  ")[-1] == "prediction val error"


def test_runs_recorded_without_the_error_still_list_as_a_dash_and_sort_last(tmp_path):
    runs = [start_run("vae", [], {}, [], run_id=run_id, runs_dir=tmp_path / "runs")
            for run_id in ("before", "after", "broken")]
    set_started(runs[0], "2024-03-01T10:00:00", vae_epochs=50, vae_best_val_loss=0.01)  # before errors were recorded
    set_started(runs[1], "2024-01-01T10:00:00", vae_epochs=60, vae_best_val_loss=63.4, vae_val_error=0.25)
    set_started(runs[2], "2024-02-01T10:00:00", vae_val_error=float("nan"), prediction_val_error="1 %")
    ids = ["before", "after", "broken"]
    assert table_ids(list_runs("val_loss", tmp_path / "runs"), ids) == ["after", "before", "broken"]
    assert table_ids(list_runs("lc_val_loss", tmp_path / "runs"), ids) == ["before", "broken", "after"]  # by date
    rows = {line.split()[0]: line.split() for line in list_runs(runs_dir=tmp_path / "runs").splitlines()}
    assert rows["before"][-4:] == ["50", "-", "-", "-"] and rows["after"][-4:] == ["60", "25.0%", "-", "-"]
    assert rows["broken"][-4:] == ["-"] * 4


def test_unreadable_run_json_gets_its_own_line(three_runs):
    runs_dir, ids = three_runs
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / RUN_FILE).write_text("{not json")
    (runs_dir / "list").mkdir()
    (runs_dir / "list" / RUN_FILE).write_text("[1, 2]")
    (runs_dir / "no-record").mkdir()
    for sort in ("date", "val_loss", "lc_val_loss"):
        text = list_runs(sort, runs_dir)
        assert table_ids(text, ["broken", "list", "no-record", *ids])[-2:] == ["list", "broken"]
    broken = next(line for line in text.splitlines() if line.startswith("broken"))
    assert "unreadable run.json" in broken and broken.split()[-5:] == ["-"] * 5


def test_no_runs_gives_one_line(tmp_path):
    assert list_runs(runs_dir=tmp_path / "runs") == (
        f"No runs yet in {tmp_path / 'runs'}/: a training run (python SimulGen-VAE.py) records one.")


def test_unknown_sort_raises(tmp_path):
    with pytest.raises(ValueError):
        list_runs("loss", tmp_path / "runs")


# ------------------------------------------------------------------------------------- through the command line
def test_every_training_run_is_recorded_and_listed_and_tensorboard_shows_them_side_by_side(tmp_path, capsys):
    write_case(tmp_path, n=12, epochs=2)
    with chdir(tmp_path):
        assert main([]) == 0
        condition = tmp_path / "input_data" / "condition.txt"
        condition.write_text(condition.read_text().replace("LearningR 0.003", "LearningR 0.0001"))
        assert main([]) == 0
        capsys.readouterr()
        assert main(["--list_runs=val_loss"]) == 0
        by_loss = capsys.readouterr().out.splitlines()
        assert main(["--list_runs"]) == 0
        by_date = capsys.readouterr().out.splitlines()
        assert main(["--list_runs", "--plot=1"]) == 2
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "runs").glob("*/run.json"))]
    assert len(records) == 2 and all(record["status"] == "finished" for record in records)
    first, second = records
    assert "LearningR 0.003" in (tmp_path / "runs" / first["id"] / "condition.txt").read_text()
    assert json.loads((tmp_path / "runs" / second["id"] / "config.json").read_text())["lr"] == 0.0001
    assert (tmp_path / "runs" / first["id"] / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    ids_by_error = [line.split()[0] for line in by_loss[1:3]]
    errors = {record["id"]: record["results"]["vae_val_error"] for record in records}
    assert [errors[run_id] for run_id in ids_by_error] == sorted(errors.values())  # both may keep the POD start
    for run_id, line in zip(ids_by_error, by_loss[1:3]):
        assert f"{100 * errors[run_id]:#.3g}%" in line.split()  # the VAE's validation error, in %
    assert [line.split()[0] for line in by_date[1:3]] == [second["id"], first["id"]]
    for record in records:  # one TensorBoard folder per run, under one log dir
        events = EventAccumulator(str(tmp_path / "runs" / record["id"] / "vae"))
        events.Reload()
        assert len(events.Scalars("val/loss")) == 2


def test_a_run_that_fails_after_it_started_is_recorded_as_failed(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(train_command, "train_vae", broken)
    write_case(tmp_path, n=12, epochs=2)
    with chdir(tmp_path), pytest.raises(RuntimeError):
        cli.main([])
    record = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert record["status"] == "failed" and record["detail"] == "RuntimeError: disk full" and record["ended"]


def test_time_spent_adds_up_each_part_across_a_resume_and_keeps_the_latest_kept_word(tmp_path):
    run = new_run(tmp_path)
    assert time_spent(run) is None and time_spent(None) is None
    note_time(None, "VAE network", 5.0, kept=True)  # another process's: nothing recorded
    note_time(run, "POD start", 1.5, kept=True)
    note_time(run, "VAE network", 10.0, kept=False)
    note_time(run, "VAE network", 2.5, kept=True)  # the resumed part: its time adds, its word is the latest
    note_time(run, "MLP", 4.0, kept=False)
    assert time_spent(run) == {"parts": {"POD start": {"seconds": 1.5, "kept": True},
                                         "VAE network": {"seconds": 12.5, "kept": True},
                                         "MLP": {"seconds": 4.0, "kept": False}},
                               "kept_s": 14.0, "discarded_s": 4.0}
    update_run(run, vae_epochs=3)  # results and time are kept apart
    assert read_record(run)["results"]["vae_epochs"] == 3 and time_spent(run)["kept_s"] == 14.0
