"""Which conditioner is kept once the network is trained: the one that predicts the validation designs' fields best,
by the reports' measure (the mean relative L2 error of a design's whole field in physical units).

With parameters, two more candidates are tried beside the trained network: a GP per latent number fitted on the same
training designs (latent_gp; models.gaussian_process) and a neural field trained on their fields themselves
(field_conditioner_epochs, where the nodes' positions are known; models.neural_field, fitted by
training.field_fitter). An ensemble is also set against its own members. Every candidate is scored through the
same models.surrogate.Surrogate that --predict uses, in one pass over the validation designs' fields.
"""
import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from modules.data.batches import in_order
from modules.data.field_layout import node_positions, read_field_layout
from modules.evaluation.metrics import as_percent, relative_l2
from modules.machine.memory import batch_within_memory
from modules.models.conditioners import LATENT_GP, NEURAL_FIELD, ConditionerSpec, conditioner_label
from modules.models.gaussian_process import GPRConditioner
from modules.models.neural_field import NeuralFieldConditioner
from modules.training.field_fitter import SampledFieldFit, fit_sampled_field

log = logging.getLogger(__name__)

LATENT_GP_MOST_DESIGNS = 1000  # a GP fit costs n^3 per optimiser iteration and latent number: minutes at this n
# float32 copies of its field one design takes in the comparison, without gradients: the batch, the decoder's
# activations, the prediction scaled and in physical units, the simulated field and the error
EVALUATION_COPIES = 8


@dataclass(frozen=True)
class Choice:
    """The conditioner kept and why, as the conditioner file records it."""

    kept: torch.nn.Module
    spec: ConditionerSpec
    record: dict | None     # the candidates' validation errors, fit times and which was kept (None: the network
                            # was alone)
    ensemble: dict | None   # an ensemble against its members (None: a single network)


def choose_conditioner(network, spec: ConditionerSpec, case, config) -> Choice:
    """The trained network, or the candidate on parameters that predicts the validation designs better."""
    ensemble = ensemble_against_members(network, spec, case, config) if spec.members > 1 else None
    kept, kept_spec, record = network, spec, None
    if config.design_inputs == "parameters":
        kept, kept_spec, record = best_on_parameters(network, spec, case, config)
    if ensemble is not None:
        ensemble["kept"] = kept is network
    return Choice(kept, kept_spec, record, ensemble)


def ensemble_against_members(ensemble, spec, case, config) -> dict:
    """Whether the ensemble's mean predicts the validation designs' fields better than its members alone (the
    reports' measure), as plain types; "kept" is added once the choice against the other candidates is made."""
    networks = {"ensemble": ensemble, **{f"member {i}": member for i, member in enumerate(ensemble.members, 1)}}
    errors = validation_field_errors(networks, case, config.lc_batch_size)
    members = [errors[f"member {i}"] for i in range(1, len(ensemble.members) + 1)]
    label = conditioner_label(spec.kind, spec.members)
    log.info(f"The {label} predicts the validation designs' fields with a mean relative L2 error of "
             f"{as_percent(errors['ensemble'])}; its members alone {as_percent(min(members))} to "
             f"{as_percent(max(members))} (mean {as_percent(np.mean(members))})")
    return {"label": label, "members": len(members), "ensemble_val": errors["ensemble"], "members_val": members}


def best_on_parameters(network, spec, case, config):
    """The trained network, a GP per latent number (latent_gp) or a neural field (field_conditioner_epochs),
    whichever predicts the validation designs' fields best: (the one kept, its spec, the choice made and why, as
    plain types; None when the network was the only candidate)."""
    candidates, record, seconds = {spec.kind: (network, spec)}, {}, {}
    if config.latent_gp:
        began = time.perf_counter()
        fitted, failure = latent_gp_candidate(spec, case, config)
        seconds[LATENT_GP.kind] = time.perf_counter() - began
        if fitted is not None:
            candidates[LATENT_GP.kind] = fitted
        if failure is not None:
            record["gp_failed"] = failure
    if config.field_conditioner_epochs:
        began = time.perf_counter()
        field = neural_field_candidate(spec, case, config)
        if field is not None:
            candidates[NEURAL_FIELD.kind] = field
            seconds[NEURAL_FIELD.kind] = time.perf_counter() - began
    if seconds:  # what each candidate beside the network cost, kept or not (reports' time spent)
        record["fit_seconds"] = {kind: round(value, 3) for kind, value in seconds.items()}
    if len(candidates) == 1:
        return network, spec, {"kept": spec.kind, **record} if record else None
    errors = validation_field_errors({kind: model for kind, (model, _) in candidates.items()}, case,
                                     config.lc_batch_size)
    kept = min(errors, key=errors.get)
    labels = {kind: conditioner_label(kind, its_spec.members) for kind, (_, its_spec) in candidates.items()}
    others = " and ".join(f"{as_percent(errors[kind])} for the {labels[kind]}" for kind in errors if kind != kept)
    log.info(f"Kept the {labels[kept]} as the conditioner: it predicts the validation designs' fields with a mean "
             f"relative L2 error of {as_percent(errors[kept])} against {others}")
    return (*candidates[kept], {**record, "kept": kept, "validation_relative_l2": errors})


