"""Does the VAE generate new fields, or copies of its training designs? Prior samples against the training set.

For each prior sample: the relative L2 distance (physical units, whole [T, M] field) to its nearest training design,
||sample - x|| / ||x||. For each held-out (validation) design, never trained on: the same distance to its nearest
training design. A generator that memorised its training set puts its samples much closer to training designs than
new designs of the family are; one that generalises gives distances like the held-out ones. Reported: quantiles of
both distributions and the share of samples closer to a training design than 95 % of the held-out designs are
(below the held-out 5th percentile): about 5 % for samples that look like new designs, near 100 % for copies.
As many samples are drawn as there are held-out designs, seeded by `seed`.

Distances come from inner products, like the POD baseline's: the held-out ones from the evaluation's design Gram
matrix, the samples' from one pass over the training designs streamed over time steps, against the samples written
to a temporary .npy in output/ (removed at the end; as large as the validation designs). Memory stays bounded at
any mesh size, and the training data is read once.
"""
import tempfile
from pathlib import Path

import numpy as np
import torch

from modules.data.dataset import READ_CHUNK_BYTES
from modules.storage.atomic import check_room

COPY_SHARE = 0.5    # above: most samples are nearer a training design than new designs ever are
NEW_SHARE = 0.2     # below: samples are as far from the training set as new designs (about 0.05 expected)


def memorization_check(model, case, gram, seed: int, scratch_dir) -> dict:
    """Draw as many prior samples as there are validation designs (seeded), measure both distributions, return the
    report. gram: design_gram of [training..., validation...] designs; scratch_dir: where the samples' temporary
    .npy goes (the data's disk, not /tmp)."""
    n_train = len(case.train_indices)
    train_norm2 = np.diag(gram)[:n_train]
    heldout = nearest_from_inner_products(np.diag(gram)[n_train:], gram[n_train:, :n_train], train_norm2)
    with tempfile.TemporaryDirectory(dir=scratch_dir) as folder:
        samples_file = write_prior_samples(Path(folder) / "samples.npy", model, case.scaler, len(case.val_indices),
                                           seed)
        sample_norm2, cross = cross_products(samples_file, case.array, case.train_indices)
    return summarise_distances(nearest_from_inner_products(sample_norm2, cross, train_norm2), heldout, n_train)


@torch.no_grad()
def write_prior_samples(path, model, scaler, count: int, seed: int, batch: int = 4) -> Path:
    """count prior samples [count, T, M] in physical units, float32, into a .npy at path, a few at a time;
    repeatable for a seed, and the run's own random streams are left as they were."""
    device = model.decoder.initial.weight.device
    model.eval()
    spec = model.spec
    check_room(path, (count, spec.n_steps, spec.n_nodes))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, spec.n_steps, spec.n_nodes))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, count, batch):
            out[start:start + batch] = scaler.inverse(model.generate(min(batch, count - start)).float().cpu().numpy())
    out.flush()
    del out
    return Path(path)


def cross_products(samples_file, array, train_indices):
    """(||s||^2 [n_s], <s, x_j> [n_s, n_train]) in float64 for the fields s in samples_file and the training
    designs x_j of array, streamed over time steps (as pod.design_gram)."""
    samples = np.load(samples_file, mmap_mode="r")
    n_steps, n_nodes = array.sample_shape
    steps_per_read = max(1, READ_CHUNK_BYTES // (4 * n_nodes * (len(train_indices) + len(samples))))
    norm2, cross = np.zeros(len(samples)), np.zeros((len(samples), len(train_indices)))
    for first in range(0, n_steps, steps_per_read):
        steps = slice(first, first + steps_per_read)
        training = array.read(train_indices, steps=steps).reshape(len(train_indices), -1)
        drawn = np.asarray(samples[:, steps]).reshape(len(samples), -1)
        columns = max(1, READ_CHUNK_BYTES // (16 * len(train_indices)))
        for start in range(0, training.shape[1], columns):
            piece = drawn[:, start:start + columns].astype(np.float64)
            norm2 += (piece ** 2).sum(axis=1)
            cross += piece @ training[:, start:start + columns].astype(np.float64).T
    return norm2, cross


def nearest_from_inner_products(norm2, cross, train_norm2) -> np.ndarray:
    """min over training designs j of ||f - x_j|| / ||x_j||, from ||f||^2 [n_f], <f, x_j> [n_f, n_t] and ||x_j||^2."""
    distance2 = norm2[:, None] + train_norm2[None, :] - 2 * cross
    relative = np.sqrt(np.clip(distance2, 0, None) / np.maximum(train_norm2, 1e-300)[None, :])
    return relative.min(axis=1)


def summarise_distances(samples: np.ndarray, heldout: np.ndarray, n_train: int) -> dict:
    """The report of two nearest-distance distributions (fractions, not percent)."""
    threshold = float(np.percentile(heldout, 5))
    share = float(np.mean(samples < threshold))
    if share > COPY_SHARE:
        verdict = "the generator reproduces its training designs (memorization)"
    elif share > NEW_SHARE:
        verdict = "some samples are near-copies of training designs"
    else:
        verdict = "no sign of memorization: samples are as far from the training set as new designs"
    return {"metric": "relative L2 distance ||field - x|| / ||x|| to the nearest training design x, physical units",
            "n_samples": len(samples), "n_heldout": len(heldout), "n_train": n_train,
            "samples_nearest_distance": quantiles(samples), "heldout_nearest_distance": quantiles(heldout),
            "heldout_p5": threshold, "share_closer_than_heldout_p5": share, "verdict": verdict}


def quantiles(values: np.ndarray) -> dict:
    return {"min": float(values.min()), "p5": float(np.percentile(values, 5)), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}
