"""PNG figures of an evaluation: field snapshots drawn in space, error per time step, latent maps, active units.

Every function takes `plt` (matplotlib.pyplot, its backend already chosen by the caller), writes one PNG at `path`
(dpi 110) and returns `path`. Figures are left open: the caller shows or closes them. Every axis and colourbar is
labelled with its unit; field values are in the case's physical units, which the data does not name, so they say
"physical units".
"""
import matplotlib.tri
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from modules.config.keys import MAX_FIELD_PLOT_ROWS
from modules.evaluation.latent_health import ACTIVE_KL
from modules.storage.atomic import save_figure

DPI = 110
MAX_SNAPSHOT_ROWS = MAX_FIELD_PLOT_ROWS  # one row is 3.3 inches: 24 rows is already a ~8700 pixel tall picture
COLUMN_WIDTH, ROW_HEIGHT = 4.4, 3.3  # inches per panel, so a figure's width grows with its columns
TSNE_MIN_DESIGNS = 4
VALUE_LABEL, ERROR_LABEL = "value (physical units)", "|error| (physical units)"


def _save(figure, path):
    save_figure(path, figure, DPI)
    return path


def field_snapshots(plt, layout, designs, steps, true, predicted, label, path):
    """One row per (design, step, variable): simulation, `label` (the prediction) on the same colour scale, and
    |error| on its own. true, predicted: [len(designs), T, M] physical values; designs: their indices (for titles);
    steps: time step indices. Maps (grid or coordinates layout) take 3 columns; a line layout takes 2 (simulation and
    prediction as two curves in one panel, then |error|). Raises ValueError for more than MAX_SNAPSHOT_ROWS rows."""
    rows = [(index, design, step, var) for index, design in enumerate(designs) for step in steps
            for var in range(layout.n_vars)]
    if len(rows) > MAX_SNAPSHOT_ROWS:
        raise ValueError(f"{len(rows)} snapshot rows asked for, at most {MAX_SNAPSHOT_ROWS}: show fewer designs or "
                         "steps")
    columns = 2 if layout.kind == "line" else 3
    width, height = COLUMN_WIDTH * columns, ROW_HEIGHT * len(rows)
    # maps: fixed margins in inches, since every row is alike (a constrained layout of so many panels, each with its
    # colourbar, costs seconds); curves: constrained, so that a long title fits
    figure, axes = plt.subplots(len(rows), columns, figsize=(width, height), squeeze=False,
                                layout="constrained" if layout.kind == "line" else None)
    if layout.kind != "line":
        figure.subplots_adjust(left=0.75 / width, right=1 - 0.8 / width, bottom=0.55 / height,
                               top=1 - 0.35 / height, wspace=0.5, hspace=0.55)
    for row_axes, (index, design, step, var) in zip(axes, rows):
        simulated = layout.variables(true[index, step])[var]
        other = layout.variables(predicted[index, step])[var]
        title = f"design {design}, step {step}" + (f" var {var}" if layout.n_vars > 1 else "")
        draw = _line_row if layout.kind == "line" else _map_row
        draw(figure, row_axes, layout, simulated, other, title, label)
    return _save(figure, path)


def _map_row(figure, axes, layout, simulated, other, title, label):
    """Three maps of one variable's nodes [M / n_vars]: simulation and prediction share a colour scale."""
    both = np.concatenate([simulated, other])
    limits = (np.nanmin(both), np.nanmax(both))
    panels = [(simulated, f"{title}: simulation", limits, VALUE_LABEL), (other, label, limits, VALUE_LABEL),
              (np.abs(other - simulated), "|error|", (None, None), ERROR_LABEL)]
    for axis, (values, name, (low, high), bar_label) in zip(axes, panels):
        shown = _draw_map(axis, layout, values, low, high)
        axis.set_title(name)
        figure.colorbar(shown, ax=axis, label=bar_label)


