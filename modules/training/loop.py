"""The training loop of the VAE and of the conditioner, read top to bottom in run_training() (one epoch's optimiser
steps in train_epoch()).

    progress, history = run_training(job, config, runtime, run, resume=None)

A job (TrainingJob: VAETraining, ConditionerTraining) is what differs between the two: the network, the loss of a
batch, the validation numbers, what a checkpoint holds and what is logged. Everything else is decided here, the same
way for both:
- an epoch is cut into optimiser steps of grad_accum_steps micro-batches; each rank takes its shard of every batch;
- every save_every epochs (and at the end) the full state goes to job.last_path, and to job.best_path whenever the
  validation number job.chosen_by improves (the validation loss breaks ties); a fresh run also validates and saves
  its starting state (epoch 0) as both, so a recovery always has a state to go to and the state kept can only be
  better than where training started;
- a stop request (SIGTERM, SIGINT) ends the current optimiser step, saves job.last_path with the step inside the
  epoch and raises Stopped: --resume continues from that very step;
- a step with a non-finite gradient is skipped (Updater); max_skipped_steps of them in a row (seen at the end of the
  epoch) or a diverging validation loss restore job.last_path and multiply the learning rate by recovery_lr_factor;
  after max_recoveries restores the run stops with one clear line;
- job.patience epochs without a better job.chosen_by end the run early, and so do job.start_patience epochs in which
  none beat the starting state.
"""
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from modules.config import CONDITION_FILE
from modules.errors import InputError, Stopped
from modules.machine.logs import shows_progress
from modules.machine.processes import barrier, sum_over_ranks
from modules.storage.metrics_log import MetricsLog
from modules.training.guard import Guard, StopRequest
from modules.training.optimizer_step import Updater, make_optimizer, optimiser_steps, training_module
from modules.training.state import Progress, restore_training, training_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """What one optimiser step's loss depends on besides its batch, passed to TrainingJob.batch_loss."""

    epoch: int                  # 0-based
    number: int                 # 1-based, inside the epoch
    position: float             # in epochs: epoch + the share of it done before this step (the schedules' clock)
    generator: torch.Generator  # the step's seeded CPU generator, for random augmentations


class TrainingJob(Protocol):
    """What the loop trains: the network and what differs between the VAE's training and the conditioner's."""

    name: str               # in messages: "VAE", "conditioner"
    model: torch.nn.Module
    epochs: int
    chosen_by: str          # the validation number (lower is better) that decides which state is kept
    patience: int           # epochs without a better chosen_by before an early stop (0: never)
    start_patience: int     # epochs in which none beats the starting state before an early stop (0: never)
    batch_size: int         # designs per micro-batch
    n_train: int            # training designs
    n_parts: int            # numbers batch_loss returns as its parts
    peak_lr: float
    weight_decay: float
    watched: str            # the validation number divergence is judged on
    divergence_floor: float  # a watched value below which no rise counts as divergence
    best_path: Path         # checkpoints: the best epoch's and the latest
    last_path: Path
    metrics_file: Path      # the per-epoch CSV log
    log_part: str           # the run's TensorBoard folder for this training

    def learning_rate(self, position: float) -> float:
        """The schedule's rate at a position in epochs, before recoveries scale it."""

    def training_batches(self, epoch: int, micro_batches: list) -> Iterator:
        """One batch per micro-batch ([(positions, weight)] of the training designs, this rank's), in order; it
        starts the epoch."""

    def batch_loss(self, trainer, batch, step: Step):
        """(the loss to step on, its parts [n_parts] detached), each a mean over the batch's designs."""

    def averages(self, sums: torch.Tensor, count: int) -> dict:
        """The epoch's numbers from the parts summed over count designs."""

    def validate(self) -> dict:
        """The validation numbers, with "loss", chosen_by and the watched one, the same on every rank."""

    def finish_epoch(self, epoch: int, train: dict, val: dict) -> dict:
        """The job's own end of a validated epoch, in every process (the VAE sets its likelihood's noise scale);
        returns the epoch's log record."""

    def report(self, epoch: int, train: dict, val: dict) -> None:
        """Progress lines."""

    def save(self, path, training: dict) -> None:
        """The full state, training being the optimiser's, the random generators' and Progress."""

    def resumable(self, path) -> dict:
        """A checkpoint's payload, refused (InputError) when it does not fit this job."""


