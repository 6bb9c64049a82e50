"""Which designs to simulate next: from candidate designs, the K whose simulation should teach the surrogate most.

With the GP on the latents, the criterion is what a simulation
removes: greedy over K rounds, each round picks the candidate whose simulation would most reduce the posterior
variance of the predicted field, summed over the latents (each weighted by how much a unit of it moves the field:
the decoder's sensitivity, by finite differences) and averaged over the candidates, which stand for the designs that
matter (Cohn's active learning criterion, "ALC"). A GP's posterior variance after a new observation does not depend
on the value observed, so the reduction is exact before the design is simulated, and each pick joins the training
designs before the next round: picks spread out by themselves, and the region they cover counts. Picking by the
largest variance alone would send the picks to the corners of the box, where a simulation informs few designs.

Networks (an ensemble, or one network) give a spread but no such update. For them each round picks the largest

    score = predicted relative std * min(1, distance to the nearest design picked so far / typical spacing)

- The predicted relative std is the calibrated spread that --predict --samples reports for a design (|OUT_std| /
  |OUT| over its whole field, uncertainty.spread): large where the ensemble's members disagree, which is where the
  training designs leave the field most open; it already falls near the training designs.
- The second factor is the diversity term: a candidate nearer to an earlier pick than the training designs
  typically are to each other (the median distance from a training design to its nearest neighbour, in
  standardised parameters; uncertainty.design_range) counts for less, in proportion to that distance, so that K
  suggestions are not K neighbours of one uncertain spot. It stands in for the update a GP makes exactly.

Without a candidates file the candidates are a scrambled Sobol sample of the training parameter box (each
parameter's range over the training designs), seeded: the same seed gives the same suggestions.
"""
import numpy as np
import torch
from scipy.stats import qmc

SOBOL_CANDIDATES = 1024  # a power of two keeps the Sobol sample balanced
SUGGEST_DRAWS = 16  # draws per candidate for its spread: a whole field's norm varies little from draw to draw
REFERENCE_DESIGNS = 256  # candidates over which the GP's variance reduction is averaged (all of them when fewer)
CANDIDATE_CHUNK = 256  # candidates scored at a time: GP.covariance holds [D, N known, CANDIDATE_CHUNK, P] floats


def sobol_candidates(low, high, count: int, seed: int) -> np.ndarray:
    """float64 [count, P]: a scrambled Sobol sample of the box [low, high] (count a power of two). A parameter
    constant over the training designs keeps its one value."""
    if count < 1 or count & (count - 1):
        raise ValueError(f"a Sobol sample of {count} points: give a power of two")
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    unit = qmc.Sobol(len(low), scramble=True, seed=seed).random_base2(count.bit_length() - 1)
    return low + unit * (high - low)


def pick_diverse(spread, points, count: int, spacing: float) -> list:
    """Indices of `count` rows of points [n, D] (standardised parameters), in the order picked by the criterion
    above; spread [n]: each row's predicted relative std. Ties go to the lower index (repeatable)."""
    spread, points = np.asarray(spread, dtype=np.float64), np.asarray(points, dtype=np.float64)
    nearest_pick = np.full(len(points), np.inf)
    picked = []
    for _ in range(count):
        score = spread * np.minimum(1.0, nearest_pick / max(spacing, 1e-12))
        score[picked] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        nearest_pick = np.minimum(nearest_pick, np.linalg.norm(points - points[best], axis=1))
    return picked


@torch.no_grad()
def latent_field_weights(surrogate, batch_size: int) -> np.ndarray:
    """float64 [D]: the squared change of the whole field (physical units) per unit of each standardised latent, by
    a step of one standard deviation from the training designs' mean latent (standardised zero): how much each
    latent's uncertainty matters to the field. Decoded batch_size latents at a time, so memory does not grow with
    D on a large mesh."""
    n_latents, device = surrogate.latent_mean.numel(), surrogate.latent_mean.device

    def physical(standardised):
        fields = surrogate.physical(surrogate.decoded(standardised.to(device))).cpu().numpy()
        return fields.astype(np.float64).reshape(len(standardised), -1)

    mean_field = physical(torch.zeros(1, n_latents))
    weights = []
    for start in range(0, n_latents, batch_size):
        steps = torch.eye(n_latents)[start:start + batch_size]
        weights.append(np.square(physical(steps) - mean_field).sum(axis=1))
    return np.concatenate(weights)


@torch.no_grad()
def variance_reduction_picks(gp, candidates: torch.Tensor, latent_weights: np.ndarray, count: int,
                             seed: int) -> list:
    """Indices of `count` candidates [n, P] (standardised parameters), in the order picked by the GP criterion
    above. latent_weights [D]: field variance per unit variance of each standardised latent. The average runs over
    REFERENCE_DESIGNS candidates drawn with the seed (all when there are fewer). Computed where the GP's buffers
    are (CPU or GPU)."""
    device = gp.train_inputs.device
    candidates = candidates.double().to(device)
    order = np.random.default_rng(seed).permutation(len(candidates))[:REFERENCE_DESIGNS]
    reference = candidates[torch.as_tensor(np.sort(order), device=device)]
    # normalised GP units -> standardised latents (target_std) -> field (latent_weights)
    weights = torch.as_tensor(latent_weights, dtype=torch.float64, device=device) * gp.target_std.pow(2)
    noise = gp.noise_levels
    picked = []
    for _ in range(count):
        observed = torch.cat([gp.train_inputs, candidates[picked]])
        cholesky = gp.observed_cholesky(observed)                                               # [D, N, N]
        to_reference = torch.linalg.solve_triangular(cholesky, gp.covariance(observed, reference), upper=False)
        score = torch.empty(len(candidates), dtype=torch.float64, device=device)
        for start in range(0, len(candidates), CANDIDATE_CHUNK):
            chunk = candidates[start:start + CANDIDATE_CHUNK]
            to_chunk = torch.linalg.solve_triangular(cholesky, gp.covariance(observed, chunk), upper=False)
            shared = gp.covariance(reference, chunk) - to_reference.transpose(1, 2) @ to_chunk  # [D, R, C]
            own = gp.posterior_variance(to_chunk)                                                   # [D, C]
            reduction = shared.pow(2).mean(1) / (own + noise[:, None])                            # [D, C]
            score[start:start + len(chunk)] = (weights[:, None] * reduction).sum(0)
        score[picked] = -torch.inf
        picked.append(int(torch.argmax(score)))
    return picked
