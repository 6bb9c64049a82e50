"""The VAE's POD path and its likelihood (#17): a fresh model reconstructs every design exactly as POD with as many
modes as latent numbers, training keeps its starting state unless an epoch does better on the validation designs,
and with alpha auto the noise scale training sets is the validation error, logged, saved and reported."""
import json
from contextlib import chdir
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import metrics, smooth_fields, write_case
from modules.cli import main
from modules.config import load_config
from modules.data.case import prepare_case
from modules.machine.device import Runtime
from modules.storage.model_files import load_model
from modules.training import vae_training
from modules.training.loop import Step
from modules.training.vae_training import build_model


def noisy_case(folder, extra="", epochs=1, n=40, alpha="1e4"):
    """40 designs of the smooth family plus noise (no small POD basis is exact), node basis as wide as the mesh."""
    noise = np.random.default_rng(3).normal(scale=0.2, size=(n, 6, 20))
    write_case(folder, n=n, t=6, m=20, epochs=epochs, extra=extra,
               data=(smooth_fields(n, 6, 20) + noise).astype(np.float32))
    condition = folder / "input_data" / "condition.txt"
    condition.write_text(condition.read_text().replace("projection_rank 8", "projection_rank 20")
                         .replace("alpha 1e4", f"alpha {alpha}"))
    with chdir(folder):
        config = load_config(1)
        return config, prepare_case(config, Runtime(torch.device("cpu")))


def scaled(case, designs):
    return torch.from_numpy(case.scaler.transform(case.array.read(designs)))


def pod_projection(train, fields, rank):
    """Fields projected on the rank strongest POD modes of the training fields (explicit SVD, float64)."""
    flat = train.reshape(len(train), -1).double()
    mean = flat.mean(dim=0)
    modes = torch.linalg.svd(flat - mean, full_matrices=False)[2][:rank]
    centred = fields.reshape(len(fields), -1).double() - mean
    return (mean + centred @ modes.T @ modes).reshape(fields.shape), centred @ modes.T


def test_a_fresh_model_is_pod_with_as_many_modes_as_latent_numbers(tmp_path):
    config, case = noisy_case(tmp_path)
    model = build_model(config, case, Runtime(torch.device("cpu"))).eval()
    train, val = scaled(case, case.train_indices), scaled(case, case.val_indices)
    assert config.latent_size == 16 < len(train) - 1  # fewer modes than the training designs span
    for fields in (train, val):
        expected, coefficients = pod_projection(train, fields, config.latent_size)
        with torch.no_grad():
            out = model(fields, sample=False)
        assert torch.allclose(out["recon"].double(), expected, atol=2e-5)
        latents = torch.cat([out["main_mean"], out["level_latents"].flatten(1)], dim=1).double()
        # whitened coefficients: the same up to each mode's sign and its spread over the training designs
        spread = coefficients.abs().mean(dim=0) / latents.abs().mean(dim=0)
        assert torch.allclose(latents.abs() * spread, coefficients.abs(), atol=1e-4)
        assert torch.allclose(model.decode(out["main_mean"], out["level_latents"]).double(), expected, atol=2e-5)


def test_decoding_skips_the_network_only_while_it_adds_exactly_zero(tmp_path, monkeypatch):
    config, case = noisy_case(tmp_path)
    model = build_model(config, case, Runtime(torch.device("cpu"))).eval()
    fields = scaled(case, case.val_indices)
    with torch.no_grad():
        main, levels = model.encode_means(fields)
        assert model.residual_is_zero()
        skipped = model.decode(main, levels)
        monkeypatch.setattr(type(model), "residual_is_zero", lambda self: False)
        assert torch.equal(skipped, model.decode(main, levels))  # the network's zeros change no bit
        monkeypatch.undo()
        model.decoder.head.bias[0] = 1e-3  # as after an epoch of training: the network is decoded again
        assert not model.residual_is_zero()
        assert not torch.equal(skipped, model.decode(main, levels))


def test_without_the_pod_path_a_fresh_model_is_far_from_pod(tmp_path):
    config, case = noisy_case(tmp_path, extra="pod_path 0\n")
    model = build_model(config, case, Runtime(torch.device("cpu"))).eval()
    val = scaled(case, case.val_indices)
    expected, _ = pod_projection(scaled(case, case.train_indices), val, config.latent_size)
    with torch.no_grad():
        recon = model(val, sample=False)["recon"].double()
    assert model.pod is None and (recon - expected).abs().max() > 0.05


