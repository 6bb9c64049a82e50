"""One fitter for every network trained on fields at sampled nodes: the snapshot codec (training.codec_choice) and
the neural-field conditioner (training.conditioner_choice).

A fit makes `passes` passes over the N x T training snapshots (design, time step). Each pass first reads every
training design once, batch_size designs at a time, so the data stay streamed (sampled_pass), and keeps `nodes`
random nodes of each variable of every snapshot (every node where a variable has fewer); then each optimiser step
takes `snapshots` of them at random across the designs (or within a few designs at a time, for a network that
encodes each design's image: step_batches), so a step costs the same on any mesh and mixes designs (steps on one
design's time steps fit worse). Mean squared error, Adam with a one-cycle schedule. The network's output
statistics come from the first pass's values, so its sine network fits standardised values. Repeatable for a seed on
a device, so every DDP rank that fits one (each fits the codec) fits the same network.

With a FitCheckpoint the fit's whole state (network, optimiser, schedule, the random generator that draws nodes and
batches and the global ones, which an image encoder's dropout draws from, the passes made) is saved after every pass,
and a resumed fit continues from it to the same network, bit for bit, as one never interrupted (the neural-field
conditioner's fit and the snapshot codec's).
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.data.batches import in_order, on_device
from modules.errors import InputError
from modules.models.neural_field import node_columns
from modules.storage.atomic import save_torch
from modules.storage.model_files import read_payload
from modules.storage.model_format import FIT_FORMAT, FORMAT_VERSION
from modules.training.state import random_states, set_random_states

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledFieldFit:
    """How a network is fitted on sampled nodes."""

    passes: int
    snapshots: int = 64     # (design, time step) snapshots per optimiser step, drawn at random (step_batches)
    nodes: int = 256        # nodes of each variable a snapshot is read at in a pass, at random
    peak_lr: float = 1e-3   # Adam's, at the top of the one-cycle schedule
    warmup: float = 0.1     # share of the steps the learning rate rises over
    check_after: int = 0    # passes after which a losing fit may be ended (fit_sampled_field's losing); 0: never
    designs_per_step: int = 0  # a step's snapshots drawn from this many designs at a time (step_batches); 0: from all


@dataclass(frozen=True)
class FitCheckpoint:
    """Where a fit saves its state after every pass, and what it is a fit of."""

    path: Path
    facts: dict     # plain types: what a saved state must match to be continued (spec, seed, passes, data ...)
    resume: bool    # continue from a matching saved state; False: start afresh (the file is overwritten)
    fit_of: str = "neural field"  # what is fitted, in messages and --checkpoints=list
    writes: bool = True  # False: read it, never write it (DDP ranks other than the main one fit the same codec)
    run_id: str | None = None  # the run record the fit belongs to (a resumed run continues it)
    config: dict | None = None  # the run's config (Config.to_dict), which a resumed run must match where it counts
    # called once the saved state is read, before the first write: a DDP barrier, so that no process reads a state
    # another has already moved on from; None: nothing
    after_read: Callable[[], None] | None = None


def fit_sampled_field(build, predict, source, n_designs: int, field_shape, fit: SampledFieldFit, batch_size: int,
                      seed: int, device, encode=None, losing=None, checkpoint: FitCheckpoint | None = None,
                      past_check: bool = False):
    """Fit the network that build() makes (after the seed is set, so its initial weights are the seed's; it has a
    .field, a models.neural_field.NeuralFieldNodes) on the scaled fields of the designs at positions 0..n_designs-1
    of source (a data.batches source). field_shape: (T, M, n_vars).

    predict(network, snapshots, nodes, encoded) gives the network's values [S, V * P] of these snapshots (indices s
    into the pass: time step s % T of design s // T) at their nodes [S, P] (None: every node); encoded: encode's
    output for those snapshots (None without encode). encode(network, fields [b, T, M]) -> [b, T, ...]: what the
    network reads of each whole snapshot, computed on the first pass only (it does not change).
    losing(network in eval mode, encode's output) -> bool: asked once, after fit.check_after passes (0: never),
    whether the fit is losing by so wide a margin that the remaining passes are not worth their time; True ends it.
    checkpoint: saved after every pass, and continued from where it matches (encode's output is then computed in the
    first pass run, or in a read of its own where no pass is left). past_check: the saved fit was ended by its
    losing test (a race of fits: training.codec_choice), and this one goes on from there to its last pass.

    Returns (the network in eval mode, encode's output for every snapshot [N * T, ...] or None, the passes made
    when losing ended the fit early, else None)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build()
    optimiser = torch.optim.Adam(network.parameters(), fit.peak_lr)
    per_pass = len(step_batches(fit, n_designs, field_shape[0], torch.Generator()))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, fit.peak_lr, pct_start=fit.warmup,
                                                   total_steps=fit.passes * per_pass)
    parts = {"network": network, "optimiser": optimiser, "schedule": schedule}
    made, stopped = continued(checkpoint, parts, generator, device) if checkpoint is not None else (0, False)
    if checkpoint is not None and checkpoint.after_read is not None:
        checkpoint.after_read()
    encoded = None
    stopped = stopped and not past_check
    if made == fit.passes or stopped:  # resumed with no pass left: encode's output still comes from one read
        encoded = encoded_snapshots(source, n_designs, batch_size, device, network, encode)
    if stopped:  # its losing test said so before the interruption: asked again of the same network, it says so again
        if losing is not None:
            losing(network.eval(), encoded)
        return network.eval(), encoded, made
    network.train()
    for index in range(made, fit.passes):
        reading = None if encode is None or encoded is not None else (lambda fields: encode(network, fields))
        nodes, values, read = sampled_pass(source, n_designs, field_shape, fit.nodes, batch_size, generator, device,
                                           reading)
        encoded = read if encoded is None else encoded
        if index == 0:
            network.field.set_value_statistics(values)
        for batch in step_batches(fit, n_designs, field_shape[0], generator):
            batch = batch.to(device)
            predicted = predict(network, batch, None if nodes is None else nodes[batch],
                                None if encoded is None else encoded[batch])
            loss = F.mse_loss(predicted, values[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        stopped = (losing is not None and not past_check and index + 1 == fit.check_after < fit.passes
                   and losing(network.eval(), encoded))
        if checkpoint is not None and checkpoint.writes:
            save_fit(checkpoint, parts, generator, index + 1, stopped, device)
        if stopped:
            return network.eval(), encoded, index + 1
        network.train()
    return network.eval(), encoded, None


def step_batches(fit: SampledFieldFit, n_designs: int, n_steps: int, generator) -> list:
    """A pass's optimiser steps: snapshot indices [<= fit.snapshots] each (time step s % T of design s // T), every
    snapshot once. Drawn at random across all designs or, with fit.designs_per_step, within groups of that many
    designs taken at random (a network that encodes each distinct design of a step, an image encoder, then encodes
    fewer)."""
    if not fit.designs_per_step:
        return list(torch.randperm(n_designs * n_steps, generator=generator).split(fit.snapshots))
    batches = []
    for group in torch.randperm(n_designs, generator=generator).split(fit.designs_per_step):
        snapshots = (group[:, None] * n_steps + torch.arange(n_steps)).flatten()
        batches += snapshots[torch.randperm(len(snapshots), generator=generator)].split(fit.snapshots)
    return batches


@torch.no_grad()
def encoded_snapshots(source, n_designs: int, batch_size: int, device, network, encode):
    """encode's output for every snapshot [N * T, ...] from one read of the designs, without drawing nodes (None
    without encode): what a resumed fit with no pass left to run reads."""
    if encode is None:
        return None
    order = list(in_order(n_designs, batch_size))
    return torch.cat([encode(network, fields.float()).flatten(0, 1)
                      for _, fields in zip(on_device(order, device), source.batches(order))])


def save_fit(checkpoint: FitCheckpoint, parts: dict, generator, made: int, stopped: bool, device) -> None:
    """The fit's state after `made` passes (stopped: ended there by its losing test)."""
    save_torch(checkpoint.path, {"format": FIT_FORMAT, "format_version": FORMAT_VERSION, "facts": checkpoint.facts,
                                 "fit_of": checkpoint.fit_of, "run_id": checkpoint.run_id,
                                 "config": checkpoint.config, "passes_made": made,
                                 "stopped": stopped, "generator": generator.get_state(),
                                 "random": random_states(torch.device(device)),
                                 **{name: part.state_dict() for name, part in parts.items()}})


def saved_passes(checkpoint: FitCheckpoint) -> int:
    """The passes made by the saved fit that a resumed fit would continue; 0 where it would start afresh. Says
    nothing: continued says why."""
    saved = matching_fit(checkpoint, say=False)
    return 0 if saved is None else saved["passes_made"]


def matching_fit(checkpoint: FitCheckpoint, say: bool):
    """The saved fit (its payload) that a resumed fit continues; None to start afresh: not resuming, no file, a
    damaged file or one of another fit (the last two said when say)."""
    if not checkpoint.resume or not checkpoint.path.exists():
        return None
    try:
        saved = read_payload(checkpoint.path, formats=(FIT_FORMAT,))
    except InputError as error:  # lose the fit's passes, not the run
        if say:
            log.info(f"note: {checkpoint.path} {error.problem}; the {checkpoint.fit_of} is fitted afresh")
        return None
    if saved["facts"] != checkpoint.facts:
        if say:
            log.info(f"note: {checkpoint.path} is the fit of another {checkpoint.fit_of} (other settings or data); it "
                     "is fitted afresh")
        return None
    return saved


def continued(checkpoint: FitCheckpoint, parts: dict, generator, device):
    """(passes already made, whether the fit was ended there) from a saved state that matches checkpoint.facts, its
    parts and generator restored; (0, False) to start afresh: not resuming, no file, or, said, a damaged file or one
    of another fit."""
    saved = matching_fit(checkpoint, say=True)
    if saved is None:
        return 0, False
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    generator.set_state(saved["generator"])
    if "random" in saved:  # a file written before they were saved: dropout in the resumed fit draws other masks
        set_random_states(saved["random"], torch.device(device))
    log.info(f"Continuing the {checkpoint.fit_of}'s fit after pass {saved['passes_made']} ({checkpoint.path})")
    return saved["passes_made"], saved["stopped"]


@torch.no_grad()
def sampled_pass(source, n_designs: int, field_shape, nodes_per_variable: int, batch_size: int, generator, device,
                 encode=None):
    """What a fit trains on for a pass: one read of the designs at positions 0..n_designs-1 of source (scaled fields
    [b, T, M]), batch_size at a time. Returns (node indices [n * T, P] within a variable, nodes_per_variable random
    ones (with replacement) for each (design, time step), or None where a variable has no more nodes: every node;
    their values [n * T, V * P]; encode(fields) of each batch, flattened to [n * T, ...], or None without encode),
    snapshot s being time step s % T of design s // T. The values are at most n x T x nodes_per_variable x V floats,
    whatever M is."""
    n_steps, n_nodes, n_vars = field_shape
    per_variable = n_nodes // n_vars
    nodes = None
    if per_variable > nodes_per_variable:
        nodes = torch.randint(per_variable, (n_designs, n_steps, nodes_per_variable), generator=generator).to(device)
    order = list(in_order(n_designs, batch_size))
    values, encoded = [], []
    for positions, fields in zip(on_device(order, device), source.batches(order)):
        fields = fields.float()
        if encode is not None:
            encoded.append(encode(fields).flatten(0, 1))
        if nodes is not None:
            fields = fields.gather(2, node_columns(nodes[positions], n_nodes, n_vars))
        values.append(fields.flatten(0, 1))
    return (None if nodes is None else nodes.flatten(0, 1), torch.cat(values),
            torch.cat(encoded) if encode is not None else None)
