"""Read preset.txt and input_data/condition.txt into one frozen, validated Config.

This is the only module that knows the users' file formats. Every condition.txt key is declared once in KEYS with its
type, default, check and a one-line description (the README's key table mirrors it; a test keeps them in step).
Command-line flags that are also settings of the run (size, load_all, plot, device) override the file's values.
"""
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from modules.errors import InputError

PRESET_FILE = Path("preset.txt")
CONDITION_FILE = Path("input_data/condition.txt")
REQUIRED = object()  # default marker for keys the user must give


@dataclass(frozen=True)
class Key:
    """One condition.txt key: its name in the file, the Config field it fills, and how to read and check it."""

    name: str
    field: str
    kind: type
    default: object
    help: str
    check: object = None  # callable(value) -> error text or None
    choices: tuple = ()


def _positive(value):
    return None if value > 0 else "must be > 0"


def _non_negative(value):
    return None if value >= 0 else "must be >= 0"


def _fraction(value):
    return None if 0 <= value <= 1 else "must be between 0 and 1"


MAX_FIELD_PLOT_ROWS = 24  # rows of field maps in one plot (designs x steps x variables): 3.3 inches each


def whole_numbers(text: str) -> tuple:
    """A list key as written ('3 7 12' or '3, 7, 12'; checked by _whole_numbers) -> (3, 7, 12); '' -> ()."""
    return tuple(int(word) for word in text.replace(",", " ").split())


def _whole_numbers(text: str, what: str, count: int | None = None, positive: bool = False):
    """Check a space-separated list of whole numbers (>= 0, or > 0 when positive); count: exactly that many."""
    words = text.replace(",", " ").split()
    if not all(word.isdigit() for word in words) or (positive and any(int(word) == 0 for word in words)):
        return f"must be {'positive' if positive else 'non-negative'} whole {what} separated by spaces"
    if count is not None and len(words) != count:
        return f"must be {count} whole numbers"
    return None


