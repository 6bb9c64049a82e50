"""Latent conditioners: networks that map a design's definition to the VAE's latents.

The target is one flat vector of output_dim numbers per design (main latent, then every hierarchical level's latent),
standardised, so each network ends in a Linear started near zero and an untrained conditioner predicts the mean.

- MLP  (kind "mlp"): design parameters from CSV [B, n_params]; residual blocks of LayerNorm -> Linear -> GELU ->
  Dropout -> Linear, with dropout growing with depth so the widest, most specific features are regularised most.
- CNN  (kind "cnn"): design images [B, C, S, S]; ResNet-style stages with squeeze-and-excitation channel gates and,
  optionally, CBAM-style spatial attention for designs whose meaning depends on where a feature sits.
- ViT  (kind "vit"): design images [B, C, S, S]; patch tokens through pre-norm transformer blocks with stochastic
  depth, for images whose relevant structure is long-range rather than local.

Besides the network trained for input_type, three candidates on parameters are kept instead of it when they predict
the validation designs' fields better (training.conditioner_choice): a GP per latent number (models.
gaussian_process), a thin-plate-spline interpolant of the latents (models.radial_basis) and a neural field that
predicts the field itself, not latents (models.neural_field; models.surrogate decodes either kind).

With members > 1 (lc_ensemble) the conditioner is an ensemble of that many networks of the spec, started from
different random weights and trained side by side (ConditionerEnsemble): its prediction is their mean, their spread
per latent number the prediction's uncertainty (ConditionerEnsemble.latent_spread).
"""
import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn

from modules.models.gaussian_process import GPRConditioner
from modules.models.grad_checkpointing import run_blocks
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

    def to_dict(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape), "filters": list(self.filters),
                "field_shape": list(self.field_shape)}

    @classmethod
    def from_dict(cls, values) -> "ConditionerSpec":
        return cls(**{**values, "input_shape": tuple(values["input_shape"]), "filters": tuple(values["filters"]),
                      "field_shape": tuple(values["field_shape"])})


def build_conditioner(spec: ConditionerSpec) -> nn.Module:
    """The network for spec.kind: forward maps [B, *input_shape] float32 to [B, output_dim]."""
    if spec.kind not in NETWORKS:
        raise ValueError(f"unknown conditioner kind {spec.kind!r}; expected one of {tuple(NETWORKS)}")
    if spec.members > 1:
        return ConditionerEnsemble(spec)
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


def output_head(width: int, output_dim: int) -> nn.Linear:
    """Last layer with tiny weights: targets are standardised, so predicting ~0 at start is predicting the mean."""
    head = nn.Linear(width, output_dim)
    nn.init.normal_(head.weight, std=1e-3)
    nn.init.zeros_(head.bias)
    return head


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


# ------------------------------------------------------------------------------------------------------------ CNN
def norm_groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Module):
    """[B, C_in, H, W] -> [B, C_out, ceil(H/stride), ceil(W/stride)]: pre-activation ResNet block."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(norm_groups(in_channels), in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1),
            nn.GroupNorm(norm_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        # a 1x1 (strided) conv also when only the stride changes: unlike pooling it cannot shrink a 1x1 map to 0x0
        same = in_channels == channels and stride == 1
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, channels, 1, stride=stride)

    def forward(self, x):
        return self.shortcut(x) + self.body(x)


class SqueezeExcite(nn.Module):
    """Reweights channels of [B, C, H, W] by sigmoid gates computed from their global averages."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(4, channels // 8)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.SiLU(),
                                  nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial gate on [B, C, H, W]: a 7x7 conv of the channel-mean and channel-max maps picks where to look."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        summary = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(summary))


class CNNConditioner(nn.Module):
    """Design images [B, C, S, S] -> latents [B, output_dim]; the map halves in every stage after the first."""

    def __init__(self, spec: ConditionerSpec):
        super().__init__()
        filters = spec.filters
        self.stem = nn.Conv2d(spec.input_shape[0], filters[0], 3, padding=1)
        self.stages = nn.Sequential(*[self._stage(filters[max(i - 1, 0)], width, 1 if i == 0 else 2, spec)
                                      for i, width in enumerate(filters)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(spec.dropout),
                                  output_head(filters[-1], spec.output_dim))
        self.recompute = False  # gradient checkpointing of the stages (--grad_checkpointing)

    @staticmethod
    def _stage(in_channels, channels, stride, spec):
        layers = [ConvBlock(in_channels, channels, stride), SqueezeExcite(channels)]
        return nn.Sequential(*layers, SpatialAttention()) if spec.spatial_attention else nn.Sequential(*layers)

    def forward(self, images):
        return self.head(run_blocks(self.stages, self.stem(images), self.recompute))

    def features(self, images):
        """[B, filters[-1]]: what the last layer maps to latents (the space in which designs are compared)."""
        return self.head[:-1](run_blocks(self.stages, self.stem(images), self.recompute))


# ------------------------------------------------------------------------------------------------------------ ViT
class DropPath(nn.Module):
    """Stochastic depth: in training, drops a residual branch [B, ...] for whole samples with probability rate."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, branch):
        if not self.training or self.rate == 0:
            return branch
        keep = 1 - self.rate
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
        return branch * mask / keep  # rescaled so the expected output equals the eval-mode output


class TransformerBlock(nn.Module):
    """Pre-norm transformer block over tokens [B, N, D]."""

    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens):
        normed = self.attn_norm(tokens)
        tokens = tokens + self.drop_path(self.attn(normed, normed, normed, need_weights=False)[0])
        return tokens + self.drop_path(self.mlp(tokens))


class ViTConditioner(nn.Module):
    """Design images [B, C, S, S] -> latents [B, output_dim] via (S / patch)^2 patch tokens, mean-pooled."""

    def __init__(self, spec: ConditionerSpec):
        super().__init__()
        channels, height, width = spec.input_shape
        patch, dim, depth = spec.vit_patch_size, spec.vit_dim, spec.vit_depth
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of vit_patch_size {patch}")
        if dim % spec.vit_heads:
            raise ValueError(f"vit_dim {dim} is not a multiple of vit_heads {spec.vit_heads}")
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (height // patch) * (width // patch), dim) * 0.02)
        rates = torch.linspace(0, spec.vit_drop_path, depth).tolist()  # deeper blocks are skipped more often
        self.blocks = nn.Sequential(*[TransformerBlock(dim, spec.vit_heads, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(spec.dropout), output_head(dim, spec.output_dim))
        self.recompute = False  # gradient checkpointing of the blocks (--grad_checkpointing)

    def forward(self, images):
        return self.head(self.features(images))

    def features(self, images):
        """[B, vit_dim]: the mean token, what the head maps to latents (the space in which designs are compared)."""
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.position
        return self.norm(run_blocks(self.blocks, tokens, self.recompute)).mean(dim=1)


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
# Fitted, not trained, on parameters: kept instead of the MLP when they predict better (latent_gp, latent_rbf).
LATENT_GP = Conditioner("gpr", "GP on latents", GPRConditioner)
LATENT_RBF = Conditioner("rbf", "RBF on latents", RBFConditioner)
# Trained on the fields themselves, on parameters where the nodes' positions are known: kept instead of the others when
# it predicts better (field_conditioner_epochs); its output is the field, not latents.
NEURAL_FIELD = Conditioner("neural_field", "neural field", NeuralFieldConditioner)
NETWORKS = {row.kind: row for row in (*CONDITIONERS.values(), LATENT_GP, LATENT_RBF, NEURAL_FIELD)}
