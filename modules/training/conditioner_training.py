"""The latent conditioner's training: from what defines a design (CSV row or geometry image) to the VAE's latents.

Two objectives (use_e2e_training):
- 0: regress the VAE's latents (main + every level), each dimension standardised on the training designs.
- 1 (end to end): condition -> conditioner -> latents -> frozen VAE decoder -> field, trained on the field loss, so
  the conditioner spends its capacity on the latent directions that matter for the field; optionally plus a small
  pull towards the VAE's latents (use_latent_regularization).

With parameters, two more candidates are tried once the network is trained, and whichever of the three predicts
the validation designs' fields best is kept: a GP per latent number (latent_gp) and a neural field trained on the
fields themselves (field_conditioner_epochs, where the nodes' positions are known; models.neural_field).

The split is the VAE's (model_save/split.json): the VAE's validation designs are the conditioner's, never trained on.
prepare_conditioner_case() gathers what training reads, once the VAE exists (straight after VAE training, or from
model_save/ with --lc_only=1); train_conditioner() runs the training loop on it and saves the best conditioner.
"""
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.data.batches import in_order, on_device
from modules.data.case import Case, check_same_data, saved_case
from modules.data.conditions import Conditions
from modules.data.design_inputs import augment_images
from modules.data.field_layout import node_positions, read_field_layout
from modules.data.scaling import ColumnScaler
from modules.errors import InputError
from modules.evaluation.metrics import relative_l2
from modules.models.conditioners import (CONDITIONERS, LATENT_GP, NEURAL_FIELD, ConditionerSpec, build_conditioner,
                                         conditioner_label, decodes_fields, predicted_fields)
from modules.models.gaussian_process import GPRConditioner
from modules.models.grad_checkpointing import enable_grad_checkpointing
from modules.models.latents import decode_latents, read_saved_latents
from modules.models.neural_field import NeuralFieldConditioner, sampled_pass
from modules.storage.model_files import CONDITIONER_FORMAT, file_digest, load_model, read_payload, save_conditioner
from modules.storage.paths import (CONDITIONER_CHECKPOINT, CONDITIONER_FILE, CONDITIONER_LAST, CONDITIONER_NAME,
                                   OUTPUT_DIR)
from modules.training.distributed import shard, sum_over_ranks
from modules.training.loop import run_training
from modules.training.losses import field_loss
from modules.training.runtime import EVALUATION_COPIES, batch_within_memory, seed_everything
from modules.training.schedules import lr_factor
from modules.uncertainty.design_range import design_spaces, training_reference
from modules.uncertainty.spread import calibrate_spread, calibration_words

LATENT_GP_MOST_DESIGNS = 1000  # a GP fit costs n^3 per optimiser iteration and latent number: minutes at this n
# The neural-field conditioner's training (bench/spatial_decoders.py's direct model, measured with these)
FIELD_SNAPSHOTS = 64           # (design, time step) pairs a step trains on, drawn at random across the designs
FIELD_NODES = 256              # nodes of each variable a (design, time step) decodes in a pass, at random
FIELD_LR = 1e-3                # Adam's peak learning rate, one-cycle schedule (10 % warm-up)


@dataclass
class ConditionerCase:
    """Everything conditioner training reads."""

    fields: Case                        # the VAE's case: dataset, split, field scaler, field batch sources
    conditions: torch.Tensor            # [N, P] standardised parameters or [N, C, S, S] images, dataset order
    raw_conditions: np.ndarray          # the same before standardisation
    input_scaler: ColumnScaler | None   # parameters only
    channels: int | None                # images only
    param_names: list | None            # the CSV header, if it had one
    targets: torch.Tensor               # [N, D + L*d] standardised VAE latents
    latent_scaler: ColumnScaler
    vae: torch.nn.Module                # frozen, eval mode
    vae_file: Path


def prepare_conditioner_case(config, runtime, conditions: Conditions, vae_file, fields: Case | None = None):
    """The trained VAE (frozen), its standardised latents and the conditions on the device.

    fields: the VAE run's Case when it was just trained in this process; otherwise the data is opened with the
    saved VAE's scaler and split (model_save/scaler in the model file, split.json beside it).
    """
    vae_file = Path(vae_file)
    vae, vae_config, field_scaler = load_model(vae_file, runtime.device)
    check_same_data(config, vae_config, vae_file)
    vae.requires_grad_(False)  # frozen: end-to-end gradients pass through it to the conditioner, never into it
    latents = read_saved_latents(vae_file.parent, vae.spec, config.n_designs)
    if fields is None:
        fields = saved_case(config, runtime, field_scaler, vae_file)
    train_rows = fields.train_indices
    latent_scaler = ColumnScaler.fit(latents[train_rows])
    input_scaler = ColumnScaler.fit(conditions.values[train_rows]) if conditions.channels is None else None
    inputs = conditions.values if input_scaler is None else input_scaler.transform(conditions.values)
    return ConditionerCase(
        fields=fields, conditions=torch.as_tensor(inputs, dtype=torch.float32, device=runtime.device),
        raw_conditions=conditions.values, input_scaler=input_scaler, channels=conditions.channels,
        param_names=conditions.param_names,
        targets=torch.as_tensor(latent_scaler.transform(latents), device=runtime.device),
        latent_scaler=latent_scaler, vae=vae, vae_file=vae_file)


def train_conditioner(config, runtime, case: ConditionerCase, run=None, resume=None, say=print):
    """Train the conditioner, from scratch or, with resume (a conditioner checkpoint path checked by
    training.state.read_checkpoint), from where it stood. Every rank trains; the main process saves the best epoch's
    conditioner as model_save/latent_conditioner and returns (the final Progress, the per-epoch log records); other
    ranks return None."""
    seed_everything(config.seed)
    say = say if runtime.is_main else (lambda text: None)
    spec = conditioner_spec(config, case)
    job = ConditionerTraining(build_conditioner(spec).to(runtime.device), spec, case, config, runtime, say)
    if config.grad_checkpointing:
        enable_grad_checkpointing(case.vae)  # end to end, the frozen decoder's activations are in this backward pass
    objective = "end to end through the frozen decoder" if config.use_e2e_training else "latent regression"
    say(f"Training the {spec.kind.upper()} conditioner ({objective}) on {len(case.fields.train_indices)} designs, "
        f"validating on {len(case.fields.val_indices)}; {sum(p.numel() for p in job.model.parameters()):,} "
        "parameters")
    progress, history = run_training(job, config, runtime, run, say, resume)
    if not runtime.is_main:
        return None
    job.model.load_state_dict(read_payload(CONDITIONER_CHECKPOINT, formats=(CONDITIONER_FORMAT,))["state_dict"])
    say(f"Best validation loss {progress.best_val_loss:.4g} at epoch {progress.best_epoch}; that conditioner is kept")
    kept, kept_spec, choice = job.model, spec, None
    ensemble = ensemble_against_members(job.model, spec, case, config, say) if spec.members > 1 else None
    if CONDITIONERS[config.input_type].reads == "parameters":
        kept, kept_spec, choice = best_on_parameters(job.model, spec, case, config, say)
    if ensemble is not None:
        ensemble["kept"] = kept is job.model
    calibration = None
    if decodes_fields(kept):
        say("note: the neural field has no uncertainty model: --samples and --suggest need one of the other "
            "conditioners (set field_conditioner_epochs 0 to keep one)")
    else:
        calibration = calibrate_spread(kept, case.vae, case.latent_scaler, case.conditions, case.fields,
                                       config.lc_batch_size, config.seed)
        say(f"Calibrated the prediction's {calibration_words(calibration)}")
    save_conditioner(CONDITIONER_FILE, kept, kept_spec,
                     {**job.facts, "choice": choice, "ensemble": ensemble, "calibration": calibration,
                      "design_range": design_reference(job.model, case, config)})
    return progress, history


