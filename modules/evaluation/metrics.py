"""How far predicted fields are from the simulated ones, in physical units: per design, per time step, worst case.

One FieldErrors holds, for each design it scores, the squared error and the squared simulated field summed over the
nodes of every time step, and the largest absolute error of each variable. Everything a report says follows from
these: the relative L2 error of the whole [T, M] field, the error of each time step, the worst designs. Predictions
can be added design by design (a model's batches) or time step by time step (baselines streamed over time), and the
fields are never kept.
"""
from dataclasses import dataclass

import numpy as np

WORST_SHOWN = 5


@dataclass
class FieldErrors:
    designs: np.ndarray   # [n] dataset indices of the designs scored, in row order
    error2: np.ndarray    # [n, T] float64: sum over nodes of (predicted - simulated)^2
    norm2: np.ndarray     # [n, T] float64: sum over nodes of simulated^2
    max_abs: np.ndarray   # [n, V] largest |predicted - simulated| of each variable, physical units

    @classmethod
    def empty(cls, designs, n_steps: int, n_vars: int) -> "FieldErrors":
        n = len(designs)
        return cls(np.asarray(designs, dtype=np.int64), np.zeros((n, n_steps)), np.zeros((n, n_steps)),
                   np.zeros((n, n_vars)))

    def add(self, rows, predicted, simulated, steps=slice(None)) -> None:
        """Score predicted against simulated fields [b, t, M] (physical units) for rows (positions in `designs`)
        and time steps `steps` (a slice of T). Differences in float32, sums in float64, one design at a time: the
        temporaries are one design's, not the batch's (the end-of-run evaluation must fit where training did)."""
        n_vars = self.max_abs.shape[1]
        for position, one_predicted, one_simulated in zip(np.arange(len(self.designs))[rows], predicted, simulated):
            one_simulated = np.asarray(one_simulated, np.float32)
            difference = np.asarray(one_predicted, np.float32) - one_simulated
            self.error2[position, steps] = np.add.reduce(np.square(difference), axis=1, dtype=np.float64)
            self.norm2[position, steps] = np.add.reduce(np.square(one_simulated), axis=1, dtype=np.float64)
            by_variable = np.abs(difference, out=difference).reshape(-1, n_vars, difference.shape[1] // n_vars)
            self.max_abs[position] = np.maximum(self.max_abs[position], by_variable.max(axis=(0, 2)))

    def relative_l2(self) -> np.ndarray:
        """[n]: ||predicted - simulated|| / ||simulated|| over each design's whole [T, M] field."""
        return np.sqrt(self.error2.sum(axis=1)) / np.maximum(np.sqrt(self.norm2.sum(axis=1)), 1e-30)

    def relative_l2_per_step(self) -> np.ndarray:
        """[T]: over all designs scored, sqrt(sum of squared errors / sum of squared fields) at each time step; NaN
        where every simulated field is zero (no relative error is defined there: see rms_per_step)."""
        norm = np.sqrt(self.norm2.sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norm > 0, np.sqrt(self.error2.sum(axis=0)) / norm, np.nan)

    def rms_per_step(self, n_nodes: int) -> np.ndarray:
        """[T]: root-mean-square error over designs and nodes at each time step, physical units."""
        return np.sqrt(self.error2.sum(axis=0) / (len(self.designs) * n_nodes))

    def subset(self, designs) -> "FieldErrors":
        """The rows of these dataset indices (each must have been scored)."""
        position = {int(design): row for row, design in enumerate(self.designs)}
        rows = [position[int(design)] for design in designs]
        return FieldErrors(self.designs[rows], self.error2[rows], self.norm2[rows], self.max_abs[rows])

    def summary(self, n_nodes: int, per_step: bool = True) -> dict:
        """The report of these designs: mean, median and largest relative L2 error and max-abs error (per
        variable), the worst designs, and (per_step) the error of each time step."""
        relative = self.relative_l2()
        worst = np.argsort(relative)[::-1][:WORST_SHOWN]
        report = {
            "n_designs": len(self.designs),
            "relative_l2": spread(relative, self.designs),
            "max_abs_error": [spread(self.max_abs[:, variable], self.designs)
                              for variable in range(self.max_abs.shape[1])],
            "worst_designs": [{"design": int(self.designs[row]), "relative_l2": float(relative[row]),
                               "max_abs_error": [float(value) for value in self.max_abs[row]]} for row in worst],
            "per_design_relative_l2": {int(design): float(error) for design, error in zip(self.designs, relative)},
        }
        if per_step:
            report["per_step"] = {"relative_l2": nan_to_none(self.relative_l2_per_step()),
                                  "rms_error": [float(value) for value in self.rms_per_step(n_nodes)]}
        return report


def spread(values: np.ndarray, designs: np.ndarray) -> dict:
    """Mean, median and largest value, with the design that has the largest."""
    worst = int(np.argmax(values))
    return {"mean": float(values.mean()), "median": float(np.median(values)), "max": float(values[worst]),
            "max_design": int(designs[worst])}


def nan_to_none(values) -> list:
    """JSON has no NaN: undefined entries become null."""
    return [None if not np.isfinite(value) else float(value) for value in values]


def as_percent(value: float) -> str:
    """A relative error in percent for people: four decimals, or three significant digits where four decimals would
    read 0.0000% (a near-exact family's errors are 1e-6, and that is worth seeing)."""
    return f"{value:.4%}" if abs(value) >= 1e-4 or value == 0 else f"{100 * value:.3g}%"


def relative_l2(predicted, true) -> np.ndarray:
    """Per design: ||predicted - true|| / ||true|| over the whole [T, M] field. Inputs [n, T, M].
    Differences in float32, sums of squares accumulated in float64: no float64 copy of a batch of huge fields."""
    true = np.asarray(true, np.float32).reshape(len(true), -1)
    difference = np.asarray(predicted, np.float32).reshape(len(true), -1) - true
    error2 = np.add.reduce(np.square(difference, out=difference), axis=1, dtype=np.float64)
    norm2 = np.add.reduce(np.square(true), axis=1, dtype=np.float64)
    return np.sqrt(error2) / np.maximum(np.sqrt(norm2), 1e-30)
