"""Min-max scaling of simulation fields to [-0.7, 0.7], one (min, max) pair per variable, stored as JSON.

The node axis (last) holds num_var variables side by side, each M/num_var nodes wide; each variable gets its own range.
The inverse is exact up to float rounding, so everything a user sees is in physical units.
"""
import numpy as np
import torch

LOW, HIGH = -0.7, 0.7


class MinMaxScaler:
    """data_min, data_max: one value per variable, fitted on the training designs only."""

    def __init__(self, data_min, data_max, low=LOW, high=HIGH):
        self.data_min = np.asarray(data_min, dtype=np.float64).reshape(-1)
        self.data_max = np.asarray(data_max, dtype=np.float64).reshape(-1)
        self.low, self.high = float(low), float(high)
        span = self.data_max - self.data_min
        # A constant variable maps to the middle of the range instead of dividing by zero.
        self._scale = np.where(span > 0, (self.high - self.low) / np.where(span > 0, span, 1.0), 1.0)
        self._base = np.where(span > 0, self.low, (self.low + self.high) / 2)
        self._tensors = {}  # (constant's name, dtype, device) -> tensor: one host-to-GPU copy each, not one per batch

    @property
    def n_vars(self) -> int:
        return len(self.data_min)

    def transform(self, values, in_place: bool = False):
        """Physical -> scaled: (x - min) * scale + low. values: [..., M] numpy array or tensor; returns the same kind
        (float32). Computed in float32 in place: a chunk of a large dataset costs one float32 copy, no more; none with
        in_place (values, float32 and contiguous, then holds the result)."""
        out = values.reshape(*values.shape[:-1], self.n_vars, -1) if in_place else self._per_variable(values)
        out -= self._constant("data_min", out)
        out *= self._constant("scale", out)
        out += self._constant("base", out)
        return out.reshape(values.shape)

    def inverse(self, values):
        """Scaled -> physical, the inverse of transform up to float32 rounding."""
        out = self._per_variable(values)
        out -= self._constant("base", out)
        out *= self._constant("inverse_scale", out)
        out += self._constant("data_min", out)
        return out.reshape(values.shape)

    def constants(self) -> dict:
        """The constants of transform and inverse as float32 CPU tensors [n_vars, 1]: scaled = (physical - data_min)
        * scale + base, physical = (scaled - base) * inverse_scale + data_min (models.surrogate computes both so)."""
        return {name: torch.as_tensor(self._constant(name, np.zeros(1))) for name in ("data_min", "scale", "base",
                                                                                   "inverse_scale")}

    def physical_spread(self, scaled_spread):
        """A spread (a standard deviation, an error) per variable [n_vars] in scaled units -> physical units."""
        return np.asarray(scaled_spread, dtype=np.float64) / self._scale

    def _per_variable(self, values):
        """A float32 copy of values [..., M] viewed as [..., n_vars, M / n_vars]."""
        *lead, n_nodes = values.shape
        if isinstance(values, torch.Tensor):
            copy = values.to(torch.float32, copy=True)
        else:
            copy = np.array(values, dtype=np.float32, copy=True)
        return copy.reshape(*lead, self.n_vars, n_nodes // self.n_vars)

    def _constant(self, name: str, like):
        """A per-variable constant (data_min, scale, base, inverse_scale) shaped [n_vars, 1] to broadcast over like,
        in its kind and dtype. On a GPU each is copied once and kept: a copy from host memory per batch would make
        the host wait for the GPU's queued work every time."""
        per_variable = {"data_min": self.data_min, "scale": self._scale, "base": self._base,
                        "inverse_scale": 1.0 / self._scale}[name]
        if not isinstance(like, torch.Tensor):
            return per_variable[:, None].astype(np.float32)
        key = (name, like.dtype, like.device)
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(per_variable[:, None], dtype=like.dtype, device=like.device)
        return self._tensors[key]

    def to_dict(self) -> dict:
        return {"kind": "minmax", "data_min": self.data_min.tolist(), "data_max": self.data_max.tolist(),
                "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, values: dict) -> "MinMaxScaler":
        return cls(values["data_min"], values["data_max"], values["low"], values["high"])


class ColumnScaler:
    """Standardisation per column (mean 0, std 1 on the rows it was fitted on), for design parameters and latents.

    A column that barely varies keeps a floor on its std (1e-3 of the largest std, at least 1e-12), so a collapsed
    latent dimension is not blown up into noise the conditioner would then chase.
    """

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)

    @classmethod
    def fit(cls, rows) -> "ColumnScaler":
        rows = np.asarray(rows, dtype=np.float64)
        std = rows.std(axis=0)
        return cls(rows.mean(axis=0), np.maximum(std, max(float(std.max(initial=0.0)) * 1e-3, 1e-12)))

    def transform(self, rows) -> np.ndarray:
        """[n, P] -> standardised [n, P] float32. (The way back, on tensors, is the Surrogate's: models/surrogate.)"""
        return ((np.asarray(rows, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"kind": "standard", "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> "ColumnScaler":
        return cls(values["mean"], values["std"])
