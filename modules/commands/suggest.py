"""--suggest: which designs to simulate next, to make the surrogate better where it is least sure.

    python SimulGen-VAE.py --suggest=K [--candidates=cands.csv] [--out=next.csv]

From the candidate designs (a CSV with the training parameters' columns, or without one a scrambled Sobol sample of
the training parameter box, seeded by the conditioner's seed), K are picked (with the GP on the latents: by the
variance their simulation removes; with networks: by their spread, kept apart; uncertainty.next_designs says how)
and written as a CSV: the parameters, ready for the solver, and each pick's predicted relative standard deviation.
Default output: output/suggested_designs.csv (never overwritten).
"""
import csv
import io
import logging

import numpy as np
import torch

from modules.commands.predict import read_inputs
from modules.errors import InputError
from modules.machine.device import full_float32
from modules.storage.atomic import save_text
from modules.storage.model_files import load_surrogate
from modules.storage.paths import SUGGESTIONS_FILE, new_output_file
from modules.uncertainty.design_range import placement, placement_summary
from modules.uncertainty.next_designs import (SOBOL_CANDIDATES, SUGGEST_DRAWS, latent_field_weights, pick_diverse,
                                              sobol_candidates, variance_reduction_picks)
from modules.uncertainty.spread import (SPREAD_WORDS, calibration_scales, missing_uncertainty, relative_spread,
                                        spread_source)

log = logging.getLogger(__name__)


def suggest_designs(count: int, candidates, out, conditioner_file, device) -> list:
    """Pick `count` (>= 1) designs to simulate next; writes them to out (or output/suggested_designs.csv) and
    returns the picked candidates' row indices, in the order picked."""
    out = new_output_file(out if out is not None else SUGGESTIONS_FILE, "--suggest", ".csv")
    full_float32(device)
    surrogate, facts, config = load_surrogate(conditioner_file, device)
    reference = facts["design_range"]
    if config.design_inputs != "parameters":
        raise InputError(conditioner_file, f"reads images (input_type {config.input_type}): --suggest picks design "
                         "parameters", "use --suggest with a conditioner trained on a parameter CSV (input_type csv)")
    if reference is None:
        raise InputError(conditioner_file, "holds no record of the training parameters' range, which --suggest needs "
                         "(files written before it was kept do not)", "retrain the conditioner with --lc_only=1")
    missing = missing_uncertainty(surrogate, facts)
    if missing:
        raise InputError(conditioner_file, f"{missing[0]} to rank candidate designs by", missing[1])
    raw, inputs, where = candidate_designs(candidates, surrogate, config, facts, reference)
    if count > len(raw):
        raise InputError(candidates or "command line", f"{len(raw)} candidate designs are fewer than the {count} "
                         "asked for", f"give --suggest={len(raw)} or fewer, or --candidates=PATH.csv with more")
    calibration = facts["calibration"]
    source = calibration["source"] if calibration else spread_source(surrogate, inputs)
    if source == "decoder":
        log.info("note: this conditioner's only spread is the decoder prior's, which barely tells designs apart")
    picked, relative_std, criterion = pick_designs(source, surrogate, facts, config, inputs, count)
    names = reference["names"] or [f"parameter_{column}" for column in range(1, raw.shape[1] + 1)]
    save_text(out, suggestions_csv(names, raw[picked], relative_std))
    log.info(f"Suggested {count} of {len(raw)} {where} -> {out}, picked by {criterion}; their predicted relative std "
             f"{relative_std.min():.3%} to {relative_std.max():.3%}. Simulate them, add them to the dataset and "
             "retrain.")
    if candidates is not None:
        points = inputs[picked].double().cpu().numpy()
        summary = placement_summary(placement(reference, {"parameters": points},
                                              [f"suggestion {rank}" for rank in range(1, count + 1)], raw[picked]))
        if summary:
            log.warning(f"warning: {summary}")
    return picked


def pick_designs(source: str, surrogate, facts: dict, config, inputs, count: int):
    """(the picked rows of inputs in order, their predicted relative std, the criterion in words): the GP's
    variance reduction when the spread is the GP's (also a neural field's GP), else the spread with a diversity term
    (uncertainty.next_designs).
    inputs: standardised candidates on the device; config: the conditioner's (its file's facts)."""
    def relative_std_of(designs):  # the same seeded draws for any set of designs
        return relative_spread(surrogate, designs, calibration_scales(facts, config.n_steps_used), SUGGEST_DRAWS,
                               config.batch_size, torch.Generator().manual_seed(config.seed))

    if source in ("gp", "field_gp"):  # a neural field's GP: what its simulation would teach the GP
        weights = latent_field_weights(surrogate, config.batch_size)
        gp = surrogate.conditioner.spread if source == "field_gp" else surrogate.conditioner
        picked = variance_reduction_picks(gp, inputs, weights, count, config.seed)
        return picked, relative_std_of(inputs[picked]), (
            "the largest reduction of the GPs' posterior variance of the field, averaged over the candidates, each "
            "pick counted as simulated before the next")
    relative_std = relative_std_of(inputs)
    spacing = facts["design_range"]["spaces"]["parameters"]["typical_distance"]
    picked = pick_diverse(relative_std, inputs.double().cpu().numpy(), count, spacing)
    return picked, relative_std[picked], (f"the largest calibrated spread of the prediction ({SPREAD_WORDS[source]}),"
                                          f" with a diversity term; the median candidate's is "
                                          f"{np.median(relative_std):.3%}")


def candidate_designs(candidates, surrogate, config, facts, reference):
    """(raw parameters float64 [n, P], standardised float32 tensor [n, P] on the surrogate's device, how to name
    them in one phrase): the candidates CSV, checked as --predict checks new designs, or a Sobol sample of the
    training box."""
    device = surrogate.input_mean.device
    if candidates is not None:
        inputs, raw, _ = read_inputs(candidates, config, facts, flag="--candidates")
        return raw, surrogate.standardised(inputs.to(device)), f"candidate designs in {candidates}"
    raw = sobol_candidates(reference["low"], reference["high"], SOBOL_CANDIDATES, config.seed)
    inputs = surrogate.standardised(torch.from_numpy(raw).to(device))
    return raw, inputs, f"Sobol candidates in the training parameter box (seed {config.seed})"


def suggestions_csv(names, parameters: np.ndarray, relative_std: np.ndarray) -> str:
    """The parameters with full precision (repr of each float), then predicted_relative_std, one row per pick."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*names, "predicted_relative_std"])
    for row, relative in zip(parameters, relative_std):
        writer.writerow([*(repr(float(value)) for value in row), f"{relative:.6g}"])
    return text.getvalue()
