"""Which conditioner is kept once the network is trained: the one that predicts the validation designs' fields best,
by the reports' measure (the mean relative L2 error of a design's whole field in physical units).

Four more candidates are tried beside the trained network: a neural field trained on the training designs' fields
themselves (field_conditioner_epochs, where the nodes' positions are known; models.neural_field, fitted by
training.field_fitter), on a grid a GP per number of each time step's feature frame and of the field in it
(feature_frame_gp; models.feature_frame, fitted by training.feature_frame_fit), a GP per latent number (latent_gp;
models.gaussian_process) and a thin-plate spline through the latents (latent_rbf; models.radial_basis). On
parameters the GPs and the spline are fitted first (with the VAE at its POD start the latent ones are the POD + GPR
and POD + RBF surrogates), so a neural field that loses to them by a wide margin is ended early. On images the
neural field comes first: it trains the image encoder (models.image_embedding) on whose embedding the GP and the
spline are then fitted. An ensemble is also set against its own members. Every candidate
is scored through the same models.surrogate.Surrogate that --predict uses, in one pass over the validation designs'
fields."""
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
from modules.models.conditioners import (FEATURE_FRAME, LATENT_GP, LATENT_RBF, NEURAL_FIELD, ConditionerSpec,
                                         conditioner_label)
from modules.models.image_embedding import fitted_model
from modules.models.neural_field import FRAME, SHIFT, NeuralFieldConditioner
from modules.storage.paths import FIELD_FIT_CHECKPOINT
from modules.training.feature_frame_fit import fit_feature_frame
from modules.training.field_fitter import FitCheckpoint, SampledFieldFit, fit_sampled_field

log = logging.getLogger(__name__)

# A neural field is scored a CHECK_SHARE of the way through its passes and ended where it predicts the validation
# designs more than LOSING_MARGIN times worse than the best other candidate (docs/model.md: how far its error falls
# after that point on the benchmark's cases)
CHECK_SHARE = 0.25
LOSING_MARGIN = 10.0
# the fitted candidates: {kind: (the most training designs it is fitted on, fit(model, inputs, targets, seed))}. A GP
# fit costs n^3 per optimiser iteration and latent number: minutes at 1000 designs; a spline one dense solve of
# n x n, a minute at 4000
FITTED = {LATENT_GP.kind: (1000, lambda model, inputs, targets, seed: model.fit(inputs, targets, seed)),
          LATENT_RBF.kind: (4000, lambda model, inputs, targets, _: model.fit(inputs, targets))}
# float32 copies of its field one design takes in the comparison, without gradients: the batch, the decoder's
# activations, the prediction scaled and in physical units, the simulated field and the error
EVALUATION_COPIES = 8
# designs whose snapshots an optimiser step of a neural field on images draws from: each distinct design costs an
# encoder pass (a CNN's on 64 x 64 images is most of a step), so a step holds 64 snapshots of 16 designs, not of ~50
IMAGE_DESIGNS_PER_STEP = 16


@dataclass(frozen=True)
class Choice:
    """The conditioner kept and why, as the conditioner file records it."""

    kept: torch.nn.Module
    spec: ConditionerSpec
    record: dict | None     # the candidates' validation errors, fit times and which was kept (None: the network
                            # was alone)
    ensemble: dict | None   # an ensemble against its members (None: a single network)


def choose_conditioner(network, spec: ConditionerSpec, case, config, resume: bool = False) -> Choice:
    """The trained network, or the candidate that predicts the validation designs better (best_candidate). resume: a
    neural field's fit continues from its checkpoint (FIELD_FIT_CHECKPOINT) where that matches."""
    ensemble = ensemble_against_members(network, spec, case, config) if spec.members > 1 else None
    kept, kept_spec, record = best_candidate(network, spec, case, config, resume)
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


