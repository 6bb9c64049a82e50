"""Design images -> a short embedding: how a design given as an image reaches the neural field and the fitted
candidates that read a few numbers per design.

The image encoder is the network input_type names (the CNN, or the ViT for image_vit) with EMBEDDING outputs. A neural
field (models.neural_field) on images trains it with the field, end to end: image -> embedding -> a code per time
step -> the field at sampled nodes, so the embedding keeps what the fields depend on. Once trained, a frozen copy of
that encoder places every design in EMBEDDING numbers where a GP per latent number or a thin-plate spline of the
latents (models.gaussian_process, models.radial_basis) is fitted as on parameters: FittedOnEmbedding, the same
candidates of the contest (training.conditioner_choice), each with its posterior spread. A GP on the pixels' principal
components was tried first: on the demo's images it predicted worse than the nearest training design (docs/model.md).
"""
import dataclasses

import numpy as np
import torch
from torch import nn

from modules.models.gaussian_process import GPRConditioner
from modules.models.image_networks import CNNConditioner, ViTConditioner
from modules.models.radial_basis import RBFConditioner

EMBEDDING = 16  # numbers per design image: more than the few parameters a design family usually varies
IMAGE_NETWORKS = {"cnn": CNNConditioner, "vit": ViTConditioner}  # what spec.encoder names
FITTED_MODELS = {"gpr": GPRConditioner, "rbf": RBFConditioner}   # what a fitted candidate's spec.kind names


class ImageEncoder(nn.Module):
    """Images [B, C, S, S] -> embeddings [B, EMBEDDING]: spec.encoder's network (its filters, or the vit_* settings)
    with EMBEDDING outputs; features() as that network's."""

    def __init__(self, spec):
        super().__init__()
        shape = dataclasses.replace(spec, kind=spec.encoder, output_dim=EMBEDDING, members=1)
        self.network = IMAGE_NETWORKS[spec.encoder](shape)
        # PyTorch's default start, not the conditioners' near-zero head (whose targets are standardised): the code
        # network reads numbers of order one from the first step
        self.network.head[-1].reset_parameters()

    def forward(self, images):
        return self.network(images)

    def features(self, images):
        return self.network.features(images)


class FittedOnEmbedding(nn.Module):
    """Images [B, C, S, S] -> standardised latents [B, D]: a frozen image encoder (a trained neural field's, copied),
    its embedding standardised on the training designs, then a GP (spec.kind "gpr") or thin-plate spline ("rbf")
    fitted from those embeddings to the latents. latent_spread and features as the fitted model's and the encoder's."""

    def __init__(self, spec):
        super().__init__()
        self.encoder = ImageEncoder(spec)
        self.register_buffer("embedding_mean", torch.zeros(EMBEDDING, dtype=torch.float64))
        self.register_buffer("embedding_std", torch.ones(EMBEDDING, dtype=torch.float64))
        self.fitted = FITTED_MODELS[spec.kind](dataclasses.replace(spec, input_shape=(EMBEDDING,), encoder=""))

    @property
    def spread_kind(self) -> str | None:
        """uncertainty.spread's name of where its spread comes from (the fitted model's)."""
        return getattr(self.fitted, "spread_kind", None)

    def forward(self, images):
        return self.fitted(self.embedded(images))

    def latent_spread(self, images):
        return self.fitted.latent_spread(self.embedded(images))

    def features(self, images):
        return self.encoder.features(images)

    def embedded(self, images):
        """[B, EMBEDDING] float64: the encoder's embedding, standardised on the training designs."""
        return (self.encoder(images).double() - self.embedding_mean) / self.embedding_std

    @torch.no_grad()
    def fit(self, encoder: ImageEncoder, images, targets: np.ndarray, seed: int, fit) -> "FittedOnEmbedding":
        """Copy the trained encoder (frozen, eval mode), standardise the embeddings of the training images [n, C, S,
        S] and fit the model on them: fit(model, inputs [n, EMBEDDING] float64 numpy, targets [n, D], seed), as
        training.conditioner_choice fits it on parameters."""
        self.encoder.load_state_dict(encoder.state_dict())
        self.encoder.requires_grad_(False).eval()
        embeddings = torch.cat([self.encoder(part).double() for part in images.split(64)])
        self.embedding_mean.copy_(embeddings.mean(0))
        self.embedding_std.copy_(embeddings.std(0).clamp_min(1e-12))
        fit(self.fitted, ((embeddings - self.embedding_mean) / self.embedding_std).cpu().numpy(), targets, seed)
        return self


def fitted_model(spec) -> nn.Module:
    """The fitted candidate spec names (kind "gpr" or "rbf"), unfitted: on parameters, or with spec.encoder on the
    embedding of images."""
    return FittedOnEmbedding(spec) if spec.encoder else FITTED_MODELS[spec.kind](spec)
