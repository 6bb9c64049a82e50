"""Train the hierarchical VAE on the case in the working directory, then save the model, latents and reports.

Read top to bottom: train_vae() is the whole run; each step below it is one named function.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from modules import evaluate, plots
from modules.augment import augment_batch
from modules.checkpoint import read_payload, save_checkpoint, save_model
from modules.data import (SimulationArray, check_preload_fits, find_dataset, in_order, make_batches, on_device,
                          scan_and_fit_scaler, split_indices)
from modules.distributed import shard, sum_over_ranks
from modules.losses import vae_loss
from modules.outputs import CHECKPOINT_DIR, MODEL_DIR, MODEL_FILE, OUTPUT_DIR
from modules.pod import design_gram, pod_node_basis
from modules.run_log import RunLog
from modules.runtime import seed_everything
from modules.schedules import beta_at, lr_factor
from modules.update import Updater, optimiser_steps, training_module
from modules.vae import HierarchicalVAE, ModelSpec

LAST_CHECKPOINT_SAVES = 10  # besides the end of training; "best" is saved whenever validation improves


@dataclass
class Case:
    """The dataset, its split and scaler, and batch sources for both splits."""

    array: SimulationArray
    train_indices: np.ndarray
    val_indices: np.ndarray
    scaler: object
    train: object
    val: object
    _gram: np.ndarray | None = None

    def split_gram(self) -> np.ndarray:
        """design_gram of [training..., validation...] designs, the input of every POD-based baseline. Computed once
        per run: it streams the whole dataset, and the VAE and conditioner reports both need it."""
        if self._gram is None:
            self._gram = design_gram(self.array, np.concatenate([self.train_indices, self.val_indices]))
        return self._gram


def train_vae(config, runtime, case: Case, say=print):
    """Full VAE training run on a prepared case. Every rank trains; rank 0 writes everything and returns the
    reconstruction report (also written to output/), the other ranks return None."""
    seed_everything(config.seed)
    say = say if runtime.is_main else (lambda text: None)
    model = build_model(config, case, runtime)
    trainer = training_module(model, config, runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    updater = Updater(trainer, optimizer, runtime, config.grad_clip)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(
        epoch, config.epochs, config.warmup_fraction, config.lr_cycles, config.lr_min / config.lr))
    processes = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
    say(f"Training on {runtime.device}{processes}: {len(case.train_indices)} training and "
        f"{len(case.val_indices)} validation designs of {case.array.sample_shape[0]} steps x "
        f"{case.array.sample_shape[1]} nodes; {sum(p.numel() for p in model.parameters()):,} parameters")
    log = RunLog(OUTPUT_DIR) if runtime.is_main else None
    best_val_loss = math.inf
    for epoch in range(config.epochs):
        beta = beta_at(epoch, config.epochs, config.init_beta_divisor, config.beta_hold_fraction,
                       config.beta_ramp_end_fraction)
        train_stats = train_epoch(trainer, updater, case, config, beta, epoch, runtime)
        val_stats = validate(model, case, config, runtime)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with, before the scheduler moves on
        scheduler.step()
        if not runtime.is_main:
            continue
        log.log(epoch + 1, epoch_record(train_stats, val_stats, beta, lr))
        best_val_loss = keep_checkpoints(model, config, case, optimizer, scheduler, epoch, val_stats["loss"],
                                         best_val_loss)
        report_progress(say, epoch, config, train_stats, val_stats, beta)
    if not runtime.is_main:
        return None
    log.close()
    model.load_state_dict(read_payload(CHECKPOINT_DIR / "best.pt")["state_dict"])
    return finish(model, case, config, runtime, log.history, say)


def prepare_case(config, runtime) -> Case:
    """Open and check the dataset (one streamed pass: shape, NaN/Inf, scaler fit on training designs only)."""
    array = SimulationArray(find_dataset(config.data_no), config)
    train_indices, val_indices = split_indices(config.n_designs, config.val_fraction, config.seed)
    scaler = scan_and_fit_scaler(array, train_indices, config.n_vars)
    return case_of(array, (train_indices, val_indices), scaler, config, runtime)


def case_of(array, split, scaler, config, runtime) -> Case:
    """Batch sources for both sides of a (train indices, validation indices) split, scaled by `scaler`."""
    if config.load_all:
        check_preload_fits(array, sum(len(indices) for indices in split), runtime)
    batches = [make_batches(array, indices, scaler, runtime, bool(config.load_all)) for indices in split]
    return Case(array, *split, scaler, *batches)


def build_model(config, case: Case, runtime) -> HierarchicalVAE:
    """A fresh VAE whose node projections start as the training data's POD basis."""
    model = HierarchicalVAE(ModelSpec.from_config(config))
    mean, modes, scales = pod_node_basis(case.array, case.train_indices, case.scaler,
                                         model.spec.projection_rank, config.seed)
    model.init_node_projections(mean, modes, scales)
    return model.to(runtime.device)