def best_candidate(network, spec, case, config, resume: bool = False):
    """The trained network, a neural field (field_conditioner_epochs), a GP per latent number (latent_gp) or a
    thin-plate spline of the latents (latent_rbf), whichever predicts the validation designs' fields best: (the one
    kept, its spec, the choice made and why, as plain types; None when the network was the only candidate). On
    parameters the candidates on latents are scored first, so a neural field that loses to the best of them by a wide
    margin a quarter of the way through its fit is ended there (neural_field_candidate); on images they are fitted on
    the neural field's image embedding, so after it, and not at all where it was not fitted."""
    on_images = config.design_inputs == "images"
    candidates, record, seconds = {spec.kind: (network, spec)}, {}, {}
    if not on_images:
        fit_latent_candidates(candidates, record, seconds, spec, case, config)
        if config.feature_frame_gp and config.grid:
            fit_frame_candidate(candidates, record, seconds, spec, case, config)
    errors, field = {}, None
    if config.field_conditioner_epochs:
        errors = validation_field_errors({kind: model for kind, (model, _) in candidates.items()}, case,
                                         config.lc_batch_size)
        began = time.perf_counter()
        field, stopped = neural_field_candidate(spec, case, config, errors, resume)
        if field is not None or stopped is not None:
            seconds[NEURAL_FIELD.kind] = time.perf_counter() - began
        if field is not None:
            candidates[NEURAL_FIELD.kind] = field
            errors.update(validation_field_errors({NEURAL_FIELD.kind: field[0]}, case, config.lc_batch_size))
        if stopped is not None:
            record["neural_field_stopped"] = stopped
    if on_images and field is not None:
        fitted = fit_latent_candidates(candidates, record, seconds, spec, case, config, field[0].encoder)
        if fitted:
            errors.update(validation_field_errors({kind: candidates[kind][0] for kind in fitted}, case,
                                                  config.lc_batch_size))
    elif on_images and (config.latent_gp or config.latent_rbf) and len(candidates) == 1:
        log.info("note: no GP or spline on the latents: on images they are fitted on the neural field's image "
                 "embedding, and no neural field was fitted")
    if seconds:  # what each candidate beside the network cost, kept or not (reports' time spent)
        record["fit_seconds"] = {kind: round(value, 3) for kind, value in seconds.items()}
    if len(candidates) == 1:
        return network, spec, {"kept": spec.kind, **record} if record else None
    if not errors:
        errors = validation_field_errors({kind: model for kind, (model, _) in candidates.items()}, case,
                                         config.lc_batch_size)
    kept = min(errors, key=errors.get)
    labels = {kind: conditioner_label(kind, its_spec.members) for kind, (_, its_spec) in candidates.items()}
    others = " and ".join(f"{as_percent(errors[kind])} for the {labels[kind]}" for kind in errors if kind != kept)
    log.info(f"Kept the {labels[kept]} as the conditioner: it predicts the validation designs' fields with a mean "
             f"relative L2 error of {as_percent(errors[kept])} against {others}")
    model, kept_spec = candidates[kept]
    if kept in (NEURAL_FIELD.kind, FEATURE_FRAME.kind):
        model, kept_spec, record["spread_from"] = with_spread(model, kept_spec, candidates, errors)
    elif kept_spec.encoder:  # a GP or spline on the neural field's image embedding: that fit made it
        record["embedding_from"] = NEURAL_FIELD.kind
    return model, kept_spec, {**record, "kept": kept, "validation_relative_l2": errors}


def fit_latent_candidates(candidates: dict, record: dict, seconds: dict, spec, case, config, encoder=None) -> list:
    """Fit the GP (latent_gp) and the spline (latent_rbf) the config asks for, on parameters or, with encoder (a
    trained neural field's ImageEncoder), on its embedding of the images; each one fitted is added to candidates
    ({kind: (model, spec)}), its fit time to seconds, a failure to record. Returns the kinds fitted."""
    fitted = []
    for wanted, kind, failed in ((config.latent_gp, LATENT_GP.kind, "gp_failed"),
                                 (config.latent_rbf, LATENT_RBF.kind, "rbf_failed")):
        if not wanted:
            continue
        began = time.perf_counter()
        model, failure = fitted_candidate(kind, spec, case, config, encoder)
        seconds[kind] = time.perf_counter() - began
        if model is not None:
            candidates[kind] = model
            fitted.append(kind)
        if failure is not None:
            record[failed] = failure
    return fitted