def ensemble_against_members(ensemble, spec, case: ConditionerCase, config, say) -> dict:
    """Whether the ensemble's mean predicts the validation designs' fields better than its members alone (the
    reports' measure), as plain types; "kept" is added once the choice against the GP is made."""
    networks = {"ensemble": ensemble, **{f"member {i}": member for i, member in enumerate(ensemble.members, 1)}}
    errors = validation_field_errors(networks, case, config.lc_batch_size)
    members = [errors[f"member {i}"] for i in range(1, len(ensemble.members) + 1)]
    label = conditioner_label(spec.kind, spec.members)
    say(f"The {label} predicts the validation designs' fields with a mean relative L2 error of "
        f"{errors['ensemble']:.4%}; its members alone {min(members):.4%} to "
        f"{max(members):.4%} (mean {np.mean(members):.4%})")
    return {"label": label, "members": len(members), "ensemble_val": errors["ensemble"], "members_val": members}


def design_reference(network, case: ConditionerCase, config) -> dict:
    """The training designs as --predict compares new ones with them (uncertainty.design_range): standardised
    parameters and their raw range, or the images' pooled pixels and the network's features."""
    train = case.fields.train_indices
    reads = CONDITIONERS[config.input_type].reads
    spaces = design_spaces(network, reads, case.conditions[train], config.lc_batch_size)
    raw = case.raw_conditions[train] if reads == "parameters" else None
    return training_reference(spaces, train, raw, case.param_names)


def best_on_parameters(network, spec, case: ConditionerCase, config, say):
    """The trained network, a GP per latent number fitted on the same training designs (latent_gp) or a neural field
    trained on their fields (field_conditioner_epochs), whichever predicts the validation designs' fields best:
    (the one kept, its spec, the choice made and why, as plain types; None when the network was the only
    candidate). Compared by the reports' measure, the mean relative L2 error of a design's whole field in physical
    units, in one pass over the validation designs' fields."""
    candidates, choice = {spec.kind: (network, spec)}, {}
    if config.latent_gp:
        fitted, failure = latent_gp_candidate(spec, case, config, say)
        if fitted is not None:
            candidates[LATENT_GP.kind] = fitted
        if failure is not None:
            choice["gp_failed"] = failure
    if config.field_conditioner_epochs:
        field = neural_field_candidate(spec, case, config, say)
        if field is not None:
            candidates[NEURAL_FIELD.kind] = field
    if len(candidates) == 1:
        return network, spec, {"kept": spec.kind, **choice} if choice else None
    errors = validation_field_errors({kind: model for kind, (model, _) in candidates.items()}, case,
                                     config.lc_batch_size)
    kept = min(errors, key=errors.get)
    labels = {kind: conditioner_label(kind, its_spec.members) for kind, (_, its_spec) in candidates.items()}
    others = " and ".join(f"{errors[kind]:.4%} for the {labels[kind]}" for kind in errors if kind != kept)
    say(f"Kept the {labels[kept]} as the conditioner: it predicts the validation designs' fields with a mean relative "
        f"L2 error of {errors[kept]:.4%} against {others}")
    return (*candidates[kept], {**choice, "kept": kept, "validation_relative_l2": errors})


def latent_gp_candidate(spec, case: ConditionerCase, config, say):
    """((a GP per latent number fitted on the training designs, its spec), None); (None, None), said, where there are
    too many designs for a GP; (None, the error's text), warned, where the fit fails (the trained network is still a
    conditioner). A GP takes seconds to fit for a few hundred designs."""
    train = case.fields.train_indices
    if len(train) > LATENT_GP_MOST_DESIGNS:
        say(f"note: no GP on the latents: {len(train)} training designs are more than the "
            f"{LATENT_GP_MOST_DESIGNS} a GP fit handles in minutes")
        return None, None
    gp_spec = dataclasses.replace(spec, kind=LATENT_GP.kind, gp_points=len(train), members=1)
    say(f"Fitting a Gaussian process per latent number ({spec.output_dim}) on the {len(train)} training designs ...")
    try:
        latent_gp = GPRConditioner(gp_spec).fit(case.conditions[train].double().cpu().numpy(),
                                                case.targets[train].double().cpu().numpy(), config.seed)
    except (np.linalg.LinAlgError, ValueError, MemoryError) as error:
        failure = f"{type(error).__name__}: {error}"
        say(f"warning: the GP on the latents could not be fitted ({failure}); it is not a candidate")
        return None, failure
    return (latent_gp.to(case.conditions.device), gp_spec), None


