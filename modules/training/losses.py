"""The VAE objective: alpha * reconstruction + beta * KL, where KL = KL_main + the sum of the level KLs.

Free bits (config.free_bits > 0, Kingma et al. 2016, per dimension): each latent dimension's KL, averaged over the
batch (and the Recon_iter samples), enters the loss as max(free_bits, that mean). A dimension below the floor then
gets no gradient from the KL term, so beta cannot push it all the way to the prior (posterior collapse) and the
decoder keeps a reason to use it. With free_bits 0 the KL term is the plain batch-mean KL.
"""
import torch.nn.functional as F

LOSS_NAMES = {1: "MSE", 2: "MAE", 3: "SmoothL1", 4: "Huber"}  # Loss_type's numbers


def field_loss(recon, target, name: str, delta: float):
    """Mean elementwise loss between fields of the same shape (scaled units): MSE, MAE, SmoothL1 or Huber (the last
    two with threshold delta). The VAE's is Loss_type (LOSS_NAMES), end-to-end training's e2e_loss_function."""
    if name == "MSE":
        return F.mse_loss(recon, target)
    if name == "MAE":
        return F.l1_loss(recon, target)
    if name == "SmoothL1":
        return F.smooth_l1_loss(recon, target, beta=delta)
    if name == "Huber":
        return F.huber_loss(recon, target, delta=delta)
    raise ValueError(f"unknown loss {name!r}")  # config validation makes this unreachable from user input


def free_bits_kl(kl_main_dims, kl_level_dims, free_bits: float):
    """Batch-mean KL per dimension, kl_main_dims [D] and kl_level_dims [L, d] -> the KL term (a scalar): the sum over
    all dimensions of max(free_bits, KL). clamp_min passes no gradient to a dimension below the floor."""
    return kl_main_dims.clamp_min(free_bits).sum() + kl_level_dims.clamp_min(free_bits).sum()


def vae_loss(outputs, target, config, beta: float):
    """outputs: list of model outputs (one per posterior sample, Recon_iter of them) for the same batch.

    Returns (total, parts) where parts holds detached tensors, the true (never clamped) batch-mean KLs averaged over
    the outputs: recon, kl_main, kl_levels [L], kl_main_dims [D], kl_level_dims [L, d].
    """
    count = len(outputs)
    name = LOSS_NAMES[config.loss_type]
    recon = sum(field_loss(o["recon"].float(), target, name, config.huber_delta) for o in outputs)
    kl_main = sum(o["kl_main"].mean() for o in outputs)
    kl_levels = sum(o["kl_levels"].mean(dim=0) for o in outputs)
    recon, kl_main, kl_levels = recon / count, kl_main / count, kl_levels / count
    kl_main_dims = sum(o["kl_main_dims"].mean(dim=0) for o in outputs) / count
    kl_level_dims = sum(o["kl_level_dims"].mean(dim=0) for o in outputs) / count
    if config.free_bits > 0:
        # the floor applies to the mean over all B * Recon_iter posterior samples of the batch, as one batch
        kl_term = free_bits_kl(kl_main_dims, kl_level_dims, config.free_bits)
    else:
        kl_term = kl_main + kl_levels.sum()  # exactly the loss without free bits (same operations, same rounding)
    total = config.recon_weight * recon + beta * kl_term
    return total, {"recon": recon.detach(), "kl_main": kl_main.detach(), "kl_levels": kl_levels.detach(),
                   "kl_main_dims": kl_main_dims.detach(), "kl_level_dims": kl_level_dims.detach()}
