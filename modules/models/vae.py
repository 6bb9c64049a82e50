"""Hierarchical VAE over transient fields [B, T, M].

Encoder: a low-rank node projection (M -> R, initialised from POD modes) turns each time step into R coefficients;
convolution levels over time (one per encoder filter, each halving T after the first) give features h_l; the top
level yields the main latent (Latent_dim_end, standard normal prior).

Decoder, top down: the main latent sets the coarsest state; at each level l (coarsest first) a prior p(z_l | state)
and a posterior q(z_l | state, h_l) = N(mu_p + dmu, sigma_p * exp(dlog)) (NVAE's residual parameterisation) give the
level latent z_l (Latent_dim wide), which is injected over the level's time axis; the state is then upsampled to the
next level. A last projection R -> M (the transpose POD basis at start) gives the field. The KL of each level is the
analytic KL between exactly the q and p that z_l is sampled from; it is also returned per latent dimension (before the
sum), which free bits (training.losses) and the collapse diagnostics (evaluation.latent_health) need.

With the POD path (spec.pod_modes, condition.txt pod_path 1, the default) the latent numbers, main first and then the
levels in generation order, are also the whitened coefficients of a frozen design POD (models.pod_path): the field is
that linear path plus the network above as a residual whose last layer starts at zero, and each posterior mean is
the design's POD coefficient plus a learned shift that starts at zero. The KL stays the exact KL of what is sampled.

The model also holds the likelihood's noise scale per variable (noise_std, scaled units): with alpha auto training
sets it each epoch (training.losses); it is stored with the weights so that a report can state it.

With a snapshot codec (spec.codec, condition.txt field_codec_epochs; models.snapshot_codec) everything above runs on
the code trajectories [B, T, codec] instead of the fields: the fields are encoded snapshot by snapshot on the way in
and decoded on the way out (forward, decode, decode_around, generate all still take and give fields). The codec is
trained first and then frozen; the VAE's loss is taken on the codes (forward with decode=False, encode_data), where a
step costs the same on any mesh, and the likelihood then has one noise scale, in standardised code units.

Level latents are stored and returned in generation order: index 0 is the coarsest level.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from modules.config.settings import level_lengths
from modules.models.grad_checkpointing import run_block
from modules.models.latents import split_latents
from modules.models.neural_field import SHIFT
from modules.models.pod_path import PODPath
from modules.models.snapshot_codec import SnapshotCodec

POOLED_STEPS = 4  # latent heads see the state average-pooled to this many time points, whatever T is
START_LOG_STD = -4.0  # POD path: posterior log-std before soft_clamp (-3.3 after): 3.6 % of a coefficient's spread


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one VAE; stored with the weights so a saved model can be rebuilt exactly."""

    n_steps: int
    n_nodes: int
    projection_rank: int
    filters: tuple
    main_latent_dim: int
    level_latent_dim: int
    blocks_per_level: int
    head_hidden: int
    pod_modes: int = 0  # latent numbers carried by the frozen POD path: 0 (none) or all of them
    n_vars: int = 1  # variables side by side along the node axis (one likelihood scale each)
    codec: int = 0  # code numbers per time step the VAE runs on (a snapshot codec); 0: it runs on the fields
    codec_modulation: str = SHIFT  # the codec's field's modulation (models.neural_field: SHIFT or WARP)

    @classmethod
    def from_config(cls, config) -> "ModelSpec":
        large = config.size == "large"
        return cls(n_steps=config.n_steps_used, n_nodes=config.n_nodes_used,
                   projection_rank=min(config.projection_rank, config.n_nodes_used),
                   filters=tuple(config.encoder_filters), main_latent_dim=config.main_latent_dim,
                   level_latent_dim=config.level_latent_dim, blocks_per_level=2 if large else 1,
                   head_hidden=256 if large else 128, pod_modes=config.latent_size if config.pod_path else 0,
                   n_vars=config.n_vars)

    @property
    def n_levels(self) -> int:
        return len(self.filters)

    @property
    def latent_size(self) -> int:
        return self.main_latent_dim + self.n_levels * self.level_latent_dim

    def data_spec(self) -> "ModelSpec":
        """The shape of what the encoder reads and the decoder writes: the fields, or with a codec the codes (one
        'variable' of codec numbers per time step, a node projection of at most that rank)."""
        if not self.codec:
            return self
        return replace(self, n_nodes=self.codec, projection_rank=min(self.projection_rank, self.codec), n_vars=1,
                       codec=0)

    @property
    def level_lengths(self) -> list:
        """Time length of each level's features, finest first: T, ceil(T/2), ceil(T/4), ..."""
        return level_lengths(self.n_steps, self.n_levels)

    def to_dict(self) -> dict:
        return {**asdict(self), "filters": list(self.filters)}

    @classmethod
    def from_dict(cls, values) -> "ModelSpec":
        return cls(**{**values, "filters": tuple(values["filters"])})


