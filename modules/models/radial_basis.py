"""A thin-plate-spline interpolant from design parameters to the VAE's latents: with the VAE at its POD start (the
latents are then whitened POD coefficients), the POD + RBF surrogate.

    latent_d(x) = sum_i w_id phi(|x - x_i|) + c_0d + sum_p c_pd x_p,      phi(r) = r^2 log r

over the n training designs x_i (standardised parameters), through every training design exactly: the weights solve
[[Phi, Q], [Q^T, 0]] [w; c] = [latents; 0] with Q = [1, x] (Duchon's thin-plate spline with its linear polynomial,
scipy's RBFInterpolator default). No hyperparameter is fitted: on some smooth families it reaches errors a GP's
maximum-likelihood fit does not, on others the GP's length scale per parameter wins (docs/accuracy.md), and the
contest between them (training.conditioner_choice) keeps whichever predicts the validation designs better.

Its spread is the spline's kriging standard deviation: the spline is the kriging predictor of a random function whose
generalised covariance is phi (Matheron's intrinsic random functions), so each latent number's variance at x is
sigma_d^2 P(x)^2, with P(x)^2 = -[phi(x, x_i); 1; x]^T A^-1 [phi(x, x_i); 1; x] (the power function: zero at the
training designs, growing away from them) and sigma_d^2 the mean of e_id^2 / P_-i(x_i)^2 over the training designs,
e_id being the error of the spline fitted without design i and P_-i its power function (both from the fitted system
without a refit, Rippa 1999: e_i = w_i / (A^-1)_ii, P_-i(x_i)^2 = 1 / (A^-1)_ii). Calibrated on the validation
designs as every conditioner's spread is (uncertainty.spread). A^-1 depends on the training designs alone: it is
rebuilt from them on the first call that needs it, so the file keeps D numbers for the spread, not a matrix.
"""
import numpy as np
import torch
from torch import nn

SMALLEST_RATIO = 1e-13  # a system this close to singular (smallest over largest singular value) is refused
DIFFERENCE_BYTES = 2 ** 26  # float64 differences between points and centres held at once, at most


class RBFConditioner(nn.Module):
    """Standardised parameters [B, P] -> standardised latents [B, D] (float32), the interpolant computed in float64;
    latent_spread also gives each latent number's kriging standard deviation."""

    spread_kind = "rbf"  # uncertainty.spread's name of where its spread comes from

    def __init__(self, spec):
        super().__init__()
        n, n_params, dims = spec.gp_points, spec.input_shape[0], spec.output_dim
        self.register_buffer("centres", torch.zeros(n, n_params, dtype=torch.float64))
        self.register_buffer("weights", torch.zeros(n, dims, dtype=torch.float64))
        self.register_buffer("polynomial", torch.zeros(n_params + 1, dims, dtype=torch.float64))  # constant, linear
        self.register_buffer("sigmas", torch.full((dims,), float("nan"), dtype=torch.float64))  # NaN until fit()
        self._inverse = None  # A^-1 [n + P + 1, n + P + 1], built on the first latent_spread (on the buffers' device)

    def forward(self, params):
        params = params.double()
        return (thin_plate(params, self.centres) @ self.weights + self.polynomial[0]
                + params @ self.polynomial[1:]).float()

    def latent_spread(self, params):
        """(latents [B, D], their kriging standard deviations [B, D]); (latents, None) before a fit."""
        latents = self(params)
        if not bool(torch.isfinite(self.sigmas).all()):
            return latents, None
        params = params.double()
        basis = torch.cat([thin_plate(params, self.centres), torch.ones_like(params[:, :1]), params], dim=1)
        power = -((basis @ self._system_inverse()) * basis).sum(1)  # P(x)^2 >= 0 up to rounding
        return latents, (power.clamp_min(0).sqrt()[:, None] * self.sigmas).float()

    def _system_inverse(self):
        if self._inverse is None or self._inverse.device != self.centres.device:
            self._inverse = torch.linalg.inv(interpolation_system(self.centres))
        return self._inverse

    @torch.no_grad()
    def fit(self, inputs: np.ndarray, targets: np.ndarray) -> "RBFConditioner":
        """Interpolate targets [n, D] at inputs [n, P] (float64). Raises np.linalg.LinAlgError where the designs do
        not determine an interpolant: fewer than P + 2 of them, or two designs at the same parameters, or all of them
        on a hyperplane of the parameters."""
        n, n_params = inputs.shape
        if n < n_params + 2:
            raise np.linalg.LinAlgError(f"{n} training designs do not determine a thin-plate spline in {n_params} "
                                        f"parameters (at least {n_params + 2} do)")
        system = interpolation_system(torch.as_tensor(inputs, dtype=torch.float64)).numpy()
        singular = np.linalg.svd(system, compute_uv=False)
        if singular[-1] <= singular[0] * SMALLEST_RATIO:
            raise np.linalg.LinAlgError("the interpolation system is singular: two training designs share their "
                                        "parameters, or the designs lie on a hyperplane of the parameters")
        inverse = np.linalg.inv(system)
        solution = inverse @ np.vstack([targets, np.zeros((n_params + 1, targets.shape[1]))])
        diagonal = np.diag(inverse)[:n, None]  # 1 / P_-i(x_i)^2
        self.centres.copy_(torch.as_tensor(inputs))
        self.weights.copy_(torch.as_tensor(solution[:n]))
        self.polynomial.copy_(torch.as_tensor(solution[n:]))
        self.sigmas.copy_(torch.as_tensor(np.sqrt(np.mean(solution[:n] ** 2 / diagonal, axis=0))))
        self._inverse = torch.as_tensor(inverse).to(self.centres.device)
        return self


def interpolation_system(centres):
    """A = [[Phi, Q], [Q^T, 0]] [n + P + 1, n + P + 1] float64 of the training designs centres [n, P], Q = [1, x]."""
    n, n_params = centres.shape
    polynomial = torch.cat([torch.ones_like(centres[:, :1]), centres], dim=1)
    system = torch.zeros(n + n_params + 1, n + n_params + 1, dtype=torch.float64, device=centres.device)
    system[:n, :n] = thin_plate(centres, centres)
    system[:n, n:], system[n:, :n] = polynomial, polynomial.T
    return system


def thin_plate(points, centres):
    """phi(|a - b|) = r^2 log r between points [A, P] and centres [B, P], float64 [A, B]; 0 at r = 0 (its limit)."""
    # the differences themselves, not |a|^2 + |b|^2 - 2 a.b, whose rounding is far above a near-exact family's error;
    # DIFFERENCE_BYTES of them at a time
    rows = max(1, DIFFERENCE_BYTES // (8 * centres.numel()))
    squared = torch.cat([(part.double()[:, None, :] - centres.double()[None]).square().sum(-1)
                         for part in points.split(rows)])
    return 0.5 * squared * torch.log(squared.clamp_min(1e-300))
