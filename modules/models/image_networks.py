"""The networks that read design images [B, C, S, S]: the CNN (input_type image) and the ViT (image_vit). Each maps
an image to output_dim numbers (features() to what its last layer reads): the VAE's latents as a latent conditioner
(models.conditioners), or a code for the neural field's code network as an image encoder (models.image_embedding).

- CNN: ResNet-style stages with squeeze-and-excitation channel gates and, optionally, CBAM-style spatial attention
  for designs whose meaning depends on where a feature sits.
- ViT: patch tokens through pre-norm transformer blocks with stochastic depth, for images whose relevant structure is
  long-range rather than local.
"""
import torch
from torch import nn

from modules.models.grad_checkpointing import run_blocks


def output_head(width: int, output_dim: int) -> nn.Linear:
    """Last layer with tiny weights: targets are standardised, so predicting ~0 at start is predicting the mean."""
    head = nn.Linear(width, output_dim)
    nn.init.normal_(head.weight, std=1e-3)
    nn.init.zeros_(head.bias)
    return head


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

    def __init__(self, spec):
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

    def __init__(self, spec):
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
