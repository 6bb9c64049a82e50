"""The format of the model files and checkpoints (storage.model_files), and the one way an older file is read: it
is brought to the current format as it is loaded (current_format), so no other code reads an older layout (entries
an older file did not record arrive as None, and the code that uses them says what is missing).

Every file holds "format" (what kind of file: a VAE, a VAE checkpoint, a conditioner or a conditioner checkpoint, or
a fit checkpoint: a neural field's from version 2 on, a snapshot codec's from version 3 on) and "format_version".
Version 1 is every file written before the version was recorded (its kinds' names end in "-v1"); over its life it
gained entries that older version 1 files lack, and each is filled here with what leaving it out meant:
- a VAE's spec: pod_modes 0 (no POD path), n_vars 1, codec 0 (the VAE runs on the fields);
- a VAE's state: noise_std 0.1 per variable (files trained with a fixed alpha, which ignores it);
- a conditioner's spec: the ConditionerSpec defaults (one network, no GP points, no field shape);
- a conditioner's state: a GP's noise_levels NaN (its posterior spread is not known, so it has none), a neural
  field's value_offset 0 and value_scale 1 (its values as the network computes them);
- a conditioner's facts: choice, ensemble, calibration, design_range and param_names None (not recorded).
Version 3 added a conditioner spec's `encoder` (a neural field, GP or spline reading images through an image
encoder); a version 2 conditioner reads parameters or is a network on images, so it gets encoder "". A version 2 fit
checkpoint of a neural field is then another fit (its facts' spec differs) and is fitted afresh, said.
Version 4 added a VAE spec's `codec_modulation` (a snapshot codec whose code also stretches, turns and reweights its
field: models.neural_field's WARP); an older VAE's codec shifts phases only, so it gets "shift". An older codec's
fit checkpoint (checkpoints/snapshot_codec_fit.pt; now one file per candidate of the codec's race) is not continued.
Version 5 added a conditioner spec's `field_modulation` (a neural-field conditioner whose code moves and deforms its
field's frame: models.neural_field's FRAME); an older neural field shifts phases only, so it gets "shift". An older
neural field's fit checkpoint is then another fit (its facts' spec differs) and is fitted afresh, said.
Version 6 added a conditioner spec's `frame` (a feature-frame GP's grid and modes: models.feature_frame); an older
conditioner is no feature-frame GP, so it gets ().
"""
import dataclasses

import torch

from modules.errors import InputError
from modules.models.conditioners import LATENT_GP, NEURAL_FIELD, ConditionerSpec
from modules.models.neural_field import SHIFT
from modules.models.vae import ModelSpec

FORMAT_VERSION = 6
MODEL_FORMAT, CHECKPOINT_FORMAT = "simulgenvae-model", "simulgenvae-checkpoint"  # a VAE, and with its training state
CONDITIONER_FORMAT = "simulgenvae-conditioner"  # a conditioner, with its training state in a checkpoint
FIT_FORMAT = "simulgenvae-fit-checkpoint"  # a neural field's (version 2 on) or codec's (3 on) fit, pass by pass
VERSION_1_FORMATS = {f"{kind}-v1": kind for kind in (MODEL_FORMAT, CHECKPOINT_FORMAT, CONDITIONER_FORMAT)}
CONDITIONER_FACTS = ("choice", "ensemble", "calibration", "design_range", "param_names", "channels", "input_scaler")
VAE_NOISE_STD = 0.1  # what a VAE's likelihood noise scale starts at (models.vae), for files that do not hold it


def format_of(payload) -> str | None:
    """What kind of file a loaded payload is (MODEL_FORMAT, CHECKPOINT_FORMAT, CONDITIONER_FORMAT or FIT_FORMAT),
    whatever its version; None when it is no SimulGenVAE file."""
    found = payload.get("format") if isinstance(payload, dict) else None
    return VERSION_1_FORMATS.get(found, found if found in (*VERSION_1_FORMATS.values(), FIT_FORMAT) else None)


def current_format(payload: dict, path) -> dict:
    """The payload of a SimulGenVAE file (format_of is not None) read from path, in the current format: itself, or
    for an older version a new dict."""
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(path, f"was written by a newer version of SimulGenVAE (format version {version}; this one "
                         f"reads up to {FORMAT_VERSION})", "update SimulGenVAE, or retrain with this version")
    if version == 1:
        from_version_1 = conditioner_from_version_1 if format_of(payload) == CONDITIONER_FORMAT else vae_from_version_1
        payload = from_version_1(payload)
    elif version in (2, 3, 4, 5) and format_of(payload) == CONDITIONER_FORMAT:
        payload = {**payload, "spec": {"encoder": "", "field_modulation": SHIFT, "frame": [], **payload["spec"]}}
    elif version in (2, 3) and format_of(payload) in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        payload = {**payload, "spec": {"codec_modulation": SHIFT, **payload["spec"]}}
    return {**payload, "format_version": FORMAT_VERSION}


def vae_from_version_1(payload: dict) -> dict:
    spec = {**spec_defaults(ModelSpec), **payload.get("spec", {})}
    state = dict(payload.get("state_dict", {}))
    if "noise_std" not in state:
        state["noise_std"] = torch.full((1 if spec["codec"] else spec["n_vars"],), VAE_NOISE_STD)
    return {"run_id": None, **payload, "format": format_of(payload), "spec": spec, "state_dict": state,
            "format_version": FORMAT_VERSION}


def conditioner_from_version_1(payload: dict) -> dict:
    spec = {**spec_defaults(ConditionerSpec), **payload.get("spec", {})}
    state = dict(payload.get("state_dict", {}))
    if spec.get("kind") == LATENT_GP.kind and "noise_levels" not in state:
        state["noise_levels"] = torch.full((spec["output_dim"],), float("nan"), dtype=torch.float64)
    if spec.get("kind") == NEURAL_FIELD.kind and "field.value_offset" not in state:
        n_vars = spec["field_shape"][2]
        state["field.value_offset"], state["field.value_scale"] = torch.zeros(n_vars), torch.ones(n_vars)
    return {**dict.fromkeys(CONDITIONER_FACTS), **payload, "format": CONDITIONER_FORMAT, "spec": spec,
            "state_dict": state, "format_version": FORMAT_VERSION}


def spec_defaults(spec_class) -> dict:
    """The defaults of a spec dataclass's fields, as plain types (tuples as lists, as specs are saved)."""
    return {field.name: list(field.default) if isinstance(field.default, tuple) else field.default
            for field in dataclasses.fields(spec_class) if field.default is not dataclasses.MISSING}
