"""A conditioner that predicts, for each time step, where the field's feature is and how it is stretched and turned
(its frame), and what it looks like in that frame: design parameters -> the whole field on a grid, without the
VAE's latents (kept instead of the other candidates only when it predicts the validation designs better; condition.txt
feature_frame_gp; fitted by training.feature_frame_fit).

A feature that moves, turns and stretches needs a POD mode for every place and shape it takes, and a neural field's
codes carry its shape poorly to new designs (docs/accuracy.md, the shear). Here each training snapshot u(x) is first
brought to its feature's frame by its first two moments (an affine registration, as in the registration methods of
model reduction: Reiss et al.'s shifted POD moves, Taddei's registration maps): with w = the sum over the variables
of |u - median(u)|, the frame is w's centroid c and covariance C of the node positions (on a periodic grid a circular
mean, and offsets to the nearest image), and the snapshot in its frame is

    r(q) = u(c + C^1/2 (q - q0) / s),     q0 the grid's centre, s = REFERENCE_SPREAD of the grid's smaller side,

a feature of covariance about s^2 I at the grid's centre whatever the design and time step, so a few POD modes
reconstruct the frames' snapshots. A GP (models.gaussian_process) per number predicts from the parameters, for each
time step, the frame (the centroid: on a periodic grid the first step's as its cosine and sine per axis, then each
step's move from there, frame_targets; the three entries of G = log(C / s^2), so any prediction is a covariance) and
the POD coefficients. A new design's field is drawn back:

    u(x) = r(q0 + exp(-G / 2) (x - c))     (bicubic; the frames' median value beyond the frame's grid)

in closed form (traced and exported as plain operations). Works on a regular grid (grid_shape), periodic or not
(grid_periodic), for fields with one feature per time step on a background; where that does not hold it loses the
contest. It has no spread of its own: as a neural field, it carries the GP or spline on the latents fitted beside it
(models.carried_spread).
"""
import dataclasses
import math

import numpy as np
import torch
from torch import nn

from modules.models.carried_spread import CarriesSpread
from modules.models.gaussian_process import GPRConditioner

REFERENCE_SPREAD = 1 / 12   # the feature's standard deviation in its frame, of the grid's smaller side: +-3 of them
                            # span half the grid, so a frame's grid holds the feature and some of its surroundings
# reading the frame's field back: a blob 1.5 cells wide read into its frame and back is 0.55 % off with bicubic, 1.0 %
# with bilinear (tests/models/test_feature_frame.py's snapshot)
INTERPOLATION = "bicubic"
MAX_MODES = 16              # POD modes of the frames' snapshots, at most: each adds a GP per time step
ANCHOR = 4                  # on a periodic grid: the cosine and sine of the first step's centroid per axis
PER_STEP = 5                # each step's frame: the centroid's move (or place) per axis, the entries of G


def frame_targets(centres: np.ndarray, log_covariances: np.ndarray, coefficients: np.ndarray, sizes, periodic: bool):
    """What the GPs of a FeatureFrameConditioner predict, [n, anchor + T * (PER_STEP + modes)], from each design's
    centroids [n, T, 2] (x, y in cells), G's entries [n, T, 3] (g00, g01, g11) and POD coefficients [n, T, modes].
    On a periodic grid a centroid's place is an angle, and the angle of a feature that moves far is a fast-turning
    function of the parameters that a GP follows poorly: the first step's place is given by its cosine and sine (the
    anchor), each later one by its move from there, unwrapped through the steps (a feature moves less than half the
    grid between two steps), which is as smooth as the motion. Otherwise the centroids themselves, in grid sizes."""
    sizes = np.asarray(sizes, np.float64)
    if periodic:
        steps = np.diff(centres, axis=1)
        steps = (steps + sizes / 2) % sizes - sizes / 2                       # each move to its nearest image
        moves = np.concatenate([np.zeros_like(centres[:, :1]), np.cumsum(steps, axis=1)], axis=1) / sizes
        angles = 2 * np.pi * centres[:, 0] / sizes
        anchor = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)      # [n, 4]
    else:
        moves, anchor = centres / sizes, np.zeros((len(centres), 0))
    per_step = np.concatenate([moves, log_covariances, coefficients], axis=2)
    return np.concatenate([anchor, per_step.reshape(len(centres), -1)], axis=1)