def with_spread(field, field_spec, candidates: dict, errors: dict):
    """(the conditioner that predicts the field itself (a neural field, a feature-frame GP) carrying the fitted
    candidate on the latents that predicted the validation designs best (models.carried_spread: its spread stands in
    for the field's), its spec, that candidate's kind); the field as it is, its spec and None, said, where no GP or
    spline was fitted."""
    fitted = [kind for kind in (LATENT_GP.kind, LATENT_RBF.kind) if kind in candidates]  # each has a spread
    label = conditioner_label(field_spec.kind)
    if not fitted:
        log.info(f"note: the {label} kept has no uncertainty model: no GP or spline on the latents was fitted "
                 "beside it (latent_gp 1 or latent_rbf 1 gives it one)")
        return field, field_spec, None
    source = min(fitted, key=errors.get)
    model, spec = candidates[source]
    field.spread = model
    log.info(f"The {label}'s uncertainty: the spread of the latents of the {conditioner_label(source)}, "
             "decoded around its prediction (calibrated on its own errors below)")
    return field, dataclasses.replace(field_spec, spread_kind=source, gp_points=spec.gp_points), source


def fit_frame_candidate(candidates: dict, record: dict, seconds: dict, spec, case, config) -> None:
    """Fit the feature-frame GP (feature_frame_gp; training.feature_frame_fit) on the training designs' fields, on
    the CPU, and add it to candidates ({kind: (model, spec)}), its fit time to seconds and a failure to record (the
    other candidates remain); not where there are more training designs than a GP's fit is made for, said."""
    train = case.fields.train_indices
    most = FITTED[LATENT_GP.kind][0]
    if len(train) > most:
        log.info(f"note: no feature-frame GP: {len(train)} training designs are more than the {most} its fit is made "
                 "for")
        return
    began = time.perf_counter()
    try:
        model, frame_spec = fit_feature_frame(spec, case, config)
    except (np.linalg.LinAlgError, ValueError, MemoryError) as error:
        record["frame_failed"] = f"{type(error).__name__}: {error}"
        log.warning(f"warning: the feature-frame GP could not be fitted ({record['frame_failed']}); it is not a "
                    "candidate")
        model = None
    seconds[FEATURE_FRAME.kind] = time.perf_counter() - began
    if model is not None:
        candidates[FEATURE_FRAME.kind] = (model.to(case.conditions.device), frame_spec)


def fitted_candidate(kind: str, spec, case, config, encoder=None):
    """((the GP per latent number (latent_gp) or the thin-plate spline (latent_rbf) fitted on the training designs'
    latents, from their parameters or, with encoder, from its embedding of their images; its spec), None); (None,
    None), said, where there are more training designs than its fit is made for; (None, the error's text), warned,
    where the fit fails (the other candidates remain)."""
    train = case.fields.train_indices
    most, fit = FITTED[kind]
    label = conditioner_label(kind)
    if len(train) > most:
        log.info(f"note: no {label}: {len(train)} training designs are more than the {most} its fit is made for")
        return None, None
    fitted_spec = dataclasses.replace(spec, kind=kind, gp_points=len(train), members=1,
                                      encoder=spec.kind if encoder is not None else "")
    reads = "the neural field's embedding of their images" if encoder is not None else "their parameters"
    log.info(f"Fitting the {label} ({spec.output_dim} latent numbers) on the {len(train)} training designs, from "
             f"{reads} ...")
    targets = case.targets[train].double().cpu().numpy()
    try:  # fitted on the CPU, then moved: what the device recomputes from the buffers, --predict recomputes too
        model = fitted_model(fitted_spec)
        if encoder is None:
            fit(model, case.conditions[train].double().cpu().numpy(), targets, config.seed)
        else:
            model.fit(encoder, case.conditions[train].cpu(), targets, config.seed, fit)
    except (np.linalg.LinAlgError, ValueError, MemoryError) as error:
        failure = f"{type(error).__name__}: {error}"
        log.warning(f"warning: the {label} could not be fitted ({failure}); it is not a candidate")
        return None, failure
    return (model.to(case.conditions.device), fitted_spec), None