def gaussian_kl(mean_q, log_std_q, mean_p, log_std_p):
    """Elementwise KL( N(mean_q, exp(log_std_q)^2) || N(mean_p, exp(log_std_p)^2) )."""
    variance_ratio = torch.exp(2 * (log_std_q - log_std_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_std_p)) ** 2
    return 0.5 * (variance_ratio + mean_term - 1) - (log_std_q - log_std_p)


def soft_clamp(log_std, limit=5.0):
    """Keeps log-std in (-limit, limit) smoothly, so exp() never overflows early in training."""
    return limit * torch.tanh(log_std / limit)


class ResBlock(nn.Module):
    """Pre-norm residual block over time: GroupNorm, SiLU, Conv1d, twice."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(channels, 8)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv1d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv1d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class GaussianHead(nn.Module):
    """Features [B, C, L] -> (mean, log_std), each [B, latent_dim]."""

    def __init__(self, channels: int, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool1d(POOLED_STEPS), nn.Flatten(), nn.Linear(channels * POOLED_STEPS, hidden), nn.SiLU(),
            nn.Linear(hidden, 2 * latent_dim))

    def forward(self, features):
        mean, log_std = self.net(features).float().chunk(2, dim=-1)  # float32 even under autocast: the KL needs it
        return mean, soft_clamp(log_std)

    @torch.no_grad()
    def start_as_shift(self, log_std: float) -> None:
        """Output a zero mean and this log-std whatever the features, until training moves it (the POD path)."""
        last = self.net[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[last.out_features // 2:] = log_std


class Encoder(nn.Module):
    """[B, T, M] -> per-level features (finest first) and the main latent's (mean, log_std)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        filters = spec.filters
        self.node_projection = nn.Linear(spec.n_nodes, spec.projection_rank)
        self.stem = nn.Conv1d(spec.projection_rank, filters[0], 3, padding=1)
        self.downsample = nn.ModuleList(
            [nn.Identity()] + [nn.Conv1d(filters[i - 1], filters[i], 3, stride=2, padding=1)
                               for i in range(1, len(filters))])
        self.levels = nn.ModuleList(
            nn.Sequential(*[ResBlock(width) for _ in range(spec.blocks_per_level)]) for width in filters)
        self.main_head = GaussianHead(filters[-1], spec.main_latent_dim, spec.head_hidden)
        self.recompute = False  # gradient checkpointing of the levels (--grad_checkpointing)

    def forward(self, fields):
        state = self.stem(self.node_projection(fields).transpose(1, 2))
        features = []
        for downsample, level in zip(self.downsample, self.levels):
            state = run_block(level, downsample(state), recompute=self.recompute)
            features.append(state)
        main_mean, main_log_std = self.main_head(state)
        return features, main_mean, main_log_std


