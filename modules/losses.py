"""The VAE objective: alpha * reconstruction + beta * (KL_main + sum of level KLs)."""
import torch.nn.functional as F

LOSS_NAMES = {1: "MSE", 2: "MAE", 3: "SmoothL1", 4: "Huber"}


def reconstruction_loss(recon, target, loss_type: int, delta: float):
    """Mean elementwise loss between fields of the same shape (scaled units); loss_type as Loss_type."""
    if loss_type == 1:
        return F.mse_loss(recon, target)
    if loss_type == 2:
        return F.l1_loss(recon, target)
    if loss_type == 3:
        return F.smooth_l1_loss(recon, target, beta=delta)
    if loss_type == 4:
        return F.huber_loss(recon, target, delta=delta)
    raise ValueError(f"unknown loss type {loss_type}")  # config validation makes this unreachable from user input


def vae_loss(outputs, target, config, beta: float):
    """outputs: list of model outputs (one per posterior sample, Recon_iter of them) for the same batch.

    Returns (total, parts) where parts holds detached tensors: recon, kl_main, kl_levels [L].
    """
    recon = sum(reconstruction_loss(o["recon"].float(), target, config.loss_type, config.huber_delta) for o in outputs)
    kl_main = sum(o["kl_main"].mean() for o in outputs)
    kl_levels = sum(o["kl_levels"].mean(dim=0) for o in outputs)
    count = len(outputs)
    recon, kl_main, kl_levels = recon / count, kl_main / count, kl_levels / count
    total = config.recon_weight * recon + beta * (kl_main + kl_levels.sum())
    return total, {"recon": recon.detach(), "kl_main": kl_main.detach(), "kl_levels": kl_levels.detach()}
