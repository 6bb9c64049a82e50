"""Which PNG plots a run writes to output/, from its training history and its evaluation (evaluation.drawing
draws the evaluation's). --plot=1 saves them; --plot=0 also shows them, once, at the end of the run, and only when
there is a screen and a terminal: a headless or batch job never blocks on a window."""
import logging
import os
import sys

import matplotlib
import matplotlib.ticker
import numpy as np

from modules.config import CONDITION_FILE
from modules.config.keys import LOSS_NAMES, whole_numbers
from modules.data.field_layout import read_field_layout
from modules.errors import InputError
from modules.evaluation import drawing
from modules.models.conditioners import FEATURE_FRAME, LATENT_GP, LATENT_RBF, NEURAL_FIELD
from modules.storage.atomic import save_figure
from modules.storage.paths import OUTPUT_DIR, PREDICTION_PLOT

log = logging.getLogger(__name__)

SAMPLES_SHOWN = 3
# the unit of each loss of fields (training.losses.field_loss) on the scaled values; SmoothL1 is Huber / delta
LOSS_UNITS = {"MSE": "scaled units²", "MAE": "scaled units", "SmoothL1": "scaled units", "Huber": "scaled units²"}


def can_show() -> bool:
    has_screen = sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or
                                                             os.environ.get("WAYLAND_DISPLAY"))
    return has_screen and sys.stdin is not None and sys.stdin.isatty()


def will_show(asked: bool) -> bool:
    """Whether --plot=0's windows can be shown; says so when they cannot (they are still saved)."""
    if asked and not can_show():
        log.info("No screen or terminal to show plots on: they are only saved.")
    return asked and can_show()


def _pyplot(show: bool):
    if not show:
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def training_plots(history, evaluation, show=False, config=None) -> list:
    """The VAE's loss curves and its first validation designs (simulated, reconstructed, error). config: the current
    one (node layout, plot steps, loss); the VAE's own when None. Returns the PNG paths."""
    show = will_show(show)
    plt = _pyplot(show)
    config = config or evaluation.config
    paths = [loss_curves(plt, history, config, OUTPUT_DIR / "loss_curves.png"),
             field_samples(plt, evaluation, config, evaluation.reconstruct, "VAE reconstruction",
                           OUTPUT_DIR / "reconstruction_samples.png")]
    log.info(f"Plots saved: {', '.join(str(p) for p in paths)}")
    if show:
        plt.show()
    plt.close("all")
    return paths


def loss_curves(plt, history, config, path):
    """The VAE's losses as training.losses defines them: per design, the reconstruction term per value."""
    name = LOSS_NAMES[config.loss_type]
    total = "loss per design (nats)" if config.fixed_recon_weight is None else "loss per design (alpha-weighted)"
    panels = [("total loss", ["train/loss", "val/loss"], total),
              ("reconstruction", ["train/recon", "val/recon"], f"mean {name} per value ({LOSS_UNITS[name]})"),
              ("KL (training)", ["train/kl_main"] + sorted(k for k in history[0] if k.startswith("train/kl_level")),
               "KL per design (nats)"),
              ("schedules", ["beta", "lr"], "β and learning rate (no unit)")]
    return curves(plt, history, panels, path, columns=2)


