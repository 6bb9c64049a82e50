"""Checkpoints and --resume: a killed, pre-empted or interrupted run continues exactly where it stood, a checkpoint
of another config or a damaged one is refused, --checkpoints lists and cleans, and a seed makes runs repeatable."""
import json
import signal
import subprocess
import sys
import time
from contextlib import chdir

import pytest
import torch

from conftest import (REPO, Died, design_parameters, die_on_call, free_port, metrics, stop_at_step, write_case,
                      write_conditions)
from modules.cli import main

EPOCHS = 24


def start(folder, *flags):
    """The program in its own process (its output goes to files, never to an unread pipe)."""
    return subprocess.Popen([sys.executable, str(REPO / "SimulGen-VAE.py"), *flags], cwd=folder,
                            stdout=open(folder / "stdout.txt", "w"), stderr=open(folder / "stderr.txt", "w"))


def finish(folder, *flags):
    process = start(folder, *flags)
    assert process.wait(timeout=300) == 0, (folder / "stderr.txt").read_text()


def progress_of(path):
    return torch.load(path, weights_only=True)["training"]["progress"]


def wait_for_checkpoint(folder, path, epochs_done: int, process):
    """Wait until path holds a state at least epochs_done epochs in (the run is still going)."""
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            if progress_of(folder / path)["epoch"] >= epochs_done:
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {path} of epoch {epochs_done}: {(folder / 'stderr.txt').read_text()}")


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(one, two):
    assert one.keys() == two.keys()
    assert all(torch.equal(one[name], two[name]) for name in one)