def test_the_starting_state_is_kept_when_no_epoch_does_better(tmp_path, monkeypatch, capsys):
    """Every validation after the first made worse on purpose: the kept VAE is the frozen POD path alone (its
    residual's last layer still zero), and the run says so."""
    noisy_case(tmp_path, epochs=2)
    real, calls = vae_training.VAETraining.validate, []

    def worse_after_the_start(self):
        stats = real(self)
        calls.append(stats["loss"])
        return {**stats, "loss": stats["loss"] + (1e9 if len(calls) > 1 else 0.0)}

    monkeypatch.setattr(vae_training.VAETraining, "validate", worse_after_the_start)
    with chdir(tmp_path):
        assert main([]) == 0
    assert len(calls) == 3  # the starting state, then each epoch
    assert "the starting state (no epoch of training did better on the validation designs: the frozen POD path " \
           "alone); that VAE is kept" in capsys.readouterr().out
    model, _, _ = load_model(tmp_path / "model_save" / "SimulGen-VAE")
    assert not model.decoder.head.weight.any() and not model.decoder.head.bias.any()


def test_alpha_auto_sets_the_noise_to_the_validation_error_and_reports_it(tmp_path):
    noisy_case(tmp_path, epochs=3, alpha="auto")
    with chdir(tmp_path):
        assert main([]) == 0
    rows = metrics(tmp_path)
    for row in rows:  # set after each epoch's validation: that epoch's own validation error
        assert float(row["noise_std0"]) == pytest.approx(float(row["val/recon"]) ** 0.5, rel=1e-5)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["state_dict"]["noise_std"]
    assert float(last[0]) == pytest.approx(float(rows[-1]["noise_std0"]), rel=1e-5)  # saved with the weights
    model, config, scaler = load_model(tmp_path / "model_save" / "SimulGen-VAE")
    likelihood = json.loads((tmp_path / "output" / "evaluation.json").read_text())["likelihood"]
    assert likelihood["alpha"] == "auto" and likelihood["model"] == "Gaussian"
    span = float(scaler.data_max[0] - scaler.data_min[0])
    assert likelihood["noise_std_physical"][0] == pytest.approx(float(model.noise_std[0]) * span / 1.4, rel=1e-5)
    assert "alpha auto: a Gaussian likelihood" in (tmp_path / "output" / "evaluation.md").read_text()


def test_a_fixed_alpha_is_reported_as_such(tmp_path):
    noisy_case(tmp_path)
    with chdir(tmp_path):
        assert main([]) == 0
    likelihood = json.loads((tmp_path / "output" / "evaluation.json").read_text())["likelihood"]
    assert likelihood == {"alpha": 1e4, "model": "fixed weight on the mean MSE"}


@pytest.mark.parametrize("alpha", ["auto", "1e4"])
def test_with_alpha_auto_the_step_is_taken_on_nats_per_value(tmp_path, alpha):
    """The logged loss is in nats per design; the optimiser steps on it divided by T * M (float16's range)."""
    config, case = noisy_case(tmp_path, alpha=alpha)
    runtime = Runtime(torch.device("cpu"))
    job = vae_training.VAETraining(build_model(config, case, runtime), case, config, runtime)
    batches = job.training_batches(0, [(np.arange(4), 1.0)])
    step_loss, parts = job.batch_loss(job.model, next(batches), Step(0, 1, 0.0, torch.Generator()))
    values = config.n_steps_used * config.n_nodes_used
    assert step_loss.detach().item() == pytest.approx(float(parts[0]) / (values if alpha == "auto" else 1), rel=1e-6)


class InMemory:
    """A dataset as models.pod reads one: sample_shape and read(indices)."""

    def __init__(self, fields):
        self.fields, self.sample_shape = fields, fields.shape[1:]

    def read(self, indices, steps=slice(None)):
        return self.fields[np.asarray(indices)][:, steps]


class Identity:
    @staticmethod
    def transform(values):
        return values


@pytest.mark.parametrize("nodes", [40, 400])  # more snapshot rows than nodes (covariance), fewer (Gram of the rows)
def test_the_node_basis_of_a_near_exact_family_projects_unseen_designs_to_float32_rounding(nodes):
    """Snapshots spanned by three node vectors (the bench's beam: a cantilever under three loads): the node basis,
    summed in float64 from float32 snapshots, projects unseen designs to within a few float32 roundings of their
    norm (summed in float32 it was off by 2e-6 to 4e-6), whichever side of the snapshot matrix it is computed from."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from cases import beam_fields, beam_parameters

    from modules.models.pod import pod_node_basis
    fields = beam_fields(beam_parameters(60, seed=2), 8, nodes)
    fields = (fields / np.abs(fields).max() * 1.4 - 0.7).astype(np.float32)  # scaled as the VAE sees them
    mean, modes, scales = pod_node_basis(InMemory(fields), np.arange(50), Identity, 16, seed=0)
    assert torch.allclose(modes.T @ modes, torch.eye(16), atol=1e-6)
    unseen = torch.from_numpy(fields[50:]).double()
    projected = (unseen - mean.double()) @ modes.double() @ modes.double().T + mean.double()
    relative = ((projected - unseen).flatten(1).norm(dim=1) / unseen.flatten(1).norm(dim=1)).max()
    assert relative < 3e-7, relative
