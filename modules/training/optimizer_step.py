"""How a training loop turns losses into parameter updates: the module it trains through (gradient checkpointing,
torch.compile, DistributedDataParallel), mixed-precision loss scaling, gradient accumulation and clipping.

    updater = Updater(training_module(model, config, runtime), optimizer, runtime, config.grad_clip)
    for step in steps:                                  # one optimiser step = grad_accum_steps micro-batches
        for micro_batch, last in step:
            with updater.accumulating(last):            # DDP all-reduces the gradients only on the last one
                with runtime.autocast():
                    loss = ...
                updater.backward(loss * weight)
        updater.step()                                  # skipped (weights untouched) if a gradient is not finite
"""
import math
from contextlib import nullcontext

import torch

from modules.data.batches import batch_order
from modules.machine.processes import shard, wrap_model
from modules.models.grad_checkpointing import enable_grad_checkpointing


def training_module(model, config, runtime):
    """What the training loop calls: model with gradient checkpointing if asked, compiled if asked, then wrapped for
    DDP under torchrun. It shares its parameters with model, which evaluation and saving keep using."""
    if config.grad_checkpointing:
        enable_grad_checkpointing(model)
    trainer = torch.compile(model) if config.compile else model
    return wrap_model(trainer, runtime)


def optimiser_steps(n_items: int, batch_size: int, accum_steps: int, seed: int, epoch: int, runtime) -> list:
    """An epoch of positions 0..n_items-1, shuffled by (seed, epoch), as optimiser steps of accum_steps batches:
    each step is this rank's [(positions, weight)] per micro-batch (see micro_batches)."""
    groups = batch_order(n_items, batch_size * accum_steps, shuffle=True, seed=seed, epoch=epoch)
    return [micro_batches(group, batch_size, runtime) for group in groups]


def micro_batches(group, batch_size: int, runtime):
    """One optimiser step's designs (positions, up to batch_size x grad_accum_steps of them) as this rank's
    [(positions, weight)] per micro-batch of batch_size; the weights make the accumulated gradient equal the
    gradient of the group's mean loss, however the group is cut up and spread over ranks."""
    parts = [group[start:start + batch_size] for start in range(0, len(group), batch_size)]
    shards = [shard(part, runtime) for part in parts]
    return [(local, weight * len(part) / len(group)) for part, (local, weight) in zip(parts, shards)]


def make_optimizer(parameters, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused: its step takes the skip flag (found_inf) as a device tensor, so skipping a non-finite step
    costs no host sync (GradScaler uses the same mechanism)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)


class Updater:
    """Backward passes and optimiser steps of one training run."""

    def __init__(self, trainer, optimizer, runtime, grad_clip: float):
        if not optimizer.defaults.get("fused"):
            raise ValueError("Updater needs a fused optimiser (make_optimizer): only it can skip a step on the device")
        self.trainer, self.optimizer, self.grad_clip = trainer, optimizer, grad_clip
        self.scaler = runtime.grad_scaler()  # active for fp16 only
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def accumulating(self, last: bool):
        """Context of one micro-batch's forward and backward: under DDP, gradients are all-reduced only in the
        optimiser step's last micro-batch (no_sync must cover the forward pass too)."""
        if last or not hasattr(self.trainer, "no_sync"):
            return nullcontext()
        return self.trainer.no_sync()

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Unscale, clip, step and reset. A step whose gradient is not finite (a NaN or Inf loss or gradient) is
        skipped: weights, AdamW moments and step count stay as they were. The decision stays on the device (the
        fused AdamW reads the flag there; the fp16 scaler has its own), so the host never waits for it. Returns that
        flag, a device scalar: 1.0 when the step was skipped. Under DDP the gradients are all-reduced before, so
        every rank sees the same norm and skips the same steps."""
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip if self.grad_clip > 0 else math.inf)
        skipped = (~torch.isfinite(norm)).float()
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on the inf/NaN that unscale_ found: the same gradients
        else:
            self.optimizer.found_inf, self.optimizer.grad_scale = skipped, None
            self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped
