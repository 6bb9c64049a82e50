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
    panels = [("total loss", ["train/loss", "val/loss"]), ("reconstruction", ["train/recon", "val/recon"]),
              ("KL (training)", ["train/kl_main"] + sorted(k for k in history[0] if k.startswith("train/kl_level"))),
              ("schedules", ["beta", "lr"])]
    return curves(plt, history, panels, path, columns=2)


@torch.no_grad()
def reconstruction_samples(plt, model, case, config, path):
    """True / reconstructed / |error| maps (time down, nodes across) for the first validation designs."""
    model.eval()
    batch = next(case.val.batches(in_order(min(SAMPLES_SHOWN, len(case.val)), SAMPLES_SHOWN)))
    true = case.scaler.inverse(batch.float().cpu().numpy())
    recon = case.scaler.inverse(reconstruct(model, batch).float().cpu().numpy())
    return field_comparison(plt, case.val_indices[:len(true)], true, recon, "reconstruction", path)


def field_comparison(plt, designs, true, other, other_label, path):
    """One row per design: simulated field, `other` on the same colour scale, and |other - simulated|."""
    figure, axes = plt.subplots(len(true), 3, figsize=(13, 3.2 * len(true)), squeeze=False)
    for row, design in enumerate(designs):
        low, high = true[row].min(), true[row].max()
        panels = [(true[row], f"design {design}: simulation", (low, high)),
                  (other[row], other_label, (low, high)),
                  (np.abs(other[row] - true[row]), "|error|", (None, None))]
        for axis, (image, title, (vmin, vmax)) in zip(axes[row], panels):
            shown = axis.imshow(image, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
            axis.set_title(title)
            axis.set_xlabel("node")
            axis.set_ylabel("time step")
            figure.colorbar(shown, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def conditioner_plots(history, samples, output_dir, samples_path, show=False, say=print) -> list:
    """Conditioner loss curves and a few validation designs (simulated, predicted from their condition, error).
    samples: (design indices, true fields, predicted fields), physical units."""
    show = show and can_show()
    plt = _pyplot(show)
    names = [name for name in history[0] if name.startswith(("train/", "val/")) and
             any(row[name] for row in history)]
    paths = [curves(plt, history, [("conditioner losses", names), ("learning rate", ["lr"])],
                    output_dir / "conditioner_loss_curves.png"),
             field_comparison(plt, *samples, "predicted from the design's condition", samples_path)]
    say(f"Plots saved: {', '.join(str(p) for p in paths)}")
    if show:
        plt.show()
    plt.close("all")
    return paths


def curves(plt, history, panels, path, columns=None):
    """One panel per (title, metric names), over epochs; log scale when every value is positive."""
    epochs = [row["epoch"] for row in history]
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    for axis, (title, names) in zip(axes.flat, panels):
        for name in names:
            axis.plot(epochs, [row[name] for row in history], label=name)
        axis.set_yscale("log" if all(row[n] > 0 for row in history for n in names) else "linear")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