def neural_field_candidate(spec, case: ConditionerCase, config, say):
    """(a neural field (models.neural_field) trained on the training designs' fields, its spec); None, said, where
    the nodes' positions are not known."""
    positions = node_positions(read_field_layout(config))
    if positions is None:
        say("note: no neural-field conditioner: where the nodes are is not known (grid_shape, mesh_file or "
            "node_coordinates would let one be tried)")
        return None
    field_spec = dataclasses.replace(spec, kind=NEURAL_FIELD.kind, members=1, gp_points=0,
                                     field_shape=(config.n_steps_used, config.n_nodes_used, config.n_vars))
    sampled = config.n_nodes_used // config.n_vars > FIELD_NODES
    say(f"Training a neural-field conditioner on the fields of the {len(case.fields.train_indices)} training "
        f"designs ({config.field_conditioner_epochs} passes, "
        f"{f'{FIELD_NODES} random nodes' if sampled else 'every node'} of each time step) ...")
    began = time.perf_counter()
    field = train_neural_field(field_spec, positions, case, config)
    say(f"The neural field trained in {time.perf_counter() - began:.0f} s")
    return field, field_spec


def train_neural_field(spec, positions, case: ConditionerCase, config):
    """A NeuralFieldConditioner trained on the training designs' scaled fields from their standardised parameters
    (bench/spatial_decoders.py's direct model): field_conditioner_epochs passes over the N x T training snapshots,
    each step on FIELD_SNAPSHOTS of them drawn at random across the designs, mean squared error, Adam with a
    one-cycle schedule; the network's output is standardised by the first pass's values (set_value_statistics).
    Each pass first reads every training design once (neural_field.sampled_pass) and keeps FIELD_NODES random nodes
    of each variable of every snapshot: steps then mix designs without reading a design per snapshot (steps on one
    design's time steps measured 2x worse on the pulse). Repeatable for a seed; a fit of minutes, so it is not
    checkpointed: a resumed conditioner run fits it again."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = case.conditions.device
    network = NeuralFieldConditioner(spec).to(device)
    network.field.set_coordinates(positions)
    n_steps = spec.field_shape[0]
    train = torch.as_tensor(case.fields.train_indices, device=device)
    snapshots = len(train) * n_steps
    optimiser = torch.optim.Adam(network.parameters(), FIELD_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, FIELD_LR, pct_start=0.1,
                                                   total_steps=config.field_conditioner_epochs *
                                                   math.ceil(snapshots / FIELD_SNAPSHOTS))
    network.train()
    for index in range(config.field_conditioner_epochs):
        nodes, values, _ = sampled_pass(case.fields.train, len(train), spec.field_shape, FIELD_NODES,
                                        config.batch_size, generator, device)
        if index == 0:
            network.field.set_value_statistics(values)
        for batch in torch.randperm(snapshots, generator=generator).to(device).split(FIELD_SNAPSHOTS):
            designs, steps = train[batch // n_steps], batch % n_steps
            predicted = network(case.conditions[designs], None if nodes is None else nodes[batch, None],
                                steps[:, None])
            loss = F.mse_loss(predicted[:, 0], values[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    return network.eval()


@torch.no_grad()
def validation_field_errors(networks: dict, case: ConditionerCase, batch_size: int) -> dict:
    """{name: mean relative L2 error (physical units) of the fields that network predicts for the validation
    designs}, in one pass over their fields, in batches of batch_size or fewer when memory is short."""
    val_indices, scaler = case.fields.val_indices, case.fields.scaler
    field_bytes = 4 * int(np.prod(case.fields.array.sample_shape))
    order = list(in_order(len(val_indices), batch_within_memory(batch_size, EVALUATION_COPIES * field_bytes)))
    errors = {name: [] for name in networks}
    for positions, fields in zip(order, case.fields.val.batches(order)):
        designs = torch.as_tensor(val_indices[positions], device=case.conditions.device)
        simulated = scaler.inverse(fields.float().cpu().numpy())
        for name, network in networks.items():
            network.eval()
            recon = predicted_fields(network, case.vae, case.latent_scaler, case.conditions[designs])
            errors[name].append(relative_l2(scaler.inverse(recon.float().cpu().numpy()), simulated))
    return {name: float(np.concatenate(values).mean()) for name, values in errors.items()}


def conditioner_spec(config, case: ConditionerCase) -> ConditionerSpec:
    return ConditionerSpec(kind=CONDITIONERS[config.input_type].kind, input_shape=tuple(case.conditions.shape[1:]),
                           output_dim=case.targets.shape[1], filters=config.conditioner_filters,
                           dropout=config.lc_dropout, spatial_attention=bool(config.use_spatial_attention),
                           vit_patch_size=config.vit_patch_size, vit_dim=config.vit_dim, vit_depth=config.vit_depth,
                           vit_heads=config.vit_heads, vit_drop_path=config.vit_drop_path, members=config.lc_ensemble)


def conditioner_facts(config, case: ConditionerCase) -> dict:
    """The plain facts a prediction needs besides the weights."""
    return {"config": config.to_dict(), "latent_scaler": case.latent_scaler.to_dict(),
            "input_scaler": None if case.input_scaler is None else case.input_scaler.to_dict(),
            "channels": case.channels, "param_names": case.param_names,
            "vae_file": str(case.vae_file), "vae_sha256": file_digest(case.vae_file)}


class ConditionerTraining:
    """The conditioner as the training loop trains it. Its loss parts are [loss, latent MSE, field loss]."""

    name, watched, log_part, n_parts, divergence_floor = "conditioner", "loss", CONDITIONER_NAME, 3, 1e-12
    best_path, last_path = CONDITIONER_CHECKPOINT, CONDITIONER_LAST
    metrics_file = OUTPUT_DIR / f"{CONDITIONER_NAME}_metrics.csv"

    def __init__(self, model, spec, case: ConditionerCase, config, runtime, say):
        self.model, self.spec, self.case, self.config, self.runtime, self.say = model, spec, case, config, runtime, say
        self.epochs, self.patience, self.batch_size = config.lc_epochs, config.lc_patience, config.lc_batch_size
        self.peak_lr, self.weight_decay = config.lc_lr, config.lc_weight_decay
        self.n_train = len(case.fields.train_indices)
        self.facts = conditioner_facts(config, case)

    def learning_rate(self, position: float) -> float:
        config = self.config
        return config.lc_lr * lr_factor(position, config.lc_epochs, config.warmup_fraction, 1,
                                        min(1.0, config.lr_min / config.lc_lr))

    def training_batches(self, epoch: int, micro_batches):
        """(dataset indices on the conditions' device, scaled fields [b, T, M] or None) per micro-batch."""
        train_indices = self.case.fields.train_indices
        designs = on_device([train_indices[positions] for positions, _ in micro_batches], self.case.conditions.device)
        return zip(designs, field_batches(self.case.fields.train, micro_batches, self.config))

    def batch_loss(self, trainer, batch, generator):
        """(loss, detached parts) of a micro-batch; image augmentations draw from the optimiser step's generator."""
        designs, fields = batch
        inputs = self.case.conditions[designs]
        if CONDITIONERS[self.config.input_type].reads == "images":
            inputs = augment_images(inputs, bool(self.config.lc_augment_flip), self.config.lc_augment_shift,
                                    generator)
        loss, parts = conditioner_loss(trainer, self.case, inputs, designs, fields, self.config, self.runtime)
        return loss, torch.stack([loss.detach(), *parts])

    def averages(self, sums, count: int) -> dict:
        loss, latent_mse, e2e_loss = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
        return {"loss": loss, "latent_mse": latent_mse, "field_loss": e2e_loss}

    def after_epoch(self, train_stats: dict, val_stats: dict) -> None:
        """Nothing to update between epochs (the training loop's contract)."""

    @torch.no_grad()
    def validate(self) -> dict:
        """The training objective on the validation designs (no dropout, no augmentation), sharded over ranks."""
        case, config, runtime = self.case, self.config, self.runtime
        self.model.eval()
        val_indices = case.fields.val_indices
        shards = [(p, w) for p, w in (shard(p, runtime) for p in in_order(len(val_indices), config.lc_batch_size))
                  if w]
        sums = torch.zeros(3, device=runtime.device)
        batch_designs = on_device([val_indices[positions] for positions, _ in shards], case.conditions.device)
        for (positions, _), designs, fields in zip(shards, batch_designs, field_batches(case.fields.val, shards,
                                                                                        config)):
            loss, parts = conditioner_loss(self.model, case, case.conditions[designs], designs, fields, config,
                                           runtime)
            sums += torch.stack([loss, *parts]) * len(positions)
        return self.averages(sum_over_ranks(sums, runtime), len(val_indices))

    def record(self, epoch: int, train_stats: dict, val_stats: dict) -> dict:
        return {**{f"train/{k}": v for k, v in train_stats.items()}, **{f"val/{k}": v for k, v in val_stats.items()}}

    def report(self, epoch: int, train_stats: dict, val_stats: dict) -> None:
        config = self.config
        every = config.log_every or max(1, config.lc_epochs // 20)
        if (epoch + 1) % every == 0 or epoch + 1 == config.lc_epochs:
            field = f"  val field loss {val_stats['field_loss']:.3g}" if config.use_e2e_training else ""
            self.say(f"conditioner epoch {epoch + 1:>5}/{config.lc_epochs}  train loss {train_stats['loss']:.4g}  "
                     f"val loss {val_stats['loss']:.4g}  val latent MSE {val_stats['latent_mse']:.3g}{field}")

    def save(self, path, training: dict) -> None:
        save_conditioner(path, self.model, self.spec, self.facts, {"training": training})

    def resumable(self, path) -> dict:
        """A conditioner checkpoint's payload, refused if it was trained through another VAE than the current one."""
        payload = read_payload(path, formats=(CONDITIONER_FORMAT,))
        if payload.get("vae_sha256") != self.facts["vae_sha256"]:
            raise InputError(path, f"was trained through another VAE than {self.case.vae_file} holds now",
                             "start the conditioner afresh without --resume")
        return payload


def field_batches(source, shards, config):
    """The scaled fields of each shard when the objective needs them (end to end), else nothing is read."""
    if config.use_e2e_training:
        return source.batches([positions for positions, _ in shards])
    return itertools.repeat(None)


def conditioner_loss(model, case: ConditionerCase, inputs, designs, fields, config, runtime):
    """(objective, (latent MSE, field loss)) of one batch, forward passes under the run's autocast, losses in
    float32. fields: scaled [B, T, M] (end to end) or None; without end-to-end training the field loss part is
    reported as 0 (not computed). An ensemble's losses are the means of its members' own losses: each member is
    fitted on its own, never through the others' mean."""
    with runtime.autocast():
        predicted = model(inputs, every_member=True) if config.lc_ensemble > 1 else model(inputs)[None]  # [K, B, D]
    members = len(predicted)
    latent_mse = F.mse_loss(predicted.float(), case.targets[designs].expand_as(predicted))
    if not config.use_e2e_training:
        return latent_mse, (latent_mse.detach(), torch.zeros((), device=predicted.device))
    # a VAE on snapshot codes is trained end to end on the codes, as the VAE itself was: decoding every node with
    # gradients would cost the neural field's whole decode per design and step
    on_codes = case.vae.codec is not None
    with runtime.autocast():
        recon = decode_latents(case.vae, case.latent_scaler, predicted.float().flatten(0, 1),   # [K * B, T, M]
                               decode=not on_codes)
    target = case.vae.encode_data(fields) if on_codes else fields
    e2e_loss = field_loss(recon.float().reshape(members, *target.shape), target.expand(members, *target.shape),
                          config.e2e_loss_function, config.huber_delta)
    loss = e2e_loss
    if config.use_latent_regularization:
        loss = loss + config.latent_reg_weight * latent_mse
    return loss, (latent_mse.detach(), e2e_loss.detach())
