"""Train the latent conditioner: from what defines a design (CSV row or geometry image) to the VAE's latents.

Two objectives (use_e2e_training):
- 0: regress the VAE's latents (main + every level), each dimension standardised on the training designs.
- 1 (end to end): condition -> conditioner -> latents -> frozen VAE decoder -> field, trained on the field loss, so
  the conditioner spends its capacity on the latent directions that matter for the field; optionally plus a small
  pull towards the VAE's latents (use_latent_regularization).

The split is the VAE's (model_save/split.json): the VAE's validation designs are the conditioner's, never trained on.
Read top to bottom: train_conditioner() is the whole run.
"""
import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules import prediction_report
from modules.checkpoint import file_digest, save_conditioner
from modules.conditioners import ConditionerSpec, build_conditioner
from modules.config import CONDITION_FILE
from modules.data import in_order, on_device
from modules.design_inputs import augment_images
from modules.distributed import shard, sum_over_ranks
from modules.errors import InputError
from modules.latents import decode_latents
from modules.outputs import CONDITIONER_CHECKPOINT, CONDITIONER_FILE, CONDITIONER_NAME, OUTPUT_DIR
from modules.recompute import enable_recompute
from modules.run_log import RunLog
from modules.runtime import seed_everything
from modules.scaling import ColumnScaler
from modules.schedules import lr_factor
from modules.update import Updater, optimiser_steps, training_module

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


def train_conditioner(config, runtime, case: ConditionerCase, say=print):
    """Full conditioner run. Every rank trains; rank 0 writes the model, logs and the prediction report and
    returns the report; other ranks return None."""
    seed_everything(config.seed)
    say = say if runtime.is_main else (lambda text: None)
    spec = conditioner_spec(config, case)
    model = build_conditioner(spec).to(runtime.device)
    trainer = training_module(model, config, runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lc_lr, weight_decay=config.lc_weight_decay)
    updater = Updater(trainer, optimizer, runtime, config.grad_clip)
    if config.grad_checkpointing:
        enable_recompute(case.vae)  # end to end, the frozen decoder's activations are part of this backward pass
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(
        epoch, config.lc_epochs, config.warmup_fraction, 1, min(1.0, config.lr_min / config.lc_lr)))
    objective = "end to end through the frozen decoder" if config.use_e2e_training else "latent regression"
    say(f"Training the {spec.kind.upper()} conditioner ({objective}) on {len(case.fields.train_indices)} designs, "
        f"validating on {len(case.fields.val_indices)}; {sum(p.numel() for p in model.parameters()):,} parameters")
    log = RunLog(OUTPUT_DIR, CONDITIONER_NAME) if runtime.is_main else None
    facts = about(config, case)
    best = {"loss": math.inf, "epoch": 0, "state": None}
    for epoch in range(config.lc_epochs):
        train_stats = train_epoch(trainer, updater, case, config, epoch, runtime)
        val_stats = validate(model, case, config, runtime)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with, before the scheduler moves on
        scheduler.step()
        if val_stats["loss"] < best["loss"]:
            best = {"loss": val_stats["loss"], "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
            if runtime.is_main:
                save_conditioner(CONDITIONER_CHECKPOINT, model, spec, facts,
                                 {"optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best_val_loss": best["loss"]})
        if runtime.is_main:
            log.log(epoch + 1, {**{f"train/{k}": v for k, v in train_stats.items()},
                                **{f"val/{k}": v for k, v in val_stats.items()}, "lr": lr})
            report_progress(say, epoch, config, train_stats, val_stats)
        if config.lc_patience and epoch + 1 - best["epoch"] >= config.lc_patience:
            say(f"Early stop at epoch {epoch + 1}: no better validation loss for {config.lc_patience} epochs")
            break
    if not runtime.is_main:
        return None
    log.close()
    if best["state"] is None:  # no finite validation loss in any epoch: say so rather than keep an arbitrary epoch
        raise InputError(CONDITION_FILE, "the conditioner's validation loss was never finite",
                         "lower latent_conditioner_lr (or check the design inputs for extreme values)")
    model.load_state_dict(best["state"])
    say(f"Best validation loss {best['loss']:.4g} at epoch {best['epoch']}; that conditioner is kept")
    save_conditioner(CONDITIONER_FILE, model, spec, facts)
    return prediction_report.evaluate_and_write(model, case, config, log.history, say)


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


def train_epoch(trainer, updater, case: ConditionerCase, config, epoch: int, runtime) -> dict:
    """One pass over the training designs in shuffled global batches (an optimiser step per grad_accum_steps of
    them), each rank taking its shard."""
    trainer.train()
    train_indices = case.fields.train_indices
    steps = optimiser_steps(len(train_indices), config.lc_batch_size, config.grad_accum_steps, config.seed, epoch,
                            runtime)
    parts = [part for step in steps for part in step]
    fields = field_batches(case.fields.train, parts, config)
    batch_designs = iter(on_device([train_indices[positions] for positions, _ in parts], case.conditions.device))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    sums = torch.zeros(3, device=runtime.device)
    for step in steps:
        for index, (positions, weight) in enumerate(step):
            designs = next(batch_designs)
            inputs = augment(case.conditions[designs], config, generator)
            with updater.accumulating(last=index == len(step) - 1):
                loss, parts = conditioner_loss(trainer, case, inputs, designs, next(fields), config, runtime)
                updater.backward(loss * weight)
            sums += torch.stack([loss.detach(), *parts]) * (len(positions) if weight else 0)
        updater.step()
    return averages(sum_over_ranks(sums, runtime), len(train_indices))


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