def field_samples(plt, evaluation, config, predict, label, path):
    """The first SAMPLES_SHOWN validation designs: simulated, `label` (predict(designs) [n, T, M]) and |error|, as
    maps at a few time steps (drawing.field_snapshots) when config says where the nodes are, else as time x node
    images. Fewer designs (and steps) are shown when they would make more than MAX_SNAPSHOT_ROWS rows of maps."""
    layout, n_steps = read_field_layout(config), evaluation.case.array.sample_shape[0]
    designs = evaluation.case.val_indices[:SAMPLES_SHOWN]
    steps = chosen_steps(config, n_steps, len(designs) * layout.n_vars)[:drawing.MAX_SNAPSHOT_ROWS // layout.n_vars]
    designs = designs[:max(1, drawing.MAX_SNAPSHOT_ROWS // max(1, len(steps) * layout.n_vars))]
    true, other = evaluation.case.array.read(designs), predict(designs)
    if layout.kind == "line" or not steps:
        return field_comparison(plt, designs, true, other, label, path)
    return drawing.field_snapshots(plt, layout, designs, steps, true, other, label, path)


def field_comparison(plt, designs, true, other, other_label, path):
    """One row per design: simulated field, `other` on the same colour scale, and |other - simulated|, each as a
    time x node image (for fields whose node positions are unknown)."""
    figure, axes = plt.subplots(len(true), 3, figsize=(13, 3.2 * len(true)), squeeze=False)
    for row, design in enumerate(designs):
        low, high = true[row].min(), true[row].max()
        panels = [(true[row], f"design {design}: simulation", (low, high), drawing.VALUE_LABEL),
                  (other[row], other_label, (low, high), drawing.VALUE_LABEL),
                  (np.abs(other[row] - true[row]), "|error|", (None, None), drawing.ERROR_LABEL)]
        for axis, (image, title, (vmin, vmax), bar_label) in zip(axes[row], panels):
            shown = axis.imshow(image, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis", interpolation="nearest")
            axis.set_title(title)
            axis.set_xlabel("node index")
            axis.set_ylabel("time step index")
            figure.colorbar(shown, ax=axis, label=bar_label)
    figure.tight_layout()
    save_figure(path, figure, 110)
    return path


def conditioner_plots(history, evaluation, show=False, config=None) -> list:
    """The conditioner's loss curves and its first validation designs (simulated, predicted from their condition,
    error). config: the current one (node layout, plot steps); the VAE's when None. Returns the PNG paths."""
    show = will_show(show)
    plt = _pyplot(show)
    config = config or evaluation.config
    paths = [curves(plt, history, conditioner_panels(history, evaluation), OUTPUT_DIR / "conditioner_loss_curves.png",
                    columns=2),
             field_samples(plt, evaluation, config, evaluation.predict, "predicted from the design's condition",
                           PREDICTION_PLOT)]
    log.info(f"Plots saved: {', '.join(str(p) for p in paths)}")
    if show:
        plt.show()
    plt.close("all")
    return paths


def conditioner_panels(history, evaluation) -> list:
    """(title, names, y label) of the conditioner's curves: its objective; trained end to end, also the latent MSE
    and (when the objective adds the two) the field loss, each in a panel of its own since their scales differ by
    orders of magnitude; the learning rate."""
    facts = evaluation.conditioner.facts if evaluation.conditioner is not None else {}
    trained = facts.get("config", {})  # the conditioner's own settings, which a --lc_only run may have changed
    other = {LATENT_GP.kind: "the GP on the latents", LATENT_RBF.kind: "the RBF on the latents",
             NEURAL_FIELD.kind: "the neural field", FEATURE_FRAME.kind: "the feature-frame GP"}.get(
        facts.get("spec", {}).get("kind"))
    title = "conditioner objective" + (f"\n(this network was not kept: {other} predicts better)" if other else "")
    latent = "MSE of the standardised latents (no unit)"
    learning_rate = ("learning rate", ["lr"], "learning rate (no unit)")
    if not any(row.get("train/field_loss") for row in history):  # not end to end: the objective is the latent MSE
        return [(title, ["train/loss", "val/loss"], latent), learning_rate]
    name = trained.get("e2e_loss_function", "MSE")
    field = f"field {name} per value ({LOSS_UNITS.get(name, 'scaled units')})"
    if not trained.get("use_latent_regularization"):  # the objective is the field loss itself
        return [(title, ["train/loss", "val/loss"], field), ("latent MSE", ["train/latent_mse", "val/latent_mse"],
                                                            latent), learning_rate]
    weight = trained.get("latent_reg_weight")
    return [(title, ["train/loss", "val/loss"], f"field loss + {weight:g} x latent MSE (mixed units)"),
            ("field loss (through the decoder)", ["train/field_loss", "val/field_loss"], field),
            ("latent MSE", ["train/latent_mse", "val/latent_mse"], latent), learning_rate]


def curves(plt, history, panels, path, columns=None):
    """One panel per (title, metric names, y label), over epochs; log scale when every value is positive. Names
    missing from the history are left out, and a panel with none of its names."""
    epochs = [row["epoch"] for row in history]
    panels = [(title, [name for name in names if name in history[0]], ylabel) for title, names, ylabel in panels]
    panels = [panel for panel in panels if panel[1]]
    columns = min(columns or len(panels), len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    for axis, (title, names, ylabel) in zip(axes.flat, panels):
        for name in names:
            axis.plot(epochs, [row[name] for row in history], label=name)
        axis.set_yscale("log" if all(row[n] > 0 for row in history for n in names) else "linear")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    for axis in axes.flat[len(panels):]:
        axis.set_axis_off()
    figure.tight_layout()
    save_figure(path, figure, 110)
    return path


def evaluation_plots(evaluation, report, config, show=False) -> list:
    """The evaluation's PNGs in output/: simulated, predicted and error fields of chosen designs and time steps, for
    the VAE and the conditioner; the error per time step of every predictor; the main latents by PCA and t-SNE;
    active units per level; the reliability of the predicted uncertainty (calibration.png). Returns the paths.
    config: the current one (plot settings, node layout)."""
    show = will_show(show)
    plt = _pyplot(show)
    layout, n_steps = read_field_layout(config), evaluation.case.array.sample_shape[0]
    fields = [("reconstruction", report["reconstruction"]["vae"], "VAE reconstruction",
               evaluation.reconstruct)]
    if evaluation.prediction is not None:
        fields.append(("prediction", report["prediction"]["conditioner"], "predicted from the design's condition",
                       evaluation.predict))
    paths = []
    for name, summary, label, predict in fields:
        designs = chosen_designs(config, summary["per_design_relative_l2"])
        steps = chosen_steps(config, n_steps, len(designs) * config.n_vars)
        paths.append(drawing.field_snapshots(
            plt, layout, designs, steps, evaluation.case.array.read(designs), predict(np.asarray(designs)), label,
            OUTPUT_DIR / f"evaluation_{name}_fields.png"))
    paths.append(drawing.error_per_step(plt, error_curves(report), OUTPUT_DIR / "evaluation_error_per_step.png",
                                        ylabel="relative L2 error (%)"))
    colour, colour_label = design_colours(config, evaluation)
    is_validation = np.isin(np.arange(len(evaluation.encoding.main_latents)), evaluation.case.val_indices)
    paths.append(drawing.latent_maps(plt, evaluation.encoding.main_latents, colour, colour_label, is_validation,
                                     OUTPUT_DIR / "latent_space.png", evaluation.config.seed))
    paths.append(drawing.active_units(plt, evaluation.latent_summary, OUTPUT_DIR / "active_units.png"))
    if (report.get("uncertainty") or {}).get("reliability"):
        paths.append(drawing.reliability(plt, report["uncertainty"]["reliability"], OUTPUT_DIR / "calibration.png"))
    log.info(f"Evaluation plots saved: {', '.join(str(path) for path in paths)}")
    if show:
        plt.show()
    plt.close("all")
    return paths


def chosen_designs(config, per_design: dict) -> list:
    """plot_designs, or the validation designs with the median and the largest error of this predictor."""
    if config.plot_designs:
        return list(whole_numbers(config.plot_designs))
    ranked = sorted(per_design, key=lambda design: per_design[design])
    return list(dict.fromkeys([int(ranked[len(ranked) // 2]), int(ranked[-1])]))


def chosen_steps(config, n_steps: int, rows_per_step: int) -> list:
    """plot_steps, or a quarter of the way, half way and the last step (only the last when that makes more than
    MAX_SNAPSHOT_ROWS rows of maps)."""
    if config.plot_steps:
        return list(whole_numbers(config.plot_steps))
    steps = sorted({n_steps // 4, n_steps // 2, n_steps - 1})
    return steps if len(steps) * rows_per_step <= drawing.MAX_SNAPSHOT_ROWS else [n_steps - 1]


def error_curves(report) -> dict:
    """{label: relative L2 error per time step [T], in %} of every predictor in the report (NaN where undefined);
    percent, as every report prints it."""
    curves = {}
    for section in ("reconstruction", "prediction"):
        for name, summary in (report[section] or {}).items():
            repeated = section == "prediction" and name == "mean_field"  # the same curve as in reconstruction
            if isinstance(summary, dict) and "per_step" in summary and not repeated:
                values = summary["per_step"]["relative_l2"]
                curves[f"{section}: {report['labels'][name]}"] = 100 * np.array(
                    [np.nan if value is None else value for value in values])
    return curves


def design_colours(config, evaluation):
    """([N] values, label) colouring the latent-space plots: the plot_color_by parameter (default the first), or,
    when designs are not defined by parameters, each design's VAE reconstruction error."""
    conditions = evaluation.conditions
    if conditions is None or conditions.channels is not None:
        return 100 * evaluation.encoding.errors.relative_l2(), "VAE reconstruction error (relative L2, %)"
    column = parameter_column(config.plot_color_by, conditions.param_names, conditions.values.shape[1])
    label = conditions.param_names[column] if conditions.param_names else f"parameter {column + 1}"
    return conditions.values[:, column], label


def parameter_column(wanted: str, names, n_columns: int) -> int:
    """The 0-based column plot_color_by names: '' (the first), a 1-based number or a CSV header name."""
    if not wanted:
        return 0
    if wanted.isdigit() and 1 <= int(wanted) <= n_columns:
        return int(wanted) - 1
    lowered = [name.strip().lower() for name in names or []]
    if wanted.strip().lower() in lowered:
        return lowered.index(wanted.strip().lower())
    columns = ", ".join(names) if names else f"numbers 1 to {n_columns} (the CSV has no header)"
    raise InputError(CONDITION_FILE, f"plot_color_by {wanted} is not a parameter of param_dir",
                     f"name one of its columns: {columns}")
