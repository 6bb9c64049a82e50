"""The epoch loop the VAE and the conditioner share: learning rate, checkpoints, resume, stop requests, recovery from
instability and early stopping.

    progress = run_epochs(task, progress, config, runtime, log, say)

A Task is what differs between the two trainings: how one epoch trains and validates, how a checkpoint is written
and read back, what is logged. When to save, what to do on a signal, a NaN or a diverging loss, and when to stop are
decided here, the same way for both:
- every save_every epochs (and at the end) the full state goes to last_path, and to best_path whenever the
  validation loss improves; a fresh run also saves its starting state, so a recovery always has a state to go to;
- a stop request (SIGTERM, SIGINT) ends the current optimiser step, saves last_path with the step inside the epoch,
  and raises Stopped: --resume continues from that very step;
- a step with a non-finite gradient is skipped (Updater); max_skipped_steps of them in a row (seen at the end of
  the epoch) or a diverging validation loss restore last_path and multiply the learning rate by
  recovery_lr_factor; after max_recoveries restores the run stops with one clear line;
- patience epochs without a better validation loss end the run early.
"""
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from modules.config.settings import CONDITION_FILE
from modules.training.distributed import barrier
from modules.errors import InputError
from modules.training.guard import Guard, StopRequest, Stopped
from modules.training.state import Progress


@dataclass
class Task:
    """One training, as the epoch loop sees it."""

    name: str                   # "VAE" or "conditioner", for messages
    epochs: int
    patience: int               # 0: no early stopping
    watched: str                # the validation number divergence is judged on ("recon", "loss")
    learning_rate: Callable     # epoch -> the schedule's learning rate, before recoveries scale it
    optimizer: torch.optim.Optimizer
    train_epoch: Callable       # (epoch, first step, partial sums or None, guard) -> EpochResult
    validate: Callable          # () -> {"loss": float, ...}, the same on every rank
    record: Callable            # (epoch, train stats, val stats) -> {name: float}, the epoch's log record
    report: Callable            # (epoch, train stats, val stats) -> None, a progress line now and then
    save: Callable              # (path, progress) -> None, the full state; called on rank 0 only
    restore: Callable           # (path) -> Progress, loads the full state; called on every rank
    best_path: Path
    last_path: Path


@dataclass
class EpochResult:
    stats: dict | None          # the epoch's training averages; None when interrupted
    event: str | None = None    # why the epoch was interrupted: 'stop'
    step: int = 0               # optimiser steps done when interrupted
    sums: list | None = None    # the loss sums so far when interrupted, all ranks added


def run_epochs(task: Task, progress: Progress, config, runtime, log, say) -> Progress:
    """Train until every epoch is done or early stopping ends it; returns the final Progress (saved as last)."""
    with StopRequest() as stop:
        guard = Guard(config, runtime, stop)
        if progress == Progress(run_id=progress.run_id):  # a fresh start: a recovery needs a state to go back to
            save(task, task.last_path, progress, runtime)
        while not progress.finished:
            lr = set_learning_rate(task.optimizer, progress.lr_scale * task.learning_rate(progress.epoch))
            guard.new_epoch()
            result = task.train_epoch(progress.epoch, progress.step, progress.partial_sums, guard)
            if result.event == "stop":
                stop_now(task, dataclasses.replace(progress, step=result.step, partial_sums=result.sums), guard,
                         runtime, f"in epoch {progress.epoch + 1}, after optimiser step {result.step}")
            skipped, unstable = guard.end_epoch()
            if unstable:
                reason = f"{config.max_skipped_steps} optimiser steps in a row had a non-finite loss or gradient"
                progress = recover(task, progress, reason, config, runtime, log, say)
                guard.restart_count()
                continue
            val_stats = task.validate()
            diverged = guard.divergence(val_stats["loss"], val_stats[task.watched],
                                        best_of(progress.history, f"val/{task.watched}"))
            if diverged:
                progress = recover(task, progress, diverged, config, runtime, log, say)
                continue
            progress = end_epoch(task, progress, result.stats, val_stats, lr, skipped, config, runtime, log, say)
            if guard.stop_requested():
                stop_now(task, progress, guard, runtime, f"after epoch {progress.epoch}")
    return progress


