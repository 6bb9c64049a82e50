"""Instability and collapse: a non-finite step is skipped (by every DDP rank together), a run of them or a diverging
loss restores the last checkpoint with a lower learning rate, restores are capped by a clear stop, early stopping
ends a run that no longer improves, and posterior collapse is measured, warned about and prevented by free bits."""
import math
import subprocess
import sys
from contextlib import chdir

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, free_port, metrics, tensorboard_dir, write_case
from modules.cli import main
from modules.machine.device import Runtime
from modules.training.optimizer_step import Updater, make_optimizer
from modules.training.schedules import lr_factor


def test_a_step_with_a_nan_gradient_leaves_weights_and_optimiser_state_untouched():
    layer = torch.nn.Linear(4, 1)
    updater = Updater(layer, make_optimizer(layer.parameters(), 0.1, 0.01), Runtime(torch.device("cpu")), 1.0)
    updater.backward(layer(torch.ones(2, 4)).sum())
    assert updater.step() == 0.0
    weights = {name: value.detach().clone() for name, value in layer.state_dict().items()}
    state = {name: value.clone() for name, value in updater.optimizer.state[layer.weight].items()}
    updater.backward(layer(torch.tensor([[1.0, float("nan"), 1.0, 1.0]])).sum())
    assert updater.step() == 1.0
    assert all(torch.equal(value, layer.state_dict()[name]) for name, value in weights.items())
    assert all(torch.equal(value, updater.optimizer.state[layer.weight][name]) for name, value in state.items())
    assert layer.weight.grad is None
    updater.backward(layer(torch.ones(2, 4)).sum())
    assert updater.step() == 0.0 and not torch.equal(layer.weight, weights["weight"])


def nan_training_losses(monkeypatch, calls):
    """Make the VAE's training loss NaN on the given training-loss calls (1-based; validation is left alone)."""
    import modules.training.vae_training as train_vae

    real, count = train_vae.vae_loss, [0]

    def loss(outputs, targets, config, beta, noise_std):
        total, parts = real(outputs, targets, config, beta, noise_std)
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] in calls:
                total = total * float("nan")
        return total, parts

    monkeypatch.setattr(train_vae, "vae_loss", loss)


def case_of(folder, epochs=6, extra=""):
    write_case(folder, n=12, epochs=epochs, extra=extra)  # 9 training designs in batches of 4: 3 steps an epoch
    return folder


def test_non_finite_steps_are_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    nan_training_losses(monkeypatch, {2, 3, 7})
    with chdir(case_of(tmp_path)):
        assert main([]) == 0
    rows = metrics(tmp_path)
    assert [int(row["skipped_steps"]) for row in rows] == [2, 0, 1, 0, 0, 0]
    model = torch.load(tmp_path / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in model.values())


def test_too_many_skips_in_a_row_restore_the_last_checkpoint_with_a_lower_learning_rate(tmp_path, monkeypatch,
                                                                                         capsys):
    nan_training_losses(monkeypatch, {10, 11, 12})  # all of epoch 4
    with chdir(case_of(tmp_path, extra="save_every 2\nmax_skipped_steps 3\n")):
        assert main([]) == 0
    out = capsys.readouterr().out
    assert ("VAE epoch 4: 3 optimiser steps in a row had a non-finite loss or gradient. Restored checkpoints/last.pt "
            "(saved after epoch 2) and lowered the learning rate to 0.5 x its schedule (restore 1 of "
            "max_recoveries 3)") in out
    rows = metrics(tmp_path)
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5, 6]  # epochs 3 and 4 redone, each logged once
    config_lr, scale = 0.003, [1, 1, 0.5, 0.5, 0.5, 0.5]
    expected = [config_lr * s * lr_factor(epoch, 6, 0.05, 1, 1e-6 / config_lr) for epoch, s in enumerate(scale)]
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected, rel=1e-12)
    events = EventAccumulator(str(tensorboard_dir(tmp_path)))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_diverging_validation_error_restores_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import modules.training.vae_training as train_vae

    real, calls = train_vae.VAETraining.validate, [0]

    def validate(self):
        stats = real(self)
        calls[0] += 1
        return {**stats, "recon": 1.0} if calls[0] == 4 else stats  # the starting state, epochs 1, 2, then 3

    monkeypatch.setattr(train_vae.VAETraining, "validate", validate)
    with chdir(case_of(tmp_path, epochs=4, extra="save_every 1\n")):
        assert main([]) == 0
    out = capsys.readouterr().out
    assert "VAE epoch 3: the validation error" in out and "is over divergence_factor = 10 times its best" in out
    assert "Restored checkpoints/last.pt (saved after epoch 2)" in out
    assert [int(row["epoch"]) for row in metrics(tmp_path)] == [1, 2, 3, 4]


