"""Train the hierarchical VAE on the case in the working directory, then save the model, latents and reports.

Read top to bottom: train_vae() is the whole run; each step below it is one named function.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from modules.evaluation import reconstruction_report as evaluate

from modules.evaluation import latent_health

from modules.evaluation import figures as plots
from modules.data.augment import augment_batch
from modules.storage.model_files import read_payload, save_checkpoint, save_model
from modules.data.dataset import SimulationArray, find_dataset, scan_and_fit_scaler, split_indices
from modules.data.batches import check_preload_fits, in_order, make_batches, on_device
from modules.training.distributed import shard, sum_over_ranks
from modules.training.loop import EpochResult, Task, run_epochs, starting_sums
from modules.errors import InputError
from modules.training.losses import vae_loss
from modules.storage.paths import BEST_CHECKPOINT, LAST_CHECKPOINT, MODEL_DIR, MODEL_FILE, OUTPUT_DIR
from modules.models.pod import design_gram, pod_node_basis
from modules.storage.metrics_log import RunLog
from modules.training.runtime import seed_everything
from modules.training.schedules import beta_at, lr_factor
from modules.training.state import Progress, restore_training, training_entry
from modules.training.optimizer_step import Updater, make_optimizer, optimiser_steps, training_module
from modules.models.vae import HierarchicalVAE, ModelSpec

@dataclass
class Case:
    """The dataset, its split and scaler, and batch sources for both splits. `encoded` is evaluate.encode_and_score of
    every design by the saved VAE, kept by finish() so that the evaluation at the end of the run needs no second pass.
    """

    array: SimulationArray
    train_indices: np.ndarray
    val_indices: np.ndarray
    scaler: object
    train: object
    val: object
    _gram: np.ndarray | None = None
    encoded: tuple | None = None

    def split_gram(self) -> np.ndarray:
        """design_gram of [training..., validation...] designs, the input of every POD-based baseline. Computed once
        per run: it streams the whole dataset, and the VAE and conditioner reports both need it."""
        if self._gram is None:
            self._gram = design_gram(self.array, np.concatenate([self.train_indices, self.val_indices]))
        return self._gram


def train_vae(config, runtime, case: Case, run=None, resume=None, say=print):
    """Full VAE training run on a prepared case, from scratch or, with resume (a checkpoint path checked by
    training_state.read_checkpoint), from where that checkpoint stood. Every rank trains; rank 0 (given the run record
    of modules/runs.py, where its TensorBoard events go) writes everything and returns the reconstruction report
    (also written to output/) with the best validation loss and its epoch; the other ranks return None."""
    seed_everything(config.seed)
    say = say if runtime.is_main else (lambda text: None)
    model = build_model(config, case, runtime, pod_start=resume is None)
    trainer = training_module(model, config, runtime)
    optimizer = make_optimizer(model.parameters(), config.lr, config.weight_decay)
    updater = Updater(trainer, optimizer, runtime, config.grad_clip)
    task = vae_task(model, trainer, updater, case, config, runtime, say)
    progress = task.restore(resume) if resume else Progress()
    if run is not None:
        progress = dataclasses.replace(progress, run_id=run.id)
    processes = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
    say(f"Training on {runtime.device}{processes}: {len(case.train_indices)} training and "
        f"{len(case.val_indices)} validation designs of {case.array.sample_shape[0]} steps x "
        f"{case.array.sample_shape[1]} nodes; {sum(p.numel() for p in model.parameters()):,} parameters")
    if resume:
        say(f"Resuming from {resume}: epoch {progress.epoch}" + (f", step {progress.step}" if progress.step else ""))
    log = RunLog(OUTPUT_DIR / "metrics.csv", run.log_dir("vae"), progress.history) if runtime.is_main else None
    progress = run_epochs(task, progress, config, runtime, log, say)
    if not runtime.is_main:
        return None
    log.close()
    model.load_state_dict(read_payload(BEST_CHECKPOINT)["state_dict"])
    report = finish(model, case, config, runtime, log.history, run, say)
    return {**report, "epochs": progress.epoch, "best_val_loss": progress.best_val_loss,
            "best_epoch": progress.best_epoch}


def vae_task(model, trainer, updater, case: Case, config, runtime, say) -> Task:
    """The VAE's training as the shared epoch loop runs it (modules/epoch_loop.py)."""
    def save(path, progress):
        save_checkpoint(path, model, config, case.scaler,
                        training_entry(updater.optimizer, updater.scaler, progress, runtime.device))

    def restore(path):
        return restore_state(path, model, updater, case, runtime)

    collapse = CollapseWatch(config, say)

    def report(epoch, train_stats, val_stats):
        report_progress(say, epoch, config, train_stats, val_stats)
        collapse.check(epoch, val_stats["latents"])

    return Task(name="VAE", epochs=config.epochs, patience=config.patience, watched="recon",
                learning_rate=lambda epoch: config.lr * lr_factor(epoch, config.epochs, config.warmup_fraction,
                                                                  config.lr_cycles, config.lr_min / config.lr),
                optimizer=updater.optimizer,
                train_epoch=lambda epoch, first_step, partial_sums, guard: train_epoch(
                    trainer, updater, case, config, epoch, runtime, guard, first_step, partial_sums),
                validate=lambda: validate(model, case, config, runtime),
                record=lambda epoch, train_stats, val_stats: epoch_record(train_stats, val_stats,
                                                                         beta_of(config, epoch)),
                report=report, save=save, restore=restore, best_path=BEST_CHECKPOINT, last_path=LAST_CHECKPOINT)


