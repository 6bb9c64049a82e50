"""How good the saved surrogate is, next to what a user would otherwise use: every number of every report, each
computed once, from the saved files, in physical units. The reports (evaluation.report) and the plots
(evaluation.figures) are views of one Evaluation.

- Reconstruction (what the VAE keeps of a design): the VAE against POD with as many numbers per design (and with
  as many as the main latent) and the training mean field, on the validation designs; the VAE on its training
  designs too.
- Prediction (a design's field from its condition, when input_type is set): the conditioner in model_save/ against
  POD + Gaussian-process regression (parameters only), the nearest training design in condition space and the mean
  field, on the same validation designs.
- Per design and per time step: relative L2 and max-abs errors (evaluation.metrics.FieldErrors).
- The memorization check of generation and the active latent units of each level.

Each number is computed on first use and kept on the object, so a training run can report the VAE before its
conditioner trains and evaluate the conditioner after, without a second pass over the data. The data is streamed
(design batches for the models, time-step chunks for the baselines), so memory stays bounded. Passes over the data:
the VAE over every design, the design Gram matrix, the baselines (training and validation designs), the conditioner
over the validation designs, the memorization check over the training designs.
"""
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from modules.config import Config
from modules.config.settings import check_same_data
from modules.data.batches import in_order, make_batches
from modules.data.conditions import read_conditions
from modules.data.scaling import ColumnScaler
from modules.errors import InputError
from modules.evaluation import latent_health
from modules.evaluation.baselines import baseline_weights, score_combinations
from modules.evaluation.memorization import memorization_check
from modules.evaluation.metrics import FieldErrors
from modules.models.pod import design_gram
from modules.models.surrogate import Surrogate
from modules.storage.model_files import (CONDITIONER_FORMAT, assembled_surrogate, checked_vae_file, load_conditioner,
                                         load_model, read_payload)
from modules.storage.model_folder import saved_case
from modules.storage.paths import CONDITIONER_FILE, MODEL_FILE, OUTPUT_DIR


@dataclass
class Encoding:
    """The VAE's posterior means of every design and what follows from them, in dataset order."""

    main_latents: np.ndarray        # [N, D]
    level_latents: np.ndarray       # [N, L, d]; decoding (main, levels) gives the reconstruction
    kl: np.ndarray                  # [N, D + L*d] KL per latent dimension, nats
    errors: FieldErrors             # the reconstruction's errors, physical units, every design


@dataclass
class SavedConditioner:
    """The saved conditioner on the VAE it decodes through: the evaluated one, unless it was trained through another."""

    surrogate: Surrogate
    facts: dict                     # what its file holds besides the weights


