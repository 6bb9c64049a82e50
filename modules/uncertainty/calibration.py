"""The predicted standard deviation calibrated on the validation designs, and how often the truth falls inside it.

A raw spread (uncertainty.spread) says where a prediction is uncertain, not by how much: an ensemble of five
networks that agree too well, or a decoder prior that knows nothing of the conditioner's error, is off by a factor.
So one scale per time step multiplies it, fitted on the validation designs (which the conditioner never trained on)
so that the +-2 sigma band, the error bar a user reads, holds its nominal 95.4 % of their values at step t: s_t is half
the 95.4 % quantile of |error| / std there. For Gaussian errors that is the scale whose variance matches the observed
squared error; where the errors have heavier tails than the spread says (a feature predicted slightly out of place:
large errors at a few nodes), matching the variance instead left the band holding 86 % (the benchmark's shear with
a borrowed spread), and the +-1 sigma band then holds more than its 68.3 %. One scale for every step is used instead
unless a scale per step calibrates held-out designs clearly better (by PER_STEP_GAIN): one number is less noisy.

Coverage is the share of values whose error lies within +-k standard deviations: 68.3 % (k = 1) and 95.4 % (k = 2) for
a well-calibrated Gaussian. The reliability curve compares the observed share with the nominal one at LEVELS. The
calibrated coverage is measured honestly: each validation design with the scales fitted on the other validation
designs (leave one out), never on itself. It is counted from a histogram per (design, step) of |error| / std on a fine
logarithmic grid, so any scale's coverage is known without keeping the fields (to within one bin, 2.3 %, of the
threshold).
"""
import math
from statistics import NormalDist

import numpy as np

RATIO_EDGES = np.geomspace(1e-3, 1e3, 601)  # |error| / std bin edges; bin 0 holds smaller ratios (and exact zeros)
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # nominal central probabilities
BANDS = {"1 sigma": 1.0, "2 sigma": 2.0}
FITTED_BAND = "2 sigma"  # the band whose nominal share the scales are fitted to hold
PER_STEP_GAIN = 0.01  # a scale per step only if it brings the held-out reliability curve 1 point nearer the diagonal