def restore_state(path, model, updater, case: Case, runtime) -> Progress:
    """Load a VAE checkpoint's full state into this run; refused if the data changed since it was written."""
    payload = read_payload(path)
    if payload["scaler"] != case.scaler.to_dict():
        raise InputError(path, "was written for other data: the dataset's value ranges have changed since",
                         "resume with the data the run started with, or start a new run without --resume")
    return restore_training(payload, path, model, updater.optimizer, updater.scaler, runtime.device)


def beta_of(config, epoch: int) -> float:
    return beta_at(epoch, config.epochs, config.init_beta_divisor, config.beta_hold_fraction,
                   config.beta_ramp_end_fraction)


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


def build_model(config, case: Case, runtime, pod_start=True) -> HierarchicalVAE:
    """A fresh VAE whose node projections start as the training data's POD basis (pod_start; a resumed run loads
    its weights instead, so the POD pass over the data is skipped)."""
    model = HierarchicalVAE(ModelSpec.from_config(config))
    if pod_start:
        mean, modes, scales = pod_node_basis(case.array, case.train_indices, case.scaler,
                                             model.spec.projection_rank, config.seed)
        model.init_node_projections(mean, modes, scales)
    return model.to(runtime.device)


def train_epoch(trainer, updater, case: Case, config, epoch: int, runtime, guard, first_step=0,
                partial_sums=None) -> EpochResult:
    """One pass over the training designs: an optimiser step per grad_accum_steps batches, each rank taking its
    shard of every batch, from optimiser step first_step on (a resumed epoch; partial_sums are the loss sums of
    the steps before). Loss sums and skip counts stay on the device: one host sync per epoch, not per step."""
    trainer.train()
    beta = beta_of(config, epoch)
    all_steps = optimiser_steps(len(case.train), config.batch_size, config.grad_accum_steps, config.seed, epoch,
                                runtime)
    steps = all_steps[first_step:]
    order = [positions for step in steps for positions, _ in step]
    batches = case.train.batches(order)
    batch_designs = iter(on_device([case.train_indices[positions] for positions in order], runtime.device))
    noise = epoch_noise(config, epoch, runtime)
    sums = starting_sums(partial_sums, 3 + config.n_levels, runtime)
    progress_bar = tqdm(steps, leave=False, desc=f"epoch {epoch + 1}/{config.epochs}", initial=first_step,
                        total=len(all_steps), disable=not runtime.is_main or None)
    for done, step in enumerate(progress_bar, start=first_step + 1):
        for index, (positions, weight) in enumerate(step):
            inputs, targets = augment_batch(next(batches), config)
            designs = next(batch_designs)
            with updater.accumulating(last=index == len(step) - 1):
                with runtime.autocast():
                    outputs = [trainer(inputs, noise=draw[designs]) for draw in noise]
                loss, parts = vae_loss(outputs, targets, config, beta)
                updater.backward(loss * weight)
            sums += weighted_parts(loss.detach(), parts, len(positions) if weight else 0)
        event = guard.after_step(updater.step())
        if event:
            progress_bar.close()
            return EpochResult(None, event, done, sum_over_ranks(sums, runtime).cpu().tolist())
    return EpochResult(averages(sum_over_ranks(sums, runtime), len(case.train)))


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
    fairly while beta ramps up. 'latents' holds the collapse diagnostics (modules/latent_health.py)."""
    model.eval()
    shards = [positions for positions, weight in (shard(p, runtime) for p in in_order(len(case.val), config.batch_size))
              if weight]
    losses = torch.zeros(3 + config.n_levels, device=runtime.device)
    health = torch.zeros(3 * config.latent_size, device=runtime.device)
    for batch in case.val.batches(shards):
        with runtime.autocast():
            outputs = [model(batch, sample=False)]
        loss, parts = vae_loss(outputs, batch, config, beta=1.0)
        losses += weighted_parts(loss, parts, len(batch))
        health += latent_health.batch_sums(outputs[0])
    totals = sum_over_ranks(torch.cat([losses, health]), runtime)
    stats = averages(totals[:len(losses)], len(case.val))
    stats["latents"] = latent_health.summarise(totals[len(losses):], len(case.val), config.main_latent_dim,
                                               config.n_levels, config.level_latent_dim)
    return stats


def weighted_parts(loss, parts, count: int):
    """[loss, recon, kl_main, kl_level...] times the number of designs they are the mean over."""
    return torch.cat([loss.reshape(1), parts["recon"].reshape(1), parts["kl_main"].reshape(1),
                      parts["kl_levels"]]) * count


def averages(sums, count: int) -> dict:
    values = (sums / count).cpu().tolist()  # the epoch's single device-to-host copy
    return {"loss": values[0], "recon": values[1], "kl_main": values[2], "kl_levels": values[3:]}


def epoch_record(train_stats, val_stats, beta) -> dict:
    record = {"beta": beta}
    for split, stats in (("train", train_stats), ("val", val_stats)):
        record.update({f"{split}/loss": stats["loss"], f"{split}/recon": stats["recon"],
                       f"{split}/kl_main": stats["kl_main"]})
        record.update({f"{split}/kl_level{i}": kl for i, kl in enumerate(stats["kl_levels"])})
    return {**record, **latent_health.log_record(val_stats["latents"])}


class CollapseWatch:
    """Warns when a level (or the main latent) collapses: once when it happens, not every epoch. Collapse is only
    judged once the KL weight starts rising (beta_hold_fraction): before, the KL term barely acts."""

    def __init__(self, config, say):
        self.first_epoch = int(config.beta_hold_fraction * config.epochs)
        self.say, self.collapsed = say, []

    def check(self, epoch: int, summary: dict) -> None:
        collapsed = latent_health.collapsed_groups(summary)
        new = [group for group in collapsed if group not in self.collapsed]
        if epoch >= self.first_epoch and new:
            self.say(f"warning: epoch {epoch + 1}: {latent_health.collapse_warning(new, summary)}")
        self.collapsed = collapsed if epoch >= self.first_epoch else []


def report_progress(say, epoch, config, train_stats, val_stats) -> None:
    every = config.log_every or max(1, config.epochs // 20)
    if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
        say(f"epoch {epoch + 1:>5}/{config.epochs}  train loss {train_stats['loss']:.4g}  "
            f"recon {train_stats['recon']:.3g}  val recon {val_stats['recon']:.3g}  "
            f"KL main {train_stats['kl_main']:.3g}  KL levels {sum(train_stats['kl_levels']):.3g}  "
            f"beta {beta_of(config, epoch):.3g}")


def finish(model, case: Case, config, runtime, history, run, say) -> dict:
    """Write the usable model, the latents of every design, the split, the reconstruction report and the training
    plots (the full evaluation follows at the end of the run: modules/evaluation.py)."""
    save_model(MODEL_FILE, model, config, case.scaler, run.id)
    case.scaler.save(MODEL_DIR / "scaler.json")
    all_designs = make_batches(case.array, np.arange(config.n_designs), case.scaler, runtime, load_all=False)
    case.encoded = evaluate.encode_and_score(model, all_designs, case.scaler, config.batch_size,
                                             np.arange(config.n_designs), config.n_vars)
    main_latents, level_latents, _, errors = case.encoded
    np.save(MODEL_DIR / "latent_vectors.npy", main_latents)
    np.save(MODEL_DIR / "xs.npy", level_latents)
    evaluate.save_split(MODEL_DIR / "split.json", case.train_indices, case.val_indices)
    report = evaluate.reconstruction_report(errors.relative_l2(), case, config)
    evaluate.write_report(report, OUTPUT_DIR, say)
    if config.plot < 2:
        plots.training_plots(history, model, case, config, OUTPUT_DIR, show=config.plot == 0, say=say)
    return report
