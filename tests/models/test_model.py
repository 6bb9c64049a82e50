"""The hierarchical VAE: shapes, every level used, KL that matches what is sampled, schedules, losses, POD."""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from modules.config.keys import LOSS_NAMES
from modules.models.pod import combination_weights, pod_coefficients
from modules.models.vae import HierarchicalVAE, ModelSpec, gaussian_kl
from modules.training.losses import field_loss
from modules.training.schedules import beta_at, lr_factor


def make_model(n_steps=10, n_nodes=30, filters=(16, 8, 8), rank=6, blocks=1, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(n_steps=n_steps, n_nodes=n_nodes, projection_rank=rank, filters=filters, main_latent_dim=32,
                     level_latent_dim=8, blocks_per_level=blocks, head_hidden=32)
    return HierarchicalVAE(spec)


@pytest.mark.parametrize("n_steps, n_nodes, filters", [
    (1, 5, (8,)), (7, 33, (16, 8)), (24, 400, (16, 16, 8)), (50, 1000, (8, 8, 8, 8)), (200, 64, (8, 8, 8, 8, 8))])
def test_shapes_for_several_t_and_m(n_steps, n_nodes, filters):
    model = make_model(n_steps, n_nodes, filters, rank=min(6, n_nodes))
    fields = torch.randn(3, n_steps, n_nodes)
    out = model(fields)
    assert out["recon"].shape == (3, n_steps, n_nodes)
    assert out["kl_main"].shape == (3,)
    assert out["kl_levels"].shape == (3, len(filters))
    assert out["level_latents"].shape == (3, len(filters), 8)
    main, levels = model.encode_means(fields)
    assert main.shape == (3, 32) and levels.shape == (3, len(filters), 8)
    assert model.generate(2).shape == (2, n_steps, n_nodes)


def test_every_parameter_gets_a_gradient_including_the_deepest_level():
    model = make_model(blocks=2)
    out = model(torch.randn(4, 10, 30))
    (out["recon"].pow(2).mean() + out["kl_main"].mean() + out["kl_levels"].sum(1).mean()).backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_each_level_latent_changes_the_output():
    model = make_model().eval()
    main, levels = model.encode_means(torch.randn(2, 10, 30))
    base = model.decode(main, levels)
    for level in range(levels.shape[1]):
        nudged = levels.clone()
        nudged[:, level] += 1.0
        assert not torch.allclose(model.decode(main, nudged), base), f"level {level} latent is ignored"


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mq, lq, mp, lp = (torch.randn(100) for _ in range(4))
    expected = kl_divergence(Normal(mq, lq.exp()), Normal(mp, lp.exp()))
    assert torch.allclose(gaussian_kl(mq, lq, mp, lp), expected, atol=1e-5)


def test_level_kl_is_the_kl_of_the_distribution_it_samples_from():
    """Monte Carlo: sample z from the level as training does, estimate E_q[log q(z) - log p(z)] with the level's
    own prior and posterior, and compare with the KL it reports; also check the samples' mean and spread."""
    model = make_model(seed=3)
    level = model.decoder.levels[1]
    torch.manual_seed(0)
    state = torch.randn(1, level.width, level.length).expand(20000, -1, -1)
    features = torch.randn(1, level.width, level.length).expand(20000, -1, -1)
    with torch.no_grad():
        z, kl_dims = level.latent(state, features=features, sample=True)
        kl = kl_dims.sum(-1)
        prior_mean, prior_log_std = level.prior(state[:1])
        shift_mean, shift_log_std = level.posterior_shift(torch.cat([state[:1], features[:1]], dim=1))
    q = Normal(prior_mean + shift_mean, (prior_log_std + shift_log_std).exp())
    p = Normal(prior_mean, prior_log_std.exp())
    assert torch.allclose(z.mean(0), q.mean[0], atol=4 * q.stddev.max().item() / math.sqrt(20000))
    assert torch.allclose(z.std(0), q.stddev[0], rtol=0.05)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()
    assert torch.allclose(kl, kl[0].expand_as(kl))
    assert abs(monte_carlo.item() - kl[0].item()) < 0.05 * max(1.0, kl[0].item())


def test_main_kl_is_against_the_standard_normal():
    model = make_model()
    with torch.no_grad():
        torch.manual_seed(0)
        fields = torch.randn(3, 10, 30)
        out = model(fields)
        _, mean, log_std = model.encoder(fields)
    expected = kl_divergence(Normal(mean, log_std.exp()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(out["kl_main"], expected, atol=1e-5)


def test_decoding_the_posterior_means_gives_the_deterministic_reconstruction():
    model = make_model().eval()
    fields = torch.randn(5, 10, 30)
    main, levels = model.encode_means(fields)
    with torch.no_grad():
        assert torch.allclose(model.decode(main, levels), model(fields, sample=False)["recon"], atol=1e-6)


def test_samples_around_given_latents_are_centred_on_them_with_the_prior_spread():
    """--samples: given level latents plus noise scaled by each level's prior std (zero noise: the decode itself)."""
    model = make_model().eval()
    main, levels = model.encode_means(torch.randn(4, 10, 30))
    with torch.no_grad():
        centre = model.decode(main, levels)
        zero = model.decoder(main, level_latents=levels, sample=True, level_noise=torch.zeros_like(levels))[0]
        noise = torch.zeros_like(levels)
        noise[:, 0] = 1.0  # move only the coarsest level, by one prior standard deviation
        moved = model.decoder(main, level_latents=levels, sample=True, level_noise=noise)[0]
        prior_std = torch.exp(model.decoder.levels[-1].prior(
            model.decoder.levels[-1].refine(model.decoder.initial(main).view(-1, *model.decoder.top_shape)))[1])
        expected = model.decode(main, torch.cat([levels[:, :1] + prior_std[:, None], levels[:, 1:]], dim=1))
    assert torch.equal(zero, centre)
    assert not torch.allclose(moved, centre) and torch.allclose(moved, expected, atol=1e-6)


def test_prior_samples_differ_and_repeat_with_the_same_seed():
    model = make_model().eval()
    torch.manual_seed(5)
    first = model.generate(3)
    torch.manual_seed(5)
    again = model.generate(3)
    assert not torch.allclose(first[0], first[1])
    assert torch.equal(first, again)


def test_pod_initialised_projections_reconstruct_fields_in_their_span():
    model = make_model(rank=6)
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(30, 6)))
    mean = rng.normal(size=30)
    fields = torch.tensor(mean + rng.normal(size=(4, 10, 6)) @ basis.T, dtype=torch.float32)
    model.init_node_projections(torch.tensor(mean, dtype=torch.float32), torch.tensor(basis, dtype=torch.float32),
                                torch.linspace(2.0, 0.5, 6))
    with torch.no_grad():
        round_trip = model.decoder.node_projection(model.encoder.node_projection(fields))
    assert torch.allclose(round_trip, fields, atol=1e-4)


@pytest.mark.parametrize("divisor", [0, 2])
def test_beta_holds_then_rises_along_a_cosine_to_one(divisor):
    epochs = 100
    betas = [beta_at(e, epochs, divisor, 0.3, 0.8) for e in range(epochs)]
    start = 1e-4 * 10.0 ** -divisor
    assert betas[0] == pytest.approx(start) and betas[29] == pytest.approx(start)
    assert betas[55] == pytest.approx(start + (1 - start) * 0.5 * (1 - math.cos(math.pi * 0.5)))
    assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:]))
    assert betas[80] == 1.0 and betas[-1] == 1.0


