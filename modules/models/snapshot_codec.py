"""The snapshot codec: each time step of a field (a snapshot, [M] values) <-> a code of a few numbers, so that the
VAE can run on code trajectories [T, C] instead of fields [T, M] where a linear basis cannot follow the field.

    code  = standardise(MLP((snapshot - node_mean) node_modes / coefficient_scale))          encode, [M] -> [C]
    value = NeuralFieldNodes(code)(x)  at every node x                                        decode, [C] -> [M]

The encoder reads the snapshot's node-POD coefficients (the VAE's own node basis); the decoder is the neural field of
models.neural_field: a sine network over the node coordinates whose layers are phase-shifted by the code, so a
feature moves across the mesh by a change of code, without a mode for every position it visits, and (modulation
WARP) whose coordinates are stretched and turned and whose layers' amplitudes are scaled by it, so that a feature
can also change shape (docs/model.md). The code's size C is chosen per case (training.codec_choice).
Both are trained together on all N x T training snapshots (training.codec_choice) and then frozen: the VAE
trains on the codes, and its fields are the decoded codes. The codes are standardised per code number on the
training snapshots (code_mean, code_std), so the VAE sees values of unit spread.

Encoding costs one node projection per snapshot (T * M * R multiply-adds per design); decoding every node costs the
neural field's (see models.neural_field), in bounded chunks without gradients.
"""
import torch
from torch import nn

from modules.models.neural_field import CODE, SHIFT, NeuralFieldNodes, code_network


class SnapshotCodec(nn.Module):
    """Fields [B, T, M] (scaled units) <-> standardised codes [B, T, code]. modulation: the field's
    (models.neural_field: SHIFT, or WARP)."""

    def __init__(self, n_nodes: int, n_vars: int, node_rank: int, dims: int = 2, code: int = CODE,
                 modulation: str = SHIFT):
        super().__init__()
        self.register_buffer("node_mean", torch.zeros(n_nodes))
        self.register_buffer("node_modes", torch.zeros(n_nodes, node_rank))
        self.register_buffer("coefficient_scale", torch.ones(()))
        self.register_buffer("code_mean", torch.zeros(code))
        self.register_buffer("code_std", torch.ones(code))
        self.encoder = code_network(node_rank, code)
        self.field = NeuralFieldNodes(code, n_nodes, n_vars, dims, modulation)

    @property
    def code_size(self) -> int:
        """Code numbers per time step."""
        return self.code_mean.numel()

    @torch.no_grad()
    def set_projection(self, node_mean, node_modes, scales) -> None:
        """The node POD of models.pod.pod_node_basis: mean [M], modes [M, R], scales [R]. One scale for every
        coefficient (the strongest mode's spread): whitening each would blow up the weak modes, where held-out
        snapshots differ from the training ones most."""
        self.node_mean.copy_(node_mean)
        self.node_modes.copy_(node_modes)
        self.coefficient_scale.fill_(float(scales.max()))

    @torch.no_grad()
    def set_code_statistics(self, raw_codes) -> None:
        """From the training snapshots' raw codes [S, code]: the mean and spread encode() standardises by."""
        self.code_mean.copy_(raw_codes.mean(0))
        self.code_std.copy_(raw_codes.std(0).clamp_min(1e-6))

    def coefficients(self, fields):
        """Fields [..., M] -> node-POD coefficients [..., R], divided by the one coefficient scale."""
        with torch.autocast(fields.device.type, enabled=False):
            return ((fields.float() - self.node_mean) @ self.node_modes) / self.coefficient_scale

    def raw_codes(self, coefficients):
        """Coefficients [..., R] -> the encoder's codes [..., code], before standardisation (training)."""
        with torch.autocast(coefficients.device.type, enabled=False):
            return self.encoder(coefficients.float())

    def encode(self, fields):
        """Fields [B, T, M] -> standardised codes [B, T, code]."""
        return (self.raw_codes(self.coefficients(fields)) - self.code_mean) / self.code_std

    def decode(self, codes, nodes=None):
        """Standardised codes [B, T, code] -> fields [B, T, M] (or the values at node indices, NeuralFieldNodes')."""
        return self.field(codes.float() * self.code_std + self.code_mean, nodes)