def _draw_map(axis, layout, values, low, high):
    """values [M / n_vars] drawn where the nodes are; returns the artist for the colourbar."""
    if layout.kind == "grid":
        axis.set_xlabel("grid column index")
        axis.set_ylabel("grid row index")
        # node spacing is unknown, so the grid fills the panel rather than assuming square cells
        return axis.imshow(values.reshape(layout.grid_shape), origin="lower", aspect="auto", vmin=low, vmax=high,
                           cmap="viridis", interpolation="nearest")
    x, y = layout.coordinates[:, 0], layout.coordinates[:, 1]
    axis.set_aspect("equal")
    axis.set_xlabel(f"x (units of {layout.position_key})")
    axis.set_ylabel(f"y (units of {layout.position_key})")
    try:  # on the mesh's own cells when mesh_file gave them, else on a Delaunay triangulation of the nodes
        triangles = matplotlib.tri.Triangulation(x, y, layout.triangles())
    except (RuntimeError, ValueError):  # Delaunay fails for collinear or too few nodes: show the nodes themselves
        return axis.scatter(x, y, c=values, s=12, vmin=low, vmax=high, cmap="viridis")
    # flat shading (each triangle the mean of its nodes): gouraud looks the same on a mesh and draws far slower
    return axis.tripcolor(triangles, values, shading="flat", vmin=low, vmax=high, cmap="viridis")


def _line_row(figure, axes, layout, simulated, other, title, label):
    """Simulation and prediction as curves over node index in one panel, |error| in the next."""
    nodes = np.arange(len(simulated))
    axes[0].plot(nodes, simulated, label="simulation")
    axes[0].plot(nodes, other, "--", label=label)
    axes[0].set_title(f"{title}: simulation and {label}", fontsize=9)  # a long predictor name must fit
    axes[0].set_ylabel(VALUE_LABEL)
    axes[0].legend(fontsize=7)
    axes[1].plot(nodes, np.abs(other - simulated), color="tab:red")
    axes[1].set_title("|error|")
    axes[1].set_ylabel(ERROR_LABEL)
    for axis in axes:
        axis.set_xlabel("node index")


def error_per_step(plt, curves: dict, path, ylabel="relative L2 error (%)"):
    """One line per {label: [T] values, in the unit ylabel names} over time step index (NaN where undefined leaves a
    gap); log scale when every finite value is positive. The title is ylabel without its unit."""
    figure, axis = plt.subplots(figsize=(7, 4.2 + 0.22 * len(curves)), layout="constrained")
    for label, values in curves.items():
        values = np.asarray(values, dtype=float)
        axis.plot(np.arange(len(values)), values, marker="." if len(values) <= 50 else None, label=label)
    finite = np.concatenate([np.asarray(v, dtype=float).ravel() for v in curves.values()] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    axis.set_yscale("log" if finite.size and (finite > 0).all() else "linear")
    axis.set_title(f"{ylabel.split(' (')[0]} per time step")
    axis.set_xlabel("time step index")
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)  # below: never over a curve
    return _save(figure, path)


def reliability(plt, curve: dict, path):
    """Observed against expected coverage of the central bands of the predicted spread (uncertainty.calibration):
    curve {"levels": [nominal], "raw": [observed], "calibrated": [observed] or None}, all shares; the diagonal is a
    perfectly calibrated spread."""
    figure, axis = plt.subplots(figsize=(5.4, 5.4), layout="constrained")
    levels = 100 * np.asarray(curve["levels"], dtype=float)
    axis.plot([0, 100], [0, 100], color="grey", linestyle="--", label="perfectly calibrated")
    axis.plot(levels, 100 * np.asarray(curve["raw"], dtype=float), marker="o", label="before calibration")
    if curve.get("calibrated") is not None:
        axis.plot(levels, 100 * np.asarray(curve["calibrated"], dtype=float), marker="s",
                  label="after calibration (each design held out)")
    axis.set_xlim(0, 100)
    axis.set_ylim(0, 100)
    axis.set_title("Reliability of the predicted uncertainty (validation designs)")
    axis.set_xlabel("expected share of values inside the band (%)")
    axis.set_ylabel("observed share of values inside the band (%)")
    axis.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def latent_maps(plt, latents, colour, colour_label, is_validation, path, seed=0):
    """The designs' latents [N, D] in 2-D by PCA (left) and t-SNE (right, needs N >= 4), coloured by colour [N]
    (one shared colourbar); is_validation [N] bool marks validation designs as triangles, training ones as circles."""
    latents = np.asarray(latents, dtype=np.float64)
    is_validation = np.asarray(is_validation, dtype=bool)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    norm = plt.Normalize(np.nanmin(colour), np.nanmax(colour))
    points, labels = _pca_points(latents)
    _scatter_designs(axes[0], points, colour, norm, is_validation)
    axes[0].set_title("latents: PCA")
    axes[0].set_xlabel(labels[0])
    axes[0].set_ylabel(labels[1])
    if len(latents) >= TSNE_MIN_DESIGNS:
        _scatter_designs(axes[1], _tsne_points(latents, seed), colour, norm, is_validation)
        axes[1].set_xlabel("t-SNE 1 (no unit)")
        axes[1].set_ylabel("t-SNE 2 (no unit)")
    else:
        axes[1].text(0.5, 0.5, f"t-SNE needs at least {TSNE_MIN_DESIGNS} designs", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[1].set_title("latents: t-SNE")
    figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=list(axes), label=colour_label)
    return _save(figure, path)


