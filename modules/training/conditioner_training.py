"""Train the latent conditioner: from what defines a design (CSV row or geometry image) to the VAE's latents.

Two objectives (use_e2e_training):
- 0: regress the VAE's latents (main + every level), each dimension standardised on the training designs.
- 1 (end to end): condition -> conditioner -> latents -> frozen VAE decoder -> field, trained on the field loss, so
  the conditioner spends its capacity on the latent directions that matter for the field; optionally plus a small
  pull towards the VAE's latents (use_latent_regularization).

The split is the VAE's (model_save/split.json): the VAE's validation designs are the conditioner's, never trained on.
Read top to bottom: train_conditioner() is the whole run.
"""
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules.evaluation import prediction_report
from modules.storage.model_files import CONDITIONER_FORMAT, file_digest, read_payload, save_conditioner
from modules.models.conditioners import ConditionerSpec, build_conditioner
from modules.data.batches import in_order, on_device
from modules.data.design_inputs import augment_images
from modules.training.distributed import shard, sum_over_ranks
from modules.training.loop import EpochResult, Task, run_epochs, starting_sums
from modules.errors import InputError
from modules.models.latents import decode_latents
from modules.storage.paths import CONDITIONER_CHECKPOINT, CONDITIONER_FILE, CONDITIONER_LAST, CONDITIONER_NAME, OUTPUT_DIR
from modules.models.grad_checkpointing import enable_recompute
from modules.storage.metrics_log import RunLog
from modules.training.runtime import seed_everything
from modules.data.scaling import ColumnScaler
from modules.training.schedules import lr_factor
from modules.training.state import Progress, restore_training, training_entry
from modules.training.optimizer_step import Updater, make_optimizer, optimiser_steps, training_module

NETWORK_OF_INPUT = {"csv": "mlp", "image": "cnn", "image_vit": "vit"}


@dataclass
class ConditionerCase:
    """Everything conditioner training reads; built by modules/conditioner_case.py."""

    fields: object                      # the VAE's Case: dataset, split, field scaler, field batch sources
    conditions: torch.Tensor            # [N, P] standardised parameters or [N, C, S, S] images, dataset order
    raw_conditions: np.ndarray          # the same before standardisation (the nearest-neighbour baseline uses it)
    input_scaler: ColumnScaler | None   # parameters only
    channels: int | None                # images only
    param_names: list | None            # the CSV header, if it had one
    targets: torch.Tensor               # [N, D + L*d] standardised VAE latents
    latent_scaler: ColumnScaler
    vae: torch.nn.Module                # frozen, eval mode
    vae_file: Path


def train_conditioner(config, runtime, case: ConditionerCase, run=None, resume=None, say=print):
    """Full conditioner run, from scratch or, with resume (a conditioner checkpoint path checked by
    training_state.read_checkpoint), from where it stood. Every rank trains; rank 0 writes the model, logs and the
    prediction report (TensorBoard events in the run record's folder) and returns the report with the best validation
    loss and its epoch; other ranks return None."""
    seed_everything(config.seed)
    say = say if runtime.is_main else (lambda text: None)
    spec = conditioner_spec(config, case)
    model = build_conditioner(spec).to(runtime.device)
    trainer = training_module(model, config, runtime)
    optimizer = make_optimizer(model.parameters(), config.lc_lr, config.lc_weight_decay)
    updater = Updater(trainer, optimizer, runtime, config.grad_clip)
    if config.grad_checkpointing:
        enable_recompute(case.vae)  # end to end, the frozen decoder's activations are part of this backward pass
    task = conditioner_task(model, trainer, updater, spec, case, config, runtime, say)
    progress = task.restore(resume) if resume else Progress()
    if run is not None:
        progress = dataclasses.replace(progress, run_id=run.id)
    objective = "end to end through the frozen decoder" if config.use_e2e_training else "latent regression"
    say(f"Training the {spec.kind.upper()} conditioner ({objective}) on {len(case.fields.train_indices)} designs, "
        f"validating on {len(case.fields.val_indices)}; {sum(p.numel() for p in model.parameters()):,} parameters")
    if resume:
        say(f"Resuming from {resume}: epoch {progress.epoch}" + (f", step {progress.step}" if progress.step else ""))
    log = RunLog(OUTPUT_DIR / f"{CONDITIONER_NAME}_metrics.csv", run.log_dir(CONDITIONER_NAME),
                 progress.history) if runtime.is_main else None
    progress = run_epochs(task, progress, config, runtime, log, say)
    if not runtime.is_main:
        return None
    log.close()
    model.load_state_dict(read_payload(CONDITIONER_CHECKPOINT, formats=(CONDITIONER_FORMAT,))["state_dict"])
    say(f"Best validation loss {progress.best_val_loss:.4g} at epoch {progress.best_epoch}; that conditioner is kept")
    save_conditioner(CONDITIONER_FILE, model, spec, about(config, case))
    report = prediction_report.evaluate_and_write(model, case, config, log.history, say)
    return {**report, "epochs": progress.epoch, "best_val_loss": progress.best_val_loss,
            "best_epoch": progress.best_epoch}