KEYS = (
    Key("Dim1", "n_designs", int, REQUIRED, "number of designs N in the dataset", _positive),
    Key("Dim2", "n_steps", int, REQUIRED, "number of time steps T in the dataset", _positive),
    Key("Dim3", "n_nodes", int, REQUIRED, "number of mesh nodes M in the dataset", _positive),
    Key("Dim2_red", "n_steps_used", int, None, "time steps kept, evenly spaced over T (default: all T)", _positive),
    Key("Dim3_start", "node_start", int, 0, "first node kept (crop start, 0-based)", _non_negative),
    Key("Dim3_end", "node_end", int, None, "one past the last node kept (default: M)", _positive),
    Key("num_var", "n_vars", int, 1, "variables stored side by side along the node axis, each scaled on its own",
        _positive),
    Key("Training_epochs", "epochs", int, REQUIRED, "VAE training epochs", _positive),
    Key("Batch_size", "batch_size", int, 16, "designs per training batch", _positive),
    Key("LearningR", "lr", float, 1e-3, "peak learning rate of AdamW", _positive),
    Key("Latent_dim", "level_latent_dim", int, 8, "latent size of each hierarchical level", _positive),
    Key("Latent_dim_end", "main_latent_dim", int, 32, "size of the main latent", _positive),
    Key("Loss_type", "loss_type", int, 1, "reconstruction loss: 1 MSE, 2 MAE, 3 SmoothL1, 4 Huber",
        choices=(1, 2, 3, 4)),
    Key("alpha", "recon_weight", float, 1e6, "weight of the reconstruction term", _positive),
    Key("Recon_iter", "recon_samples", int, 1, "posterior samples averaged in the reconstruction term", _positive),
    Key("huber_delta", "huber_delta", float, 0.1, "threshold of SmoothL1/Huber, in scaled units", _positive),
    Key("seed", "seed", int, 42, "seeds Python, NumPy, torch and the train/validation split", _non_negative),
    Key("val_fraction", "val_fraction", float, 0.2, "share of designs held out for validation",
        lambda v: None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"),
    Key("beta_hold_fraction", "beta_hold_fraction", float, 0.3,
        "share of epochs the KL weight stays at its start value", _fraction),
    Key("beta_ramp_end_fraction", "beta_ramp_end_fraction", float, 0.8,
        "share of epochs by which the KL weight has risen to 1", _fraction),
    Key("warmup_fraction", "warmup_fraction", float, 0.05, "share of epochs of linear learning-rate warmup",
        lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1"),
    Key("lr_cycles", "lr_cycles", int, 1, "cosine warm-restart cycles after warmup", _positive),
    Key("lr_min", "lr_min", float, 1e-6, "learning rate at the bottom of each cosine cycle", _non_negative),
    Key("weight_decay", "weight_decay", float, 1e-4, "AdamW weight decay", _non_negative),
    Key("grad_clip", "grad_clip", float, 5.0, "gradient-norm clipping threshold (0 turns clipping off)",
        _non_negative),
    Key("free_bits", "free_bits", float, 0.0, "KL floor per latent dimension in nats: a dimension whose batch-mean "
        "KL is below it adds free_bits to the loss instead, so the KL term stops pushing it towards collapse",
        _non_negative),
    Key("patience", "patience", int, 0,
        "stop the VAE after this many epochs without a better validation loss (0: never)", _non_negative),
    Key("save_every", "save_every", int, 10,
        "write checkpoints/last.pt, the full training state, every this many epochs", _positive),
    Key("max_skipped_steps", "max_skipped_steps", int, 20, "optimiser steps in a row with a non-finite loss or "
        "gradient that are skipped before the run restores its last checkpoint", _positive),
    Key("divergence_factor", "divergence_factor", float, 10.0, "a validation loss above this many times the best "
        "so far (or not finite) restores the last checkpoint", lambda v: None if v > 1 else "must be > 1"),
    Key("recovery_lr_factor", "recovery_lr_factor", float, 0.5,
        "each restore of the last checkpoint multiplies the learning rate by this",
        lambda v: None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"),
    Key("max_recoveries", "max_recoveries", int, 3,
        "restores of the last checkpoint a run may make before it stops with an error", _non_negative),
    Key("deterministic", "deterministic", int, 0, "1: torch's deterministic algorithms (ops that have none warn)",
        choices=(0, 1)),
    Key("projection_rank", "projection_rank", int, 128,
        "width of the POD-initialised node projection (first and last layers)", _positive),
    Key("augment_noise_std", "augment_noise_std", float, 0.0, "Gaussian noise added to training inputs (scaled units)",
        _non_negative),
    Key("augment_amplitude", "augment_amplitude", float, 0.0,
        "training inputs scaled by a random factor in [1-a, 1+a]", _fraction),
    Key("augment_mixup_prob", "augment_mixup_prob", float, 0.0,
        "probability that a training design is mixed with another training design of its batch", _fraction),
    Key("num_workers", "num_workers", str, "auto", "DataLoader worker processes when streaming (load_all 0): "
        "auto or a count", lambda v: None if v == "auto" or v.isdigit() else "must be auto or a whole number >= 0"),
    Key("hdf5_dataset", "hdf5_dataset", str, "", "dataset name inside an HDF5 file (default: its only dataset)"),
    Key("log_every", "log_every", int, 0, "print a summary line every this many epochs (0: about 20 lines a run)",
        _non_negative),
    Key("size", "size", str, "small", "model size: small (1 block per level) or large (2 blocks, wider heads)",
        choices=("small", "large")),
    Key("load_all", "load_all", int, 0, "1: preload the scaled data on the device; 0: stream from the file",
        choices=(0, 1)),
    Key("plot", "plot", int, 2, "0: save PNG plots and show them; 1: save PNGs; 2: no plots", choices=(0, 1, 2)),
    Key("plot_designs", "plot_designs", str, "", "designs (0-based indices) whose fields the plots show (default: "
        "the validation designs with the median and the largest error)", lambda v: _whole_numbers(v, "indices")),
    Key("plot_steps", "plot_steps", str, "", "time steps (0-based, of the steps kept) the field plots show "
        "(default: a quarter, half way and the last)", lambda v: _whole_numbers(v, "time steps")),
    Key("plot_color_by", "plot_color_by", str, "", "parameter (CSV column name or 1-based number) that colours the "
        "latent-space plots (default: the first parameter; without a CSV, each design's reconstruction error)"),
    Key("grid_shape", "grid_shape", str, "", "H W: each variable's nodes form an H x W grid (row-major), so fields "
        "are drawn as maps", lambda v: _whole_numbers(v, "grid sizes", count=2, positive=True)),
    Key("node_coordinates", "node_coordinates", str, "", ".npy or .csv of x, y (2 or 3 columns) per node of one "
        "variable, in node order, so fields are drawn as maps on the mesh"),
    Key("device", "device", str, "auto", "auto, cpu, cuda or cuda:N",
        lambda v: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N"),
    Key("amp", "amp", str, "auto", "mixed precision: auto (bf16 on GPUs that have it, else fp16; float32 on the CPU), "
        "bf16, fp16 or off", choices=("auto", "bf16", "fp16", "off")),
    Key("grad_checkpointing", "grad_checkpointing", int, 0,
        "1: recompute each level's activations in the backward pass instead of keeping them", choices=(0, 1)),
    Key("compile", "compile", int, 0, "1: train through torch.compile of the model", choices=(0, 1)),
    Key("grad_accum_steps", "grad_accum_steps", int, 1,
        "batches whose gradients are summed before each optimiser step", _positive),
    # ---- latent conditioner: maps what defines a design (CSV row or geometry image) to its latents
    Key("input_type", "input_type", str, "none",
        "what defines a design: none (train the VAE only), csv (parameters, MLP), image (CNN) or image_vit (ViT)",
        choices=("none", "csv", "image", "image_vit")),
    Key("param_dir", "param_dir", str, "",
        "the parameter CSV (input_type csv) or the image folder (image, image_vit), relative to the case folder"),
    Key("param_data_type", "param_data_type", str, "", "file type of param_dir: .csv, .png or .jpg "
        "(default: .csv for csv, .png for images)",
        lambda v: None if v.lower().lstrip(".") in ("csv", "png", "jpg", "jpeg") else "must be .csv, .png or .jpg"),
    Key("num_param", "num_param", int, 0, "columns of the parameter CSV, checked when given (0: take the file's)",
        _non_negative),
    Key("image_size", "image_size", int, 256, "images are resized to image_size x image_size pixels", _positive),
    Key("n_epoch", "lc_epochs", int, 500, "latent-conditioner training epochs", _positive),
    Key("latent_conditioner_lr", "lc_lr", float, 1e-3, "peak learning rate of the conditioner's AdamW", _positive),
    Key("latent_conditioner_batch", "lc_batch_size", int, 16, "designs per conditioner batch", _positive),
    Key("latent_conditioner_dropout_rate", "lc_dropout", float, 0.1,
        "conditioner dropout (the MLP's deepest block; shallower blocks drop less)",
        lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1"),
    Key("latent_conditioner_weight_decay", "lc_weight_decay", float, 1e-4, "conditioner AdamW weight decay",
        _non_negative),
    Key("lc_patience", "lc_patience", int, 100,
        "stop the conditioner after this many epochs without a better validation loss (0: never)", _non_negative),
    Key("use_spatial_attention", "use_spatial_attention", int, 0, "1: spatial attention in the CNN's stages",
        choices=(0, 1)),
    Key("lc_augment_flip", "lc_augment_flip", int, 0,
        "1: random horizontal/vertical flips of training images (only if your geometry is symmetric)", choices=(0, 1)),
    Key("lc_augment_shift", "lc_augment_shift", int, 0, "random shifts of training images by up to this many pixels",
        _non_negative),
    Key("vit_patch_size", "vit_patch_size", int, 16, "ViT patch size in pixels (must divide image_size)", _positive),
    Key("vit_dim", "vit_dim", int, 256, "ViT token width", _positive),
    Key("vit_depth", "vit_depth", int, 6, "ViT transformer blocks", _positive),
    Key("vit_heads", "vit_heads", int, 8, "ViT attention heads (must divide vit_dim)", _positive),
    Key("vit_drop_path", "vit_drop_path", float, 0.1, "ViT stochastic depth rate of the last block",
        lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1"),
    Key("use_e2e_training", "use_e2e_training", int, 0,
        "1: train the conditioner through the frozen VAE decoder on the field reconstruction loss", choices=(0, 1)),
    Key("e2e_loss_function", "e2e_loss_function", str, "MSE", "field loss of end-to-end training",
        choices=("MSE", "MAE", "Huber", "SmoothL1")),
    Key("use_latent_regularization", "use_latent_regularization", int, 0,
        "1: end-to-end training also pulls the predicted latents towards the VAE's latents", choices=(0, 1)),
    Key("latent_reg_weight", "latent_reg_weight", float, 1e-3, "weight of that latent term", _non_negative),
    Key("e2e_vae_model_path", "e2e_vae_model_path", str, "",
        "VAE that --lc_only=1 end-to-end training decodes through (default: model_save/SimulGen-VAE)"),
)
KEYS_BY_NAME = {key.name.lower(): key for key in KEYS}

# Keys that only act in some setups: given while they cannot act, they are reported (never silently ignored).
ONLY_WITH = {
    **{field: (lambda c: c.input_type != "none", "input_type is none (VAE only)") for field in (
        "param_dir", "param_data_type", "num_param", "lc_epochs", "lc_lr", "lc_batch_size", "lc_dropout",
        "lc_weight_decay", "lc_patience", "use_e2e_training")},
    **{field: (lambda c: c.input_type in ("image", "image_vit"), "input_type is not an image type") for field in (
        "image_size", "lc_augment_flip", "lc_augment_shift")},
    "use_spatial_attention": (lambda c: c.input_type == "image", "input_type is not image (CNN)"),
    **{field: (lambda c: c.input_type == "image_vit", "input_type is not image_vit") for field in (
        "vit_patch_size", "vit_dim", "vit_depth", "vit_heads", "vit_drop_path")},
    **{field: (lambda c: c.use_e2e_training == 1, "use_e2e_training is 0") for field in (
        "e2e_loss_function", "use_latent_regularization", "e2e_vae_model_path")},
    **{field: (lambda c: c.plot < 2, "plot is 2 (no plots)") for field in (
        "plot_designs", "plot_steps", "plot_color_by", "grid_shape", "node_coordinates")},
    "latent_reg_weight": (lambda c: c.use_e2e_training == 1 and c.use_latent_regularization == 1,
                          "use_e2e_training or use_latent_regularization is 0"),
}


# Settings a resumed run may change: where and how fast it runs, how it logs, and how it reacts to trouble. Every other
# setting shapes the model or its training, so a checkpoint is resumed only with the config that wrote it.
RESUMABLE_CHANGES = frozenset({
    "preset_index", "device", "amp", "load_all", "num_workers", "plot", "plot_designs", "plot_steps", "plot_color_by",
    "grid_shape", "node_coordinates", "log_every", "compile", "grad_checkpointing",
    "save_every", "patience", "lc_patience", "max_skipped_steps", "divergence_factor", "recovery_lr_factor",
    "max_recoveries", "deterministic"})
PRESET_NAMES = {"data_no": "preset data_No", "init_beta_divisor": "preset init_beta_divisor",
                "encoder_filters": "preset encoder filters", "conditioner_filters": "preset conditioner filters"}


def changed_settings(saved: dict, config: "Config") -> list:
    """'name saved -> now' for each setting that differs between a saved config (Config.to_dict) and config,
    leaving out RESUMABLE_CHANGES; names as the user writes them (condition.txt keys, preset lines)."""
    names = {**{key.field: key.name for key in KEYS}, **PRESET_NAMES}
    now = Config.from_dict(saved).to_dict()  # fills keys newer than the saved config with their defaults
    current = config.to_dict()
    return [f"{names.get(field, field)} {now[field]} -> {current[field]}" for field in current
            if field not in RESUMABLE_CHANGES and now.get(field) != current[field]]

@dataclass(frozen=True)
class Preset:
    """One 4-line block of preset.txt."""

    data_no: int
    init_beta_divisor: float
    encoder_filters: tuple
    conditioner_filters: tuple


@dataclass(frozen=True)
class Config:
    """Everything a run needs, typed and checked. Field docs live in KEYS (condition.txt) and Preset."""

    preset_index: int
    data_no: int
    init_beta_divisor: float
    encoder_filters: tuple
    conditioner_filters: tuple
    n_designs: int
    n_steps: int
    n_nodes: int
    n_steps_used: int
    node_start: int
    node_end: int
    n_vars: int
    epochs: int
    batch_size: int
    lr: float
    level_latent_dim: int
    main_latent_dim: int
    loss_type: int
    recon_weight: float
    recon_samples: int
    huber_delta: float
    seed: int
    val_fraction: float
    beta_hold_fraction: float
    beta_ramp_end_fraction: float
    warmup_fraction: float
    lr_cycles: int
    lr_min: float
    weight_decay: float
    grad_clip: float
    free_bits: float
    patience: int
    save_every: int
    max_skipped_steps: int
    divergence_factor: float
    recovery_lr_factor: float
    max_recoveries: int
    deterministic: int
    projection_rank: int
    augment_noise_std: float
    augment_amplitude: float
    augment_mixup_prob: float
    num_workers: str
    hdf5_dataset: str
    log_every: int
    size: str
    load_all: int
    plot: int
    plot_designs: str
    plot_steps: str
    plot_color_by: str
    grid_shape: str
    node_coordinates: str
    device: str
    amp: str
    grad_checkpointing: int
    compile: int
    grad_accum_steps: int
    input_type: str
    param_dir: str
    param_data_type: str
    num_param: int
    image_size: int
    lc_epochs: int
    lc_lr: float
    lc_batch_size: int
    lc_dropout: float
    lc_weight_decay: float
    lc_patience: int
    use_spatial_attention: int
    lc_augment_flip: int
    lc_augment_shift: int
    vit_patch_size: int
    vit_dim: int
    vit_depth: int
    vit_heads: int
    vit_drop_path: float
    use_e2e_training: int
    e2e_loss_function: str
    use_latent_regularization: int
    latent_reg_weight: float
    e2e_vae_model_path: str

    @property
    def n_nodes_used(self) -> int:
        return self.node_end - self.node_start

    @property
    def n_levels(self) -> int:
        return len(self.encoder_filters)

    @property
    def latent_size(self) -> int:
        """Numbers per design: the main latent plus every level's latent."""
        return self.main_latent_dim + self.n_levels * self.level_latent_dim

    @property
    def has_conditioner(self) -> bool:
        return self.input_type != "none"

    @property
    def condition_extension(self) -> str:
        """param_data_type as a lower-case suffix with its dot, defaulted from input_type."""
        given = self.param_data_type.lower().lstrip(".")
        return "." + (given or ("csv" if self.input_type == "csv" else "png"))

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples), for JSON and weights-only checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A saved config; keys added since it was written take their defaults."""
        defaults = {key.field: key.default for key in KEYS if key.default is not REQUIRED}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in {**defaults, **values}.items()})


def load_config(preset_index=1, overrides=None, preset_path=PRESET_FILE, condition_path=CONDITION_FILE,
                warn=print) -> Config:
    """Read both files (paths relative to the working directory), apply command-line overrides, validate.

    overrides: {field: value} from flags the user actually gave (None values are ignored).
    Raises InputError naming the file, line and fix.
    """
    preset = read_preset(preset_path, preset_index)
    values, lines = read_condition(condition_path, warn)
    values.update({field: check_flag(field, value) for field, value in (overrides or {}).items() if value is not None})
    values["n_steps_used"] = values["n_steps_used"] or values["n_steps"]
    values["node_end"] = values["node_end"] or values["n_nodes"]
    config = Config(preset_index=preset_index, **dataclasses.asdict(preset), **values)
    check_consistency(config, condition_path, lines)
    _note_keys_without_effect(config, condition_path, lines, warn)
    return config


def check_flag(field: str, value):
    """A command-line value for a condition.txt key gets the same conversion and checks as the file's value."""
    key = next(key for key in KEYS if key.field == field)
    return _checked_value("command line", None, key, str(value))


# ----------------------------------------------------------------------------------------------------- preset.txt
def read_preset(path, index: int) -> Preset:
    """Return the index-th (1-based) 4-line preset of preset.txt. Line 1 is a header; blank lines are skipped."""
    lines = [(n, text.strip()) for n, text in enumerate(_read_lines(path, "preset file"), start=1)]
    body = [(n, text) for n, text in lines[1:] if text]
    if not body or len(body) % 4:
        raise InputError(path, f"has {len(body)} non-blank lines after the header, not a multiple of 4", (
            "give each preset as 4 lines: data_No, init_beta_divisor, encoder filters, conditioner filters"))
    count = len(body) // 4
    if not 1 <= index <= count:
        raise InputError(path, f"preset {index} asked for, but the file holds presets 1..{count}",
                         f"use --preset=K with K between 1 and {count}")
    block = body[4 * (index - 1): 4 * index]
    return Preset(
        data_no=_preset_number(path, block[0], int, "data_No"),
        init_beta_divisor=_preset_number(path, block[1], float, "init_beta_divisor"),
        encoder_filters=_preset_filters(path, block[2], "encoder filters"),
        conditioner_filters=_preset_filters(path, block[3], "conditioner filters"))


def _preset_number(path, numbered_line, kind, what):
    line_no, text = numbered_line
    try:
        return _convert(text, kind)
    except ValueError:
        raise InputError(path, f"{what} is '{text}', not a single {_kind_words(kind)}",
                         f"write {what} as one number on this line", line_no) from None


def _preset_filters(path, numbered_line, what):
    line_no, text = numbered_line
    try:
        filters = tuple(_convert(word, int) for word in text.replace(",", " ").split())
    except ValueError:
        filters = ()
    if not filters or min(filters) <= 0:
        raise InputError(path, f"{what} '{text}' are not positive whole numbers",
                         f"write the {what} as numbers separated by spaces, e.g. '256 128 64'", line_no)
    return filters


# ------------------------------------------------------------------------------------------------ condition.txt
def read_condition(path, warn=print):
    """Parse condition.txt into ({field: typed value} with defaults for keys not given, {field: line number})."""
    given, lines = {}, {}
    for line_no, text in enumerate(_read_lines(path, "condition file"), start=1):
        entry = _split_condition_line(path, line_no, text)
        if entry is None:
            continue
        name, raw = entry
        key = KEYS_BY_NAME.get(name.lower())
        if key is None:
            _warn_unknown(path, line_no, name, warn)
            continue
        if key.field in given:
            raise InputError(path, f"key '{key.name}' is given twice", "keep one line for it", line_no)
        given[key.field] = _checked_value(path, line_no, key, raw)
        lines[key.field] = line_no
    return _with_defaults(path, given), lines


_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:?\s*(.*)$")


def _split_condition_line(path, line_no, text):
    """Return (key, raw value), or None for blank and comment lines. Accepts 'key value' and 'key: value'."""
    text = text.split("#", 1)[0].strip()
    if not text or text[0] in "%'":
        return None
    match = _LINE.match(text)
    if match is None:
        raise InputError(path, f"cannot read '{text}' as 'key value'",
                         "write one 'key value' per line, or start the line with # to comment it out", line_no)
    return match.group(1), match.group(2).strip()


def _warn_unknown(path, line_no, name, warn):
    close = difflib.get_close_matches(name.lower(), list(KEYS_BY_NAME), n=1, cutoff=0.6)
    hint = f"; did you mean '{KEYS_BY_NAME[close[0]].name}'?" if close else ""
    warn(f"{path}:{line_no}: warning: unknown key '{name}' is ignored{hint}")


def _checked_value(path, line_no, key, raw):
    if raw == "":
        raise InputError(path, f"key '{key.name}' has no value", f"write '{key.name} <value>'", line_no)
    try:
        value = _convert(raw, key.kind)
    except ValueError:
        raise InputError(path, f"{key.name} is '{raw}', not a {_kind_words(key.kind)}",
                         f"give {key.name} a {_kind_words(key.kind)} ({key.help})", line_no) from None
    problem = None
    if key.choices and value not in key.choices:
        problem = f"must be one of {', '.join(map(str, key.choices))}"
    elif key.check is not None:
        problem = key.check(value)
    if problem:
        raise InputError(path, f"{key.name} = {raw} {problem}", f"change {key.name} ({key.help})", line_no)
    return value


def _with_defaults(path, given):
    values = {}
    for key in KEYS:
        if key.field in given:
            values[key.field] = given[key.field]
        elif key.default is REQUIRED:
            raise InputError(path, f"required key '{key.name}' is missing",
                             f"add a line '{key.name} <value>' ({key.help})")
        else:
            values[key.field] = key.default
    return values


def _convert(raw: str, kind: type):
    """Parse a number the way users write them: '1e6', '1000000', '16' and '16.0' all work for the right kind."""
    raw = raw.strip()
    if kind is str:
        return raw
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError(raw)
    if kind is int:
        if number != int(number):
            raise ValueError(raw)
        return int(number)
    return number


def _kind_words(kind):
    return {int: "whole number", float: "number", str: "word"}[kind]


def _read_lines(path, what):
    try:
        return Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise InputError(path, f"{what} not found", f"run from the case folder that holds {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"{what} cannot be read ({error})", "save it as a plain UTF-8 text file") from None


# -------------------------------------------------------------------------------------------------- consistency
def check_consistency(config: Config, path, lines: dict) -> None:
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
        *_time_axis_problems(config, lines),
        *_plot_problems(config),
        *_conditioner_problems(config),
    ]
    for failed, fields, problem, fix in problems:
        if failed:
            line = next((lines[field] for field in fields if field in lines), None)
            raise InputError(path, problem, fix, line)


def _time_axis_problems(config: Config, lines: dict) -> list:
    """(failed, fields, problem, fix) rows for time steps too few for the encoder's levels.

    Mirrors modules/vae.py: level l (0 = finest) holds ceil(T / 2**l) time steps (ModelSpec.level_lengths) and its
    ResBlocks norm with GroupNorm(gcd(width, 8) groups). GroupNorm refuses a group of a single value ("Expected more
    than 1 value per channel"), which a batch of one design meets at a level of 1 step whose width is 1, 2, 4 or 8
    (one channel per group). Batches of one design are routine (the last batch of an epoch, --predict or
    --reconstruct of one design), so such a config is refused before any training starts.
    """
    steps, lengths = config.n_steps_used, [config.n_steps_used]
    for _ in config.encoder_filters[1:]:
        lengths.append(math.ceil(lengths[-1] / 2))
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


def _plot_problems(config: Config) -> list:
    """(failed, fields, problem, fix) rows for the plot keys that depend on the data's shape."""
    nodes = config.n_nodes_used // config.n_vars
    grid, designs, steps = (whole_numbers(text) for text in (config.grid_shape, config.plot_designs, config.plot_steps))
    return [
        (bool(grid) and math.prod(grid) != nodes, ("grid_shape",),
         f"grid_shape {' x '.join(map(str, grid))} holds {math.prod(grid or [0])} nodes, but each variable has "
         f"{nodes} (Dim3_end - Dim3_start = {config.n_nodes_used}, num_var = {config.n_vars})",
         "give H W with H x W = the nodes of one variable, or drop grid_shape"),
        (bool(grid) and bool(config.node_coordinates), ("grid_shape", "node_coordinates"),
         "grid_shape and node_coordinates both say where the nodes are", "keep one of them"),
        (any(design >= config.n_designs for design in designs), ("plot_designs",),
         f"plot_designs {config.plot_designs} names a design beyond Dim1 = {config.n_designs}",
         f"use indices from 0 to {config.n_designs - 1}"),
        (any(step >= config.n_steps_used for step in steps), ("plot_steps",),
         f"plot_steps {config.plot_steps} names a step beyond the {config.n_steps_used} time steps kept",
         f"use steps from 0 to {config.n_steps_used - 1}"),
        (len(designs) * max(1, len(steps)) * config.n_vars > MAX_FIELD_PLOT_ROWS, ("plot_designs", "plot_steps"),
         f"plot_designs x plot_steps x num_var asks for more than {MAX_FIELD_PLOT_ROWS} rows of field plots",
         "choose fewer"),
    ]


def _conditioner_problems(config: Config) -> list:
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
         f"vit_heads {config.vit_heads} does not divide vit_dim {config.vit_dim}", "make vit_dim a multiple of vit_heads"),
        (config.use_e2e_training and not config.has_conditioner, ("use_e2e_training", "input_type"),
         "use_e2e_training 1 trains a conditioner, but input_type is none", "set input_type csv, image or image_vit"),
    ]


def _note_keys_without_effect(config: Config, path, lines: dict, warn) -> None:
    """A key the file gives that cannot act in this setup gets a note, so no setting is silently ignored."""
    for field, line in sorted(lines.items(), key=lambda item: item[1]):
        if field in ONLY_WITH and not ONLY_WITH[field][0](config):
            name = next(key.name for key in KEYS if key.field == field)
            warn(f"{path}:{line}: note: '{name}' has no effect because {ONLY_WITH[field][1]}")