def test_when_restores_do_not_help_the_run_stops_with_one_clear_line(tmp_path, monkeypatch, capsys):
    nan_training_losses(monkeypatch, set(range(1, 1000)))
    with chdir(case_of(tmp_path, extra="max_skipped_steps 2\nmax_recoveries 2\n")):
        assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("Restored checkpoints/last.pt (saved after epoch 0)") == 2
    assert captured.err.count("\n") == 1
    assert ("error: input_data/condition.txt: VAE training is unstable in epoch 1: 2 optimiser steps in a row had a "
            "non-finite loss or gradient, after 2 restore(s) with a lower learning rate") in captured.err
    assert (tmp_path / "checkpoints" / "last.pt").exists()  # the last good state is kept


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(tmp_path, monkeypatch, capsys):
    import modules.training.vae_training as train_vae

    real, calls = train_vae.VAETraining.validate, [0]

    def validate(self):
        stats = real(self)
        calls[0] += 1
        # the best reconstruction: epoch 1, not the start; the loss falls all along and does not decide
        return {**stats, "recon_relative_l2": 1000.0 if calls[0] == 1 else 100.0 + calls[0], "loss": -calls[0]}

    monkeypatch.setattr(train_vae.VAETraining, "validate", validate)
    with chdir(case_of(tmp_path, epochs=10, extra="patience 3\n")):
        assert main([]) == 0
    assert ("Early stop of the VAE at epoch 4: no better validation recon_relative_l2 for 3 epochs (best 102 at "
            "epoch 1)") in capsys.readouterr().out
    assert len(metrics(tmp_path)) == 4
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["training"]["progress"]
    assert last["finished"] and last["epoch"] == 4 and last["best_epoch"] == 1


DDP_SCRIPT = """
import sys
import torch
sys.path.insert(0, {repo!r})
import modules.training.vae_training as train_vae
from modules.cli import main

real, count = train_vae.vae_loss, [0]

def loss(outputs, targets, config, beta, noise_std):  # NaN on rank 1 only, in its 2nd and 3rd training steps
    total, parts = real(outputs, targets, config, beta, noise_std)
    if torch.is_grad_enabled() and torch.distributed.get_rank() == 1:
        count[0] += 1
        if count[0] in (2, 3):
            total = total * float("nan")
    return total, parts

train_vae.vae_loss = loss
sys.exit(main(["--use_ddp"]))
"""


@pytest.mark.slow
def test_under_ddp_a_nan_on_one_rank_makes_every_rank_skip_that_step(tmp_path):
    case_of(tmp_path, epochs=3)
    (tmp_path / "nan_on_rank_1.py").write_text(DDP_SCRIPT.format(repo=str(REPO)))
    with open(tmp_path / "out.txt", "w") as out:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={free_port()}", "nan_on_rank_1.py"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, (tmp_path / "out.txt").read_text()[-3000:]
    # rank 0 writes the log: its own losses were finite, yet it skipped the steps where rank 1's were not
    assert [int(row["skipped_steps"]) for row in metrics(tmp_path)] == [2, 0, 0]
    model = torch.load(tmp_path / "model_save" / "SimulGen-VAE", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in model.values())


# ------------------------------------------------------------------------------------------- posterior collapse
def collapse_run(folder, free_bits, pod_path=0):
    """A KL-dominated run (alpha 1e-2): without free bits and without the POD path (whose posterior means start at
    the POD coefficients) every latent collapses onto its prior. On the POD path the reconstruction starts near
    exact and, as the KL weight rises, is traded for KL by design: a rise the divergence guard must not stop here."""
    write_case(folder, n=12, epochs=20,
               extra=f"free_bits {free_bits}\npod_path {pod_path}\ndivergence_factor 1000\n")
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("alpha 1e4", "alpha 1e-2"))
    with chdir(folder):
        assert main([]) == 0
    last = metrics(folder)[-1]
    return {group: int(float(last[f"active_units/{group}"])) for group in ("main", "level0", "level1")}


@pytest.mark.slow
def test_collapse_is_logged_per_level_and_warned_about_and_free_bits_prevent_it(tmp_path, capsys):
    collapsed = collapse_run(tmp_path / "plain", 0)
    out = capsys.readouterr().err  # a warning
    assert collapsed == {"main": 0, "level0": 0, "level1": 0}
    assert out.count("posterior collapse:") >= 1 and "(0 of 4 units active)" in out and "free_bits" in out
    row = metrics(tmp_path / "plain")[-1]
    assert {"kl_dim/main/07", "kl_dim/level0/03", "kl_dim/level1/00"} <= set(row)
    assert all(float(row[f"kl_dim/level0/0{dim}"]) < 0.005 for dim in range(4))
    events = EventAccumulator(str(tensorboard_dir(tmp_path / "plain")))
    events.Reload()
    assert {"active_units/level0", "kl_dim/level1/02"} <= set(events.Tags()["scalars"])
    kept = collapse_run(tmp_path / "free_bits", 0.5)
    assert sum(kept.values()) >= 3 and sum(kept.values()) > sum(collapsed.values())
    assert not math.isnan(float(metrics(tmp_path / "free_bits")[-1]["val/loss"]))


def test_on_the_pod_path_the_main_latent_does_not_collapse_where_the_network_alone_does(tmp_path, capsys):
    assert collapse_run(tmp_path, 0, pod_path=1)["main"] >= 1  # the same run: see the test above for pod_path 0