def run_training(job: TrainingJob, config, runtime, run, resume=None):
    """Train job.model from scratch or, with resume (a checkpoint path already checked), from where that checkpoint
    stood, until every epoch is done or early stopping ends it. Returns (the final Progress, saved as last; the
    per-epoch log records). run: the run record (main process) or None (other ranks, which neither log nor write)."""
    trainer = training_module(job.model, config, runtime)
    # a frozen part (a VAE's snapshot codec) is no optimiser's
    optimizer = make_optimizer([p for p in job.model.parameters() if p.requires_grad], job.peak_lr, job.weight_decay)
    updater = Updater(trainer, optimizer, runtime, config.grad_clip)

    def save(path, progress):
        if runtime.is_main:
            job.save(path, training_entry(optimizer, updater.scaler, progress, runtime.device))

    def restore(path) -> Progress:
        return restore_training(job.resumable(path), path, job.model, optimizer, updater.scaler, runtime.device)

    progress = restore(resume) if resume else Progress()
    if run is not None:
        progress = dataclasses.replace(progress, run_id=run.id)
    if resume:
        log.info(f"Resuming from {resume}: epoch {progress.epoch}"
                 + (f", step {progress.step}" if progress.step else ""))
    metrics = MetricsLog(job.metrics_file, run.log_dir(job.log_part), progress.history) if run is not None else None
    with StopRequest() as stop:
        guard = Guard(config, runtime, stop)
        if progress == Progress(run_id=progress.run_id):  # a fresh start: a recovery needs a state to go back to,
            # and the starting state is the first candidate for the best (the VAE's POD path starts as good as POD)
            start = job.validate()
            progress = dataclasses.replace(progress, best_val_loss=start["loss"], best_score=start[job.chosen_by])
            log.info(f"The {job.name} before training: validation {job.chosen_by} {progress.best_score:.4g}")
            save(job.last_path, progress)
            save(job.best_path, progress)
        elif progress.best_score is None:  # a checkpoint that kept its best by the loss alone: score that state
            progress = dataclasses.replace(progress, best_score=score_of_saved_state(job))
        while not progress.finished:
            epoch = progress.epoch
            lr = progress.lr_scale * job.learning_rate(epoch)  # logged; train_epoch sets the rate of every step
            guard.new_epoch()

            # Train one epoch (from the step a stop request interrupted, when resumed inside it).
            train_stats, interrupted = train_epoch(job, trainer, updater, guard, progress, config, runtime)
            if interrupted is not None:
                stop_now(job, interrupted, guard, save, runtime,
                         f"in epoch {epoch + 1}, after optimiser step {interrupted.step}")

            # Too many skipped steps in a row: back to the last saved state, with a lower learning rate.
            skipped, unstable = guard.end_epoch()
            if unstable:
                reason = f"{config.max_skipped_steps} optimiser steps in a row had a non-finite loss or gradient"
                progress = recover(job, progress, reason, restore, config, runtime, metrics)
                guard.restart_count()
                continue

            # Validate; a diverging validation loss also goes back to the last saved state.
            val_stats = job.validate()
            diverged = guard.divergence(val_stats["loss"], val_stats[job.watched],
                                        best_of(progress.history, f"val/{job.watched}"), job.divergence_floor)
            if diverged:
                progress = recover(job, progress, diverged, restore, config, runtime, metrics)
                continue

            # The job's own end of epoch (the VAE sets its likelihood's noise scale); log the epoch, keep the best
            # and the last state, stop early.
            record = {**job.finish_epoch(epoch, train_stats, val_stats), "lr": lr, "skipped_steps": skipped}
            epoch += 1
            score = val_stats[job.chosen_by]
            improved = (score, val_stats["loss"]) < (progress.best_score, progress.best_val_loss)
            best_loss, best_score, best_epoch = ((val_stats["loss"], score, epoch) if improved else
                                                 (progress.best_val_loss, progress.best_score, progress.best_epoch))
            early = job.patience > 0 and epoch - best_epoch >= job.patience
            never_beat_start = job.start_patience > 0 and best_epoch == 0 and epoch >= job.start_patience
            progress = dataclasses.replace(progress, epoch=epoch, step=0, partial_sums=None, best_val_loss=best_loss,
                                           best_score=best_score, best_epoch=best_epoch,
                                           finished=epoch >= job.epochs or early or never_beat_start,
                                           history=progress.history + [record])
            if metrics is not None:
                metrics.log(epoch, record)
            job.report(epoch - 1, train_stats, val_stats)
            if improved:
                save(job.best_path, progress)
            if epoch % config.save_every == 0 or progress.finished:
                save(job.last_path, progress)
            if never_beat_start and epoch < job.epochs:
                log.info(f"Early stop of the {job.name} at epoch {epoch}: no epoch has beaten its starting state on "
                         f"the validation designs ({job.chosen_by} {best_score:.4g}; start_patience "
                         f"{job.start_patience})")
            elif early and epoch < job.epochs:
                log.info(f"Early stop of the {job.name} at epoch {epoch}: no better validation {job.chosen_by} for "
                         f"{job.patience} epochs (best {best_score:.4g} at epoch {best_epoch})")
            if guard.stop_requested():
                stop_now(job, progress, guard, save, runtime, f"after epoch {epoch}")
    if metrics is None:
        return progress, None
    metrics.close()
    return progress, metrics.history


