"""Latent conditioners: networks that map a design's definition to the VAE's latents.

The target is one flat vector of output_dim numbers per design (main latent, then every hierarchical level's latent),
standardised, so each network ends in a Linear started near zero and an untrained conditioner predicts the mean.

- MLP  (kind "mlp"): design parameters from CSV [B, n_params]; residual blocks of LayerNorm -> Linear -> GELU ->
  Dropout -> Linear, with dropout growing with depth so the widest, most specific features are regularised most.
- CNN  (kind "cnn") and ViT (kind "vit"): design images [B, C, S, S] (models.image_networks).

Besides the network trained for input_type, four candidates are kept instead of it when they predict the validation
designs' fields better (training.conditioner_choice): a neural field that predicts the field itself, not latents
(models.neural_field; models.surrogate decodes either kind), on a grid a GP per number of each time step's feature
frame and of the field in it (models.feature_frame; also the field itself), a GP per latent number (models.
gaussian_process) and a thin-plate-spline interpolant of the latents (models.radial_basis). On images the neural
field reads them through an image encoder it trains, and the GP and the spline are fitted on that encoder's
embedding (models.image_embedding).

With members > 1 (lc_ensemble) the conditioner is an ensemble of that many networks of the spec, started from
different random weights and trained side by side (ConditionerEnsemble): its prediction is their mean, their spread
per latent number the prediction's uncertainty (ConditionerEnsemble.latent_spread).
"""
import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn

from modules.models.feature_frame import FeatureFrameConditioner
from modules.models.gaussian_process import GPRConditioner
from modules.models.grad_checkpointing import run_blocks
from modules.models.image_embedding import FITTED_MODELS, fitted_model
from modules.models.image_networks import CNNConditioner, ViTConditioner, output_head
from modules.models.neural_field import NeuralFieldConditioner
from modules.models.radial_basis import RBFConditioner


@dataclass(frozen=True)
class ConditionerSpec:
    """Shape of one conditioner; stored with its weights (as plain types) so it can be rebuilt exactly."""

    kind: str
    input_shape: tuple  # (n_params,) for mlp; (channels, size, size) for cnn and vit
    output_dim: int
    filters: tuple  # the preset's conditioner filters; the ViT uses the vit_* fields instead
    dropout: float = 0.1
    spatial_attention: bool = False
    vit_patch_size: int = 16
    vit_dim: int = 256
    vit_depth: int = 6
    vit_heads: int = 8
    vit_drop_path: float = 0.1
    gp_points: int = 0  # gpr, rbf: the training designs their predictions are sums over
    members: int = 1  # networks in the ensemble (lc_ensemble); 1: a single network
    field_shape: tuple = ()  # neural_field: (T, M, n_vars) of the field it predicts itself
    spread_kind: str = ""  # neural_field: the fitted candidate on the latents ("gpr", "rbf") whose spread it carries
                           # (its gp_points: that one's training designs); "": none
    field_modulation: str = "shift"  # neural_field: its field's (models.neural_field): "frame" on parameters, "shift"
                                     # on images and in the files saved before format version 5
    encoder: str = ""  # neural_field, gpr, rbf on images: the image network ("cnn", "vit") that embeds them (models.
                       # image_embedding); "": they read parameters
    frame: tuple = ()  # feature_frame: (H, W, modes, periodic) of its grid and its frame's POD modes (models.
                       # feature_frame)

    def to_dict(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape), "filters": list(self.filters),
                "field_shape": list(self.field_shape), "frame": list(self.frame)}

    @classmethod
    def from_dict(cls, values) -> "ConditionerSpec":
        return cls(**{**values, "input_shape": tuple(values["input_shape"]), "filters": tuple(values["filters"]),
                      "field_shape": tuple(values["field_shape"]), "frame": tuple(values.get("frame", ()))})


def build_conditioner(spec: ConditionerSpec) -> nn.Module:
    """The network for spec.kind: forward maps [B, *input_shape] float32 to [B, output_dim]."""
    if spec.kind not in NETWORKS:
        raise ValueError(f"unknown conditioner kind {spec.kind!r}; expected one of {tuple(NETWORKS)}")
    if spec.members > 1:
        return ConditionerEnsemble(spec)
    if spec.kind in FITTED_MODELS:  # on parameters, or on an image embedding
        return fitted_model(spec)
    return NETWORKS[spec.kind].network(spec)


