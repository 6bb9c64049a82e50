"""The VAE's frozen linear path: a design's latent numbers are, first of all, its whitened POD coefficients.

    field = node_mean + (coefficient_mean + sum_k z_k * scale_k * mode_k) node_modes^T   (+ the network's residual)

with the design modes of models.pod.design_pod_basis (POD over whole designs inside the node basis), one mode per
latent number. The encoder's posterior means start at exactly these coefficients and the network's residual starts at
zero, so a fresh model reconstructs every design as well as POD with as many modes as latent numbers (up to the node
basis' truncation); training only adds to that. The path is frozen (buffers, not parameters): POD-initialised layers
trained at the network's learning rate lose their start within an epoch.

Its buffers are T * R * K + M * R floats, never T * M * K,
and both directions cost about one node projection. It always runs in float32, also under autocast: it carries
almost all of the field.
"""
import torch
from torch import nn


class PODPath(nn.Module):
    """Latents [B, K] (whitened POD coefficients) <-> fields [B, T, M] (scaled units)."""

    def __init__(self, n_steps: int, n_nodes: int, node_rank: int, n_modes: int):
        super().__init__()
        self.register_buffer("node_mean", torch.zeros(n_nodes))
        self.register_buffer("node_modes", torch.zeros(n_nodes, node_rank))
        self.register_buffer("coefficient_mean", torch.zeros(n_steps, node_rank))
        self.register_buffer("modes", torch.zeros(n_modes, n_steps, node_rank))
        self.register_buffer("scales", torch.ones(n_modes))

    @torch.no_grad()
    def set_basis(self, node_mean, node_modes, coefficient_mean, modes, scales) -> None:
        """The bases of models.pod: node_mean [M], node_modes [M, R], coefficient_mean [T, R], modes [K, T, R],
        scales [K]."""
        for name, value in (("node_mean", node_mean), ("node_modes", node_modes),
                            ("coefficient_mean", coefficient_mean), ("modes", modes), ("scales", scales)):
            getattr(self, name).copy_(value)

    def encode(self, fields):
        """Fields [B, T, M] -> whitened POD coefficients [B, K] (unit variance over the training designs)."""
        with torch.autocast(fields.device.type, enabled=False):
            node_coefficients = (fields.float() - self.node_mean) @ self.node_modes - self.coefficient_mean
            return torch.einsum("btr,ktr->bk", node_coefficients, self.modes) / self.scales

    def decode(self, latents):
        """Whitened POD coefficients [B, K] -> fields [B, T, M]. Differentiable in latents."""
        with torch.autocast(latents.device.type, enabled=False):
            node_coefficients = torch.einsum("bk,ktr->btr", latents.float() * self.scales, self.modes)
            return (node_coefficients + self.coefficient_mean) @ self.node_modes.T + self.node_mean
