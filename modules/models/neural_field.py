"""A neural field over node coordinates, and the conditioner built on it: design parameters (or an image, through an
encoder trained with it: models.image_embedding) -> the whole field, without the VAE's latents (kept instead of the
other candidates only when it predicts the validation designs better; condition.txt field_conditioner_epochs).

The VAE's decoder writes each time step as a sum of fixed spatial vectors: a feature that moves across the mesh
needs a mode for every position it visits, which is why POD, the VAE and POD + GPR miss most of a travelling pulse.
Here the value at a node x at time step t of a design with standardised parameters p is

    u(x; c) = out(h_3),   h_k = sin(30 (W_k h_(k-1) + b_k) + S_k c),   h_0 = x in [-1, 1]^2,   c = MLP(p, t)

a SIREN (Sitzmann et al. 2020) whose sine layers are phase-shifted by a code c of CODE numbers (CORAL's shift
modulation, Serrano et al. 2023): a shifted phase is a translation, so features move without a mode per position.
The snapshot codec's field (models.snapshot_codec) is modulated further, so that a feature can also change shape
(modulation WARP): the code maps the coordinates linearly before the first layer and scales each layer's amplitude,

    h_0 = (I + D(c)) x,   h_k = (1 + A_k c) * sin(30 (W_k h_(k-1) + b_k) + S_k c)

where D(c) (a d x d matrix linear in c) stretches and turns the whole field and A_k (DINo's amplitude modulation,
Yin et al. 2023) reweights the sine features; both start at zero, so a fit starts as the shift-only network.
The field of a neural-field conditioner that reads parameters (modulation FRAME; one that reads images keeps SHIFT:
docs/model.md says why) moves and deforms its frame instead of shifting its first layer's phases: the code maps the
coordinates affinely, and shifts the phases of the deeper layers only,

    h_1 = sin(30 (W_1 ((I + D(c)) x + e(c)) + b_1)),   h_k = sin(30 (W_k h_(k-1) + b_k) + S_k c)   (k > 1)

A first layer shifted by S_1 c may draw a design's feature anywhere it pleases, and a code between two designs'
then draws neither's feature where it should be; a translation e(c) between two translations is the one between
them. On the benchmark's travelling pulse, Burgers front and stretching blob it predicts new designs 14 %, 40 % and
7 % better than the shift-only conditioner (docs/model.md). D and e start at zero.
The MLP and the field are trained together on the training designs' fields (Neural Implicit Flow's layout, Pan et
al. 2023), so the code is by construction a smooth function of the parameters.

Training evaluates the field at a random subset of the nodes per step: a step then costs the same on any mesh.
Without gradients (validation, evaluation, --predict) every node is decoded, a bounded number of (design, time step)
rows at a time, so the activations stay under DECODE_BYTES whatever T and M are. The field runs in float32 also
under mixed precision: a phase of 30 (W x + b) in bfloat16 (3 significant digits) would be off by about 0.1 rad.
"""
import math

import numpy as np
import torch
from torch import nn

from modules.models.carried_spread import CarriesSpread
from modules.models.image_embedding import EMBEDDING, ImageEncoder

WIDTH = 128              # sine layer width
LAYERS = 3
FREQUENCY = 30.0         # SIREN's frequency
CODE = 8                 # code numbers per time step
HIDDEN = 256             # the code MLP: 3 hidden layers this wide
# modulations: the phases only; the phases, the amplitudes and a linear map of the coordinates; an affine map of the
# coordinates and the deeper layers' phases
SHIFT, WARP, FRAME = "shift", "warp", "frame"
DECODE_BYTES = 2 ** 24   # activations of one chunk decoded without gradients, at most (larger chunks leave the caches)


def normalised_coordinates(points) -> torch.Tensor:
    """Node positions [M, d] -> float32 [M, d], each axis mapped onto [-1, 1] (an axis with one value onto 0): the
    range SIREN's initialisation assumes."""
    points = torch.tensor(np.array(points, dtype=np.float64))  # a copy: layouts hand read-only arrays
    low, high = points.min(0).values, points.max(0).values
    extent = torch.where(high > low, high - low, torch.ones_like(high))
    return (2 * (points - low) / extent - 1).where(high > low, torch.zeros_like(points)).float()


