"""One fitter for every network trained on fields at sampled nodes: the snapshot codec (training.codec_choice) and
the neural-field conditioner (training.conditioner_choice).

A fit makes `passes` passes over the N x T training snapshots (design, time step). Each pass first reads every
training design once, batch_size designs at a time, so the data stay streamed (sampled_pass), and keeps `nodes`
random nodes of each variable of every snapshot (every node where a variable has fewer); then each optimiser step
takes `snapshots` of them at random across the designs, so a step costs the same on any mesh and mixes designs (steps
on one design's time steps fit worse). Mean squared error, Adam with a one-cycle schedule. The network's output
statistics come from the first pass's values, so its sine network fits standardised values. Repeatable for a seed on
a device, so every DDP rank that fits one (each fits the codec) fits the same network.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.data.batches import in_order, on_device
from modules.models.neural_field import node_columns


@dataclass(frozen=True)
class SampledFieldFit:
    """How a network is fitted on sampled nodes."""

    passes: int
    snapshots: int = 64     # (design, time step) snapshots per optimiser step, drawn at random across the designs
    nodes: int = 256        # nodes of each variable a snapshot is read at in a pass, at random
    peak_lr: float = 1e-3   # Adam's, at the top of the one-cycle schedule
    warmup: float = 0.1     # share of the steps the learning rate rises over
    check_after: int = 0    # passes after which a losing fit may be ended (fit_sampled_field's losing); 0: never


def fit_sampled_field(build, predict, source, n_designs: int, field_shape, fit: SampledFieldFit, batch_size: int,
                      seed: int, device, encode=None, losing=None):
    """Fit the network that build() makes (after the seed is set, so its initial weights are the seed's; it has a
    .field, a models.neural_field.NeuralFieldNodes) on the scaled fields of the designs at positions 0..n_designs-1
    of source (a data.batches source). field_shape: (T, M, n_vars).

    predict(network, snapshots, nodes, encoded) gives the network's values [S, V * P] of these snapshots (indices s
    into the pass: time step s % T of design s // T) at their nodes [S, P] (None: every node); encoded: encode's
    output for those snapshots (None without encode). encode(network, fields [b, T, M]) -> [b, T, ...]: what the
    network reads of each whole snapshot, computed on the first pass only (it does not change).
    losing(network in eval mode, encode's output) -> bool: asked once, after fit.check_after passes (0: never),
    whether the fit is losing by so wide a margin that the remaining passes are not worth their time; True ends it.

    Returns (the network in eval mode, encode's output for every snapshot [N * T, ...] or None, the passes made
    when losing ended the fit early, else None)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build()
    snapshots = n_designs * field_shape[0]
    optimiser = torch.optim.Adam(network.parameters(), fit.peak_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, fit.peak_lr, pct_start=fit.warmup,
                                                   total_steps=fit.passes * math.ceil(snapshots / fit.snapshots))
    network.train()
    encoded = None
    for index in range(fit.passes):
        reading = None if encode is None or encoded is not None else (lambda fields: encode(network, fields))
        nodes, values, read = sampled_pass(source, n_designs, field_shape, fit.nodes, batch_size, generator, device,
                                           reading)
        encoded = read if encoded is None else encoded
        if index == 0:
            network.field.set_value_statistics(values)
        for batch in torch.randperm(snapshots, generator=generator).to(device).split(fit.snapshots):
            predicted = predict(network, batch, None if nodes is None else nodes[batch],
                                None if encoded is None else encoded[batch])
            loss = F.mse_loss(predicted, values[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        if losing is not None and index + 1 == fit.check_after < fit.passes:
            if losing(network.eval(), encoded):
                return network, encoded, index + 1
            network.train()
    return network.eval(), encoded, None


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