class FeatureFrameConditioner(CarriesSpread):
    """Standardised parameters [B, P] -> scaled fields [B, T, M]: one GP per number (frame_targets: the frames of
    every time step, the POD coefficients of the field in each) and the frame's field drawn back on the grid.
    spec.frame = (H, W, modes, periodic); spec.field_shape = (T, M, n_vars). The modes, their mean and the background
    are buffers: a saved model predicts without the fitting code."""

    def __init__(self, spec):
        super().__init__(spec)
        n_steps, n_nodes, n_vars = spec.field_shape
        height, width, modes, periodic = spec.frame
        self.n_steps, self.n_vars, self.height, self.width = n_steps, n_vars, height, width
        self.modes, self.periodic = modes, bool(periodic)
        self.anchor = ANCHOR if self.periodic else 0
        self.numbers = GPRConditioner(_numbers_spec(spec, self.anchor + n_steps * (PER_STEP + modes)))
        self.register_buffer("mode_mean", torch.zeros(n_vars * height * width))
        self.register_buffer("mode_vectors", torch.zeros(modes, n_vars * height * width))
        self.register_buffer("background", torch.zeros(n_vars))
        rows, columns = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                       torch.arange(width, dtype=torch.float32), indexing="ij")
        self.register_buffer("node_xy", torch.stack([columns.flatten(), rows.flatten()], 1), persistent=False)
        self.register_buffer("sizes", torch.tensor([width, height], dtype=torch.float32), persistent=False)

    def forward(self, params):
        numbers = self.numbers(params)
        per_step = numbers[:, self.anchor:].unflatten(1, (self.n_steps, PER_STEP + self.modes))   # [B, T, 5 + K]
        centres = per_step[..., 0:2] * self.sizes
        if self.periodic:  # the anchor's angle, as a place in [0, size), then each step's move from it
            start = torch.atan2(numbers[:, 2:4], numbers[:, 0:2]) / (2 * math.pi) % 1 * self.sizes
            centres = centres + start[:, None]
        return self.drawn_back(centres, per_step[..., 2:PER_STEP], per_step[..., PER_STEP:])

    def drawn_back(self, centres, log_covariances, coefficients):
        """The frames of each design's time steps, centroids [B, T, 2] (x, y in cells) and G's entries [B, T, 3], and
        the POD coefficients [B, T, modes] of the field in them -> the scaled fields [B, T, M]: the frame's field
        (mode_mean + coefficients @ mode_vectors) read at q0 + exp(-G / 2) (x - c) for every node x."""
        batch = centres.shape[0]
        centre, factor = centres.flatten(0, 1).float(), log_covariances.flatten(0, 1).float()    # [r, 2], [r, 3]
        offsets = self.node_xy[None] - centre[:, None]                                          # [r, H * W, 2]
        if self.periodic:  # to the nearest image of the centroid
            offsets = torch.remainder(offsets + self.sizes / 2, self.sizes) - self.sizes / 2
        # q - q0 = s C^-1/2 d = exp(-G / 2) d, in grid cells, G = log(C / s^2) = [[g00, g01], [g01, g11]] (the
        # frame's numbers): for a symmetric 2 x 2 G, exp(G) = e^m (cosh(r) I + sinh(r) / r (G - m I)), m its mean
        # eigenvalue, r = sqrt(((g00 - g11) / 2)^2 + g01^2) (closed form: traced and exported as plain operations)
        half_log = -factor / 2
        middle = (half_log[:, 0:1] + half_log[:, 2:3]) / 2
        radius = torch.sqrt(((half_log[:, 0:1] - half_log[:, 2:3]) / 2) ** 2 + half_log[:, 1:2] ** 2)
        ratio = torch.where(radius > 1e-6, torch.sinh(radius) / radius.clamp_min(1e-6), torch.ones_like(radius))
        diagonal, off = torch.exp(middle) * torch.cosh(radius), torch.exp(middle) * ratio
        e00 = diagonal + off * (half_log[:, 0:1] - middle)                                   # exp(-G / 2), [r, 1] each
        e01 = off * half_log[:, 1:2]
        e11 = diagonal + off * (half_log[:, 2:3] - middle)
        across = e00 * offsets[..., 0] + e01 * offsets[..., 1]
        along = e01 * offsets[..., 0] + e11 * offsets[..., 1]
        half = (self.sizes - 1) / 2  # grid cells from the centre to an edge: grid_sample's [-1, 1] is [-half, half]
        where = torch.stack([across / half[0], along / half[1]], -1).unflatten(1, (self.height, self.width))
        in_frame = self.mode_mean + coefficients.flatten(0, 1).float() @ self.mode_vectors
        in_frame = in_frame.unflatten(1, (self.n_vars, self.height, self.width))
        background = self.background[None, :, None, None]
        values = nn.functional.grid_sample(in_frame - background, where, mode=INTERPOLATION, padding_mode="zeros",
                                           align_corners=True) + background                 # [r, V, H, W]
        return values.flatten(1).unflatten(0, (batch, -1))                                     # [B, T, V * H * W]


def _numbers_spec(spec, count: int):
    """The spec of the GP per number inside a FeatureFrameConditioner: count outputs from spec's parameters."""
    return dataclasses.replace(spec, kind="gpr", output_dim=count, frame=(), field_shape=(), spread_kind="",
                               members=1)
