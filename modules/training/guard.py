"""Watching a training run: stop requests (SIGTERM, SIGINT), skipped steps and diverging losses.

Every decision is the same in all processes, so under DDP every rank skips the same steps, restores the same
checkpoint and stops at the same step: no rank is ever left waiting in a collective.
"""
import math
import signal
import threading

import torch

from modules.machine.processes import any_rank


class StopRequest:
    """Context of a training loop: SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) are noted, so that the loop can
    finish its optimiser step and save. After the first, SIGINT's usual handler comes back (a second Ctrl-C
    interrupts at once) but SIGTERM stays noted: torchrun answers a Ctrl-C by sending its workers SIGTERM, which must
    not cut their save short."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {number: signal.signal(number, self._note) for number in self.SIGNALS}
        return self

    def __exit__(self, *exception):
        self._restore()
        return False

    def _note(self, number, frame):
        self.signal_number = self.signal_number or number
        self._restore(signal.SIGINT)

    def _restore(self, *numbers):
        for number in numbers or list(self._previous):
            if number in self._previous:
                signal.signal(number, self._previous.pop(number))


class Guard:
    """Counts skipped optimiser steps, notices diverging validation losses and relays stop requests.

    The skip counts stay on the device during an epoch (no host sync per step) and are read once at its end: a run
    of max_skipped_steps skips in a row is acted on there. Stop requests are plain host flags, agreed between ranks
    over the CPU control group each step."""

    def __init__(self, config, runtime, stop: StopRequest):
        self.max_skipped_steps, self.divergence_factor = config.max_skipped_steps, config.divergence_factor
        self.runtime, self.stop = runtime, stop
        self.in_a_row = torch.zeros((), device=runtime.device)  # carries over from epoch to epoch
        self.new_epoch()

    def new_epoch(self) -> None:
        self.skipped = torch.zeros((), device=self.runtime.device)
        self.longest = torch.zeros((), device=self.runtime.device)

    def after_step(self, skipped: torch.Tensor) -> str | None:
        """Call after every optimiser step with Updater.step()'s flag. Returns 'stop' when a stop request reached
        any process, else None."""
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.skipped = self.skipped + skipped
        return "stop" if self.stop_requested() else None

    def restart_count(self) -> None:
        """After a restore the skips before it no longer count as 'in a row'."""
        self.in_a_row = torch.zeros((), device=self.runtime.device)

    def end_epoch(self) -> tuple:
        """(steps skipped this epoch, whether max_skipped_steps were skipped in a row): the epoch's one read."""
        skipped, longest = torch.stack([self.skipped, self.longest]).tolist()
        return int(skipped), longest >= self.max_skipped_steps

    def stop_requested(self) -> bool:
        """Whether any process has had a stop request (agreed by all)."""
        return any_rank(self.stop.signal_number is not None, self.runtime)

    def signal_number(self) -> int:
        """The signal that stopped the run; a process that did not get it itself reports SIGTERM."""
        return self.stop.signal_number or signal.SIGTERM

    def divergence(self, val_loss: float, watched: float, best_watched: float, floor: float) -> str | None:
        """Why this epoch's validation numbers mean the run has diverged, or None: the loss is not finite, or the
        watched part of it (the VAE's reconstruction error, the conditioner's loss) rose over divergence_factor
        times its best so far, or times floor when the best is below it (an error that small is good whatever its
        ratio to the best: a run that starts from POD's near-exact fit of a smooth case has not diverged when it
        fluctuates around it). Every rank sees the same all-reduced numbers."""
        if not (math.isfinite(val_loss) and math.isfinite(watched)):
            return f"the validation loss is {val_loss if not math.isfinite(val_loss) else watched}"
        if math.isfinite(best_watched) and watched > self.divergence_factor * max(best_watched, floor):
            return (f"the validation error {watched:.4g} is over divergence_factor = {self.divergence_factor:g} "
                    f"times its best so far ({best_watched:.4g})")
        return None
