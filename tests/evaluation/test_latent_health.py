"""Posterior-collapse data: per-dimension KLs from the model, free bits in the loss, active units and warnings."""
from types import SimpleNamespace

import pytest
import torch

from modules.config.keys import LOSS_NAMES
from modules.evaluation.latent_health import (ACTIVE_VARIANCE, batch_sums, collapse_warning, collapsed_groups,
                                              log_record, summarise)
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.training.losses import field_loss, loss_of_uniform_error, vae_loss

SPEC = ModelSpec(n_steps=8, n_nodes=10, projection_rank=4, filters=(8, 4), main_latent_dim=4, level_latent_dim=3,
                 blocks_per_level=1, head_hidden=16)
D, L, d = SPEC.main_latent_dim, SPEC.n_levels, SPEC.level_latent_dim


def config(free_bits):
    return SimpleNamespace(loss_type=1, huber_delta=0.1, recon_weight=1.0, fixed_recon_weight=1.0, free_bits=free_bits)


NOISE_STD = torch.ones(1)  # one variable; unused with a fixed alpha


def model_and_fields(seed=0, batch=5):
    torch.manual_seed(seed)
    return HierarchicalVAE(SPEC), torch.randn(batch, SPEC.n_steps, SPEC.n_nodes)


def old_vae_loss(outputs, target, config, beta):
    """The loss before free bits existed, kept here to pin free_bits 0 to it."""
    recon = sum(field_loss(o["recon"].float(), target, LOSS_NAMES[config.loss_type], config.huber_delta)
                for o in outputs)
    kl_main = sum(o["kl_main"].mean() for o in outputs) / len(outputs)
    kl_levels = sum(o["kl_levels"].mean(dim=0) for o in outputs) / len(outputs)
    return config.recon_weight * recon / len(outputs) + beta * (kl_main + kl_levels.sum())


def hand_made_output(main_means, level_means):
    """Outputs dict whose per-dim KLs are leaves: [B, D] and [B, L, d] with the given batch means (per dim)."""
    # zero-mean spread over a batch of 4, wide enough that some designs sit on the other side of a 0.1 floor than
    # their batch mean: the floor applies to the batch mean, not to each design
    spread = 0.2 * torch.linspace(-1, 1, 4)[:, None]
    main = (torch.tensor(main_means) + spread).requires_grad_()
    levels = (torch.tensor(level_means)[None] + spread[:, :, None]).requires_grad_()
    return {"recon": torch.zeros(4, 2, 3), "kl_main_dims": main, "kl_level_dims": levels,
            "kl_main": main.sum(-1), "kl_levels": levels.sum(-1)}


def test_per_dimension_kls_have_their_shapes_and_sum_to_the_totals():
    model, fields = model_and_fields()
    for sample in (True, False):
        out = model(fields, sample=sample)
        assert out["kl_main_dims"].shape == (5, D) and out["kl_level_dims"].shape == (5, L, d)
        assert out["kl_main_dims"].dtype == torch.float32 and out["kl_level_dims"].dtype == torch.float32
        assert torch.equal(out["kl_main"], out["kl_main_dims"].sum(-1))
        assert torch.equal(out["kl_levels"], out["kl_level_dims"].sum(-1))
        assert (out["kl_level_dims"] > 0).any() and (out["kl_main_dims"] > -1e-6).all()


def test_a_level_latent_reports_its_kl_per_dimension_and_none_from_the_prior():
    model, fields = model_and_fields()
    level = model.decoder.levels[0]
    state, features = torch.randn(3, level.width, level.length), torch.randn(3, level.width, level.length)
    z, kl_dims = level.latent(state, features=features, noise=torch.randn(3, d))
    assert z.shape == kl_dims.shape == (3, d) and (kl_dims > -1e-6).all()
    assert level.latent(state)[1] is None