class Evaluation:
    """The saved VAE (vae_file) and conditioner (model_save/latent_conditioner, if any) on a case's split.

    case: the case the VAE was trained on (a training run's own; None opens it from the VAE's saved scaler and
    split). conditions: what defines each design (data.conditions.Conditions) or None without a conditioner.
    """

    def __init__(self, config, runtime, case=None, vae_file=MODEL_FILE, conditions=None):
        self.vae, self.config, scaler = load_model(vae_file, runtime.device)  # config: the VAE's (data, sizes, seed)
        check_same_data(config, self.config, vae_file)
        self.case = case if case is not None else saved_case(self.config, runtime, scaler, vae_file)
        self.runtime, self.vae_file, self.conditions = runtime, vae_file, conditions
        self.prediction_note = None  # why there are conditions but no prediction (set with conditioner)
        self.n_nodes = self.case.array.sample_shape[1]

    # ------------------------------------------------------------------------------------------ reconstruction
    @cached_property
    @torch.no_grad()
    def encoding(self) -> Encoding:
        """One pass over every design along the posterior-mean path."""
        config, case = self.config, self.case
        self.vae.eval()
        designs = np.arange(config.n_designs)
        batches = make_batches(case.array, designs, case.scaler, self.runtime, load_all=False)
        mains, levels, kls = [], [], []
        errors = FieldErrors.empty(designs, self.vae.spec.n_steps, config.n_vars)
        first = 0
        # Batch_size designs, as in training: without gradients, and scored one design at a time, they take less
        for batch in batches.batches(in_order(len(designs), config.batch_size)):
            out = self.vae(batch, sample=False)
            mains.append(out["main_mean"].float().cpu().numpy())
            levels.append(out["level_latents"].float().cpu().numpy())
            kls.append(torch.cat([out["kl_main_dims"], out["kl_level_dims"].flatten(1)], dim=1).float().cpu().numpy())
            recon = case.scaler.inverse(out.pop("recon").float().cpu().numpy())  # the scaled one is freed here
            del out
            errors.add(slice(first, first + len(batch)), recon, case.scaler.inverse(batch.float().cpu().numpy()))
            del recon
            first += len(batch)
        return Encoding(np.concatenate(mains), np.concatenate(levels), np.concatenate(kls), errors)

    @cached_property
    def gram(self) -> np.ndarray:
        """design_gram of [training..., validation...] designs: what every POD-based number is computed from."""
        return design_gram(self.case.array, np.concatenate([self.case.train_indices, self.case.val_indices]))

    @cached_property
    def baselines(self) -> dict:
        """{name: FieldErrors of the validation designs}: "pod" (as many modes as the VAE has latent numbers),
        "pod_main" (as many as its main latent), "mean_field" and, with conditions, "nearest_neighbour" and
        (parameters only) "pod_gpr". One streamed pass over the training and validation designs."""
        case, config = self.case, self.config
        order = np.concatenate([case.train_indices, case.val_indices])
        n_train = len(case.train_indices)
        condition_values = parameters = None
        if self.conditions is not None:
            condition_values = self.conditions.values[order]
            if self.conditions.channels is None:  # parameters: standardised on the training designs, as the MLP's
                condition_values = parameters = ColumnScaler.fit(condition_values[:n_train]).transform(
                    condition_values)
        weights = baseline_weights(self.gram, n_train, {"pod": config.latent_size, "pod_main": config.main_latent_dim},
                                   condition_values, parameters, config.seed)
        return score_combinations(case.array, case.train_indices, case.val_indices, weights, config.n_vars)

    @torch.no_grad()
    def reconstruct(self, designs) -> np.ndarray:
        """The VAE's reconstruction [b, T, M] of these designs (dataset indices), physical units."""
        fields = torch.from_numpy(self.case.array.read(designs)).to(self.runtime.device)
        return Surrogate(self.vae, self.case.scaler).to(self.runtime.device).reconstruct(fields).cpu().numpy()

    # -------------------------------------------------------------------------------------------- prediction
    @cached_property
    def conditioner(self) -> SavedConditioner | None:
        """The conditioner in model_save/ when the VAE it was trained with is unchanged; else None, with the reason
        in prediction_note. Read once and kept: it must not be asked for before the conditioner file is final."""
        if self.conditions is None:
            return None
        if not CONDITIONER_FILE.exists():
            self.prediction_note = f"no conditioner in {CONDITIONER_FILE.parent}/ yet (train one with --lc_only=1)"
            return None
        network, facts = load_conditioner(CONDITIONER_FILE, self.runtime.device)
        try:
            vae_file = checked_vae_file(facts, CONDITIONER_FILE)
        except InputError as error:
            self.prediction_note = f"{CONDITIONER_FILE} is not evaluated: {error.problem}"
            return None
        if vae_file.resolve() == Path(self.vae_file).resolve():
            vae, field_scaler = self.vae, self.case.scaler
        else:
            vae, _, field_scaler = load_model(vae_file, self.runtime.device)
        surrogate = assembled_surrogate(network, facts, vae, field_scaler).to(self.runtime.device).eval()
        return SavedConditioner(surrogate, facts)

    @cached_property
    def prediction(self) -> FieldErrors | None:
        """The conditioner's FieldErrors on the validation designs, a batch of designs at a time."""
        if self.conditioner is None:
            return None
        case = self.case
        errors = FieldErrors.empty(case.val_indices, case.array.sample_shape[0], self.config.n_vars)
        batch_size = self.conditioner.facts["config"]["batch_size"]
        for start in range(0, len(case.val_indices), batch_size):
            designs = case.val_indices[start:start + batch_size]
            errors.add(slice(start, start + len(designs)), self.predict(designs), case.array.read(designs))
        return errors

    @torch.no_grad()
    def predict(self, designs) -> np.ndarray:
        """The conditioner's fields [b, T, M] of these designs (dataset indices), physical units, through the
        surrogate --predict uses."""
        raw = torch.as_tensor(self.conditions.values[designs], device=self.runtime.device)
        return self.conditioner.surrogate(raw).cpu().numpy()

    # ------------------------------------------------------------------------------------ generation, latents
    @cached_property
    def memorization(self) -> dict:
        return memorization_check(self.vae, self.case, self.gram, self.config.seed, OUTPUT_DIR)

    @cached_property
    def latent_summary(self) -> dict:
        """Active units and KL per dimension (evaluation.latent_health) over the validation designs."""
        encoding, val, spec = self.encoding, self.case.val_indices, self.vae.spec
        means = np.concatenate([encoding.main_latents, encoding.level_latents.reshape(len(encoding.kl), -1)],
                               axis=1)[val].astype(np.float64)
        sums = np.concatenate([encoding.kl[val].sum(axis=0), means.sum(axis=0), (means ** 2).sum(axis=0)])
        return latent_health.summarise(torch.from_numpy(sums), len(val), spec.main_latent_dim, spec.n_levels,
                                       spec.level_latent_dim)


def saved_conditions(config):
    """What defines each design for an evaluation of the saved models (--evaluate): read with the config the saved
    conditioner was trained with (its param_dir, image size) when it can be evaluated (its VAE is unchanged), else
    with config; None when input_type is none there."""
    conditions_config = config
    if CONDITIONER_FILE.exists():
        facts = read_payload(CONDITIONER_FILE, formats=(CONDITIONER_FORMAT,))
        try:
            checked_vae_file(facts, CONDITIONER_FILE)
            conditions_config = Config.from_dict(facts["config"])
        except (InputError, KeyError, TypeError):  # evaluated without it; the report says why
            pass
    return read_conditions(conditions_config) if conditions_config.has_conditioner else None