def _pca_points(latents):
    """[N, D] -> ([N, 2] PCA coordinates, two axis labels). A missing component (D == 1 or N < 3) stays at zero."""
    count = min(2, *latents.shape)
    pca = PCA(n_components=count).fit(latents)
    points = np.zeros((len(latents), 2))
    points[:, :count] = pca.transform(latents)
    labels = [f"PC{i + 1} (latent units; {100 * share:.0f} % of variance)"
              for i, share in enumerate(pca.explained_variance_ratio_)]
    return points, labels + ["PC2: none (all designs at 0)"] * (2 - count)


def _tsne_points(latents, seed):
    """[N, D] -> [N, 2] t-SNE embedding; perplexity kept below N as t-SNE requires."""
    perplexity = min(30, max(2, (len(latents) - 1) / 3))
    init = "pca" if latents.shape[1] >= 2 else "random"  # a PCA start needs two latent dimensions
    return TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed).fit_transform(latents)


def _scatter_designs(axis, points, colour, norm, is_validation):
    """Training designs as circles, validation designs as black-edged triangles, both coloured by colour."""
    colour = np.asarray(colour, dtype=float)
    for name, chosen, marker, edge in (("training", ~is_validation, "o", "none"),
                                       ("validation", is_validation, "^", "black")):
        if chosen.any():
            axis.scatter(points[chosen, 0], points[chosen, 1], c=colour[chosen], norm=norm, cmap="viridis",
                         marker=marker, edgecolors=edge, s=36, label=name)
    axis.legend(fontsize=8)


def active_units(plt, summary, path):
    """summary {group: {"units", "active", "kl", "kl_dims"}} (evaluation.latent_health.summarise) -> active units per
    group (left) and each dimension's mean KL in nats against the activity threshold ACTIVE_KL (right)."""
    names = list(summary)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    _active_bars(left, names, summary)
    for place, name in enumerate(names):
        kl = np.asarray(summary[name]["kl_dims"], dtype=float)
        spread = np.linspace(-0.3, 0.3, len(kl)) if len(kl) > 1 else np.zeros(len(kl))
        right.scatter(place + spread, kl, s=18)  # spread so a group's dimensions do not hide each other
    every = np.concatenate([np.asarray(summary[n]["kl_dims"], dtype=float) for n in names] or [np.zeros(0)])
    right.set_yscale("log" if every.size and (every > 0).all() else "linear")
    right.axhline(ACTIVE_KL, linestyle="--", color="tab:red", label=f"activity threshold ({ACTIVE_KL:g} nats)")
    right.set_xticks(range(len(names)), names)
    right.set_title("mean KL per latent dimension")
    right.set_xlabel("latent group")
    right.set_ylabel("KL (nats)")
    right.legend(fontsize=8)
    return _save(figure, path)


def _active_bars(axis, names, summary):
    """Active units over total units per group, annotated "active / units"."""
    units = [summary[name]["units"] for name in names]
    active = [summary[name]["active"] for name in names]
    axis.bar(names, units, color="lightgray", label="units")
    axis.bar(names, active, color="tab:blue", label="active units")
    for place, (used, total) in enumerate(zip(active, units)):
        axis.annotate(f"{used} / {total}", (place, total), ha="center", va="bottom", fontsize=8)
    axis.set_ylim(0, max(units + [1]) * 1.15)  # room for the annotations above the tallest bar
    axis.set_title("active latent units")
    axis.set_xlabel("latent group")
    axis.set_ylabel("latent units (count)")
    axis.legend(fontsize=8)
