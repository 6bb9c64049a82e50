"""The latent conditioner's training: from what defines a design (CSV row or geometry image) to the VAE's latents.

Two objectives (use_e2e_training):
- 0: regress the VAE's latents (main + every level), each dimension standardised on the training designs.
- 1 (end to end): condition -> conditioner -> latents -> frozen VAE decoder -> field, trained on the field loss, so
  the conditioner spends its capacity on the latent directions that matter for the field; optionally plus a small
  pull towards the VAE's latents (use_latent_regularization).

The split is the VAE's (model_save/split.json): the VAE's validation designs are the conditioner's, never trained on.
prepare_conditioner_case() gathers what training reads, once the VAE exists (straight after VAE training, or from
model_save/ with --lc_only=1); train_conditioner() runs it in four stages: train the network (the training loop),
choose what is kept (training.conditioner_choice), calibrate its spread, save it.
"""
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.config.settings import check_same_data
from modules.data.batches import in_order, on_device
from modules.data.case import Case
from modules.data.conditions import Conditions
from modules.data.design_inputs import augment_images
from modules.data.scaling import ColumnScaler
from modules.errors import InputError
from modules.machine.processes import shard, sum_over_ranks
from modules.machine.reproducibility import seed_everything
from modules.models.conditioners import CONDITIONERS, ConditionerSpec, build_conditioner, conditioner_label
from modules.models.grad_checkpointing import enable_grad_checkpointing
from modules.models.surrogate import Surrogate
from modules.storage.model_files import CONDITIONER_FORMAT, file_digest, load_model, read_payload, save_conditioner
from modules.storage.model_folder import read_saved_latents, saved_case
from modules.storage.paths import (CONDITIONER_CHECKPOINT, CONDITIONER_FILE, CONDITIONER_LAST, CONDITIONER_NAME,
                                   OUTPUT_DIR)
from modules.storage.runs import note_time
from modules.training.conditioner_choice import choose_conditioner
from modules.training.loop import run_training
from modules.training.losses import field_loss
from modules.training.schedules import lr_factor
from modules.uncertainty.design_range import design_spaces, training_reference
from modules.uncertainty.spread import calibrate_spread, calibration_words

log = logging.getLogger(__name__)


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
    vae_sha256: str                     # of vae_file as read here: what conditioner files and fit checkpoints match
    decoder: Surrogate                  # the frozen VAE with the latent scaling: standardised latents -> fields

    def surrogate(self, conditioner) -> Surrogate:
        """The prediction path through conditioner, on the conditions' device; it reads standardised conditions (as
        self.conditions holds them)."""
        return Surrogate(self.vae, self.fields.scaler, conditioner, self.latent_scaler).to(self.conditions.device)


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
        latent_scaler=latent_scaler, vae=vae, vae_file=vae_file, vae_sha256=file_digest(vae_file),
        decoder=Surrogate(vae, fields.scaler, latent_scaler=latent_scaler).to(runtime.device))


def train_conditioner(config, runtime, case: ConditionerCase, run=None, resume=None):
    """Train the conditioner, from scratch or, with resume (a conditioner checkpoint path checked by
    training.state.read_checkpoint), from where it stood; then, in the main process, choose what is kept, calibrate
    its spread and save it as model_save/latent_conditioner. Returns (the final Progress, the per-epoch log records)
    in the main process, None in the others."""
    began = time.perf_counter()
    job, progress, history = train_network(config, runtime, case, run, resume)
    if not runtime.is_main:
        return None
    network_seconds = time.perf_counter() - began
    choice = choose_conditioner(job.model, job.spec, case, config, resume=resume is not None)
    note_time(run, conditioner_label(job.spec.kind, job.spec.members), network_seconds,
              kept=choice.kept is job.model)
    kept_kind = choice.record["kept"] if choice.record else job.spec.kind
    # a fitted candidate a kept neural field carries; the neural field whose image embedding a kept GP or spline reads
    needed = {(choice.record or {}).get(key) for key in ("spread_from", "embedding_from")}
    for kind, seconds in (choice.record or {}).get("fit_seconds", {}).items():
        note_time(run, conditioner_label(kind), seconds, kept=kind == kept_kind or kind in needed)
    calibration = calibrated_spread(choice.kept, case, config)
    save_conditioner(CONDITIONER_FILE, choice.kept, choice.spec,
                     {**job.facts, "choice": choice.record, "ensemble": choice.ensemble, "calibration": calibration,
                      "design_range": design_reference(choice.kept, case, config)})
    return progress, history


def train_network(config, runtime, case: ConditionerCase, run, resume):
    """The training loop on the conditioner network input_type names (every rank); the main process then reloads
    its best epoch. Returns (the job, the final Progress, the per-epoch log records or None)."""
    seed_everything(config.seed)
    spec = conditioner_spec(config, case)
    job = ConditionerTraining(build_conditioner(spec).to(runtime.device), spec, case, config, runtime)
    if config.grad_checkpointing:
        enable_grad_checkpointing(case.vae)  # end to end, the frozen decoder's activations are in this backward pass
    objective = "end to end through the frozen decoder" if config.use_e2e_training else "latent regression"
    log.info(f"Training the {spec.kind.upper()} conditioner ({objective}) on {len(case.fields.train_indices)} designs, "
             f"validating on {len(case.fields.val_indices)}; {sum(p.numel() for p in job.model.parameters()):,} "
             "parameters")
    progress, history = run_training(job, config, runtime, run, resume)
    if runtime.is_main:
        job.model.load_state_dict(read_payload(CONDITIONER_CHECKPOINT, formats=(CONDITIONER_FORMAT,))["state_dict"])
        log.info(f"Best validation loss {progress.best_val_loss:.4g} at epoch {progress.best_epoch}; that conditioner "
                 "is kept")
    return job, progress, history


