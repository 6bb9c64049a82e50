"""Where a training run stands: what a checkpoint holds besides the weights, so that --resume continues exactly.

A checkpoint's "training" entry holds the optimiser (AdamW's moments and step counts), the fp16 loss scale, every
random generator (Python, NumPy, torch on the CPU and on this process's GPU) and Progress: epochs done, the step
inside an epoch that a stop request interrupted, the best validation loss, the learning-rate scale after recoveries
and the per-epoch log. All of it is tensors, numbers, strings and lists, so it loads with torch.load(weights_only=True).
The learning rate and the KL weight are pure functions of the epoch (training.schedules) times that scale, so no
scheduler object needs saving.
"""
import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modules.config.settings import changed_settings
from modules.errors import InputError
from modules.storage.model_files import read_payload


@dataclass(frozen=True)
class Progress:
    """How far one training (the VAE's or the conditioner's) has come."""

    epoch: int = 0                      # epochs completed
    step: int = 0                       # optimiser steps done inside epoch `epoch` when a stop request came
    partial_sums: list | None = None    # that epoch's loss sums so far, all processes added
    best_val_loss: float = math.inf     # the validation loss of the state kept (best_epoch's)
    best_score: float | None = math.inf  # its job.chosen_by (None: a checkpoint written before it was recorded)
    best_epoch: int = 0
    lr_scale: float = 1.0               # recovery_lr_factor ** (restores so far)
    recoveries: int = 0
    finished: bool = False              # every epoch done, or stopped early
    history: list = field(default_factory=list)  # one log record {name: float} per completed epoch
    run_id: str = ""                    # the run (storage.runs) this training belongs to; kept on --resume

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Progress":
        return cls(**{"best_score": None, **values})


def training_entry(optimizer, grad_scaler, progress: Progress, device: torch.device) -> dict:
    """The "training" entry of a checkpoint, taken now (call it between optimiser steps)."""
    return {"optimizer": optimizer.state_dict(), "grad_scaler": grad_scaler.state_dict(),
            "rng": random_states(device), "progress": progress.to_dict()}


def restore_training(payload: dict, path, model, optimizer, grad_scaler, device: torch.device) -> Progress:
    """Load a checkpoint's weights and "training" entry into the model, optimiser, loss scaler and random generators;
    return its Progress. A payload that does not fit is refused (InputError), never used in part."""
    try:
        model.load_state_dict(payload["state_dict"])
        entry = payload["training"]
        optimizer.load_state_dict(entry["optimizer"])
        if entry["grad_scaler"] and grad_scaler.is_enabled():  # empty when the checkpoint's run did not use fp16
            grad_scaler.load_state_dict(entry["grad_scaler"])
        set_random_states(entry["rng"], device)
        return Progress.from_dict(entry["progress"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise InputError(path, f"cannot be resumed ({type(error).__name__}: {str(error).splitlines()[0]})",
                         "resume from another checkpoint, or start a new run without --resume") from None


def random_states(device: torch.device) -> dict:
    """Every generator a run draws from (Python, NumPy, torch CPU and this process's GPU), as tensors and lists."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(internal), gauss],
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_random_states(states: dict, device: torch.device) -> None:
    """Put back what random_states took."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def read_checkpoint(path, config, formats: tuple, train_hint: str) -> dict:
    """A checkpoint to resume from, refused (InputError) unless it is whole, holds a training state and was written
    by a config that trains the same way as `config` (runtime settings such as device or amp may differ)."""
    if not Path(path).exists():
        raise InputError(path, "no checkpoint to resume from", "start the run without --resume, or give "
                         "--resume=PATH of a checkpoint (python SimulGen-VAE.py --checkpoints=list shows them)")
    return check_resumable(read_payload(path, formats=formats, train_hint=train_hint), path, config)


def check_resumable(payload: dict, path, config) -> dict:
    """The payload of a whole checkpoint file, if it can be resumed with config; InputError otherwise."""
    entry = payload.get("training")
    if not isinstance(entry, dict) or not {"optimizer", "grad_scaler", "rng", "progress"} <= set(entry):
        raise InputError(path, "holds weights but no training state to resume from",
                         "resume from checkpoints/last.pt of a run, or start a new run without --resume")
    try:
        Progress.from_dict(entry["progress"])
        changes = changed_settings(payload["config"], config)
    except (KeyError, TypeError) as error:
        raise InputError(path, f"is not a complete SimulGenVAE checkpoint ({type(error).__name__})",
                         "resume from another checkpoint, or start a new run without --resume") from None
    refuse_changes(changes, path)
    return payload


def refuse_changes(changes: list, path) -> None:
    """InputError naming the settings (config.settings.changed_settings) that differ from those path was written
    with; nothing where none does."""
    if changes:
        listed = "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")
        raise InputError(path, f"was written by another config ({listed})",
                         "restore those settings in preset.txt / input_data/condition.txt, or start a new run "
                         "without --resume (the old checkpoints are then archived)")
