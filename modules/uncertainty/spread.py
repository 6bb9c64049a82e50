"""A prediction's uncertainty: draws of a design's field around the conditioner's prediction, whose spread says how
much the field may differ from it, and that spread calibrated on the validation designs (uncertainty.calibration).

Where the spread comes from (spread_source):
- "ensemble" (lc_ensemble >= 2): the members' disagreement on each latent number, what the training designs leave
  open;
- "gp" (the GP on the latents): its posterior standard deviation of each latent number, which grows with the
  distance to the training designs;
- "rbf" (the thin-plate spline of the latents): its kriging standard deviation of each latent number, zero at the
  training designs and growing away from them, scaled by its leave-one-out errors (models.radial_basis);
- "field_gp", "field_rbf" (a neural field or a feature-frame GP, which have none of their own, carrying the GP or the
  spline fitted beside it: models.carried_spread): that model's spread of the latents, decoded around its own
  latents' field and added to the conditioner's prediction; the calibration then scales it to the conditioner's own
  errors;
- "decoder" (a single network, which has none of its own): the decoder prior's spread at the hierarchical levels, the
  spread the VAE allows in the finer detail.

A draw: the predicted standardised latents plus their standard deviation times standard normal noise, decoded (for
"decoder": the main latent as predicted, every level's latent plus its prior's noise). The predicted standard
deviation of a value is the root mean square of (draw - prediction) over the draws, in physical units: around the
prediction that is reported, and unbiased in its square for any number of draws, so a scale fitted with one number of
draws holds for another. The noise comes from a seeded CPU generator: repeatable on any device.
"""
import logging

import numpy as np
import torch

from modules.data.batches import in_order
from modules.machine.memory import batch_within_memory
from modules.uncertainty.calibration import CoverageCounts, fit_calibration

log = logging.getLogger(__name__)

CALIBRATION_DRAWS = 32  # draws per validation design when the spread is calibrated
# float32 copies of a field one validation design takes while it is calibrated: its prediction (scaled and physical),
# the float64 sum of squares, a draw (on the device and its deviation), the simulated field and its error, the
# decoder's activations; its batch is cut to fit in the memory left (machine.memory.batch_within_memory)
CALIBRATION_COPIES = 10


def spread_source(surrogate, inputs) -> str:
    """"ensemble", "gp", "rbf", "field_gp", "field_rbf" or "decoder" (see the module's docstring) for this
    surrogate's conditioner, inputs: a few standardised designs."""
    if hasattr(surrogate.conditioner, "members"):
        return "ensemble"
    if getattr(surrogate.conditioner, "spread_kind", None):
        return surrogate.conditioner.spread_kind
    _, spread = surrogate.latent_spread(inputs[:1])
    return "gp" if spread is not None else "decoder"


SPREAD_WORDS = {"ensemble": "the disagreement of the conditioner ensemble's members",
                "gp": "the Gaussian processes' posterior standard deviation of the latents",
                "rbf": "the thin-plate spline's kriging standard deviation of the latents",
                "field_gp": "the GP on the latents' posterior spread, decoded around the prediction of the "
                            "conditioner that predicts the field itself",
                "field_rbf": "the thin-plate spline's kriging spread of the latents, decoded around the prediction of "
                             "the conditioner that predicts the field itself",
                "decoder": "the decoder prior's spread at the hierarchical levels (this conditioner has no "
                           "uncertainty of its own: lc_ensemble 5 trains one that has)"}


class DesignNoise:
    """Standard normal noise for a batch of designs, each design's from its own generator seeded by (seed, its index
    among all designs): a design's draws are the same whatever batch it is predicted in (--predict sizes its
    batches from the free memory)."""

    def __init__(self, seed: int, first: int, count: int):
        # SeedSequence mixes (seed, design) into one well-spread number: torch's CPU generator keeps 32 bits of a seed,
        # so seed * 2**32 + design would give every seed the same draws
        self.generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, first + index])
                                                             .generate_state(1)[0])) for index in range(count)]

    def randn(self, shape) -> torch.Tensor:
        """[count, *shape[1:]] on the CPU."""
        return torch.stack([torch.randn(shape[1:], generator=generator) for generator in self.generators])


def physical_std(surrogate, prediction, draws) -> tuple:
    """(the prediction in physical units [B, T, M], the root mean square of (draw - prediction) [B, T, M] float32),
    as numpy. prediction: scaled, on the device; draws: an iterable of scaled draws, consumed."""
    physical = surrogate.physical(prediction).cpu().numpy()
    squares, count = np.zeros(physical.shape, np.float64), 0
    for draw in draws:  # in place: one float32 deviation at a time, summed in float64 without a float64 copy
        deviation = surrogate.physical(draw).cpu().numpy()
        deviation -= physical
        squares += np.square(deviation, out=deviation)
        count += 1
    return physical, np.sqrt(squares / max(count, 1)).astype(np.float32)


def calibration_scales(facts: dict, n_steps: int) -> np.ndarray:
    """float32 [T]: the calibration's scale per time step saved with a conditioner (ones, with a note, for a file
    that holds none)."""
    calibration = facts["calibration"]
    if calibration is None:
        log.info("note: the spread is not calibrated: the conditioner file holds no calibration, as files written "
                 "before calibration existed do (retrain it with --lc_only=1 to calibrate it)")
        return np.ones(n_steps, np.float32)
    return np.asarray(calibration["scales"], np.float32)


