"""PNG plots of a training run. --plot=1 saves them; --plot=0 also shows them, once, at the end of the run, and only
when there is a screen and a terminal: a headless or batch job never blocks on a window."""
import os
import sys

import matplotlib
import numpy as np
import torch

from modules.data import in_order
from modules.evaluate import reconstruct

SAMPLES_SHOWN = 3


def can_show() -> bool:
    has_screen = sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or
                                                             os.environ.get("WAYLAND_DISPLAY"))
    return has_screen and sys.stdin is not None and sys.stdin.isatty()


def _pyplot(show: bool):
    if not show:
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def training_plots(history, model, case, config, output_dir, show=False, say=print) -> list:
    """Loss curves and a few validation designs (true, reconstructed, error). Returns the PNG paths."""
    show = show and can_show()
    if config.plot == 0 and not show:
        say("No screen or terminal to show plots on: they are only saved.")
    plt = _pyplot(show)
    paths = [loss_curves(plt, history, output_dir / "loss_curves.png"),
             reconstruction_samples(plt, model, case, config, output_dir / "reconstruction_samples.png")]
    say(f"Plots saved: {', '.join(str(p) for p in paths)}")
    if show:
        plt.show()
    plt.close("all")
    return paths


def loss_curves(plt, history, path):
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("total loss", ["train/loss", "val/loss"]), ("reconstruction", ["train/recon", "val/recon"]),
              ("KL (training)", ["train/kl_main"] + sorted(k for k in history[0] if k.startswith("train/kl_level"))),
              ("schedules", ["beta", "lr"])]
    for axis, (title, names) in zip(axes.flat, panels):
        for name in names:
            values = np.array([row[name] for row in history], dtype=float)
            axis.plot(epochs, values, label=name)
        axis.set_yscale("log" if all(row[n] > 0 for row in history for n in names) else "linear")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


@torch.no_grad()
def reconstruction_samples(plt, model, case, config, path):
    """True / reconstructed / |error| maps (time down, nodes across) for the first validation designs."""
    model.eval()
    batch = next(case.val.batches(in_order(min(SAMPLES_SHOWN, len(case.val)), SAMPLES_SHOWN)))
    true = case.scaler.inverse(batch.float().cpu().numpy())
    recon = case.scaler.inverse(reconstruct(model, batch).float().cpu().numpy())
    figure, axes = plt.subplots(len(true), 3, figsize=(13, 3.2 * len(true)), squeeze=False)
    for row, design in enumerate(case.val_indices[:len(true)]):
        low, high = true[row].min(), true[row].max()
        panels = [(true[row], f"design {design}: simulation", (low, high)),
                  (recon[row], "reconstruction", (low, high)),
                  (np.abs(recon[row] - true[row]), "|error|", (None, None))]
        for axis, (image, title, (vmin, vmax)) in zip(axes[row], panels):
            shown = axis.imshow(image, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
            axis.set_title(title)
            axis.set_xlabel("node")
            axis.set_ylabel("time step")
            figure.colorbar(shown, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