def run_record(folder):
    """run.json of the one run recorded in folder/runs/."""
    records = list((folder / "runs").glob("*/run.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


def vae_case(folder, extra="save_every 2\n"):
    write_case(folder, n=12, epochs=EPOCHS, extra=extra)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = vae_case(tmp_path_factory.mktemp("uninterrupted"))
    finish(folder)
    return folder


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(uninterrupted, tmp_path):
    folder = vae_case(tmp_path)
    process = start(folder)
    wait_for_checkpoint(folder, "checkpoints/last.pt", 4, process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert 4 <= progress_of(folder / "checkpoints" / "last.pt")["epoch"] < EPOCHS
    finish(folder, "--resume")
    assert "Resuming from checkpoints/last.pt: epoch" in (folder / "stdout.txt").read_text()
    assert_same_weights(weights(uninterrupted / "model_save" / "SimulGen-VAE"),
                        weights(folder / "model_save" / "SimulGen-VAE"))
    assert metrics(folder) == metrics(uninterrupted)  # the log continues: every epoch once, the same numbers
    assert not (folder / "archive").exists()  # resuming archives nothing
    record = run_record(folder)  # the same run record, marked finished, with the resume noted
    assert record["status"] == "finished" and len(record["resumed"]) == 1


def stopped(process, folder, stop_signal):
    """Send the signal to the running program and check how it ended: exit code 128 + the signal, one line on
    stderr naming the signal and --resume, the state saved inside the run and the run recorded as stopped."""
    process.send_signal(stop_signal)
    assert process.wait(timeout=60) == 128 + stop_signal
    error = (folder / "stderr.txt").read_text()
    said = [line for line in error.strip().splitlines()  # a posterior collapse may be warned, nothing else
            if not (line.startswith("warning: ") and "posterior collapse" in line)]
    assert "Traceback" not in error and len(said) == 1
    assert f"stopped by {stop_signal.name}" in said[0] and "--resume" in said[0]
    progress = progress_of(folder / "checkpoints" / "last.pt")
    assert progress["epoch"] < EPOCHS and not progress["finished"]
    assert run_record(folder)["status"] == "stopped" and stop_signal.name in run_record(folder)["detail"]
    assert progress["run_id"] == run_record(folder)["id"]
    return progress["epoch"]


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_then_by_sigint_resumes_twice_to_the_weights_of_an_uninterrupted_run(
        uninterrupted, tmp_path):
    """Pre-emption (SIGTERM), then Ctrl-C (SIGINT) later in the resumed run: each saves the state inside its epoch
    and exits cleanly, and the second resume ends with the uninterrupted run's weights and log."""
    folder = vae_case(tmp_path)
    process = start(folder)
    wait_for_checkpoint(folder, "checkpoints/last.pt", 2, process)
    first_stop = stopped(process, folder, signal.SIGTERM)
    process = start(folder, "--resume")
    wait_for_checkpoint(folder, "checkpoints/last.pt", first_stop + 2, process)
    assert first_stop < stopped(process, folder, signal.SIGINT) < EPOCHS
    finish(folder, "--resume")
    assert_same_weights(weights(uninterrupted / "model_save" / "SimulGen-VAE"),
                        weights(folder / "model_save" / "SimulGen-VAE"))
    assert metrics(folder) == metrics(uninterrupted)
    record = run_record(folder)
    assert record["status"] == "finished" and len(record["resumed"]) == 2


def test_a_run_stopped_inside_an_epoch_saves_that_step_and_its_partial_sums(tmp_path, monkeypatch, capsys):
    """A stop request in the middle of epoch 2 (here: raised by the second optimiser step itself) is saved as
    'epoch 1 done, 2 steps of epoch 2 done' with the loss sums of those steps; resuming finishes the epoch."""
    import modules.training.guard as guard

    write_case(tmp_path, n=20, epochs=3)  # 15 training designs, batches of 4: 4 steps per epoch
    real = stop_at_step(monkeypatch, 6)
    with chdir(tmp_path):
        assert main([]) == 128 + signal.SIGTERM
        progress = progress_of("checkpoints/last.pt")
        # the sums: loss, recon, KL main, KL of each of the 2 levels, recon of the 1 variable
        assert (progress["epoch"], progress["step"], len(progress["partial_sums"])) == (1, 2, 3 + 2 + 1)
        monkeypatch.setattr(guard.Guard, "after_step", real)
        assert main(["--resume"]) == 0
    assert "Resuming from checkpoints/last.pt: epoch 1, step 2" in capsys.readouterr().out
    assert [int(row["epoch"]) for row in metrics(tmp_path)] == [1, 2, 3]


def snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short")
    write_case(folder, n=12, epochs=2)
    with chdir(folder):
        assert main([]) == 0
    return folder


def test_resume_refuses_a_checkpoint_of_another_config_and_changes_nothing(short_run, capsys):
    condition = short_run / "input_data" / "condition.txt"
    original = condition.read_text()
    condition.write_text(original.replace("Latent_dim 4", "Latent_dim 5"))
    try:
        before = snapshot(short_run)
        with chdir(short_run):
            assert main(["--resume"]) == 2
        assert snapshot(short_run) == before
    finally:
        condition.write_text(original)
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "checkpoints/last.pt: was written by another config (Latent_dim 4 -> 5)" in error and "Fix:" in error


def test_resume_allows_another_device_or_precision_setting(short_run, capsys):
    with chdir(short_run):
        assert main(["--resume", "--amp=off", "--device=cpu"]) == 0
    assert "The VAE of this run has finished" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "missing"])
def test_resume_refuses_a_damaged_or_missing_checkpoint_without_loading_half_of_it(short_run, tmp_path, capsys,
                                                                                   damage):
    broken = tmp_path / "broken.pt"
    if damage == "truncated":
        data = (short_run / "checkpoints" / "last.pt").read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    elif damage == "not a checkpoint":
        torch.save({"format": "something else"}, broken)
    before = snapshot(short_run)
    with chdir(short_run):
        assert main([f"--resume={broken}"]) == 2
    assert snapshot(short_run) == before
    error = capsys.readouterr().err
    assert error.startswith(f"error: {broken}: ") and error.count("\n") == 1
    assert {"truncated": "cannot be loaded safely", "not a checkpoint": "not the kind of SimulGenVAE file",
            "missing": "no checkpoint to resume from"}[damage] in error


def test_a_final_model_is_not_a_checkpoint_to_resume_from(short_run, capsys):
    with chdir(short_run):
        assert main(["--resume=model_save/SimulGen-VAE"]) == 2
    assert "not the kind of SimulGenVAE file expected here" in capsys.readouterr().err


def test_checkpoints_command_lists_every_file_and_cleans_only_the_useless_ones(short_run, tmp_path, capsys):
    import shutil

    folder = tmp_path / "case"
    shutil.copytree(short_run, folder)
    last = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
    last["config"]["main_latent_dim"] = 16
    torch.save(last, folder / "checkpoints" / "other.pt")
    (folder / "checkpoints" / "last.pt.tmp").write_bytes(b"half a save")
    (folder / "checkpoints" / "broken.pt").write_bytes((folder / "checkpoints" / "best.pt").read_bytes()[:999])
    archived = folder / "archive" / "20260101-000000" / "checkpoints"
    archived.mkdir(parents=True)
    torch.save(last, archived / "last.pt")
    (archived / "broken.pt").write_bytes(b"not a zip")
    with chdir(folder):
        assert main(["--checkpoints=list"]) == 0
        listing = capsys.readouterr().out
        assert main(["--checkpoints=clean", "--dry_run"]) == 0
        dry_run = capsys.readouterr().out
        untouched = sorted(path.name for path in (folder / "checkpoints").iterdir())
        assert main(["--checkpoints=clean"]) == 0
        cleaned = capsys.readouterr().out
    assert "resumable     checkpoints/last.pt" in listing and "resumable     checkpoints/best.pt" in listing
    assert "not resumable checkpoints/other.pt" in listing and "Latent_dim_end 16 -> 8" in listing
    assert "leftover      checkpoints/last.pt.tmp" in listing and "corrupt       checkpoints/broken.pt" in listing
    assert "not resumable archive/20260101-000000/checkpoints/last.pt" in listing
    assert "nothing was changed" in dry_run and untouched == ["best.pt", "broken.pt", "last.pt", "last.pt.tmp",
                                                              "other.pt"]
    assert "Removed 4 useless checkpoint file(s)" in cleaned
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert sorted(path.name for path in archived.iterdir()) == ["last.pt"]  # an archived run's record stays


def test_dry_run_needs_checkpoints_clean(short_run, capsys):
    with chdir(short_run):
        assert main(["--dry_run"]) == 2
    assert "--dry_run only applies to --checkpoints=clean" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- conditioner
@pytest.mark.slow
def test_a_killed_conditioner_ensemble_resumes_exactly_without_training_the_vae_again(tmp_path):
    """SIGKILL in the conditioner's training of a full run; --resume trains neither the VAE again nor rewrites it,
    and ends with the uninterrupted run's ensemble, every member saved. (A conditioner stopped by a signal, and
    stopped inside an epoch, resumes exactly: test_lc_only_resume_continues_the_conditioner_checkpoint_exactly.)"""
    stop, members = signal.SIGKILL, 2
    extra = ("input_type csv\nparam_dir input_data/parameters.csv\nn_epoch 60\nsave_every 2\nlc_patience 0\n"
             f"latent_gp 0\nlatent_rbf 0\nlc_ensemble {members}\n")  # the networks themselves are kept, not a GP
    # or an RBF fitted after
    for name in ("whole", "stopped"):
        write_case(tmp_path / name, n=12, epochs=3, extra=extra)
        write_conditions(tmp_path / name, design_parameters(12))
    finish(tmp_path / "whole")
    folder = tmp_path / "stopped"
    process = start(folder)
    wait_for_checkpoint(folder, "checkpoints/conditioner_last.pt", 4, process)
    vae_file = (folder / "model_save" / "SimulGen-VAE").read_bytes()
    process.send_signal(stop)
    assert process.wait(timeout=60) == -signal.SIGKILL
    finish(folder, "--resume")
    assert "The VAE of this run has finished" in (folder / "stdout.txt").read_text()
    assert (folder / "model_save" / "SimulGen-VAE").read_bytes() == vae_file  # not retrained, not rewritten
    assert_same_weights(weights(tmp_path / "whole" / "model_save" / "latent_conditioner"),
                        weights(folder / "model_save" / "latent_conditioner"))
    assert len({key.split(".")[1] for key in weights(folder / "model_save" / "latent_conditioner")
                if key.startswith("members.")}) == members


def test_lc_only_resume_continues_the_conditioner_checkpoint_exactly(tmp_path, monkeypatch, capsys):
    import modules.training.guard as guard

    write_case(tmp_path, n=12, epochs=2, extra="input_type csv\nparam_dir input_data/parameters.csv\nn_epoch 6\n"
                                              "latent_conditioner_batch 4\nlc_patience 0\nlatent_gp 0\nlatent_rbf 0\n")
    write_conditions(tmp_path, design_parameters(12))
    real, steps = guard.Guard.after_step, []

    def after_step(self, skipped):  # a stop request in the conditioner's 8th optimiser step (epoch 3 of 6)
        steps.append(1)
        if len(steps) == 8:
            self.stop.signal_number = signal.SIGINT
        return real(self, skipped)

    with chdir(tmp_path):
        assert main(["--lc_only=0"]) == 0
        assert main(["--lc_only=1"]) == 0
        whole = weights("model_save/latent_conditioner")
        capsys.readouterr()
        monkeypatch.setattr(guard.Guard, "after_step", after_step)
        assert main(["--lc_only=1"]) == 128 + signal.SIGINT
        monkeypatch.setattr(guard.Guard, "after_step", real)
        said = capsys.readouterr().err.strip().splitlines()
        assert len(said) == 1 and "stopped by SIGINT" in said[0] and "of the conditioner" in said[0], said
        assert main(["--lc_only=1", "--resume"]) == 0
    assert "Resuming from checkpoints/conditioner_last.pt: epoch 2, step 2" in capsys.readouterr().out
    assert_same_weights(whole, weights(tmp_path / "model_save" / "latent_conditioner"))
    assert len(list((tmp_path / "archive").glob("*/model_save/latent_conditioner"))) == 2  # resuming archives none


def test_a_neural_field_fit_killed_midway_resumes_to_the_field_of_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                       capsys):
    """The neural-field candidate's fit is saved after every pass: a run killed during its fourth pass and resumed
    with --resume continues after the third (not from the first) and ends with the fit, and the conditioner kept,
    equal bit for bit to an uninterrupted run's; --checkpoints=list calls the fit's file resumable. A damaged fit file
    is said and the field fitted afresh, the run going on."""
    from modules.storage.model_format import FIT_FORMAT, FORMAT_VERSION
    from modules.training import field_fitter
    parameters = design_parameters(16, seed=3)
    for name in ("whole", "killed"):
        write_case(tmp_path / name, n=16, t=6, m=20, epochs=2,
                   extra="input_type csv\nparam_dir input_data/parameters.csv\nn_epoch 2\nlatent_gp 0\n"
                         "latent_rbf 0\ngrid_shape 4 5\nfield_conditioner_epochs 6\n")
        write_conditions(tmp_path / name, parameters)
    with chdir(tmp_path / "whole"):
        assert main([]) == 0
    with chdir(tmp_path / "killed"):
        real = die_on_call(monkeypatch, field_fitter, "sampled_pass", 4)
        with pytest.raises(Died):
            main([])
        monkeypatch.setattr(field_fitter, "sampled_pass", real)
        saved = torch.load("checkpoints/neural_field_fit.pt", weights_only=True)
        assert (saved["format"], saved["format_version"], saved["passes_made"]) == (FIT_FORMAT, FORMAT_VERSION, 3)
        capsys.readouterr()
        assert main(["--checkpoints=list"]) == 0
        assert "resumable     checkpoints/neural_field_fit.pt  (a neural field's fit after 3 of 6 passes" in \
            capsys.readouterr().out
        assert main(["--resume"]) == 0
    said = capsys.readouterr().out
    assert "Continuing the neural field's fit after pass 3 (checkpoints/neural_field_fit.pt)" in said
    for path in ("checkpoints/neural_field_fit.pt", "model_save/latent_conditioner"):
        whole, resumed = (torch.load(tmp_path / name / path, weights_only=True) for name in ("whole", "killed"))
        state = "network" if path.startswith("checkpoints") else "state_dict"
        assert_same_weights(whole[state], resumed[state])

    fit_file = tmp_path / "killed" / "checkpoints" / "neural_field_fit.pt"  # damaged: the run goes on, fitting afresh
    fit_file.write_bytes(fit_file.read_bytes()[:1000])
    with chdir(tmp_path / "killed"):
        assert main(["--resume"]) == 0
    assert "note: checkpoints/neural_field_fit.pt cannot be loaded safely" in capsys.readouterr().out
    assert_same_weights(weights(tmp_path / "whole" / "model_save" / "latent_conditioner"),
                        weights(tmp_path / "killed" / "model_save" / "latent_conditioner"))