@pytest.mark.parametrize("samples", [1, 3])
def test_free_bits_zero_is_the_old_loss(samples):
    model, fields = model_and_fields()
    outputs = [model(fields) for _ in range(samples)]
    total, parts = vae_loss(outputs, fields, config(0.0), 0.3, NOISE_STD)
    assert torch.allclose(total, old_vae_loss(outputs, fields, config(0.0), 0.3), rtol=1e-6)
    grads = torch.autograd.grad(total, list(model.parameters()), retain_graph=True)
    old_grads = torch.autograd.grad(old_vae_loss(outputs, fields, config(0.0), 0.3), list(model.parameters()))
    assert all(torch.allclose(new, old, rtol=1e-5, atol=1e-8) for new, old in zip(grads, old_grads))
    assert set(parts) == {"recon", "recon_vars", "kl_main", "kl_levels", "kl_main_dims", "kl_level_dims"}


def test_free_bits_stop_the_kl_gradient_below_the_floor_only():
    out = hand_made_output([0.05, 0.5, 0.2, 2.0], [[0.01, 0.3, 0.0], [1.0, 0.09, 0.15]])
    total, _ = vae_loss([out], torch.zeros(4, 2, 3), config(0.1), 2.0, NOISE_STD)
    total.backward()
    main_grad, level_grad = out["kl_main_dims"].grad, out["kl_level_dims"].grad
    below_main, below_level = torch.tensor([True, False, False, False]), torch.tensor([[1, 0, 1], [0, 1, 0]]).bool()
    assert (main_grad[:, below_main] == 0).all() and (level_grad[:, below_level] == 0).all()
    # above the floor: d(beta * mean over the batch)/dKL = beta / B for every design
    assert torch.allclose(main_grad[:, ~below_main], torch.full((4, 3), 2.0 / 4))
    assert torch.allclose(level_grad[:, ~below_level], torch.full((4, 3), 2.0 / 4))


def test_free_bits_loss_uses_the_floor_but_reports_the_true_kl():
    out = hand_made_output([0.05, 0.5, 0.2, 2.0], [[0.01, 0.3, 0.0], [1.0, 0.09, 0.15]])
    total, parts = vae_loss([out], torch.zeros(4, 2, 3), config(0.1), 1.0, NOISE_STD)
    assert total.item() == pytest.approx(0.1 + 0.5 + 0.2 + 2.0 + (0.1 + 0.3 + 0.1) + (1.0 + 0.1 + 0.15), rel=1e-6)
    assert parts["kl_main"].item() == pytest.approx(2.75, rel=1e-6)
    assert torch.allclose(parts["kl_levels"], torch.tensor([0.31, 1.24]))
    assert torch.allclose(parts["kl_main_dims"], torch.tensor([0.05, 0.5, 0.2, 2.0]))
    assert torch.allclose(parts["kl_level_dims"], torch.tensor([[0.01, 0.3, 0.0], [1.0, 0.09, 0.15]]))
    assert not any(part.requires_grad for part in parts.values())


def test_free_bits_on_the_real_model_reports_unclamped_means_over_the_samples():
    model, fields = model_and_fields()
    outputs = [model(fields) for _ in range(2)]
    total, parts = vae_loss(outputs, fields, config(5.0), 1.0, NOISE_STD)  # a floor above every dimension's KL
    recon = sum(field_loss(o["recon"], fields, "MSE", 0.1) for o in outputs) / 2
    assert total.item() == pytest.approx(recon.item() + 5.0 * (D + L * d), rel=1e-5)
    expected = (outputs[0]["kl_level_dims"].mean(0) + outputs[1]["kl_level_dims"].mean(0)) / 2
    assert torch.allclose(parts["kl_level_dims"], expected) and torch.allclose(parts["kl_levels"], expected.sum(-1))
    assert parts["kl_main"].item() == pytest.approx(parts["kl_main_dims"].sum().item(), rel=1e-5)
    total.backward()  # the KL term is all floor: only the reconstruction drives the model
    assert model.encoder.main_head.net[-1].weight.grad.abs().sum() > 0


def constructed_sums(means, kls):
    """Summed batch_sums for designs whose posterior means are the rows of means [N, D + L*d], per-dim KL kls."""
    means = torch.as_tensor(means, dtype=torch.float32)
    return torch.cat([torch.as_tensor(kls, dtype=torch.float32) * len(means), means.sum(0), means.pow(2).sum(0)])