def train_epoch(job, trainer, updater, guard, progress, config, runtime):
    """One pass over the training designs: an optimiser step per grad_accum_steps micro-batches, each rank taking its
    shard of every batch, from optimiser step progress.step on (a resumed epoch; progress.partial_sums are the loss
    sums of the steps before). The loss sums and skip counts stay on the device: one host sync per epoch, not per
    step. Returns (the epoch's averages, None), or (None, progress at the step a stop request ended) when stopped."""
    epoch = progress.epoch
    trainer.train()
    all_steps = optimiser_steps(job.n_train, job.batch_size, config.grad_accum_steps, config.seed, epoch, runtime)
    steps = all_steps[progress.step:]
    batches = job.training_batches(epoch, [part for step in steps for part in step])
    sums = starting_sums(progress.partial_sums, job.n_parts, runtime)
    progress_bar = tqdm(steps, leave=False, desc=f"{job.name} epoch {epoch + 1}/{job.epochs}", initial=progress.step,
                        total=len(all_steps), disable=shows_progress())
    for done, step in enumerate(progress_bar, start=progress.step + 1):
        # the schedules move on at every optimiser step, not once an epoch, so that a run of a few epochs changes
        # its learning rate and KL weight gradually too
        inputs = Step(epoch, done, epoch + (done - 1) / len(all_steps), step_generator(config.seed, epoch, done))
        set_learning_rate(updater.optimizer, progress.lr_scale * job.learning_rate(inputs.position))
        for index, (positions, weight) in enumerate(step):
            with updater.accumulating(last=index == len(step) - 1):
                loss, parts = job.batch_loss(trainer, next(batches), inputs)
                updater.backward(loss * weight)
            sums += parts * (len(positions) if weight else 0)
        if guard.after_step(updater.step()) == "stop":
            progress_bar.close()
            partial = sum_over_ranks(sums, runtime).cpu().tolist()
            return None, dataclasses.replace(progress, step=done, partial_sums=partial)
    return job.averages(sum_over_ranks(sums, runtime), job.n_train), None


def recover(job, progress, reason, restore, config, runtime, metrics) -> Progress:
    """Go back to the last saved state with a lower learning rate, or stop when restores have not helped."""
    if progress.recoveries >= config.max_recoveries:
        raise InputError(CONDITION_FILE, f"{job.name} training is unstable in epoch {progress.epoch + 1}: {reason}, "
                         f"after {progress.recoveries} restore(s) with a lower learning rate (max_recoveries "
                         f"{config.max_recoveries})", "lower the learning rate (LearningR or latent_conditioner_lr) "
                         "or grad_clip; the last good state is kept in checkpoints/")
    barrier(runtime)
    restored = restore(job.last_path)
    recovered = dataclasses.replace(restored, lr_scale=progress.lr_scale * config.recovery_lr_factor,
                                    recoveries=progress.recoveries + 1, best_val_loss=progress.best_val_loss,
                                    best_score=progress.best_score, best_epoch=progress.best_epoch, finished=False)
    log.info(f"{job.name} epoch {progress.epoch + 1}: {reason}. Restored {job.last_path} (saved after epoch "
             f"{restored.epoch}) and lowered the learning rate to {recovered.lr_scale:g} x its schedule "
             f"(restore {recovered.recoveries} of max_recoveries {config.max_recoveries})")
    if metrics is not None:
        metrics.rewind(recovered.history)
    return recovered


def stop_now(job, progress, guard, save, runtime, where: str):
    save(job.last_path, progress)
    barrier(runtime)
    raise Stopped(guard.signal_number(), job.last_path, f"{where} of the {job.name}")


def score_of_saved_state(job) -> float:
    """job.chosen_by of the state saved at job.best_path; the model is then put back as it was. Only the model's
    weights are restored in between: validation draws no random numbers, and the optimiser is not stepped."""
    current = {name: value.clone() for name, value in job.model.state_dict().items()}
    job.model.load_state_dict(job.resumable(job.best_path)["state_dict"])
    score = job.validate()[job.chosen_by]
    job.model.load_state_dict(current)
    return score


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def best_of(history: list, name: str) -> float:
    return min((record[name] for record in history if name in record), default=math.inf)


def starting_sums(partial_sums, size: int, runtime) -> torch.Tensor:
    """An epoch's running loss sums: zeros, or, resuming inside an epoch, the saved sums (all ranks added) on rank 0
    and zeros elsewhere, so that the epoch's final all-rank sum is right whatever the number of ranks."""
    if partial_sums is None or not runtime.is_main:
        return torch.zeros(size, device=runtime.device)
    return torch.tensor(partial_sums, dtype=torch.float32, device=runtime.device)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator of one optimiser step's random augmentations, keyed by (seed, epoch, step): a run resumed
    inside an epoch draws the same flips and shifts as one that was never interrupted."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0]))