def neural_field_candidate(spec, case, config, rivals: dict, resume: bool = False):
    """((a neural field (models.neural_field) fitted on the training designs' fields, its spec) or None, what was
    stopped or None): None, said, where the nodes' positions are not known; the fit ended early, said and recorded
    (its passes, its error and the best rival's), where a quarter of the way through it predicts the validation designs
    more than LOSING_MARGIN times worse than the best of rivals ({kind: validation error} of the other candidates).
    The fit is saved after every pass (FIELD_FIT_CHECKPOINT) and, with resume, continued from there."""
    positions = node_positions(read_field_layout(config))
    if positions is None:
        log.info("note: no neural-field conditioner: where the nodes are is not known (grid_shape, mesh_file or "
                 "node_coordinates would let one be tried)")
        return None, None
    on_images = config.design_inputs == "images"
    field_spec = dataclasses.replace(spec, kind=NEURAL_FIELD.kind, members=1, gp_points=0,
                                     field_shape=(config.n_steps_used, config.n_nodes_used, config.n_vars),
                                     encoder=spec.kind if on_images else "",
                                     field_modulation=SHIFT if on_images else FRAME)  # docs/model.md says why
    passes = config.field_conditioner_epochs
    fit = SampledFieldFit(passes=passes, check_after=max(1, round(CHECK_SHARE * passes)) if rivals else 0,
                          designs_per_step=IMAGE_DESIGNS_PER_STEP if on_images else 0)
    sampled = config.n_nodes_used // config.n_vars > fit.nodes
    reads = f"their images through a {spec.kind.upper()} encoder" if on_images else "their parameters"
    log.info(f"Training a neural-field conditioner on the fields of the {len(case.fields.train_indices)} training "
             f"designs, from {reads} ({fit.passes} passes, {f'{fit.nodes} random nodes' if sampled else 'every node'} "
             "of each time step) ...")
    began, measured = time.perf_counter(), {}

    def losing(network, _):
        measured["error"] = validation_field_errors({NEURAL_FIELD.kind: network}, case, config.lc_batch_size)[
            NEURAL_FIELD.kind]
        best = min(rivals, key=rivals.get)
        measured.update(best=best, best_error=rivals[best])
        verdict = measured["error"] > LOSING_MARGIN * rivals[best]
        log.info(f"The neural field after {fit.check_after} of {fit.passes} passes predicts the validation designs "
                 f"with a mean relative L2 error of {as_percent(measured['error'])}, the {conditioner_label(best)} "
                 f"with {as_percent(rivals[best])}: " + (f"more than {LOSING_MARGIN:g} times worse, it is stopped "
                                                         "and not a candidate" if verdict else "going on"))
        return verdict

    checkpoint = FitCheckpoint(FIELD_FIT_CHECKPOINT, {
        "spec": field_spec.to_dict(), "seed": config.seed, "passes": fit.passes, "check_after": fit.check_after,
        "vae_sha256": case.vae_sha256,
        "train_indices": [int(i) for i in case.fields.train_indices]}, resume)
    field, stopped_after = fit_neural_field(field_spec, positions, case, config, fit, losing, checkpoint)
    if stopped_after is not None:
        return None, {"passes": stopped_after, "of": fit.passes, "validation_relative_l2": measured["error"],
                      "best_rival": measured["best"], "best_rival_validation_relative_l2": measured["best_error"]}
    log.info(f"The neural field trained in {time.perf_counter() - began:.0f} s")
    return (field, field_spec), None


def fit_neural_field(spec, positions, case, config, fit: SampledFieldFit, losing=None, checkpoint=None):
    """(a NeuralFieldConditioner fitted (training.field_fitter) on the training designs' scaled fields from their
    standardised parameters or images: each snapshot's design's inputs and time step -> its field at the sampled nodes,
    the passes made where losing (field_fitter's) ended the fit, else None). A fit of minutes, saved after every
    pass with checkpoint (field_fitter.FitCheckpoint)."""
    device = case.conditions.device
    n_steps = spec.field_shape[0]
    train = torch.as_tensor(case.fields.train_indices, device=device)

    def build():
        network = NeuralFieldConditioner(spec).to(device)
        network.field.set_coordinates(positions)
        return network

    def predict(network, snapshots, nodes, _):
        designs, steps = train[snapshots // n_steps], snapshots % n_steps
        if network.encoder is None:
            numbers = case.conditions[designs]
        else:  # each design's image encoded once, however many of its time steps the step holds
            distinct, which = designs.unique(return_inverse=True)
            numbers = network.encoder(case.conditions[distinct])[which]
        return network.from_numbers(numbers, None if nodes is None else nodes[:, None], steps[:, None])[:, 0]

    network, _, stopped_after = fit_sampled_field(build, predict, case.fields.train, len(train), spec.field_shape, fit,
                                                  config.batch_size, config.seed, device, losing=losing,
                                                  checkpoint=checkpoint)
    return network, stopped_after


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