def latent_gp_candidate(spec, case, config):
    """((a GP per latent number fitted on the training designs, its spec), None); (None, None), said, where there are
    too many designs for a GP; (None, the error's text), warned, where the fit fails (the trained network is still a
    conditioner)."""
    train = case.fields.train_indices
    if len(train) > LATENT_GP_MOST_DESIGNS:
        log.info(f"note: no GP on the latents: {len(train)} training designs are more than the "
                 f"{LATENT_GP_MOST_DESIGNS} a GP fit handles in minutes")
        return None, None
    gp_spec = dataclasses.replace(spec, kind=LATENT_GP.kind, gp_points=len(train), members=1)
    log.info(f"Fitting a Gaussian process per latent number ({spec.output_dim}) on the {len(train)} training "
             "designs ...")
    try:
        latent_gp = GPRConditioner(gp_spec).fit(case.conditions[train].double().cpu().numpy(),
                                                case.targets[train].double().cpu().numpy(), config.seed)
    except (np.linalg.LinAlgError, ValueError, MemoryError) as error:
        failure = f"{type(error).__name__}: {error}"
        log.warning(f"warning: the GP on the latents could not be fitted ({failure}); it is not a candidate")
        return None, failure
    return (latent_gp.to(case.conditions.device), gp_spec), None


def neural_field_candidate(spec, case, config):
    """(a neural field (models.neural_field) fitted on the training designs' fields, its spec); None, said, where
    the nodes' positions are not known."""
    positions = node_positions(read_field_layout(config))
    if positions is None:
        log.info("note: no neural-field conditioner: where the nodes are is not known (grid_shape, mesh_file or "
                 "node_coordinates would let one be tried)")
        return None
    field_spec = dataclasses.replace(spec, kind=NEURAL_FIELD.kind, members=1, gp_points=0,
                                     field_shape=(config.n_steps_used, config.n_nodes_used, config.n_vars))
    fit = SampledFieldFit(passes=config.field_conditioner_epochs)
    sampled = config.n_nodes_used // config.n_vars > fit.nodes
    log.info(f"Training a neural-field conditioner on the fields of the {len(case.fields.train_indices)} training "
             f"designs ({fit.passes} passes, {f'{fit.nodes} random nodes' if sampled else 'every node'} of each time "
             "step) ...")
    began = time.perf_counter()
    field = fit_neural_field(field_spec, positions, case, config, fit)
    log.info(f"The neural field trained in {time.perf_counter() - began:.0f} s")
    return field, field_spec


def fit_neural_field(spec, positions, case, config, fit: SampledFieldFit):
    """A NeuralFieldConditioner fitted (training.field_fitter) on the training designs' scaled fields from their
    standardised parameters: each snapshot's design's parameters and time step -> its field at the sampled nodes. A
    fit of minutes, not checkpointed: a resumed conditioner run fits it again."""
    device = case.conditions.device
    n_steps = spec.field_shape[0]
    train = torch.as_tensor(case.fields.train_indices, device=device)

    def build():
        network = NeuralFieldConditioner(spec).to(device)
        network.field.set_coordinates(positions)
        return network

    def predict(network, snapshots, nodes, _):
        designs, steps = train[snapshots // n_steps], snapshots % n_steps
        return network(case.conditions[designs], None if nodes is None else nodes[:, None], steps[:, None])[:, 0]

    network, _ = fit_sampled_field(build, predict, case.fields.train, len(train), spec.field_shape, fit,
                                   config.batch_size, config.seed, device)
    return network


@torch.no_grad()
def validation_field_errors(networks: dict, case, batch_size: int) -> dict:
    """{name: mean relative L2 error (physical units) of the fields that network predicts for the validation
    designs}, through the surrogate --predict uses, in one pass over their fields, in batches of batch_size or fewer
    when memory is short."""
    val_indices, scaler = case.fields.val_indices, case.fields.scaler
    field_bytes = 4 * int(np.prod(case.fields.array.sample_shape))
    order = list(in_order(len(val_indices), batch_within_memory(batch_size, EVALUATION_COPIES * field_bytes)))
    surrogates = {name: case.surrogate(network).eval() for name, network in networks.items()}
    errors = {name: [] for name in networks}
    for positions, fields in zip(order, case.fields.val.batches(order)):
        designs = torch.as_tensor(val_indices[positions], device=case.conditions.device)
        simulated = scaler.inverse(fields.float().cpu().numpy())
        for name, surrogate in surrogates.items():
            predicted = surrogate.physical(surrogate.scaled(case.conditions[designs]))
            errors[name].append(relative_l2(predicted.cpu().numpy(), simulated))
    return {name: float(np.concatenate(values).mean()) for name, values in errors.items()}
