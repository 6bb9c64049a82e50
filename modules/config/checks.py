"""Checks across keys (crops inside the data, enough designs, schedules in order, time steps enough for the
encoder's levels, plot and conditioner settings that fit the data), and notes on keys that cannot act."""
import logging
import math

from modules.config.keys import DEFAULT_PLOT_DESIGNS, KEYS_BY_FIELD, MAX_FIELD_PLOT_ROWS, whole_numbers
from modules.config.settings import level_lengths
from modules.errors import InputError

log = logging.getLogger(__name__)


def check_consistency(config, path, lines: dict) -> None:
    """Cross-key checks: crops inside the data, enough designs to split, schedule fractions in order, enough time
    steps for the encoder's levels. The error points at the line of the first key involved that the file gives."""
    problems = [
        (config.n_steps_used > config.n_steps, ("n_steps_used", "n_steps"),
         f"Dim2_red = {config.n_steps_used} exceeds Dim2 = {config.n_steps}", "set Dim2_red <= Dim2"),
        (not config.node_start < config.node_end <= config.n_nodes, ("node_end", "node_start", "n_nodes"),
         f"node crop Dim3_start = {config.node_start}, Dim3_end = {config.node_end} is not inside 0..Dim3 = "
         f"{config.n_nodes}", "set 0 <= Dim3_start < Dim3_end <= Dim3"),
        (config.n_nodes_used % config.n_vars != 0, ("n_vars", "node_end", "n_nodes"),
         f"{config.n_nodes_used} nodes kept do not split into num_var = {config.n_vars} equal variables",
         "make Dim3_end - Dim3_start a multiple of num_var"),
        (config.n_designs < 2, ("n_designs",), f"Dim1 = {config.n_designs} leaves nothing to validate on",
         "use at least 2 designs"),
        (config.beta_hold_fraction > config.beta_ramp_end_fraction, ("beta_hold_fraction", "beta_ramp_end_fraction"),
         "beta_hold_fraction is after beta_ramp_end_fraction", "set beta_hold_fraction <= beta_ramp_end_fraction"),
        (config.recon_weight == "auto" and config.loss_type not in (1, 2), ("recon_weight", "loss_type"),
         f"alpha auto is a Gaussian (Loss_type 1) or Laplace (Loss_type 2) likelihood; Loss_type {config.loss_type} "
         "is neither", "give alpha a number (e.g. alpha 1e6) or use Loss_type 1 or 2"),
        *_time_axis_problems(config, lines),
        *_plot_problems(config),
        *_conditioner_problems(config),
    ]
    for failed, fields, problem, fix in problems:
        if failed:
            line = next((lines[field] for field in fields if field in lines), None)
            raise InputError(path, problem, fix, line)


