"""Saving and loading models and training checkpoints: plain tensors and plain types only, written atomically, in
the current format (storage.model_format, which also reads every older one).

Everything here loads with torch.load(weights_only=True): no pickled classes, so a checkpoint file cannot run code.
"""
import hashlib
import re
from pathlib import Path

import torch

from modules.config import Config
from modules.data.scaling import ColumnScaler, MinMaxScaler
from modules.errors import InputError
from modules.models.conditioners import ConditionerSpec, build_conditioner
from modules.models.surrogate import Surrogate
from modules.models.vae import HierarchicalVAE, ModelSpec
from modules.storage.atomic import save_torch
from modules.storage.model_format import (CHECKPOINT_FORMAT, CONDITIONER_FORMAT, FORMAT_VERSION, MODEL_FORMAT,
                                          current_format, format_of)


def model_payload(model: HierarchicalVAE, config: Config, scaler: MinMaxScaler) -> dict:
    return {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "spec": model.spec.to_dict(),
            "config": config.to_dict(),
            "scaler": scaler.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(path, model, config, scaler, run_id: str | None = None) -> None:
    """The usable VAE; run_id: the run (runs/<id>/) that trained it, which a conditioner-only run records."""
    save_torch(path, {**model_payload(model, config, scaler), "run_id": run_id})


def save_checkpoint(path, model, config, scaler, training: dict) -> None:
    """The model file's content plus the training state (training.state): where training stood."""
    payload = model_payload(model, config, scaler)
    payload.update(format=CHECKPOINT_FORMAT, training=training)
    save_torch(path, payload)


def load_model(path, device="cpu"):
    """(model in eval mode on device, Config, MinMaxScaler) from a saved model or checkpoint file."""
    payload = read_payload(path)
    try:
        model = HierarchicalVAE(ModelSpec.from_dict(payload["spec"]))
        model.load_state_dict(payload["state_dict"])
        config, scaler = Config.from_dict(payload["config"]), MinMaxScaler.from_dict(payload["scaler"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise InputError(path, f"is not a complete SimulGenVAE model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]})", "point to a model written by this version") from None
    return model.to(device).eval(), config, scaler


def save_conditioner(path, model, spec: ConditionerSpec, about: dict, extra: dict | None = None) -> None:
    """A latent conditioner with what a prediction needs (about: config, scalers, image channels, parameter names,
    the VAE file it decodes through and that file's digest), all plain types. extra: training state (checkpoints)."""
    payload = {"format": CONDITIONER_FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), **about,
               **(extra or {}),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_torch(path, payload)


def load_conditioner(path, device="cpu"):
    """(conditioner in eval mode on device, the payload's plain facts) from a saved latent conditioner."""
    payload = read_payload(path, formats=(CONDITIONER_FORMAT,), train_hint="python SimulGen-VAE.py --lc_only=1 "
                           "(with input_type csv, image or image_vit in input_data/condition.txt)")
    try:
        model = build_conditioner(ConditionerSpec.from_dict(payload["spec"]))
        model.load_state_dict(payload.pop("state_dict"))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise InputError(path, f"is not a complete latent conditioner ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]})", "retrain it with --lc_only=1") from None
    return model.to(device).eval(), payload


def file_digest(path) -> str:
    """sha256 of a file, read in blocks: ties a conditioner to the exact VAE it was trained with."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_payload(path, formats=(MODEL_FORMAT, CHECKPOINT_FORMAT), train_hint="python SimulGen-VAE.py") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model file not found", f"train it first ({train_hint})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or a pickle of arbitrary objects
        pickled = re.findall(r"GLOBAL ([\w.]+)", str(error))
        if pickled:  # torch.save of a whole model, as the original SimulGenVAE writes its model files
            raise InputError(path, f"is a pickled Python object ({pickled[0]}), as the original SimulGenVAE's model "
                             "files are: it cannot be loaded safely (unpickling runs code), and the original's "
                             "latents mean nothing to this version", f"retrain here ({train_hint})") from None
        raise InputError(path, f"cannot be loaded safely ({type(error).__name__})",
                         "the file is corrupt or not a SimulGenVAE model; retrain or use another file") from None
    kind = format_of(payload)
    if kind not in formats:
        found = payload.get("format", "unknown") if isinstance(payload, dict) else "unknown"
        raise InputError(path, f"is not the kind of SimulGenVAE file expected here (format {found})",
                         f"point to a file written by {train_hint}")
    try:
        return current_format(payload, path)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:  # an older file with parts missing
        raise InputError(path, f"is not a complete SimulGenVAE file ({type(error).__name__}: {error})",
                         "retrain, or point to another file") from None


def checked_vae_file(facts: dict, conditioner_file) -> Path:
    """The VAE the conditioner was trained with, unchanged since (its latents mean nothing to another VAE)."""
    vae_file = Path(facts["vae_file"])
    if not vae_file.exists() or file_digest(vae_file) != facts["vae_sha256"]:
        state = "is missing" if not vae_file.exists() else "has changed since"
        raise InputError(conditioner_file, f"was trained with the VAE {vae_file}, which {state}",
                         "retrain the conditioner for the current VAE (--lc_only=1)")
    return vae_file


def load_surrogate(conditioner_file, device="cpu"):
    """(the Surrogate of the conditioner in conditioner_file and the VAE it was trained with, in eval mode on device;
    the conditioner file's plain facts; the Config it was trained with)."""
    conditioner, facts = load_conditioner(conditioner_file, device)
    vae, _, field_scaler = load_model(checked_vae_file(facts, conditioner_file), device)
    return assembled_surrogate(conditioner, facts, vae, field_scaler).to(device).eval(), facts, Config.from_dict(
        facts["config"])


def assembled_surrogate(conditioner, facts: dict, vae, field_scaler) -> Surrogate:
    """A saved conditioner (its file's facts: the scalers) on the VAE it was trained with."""
    reads_parameters = Config.from_dict(facts["config"]).design_inputs == "parameters"
    return Surrogate(vae, field_scaler, conditioner, ColumnScaler.from_dict(facts["latent_scaler"]),
                     ColumnScaler.from_dict(facts["input_scaler"]) if reads_parameters else None)


def load_vae_surrogate(model_file, device="cpu"):
    """(the Surrogate of the VAE in model_file alone, which reconstructs fields, in eval mode on device; its
    Config)."""
    vae, config, field_scaler = load_model(model_file, device)
    return Surrogate(vae, field_scaler).to(device).eval(), config