class DecoderLevel(nn.Module):
    """One top-down level: refine the state, give the prior and posterior of z_l, inject z_l over time."""

    def __init__(self, width: int, length: int, spec: ModelSpec):
        super().__init__()
        self.width, self.length = width, length
        self.refine = nn.Sequential(*[ResBlock(width) for _ in range(spec.blocks_per_level)])
        self.prior = GaussianHead(width, spec.level_latent_dim, spec.head_hidden)
        self.posterior_shift = GaussianHead(2 * width, spec.level_latent_dim, spec.head_hidden)
        self.inject = nn.Linear(spec.level_latent_dim, width * length)
        self.mix = ResBlock(width)

    def latent(self, state, features=None, given=None, sample=True, noise=None, anchor=None):
        """Return (z [B, d], kl [B, d] or None), kl elementwise per dimension. Posterior if encoder features are
        given, else the prior. noise: optional standard-normal draws [B, d] to use instead of fresh ones. A given
        latent is used as it is, or, with sample and noise, perturbed by the prior's spread at this level (samples
        around a prediction). anchor [B, d]: the design's POD coefficients (POD path), which the posterior mean
        shifts instead of the prior mean."""
        if given is not None:
            if sample and noise is not None:
                return given + torch.exp(self.prior(state)[1]) * noise, None
            return given, None
        prior_mean, prior_log_std = self.prior(state)
        if features is None:
            mean, log_std, kl = prior_mean, prior_log_std, None
        else:
            shift_mean, shift_log_std = self.posterior_shift(torch.cat([state, features], dim=1))
            mean = (prior_mean if anchor is None else anchor) + shift_mean
            log_std = prior_log_std + shift_log_std
            kl = gaussian_kl(mean, log_std, prior_mean, prior_log_std)
        if sample:
            return mean + torch.exp(log_std) * (torch.randn_like(mean) if noise is None else noise), kl
        return mean, kl

    def add_latent(self, state, z):
        return self.mix(state + self.inject(z).view(-1, self.width, self.length))


class Decoder(nn.Module):
    """Main latent [B, D] (+ level latents or encoder features) -> field [B, T, M]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        filters, lengths = spec.filters, spec.level_lengths
        self.top_shape = (filters[-1], lengths[-1])
        self.initial = nn.Linear(spec.main_latent_dim, filters[-1] * lengths[-1])
        self.levels = nn.ModuleList(DecoderLevel(w, n, spec) for w, n in zip(filters, lengths))
        self.upsample = nn.ModuleList(nn.Conv1d(filters[i], filters[i - 1], 3, padding=1)
                                      for i in range(1, len(filters)))
        self.lengths = lengths
        self.head = nn.Conv1d(filters[0], spec.projection_rank, 3, padding=1)
        self.node_projection = nn.Linear(spec.projection_rank, spec.n_nodes)
        self.recompute = False  # gradient checkpointing of the levels (--grad_checkpointing)

    def forward(self, main_latent, features=None, level_latents=None, sample=True, level_noise=None,
                level_anchors=None):
        """Returns (field [B, T, M], level latents [B, L, d], level KLs per dimension [B, L, d] or None).
        level_noise: optional standard-normal draws [B, L, d] for sampling, in generation order; level_anchors
        [B, L, d]: the posterior means' POD coefficients (POD path), in generation order."""
        state = self.initial(main_latent).view(-1, *self.top_shape)
        latents, kls = [], []
        for order, level_index in enumerate(reversed(range(len(self.levels)))):
            level = self.levels[level_index]
            state = run_block(level.refine, state, recompute=self.recompute)
            z, kl = level.latent(state, None if features is None else features[level_index],
                                 None if level_latents is None else level_latents[:, order], sample,
                                 None if level_noise is None else level_noise[:, order],
                                 None if level_anchors is None else level_anchors[:, order])
            state = run_block(level.add_latent, state, z, recompute=self.recompute)
            latents.append(z)
            kls.append(kl)
            if level_index > 0:
                state = F.interpolate(state, size=self.lengths[level_index - 1], mode="nearest")
                state = self.upsample[level_index - 1](state)
        field = self.node_projection(self.head(state).transpose(1, 2))
        level_kl = torch.stack(kls, dim=1) if kls[0] is not None else None
        return field, torch.stack(latents, dim=1), level_kl


