"""The VAE objective: reconstruction + beta * KL, where KL = KL_main + the sum of the level KLs, per design in nats.

The reconstruction term is, with alpha auto (the default), the negative log-likelihood of the design's T * M values
under a Gaussian (Loss_type 1, MSE) or Laplace (Loss_type 2, MAE) observation model with one noise scale per variable
(sigma-VAE, Rybkin et al. 2021): after each epoch the scale is set to its maximum-likelihood value
(optimal_noise_std) for the validation designs, so that the weight of the data against the KL follows the model's
accuracy and suits any T, M and value range. The validation error rather than the training error: the training
error falls far below it as the network fits its designs, and a noise scale that small weighs the KL at next to
nothing, so the network overfits more. With alpha a number the term is alpha * the mean loss over all values, as in
the original SimulGenVAE (a fixed weight is a Gaussian of a fixed noise scale, which can be far above the model's
error and then lets the KL erase most of the latent's information; docs/model.md).

Free bits (config.free_bits > 0, Kingma et al. 2016, per dimension): each latent dimension's KL, averaged over the
batch (and the Recon_iter samples), enters the loss as max(free_bits, that mean). A dimension below the floor then
gets no gradient from the KL term, so beta cannot push it all the way to the prior (posterior collapse) and the
decoder keeps a reason to use it. With free_bits 0 the KL term is the plain batch-mean KL.
"""
import math

import torch
import torch.nn.functional as F

from modules.config.keys import LOSS_NAMES


def field_loss(recon, target, name: str, delta: float, reduction: str = "mean"):
    """Elementwise loss between fields of the same shape (scaled units), averaged (reduction mean) or not (none):
    MSE, MAE, SmoothL1 or Huber (the last two with threshold delta). The VAE's is Loss_type (LOSS_NAMES),
    end-to-end training's e2e_loss_function."""
    if name == "MSE":
        return F.mse_loss(recon, target, reduction=reduction)
    if name == "MAE":
        return F.l1_loss(recon, target, reduction=reduction)
    if name == "SmoothL1":
        return F.smooth_l1_loss(recon, target, beta=delta, reduction=reduction)
    if name == "Huber":
        return F.huber_loss(recon, target, delta=delta, reduction=reduction)
    raise ValueError(f"unknown loss {name!r}")  # config validation makes this unreachable from user input


def loss_of_uniform_error(error: float, name: str, delta: float) -> float:
    """What field_loss gives when every value is off by error (> 0), in plain Python (no tensor, no device sync)."""
    if name == "MSE":
        return error ** 2
    if name == "MAE":
        return error
    quadratic = 0.5 * min(error, delta) ** 2 + delta * max(error - delta, 0.0)  # Huber
    return quadratic / delta if name == "SmoothL1" else quadratic


def loss_by_variable(recon, target, name: str, delta: float, n_vars: int):
    """Mean loss of each variable [n_vars] (variables side by side along the node axis of [B, T, M])."""
    elementwise = field_loss(recon, target, name, delta, reduction="none")
    return elementwise.reshape(-1, n_vars, elementwise.shape[-1] // n_vars).mean(dim=(0, 2))  # a view, not a copy


def likelihood_nll(mean_loss, noise_std, name: str, values_per_variable: int):
    """Negative log-likelihood of one design in nats, from each variable's mean loss [V] (MSE or MAE) and its noise
    scale [V] (Gaussian sigma or Laplace b), each variable holding values_per_variable numbers per design."""
    if name == "MSE":
        per_value = mean_loss / (2 * noise_std ** 2) + torch.log(noise_std) + 0.5 * math.log(2 * math.pi)
    else:
        per_value = mean_loss / noise_std + torch.log(noise_std) + math.log(2)
    return values_per_variable * per_value.sum()


def optimal_noise_std(mean_loss, name: str):
    """The noise scale [V] that maximises the likelihood of losses [V]: sigma = sqrt(MSE) (Gaussian), b = MAE
    (Laplace), floored at 1e-5 of the scaled range so a perfect fit cannot make the weight infinite."""
    scale = mean_loss.sqrt() if name == "MSE" else mean_loss
    return scale.clamp_min(1e-5)


def reconstruction_term(mean_loss, config, noise_std, values_per_variable: int):
    """The loss's reconstruction part: alpha * mean loss (alpha a number) or the likelihood's NLL (alpha auto)."""
    if config.fixed_recon_weight is not None:
        return config.fixed_recon_weight * mean_loss.mean()
    return likelihood_nll(mean_loss, noise_std, LOSS_NAMES[config.loss_type], values_per_variable)


def validation_loss(mean_loss, kl_total, config, values_per_variable: int):
    """The number validation epochs are compared on (beta = 1): with alpha auto the NLL at the validation designs'
    own best noise scale, so that it does not depend on the scale training used in that epoch."""
    noise_std = optimal_noise_std(mean_loss, LOSS_NAMES[config.loss_type])  # unused with a fixed alpha
    return reconstruction_term(mean_loss, config, noise_std, values_per_variable) + kl_total


def free_bits_kl(kl_main_dims, kl_level_dims, free_bits: float):
    """Batch-mean KL per dimension, kl_main_dims [D] and kl_level_dims [L, d] -> the KL term (a scalar): the sum over
    all dimensions of max(free_bits, KL). clamp_min passes no gradient to a dimension below the floor."""
    return kl_main_dims.clamp_min(free_bits).sum() + kl_level_dims.clamp_min(free_bits).sum()


def vae_loss(outputs, target, config, beta: float, noise_std):
    """outputs: list of model outputs (one per posterior sample, Recon_iter of them) for the same batch; noise_std
    [V]: the likelihood's noise scale per variable (used with alpha auto).

    Returns (total, parts) where parts holds detached tensors, the true (never clamped) batch-mean KLs averaged over
    the outputs: recon (the mean loss over all values), recon_vars [V] (per variable), kl_main, kl_levels [L],
    kl_main_dims [D], kl_level_dims [L, d].
    """
    count = len(outputs)
    name, n_vars = LOSS_NAMES[config.loss_type], len(noise_std)
    recon_vars = sum(loss_by_variable(o["recon"].float(), target, name, config.huber_delta, n_vars)
                     for o in outputs) / count
    kl_main = sum(o["kl_main"].mean() for o in outputs)
    kl_levels = sum(o["kl_levels"].mean(dim=0) for o in outputs)
    kl_main, kl_levels = kl_main / count, kl_levels / count
    kl_main_dims = sum(o["kl_main_dims"].mean(dim=0) for o in outputs) / count
    kl_level_dims = sum(o["kl_level_dims"].mean(dim=0) for o in outputs) / count
    if config.free_bits > 0:
        # the floor applies to the mean over all B * Recon_iter posterior samples of the batch, as one batch
        kl_term = free_bits_kl(kl_main_dims, kl_level_dims, config.free_bits)
    else:
        kl_term = kl_main + kl_levels.sum()  # exactly the loss without free bits (same operations, same rounding)
    total = reconstruction_term(recon_vars, config, noise_std, target[0].numel() // n_vars) + beta * kl_term
    return total, {"recon": recon_vars.mean().detach(), "recon_vars": recon_vars.detach(),
                   "kl_main": kl_main.detach(), "kl_levels": kl_levels.detach(),
                   "kl_main_dims": kl_main_dims.detach(), "kl_level_dims": kl_level_dims.detach()}