def calibrated_spread(kept, case: ConditionerCase, config) -> dict | None:
    """The kept conditioner's spread calibrated on the validation designs (uncertainty.spread; no_spread where its
    draws all equal its prediction); None for a conditioner that predicts the field itself (a neural field, a
    feature-frame GP) and carries no spread (no GP or spline was fitted)."""
    surrogate = case.surrogate(kept)
    if surrogate.decodes_fields and kept.spread is None:
        log.info("note: the conditioner kept predicts the field itself and has no uncertainty model: --samples and "
                 "--suggest need a GP or a spline on the latents fitted beside it (latent_gp 1 or latent_rbf 1)")
        return None
    calibration = calibrate_spread(surrogate, case.conditions, case.fields, config.lc_batch_size, config.seed)
    log.info(("note: no uncertainty: " if calibration.get("no_spread") else "Calibrated the prediction's ")
             + calibration_words(calibration))
    return calibration


def design_reference(network, case: ConditionerCase, config) -> dict:
    """The training designs as --predict compares new ones with them (uncertainty.design_range): standardised
    parameters and their raw range, or the images' pooled pixels and the features of network (the conditioner kept,
    whose features --predict reads)."""
    train = case.fields.train_indices
    reads = config.design_inputs
    spaces = design_spaces(network, reads, case.conditions[train], config.lc_batch_size)
    raw = case.raw_conditions[train] if reads == "parameters" else None
    return training_reference(spaces, train, raw, case.param_names)


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
            "vae_file": str(case.vae_file), "vae_sha256": case.vae_sha256}


class ConditionerTraining:
    """The conditioner as the training loop trains it. Its loss parts are [loss, latent MSE, field loss]."""

    name, watched, chosen_by, log_part, n_parts, divergence_floor = ("conditioner", "loss", "loss", CONDITIONER_NAME, 3,
                                                                      1e-12)
    start_patience = 0  # a network started at random is beaten at once; lc_patience ends a run that stops improving
    best_path, last_path = CONDITIONER_CHECKPOINT, CONDITIONER_LAST
    metrics_file = OUTPUT_DIR / f"{CONDITIONER_NAME}_metrics.csv"

    def __init__(self, model, spec, case: ConditionerCase, config, runtime):
        self.model, self.spec, self.case, self.config, self.runtime = model, spec, case, config, runtime
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

    def batch_loss(self, trainer, batch, step):
        """(loss, detached parts) of a micro-batch; image augmentations draw from the optimiser step's generator."""
        designs, fields = batch
        inputs = self.case.conditions[designs]
        if self.config.design_inputs == "images":
            inputs = augment_images(inputs, bool(self.config.lc_augment_flip), self.config.lc_augment_shift,
                                    step.generator)
        loss, parts = conditioner_loss(trainer, self.case, inputs, designs, fields, self.config, self.runtime)
        return loss, torch.stack([loss.detach(), *parts])

    def averages(self, sums, count: int) -> dict:
        loss, latent_mse, e2e_loss = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
        return {"loss": loss, "latent_mse": latent_mse, "field_loss": e2e_loss}

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

    def finish_epoch(self, epoch: int, train_stats: dict, val_stats: dict) -> dict:
        """The epoch's log record (nothing of the conditioner's follows from its validation)."""
        return {**{f"train/{k}": v for k, v in train_stats.items()}, **{f"val/{k}": v for k, v in val_stats.items()}}

    def report(self, epoch: int, train_stats: dict, val_stats: dict) -> None:
        config = self.config
        every = config.log_every or max(1, config.lc_epochs // 20)
        if (epoch + 1) % every == 0 or epoch + 1 == config.lc_epochs:
            field = f"  val field loss {val_stats['field_loss']:.3g}" if config.use_e2e_training else ""
            log.info(f"conditioner epoch {epoch + 1:>5}/{config.lc_epochs}  train loss {train_stats['loss']:.4g}  "
                     f"val loss {val_stats['loss']:.4g}  val latent MSE {val_stats['latent_mse']:.3g}{field}")

    def save(self, path, training: dict) -> None:
        save_conditioner(path, self.model, self.spec, self.facts, {"training": training})

    def resumable(self, path) -> dict:
        """A conditioner checkpoint's payload, refused if it was trained through another VAE than the current one."""
        payload = read_payload(path, formats=(CONDITIONER_FORMAT,))
        if payload["vae_sha256"] != self.facts["vae_sha256"]:
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
        recon = case.decoder.decoded(predicted.float().flatten(0, 1), decode=not on_codes)     # [K * B, T, M]
    target = case.vae.encode_data(fields) if on_codes else fields
    e2e_loss = field_loss(recon.float().reshape(members, *target.shape), target.expand(members, *target.shape),
                          config.e2e_loss_function, config.huber_delta)
    loss = e2e_loss
    if config.use_latent_regularization:
        loss = loss + config.latent_reg_weight * latent_mse
    return loss, (latent_mse.detach(), e2e_loss.detach())