def end_epoch(task, progress, train_stats, val_stats, lr, skipped, config, runtime, log, say) -> Progress:
    """Log the epoch, keep the best and the last state, decide whether training is over."""
    epoch = progress.epoch + 1
    record = {**task.record(epoch - 1, train_stats, val_stats), "lr": lr, "skipped_steps": skipped}
    improved = val_stats["loss"] < progress.best_val_loss
    best_loss, best_epoch = (val_stats["loss"], epoch) if improved else (progress.best_val_loss, progress.best_epoch)
    early = task.patience > 0 and epoch - best_epoch >= task.patience
    progress = dataclasses.replace(progress, epoch=epoch, step=0, partial_sums=None, best_val_loss=best_loss,
                                   best_epoch=best_epoch, finished=epoch >= task.epochs or early,
                                   history=progress.history + [record])
    if log is not None:
        log.log(epoch, record)
    task.report(epoch - 1, train_stats, val_stats)
    if improved:
        save(task, task.best_path, progress, runtime)
    if epoch % config.save_every == 0 or progress.finished:
        save(task, task.last_path, progress, runtime)
    if early and epoch < task.epochs:
        say(f"Early stop of the {task.name} at epoch {epoch}: no better validation loss for {task.patience} epochs "
            f"(best {best_loss:.4g} at epoch {best_epoch})")
    return progress


def recover(task, progress, reason, config, runtime, log, say) -> Progress:
    """Go back to the last saved state with a lower learning rate, or stop when restores have not helped."""
    if progress.recoveries >= config.max_recoveries:
        raise InputError(CONDITION_FILE, f"{task.name} training is unstable in epoch {progress.epoch + 1}: {reason}, "
                         f"after {progress.recoveries} restore(s) with a lower learning rate (max_recoveries "
                         f"{config.max_recoveries})", "lower the learning rate (LearningR or latent_conditioner_lr) "
                         "or grad_clip; the last good state is kept in checkpoints/")
    barrier(runtime)
    restored = task.restore(task.last_path)
    recovered = dataclasses.replace(restored, lr_scale=progress.lr_scale * config.recovery_lr_factor,
                                    recoveries=progress.recoveries + 1, best_val_loss=progress.best_val_loss,
                                    best_epoch=progress.best_epoch, finished=False)
    say(f"{task.name} epoch {progress.epoch + 1}: {reason}. Restored {task.last_path} (saved after epoch "
        f"{restored.epoch}) and lowered the learning rate to {recovered.lr_scale:g} x its schedule "
        f"(restore {recovered.recoveries} of max_recoveries {config.max_recoveries})")
    progress = recovered
    if log is not None:
        log.rewind(progress.history)
    return progress


def stop_now(task, progress, guard, runtime, where: str):
    save(task, task.last_path, progress, runtime)
    barrier(runtime)
    raise Stopped(guard.signal_number(), task.last_path, f"{where} of the {task.name}")


def save(task, path, progress, runtime) -> None:
    if runtime.is_main:
        task.save(path, progress)


def set_learning_rate(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def best_of(history: list, name: str) -> float:
    return min((record[name] for record in history if name in record), default=math.inf)


def starting_sums(partial_sums, size: int, runtime) -> torch.Tensor:
    """An epoch's running loss sums: zeros, or, resuming inside an epoch, the saved sums (all ranks added) on rank 0
    and zeros elsewhere, so that the epoch's final all-rank sum is right whatever the number of ranks."""
    if partial_sums is None or not runtime.is_main:
        return torch.zeros(size, device=runtime.device)
    return torch.tensor(partial_sums, dtype=torch.float32, device=runtime.device)