def conditioner_label(kind: str, members: int = 1) -> str:
    """'MLP', 'ensemble of 5 MLPs', 'GP on latents', ... in reports and messages."""
    label = NETWORKS[kind].label
    return f"ensemble of {members} {label}s" if members > 1 else label


class ConditionerEnsemble(nn.Module):
    """spec.members networks of one spec (each started from its own random weights, drawn in turn from torch's
    generator): forward gives their mean latents [B, D]; every_member=True gives each one's [K, B, D], what training
    fits (each member on its own loss, so they stay independent fits whose disagreement measures what the designs
    leave open)."""

    def __init__(self, spec: ConditionerSpec):
        super().__init__()
        single = dataclasses.replace(spec, members=1)
        self.members = nn.ModuleList(NETWORKS[spec.kind].network(single) for _ in range(spec.members))

    def forward(self, inputs, every_member: bool = False):
        outputs = torch.stack([member(inputs) for member in self.members])
        return outputs if every_member else outputs.mean(dim=0)

    def latent_spread(self, inputs):
        outputs = self(inputs, every_member=True)
        return outputs.mean(dim=0), outputs.std(dim=0)

    def features(self, images):
        """The first member's features: where design_range compares images (one network's view suffices)."""
        return self.members[0].features(images)


# ------------------------------------------------------------------------------------------------------------ MLP
class MLPBlock(nn.Module):
    """[B, in_width] -> [B, width]: pre-norm residual block; a Linear shortcut only when the width changes."""

    def __init__(self, in_width: int, width: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, width), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(width, width))
        self.shortcut = nn.Identity() if in_width == width else nn.Linear(in_width, width)

    def forward(self, x):
        return self.shortcut(x) + self.body(x)


class MLPConditioner(nn.Module):
    """Design parameters [B, n_params] -> latents [B, output_dim]."""

    def __init__(self, spec: ConditionerSpec):
        super().__init__()
        filters, n = spec.filters, len(spec.filters)
        self.input = nn.Linear(spec.input_shape[0], filters[0])
        self.blocks = nn.Sequential(*[MLPBlock(filters[max(i - 1, 0)], width, spec.dropout * (i + 1) / n)
                                      for i, width in enumerate(filters)])
        self.head = nn.Sequential(nn.LayerNorm(filters[-1]), output_head(filters[-1], spec.output_dim))
        self.recompute = False  # gradient checkpointing of the blocks (--grad_checkpointing)

    def forward(self, params):
        return self.head(run_blocks(self.blocks, self.input(params), self.recompute))


@dataclass(frozen=True)
class Conditioner:
    """One row of CONDITIONERS: what a value of input_type trains."""

    kind: str           # ConditionerSpec.kind, as saved in conditioner files
    label: str          # in reports and messages
    network: type       # built from a ConditionerSpec


# input_type -> its conditioner. A new conditioner is its network class and a row here (and the value in input_type's
# choices in config.keys).
CONDITIONERS = {
    "csv": Conditioner("mlp", "MLP", MLPConditioner),
    "image": Conditioner("cnn", "CNN", CNNConditioner),
    "image_vit": Conditioner("vit", "ViT", ViTConditioner),
}
# Fitted, not trained, on parameters or on a neural field's image embedding (built by build_conditioner): kept instead
# of the others when they predict better (latent_gp, latent_rbf).
LATENT_GP = Conditioner("gpr", "GP on latents", GPRConditioner)
LATENT_RBF = Conditioner("rbf", "RBF on latents", RBFConditioner)
# Trained on the fields themselves, from parameters or images, where the nodes' positions are known: kept instead of
# the others when it predicts better (field_conditioner_epochs); its output is the field, not latents.
NEURAL_FIELD = Conditioner("neural_field", "neural field", NeuralFieldConditioner)
# Fitted on the fields themselves, from parameters, where they lie on a grid: each time step's feature frame and the
# field in it (feature_frame_gp); its output is the field.
FEATURE_FRAME = Conditioner("feature_frame", "feature-frame GP", FeatureFrameConditioner)
NETWORKS = {row.kind: row for row in (*CONDITIONERS.values(), LATENT_GP, LATENT_RBF, NEURAL_FIELD, FEATURE_FRAME)}
