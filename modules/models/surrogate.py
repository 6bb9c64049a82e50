"""The one prediction path: raw design inputs -> fields in physical units.

    parameters [n, P] as in the CSV -> (p - mean) / std, in float64 -> standardised inputs [n, P] float32
    (images [n, C, S, S] in [0, 1] go in as they are)
      -> the conditioner -> standardised latents [n, D + L*d] -> latents * std + mean -> the VAE's decoder
         (a neural-field conditioner gives the scaled field itself)
      -> scaled field [n, T, M] -> (scaled - base) * inverse_scale + data_min, per variable
      -> physical field [n, T, M] float32

--predict, --samples, --suggest, --export, the evaluation, the choice between conditioners and the calibration all
go through a Surrogate; --export traces forward() as it is. Every scaling constant is a buffer, so the whole path
moves to a device and traces as one module. Without a conditioner a Surrogate still reconstructs fields through the
VAE (--reconstruct, the evaluation's plots).
"""
import torch
from torch import nn

from modules.models.latents import split_latents


class Surrogate(nn.Module):
    """The VAE and its field scaling, and, to predict from designs, a conditioner with its latent and input
    scalings (input_scaler None: the conditioner reads images)."""

    def __init__(self, vae, field_scaler, conditioner=None, latent_scaler=None, input_scaler=None):
        super().__init__()
        self.vae, self.conditioner = vae, conditioner
        self.reads_parameters = input_scaler is not None
        if self.reads_parameters:  # in float64, as the CSV's values are read
            self.register_buffer("input_mean", torch.as_tensor(input_scaler.mean, dtype=torch.float64))
            self.register_buffer("input_std", torch.as_tensor(input_scaler.std, dtype=torch.float64))
        if latent_scaler is not None:
            self.register_buffer("latent_mean", torch.as_tensor(latent_scaler.mean, dtype=torch.float32))
            self.register_buffer("latent_std", torch.as_tensor(latent_scaler.std, dtype=torch.float32))
        self.n_vars = field_scaler.n_vars
        for name, value in field_scaler.constants().items():  # [n_vars, 1] float32 each
            self.register_buffer(f"field_{name}", value)

    @property
    def decodes_fields(self) -> bool:
        """Whether the conditioner predicts the field itself (a neural field) rather than the VAE's latents: its
        draws then come from the model it carries, if any (draws)."""
        return getattr(self.conditioner, "decodes_fields", False)

    def forward(self, raw):
        """Raw design inputs [n, ...] -> physical fields [n, T, M] float32."""
        return self.physical(self.scaled(self.standardised(raw)))

    def standardised(self, raw):
        """What the conditioner reads: parameters standardised on the training designs, images as they are."""
        if not self.reads_parameters:
            return raw
        return ((raw.double() - self.input_mean) / self.input_std).float()

    def scaled(self, inputs):
        """Standardised inputs -> the predicted fields [n, T, M] in the VAE's scaled units."""
        if self.decodes_fields:
            return self.conditioner(inputs).float()
        return self.decoded(self.conditioner(inputs).float())

    def decoded(self, latents, decode: bool = True):
        """Standardised latents [n, D + L*d] -> fields [n, T, M] in scaled units (decode False: what the VAE's decoder
        writes, the codes of a VAE on snapshot codes). Differentiable: end-to-end training trains through it."""
        latents = latents * self.latent_std + self.latent_mean
        return self.vae.decode(*split_latents(latents, self.vae.spec), decode=decode).float()

    def physical(self, scaled):
        """Scaled fields [n, T, M] -> physical units, float32: the inverse of the field scaling, per variable."""
        n, steps, nodes = scaled.shape
        per_variable = scaled.float().reshape(n, steps, self.n_vars, nodes // self.n_vars)
        return ((per_variable - self.field_base) * self.field_inverse_scale + self.field_data_min).reshape(n, steps,
                                                                                                         nodes)

    def field_scaled(self, physical):
        """Physical fields [n, T, M] -> the VAE's scaled units, float32: the field scaling, per variable."""
        n, steps, nodes = physical.shape
        per_variable = physical.float().reshape(n, steps, self.n_vars, nodes // self.n_vars)
        return ((per_variable - self.field_data_min) * self.field_scale + self.field_base).reshape(n, steps, nodes)

    def reconstruct(self, physical):
        """Physical fields [n, T, M] -> the VAE's reconstruction of them (posterior means), physical units."""
        return self.physical(self.vae(self.field_scaled(physical), sample=False)["recon"])

    def latent_spread(self, inputs):
        """(predicted standardised latents [n, D], their standard deviation [n, D]) of a conditioner that knows its
        uncertainty (an ensemble, a GP); (latents, None) of a single network."""
        if hasattr(self.conditioner, "latent_spread"):
            return self.conditioner.latent_spread(inputs)
        return self.conditioner(inputs), None

    def draws(self, inputs, n_draws: int, standard_normal):
        """(the prediction [n, T, M], an iterator of n_draws draws [n, T, M]), both in scaled units, float32 on the
        inputs' device; the draws are made one at a time, never all in memory. A draw is the predicted latents plus
        their standard deviation times standard normal noise, decoded; for a single network, which has no spread of
        its own, the main latent as predicted and each level's latent plus its prior's noise; for a neural field, its
        prediction plus what that noise moves the decoded field of the latents of the model it carries (its spread,
        models.neural_field). standard_normal(shape): standard normal noise of that shape on the CPU."""
        latents, spread = self.latent_spread(inputs)
        latents = latents.float()
        centre = self.decoded(latents)
        prediction = self.scaled(inputs) if self.decodes_fields else centre

        def drawn():
            for _ in range(n_draws):
                if spread is None:
                    spec = self.vae.spec
                    main, levels = split_latents(latents * self.latent_std + self.latent_mean, spec)
                    noise = standard_normal((len(main), spec.n_levels, spec.level_latent_dim)).to(main.device)
                    yield self.vae.decode_around(main, levels, noise).float()
                else:
                    noise = standard_normal(tuple(latents.shape)).to(latents.device)
                    draw = self.decoded(latents + spread * noise)
                    yield prediction + (draw - centre) if self.decodes_fields else draw

        return prediction, drawn()