# ------------------------------------------------------------------------------------------- reproducibility
def test_the_seed_makes_runs_repeatable_and_another_seed_changes_split_and_weights(tmp_path):
    for name, seed in (("one", 7), ("again", 7), ("other", 8)):
        write_case(tmp_path / name, n=12, epochs=2, extra=f"seed {seed}\ndeterministic 1\n")
        with chdir(tmp_path / name):
            try:
                assert main([]) == 0
                assert torch.are_deterministic_algorithms_enabled()
            finally:
                torch.use_deterministic_algorithms(False)
    split = {name: (tmp_path / name / "model_save" / "split.json").read_text() for name in ("one", "again", "other")}
    assert split["one"] == split["again"] != split["other"]
    assert_same_weights(weights(tmp_path / "one" / "model_save" / "SimulGen-VAE"),
                        weights(tmp_path / "again" / "model_save" / "SimulGen-VAE"))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(tmp_path / "one" / "model_save" / "SimulGen-VAE"),
                            weights(tmp_path / "other" / "model_save" / "SimulGen-VAE"))


@pytest.mark.slow
def test_sigterm_to_launch_ddp_stops_every_rank_at_one_step_and_resume_is_exact(tmp_path):
    """The launcher passes SIGTERM to torchrun, torchrun to its workers; both ranks agree on the step, rank 0 saves,
    and launch_ddp.py --resume ends with the weights of an uninterrupted 2-process run, bit for bit."""


    def launcher(folder, *flags):
        command = [sys.executable, str(REPO / "launch_ddp.py"), "--gpus=2", f"--master_port={free_port()}", *flags]
        return subprocess.Popen(command, cwd=folder, stdout=open(folder / "stdout.txt", "w"),
                                stderr=open(folder / "stderr.txt", "w"), start_new_session=True)

    whole, stopped = vae_case(tmp_path / "whole"), vae_case(tmp_path / "stopped")
    assert launcher(whole).wait(timeout=300) == 0, (whole / "stderr.txt").read_text()[-3000:]
    process = launcher(stopped)
    wait_for_checkpoint(stopped, "checkpoints/last.pt", 2, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0  # torchrun reports the stopped workers as failed
    assert (stopped / "stderr.txt").read_text().count("stopped by SIGTERM") == 1  # rank 0 speaks for both
    assert not progress_of(stopped / "checkpoints" / "last.pt")["finished"]
    assert launcher(stopped, "--resume").wait(timeout=300) == 0, (stopped / "stderr.txt").read_text()[-3000:]
    assert_same_weights(weights(whole / "model_save" / "SimulGen-VAE"), weights(stopped / "model_save" / "SimulGen-VAE"))
