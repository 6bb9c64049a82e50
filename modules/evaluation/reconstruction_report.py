"""Reconstruction accuracy in physical units, always next to the POD baseline with as many numbers per design."""
import json

import numpy as np
import torch

from modules.data.batches import in_order
from modules.evaluation.metrics import FieldErrors
from modules.models.pod import pod_errors


def relative_l2(predicted, true) -> np.ndarray:
    """Per design: ||predicted - true|| / ||true|| over the whole [T, M] field. Inputs [n, T, M].
    Differences in float32, sums of squares accumulated in float64: no float64 copy of a batch of huge fields."""
    true = np.asarray(true, np.float32).reshape(len(true), -1)
    difference = np.asarray(predicted, np.float32).reshape(len(true), -1) - true
    error2 = np.add.reduce(np.square(difference, out=difference), axis=1, dtype=np.float64)
    norm2 = np.add.reduce(np.square(true), axis=1, dtype=np.float64)
    return np.sqrt(error2) / np.maximum(np.sqrt(norm2), 1e-30)


@torch.no_grad()
def reconstruct(model, fields_scaled):
    """Scaled [B, T, M] -> reconstruction along the posterior-mean path (deterministic), scaled units."""
    return model(fields_scaled, sample=False)["recon"]


@torch.no_grad()
def encode_and_score(model, batches, scaler, batch_size: int, designs, n_vars: int):
    """One pass over a batch source, in its order (its dataset indices: designs), along the posterior-mean path.
    Returns float32 main latents [n, D], level latents [n, L, d] (decoding them gives the reconstruction), each
    design's KL per latent dimension [n, D + L*d] (nats) and the reconstruction's FieldErrors in physical units."""
    model.eval()
    mains, levels, kls = [], [], []
    errors = FieldErrors.empty(designs, model.spec.n_steps, n_vars)
    first = 0
    for batch in batches.batches(in_order(len(batches), batch_size)):
        out = model(batch, sample=False)
        mains.append(out["main_mean"].float().cpu().numpy())
        levels.append(out["level_latents"].float().cpu().numpy())
        kls.append(torch.cat([out["kl_main_dims"], out["kl_level_dims"].flatten(1)], dim=1).float().cpu().numpy())
        recon = scaler.inverse(out["recon"].float().cpu().numpy())
        errors.add(slice(first, first + len(batch)), recon, scaler.inverse(batch.float().cpu().numpy()))
        first += len(batch)
    return np.concatenate(mains), np.concatenate(levels), np.concatenate(kls), errors


def save_split(path, train_indices, val_indices) -> None:
    path.write_text(json.dumps({"train": [int(i) for i in train_indices], "val": [int(i) for i in val_indices]}))


def reconstruction_report(design_errors, case, config) -> dict:
    """VAE vs POD (same number of latent numbers per design) on the validation designs, mean relative L2.
    design_errors: the VAE's relative L2 of every design [N], in dataset order."""
    vae_val, vae_train = design_errors[case.val_indices], design_errors[case.train_indices]
    latent_size = config.main_latent_dim + config.n_levels * config.level_latent_dim
    ranks = sorted({0, config.main_latent_dim, latent_size})
    pod = pod_errors(case.split_gram(), len(case.train_indices), ranks)
    return {
        "metric": "mean relative L2 error of the whole [T, M] field, physical units",
        "n_train": len(case.train_indices), "n_val": len(case.val_indices),
        "latent_numbers_per_design": latent_size,
        "vae_val": float(vae_val.mean()), "vae_val_median": float(np.median(vae_val)),
        "vae_val_worst": float(vae_val.max()), "vae_train": float(vae_train.mean()),
        "pod_val": {str(rank): float(pod[rank].mean()) for rank in ranks},
        "pod_note": "POD rank r keeps r numbers per design; rank 0 is the training mean field",
        "pod_rank_cap": len(case.train_indices) - 1,
        "vae_val_per_design": {int(i): float(e) for i, e in zip(case.val_indices, vae_val)},
    }


def write_report(report: dict, output_dir, say=print) -> None:
    (output_dir / "reconstruction_error.json").write_text(json.dumps(report, indent=2))
    size = report["latent_numbers_per_design"]
    say(f"Validation reconstruction error (mean relative L2, physical units, {report['n_val']} designs):")
    say(f"  VAE ({size} latent numbers per design): {report['vae_val']:.4%}   (training designs: "
        f"{report['vae_train']:.4%})")
    for rank, error in report["pod_val"].items():
        label = "mean field (POD rank 0)" if rank == "0" else f"POD rank {rank}"
        capped = "  (rank capped by the training-set size)" if int(rank) > report["pod_rank_cap"] else ""
        say(f"  {label}: {error:.4%}{capped}")
    say(f"  written to {output_dir / 'reconstruction_error.json'}")