class NeuralFieldNodes(nn.Module):
    """Codes [B, T, R] -> values [B, T, V * P] at P nodes of each of the V variables (all M / V nodes, or the given
    node indices within one variable: [P] for every row, or [B, T, P] for each (design, time step) its own),
    variables side by side as in the data. The node coordinates are a buffer set from the case's layout
    (set_coordinates), so a saved model decodes without the mesh. modulation: SHIFT, WARP or FRAME (the module's
    docstring)."""

    def __init__(self, rank: int, n_nodes: int, n_vars: int, dims: int = 2, modulation: str = SHIFT):
        super().__init__()
        if modulation not in (SHIFT, WARP, FRAME):
            raise ValueError(f"unknown modulation {modulation!r}")
        self.n_vars, self.modulation = n_vars, modulation
        self.register_buffer("coordinates", torch.zeros(n_nodes // n_vars, dims))
        # each variable's values = out(h) * value_scale + value_offset: the training values' mean and spread
        # (set_value_statistics), so the sine network fits standardised values: it fits scaled values, whose spread
        # is a small part of [-0.7, 0.7], much worse
        self.register_buffer("value_offset", torch.zeros(n_vars))
        self.register_buffer("value_scale", torch.ones(n_vars))
        self.layers = nn.ModuleList(nn.Linear(dims if i == 0 else WIDTH, WIDTH) for i in range(LAYERS))
        self.shifted = LAYERS - 1 if modulation == FRAME else LAYERS  # the last layers whose phases the code shifts
        self.shifts = nn.Linear(rank, WIDTH * self.shifted)
        self.out = nn.Linear(WIDTH, n_vars)
        self.amplitudes = self.warp = self.translation = None
        if modulation == WARP:  # both zero at the start: the shift-only network
            self.amplitudes = nn.Linear(rank, WIDTH * LAYERS)
        if modulation in (WARP, FRAME):  # zero at the start: the coordinates as they are
            self.warp = nn.Linear(rank, dims * dims)
        if modulation == FRAME:
            self.translation = nn.Linear(rank, dims)
        for part in (self.amplitudes, self.warp, self.translation):
            if part is not None:
                nn.init.zeros_(part.weight)
                nn.init.zeros_(part.bias)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                bound = 1 / dims if i == 0 else math.sqrt(6 / WIDTH) / FREQUENCY
                layer.weight.uniform_(-bound, bound)

    @torch.no_grad()
    def set_coordinates(self, points) -> None:
        """Where each variable's nodes are, [M / V, d] in any units (normalised_coordinates)."""
        self.coordinates.copy_(normalised_coordinates(points))

    @torch.no_grad()
    def set_value_statistics(self, values) -> None:
        """From training values [S, V * P] (variable-major, as the output): each variable's mean and spread."""
        per_variable = values.float().unflatten(1, (self.n_vars, -1)).transpose(0, 1).flatten(1)      # [V, S * P]
        self.value_offset.copy_(per_variable.mean(1))
        self.value_scale.copy_(per_variable.std(1).clamp_min(1e-8))

    def forward(self, codes, nodes=None):
        with torch.autocast(codes.device.type, enabled=False):  # float32 also under AMP: see the module's docstring
            return self._forward(codes.float(), nodes)

    def _forward(self, codes, nodes):
        coordinates = self.coordinates if nodes is None else self.coordinates[nodes]
        rows = codes.flatten(0, 1)                                                      # [B * T, R]
        if coordinates.dim() == 4:  # nodes of each row: [B, T, P, d] -> [B * T, P, d]
            coordinates = coordinates.flatten(0, 1)
        # traced (torch.export, ONNX, torch.compile): one piece, so that the batch axis stays free
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or coordinates.dim() == 3:
            values = self._decode(rows, coordinates)
        else:  # a bounded number of rows at a time: [rows, P, WIDTH] activations, not [B * T, M, WIDTH]
            per_chunk = max(1, DECODE_BYTES // (4 * 2 * WIDTH * len(coordinates)))
            # written into one block made first: small results kept between the chunks' large temporaries would
            # fragment the host's heap, which then grows by about a chunk's activations per chunk
            values = rows.new_empty(len(rows), self.n_vars * len(coordinates))
            for start in range(0, len(rows), per_chunk):
                values[start:start + per_chunk] = self._decode(rows[start:start + per_chunk], coordinates)
        return values.unflatten(0, (-1, codes.shape[1]))                                 # [B, T, V * P]

    def _decode(self, rows, coordinates):
        """rows [r, R], coordinates [P, d] (shared) or [r, P, d] -> [r, V * P], variable-major."""
        shifts = self.shifts(rows).unflatten(1, (self.shifted, WIDTH))[:, None]    # [r, 1, shifted layers, WIDTH]
        amplitudes = None
        if self.amplitudes is not None:
            amplitudes = 1 + self.amplitudes(rows).unflatten(1, (LAYERS, WIDTH))[:, None]
        if self.warp is not None:
            warp = self.warp(rows).unflatten(1, (coordinates.shape[-1], -1))                # [r, d, d]
            # (I + D) x per row: [r, P, d] (each row's nodes, or the shared ones)
            coordinates = coordinates + (coordinates @ warp.transpose(1, 2) if coordinates.dim() == 3 else
                                         torch.einsum("pd,red->rpe", coordinates, warp))
        if self.translation is not None:
            coordinates = coordinates + self.translation(rows)[:, None]                          # [r, P, d]
        hidden = self.layers[0](coordinates)                                     # [P, WIDTH] (once) or [r, P, WIDTH]
        for index in range(LAYERS):
            if index:
                hidden = self.layers[index](hidden)
            shifted = index - (LAYERS - self.shifted)  # this layer's place among the shifted ones; < 0: none
            hidden = torch.sin(FREQUENCY * hidden + (shifts[:, :, shifted] if shifted >= 0 else 0))  # [r, P, WIDTH]
            if amplitudes is not None:
                hidden = hidden * amplitudes[:, :, index]
        values = self.out(hidden) * self.value_scale + self.value_offset               # [r, P, V]
        return values.transpose(1, 2).flatten(1)                                        # [r, V * P]


class NeuralFieldConditioner(CarriesSpread):
    """Standardised parameters [B, P] or images [B, C, S, S] -> scaled fields [B, T, M] (or [B, T, V * P] at node
    indices [P] within each variable): the code MLP (parameters or the image's embedding, t) -> c_t, then
    NeuralFieldNodes. With spec.encoder ("cnn", "vit") the designs are images, read by an ImageEncoder trained with
    the field (models.image_embedding). spec.field_shape is (T, M, n_vars); the time steps enter as evenly spaced
    values in [-1, 1]. decodes_fields (CarriesSpread's) tells models.surrogate that its output is the field itself,
    not latents for the VAE's decoder.

    It has no spread of its own. With spec.spread_kind it carries the fitted candidate on the latents of that kind
    (a GP or a thin-plate spline, on the parameters or on this field's image embedding: models.carried_spread)."""

    def __init__(self, spec):
        super().__init__(spec)
        n_steps, n_nodes, n_vars = spec.field_shape
        self.encoder = ImageEncoder(spec) if spec.encoder else None
        self.codes = code_network((EMBEDDING if spec.encoder else spec.input_shape[0]) + 1)
        self.field = NeuralFieldNodes(CODE, n_nodes, n_vars, modulation=spec.field_modulation)
        self.register_buffer("times", torch.linspace(-1, 1, n_steps))

    def features(self, images):
        """The image encoder's features (uncertainty.design_range compares images there)."""
        return self.encoder.features(images)

    def forward(self, inputs, nodes=None, steps=None):
        """steps: time-step indices [B, S] to predict instead of all T (training); nodes as NeuralFieldNodes'."""
        return self.from_numbers(inputs if self.encoder is None else self.encoder(inputs), nodes, steps)

    def from_numbers(self, params, nodes=None, steps=None):
        """forward from what the code network reads of each design: its parameters [B, P], or its image's embedding
        [B, EMBEDDING] (training encodes each distinct image of a step once)."""
        times = self.times if steps is None else self.times[steps]                          # [T] or [B, S]
        times = times + torch.zeros_like(params[:, :1])                                      # [B, T or S]
        rows = torch.cat([params[:, None, :].expand(-1, times.shape[1], -1), times[..., None]], dim=2)
        return self.field(self.codes(rows.float()), nodes)


def code_network(inputs: int, outputs: int = CODE) -> nn.Sequential:
    """The MLP that gives the codes: 3 hidden layers HIDDEN wide, SiLU."""
    layers, width = [], inputs
    for _ in range(3):
        layers += [nn.Linear(width, HIDDEN), nn.SiLU()]
        width = HIDDEN
    return nn.Sequential(*layers, nn.Linear(width, outputs))


def node_columns(nodes, n_nodes: int, n_vars: int):
    """Node indices [..., P] within one variable -> their columns [..., V * P] of the [.., M] node axis (variables
    side by side), in the order NeuralFieldNodes gives its values: variable-major."""
    per_variable = n_nodes // n_vars
    offsets = torch.arange(n_vars, device=nodes.device)[:, None] * per_variable                 # [V, 1]
    return (offsets + nodes[..., None, :]).flatten(-2)
