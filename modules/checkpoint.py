"""Saving and loading models and training checkpoints: plain tensors and plain types only, written atomically.

Everything here loads with torch.load(weights_only=True): no pickled classes, so a checkpoint file cannot run code.
"""
import os
from pathlib import Path

import torch

from modules.config import Config
from modules.errors import InputError
from modules.scaling import MinMaxScaler
from modules.vae import HierarchicalVAE, ModelSpec

MODEL_FORMAT = "simulgenvae-model-v1"
CHECKPOINT_FORMAT = "simulgenvae-checkpoint-v1"


def atomic_save(payload: dict, path) -> None:
    """torch.save to a temporary file, then rename: a killed job never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def model_payload(model: HierarchicalVAE, config: Config, scaler: MinMaxScaler) -> dict:
    return {"format": MODEL_FORMAT, "spec": model.spec.to_dict(), "config": config.to_dict(),
            "scaler": scaler.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(path, model, config, scaler) -> None:
    atomic_save(model_payload(model, config, scaler), path)


def save_checkpoint(path, model, config, scaler, optimizer, scheduler, epoch: int, best_val_loss: float) -> None:
    """Model plus optimiser and scheduler state, so the file says exactly where training stood."""
    payload = model_payload(model, config, scaler)
    payload.update(format=CHECKPOINT_FORMAT, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                   epoch=epoch, best_val_loss=best_val_loss)
    atomic_save(payload, path)


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


def read_payload(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model file not found", "train a model first (python SimulGen-VAE.py)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or a pickle of arbitrary objects
        raise InputError(path, f"cannot be loaded safely ({type(error).__name__})",
                         "the file is corrupt or not a SimulGenVAE model; retrain or use another file") from None
    if not isinstance(payload, dict) or payload.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise InputError(path, "is not a SimulGenVAE model file", "point to model_save/SimulGen-VAE")
    return payload