class CoverageCounts:
    """What calibration needs of each validation design and step: the histogram of |error| / std over the nodes,
    and the sum of std^2 (whether there is any spread to scale)."""

    def __init__(self, n_designs: int, n_steps: int):
        self.histogram = np.zeros((n_designs, n_steps, len(RATIO_EDGES) + 1), np.int64)
        self.std_squares = np.zeros((n_designs, n_steps))

    def add(self, rows, errors: np.ndarray, std: np.ndarray) -> None:
        """rows: the designs' positions among the validation designs; errors, std: [b, T, M], physical units. A
        value with no spread counts as inside every band when its error is 0 too, else as outside all; a non-finite
        error or spread counts as outside all and is left out of the sums of std^2. One design at a time: the float64
        temporaries are a design's, not the batch's (a dozen copies of its field)."""
        n_bins, n_steps = self.histogram.shape[2], self.histogram.shape[1]
        offsets = (np.arange(n_steps) * n_bins)[:, None]
        for row, design_errors, design_std in zip(rows, errors, std):
            design_errors, design_std = np.abs(design_errors.astype(np.float64)), design_std.astype(np.float64)
            finite = np.isfinite(design_errors) & np.isfinite(design_std)
            design_errors, design_std = np.where(finite, design_errors, 0.0), np.where(finite, design_std, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(design_std > 0, design_errors / design_std,
                                 np.where(design_errors == 0, 0.0, np.inf))
            ratio = np.where(finite, ratio, np.inf)
            bins = np.searchsorted(RATIO_EDGES, ratio, side="right")  # edges[b-1] <= ratio < edges[b]
            self.histogram[row] = np.bincount((bins + offsets).ravel(),
                                              minlength=n_steps * n_bins).reshape(n_steps, n_bins)
            self.std_squares[row] = np.square(design_std).sum(-1)


def fit_calibration(counts: CoverageCounts) -> dict:
    """The scales (one per step; every step's the same unless scales per step do clearly better), the
    coverage of the +-1 and +-2 sigma bands and the reliability curve before (raw) and after calibration (leave one
    design out), as plain types."""
    histogram = counts.histogram                                                                 # [n, T, bins]
    n_designs, n_steps = histogram.shape[:2]
    by_step, everything = histogram.sum(0), histogram.sum((0, 1))                            # [T, bins], [bins]
    spread_at = (counts.std_squares.sum(0) > 0, counts.std_squares.sum() > 0)  # a step, any step: any spread at all
    per_step = _scale(by_step, spread_at[0])                                                         # [T]
    overall = _scale(everything, spread_at[1])
    raw = np.ones((n_designs, n_steps))
    result = {"n_designs": n_designs, "coverage": {"nominal": {band: _nominal(k) for band, k in BANDS.items()},
                                                   "raw": _band_coverage(counts.histogram, raw)},
              "reliability": {"levels": list(LEVELS), "raw": _reliability(counts.histogram, raw)}}
    if n_designs < 2:  # nothing to hold out: the scales are fitted but their coverage cannot be measured honestly
        result.update(per_step=False, scales=[float(overall)] * n_steps, chosen_by=None)
        result["coverage"]["calibrated"] = None
        result["reliability"]["calibrated"] = None
        return result
    # each design's scales fitted on the others' values
    held_out = {"per_step": _scale(by_step - histogram, spread_at[0]),                                 # [n, T]
                "overall": np.repeat(_scale(everything - histogram.sum(1), spread_at[1])[:, None], n_steps, axis=1)}
    curves = {name: _reliability(counts.histogram, scales) for name, scales in held_out.items()}
    misfit = {name: float(np.mean(np.abs(np.array(curve) - np.array(LEVELS)))) for name, curve in curves.items()}
    chosen = "per_step" if misfit["per_step"] < misfit["overall"] - PER_STEP_GAIN else "overall"
    result.update(per_step=chosen == "per_step",
                  scales=[float(s) for s in (per_step if chosen == "per_step" else np.full(n_steps, overall))],
                  chosen_by={"mean |observed - nominal| over the levels, designs held out": misfit})
    result["coverage"]["calibrated"] = _band_coverage(counts.histogram, held_out[chosen])
    result["reliability"]["calibrated"] = curves[chosen]
    return result


def _scale(histograms, has_spread):
    """The scale that puts FITTED_BAND's nominal share of the counted ratios |error| / std within it, from their
    histograms [..., bins] (one scale per histogram): the ratio below which that share lies (interpolated linearly in
    log(ratio) inside its bin), over the band's k. 1 where there is no spread to scale (has_spread False);
    RATIO_EDGES[-1] / k where that share is not reached below RATIO_EDGES[-1] (more than the rest of the values lie
    further out, or have no spread)."""
    histograms = np.asarray(histograms, np.float64)
    below = np.cumsum(histograms, axis=-1)                        # values in bins 0..b: ratio < RATIO_EDGES[b]
    wanted = _nominal(BANDS[FITTED_BAND]) * below[..., -1:]
    bins = np.minimum((below < wanted).sum(-1, keepdims=True), histograms.shape[-1] - 1)   # the bin reaching it
    before = np.take_along_axis(below, bins, -1) - np.take_along_axis(histograms, bins, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.clip((wanted - before) / np.take_along_axis(histograms, bins, -1), 0, 1)
    fraction = np.nan_to_num(fraction)
    inside = np.clip(bins, 1, len(RATIO_EDGES) - 1)  # bin 0 (below the first edge) read as the first bin
    low, high = np.log(RATIO_EDGES[inside - 1]), np.log(RATIO_EDGES[inside])
    ratio = np.exp(low + fraction * (high - low))[..., 0]
    ratio = np.where(bins[..., 0] >= len(RATIO_EDGES), RATIO_EDGES[-1], ratio)
    return np.where(has_spread, ratio / BANDS[FITTED_BAND], 1.0)


def _nominal(k: float) -> float:
    return math.erf(k / math.sqrt(2))  # P(|x| < k) of a standard normal


def _band_coverage(histogram, scales) -> dict:
    return {band: _covered_share(histogram, k * scales) for band, k in BANDS.items()}


def _reliability(histogram, scales) -> list:
    return [_covered_share(histogram, NormalDist().inv_cdf(0.5 + level / 2) * scales) for level in LEVELS]


def _covered_share(histogram: np.ndarray, thresholds: np.ndarray) -> float:
    """The share of all counted values whose ratio |error| / std is at most their design's and step's threshold
    ([n, T]), interpolated linearly in log(ratio) inside the threshold's bin."""
    below = np.concatenate([np.zeros(histogram.shape[:2] + (1,)), np.cumsum(histogram, axis=2)], axis=2)
    thresholds = np.asarray(thresholds, np.float64)
    bins = np.searchsorted(RATIO_EDGES, thresholds, side="right")                      # the bin holding it
    inside = np.clip(bins, 1, len(RATIO_EDGES) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.log(thresholds / RATIO_EDGES[inside - 1]) / np.log(RATIO_EDGES[inside] / RATIO_EDGES[inside - 1])
    fraction = np.where(bins == 0, 1.0, np.where(bins >= len(RATIO_EDGES), 0.0, np.clip(fraction, 0, 1)))
    counted = (np.take_along_axis(below, bins[..., None], axis=2)[..., 0]
               + fraction * np.take_along_axis(histogram, bins[..., None], axis=2)[..., 0])
    return float(counted.sum() / max(histogram.sum(), 1))
