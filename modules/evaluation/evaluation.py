"""--evaluate, also run at the end of every training: how good the saved surrogate is, next to what a user would
otherwise use, in physical units. Written to output/evaluation.json and .md (modules/evaluation_report.py), with
plots when --plot is 0 or 1 (modules/evaluation_plots.py).

- Reconstruction (what the VAE keeps of a design): the VAE against POD with as many numbers per design and the
  training mean field, on the validation designs, plus the VAE on its training designs.
- Prediction (a design's field from its condition, when input_type is set): the conditioner in model_save/ against
  POD + Gaussian-process regression (parameters only), the nearest training design in condition space and the mean
  field, on the same validation designs.
- Per design and per time step: relative L2 and max-abs errors; the worst designs by index.
- The memorization check of generation (modules/memorization.py) and the active latent units of each level.

Everything is computed from files: the VAE in model_save/ (its split and scaler), the dataset, the conditions. The
data is streamed (design batches for the models, time-step chunks for the baselines), so memory stays bounded.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.evaluation import latent_health
from modules.evaluation.baselines import baseline_weights, score_combinations
from modules.storage.model_files import load_conditioner, load_model
from modules.training.conditioner_case import check_same_data, open_fields, read_conditions, read_split
from modules.config.settings import Config
from modules.data.batches import make_batches
from modules.errors import InputError
from modules.evaluation.reconstruction_report import encode_and_score
from modules.evaluation.metrics import FieldErrors
from modules.evaluation.memorization import memorization_check
from modules.storage.paths import CONDITIONER_FILE, MODEL_FILE, OUTPUT_DIR
from modules.commands.predict import checked_vae_file, predict_fields
from modules.data.scaling import ColumnScaler


@dataclass
class Evaluation:
    """What the report and the plots are made of (FieldErrors in physical units; None where not applicable)."""

    config: Config                  # the VAE's config (data, sizes, seed)
    case: object                    # the VAE run's Case: dataset, split, scaler
    vae: torch.nn.Module
    reconstruct: object             # designs [b] -> the VAE's reconstructions [b, T, M], physical units
    reconstruction: FieldErrors     # the VAE, every design
    baselines: dict                 # {name: FieldErrors of the validation designs}
    prediction: FieldErrors | None  # the conditioner, validation designs
    prediction_note: str | None     # why there is no conditioner row, if there is none
    predict: object | None          # designs [b] -> the conditioner's fields [b, T, M], physical units
    conditioner_config: dict | None  # the evaluated conditioner's saved config
    conditions: object | None       # modules.conditioner_case.Conditions, when input_type is set
    main_latents: np.ndarray        # [N, D] posterior means
    latent_summary: dict            # modules.latent_health.summarise of the validation designs
    memorization: dict


def evaluate_saved(config, runtime, case=None, vae_file=MODEL_FILE, say=print) -> Evaluation:
    """Score the VAE vae_file (and the conditioner in model_save/) on the dataset condition.txt describes. case: the
    Case the VAE was just trained on (end of a training run); None opens the data with the split saved beside the
    VAE and its scaler."""
    vae, vae_config, scaler = load_model(vae_file, runtime.device)
    check_same_data(config, vae_config, vae_file)
    if case is None:
        case = open_fields(vae_config, runtime, scaler, read_split(Path(vae_file).parent / "split.json", vae_config))
    say(f"Evaluating {vae_file} on {len(case.val_indices)} validation designs ...")
    if case.encoded is None:  # not just computed by the training run that saved this VAE
        every = make_batches(case.array, np.arange(vae_config.n_designs), scaler, runtime, load_all=False)
        case.encoded = encode_and_score(vae, every, scaler, vae_config.batch_size, np.arange(vae_config.n_designs),
                                        vae_config.n_vars)
    mains, levels, kl, reconstruction = case.encoded
    conditioner, note = saved_conditioner(runtime.device)
    conditions_config = Config.from_dict(conditioner[1]["config"]) if conditioner else config
    conditions = read_conditions(conditions_config) if conditions_config.has_conditioner else None
    predict = prediction = None
    if conditioner is not None:
        predict = conditioner_predictor(*conditioner, conditions, runtime.device)
        prediction = score_predictor(predict, case, conditions_config.batch_size, conditions_config.n_vars)
    elif conditions is not None and note is None:
        note = f"no conditioner in {CONDITIONER_FILE.parent}/ yet (train one with --lc_only=1)"
    return Evaluation(
        config=vae_config, case=case, vae=vae, reconstruction=reconstruction,
        reconstruct=lambda designs: reconstruct_designs(vae, case, designs),
        baselines=baselines(case, vae_config, conditions), prediction=prediction,
        prediction_note=None if prediction is not None or conditions is None else note,
        predict=predict, conditioner_config=conditioner[1]["config"] if conditioner else None,
        conditions=conditions, main_latents=mains,
        latent_summary=validation_latent_summary(kl, mains, levels, case.val_indices, vae.spec),
        memorization=memorization_check(vae, case, vae_config, OUTPUT_DIR, say))


def saved_conditioner(device):
    """((conditioner, facts), None) for the conditioner in model_save/ when its VAE is unchanged; else (None, why)."""
    if not CONDITIONER_FILE.exists():
        return None, None
    conditioner, facts = load_conditioner(CONDITIONER_FILE, device)
    try:
        checked_vae_file(facts, CONDITIONER_FILE)
    except InputError as error:
        return None, f"{CONDITIONER_FILE} is not evaluated: {error.problem}"
    return (conditioner, facts), None


def conditioner_predictor(conditioner, facts, conditions, device):
    """designs (dataset indices) -> the conditioner's fields [b, T, M] in physical units, decoded by the VAE it was
    trained with, its conditions prepared with its own saved scalers (as --predict does)."""
    vae, _, field_scaler = load_model(checked_vae_file(facts, CONDITIONER_FILE), device)
    values = conditions.values
    if facts.get("input_scaler"):
        values = ColumnScaler.from_dict(facts["input_scaler"]).transform(values)
    inputs = torch.as_tensor(values, dtype=torch.float32)
    latent_scaler = ColumnScaler.from_dict(facts["latent_scaler"])

    def predict(designs):
        scaled, _ = predict_fields(conditioner, vae, latent_scaler, inputs[designs].to(device), len(designs))
        return field_scaler.inverse(scaled)
    return predict


def score_predictor(predict, case, batch_size: int, n_vars: int) -> FieldErrors:
    """A predictor's FieldErrors on the validation designs, a batch of designs at a time."""
    errors = FieldErrors.empty(case.val_indices, case.array.sample_shape[0], n_vars)
    for start in range(0, len(case.val_indices), batch_size):
        designs = case.val_indices[start:start + batch_size]
        errors.add(slice(start, start + len(designs)), predict(designs), case.array.read(designs))
    return errors


