"""Latent conditioners: shapes for every kind, no dead parameters, dropout and stochastic depth, specs that survive
saving, the guards, and an MLP that actually learns."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import sklearn_gpr
from modules.models.conditioners import ConditionerSpec, build_conditioner

SMALL_VIT = dict(vit_patch_size=8, vit_dim=32, vit_depth=2, vit_heads=4)


def make(kind, input_shape, output_dim=12, filters=(8, 16), seed=0, **options):
    torch.manual_seed(seed)
    if kind == "vit":
        options = {**SMALL_VIT, **options}
    spec = ConditionerSpec(kind=kind, input_shape=input_shape, output_dim=output_dim, filters=filters, **options)
    return build_conditioner(spec)


def dead_parameters(model, inputs):
    """Names of parameters whose gradient is missing or all zero after one backward of a random loss."""
    model.zero_grad()
    outputs = model(inputs)
    (outputs * torch.randn_like(outputs)).sum().backward()
    return [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("n_params, filters", [(1, (8,)), (5, (16, 32)), (7, (32, 64, 128, 256))])
def test_mlp_output_shape(n_params, filters):
    model = make("mlp", (n_params,), output_dim=10, filters=filters)
    assert model(torch.randn(3, n_params)).shape == (3, 10)


@pytest.mark.parametrize("channels, size, filters", [
    (1, 16, (8,)), (3, 32, (8, 16)), (1, 64, (8, 16, 32, 32)), (3, 16, (8, 8, 16, 16, 32, 32))])
@pytest.mark.parametrize("spatial_attention", [False, True])
def test_cnn_output_shape_for_sizes_channels_and_depths(channels, size, filters, spatial_attention):
    model = make("cnn", (channels, size, size), filters=filters, spatial_attention=spatial_attention)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 12)


@pytest.mark.parametrize("channels, size, patch", [(1, 16, 8), (3, 32, 8), (1, 64, 16), (3, 64, 16)])
def test_vit_output_shape_for_sizes_and_channels(channels, size, patch):
    model = make("vit", (channels, size, size), vit_patch_size=patch)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 12)


def test_cnn_works_at_the_largest_image_size_with_six_stages():
    model = make("cnn", (3, 256, 256), filters=(4, 4, 8, 8, 16, 16), spatial_attention=True)
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 12)


def test_mlp_every_parameter_gets_a_gradient():
    assert dead_parameters(make("mlp", (5,), filters=(16, 32, 32)), torch.randn(4, 5)) == []


@pytest.mark.parametrize("spatial_attention", [False, True])
def test_cnn_every_parameter_gets_a_gradient(spatial_attention):
    # size 32 with 4 stages ends at 4x4: large enough that every tap of every 3x3 and 7x7 kernel touches the image
    model = make("cnn", (3, 32, 32), filters=(16, 16, 32, 32), spatial_attention=spatial_attention)
    assert dead_parameters(model, torch.randn(4, 3, 32, 32)) == []


def test_vit_every_parameter_gets_a_gradient():
    model = make("vit", (1, 32, 32), vit_drop_path=0.0)
    assert dead_parameters(model, torch.randn(4, 1, 32, 32)) == []


def test_spatial_attention_adds_parameters_and_changes_the_output():
    images = torch.randn(2, 1, 32, 32)
    plain = make("cnn", (1, 32, 32), spatial_attention=False).eval()
    attending = make("cnn", (1, 32, 32), spatial_attention=True).eval()
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert count(attending) > count(plain)
    # same weights everywhere else, so any change in the output is the attention's doing
    assert attending.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []
    assert not torch.allclose(plain(images), attending(images))


def test_mlp_dropout_grows_with_depth_up_to_the_configured_rate():
    model = make("mlp", (4,), filters=(16, 16, 32, 32), dropout=0.4)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(rates) == 4
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(0.4)


@pytest.mark.parametrize("kind, input_shape", [("mlp", (5,)), ("cnn", (1, 16, 16)), ("vit", (3, 16, 16))])
def test_eval_is_deterministic_and_train_dropout_is_not(kind, input_shape):
    model = make(kind, input_shape, dropout=0.5, vit_drop_path=0.0)  # only dropout may make train mode random
    inputs = torch.randn(4, *input_shape)
    model.eval()
    assert torch.equal(model(inputs), model(inputs))
    model.train()
    assert not torch.allclose(model(inputs), model(inputs))


def test_vit_stochastic_depth_skips_blocks_per_sample_in_training_only():
    model = make("vit", (1, 16, 16), dropout=0.0, vit_drop_path=0.9, vit_depth=4)
    same_image = torch.randn(1, 1, 16, 16).expand(8, -1, -1, -1)  # identical samples: any difference is drop-path
    model.train()
    first = model(same_image)
    assert not torch.allclose(first, model(same_image))
    assert not torch.allclose(first[0:1].expand_as(first), first), "the whole batch shared one drop decision"
    model.eval()
    out = model(same_image)
    assert torch.equal(out, model(same_image))
    assert torch.allclose(out[0:1].expand_as(out), out)


def test_untrained_conditioner_predicts_near_zero():
    for model, inputs in [(make("mlp", (5,)), torch.randn(4, 5)),
                          (make("cnn", (1, 16, 16)), torch.randn(4, 1, 16, 16)),
                          (make("vit", (1, 16, 16)), torch.randn(4, 1, 16, 16))]:
        assert model.eval()(inputs).abs().max() < 0.1


def test_spec_round_trips_through_dict_and_a_weights_only_checkpoint(tmp_path):
    spec = ConditionerSpec(kind="cnn", input_shape=(3, 64, 64), output_dim=56, filters=(32, 64, 128),
                           dropout=0.2, spatial_attention=True, vit_drop_path=0.3)
    values = spec.to_dict()
    assert values == json.loads(json.dumps(values)), "to_dict must hold plain types only (lists, not tuples)"
    assert ConditionerSpec.from_dict(values) == spec
    torch.save({"spec": spec.to_dict()}, tmp_path / "conditioner.pt")
    loaded = torch.load(tmp_path / "conditioner.pt", weights_only=True)
    assert ConditionerSpec.from_dict(loaded["spec"]) == spec


@pytest.mark.parametrize("options, message", [
    (dict(input_shape=(1, 30, 30), vit_patch_size=8), "vit_patch_size"),
    (dict(input_shape=(1, 32, 32), vit_dim=30, vit_heads=4), "vit_heads"),
    (dict(kind="transformer"), "unknown conditioner kind")])
def test_guards_raise_value_error(options, message):
    values = dict(kind="vit", input_shape=(1, 32, 32), output_dim=4, filters=(8,), vit_patch_size=8, vit_dim=32,
                  vit_depth=1, vit_heads=4)
    with pytest.raises(ValueError, match=message):
        build_conditioner(ConditionerSpec(**{**values, **options}))


def test_mlp_learns_a_smooth_function():
    torch.manual_seed(0)
    inputs = torch.rand(64, 3) * 2 - 1
    targets = torch.stack([torch.sin(2 * inputs[:, 0]), inputs[:, 1] * inputs[:, 2],
                           torch.cos(inputs.sum(1)) - 0.5, inputs[:, 0] ** 2 - inputs[:, 2]], dim=1)
    targets = (targets - targets.mean(0)) / targets.std(0)  # standardised, like the real latent targets
    model = make("mlp", (3,), output_dim=4, filters=(32, 32), dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = (model(inputs) - targets).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10  # speed is the benchmark's business (bench/), never a timed unit test


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("case", ["smooth", "noisy", "one parameter", "constant", "scaled", "two optima"])
def test_fit_gpr_finds_the_hyperparameters_and_predictions_of_scikit_learns_gaussian_process(case):
    """fit_gpr is scikit-learn's GaussianProcessRegressor fit, written out for speed: on smooth, noisy, one-parameter,
    constant and large-valued targets, and on 12 noisy designs whose likelihood has two optima that the two
    seeds' second starts reach, its hyperparameters are as likely by scikit-learn's own log marginal likelihood
    (to 1e-5 nats and 1e-7 of it: the optimiser's tolerance where the likelihood is flat) and as near (1e-3 on
    the log scale), and it predicts the same posterior mean (to 1e-6 of the targets' spread)."""
    from modules.models.gaussian_process import fit_gpr
    if case == "two optima":
        rng = np.random.default_rng(0)
        inputs = rng.uniform(-1.7, 1.7, (12, 2))
        target = np.sin(3 * inputs[:, 0]) + 0.5 * rng.normal(size=12)
    else:
        rng = np.random.default_rng(3)
        inputs = rng.uniform(-1.7, 1.7, (60, 1 if case == "one parameter" else 4))
        target = np.sin(inputs @ rng.normal(size=inputs.shape[1])) + inputs[:, 0] ** 2
        target = {"noisy": target + 0.3 * rng.normal(size=60), "constant": np.full(60, 2.5),
                  "scaled": 1e4 * target + 3e5}.get(case, target)
    new = rng.uniform(-2, 2, (9, inputs.shape[1]))
    if case == "two optima":  # the second start decides: the case checks that it is drawn as scikit-learn draws it
        assert np.abs(fit_gpr(inputs, target, 0).predict(new) - fit_gpr(inputs, target, 1).predict(new)).max() > 0.1
    for seed in (0, 1):
        ours, reference = fit_gpr(inputs, target, seed), sklearn_gpr(inputs, target, seed)
        theta = np.log(np.concatenate([[ours.amplitude], ours.length_scales, [ours.noise_level]]))
        best = reference.log_marginal_likelihood_value_
        assert reference.log_marginal_likelihood(theta) > best - 1e-5 - 1e-7 * abs(best)
        assert np.allclose(theta, reference.kernel_.theta, atol=1e-3)
        spread = max(np.ptp(target), 1.0)
        assert np.allclose(ours.predict(new), reference.predict(new), rtol=0, atol=1e-6 * spread)


def test_the_latent_gp_conditioner_is_the_posterior_mean_of_one_fitted_gp_per_latent_number():
    """Its tensors reproduce fit_gpr's predictions (scikit-learn's, by the test above), on new inputs, in a module
    that is saved as a state dict."""
    from modules.models.gaussian_process import GPRConditioner, fit_gpr
    rng = np.random.default_rng(0)
    inputs, new = rng.uniform(-1, 1, (40, 3)), rng.uniform(-1, 1, (7, 3))
    targets = np.stack([np.sin(2 * inputs[:, 0]) + inputs[:, 1], inputs[:, 2] ** 2 - inputs[:, 0]], axis=1)
    spec = ConditionerSpec("gpr", (3,), 2, (8,), gp_points=40)
    fitted = GPRConditioner(spec).fit(inputs, targets, seed=0)
    rebuilt = build_conditioner(spec)
    rebuilt.load_state_dict(fitted.state_dict())
    expected = np.stack([fit_gpr(inputs, targets[:, k], 0).predict(new) for k in range(2)], axis=1)
    assert np.allclose(rebuilt(torch.as_tensor(new, dtype=torch.float32)).numpy(), expected, atol=1e-4)


def test_a_gp_covariance_positive_definite_only_up_to_rounding_gets_the_smallest_jitter_that_factorises_it():
    """Smooth latents fitted with almost no noise (403 designs of a smooth case did it) give a training covariance
    that a plain Cholesky refuses; the factor then belongs to the covariance plus a small jitter, and a covariance
    that factorises as it is gets none."""
    from modules.models.gaussian_process import GPRConditioner
    spec = ConditionerSpec("gpr", (2,), 2, (8,), gp_points=6)
    gp = GPRConditioner(spec)
    gp.train_inputs.copy_(torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 0.5]] * 3, dtype=torch.float64))  # repeated designs
    gp.length_scales.fill_(1.0)
    gp.noise_levels.copy_(torch.tensor([-1e-10, 0.1], dtype=torch.float64))  # no noise at all; ordinary noise
    covariance = gp.covariance(gp.train_inputs, gp.train_inputs)
    singular = covariance[0]  # the diagonal's 1e-10 cancelled by the noise level
    assert torch.linalg.cholesky_ex(singular)[1] > 0
    factor = gp.observed_cholesky(gp.train_inputs)
    rebuilt = factor @ factor.transpose(1, 2)
    added = rebuilt[0] - singular  # the jitter: on the diagonal only, positive and small against the variance 1
    assert torch.allclose(added, torch.diag(added.diagonal()), rtol=0, atol=1e-12)
    assert bool((added.diagonal() > 1e-12).all()) and float(added.diagonal().max()) <= 1e-4
    assert torch.equal(factor[1], torch.linalg.cholesky(covariance[1] + (0.1 + 1e-10) * torch.eye(6,
                                                                                                 dtype=torch.float64)))


