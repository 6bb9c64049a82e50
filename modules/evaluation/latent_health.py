"""Posterior-collapse diagnostics from a validation pass: KL per latent dimension and active units.

Groups: "main" (the main latent, D dims) and "level0" ... "level{L-1}" (d dims each) in generation order, so level0
is the coarsest level, as kl_levels and the train/kl_level{i} metrics.

A dimension is active (Burda et al. 2016) when its posterior mean varies over designs: variance > ACTIVE_VARIANCE.
A level's prior moves with the levels above it, so a collapsed level (q equal to its prior for every design) can still
have a varying mean; such a dimension has zero KL, hence the second condition, mean KL > ACTIVE_KL. For the main latent
(prior N(0, 1)) a variance above ACTIVE_VARIANCE already implies a mean KL above ACTIVE_KL (KL >= m^2 / 2), so there
the test is exactly Burda's.

Use: add batch_sums(model(batch, sample=False)) over the validation batches (and DDP ranks), then
summarise(sums, designs, D, L, d).
"""
import torch

ACTIVE_VARIANCE = 0.01  # Burda et al.'s threshold on the variance over designs of a dimension's posterior mean
ACTIVE_KL = ACTIVE_VARIANCE / 2  # nats; below this q is (almost) its prior: the dimension carries no information


def batch_sums(output) -> torch.Tensor:
    """One posterior-mean model output (model(batch, sample=False)) -> float32 [3 * (D + L*d)], detached:
    per-dimension sums over the batch of the KL, of the posterior mean and of its square, in that order; within each,
    main dims then level 0, 1, ... dims. Sum over batches and ranks, then divide by the design count for means."""
    count = len(output["main_mean"])
    kl = torch.cat([output["kl_main_dims"], output["kl_level_dims"].reshape(count, -1)], dim=1)
    mean = torch.cat([output["main_mean"], output["level_latents"].reshape(count, -1)], dim=1)
    mean = mean.detach().float()
    return torch.cat([kl.detach().float().sum(0), mean.sum(0), mean.pow(2).sum(0)])


def group_sizes(main_dim: int, n_levels: int, level_dim: int) -> dict:
    """{"main": D, "level0": d, ...} in the order batch_sums lays the dimensions out."""
    return {"main": main_dim, **{f"level{i}": level_dim for i in range(n_levels)}}


def summarise(sums, count: int, main_dim: int, n_levels: int, level_dim: int) -> dict:
    """Summed batch_sums over `count` designs -> {group: {"units": int, "active": int, "kl": float,
    "kl_dims": [float] * units}}, "kl" being the group's total mean KL (nats) and "kl_dims" its mean KL per dimension.
    """
    kl, mean, square = (part / count for part in torch.as_tensor(sums, dtype=torch.float64).cpu().chunk(3))
    active = (square - mean ** 2 > ACTIVE_VARIANCE) & (kl > ACTIVE_KL)
    summary, start = {}, 0
    for name, units in group_sizes(main_dim, n_levels, level_dim).items():
        part = slice(start, start + units)
        summary[name] = {"units": units, "active": int(active[part].sum()), "kl": float(kl[part].sum()),
                         "kl_dims": kl[part].tolist()}
        start += units
    return summary


def log_record(summary) -> dict:
    """Flat scalars for the metrics CSV and TensorBoard, in a stable order: active_units/{group} for every group,
    then kl_dim/{group}/{dim} (dim zero-padded, e.g. kl_dim/level0/03)."""
    record = {f"active_units/{name}": float(group["active"]) for name, group in summary.items()}
    for name, group in summary.items():
        width = max(2, len(str(group["units"] - 1)))
        record.update({f"kl_dim/{name}/{dim:0{width}d}": value for dim, value in enumerate(group["kl_dims"])})
    return record


def collapsed_groups(summary) -> list:
    """Names of the groups (main latent, levels) with no active unit, in summary order."""
    return [name for name, group in summary.items() if group["active"] == 0]


def collapse_warning(groups, summary) -> str:
    """One line naming the collapsed groups and the fix ("" when none collapsed)."""
    if not groups:
        return ""
    which = ", ".join(f"{name} ({summary[name]['active']} of {summary[name]['units']} units active)"
                      for name in groups)
    return (f"posterior collapse: {which}; the decoder ignores these latents (level0 is the coarsest). Fix: raise "
            f"free_bits (e.g. 'free_bits 0.1' in input_data/condition.txt), or keep the KL weight small for longer "
            f"(a larger init_beta_divisor in preset.txt, a larger beta_hold_fraction).")