def _time_axis_problems(config, lines: dict) -> list:
    """(failed, fields, problem, fix) rows for time steps too few for the encoder's levels.

    Level l (0 = finest) holds ceil(T / 2**l) time steps (level_lengths, which the VAE's levels use too) and its
    ResBlocks norm with GroupNorm(gcd(width, 8) groups). GroupNorm refuses a group of a single value ("Expected more
    than 1 value per channel"), which a batch of one design meets at a level of 1 step whose width is 1, 2, 4 or 8
    (one channel per group). Batches of one design are routine (the last batch of an epoch, --predict or
    --reconstruct of one design), so such a config is refused before any training starts.
    """
    steps, lengths = config.n_steps_used, level_lengths(config.n_steps_used, config.n_levels)
    single = [level for level, (width, length) in enumerate(zip(config.encoder_filters, lengths))
              if length == 1 and width // math.gcd(width, 8) == 1]
    if not single:
        return []
    level, name = single[-1], "Dim2_red" if "n_steps_used" in lines else "Dim2"
    needed = 2 ** level + 1  # ceil(T / 2**level) >= 2
    width = config.encoder_filters[level]
    return [(True, ("n_steps_used", "n_steps"),
             f"{name} = {steps} time steps shrink to 1 at encoder level {level + 1} of {len(lengths)} (preset.txt "
             f"encoder filters {' '.join(map(str, config.encoder_filters))}), where width {width} leaves GroupNorm "
             "one value per group for a single design",
             f"keep at least {needed} time steps ({name}) or use fewer encoder filters in preset.txt (or give that "
             "level a width other than 1, 2, 4 or 8)")]


def _plot_problems(config) -> list:
    """(failed, fields, problem, fix) rows for the plot keys that depend on the data's shape."""
    nodes = config.n_nodes_used // config.n_vars
    grid, designs, steps = (whole_numbers(text) for text in (config.grid_shape, config.plot_designs, config.plot_steps))
    return [
        (bool(grid) and math.prod(grid) != nodes, ("grid_shape",),
         f"grid_shape {' x '.join(map(str, grid))} holds {math.prod(grid or [0])} nodes, but each variable has "
         f"{nodes} (Dim3_end - Dim3_start = {config.n_nodes_used}, num_var = {config.n_vars})",
         "give H W with H x W = the nodes of one variable, or drop grid_shape"),
        (sum(map(bool, (grid, config.node_coordinates, config.mesh_file))) > 1,
         tuple(key for key in ("grid_shape", "mesh_file", "node_coordinates") if getattr(config, key)),
         " and ".join(key for key in ("grid_shape", "mesh_file", "node_coordinates") if getattr(config, key))
         + " each say where the nodes are", "keep one of them"),
        (any(design >= config.n_designs for design in designs), ("plot_designs",),
         f"plot_designs {config.plot_designs} names a design beyond Dim1 = {config.n_designs}",
         f"use indices from 0 to {config.n_designs - 1}"),
        (any(step >= config.n_steps_used for step in steps), ("plot_steps",),
         f"plot_steps {config.plot_steps} names a step beyond the {config.n_steps_used} time steps kept",
         f"use steps from 0 to {config.n_steps_used - 1}"),
        ((len(designs) or DEFAULT_PLOT_DESIGNS) * max(1, len(steps)) * config.n_vars > MAX_FIELD_PLOT_ROWS,
         ("plot_designs", "plot_steps"), f"plot_designs ({DEFAULT_PLOT_DESIGNS} when not given) x plot_steps x "
         f"num_var asks for more than {MAX_FIELD_PLOT_ROWS} rows of field plots", "choose fewer"),
    ]


def _conditioner_problems(config) -> list:
    """(failed, fields, problem, fix) rows for the latent-conditioner keys."""
    images = config.input_type in ("image", "image_vit")
    return [
        (config.has_conditioner and not config.param_dir, ("input_type",),
         f"input_type {config.input_type} needs param_dir",
         "add 'param_dir <the parameter CSV or the image folder>' (relative to the case folder)"),
        (config.input_type == "csv" and config.condition_extension != ".csv", ("param_data_type",),
         f"param_data_type {config.param_data_type} does not fit input_type csv", "set param_data_type .csv"),
        (images and config.condition_extension == ".csv", ("param_data_type",),
         f"param_data_type .csv does not fit input_type {config.input_type}", "set param_data_type .png or .jpg"),
        (config.input_type == "image_vit" and config.image_size % config.vit_patch_size != 0,
         ("vit_patch_size", "image_size"), f"vit_patch_size {config.vit_patch_size} does not divide image_size "
         f"{config.image_size}", "choose a patch size that divides the image size (e.g. 8 or 16)"),
        (config.input_type == "image_vit" and config.vit_dim % config.vit_heads != 0, ("vit_heads", "vit_dim"),
         f"vit_heads {config.vit_heads} does not divide vit_dim {config.vit_dim}",
         "make vit_dim a multiple of vit_heads"),
        (config.use_e2e_training and not config.has_conditioner, ("use_e2e_training", "input_type"),
         "use_e2e_training 1 trains a conditioner, but input_type is none", "set input_type csv, image or image_vit"),
    ]


def note_keys_without_effect(config, path, lines: dict) -> None:
    """A key the file gives that cannot act in this setup gets a note, so no setting is silently ignored."""
    for field, line in sorted(lines.items(), key=lambda item: item[1]):
        key = KEYS_BY_FIELD[field]
        if key.only_with is not None and not key.only_with[0](config):
            log.warning(f"{path}:{line}: note: '{key.name}' has no effect because {key.only_with[1]}")