def test_the_latent_rbf_conditioner_is_scipys_thin_plate_spline_with_a_kriging_spread():
    """Its buffers reproduce scipy's RBFInterpolator (thin-plate spline, linear polynomial) on new inputs after a
    save and load as a state dict. Its spread is zero at the training designs and grows away from them, and its scale
    is set so that, at each training design left out of a fit made without it (made explicitly here), the error over
    the spread of that fit there has a root mean square of 1. Two designs at the same parameters are refused."""
    from scipy.interpolate import RBFInterpolator

    from modules.models.radial_basis import RBFConditioner
    rng = np.random.default_rng(0)
    inputs, new = rng.uniform(-1, 1, (30, 3)), rng.uniform(-1, 1, (7, 3))
    targets = np.stack([np.sin(2 * inputs[:, 0]) + inputs[:, 1], inputs[:, 2] ** 2 - inputs[:, 0]], axis=1)
    spec = ConditionerSpec("rbf", (3,), 2, (8,), gp_points=30)
    rebuilt = build_conditioner(spec)
    rebuilt.load_state_dict(RBFConditioner(spec).fit(inputs, targets).state_dict())
    expected = RBFInterpolator(inputs, targets, kernel="thin_plate_spline")(new)
    latents, spread = rebuilt.latent_spread(torch.as_tensor(new))
    assert np.allclose(latents.numpy(), expected, rtol=0, atol=1e-6)
    assert spread.shape == (7, 2) and bool((spread > 0).all())
    assert float(rebuilt.latent_spread(torch.as_tensor(inputs))[1].abs().max()) < 1e-5 * float(spread.max())
    far = rebuilt.latent_spread(torch.as_tensor(np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 3.0], [0.0, 0.0, 6.0]])))[1]
    assert bool((far[1] > far[0]).all() and (far[2] > far[1]).all())
    ratios = []
    for i in range(len(inputs)):
        left_out = RBFConditioner(dataclasses.replace(spec, gp_points=29)).fit(np.delete(inputs, i, 0),
                                                                             np.delete(targets, i, 0))
        latent, its_spread = left_out.latent_spread(torch.as_tensor(inputs[i:i + 1]))
        # its own scale left out: the ratio of its error to its power function alone, times the full fit's scale
        ratios.append((latent[0].double().numpy() - targets[i]) / (its_spread[0].double().numpy()
                                                                   / left_out.sigmas.numpy()))
    assert np.allclose(np.sqrt(np.mean(np.square(ratios), axis=0)), rebuilt.sigmas.numpy(), rtol=1e-4)
    assert build_conditioner(spec).latent_spread(torch.as_tensor(new))[1] is None  # not fitted: no spread
    with pytest.raises(np.linalg.LinAlgError, match="share their parameters"):
        RBFConditioner(spec).fit(np.vstack([inputs[:29], inputs[:1]]), targets)
    with pytest.raises(np.linalg.LinAlgError, match="at least 5"):
        RBFConditioner(dataclasses.replace(spec, gp_points=4)).fit(inputs[:4], targets[:4])
