"""Gaussian-process regression from design parameters: the fit behind the POD + GPR baseline, and a conditioner that
maps parameters to the VAE's latents with one GP per latent dimension.

With a few hundred designs (the users' normal case) a GP is often the better regressor than a network
(docs/accuracy.md). The conditioner keeps what each fitted GP's posterior mean and variance need as plain tensors, so
it is saved, loaded, moved to a GPU and decoded through like any other conditioner, and --predict needs no
fitting code. The posterior variance is the GP's own uncertainty: small next to the training designs, the
prior's far from them.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

JITTER_LIMIT = 1e-4  # the largest jitter, relative to a GP's variance, added to factorise its training covariance
FIT_JITTER = 1e-10  # added to the training covariance's diagonal when fitting (scikit-learn's default alpha)
# bounds of the hyperparameters: the signal variance, each parameter's length scale, the white-noise level (the
# targets normalised to unit variance, the parameters standardised)
AMPLITUDE_BOUNDS, LENGTH_BOUNDS, NOISE_BOUNDS = (1e-3, 1e3), (1e-2, 1e3), (1e-8, 1e-1)


@dataclass(frozen=True)
class GPFit:
    """One fitted GP from standardised parameters to one target: signal amplitude * exp(-|(x - x') / length_scales|^2
    / 2) plus noise_level on the training designs, in units of the targets normalised by target_mean and target_std;
    weights = (K + (noise + FIT_JITTER) I)^-1 y over the training designs train_inputs [n, P]."""
    amplitude: float
    length_scales: np.ndarray
    noise_level: float
    weights: np.ndarray
    target_mean: float
    target_std: float
    train_inputs: np.ndarray

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """The posterior mean [B] at designs [B, P], in the targets' units."""
        steps = (np.asarray(inputs, dtype=np.float64)[:, None, :] - self.train_inputs[None]) / self.length_scales
        kernel = self.amplitude * np.exp(-0.5 * (steps ** 2).sum(-1))
        return kernel @ self.weights * self.target_std + self.target_mean


def fit_gpr(inputs: np.ndarray, targets: np.ndarray, seed: int) -> GPFit:
    """A GP from inputs [n, P] to one target [n]: a constant times an anisotropic RBF kernel (one length scale per
    parameter) plus white noise, targets normalised, hyperparameters by maximum likelihood from two starts (all ones
    with noise 1e-4, then one drawn log-uniformly within the bounds by a RandomState(seed)), L-BFGS-B on the log
    hyperparameters. This is scikit-learn's GaussianProcessRegressor(ConstantKernel(1) * RBF(ones) + WhiteKernel(1e-4),
    normalize_y=True, n_restarts_optimizer=1) fit, same starts, bounds and optimiser (a test holds the two together),
    written out because its general kernel machinery spends most of each likelihood evaluation on bookkeeping, and a
    GP per latent number made most of a small run's time (docs/accuracy.md). scipy is imported here, not above:
    --predict loads a GP conditioner without it (a third of a second of start-up)."""
    import scipy.optimize
    from scipy.linalg import cho_solve, cholesky

    x = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    n, n_params = x.shape
    target_mean, target_std = float(y.mean()), float(y.std())
    if target_std < 10 * np.finfo(np.float64).eps:  # constant targets: normalise by 1, as scikit-learn does
        target_std = 1.0
    y = (y - target_mean) / target_std
    steps = ((x[:, None, :] - x[None, :, :]) ** 2).reshape(n * n, n_params)  # squared differences per parameter
    identity = np.eye(n)

    def signal_kernel(theta):
        return np.exp(theta[0]) * np.exp(-0.5 * (steps @ np.exp(-2 * theta[1:-1]))).reshape(n, n)

    def factor(theta, signal):
        return cholesky(signal + (np.exp(theta[-1]) + FIT_JITTER) * identity, lower=True, check_finite=False)

    def negative_log_likelihood(theta):
        """-log p(y | theta) and its gradient in theta = log(amplitude, length scales, noise) (Rasmussen and
        Williams, eq. 5.9); +inf where the covariance does not factorise, which the line search steps back from."""
        signal = signal_kernel(theta)
        try:
            lower = factor(theta, signal)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros_like(theta)
        alpha = cho_solve((lower, True), y, check_finite=False)
        log_likelihood = -0.5 * y @ alpha - np.log(np.diag(lower)).sum() - n / 2 * np.log(2 * np.pi)
        inner = np.outer(alpha, alpha) - cho_solve((lower, True), identity, check_finite=False)
        weighted = inner * signal  # d K / d log(amplitude) is the signal kernel itself
        gradient = np.concatenate([[weighted.sum()], (weighted.reshape(-1) @ steps) * np.exp(-2 * theta[1:-1]),
                                   [np.trace(inner) * np.exp(theta[-1])]])
        return -log_likelihood, -0.5 * gradient

    bounds = np.log(np.array([AMPLITUDE_BOUNDS] + [LENGTH_BOUNDS] * n_params + [NOISE_BOUNDS]))
    starts = [np.log(np.concatenate([[1.0], np.ones(n_params), [1e-4]])),
              np.random.RandomState(seed).uniform(bounds[:, 0], bounds[:, 1])]
    optima = [scipy.optimize.minimize(negative_log_likelihood, start, method="L-BFGS-B", jac=True, bounds=bounds)
              for start in starts]
    theta = np.clip(min(optima, key=lambda optimum: optimum.fun).x, bounds[:, 0], bounds[:, 1])
    lower = factor(theta, signal_kernel(theta))  # raises np.linalg.LinAlgError where even the optimum does not
    return GPFit(float(np.exp(theta[0])), np.exp(theta[1:-1]), float(np.exp(theta[-1])),
                 cho_solve((lower, True), y, check_finite=False), target_mean, target_std, x.copy())


class GPRConditioner(nn.Module):
    """Standardised parameters [B, P] -> standardised latents [B, D], the posterior mean of one GP per latent
    dimension: mean_d(x) = std_d * sum_i a_d * exp(-|(x - x_i) / l_d|^2 / 2) w_id + offset_d, over the n training
    designs x_i; latent_spread also gives each one's posterior standard deviation. Computed in float64 (the weights w
    solve an ill-conditioned system), returned in float32."""

    def __init__(self, spec):
        super().__init__()
        n, n_params, dims = spec.gp_points, spec.input_shape[0], spec.output_dim
        self.register_buffer("train_inputs", torch.zeros(n, n_params, dtype=torch.float64))
        self.register_buffer("length_scales", torch.ones(dims, n_params, dtype=torch.float64))
        self.register_buffer("amplitudes", torch.ones(dims, dtype=torch.float64))
        self.register_buffer("weights", torch.zeros(n, dims, dtype=torch.float64))
        self.register_buffer("target_mean", torch.zeros(dims, dtype=torch.float64))
        self.register_buffer("target_std", torch.ones(dims, dtype=torch.float64))
        # each GP's white-noise level (normalised units) [D]: with the kernel it rebuilds the training covariance the
        # variance needs, so the file keeps D numbers, not D Cholesky factors of n x n. NaN until fit(): not known,
        # and then the GP has no spread of its own.
        self.register_buffer("noise_levels", torch.full((dims,), float("nan"), dtype=torch.float64))
        self._cholesky = None  # [D, n, n], built on the first latent_spread (on the buffers' device)

    def forward(self, params):
        return (self._mean(self._kernel(params)) * self.target_std + self.target_mean).float()

    def latent_spread(self, params):
        """(posterior means [B, D], posterior standard deviations of the latent itself, without the noise term
        [B, D]): var = a - |L^-1 k|^2, k the kernel between the design and the training designs, L the Cholesky
        factor of the training covariance. (latents, None) while the noise levels are not known."""
        kernel = self._kernel(params)
        mean = (self._mean(kernel) * self.target_std + self.target_mean).float()
        if not bool(torch.isfinite(self.noise_levels).all()):
            return mean, None
        solved = torch.linalg.solve_triangular(self._training_cholesky(), kernel.transpose(1, 2), upper=False)
        return mean, (self.posterior_variance(solved).T.sqrt() * self.target_std).float()

    def observed_cholesky(self, observed):
        """Lower Cholesky factors [D, N, N] of each GP's covariance of the observed designs [N, P]: signal kernel +
        noise level + FIT_JITTER on the diagonal, as fit_gpr factorised the training designs'."""
        covariance = self.covariance(observed, observed)                                             # [D, N, N]
        diagonal = (self.noise_levels + FIT_JITTER)[:, None] * torch.ones_like(covariance[:, 0])
        matrix = covariance + torch.diag_embed(diagonal)
        factor, info = torch.linalg.cholesky_ex(matrix)
        jitter, identity = 1e-10, torch.eye(len(observed), dtype=matrix.dtype, device=matrix.device)
        scale = matrix.diagonal(dim1=1, dim2=2).mean(1)[:, None, None]  # each GP's variance
        # A GP fitted with almost no noise to very smooth latents has a covariance that is positive definite only up
        # to rounding (the kernel here is rebuilt in another order of operations than the fit's): add the smallest
        # jitter, relative to its variance, that factorises it, as GPyTorch's psd_safe_cholesky does
        while bool((info > 0).any()) and jitter < JITTER_LIMIT:
            jitter *= 10
            failed = info > 0
            factor[failed], info[failed] = torch.linalg.cholesky_ex(matrix[failed] + jitter * scale[failed] * identity)
        if bool((info > 0).any()):
            raise torch.linalg.LinAlgError(f"a GP's covariance is not positive definite even with a jitter of "
                                           f"{JITTER_LIMIT:g}")
        return factor

    def posterior_variance(self, solved):
        """[D, B]: each GP's posterior variance of the latent itself (no noise term) at B designs, given solved =
        L^-1 k [D, N, B] (L: observed_cholesky of the observed designs, k: their covariance with the B designs)."""
        return (self.amplitudes[:, None] - solved.pow(2).sum(1)).clamp(min=0)

    def _training_cholesky(self):
        """observed_cholesky of the training designs, kept (built on the buffers' device)."""
        if self._cholesky is None or self._cholesky.device != self.train_inputs.device:
            self._cholesky = self.observed_cholesky(self.train_inputs)
        return self._cholesky

    def _kernel(self, params):
        """The signal kernel between designs [B, P] and the training designs: [D, B, n], float64."""
        return self.covariance(params, self.train_inputs)

    def covariance(self, first, second):
        """The prior (signal) covariance of each GP between two sets of standardised designs [A, P] and [B, P]:
        [D, A, B], float64, in the GPs' normalised units."""
        centre = self.train_inputs.double().mean(0)  # |a|^2 + |b|^2 - 2 a.b loses what |a|^2 holds beyond |a - b|^2
        first = (first.double() - centre)[None] / self.length_scales[:, None, :]             # [D, A, P]
        second = (second.double() - centre)[None] / self.length_scales[:, None, :]           # [D, B, P]
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one batched matmul instead of a [D, A, B, P] difference (2x faster for
        # many designs); centred and in float64, its rounding stays near the difference's own
        squared = torch.baddbmm(first.square().sum(-1)[:, :, None] + second.square().sum(-1)[:, None, :], first,
                                second.transpose(1, 2), alpha=-2).clamp_(min=0)
        return squared.mul_(-0.5).exp_().mul_(self.amplitudes[:, None, None])  # in place: [D, A, B] made once

    def _mean(self, kernel):
        """[B, D]: each GP's posterior mean (normalised units) from the kernel [D, B, n]."""
        return torch.bmm(kernel, self.weights.T[:, :, None])[:, :, 0].T

    @torch.no_grad()
    def fit(self, inputs: np.ndarray, targets: np.ndarray, seed: int) -> "GPRConditioner":
        """Fit a GP per column of targets [n, D] on inputs [n, P] (fit_gpr) and keep what their posterior means and
        variances are computed from."""
        for dim in range(targets.shape[1]):
            fitted = fit_gpr(inputs, targets[:, dim], seed)
            self.amplitudes[dim] = fitted.amplitude
            self.length_scales[dim] = torch.as_tensor(fitted.length_scales)
            self.weights[:, dim] = torch.as_tensor(fitted.weights)
            self.target_mean[dim] = fitted.target_mean
            self.target_std[dim] = fitted.target_std
            self.noise_levels[dim] = fitted.noise_level
        self.train_inputs.copy_(torch.as_tensor(inputs))
        self._cholesky = None
        return self
