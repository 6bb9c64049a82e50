"""Read preset.txt and input_data/condition.txt into one validated Config: the only code that knows the users' file
formats. Command-line flags that are also keys (config.keys) override the file's values."""
import dataclasses
import difflib
import logging
import math
import re
from pathlib import Path

from modules.config.checks import check_consistency, note_keys_without_effect
from modules.config.keys import KEYS, KEYS_BY_FIELD, KEYS_BY_NAME, REQUIRED, Key
from modules.config.settings import Config, Preset, condition_extension, same_steps_spelt_once
from modules.data.design_inputs import image_files, image_sizes
from modules.errors import InputError

PRESET_FILE = Path("preset.txt")
CONDITION_FILE = Path("input_data/condition.txt")
log = logging.getLogger(__name__)


def load_config(preset_index=1, overrides=None, preset_path=PRESET_FILE, condition_path=CONDITION_FILE) -> Config:
    """Read both files (paths relative to the working directory), apply command-line overrides, validate.

    overrides: {field: value} from flags the user actually gave (None values are ignored).
    Raises InputError naming the file, line and fix.
    """
    preset = read_preset(preset_path, preset_index)
    values, lines = read_condition(condition_path)
    values.update({field: check_flag(field, value) for field, value in (overrides or {}).items() if value is not None})
    values["param_dir"] = _case_relative(values["param_dir"], condition_path)
    values["image_size"] = _image_size(values, condition_path)
    if values["start_patience"] == AUTO:
        values["start_patience"] = max(START_PATIENCE_LEAST, values["epochs"] // START_PATIENCE_SHARE)
    values["n_steps_used"] = values["n_steps_used"] or values["n_steps"]
    values["node_end"] = values["node_end"] or values["n_nodes"]
    config = Config(preset_index=preset_index, **dataclasses.asdict(preset), **same_steps_spelt_once(values))
    check_consistency(config, condition_path, lines)
    note_keys_without_effect(config, condition_path, lines)
    return config


def _case_relative(param_dir: str, path) -> str:
    """The original SimulGenVAE's paths are relative to the case folder even with a leading '/' (its condition.txt
    ships 'param_dir /images'): an absolute param_dir that does not exist, while the same path inside the case folder
    does, means the latter; said once. Anything else is kept as given (a missing path is reported where it is read)."""
    given = Path(param_dir)
    if param_dir and given.is_absolute() and not given.exists():
        inside = Path(*given.parts[1:])
        if inside.exists():
            log.warning(f"{path}: note: param_dir {param_dir} does not exist; using {inside} in the case folder (the "
                        "original SimulGenVAE's paths are relative to it even with a leading /)")
            return str(inside)
    return param_dir


AUTO = "auto"  # the value of a key whose default follows from the case's files or other keys (image_size, ...)
START_PATIENCE_SHARE, START_PATIENCE_LEAST = 4, 10  # start_patience auto: Training_epochs // 4, at least 10
ORIGINAL_IMAGE_SIZE = 256  # the original SimulGenVAE resized every image to 256 x 256


def _image_size(values, path) -> int:
    """image_size auto: the images' own size when they are all square and of one size (read from their headers), at
    most 256 and, for the ViT, a multiple of its patch; else the original's 256; said once. Without images (no
    effect) it is 256, the value configs saved before auto hold."""
    if values["image_size"] != AUTO:
        return values["image_size"]
    if values["input_type"] not in ("image", "image_vit"):
        return ORIGINAL_IMAGE_SIZE
    try:
        sizes = image_sizes(image_files(values["param_dir"], condition_extension(values["param_data_type"],
                                                                                 values["input_type"])))
    except InputError:  # a missing folder or bad image is reported where the images are read, before training
        return ORIGINAL_IMAGE_SIZE
    width, height = next(iter(sizes))
    patch = values["vit_patch_size"] if values["input_type"] == "image_vit" else 1
    if len(sizes) == 1 and width == height and width <= ORIGINAL_IMAGE_SIZE and width % patch == 0:
        log.warning(f"{path}: note: image_size auto: the images are {width} x {height} pixels and are used at that "
                    "size")
        return width
    shown = ", ".join(f"{name} {w} x {h}" for (w, h), name in list(sizes.items())[:3])
    why = ("not all square and of one size" if len(sizes) > 1 or width != height else
           f"larger than {ORIGINAL_IMAGE_SIZE}" if width > ORIGINAL_IMAGE_SIZE else
           f"not a multiple of vit_patch_size {patch}")
    log.warning(f"{path}: note: image_size auto: the images ({shown}) are {why}, so they are resized to "
                f"{ORIGINAL_IMAGE_SIZE} x {ORIGINAL_IMAGE_SIZE} as in the original SimulGenVAE; set image_size to "
                "choose")
    return ORIGINAL_IMAGE_SIZE


def check_flag(field: str, value):
    """A command-line value for a condition.txt key gets the same conversion and checks as the file's value."""
    key = KEYS_BY_FIELD[field]
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
def read_condition(path):
    """Parse condition.txt into ({field: typed value} with defaults for keys not given, {field: line number})."""
    given, lines, obsolete, field_weight = {}, {}, {}, None
    for line_no, text in enumerate(_read_lines(path, "condition file"), start=1):
        entry = _split_condition_line(path, line_no, text)
        if entry is None:
            continue
        name, raw = entry
        key = KEYS_BY_NAME.get(name.lower())
        if key is None and name.lower() in ORIGINAL_UNUSED_KEYS:
            obsolete.setdefault(name, []).append(line_no)
            continue
        if key is None and name.lower() == "lc_alpha":
            if field_weight is not None:
                raise InputError(path, "key 'LC_alpha' is given twice", "keep one line for it", line_no)
            field_weight = (line_no, _checked_value(path, line_no, LC_ALPHA, raw))
            continue
        if key is None:
            _warn_unknown(path, line_no, name)
            continue
        if key.field in given:
            raise InputError(path, f"key '{key.name}' is given twice", "keep one line for it", line_no)
        given[key.field] = _checked_value(path, line_no, key, raw)
        lines[key.field] = line_no
    if obsolete:
        listed = ", ".join(f"{name} (line{'s' if len(at) > 1 else ''} {', '.join(map(str, at))})"
                           for name, at in obsolete.items())
        log.warning(f"{path}: note: keys of the original SimulGenVAE that this version has no use for are ignored: "
                    f"{listed}")
    values = _with_defaults(path, given)
    if field_weight is not None:
        _apply_field_weight(path, *field_weight, values)
    return values, lines


# Keys of the original SimulGenVAE's condition.txt (over its history) with nothing to set here: placeholders, its
# header line, and options of its own pipeline that this one does not have. One quiet line names all of them, not a
# warning each, and no key of another meaning is suggested for them.
ORIGINAL_UNUSED_KEYS = {
    "reserved", "stretch", "num_aug_f", "num_aug_a", "rec_graph", "n_sample", "common", "dim3_red", "debug_mode",
    "use_pca", "pca_patch_size", "pca_components", "pinn_lr", "pinn_batch", "traditional_ml_mode",
    "traditional_ml_scaler", "traditional_ml_n_components", "traditional_ml_k_best",
    "traditional_ml_feature_selection", "traditional_ml_cv_folds", "traditional_ml_use_spatial_features",
    "use_enhanced_loss", "enhancement_preset", "use_perceptual_loss", "perceptual_weight", "perceptual_similarity",
    "perceptual_feature_layers", "use_multiscale_loss", "mse_weight", "mae_weight", "huber_weight", "huber_beta",
    "main_weight", "hier_weight", "use_consistency_loss", "consistency_weight", "consistency_temperature",
    "consistency_detach_original", "use_improved_e2e", "e2e_memory_efficient", "e2e_batch_reduction_factor"}

# The original's LC_alpha: end to end with latent regularisation, its conditioner minimised
# LC_alpha x field loss + latent_reg_weight x latent error. The ratio of the two weights is what shapes training
# (AdamW's steps barely depend on the loss's overall scale; only gradient clipping sees it), so it is read as
# latent_reg_weight / LC_alpha with the field loss at 1.
LC_ALPHA = Key("LC_alpha", "", float, 1.0, "the original SimulGenVAE's weight of the end-to-end field loss against "
               "latent_reg_weight x the latent error", lambda v: None if v > 0 else "must be > 0")


def _apply_field_weight(path, line_no, weight, values) -> None:
    """Fold the original's LC_alpha into latent_reg_weight, said in one line (see LC_ALPHA)."""
    if not (values["use_e2e_training"] and values["use_latent_regularization"]):
        log.warning(f"{path}:{line_no}: note: LC_alpha has no effect: as in the original SimulGenVAE, it only weighs "
                    "the end-to-end field loss against the latent term (use_e2e_training 1 and "
                    "use_latent_regularization 1)")
        return
    if weight == 1:
        return
    equivalent = values["latent_reg_weight"] / weight
    log.warning(f"{path}:{line_no}: note: LC_alpha {weight:g} (the original's weight of the field loss) is read as "
                f"latent_reg_weight {values['latent_reg_weight']:g} / {weight:g} = {equivalent:.6g}, which keeps the "
                f"ratio of the two weights (AdamW's steps barely depend on the loss's overall scale). To silence this, "
                "write "
                f"'latent_reg_weight {equivalent:.6g}' and remove LC_alpha")
    values["latent_reg_weight"] = equivalent

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


def _warn_unknown(path, line_no, name):
    close = difflib.get_close_matches(name.lower(), list(KEYS_BY_NAME), n=1, cutoff=0.6)
    hint = f"; did you mean '{KEYS_BY_NAME[close[0]].name}'?" if close else ""
    log.warning(f"{path}:{line_no}: warning: unknown key '{name}' is ignored{hint}")


def _checked_value(path, line_no, key, raw):
    if raw == "":
        raise InputError(path, f"key '{key.name}' has no value", f"write '{key.name} <value>'", line_no)
    if key.default == AUTO and key.kind is not str and raw.lower() == AUTO:
        return AUTO  # resolved from the case's files in load_config
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
    return key.canonical(value) if key.canonical else value


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


def set_condition_keys(text: str | None, values: dict, retired: tuple, note: str) -> str:
    """condition.txt's text with each key of values ({name: value}) set: its line rewritten in place, or appended
    when the file has none; lines of the retired keys commented out (they described other data). text None: a new
    file of just these keys. note: the comment on each line written."""
    wanted = {name.lower(): name for name in values}
    done, lines = set(), []
    for line_no, line in enumerate((text or "").splitlines(), start=1):
        entry = _split_condition_line(CONDITION_FILE, line_no, line)
        name = entry[0].lower() if entry else None
        if name in wanted:
            key = wanted[name]
            lines.append(f"{key:<15} {values[key]}   # {note}")
            done.add(name)
        elif name in {key.lower() for key in retired}:
            lines.append(f"# {line.strip()}   # {note}: off, it described other data")
        else:
            lines.append(line)
    lines += [f"{key:<15} {value}   # {note}" for key, value in values.items() if key.lower() not in done]
    return "\n".join(lines) + "\n"