def conditioner_task(model, trainer, updater, spec, case: ConditionerCase, config, runtime, say) -> Task:
    """The conditioner's training as the shared epoch loop runs it (modules/epoch_loop.py)."""
    facts = about(config, case)

    def save(path, progress):
        save_conditioner(path, model, spec, facts,
                         {"training": training_entry(updater.optimizer, updater.scaler, progress, runtime.device)})

    def restore(path):
        payload = read_payload(path, formats=(CONDITIONER_FORMAT,))
        if payload.get("vae_sha256") != facts["vae_sha256"]:
            raise InputError(path, f"was trained through another VAE than {case.vae_file} holds now",
                             "start the conditioner afresh without --resume")
        return restore_training(payload, path, model, updater.optimizer, updater.scaler, runtime.device)

    return Task(name="conditioner", epochs=config.lc_epochs, patience=config.lc_patience, watched="loss",
                learning_rate=lambda epoch: config.lc_lr * lr_factor(epoch, config.lc_epochs, config.warmup_fraction,
                                                                     1, min(1.0, config.lr_min / config.lc_lr)),
                optimizer=updater.optimizer,
                train_epoch=lambda epoch, first_step, partial_sums, guard: train_epoch(
                    trainer, updater, case, config, epoch, runtime, guard, first_step, partial_sums),
                validate=lambda: validate(model, case, config, runtime),
                record=lambda epoch, train_stats, val_stats: {**{f"train/{k}": v for k, v in train_stats.items()},
                                                             **{f"val/{k}": v for k, v in val_stats.items()}},
                report=lambda epoch, train_stats, val_stats: report_progress(say, epoch, config, train_stats,
                                                                             val_stats),
                save=save, restore=restore, best_path=CONDITIONER_CHECKPOINT, last_path=CONDITIONER_LAST)


def conditioner_spec(config, case: ConditionerCase) -> ConditionerSpec:
    return ConditionerSpec(kind=NETWORK_OF_INPUT[config.input_type], input_shape=tuple(case.conditions.shape[1:]),
                           output_dim=case.targets.shape[1], filters=config.conditioner_filters,
                           dropout=config.lc_dropout, spatial_attention=bool(config.use_spatial_attention),
                           vit_patch_size=config.vit_patch_size, vit_dim=config.vit_dim, vit_depth=config.vit_depth,
                           vit_heads=config.vit_heads, vit_drop_path=config.vit_drop_path)


def about(config, case: ConditionerCase) -> dict:
    """The plain facts a prediction needs besides the weights."""
    return {"config": config.to_dict(), "latent_scaler": case.latent_scaler.to_dict(),
            "input_scaler": None if case.input_scaler is None else case.input_scaler.to_dict(),
            "channels": case.channels, "param_names": case.param_names,
            "vae_file": str(case.vae_file), "vae_sha256": file_digest(case.vae_file)}


def train_epoch(trainer, updater, case: ConditionerCase, config, epoch: int, runtime, guard, first_step=0,
                partial_sums=None) -> EpochResult:
    """One pass over the training designs in shuffled global batches (an optimiser step per grad_accum_steps of
    them), each rank taking its shard, from optimiser step first_step on (a resumed epoch; partial_sums are the
    loss sums of the steps before)."""
    trainer.train()
    train_indices = case.fields.train_indices
    steps = optimiser_steps(len(train_indices), config.lc_batch_size, config.grad_accum_steps, config.seed, epoch,
                            runtime)[first_step:]
    parts = [part for step in steps for part in step]
    fields = field_batches(case.fields.train, parts, config)
    batch_designs = iter(on_device([train_indices[positions] for positions, _ in parts], case.conditions.device))
    sums = starting_sums(partial_sums, 3, runtime)
    for done, step in enumerate(steps, start=first_step + 1):
        generator = step_generator(config.seed, epoch, done)
        for index, (positions, weight) in enumerate(step):
            designs = next(batch_designs)
            inputs = augment(case.conditions[designs], config, generator)
            with updater.accumulating(last=index == len(step) - 1):
                loss, parts = conditioner_loss(trainer, case, inputs, designs, next(fields), config, runtime)
                updater.backward(loss * weight)
            sums += torch.stack([loss.detach(), *parts]) * (len(positions) if weight else 0)
        event = guard.after_step(updater.step())
        if event:
            return EpochResult(None, event, done, sum_over_ranks(sums, runtime).cpu().tolist())
    return EpochResult(averages(sum_over_ranks(sums, runtime), len(train_indices)))