@torch.no_grad()
def relative_spread(surrogate, inputs, scales, n_draws: int, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """float64 [n]: each design's calibrated standard deviation over the norm of its predicted field, both over the
    whole field in physical units (what --predict --samples reports as predicted_relative_std), from n_draws
    draws. inputs: standardised designs; scales: the calibration's scale per time step."""
    relative = []
    for start in range(0, len(inputs), batch_size):
        prediction, draws = surrogate.draws(inputs[start:start + batch_size], n_draws,
                                            lambda shape: torch.randn(shape, generator=generator))
        predicted, std = physical_std(surrogate, prediction, draws)
        relative.append(relative_norm(std * np.asarray(scales, np.float32)[None, :, None], predicted))
    return np.concatenate(relative)


def relative_norm(std: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """float64 [B]: per design, the norm of its standard deviation [B, T, M] over the norm of its prediction."""
    return (np.linalg.norm(std.reshape(len(std), -1), axis=1)
            / np.maximum(np.linalg.norm(predicted.reshape(len(predicted), -1), axis=1), 1e-30))


@torch.no_grad()
def calibrate_spread(surrogate, conditions, fields, batch_size: int, seed: int) -> dict:
    """The surrogate's spread calibrated on the validation designs (uncertainty.calibration): its source, the draws
    per design, the scale per time step and the coverage before and after, as plain types. conditions: every
    design's standardised conditions on the device; fields: the VAE run's Case (validation designs, field scaler)."""
    val_indices, scaler = fields.val_indices, fields.scaler
    field_bytes = 4 * int(np.prod(fields.array.sample_shape))
    order = list(in_order(len(val_indices), batch_within_memory(batch_size, CALIBRATION_COPIES * field_bytes)))
    counts = CoverageCounts(len(val_indices), surrogate.vae.spec.n_steps)
    surrogate.eval()
    for positions, simulated in zip(order, fields.val.batches(order)):
        designs = torch.as_tensor(val_indices[positions], device=conditions.device)
        noise = DesignNoise(seed, int(positions[0]), len(positions))  # a design's draws do not depend on its batch
        prediction, draws = surrogate.draws(conditions[designs], CALIBRATION_DRAWS, noise.randn)
        predicted, std = physical_std(surrogate, prediction, draws)
        counts.add(positions, predicted - scaler.inverse(simulated.float().cpu().numpy()), std)
    source = spread_source(surrogate, conditions)
    if not counts.std_squares.any():  # every draw was the prediction: there is no spread to calibrate
        return {"source": source, "draws": CALIBRATION_DRAWS, "n_designs": len(val_indices), "no_spread": True}
    return {"source": source, "draws": CALIBRATION_DRAWS, **fit_calibration(counts)}


def missing_uncertainty(surrogate, facts: dict):
    """(what the conditioner lacks, the fix) where its prediction has no uncertainty to draw from or rank by; None
    where it has one. A neural field has one only when it carries the GP or the spline fitted beside it (files
    written before it could, never); a single network's spread, the decoder prior's at the hierarchical levels, is
    none where the VAE kept draws nothing from its levels (its starting state on a family whose levels' POD modes are
    empty), which calibration records as no_spread."""
    if surrogate.decodes_fields and getattr(surrogate.conditioner, "spread", None) is None:
        return ("predicts the field itself (a neural field or a feature-frame GP) and carries no uncertainty model (no "
                "GP or spline on the latents was fitted beside it)",
                "retrain the conditioner with latent_gp 1 or latent_rbf 1 (--lc_only=1)")
    if (facts.get("calibration") or {}).get("no_spread"):
        return ("has no uncertainty: the decoder prior's spread, a single network's only one, moved no value of its "
                "predictions on the validation designs",
                "retrain the conditioner with lc_ensemble 5, or latent_gp 1 on parameters (--lc_only=1)")
    return None


def calibration_words(calibration: dict) -> str:
    """One sentence: what the spread is, its scale and the +-2 sigma band's coverage before and after."""
    if calibration.get("no_spread"):
        return (f"uncertainty from {SPREAD_WORDS[calibration['source']]}: none, every draw equals the prediction on "
                f"the {calibration['n_designs']} validation designs, so --samples and --suggest are refused "
                "(lc_ensemble 5 trains a conditioner with a spread)")
    scales = calibration["scales"]
    scale = (f"scaled by {min(scales):.3g} to {max(scales):.3g} per time step" if calibration["per_step"]
             else f"scaled by {scales[0]:.3g}")
    coverage, nominal = calibration["coverage"], calibration["coverage"]["nominal"]["2 sigma"]
    after = ("not measured (one validation design: none to hold out)" if coverage["calibrated"] is None
             else f"{coverage['calibrated']['2 sigma']:.1%} after (each design held out)")
    return (f"uncertainty from {SPREAD_WORDS[calibration['source']]}, {scale} on {calibration['n_designs']} "
            f"validation designs; the +-2 sigma band holds {coverage['raw']['2 sigma']:.1%} of their values before "
            f"calibration and {after}, {nominal:.1%} expected")