class HierarchicalVAE(nn.Module):
    """The whole model; every level's latent is used by the decoder (no dead parameters)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        data = spec.data_spec()
        self.codec = None
        if spec.codec:  # trained before the VAE (training.codec_choice) and frozen: never in the VAE's optimiser
            self.codec = SnapshotCodec(spec.n_nodes, spec.n_vars, spec.projection_rank, code=spec.codec,
                                       modulation=spec.codec_modulation).requires_grad_(False)
        self.encoder = Encoder(data)
        self.decoder = Decoder(data)
        self.pod = PODPath(spec.n_steps, data.n_nodes, data.projection_rank, spec.pod_modes) if spec.pod_modes else None
        self.register_buffer("noise_std", torch.full((data.n_vars,), 0.1))

    @property
    def noise_size(self) -> int:
        """Standard-normal numbers one posterior sample of one design uses: main latent, then each level."""
        return self.spec.latent_size

    def encode_data(self, fields):
        """Fields [B, T, M] (scaled) -> what the VAE runs on: the fields themselves, or their codes [B, T, codec]."""
        return fields if self.codec is None else self.codec.encode(fields)

    def decode_data(self, data):
        """What the VAE's decoder gives -> fields [B, T, M] (scaled): itself, or the codec's decoding of it."""
        return data if self.codec is None else self.codec.decode(data)

    def forward(self, fields, sample=True, noise=None, decode=True):
        """fields [B, T, M] (scaled) -> dict with recon [B, T, M], kl_main [B], kl_levels [B, L], their float32
        per-dimension terms kl_main_dims [B, D] and kl_level_dims [B, L, d] (kl_main and kl_levels are their sums),
        main_mean [B, D] and level_latents [B, L, d] (the posterior means when sample is False).

        noise: optional standard-normal draws [B, noise_size] for the reparameterisation (fresh ones otherwise);
        giving them per design makes a run independent of how designs are batched or spread over processes.
        decode False: recon is what the decoder writes (with a codec the codes [B, T, codec], which training's loss
        compares with encode_data(fields)), not the field.
        """
        data = self.encode_data(fields)
        features, main_mean, main_log_std = self.encoder(data)
        level_anchors = None
        if self.pod is not None:
            anchors = self.pod.encode(data)
            main_mean = main_mean + anchors[:, :self.spec.main_latent_dim]
            level_anchors = split_latents(anchors, self.spec)[1]
        main_z, level_noise = main_mean, None
        if sample:  # the deterministic (posterior-mean) path draws no random numbers at all
            main_noise, level_noise = self._split_noise(noise, len(fields))
            main_z = main_mean + torch.exp(main_log_std) * main_noise
        residual, level_latents, kl_level_dims = self.decoder(main_z, features=features, sample=sample,
                                                              level_noise=level_noise, level_anchors=level_anchors)
        kl_main_dims = gaussian_kl(main_mean, main_log_std, torch.zeros_like(main_mean), torch.zeros_like(main_log_std))
        recon = self._with_pod_path(residual, main_z, level_latents)
        return {"recon": self.decode_data(recon) if decode else recon, "kl_main": kl_main_dims.sum(dim=-1),
                "kl_levels": kl_level_dims.sum(dim=-1), "kl_main_dims": kl_main_dims, "kl_level_dims": kl_level_dims,
                "main_mean": main_mean, "level_latents": level_latents}

    def _with_pod_path(self, residual, main_latent, level_latents):
        """The decoder's field plus, on the POD path, the frozen linear part of the same latents."""
        if self.pod is None:
            return residual
        return residual + self.pod.decode(torch.cat([main_latent, level_latents.flatten(1)], dim=1))

    def _split_noise(self, noise, count):
        if noise is None:
            return torch.randn(count, self.spec.main_latent_dim, device=self.decoder.initial.weight.device), None
        return split_latents(noise, self.spec)

    @torch.no_grad()
    def encode_means(self, fields):
        """Posterior means along the mean path: (main [B, D], levels [B, L, d]); decode() of them is the recon."""
        outputs = self(fields, sample=False, decode=False)
        return outputs["main_mean"], outputs["level_latents"]

    def decode(self, main_latent, level_latents, decode=True):
        """Latents [B, D] and [B, L, d] -> field [B, T, M] (scaled units). Differentiable. decode False: what the
        decoder writes (with a codec the codes, as forward's)."""
        if self.residual_is_zero():  # the network adds exactly 0 (given levels pass through it): skip its cost
            data = self.pod.decode(torch.cat([main_latent, level_latents.flatten(1)], dim=1))
        else:
            residual = self.decoder(main_latent, level_latents=level_latents)[0]
            data = self._with_pod_path(residual, main_latent, level_latents)
        return self.decode_data(data) if decode else data

    def residual_is_zero(self) -> bool:
        """True on the POD path while the network's output layers are all zero (its starting state, kept when no
        epoch of training reconstructed better): the field is then the POD path's alone, whatever the latents."""
        if self.pod is None or torch.compiler.is_compiling():  # traced (export, ONNX): one graph for any weights
            return False
        head, projection = self.decoder.head, self.decoder.node_projection
        return not bool(head.weight.any() | head.bias.any() | projection.bias.any())  # one wait on a GPU, not three

    def decode_around(self, main_latent, level_latents, level_noise):
        """Fields [B, T, M] around given latents: the main latent as given, each level's latent plus level_noise
        [B, L, d] times that level's prior spread (the spread the VAE allows in the finer detail): --samples."""
        residual, drawn_levels, _ = self.decoder(main_latent, level_latents=level_latents, sample=True,
                                                 level_noise=level_noise)
        return self.decode_data(self._with_pod_path(residual, main_latent, drawn_levels))

    @torch.no_grad()
    def generate(self, n: int):
        """n new fields [n, T, M] (scaled) sampled from the prior: main ~ N(0, I), each level from its prior.
        Draws from torch's global generator: seed it for repeatable samples."""
        device = self.decoder.initial.weight.device
        main_z = torch.randn(n, self.spec.main_latent_dim, device=device)
        residual, level_latents, _ = self.decoder(main_z, sample=True)
        return self.decode_data(self._with_pod_path(residual, main_z, level_latents))

    @torch.no_grad()
    def init_node_projections(self, mean, modes, scales):
        """Start the first and last layers as a whitened POD basis.

        mean [M], modes [M, R] (orthonormal columns), scales [R] (std of each coefficient): the encoder maps a field
        to unit-variance POD coefficients and the decoder maps coefficients back, so training starts from the
        best linear rank-R compression instead of from noise. On the POD path the decoder's projection has no bias:
        the mean is the POD path's.
        """
        encode, decode = self.encoder.node_projection, self.decoder.node_projection
        encode.weight.copy_(modes.T / scales[:, None])
        encode.bias.copy_(-(modes.T @ mean) / scales)
        decode.weight.copy_(modes * scales[None, :])
        decode.bias.copy_(mean if self.pod is None else torch.zeros_like(mean))

    @torch.no_grad()
    def start_pod_path(self, node_mean, node_modes, coefficient_mean, modes, scales, residual_mse: float):
        """Set the frozen POD path (models.pod.design_pod_basis) and start the network as a residual of zero, the
        posterior means at the POD coefficients with a small spread, each level's prior at N(0, 1) (the whitened
        coefficients' own distribution: the starting model is POD's generative model) and the likelihood's noise at
        the POD path's own error on the training designs."""
        self.pod.set_basis(node_mean, node_modes, coefficient_mean, modes, scales)
        self.decoder.head.weight.zero_()
        self.decoder.head.bias.zero_()
        self.encoder.main_head.start_as_shift(START_LOG_STD)
        for level in self.decoder.levels:
            level.posterior_shift.start_as_shift(START_LOG_STD)
            level.prior.start_as_shift(0.0)
        self.noise_std.fill_(max(residual_mse, 1e-10) ** 0.5)