@torch.no_grad()
def reconstruct_designs(vae, case, designs) -> np.ndarray:
    """The VAE's reconstruction [b, T, M] of these designs (dataset indices), physical units."""
    batch = torch.from_numpy(case.scaler.transform(case.array.read(designs))).to(next(vae.parameters()).device)
    return case.scaler.inverse(vae(batch, sample=False)["recon"].float().cpu().numpy())


def baselines(case, config, conditions) -> dict:
    """{name: FieldErrors} of POD (the VAE's latent size), the mean field and, with conditions, nearest neighbour and
    (parameters only) POD + GPR, on the validation designs."""
    order = np.concatenate([case.train_indices, case.val_indices])
    n_train = len(case.train_indices)
    condition_values = parameters = None
    if conditions is not None:
        condition_values = conditions.values[order]
        if conditions.channels is None:  # parameters: standardised on the training designs, as the MLP sees them
            condition_values = parameters = ColumnScaler.fit(condition_values[:n_train]).transform(condition_values)
    weights = baseline_weights(case.split_gram(), n_train, config.latent_size, condition_values, parameters,
                               config.seed)
    return score_combinations(case.array, case.train_indices, case.val_indices, weights, config.n_vars)


def validation_latent_summary(kl, mains, levels, val_indices, spec) -> dict:
    """Active units and KL per dimension (modules/latent_health.py) over the validation designs."""
    means = np.concatenate([mains, levels.reshape(len(levels), -1)], axis=1)[val_indices].astype(np.float64)
    sums = np.concatenate([kl[val_indices].sum(axis=0), means.sum(axis=0), (means ** 2).sum(axis=0)])
    return latent_health.summarise(torch.from_numpy(sums), len(val_indices), spec.main_latent_dim, spec.n_levels,
                                   spec.level_latent_dim)
