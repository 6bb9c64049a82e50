"""Schedules of the KL weight beta and the learning rate: pure functions of the position in the run, in epochs (the
training loop asks at every optimiser step: epoch + the fraction of it done), so resuming is exact and a run of a
few epochs moves gradually too."""
import math


def beta_at(epoch: float, epochs: int, init_beta_divisor: float, hold_fraction: float, ramp_end_fraction: float):
    """KL weight at a 0-based position in epochs.

    Starts at 1e-4 * 10**-d (d = preset's init_beta_divisor), stays there for the first hold_fraction of the epochs,
    rises along a half cosine to 1 by ramp_end_fraction, then stays at 1.
    """
    start = 1e-4 * 10.0 ** (-init_beta_divisor)
    progress = epoch / epochs
    if progress < hold_fraction:
        return start
    if progress >= ramp_end_fraction:
        return 1.0
    ramp = (progress - hold_fraction) / (ramp_end_fraction - hold_fraction)
    return start + (1.0 - start) * 0.5 * (1 - math.cos(math.pi * ramp))


def lr_factor(epoch: float, epochs: int, warmup_fraction: float, cycles: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at a 0-based position in epochs.

    Linear warmup over the first warmup_fraction of epochs, then cosine annealing with warm restarts
    (as torch's CosineAnnealingWarmRestarts) in `cycles` equal cycles down to min_ratio; works for any epochs >= 1.
    """
    warmup = warmup_fraction * epochs  # in epochs, not rounded: a run of a few epochs warms up over part of one
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    period = max(1, math.ceil((epochs - warmup) / cycles))
    position = ((epoch - warmup) % period) / period
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * position))