def train_epoch(trainer, updater, case: Case, config, beta: float, epoch: int, runtime) -> dict:
    """One pass over the training designs: an optimiser step per grad_accum_steps batches, each rank taking its
    shard of every batch. Sums stay on the device: one host sync per epoch, not per step."""
    trainer.train()
    steps = optimiser_steps(len(case.train), config.batch_size, config.grad_accum_steps, config.seed, epoch, runtime)
    order = [positions for step in steps for positions, _ in step]
    batches = case.train.batches(order)
    batch_designs = iter(on_device([case.train_indices[positions] for positions in order], runtime.device))
    noise = epoch_noise(config, epoch, runtime)
    sums = torch.zeros(3 + config.n_levels, device=runtime.device)
    for step in tqdm(steps, leave=False, desc=f"epoch {epoch + 1}/{config.epochs}",
                     disable=not runtime.is_main or None):
        for index, (positions, weight) in enumerate(step):
            inputs, targets = augment_batch(next(batches), config)
            designs = next(batch_designs)
            with updater.accumulating(last=index == len(step) - 1):
                with runtime.autocast():
                    outputs = [trainer(inputs, noise=draw[designs]) for draw in noise]
                loss, parts = vae_loss(outputs, targets, config, beta)
                updater.backward(loss * weight)
            sums += weighted_parts(loss.detach(), parts, len(positions) if weight else 0)
        updater.step()
    return averages(sum_over_ranks(sums, runtime), len(case.train))


def epoch_noise(config, epoch: int, runtime) -> torch.Tensor:
    """Reparameterisation noise [Recon_iter, N designs, noise_size] for one epoch, keyed by (seed, epoch, draw) and
    indexed by design: the same design gets the same noise however designs are batched, streamed or spread over
    ranks. One host-to-device copy per epoch, none per step."""
    draws = [np.random.default_rng([config.seed, epoch, draw]).standard_normal((config.n_designs, config.latent_size))
             for draw in range(config.recon_samples)]
    return torch.from_numpy(np.stack(draws).astype(np.float32)).to(runtime.device)


@torch.no_grad()
def validate(model, case: Case, config, runtime) -> dict:
    """Validation along the posterior-mean path, sharded over ranks; 'loss' uses beta = 1 so that epochs compare
    fairly while beta ramps up."""
    model.eval()
    shards = [positions for positions, weight in (shard(p, runtime) for p in in_order(len(case.val), config.batch_size))
              if weight]
    sums = torch.zeros(3 + config.n_levels, device=runtime.device)
    for batch in case.val.batches(shards):
        with runtime.autocast():
            outputs = [model(batch, sample=False)]
        loss, parts = vae_loss(outputs, batch, config, beta=1.0)
        sums += weighted_parts(loss, parts, len(batch))
    return averages(sum_over_ranks(sums, runtime), len(case.val))


def weighted_parts(loss, parts, count: int):
    """[loss, recon, kl_main, kl_level...] times the number of designs they are the mean over."""
    return torch.cat([loss.reshape(1), parts["recon"].reshape(1), parts["kl_main"].reshape(1),
                      parts["kl_levels"]]) * count


def averages(sums, count: int) -> dict:
    values = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
    return {"loss": values[0], "recon": values[1], "kl_main": values[2], "kl_levels": values[3:]}


def epoch_record(train_stats, val_stats, beta, lr) -> dict:
    record = {"beta": beta, "lr": lr}
    for split, stats in (("train", train_stats), ("val", val_stats)):
        record.update({f"{split}/loss": stats["loss"], f"{split}/recon": stats["recon"],
                       f"{split}/kl_main": stats["kl_main"]})
        record.update({f"{split}/kl_level{i}": kl for i, kl in enumerate(stats["kl_levels"])})
    return record


def keep_checkpoints(model, config, case, optimizer, scheduler, epoch, val_loss, best_val_loss) -> float:
    """best.pt whenever validation improves, last.pt LAST_CHECKPOINT_SAVES times a run and at the end.
    Returns the best validation loss so far."""
    state = (model, config, case.scaler, optimizer, scheduler, epoch + 1)
    if val_loss < best_val_loss:
        best_val_loss = val_loss
        save_checkpoint(CHECKPOINT_DIR / "best.pt", *state, best_val_loss)
    every = max(1, config.epochs // LAST_CHECKPOINT_SAVES)
    if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
        save_checkpoint(CHECKPOINT_DIR / "last.pt", *state, best_val_loss)
    return best_val_loss


def report_progress(say, epoch, config, train_stats, val_stats, beta) -> None:
    every = config.log_every or max(1, config.epochs // 20)
    if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
        say(f"epoch {epoch + 1:>5}/{config.epochs}  train loss {train_stats['loss']:.4g}  "
            f"recon {train_stats['recon']:.3g}  val recon {val_stats['recon']:.3g}  "
            f"KL main {train_stats['kl_main']:.3g}  KL levels {sum(train_stats['kl_levels']):.3g}  beta {beta:.3g}")


def finish(model, case: Case, config, runtime, history, say) -> dict:
    """Write the usable model, the latents of every design, the split, the report and the plots."""
    save_model(MODEL_FILE, model, config, case.scaler)
    case.scaler.save(MODEL_DIR / "scaler.json")
    all_designs = make_batches(case.array, np.arange(config.n_designs), case.scaler, runtime, load_all=False)
    main_latents, level_latents, design_errors = evaluate.encode_and_score(model, all_designs, case.scaler,
                                                                           config.batch_size)
    np.save(MODEL_DIR / "latent_vectors.npy", main_latents)
    np.save(MODEL_DIR / "xs.npy", level_latents)
    evaluate.save_split(MODEL_DIR / "split.json", case.train_indices, case.val_indices)
    report = evaluate.reconstruction_report(design_errors, case, config)
    evaluate.write_report(report, OUTPUT_DIR, say)
    if config.plot < 2:
        plots.training_plots(history, model, case, config, OUTPUT_DIR, show=config.plot == 0, say=say)
    return report