def test_beta_schedule_fractions_are_configurable():
    assert beta_at(10, 100, 0, 0.05, 0.1) == 1.0
    assert beta_at(10, 100, 0, 0.5, 0.9) == pytest.approx(1e-4)


@pytest.mark.parametrize("epochs", [1, 2, 3, 50])
def test_learning_rate_schedule_works_for_any_epoch_count(epochs):
    # at the positions of 10 optimiser steps an epoch: the warmup (10 % of the run, not rounded to whole epochs)
    # reaches the peak even in a run of 1 to 3 epochs
    factors = [lr_factor(step / 10, epochs, 0.1, 2, 0.01) for step in range(10 * epochs)]
    assert all(0.01 - 1e-12 <= f <= 1.0 for f in factors)
    assert factors[0] < 1 and max(factors) == pytest.approx(1.0)


def test_learning_rate_warms_up_then_restarts():
    factors = [lr_factor(e, 100, 0.1, 2, 0.0) for e in range(100)]
    assert factors[:10] == sorted(factors[:10]) and factors[0] < 0.2
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(1.0)  # restart after 45 epochs
    assert factors[54] < 0.01


@pytest.mark.parametrize("loss_type, expected", [(1, 0.25 * 0.25 / 2 + 0.0), (2, 0.25 / 2), (3, None), (4, None)])
def test_loss_types(loss_type, expected):
    recon, target = torch.tensor([0.25, 0.0]), torch.tensor([0.0, 0.0])
    value = field_loss(recon, target, LOSS_NAMES[loss_type], delta=0.1).item()
    if loss_type == 3:
        expected = (0.25 - 0.05) / 2  # SmoothL1 beyond beta: |x| - beta/2
    if loss_type == 4:
        expected = 0.1 * (0.25 - 0.05) / 2  # Huber beyond delta: delta * (|x| - delta/2)
    assert value == pytest.approx(expected)


def test_pod_baseline_errors_match_an_explicit_svd():
    rng = np.random.default_rng(0)
    designs = rng.normal(size=(30, 200)) @ np.diag(np.linspace(3, 0.1, 200)) + 5
    gram = designs @ designs.T
    train, val = designs[:24], designs[24:]
    coefficients = pod_coefficients(gram, 24)[1]
    mean = train.mean(0)
    _, _, modes = np.linalg.svd(train - mean, full_matrices=False)
    for rank in (0, 3, 10):
        basis = modes[:rank].T
        recon = mean + (val - mean) @ basis @ basis.T
        from_gram = combination_weights(gram, 24, coefficients[:, :rank]) @ train  # no mode was ever formed
        assert np.allclose(from_gram, recon)


def test_pod_snapshots_span_the_whole_transient_when_rows_are_scarce(case, monkeypatch):
    """With fewer snapshot rows than designs x steps, each design contributes other steps: not all step 0."""
    from modules.config import load_config
    from modules.data.dataset import SimulationArray, find_dataset
    from modules.data.scaling import MinMaxScaler
    from modules.models.pod import _training_snapshots

    data = np.broadcast_to(np.arange(6, dtype=np.float32)[None, :, None], (12, 6, 20)).copy()
    np.save("input_data/dataset1.npy", data)
    array = SimulationArray(find_dataset(1), load_config(1))
    identity = MinMaxScaler([0.0], [1.0], 0.0, 1.0)
    rows = _training_snapshots(array, np.arange(12), identity, max_rows=12, seed=0)
    steps_seen = set(rows[:, 0].round().astype(int))
    assert len(rows) == 12 and len(steps_seen) >= 4


def test_the_posterior_mean_path_draws_no_random_numbers():
    model = make_model().eval()
    torch.manual_seed(11)
    expected = torch.rand(1)
    torch.manual_seed(11)
    with torch.no_grad():
        model(torch.zeros(2, 10, 30), sample=False)
    assert torch.equal(torch.rand(1), expected)