@torch.no_grad()
def validate(model, case: ConditionerCase, config, runtime) -> dict:
    """The training objective on the validation designs (no dropout, no augmentation), sharded over ranks."""
    model.eval()
    shards = [(p, w) for p, w in (shard(p, runtime) for p in in_order(len(case.fields.val_indices),
                                                                     config.lc_batch_size)) if w]
    sums = torch.zeros(3, device=runtime.device)
    batch_designs = on_device([case.fields.val_indices[positions] for positions, _ in shards], case.conditions.device)
    for (positions, _), designs, field_batch in zip(shards, batch_designs, field_batches(case.fields.val, shards,
                                                                                         config)):
        loss, parts = conditioner_loss(model, case, case.conditions[designs], designs, field_batch, config, runtime)
        sums += torch.stack([loss, *parts]) * len(positions)
    return averages(sum_over_ranks(sums, runtime), len(case.fields.val_indices))


def field_batches(source, shards, config):
    """The scaled fields of each shard when the objective needs them (end to end), else nothing is read."""
    if config.use_e2e_training:
        return source.batches([positions for positions, _ in shards])
    return itertools.repeat(None)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator of one optimiser step's image augmentations, keyed by (seed, epoch, step): a run resumed
    inside an epoch draws the same flips and shifts as one that was never interrupted."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0]))


def augment(images, config, generator):
    if config.input_type == "csv":
        return images
    return augment_images(images, bool(config.lc_augment_flip), config.lc_augment_shift, generator)


def conditioner_loss(model, case: ConditionerCase, inputs, designs, fields, config, runtime):
    """(objective, (latent MSE, field loss)) of one batch, forward passes under the run's autocast, losses in
    float32. fields: scaled [B, T, M] (end to end) or None; without end-to-end training the field loss part is
    reported as 0 (not computed)."""
    with runtime.autocast():
        predicted = model(inputs)
    latent_mse = F.mse_loss(predicted.float(), case.targets[designs])
    if not config.use_e2e_training:
        return latent_mse, (latent_mse.detach(), torch.zeros((), device=predicted.device))
    with runtime.autocast():
        recon = decode_latents(case.vae, case.latent_scaler, predicted.float())
    field_loss = e2e_field_loss(recon.float(), fields, config)
    loss = field_loss
    if config.use_latent_regularization:
        loss = loss + config.latent_reg_weight * latent_mse
    return loss, (latent_mse.detach(), field_loss.detach())


def e2e_field_loss(recon, target, config):
    """e2e_loss_function between fields in scaled units; Huber/SmoothL1 use huber_delta."""
    if config.e2e_loss_function == "MSE":
        return F.mse_loss(recon, target)
    if config.e2e_loss_function == "MAE":
        return F.l1_loss(recon, target)
    if config.e2e_loss_function == "Huber":
        return F.huber_loss(recon, target, delta=config.huber_delta)
    return F.smooth_l1_loss(recon, target, beta=config.huber_delta)


def averages(sums, count: int) -> dict:
    loss, latent_mse, field_loss = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
    return {"loss": loss, "latent_mse": latent_mse, "field_loss": field_loss}


def report_progress(say, epoch, config, train_stats, val_stats) -> None:
    every = config.log_every or max(1, config.lc_epochs // 20)
    if (epoch + 1) % every == 0 or epoch + 1 == config.lc_epochs:
        field = (f"  val field loss {val_stats['field_loss']:.3g}" if config.use_e2e_training else "")
        say(f"conditioner epoch {epoch + 1:>5}/{config.lc_epochs}  train loss {train_stats['loss']:.4g}  "
            f"val loss {val_stats['loss']:.4g}  val latent MSE {val_stats['latent_mse']:.3g}{field}")
