"""The typed, frozen Config of a run, generated from the key table (config.keys) and preset.txt's four
lines: each key is declared once, there, and becomes a field here."""
import dataclasses
import math
from dataclasses import dataclass

from modules.config.keys import DESIGN_INPUTS, KEYS, KEYS_BY_FIELD, REQUIRED, whole_numbers
from modules.errors import InputError


@dataclass(frozen=True)
class Preset:
    """One 4-line block of preset.txt."""

    data_no: int
    init_beta_divisor: float
    encoder_filters: tuple
    conditioner_filters: tuple


PRESET_NAMES = {"data_no": "preset data_No", "init_beta_divisor": "preset init_beta_divisor",
                "encoder_filters": "preset encoder filters", "conditioner_filters": "preset conditioner filters"}


def level_lengths(n_steps: int, n_levels: int) -> list:
    """Time length of each encoder level's features, finest first: T, ceil(T/2), ceil(T/4), ... (one per level)."""
    lengths = [n_steps]
    for _ in range(n_levels - 1):
        lengths.append(math.ceil(lengths[-1] / 2))
    return lengths


class ConfigViews:
    """What follows from the settings; the settings themselves are Config's fields."""

    @property
    def n_nodes_used(self) -> int:
        return self.node_end - self.node_start

    @property
    def n_levels(self) -> int:
        return len(self.encoder_filters)

    @property
    def level_lengths(self) -> list:
        return level_lengths(self.n_steps_used, self.n_levels)

    @property
    def latent_size(self) -> int:
        """Numbers per design: the main latent plus every level's latent."""
        return self.main_latent_dim + self.n_levels * self.level_latent_dim

    @property
    def fixed_recon_weight(self) -> float | None:
        """alpha as a number, or None for alpha auto (the likelihood's noise scale is learnt: training.losses)."""
        return None if self.recon_weight == "auto" else float(self.recon_weight)

    @property
    def has_conditioner(self) -> bool:
        return self.input_type != "none"

    @property
    def design_inputs(self) -> str | None:
        """What param_dir holds: "parameters" (a CSV) or "images" (a folder); None without a conditioner."""
        return DESIGN_INPUTS[self.input_type]

    @property
    def grid(self) -> tuple:
        """grid_shape as (H, W); () when it is not given."""
        return whole_numbers(self.grid_shape)

    @property
    def condition_extension(self) -> str:
        return condition_extension(self.param_data_type, self.input_type)

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples), for JSON and weights-only checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict):
        """A saved config; keys added since it was written take what leaving them out meant then (Key.earlier) or
        their defaults, and values are stored in their canonical spelling."""
        defaults = {key.field: key.default if key.earlier is None else key.earlier for key in KEYS
                    if key.default is not REQUIRED}
        merged = {**defaults, **values}
        for field, value in merged.items():
            key = KEYS_BY_FIELD.get(field)
            if key is not None and key.canonical is not None:
                merged[field] = key.canonical(value)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in same_steps_spelt_once(merged).items()})


def condition_extension(param_data_type: str, input_type: str) -> str:
    """param_data_type as a lower-case suffix with its dot, defaulted from input_type (.csv, else .png)."""
    given = param_data_type.lower().lstrip(".")
    return "." + (given or ("csv" if input_type == "csv" else "png"))


def same_steps_spelt_once(values: dict) -> dict:
    """With every time step kept, Dim2_spacing picks nothing: it is stored as 'first' whatever was written (or, in a
    config saved before the key, meant), so that it never tells two configs of the same data apart."""
    if values["n_steps_used"] == values["n_steps"]:
        values["steps_spacing"] = "first"
    return values


# Everything a run needs, typed and checked: the preset index, the preset's four lines, then every key's field.
Config = dataclasses.make_dataclass(
    "Config", [("preset_index", int), *((field.name, field.type) for field in dataclasses.fields(Preset)),
               *((key.field, key.kind) for key in KEYS)], bases=(ConfigViews,), frozen=True)
Config.__module__ = __name__


def changed_settings(saved: dict, config) -> list:
    """'name saved -> now' for each setting that differs between a saved config (Config.to_dict) and config,
    leaving out the resumable keys and the preset index; names as the user writes them (condition.txt keys, preset
    lines)."""
    names = {**{key.field: key.name for key in KEYS}, **PRESET_NAMES}
    now = Config.from_dict(saved).to_dict()  # fills keys newer than the saved config with their defaults
    current = config.to_dict()
    return [f"{names.get(field, field)} {now[field]} -> {current[field]}" for field in current
            if field != "preset_index" and not (field in KEYS_BY_FIELD and KEYS_BY_FIELD[field].resumable)
            and now.get(field) != current[field]]


def data_changes(trained: "Config", config) -> list:
    """'name trained -> now' for each setting that says which data a model was trained on (the preset's data_No and
    the keys marked data) and differs between the two configs; names as the user writes them."""
    names = {"data_no": "preset data_No", **{key.field: key.name for key in KEYS if key.data}}
    return [f"{name} {getattr(trained, field)} -> {getattr(config, field)}" for field, name in names.items()
            if getattr(trained, field) != getattr(config, field)]


def check_same_data(config, vae_config, vae_file) -> None:
    """The VAE must have been trained on the dataset condition.txt describes now (same file, shape and crop)."""
    changed = data_changes(vae_config, config)
    if changed:
        raise InputError(vae_file, f"was trained on other data than condition.txt/preset.txt now describe "
                         f"({', '.join(changed)})", "restore those settings, or retrain the VAE with --lc_only=0")