def test_summarise_counts_active_units_and_finds_the_collapsed_level():
    units = D + L * d
    means = torch.full((6, units), 0.7)  # constant over designs: inactive
    means[:, 1] = torch.linspace(-1, 1, 6)  # main dim 1 varies
    means[:, D + d + 2] = torch.linspace(-0.5, 0.5, 6)  # level1 dim 2 varies
    means[:, D] = 0.7 + 0.05 * torch.linspace(-1, 1, 6)  # level0 dim 0 varies, but below ACTIVE_VARIANCE
    kls = torch.full((units,), 0.2)
    summary = summarise(constructed_sums(means, kls), 6, D, L, d)
    assert list(summary) == ["main", "level0", "level1"]
    assert [summary[name]["active"] for name in summary] == [1, 0, 1]
    assert summary["level0"]["units"] == d and summary["main"]["units"] == D
    assert summary["main"]["kl_dims"] == pytest.approx([0.2] * D) and summary["level1"]["kl"] == pytest.approx(0.6)
    assert collapsed_groups(summary) == ["level0"]
    warning = collapse_warning(["level0"], summary)
    assert "level0 (0 of 3 units active)" in warning and "free_bits 0.1" in warning and "\n" not in warning
    assert collapse_warning([], summary) == ""


def test_a_level_whose_mean_varies_with_no_kl_is_collapsed():
    """Its prior moves with the levels above: the mean varies although q equals p (KL 0), so nothing is learned."""
    means = torch.zeros(4, D + L * d)
    means[:, :] = torch.linspace(-1, 1, 4)[:, None]  # every dimension varies well above ACTIVE_VARIANCE
    kls = torch.cat([torch.full((D + d,), 0.5), torch.zeros(d)])  # level1 sits on its prior
    summary = summarise(constructed_sums(means, kls), 4, D, L, d)
    assert [summary[name]["active"] for name in summary] == [D, d, 0]
    assert collapsed_groups(summary) == ["level1"]


def test_batch_sums_of_a_model_pass_give_its_mean_kl_and_mean_latents():
    model, fields = model_and_fields(batch=6)
    with torch.no_grad():
        out = model(fields, sample=False)
        sums = batch_sums(model(fields[:4], sample=False)) + batch_sums(model(fields[4:], sample=False))
    assert sums.shape == (3 * (D + L * d),) and sums.dtype == torch.float32
    summary = summarise(sums, 6, D, L, d)
    assert summary["main"]["kl"] == pytest.approx(out["kl_main"].mean().item(), rel=1e-4)
    assert summary["level1"]["kl_dims"] == pytest.approx(out["kl_level_dims"][:, 1].mean(0).tolist(), rel=1e-4)
    variance = out["main_mean"].var(0, unbiased=False)
    assert summary["main"]["active"] == int((variance > ACTIVE_VARIANCE).sum())


def test_log_record_keys_are_flat_ordered_and_zero_padded():
    summary = summarise(constructed_sums(torch.zeros(2, D + L * d), torch.ones(D + L * d)), 2, D, L, d)
    record = log_record(summary)
    assert list(record)[:3] == ["active_units/main", "active_units/level0", "active_units/level1"]
    expected = [f"kl_dim/{name}/{i:02d}" for name, units in (("main", D), ("level0", d), ("level1", d))
                for i in range(units)]
    assert list(record)[3:] == expected
    assert all(isinstance(value, float) for value in record.values()) and record["kl_dim/level0/02"] == 1.0


@pytest.mark.parametrize("name", LOSS_NAMES.values())
@pytest.mark.parametrize("error", [0.003, 0.3])
def test_the_loss_of_a_uniform_error_is_the_field_loss_of_it(name, error):
    """The VAE's divergence floor (the loss of an error of 1 % of the range) is computed without tensors."""
    expected = field_loss(torch.full((2, 3), error), torch.zeros(2, 3), name, 0.1).item()
    assert loss_of_uniform_error(error, name, 0.1) == pytest.approx(expected, rel=1e-6)
