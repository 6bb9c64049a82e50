"""What a conditioner that predicts the field itself (a neural field, a feature-frame GP) uses as its uncertainty: it
has no spread of the field of its own, so it carries the fitted candidate on the latents (a GP or a thin-plate
spline, on the parameters or on a neural field's image embedding) named by spec.spread_kind. That model's posterior
spread of the latents, decoded by the VAE around its own latents, models.surrogate adds to the conditioner's
prediction for a draw; the calibration then scales that spread to the conditioner's own errors on the validation
designs (uncertainty.spread)."""
import dataclasses

from torch import nn

from modules.models.image_embedding import fitted_model


class CarriesSpread(nn.Module):
    """Base of the conditioners whose output is the field (decodes_fields): `spread` is the carried model (None:
    none), built unfitted from spec and filled by its saved state."""

    decodes_fields = True

    def __init__(self, spec):
        super().__init__()
        self.spread = fitted_model(dataclasses.replace(spec, kind=spec.spread_kind)) if spec.spread_kind else None

    @property
    def spread_kind(self) -> str | None:
        """uncertainty.spread's name of where its spread comes from; None: it has none."""
        if self.spread is None:
            return None
        return "field_rbf" if getattr(self.spread, "spread_kind", None) == "rbf" else "field_gp"

    def latent_spread(self, inputs):
        """The carried model's (latents [B, D], their standard deviations [B, D]): what a draw perturbs."""
        if self.spread is None:
            raise ValueError("this conditioner carries no spread")
        return self.spread.latent_spread(inputs)
