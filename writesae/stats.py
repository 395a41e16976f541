"""Small statistics used by the evaluations: Wilson intervals, R^2, a bootstrap of the mean."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["wilson", "r_squared", "bootstrap_mean_ci"]


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (default 95%) for a binomial proportion successes / n.

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    Returns (low, high); (0, 1) when n == 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def r_squared(measured: np.ndarray, predicted: np.ndarray) -> float:
    """1 - sum((y - y_hat)^2) / sum((y - mean(y))^2), with no fitted parameter."""
    y = np.asarray(measured, dtype=np.float64)
    yh = np.asarray(predicted, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(((y - yh) ** 2).sum()) / ss_tot


def bootstrap_mean_ci(
    values: np.ndarray, n_boot: int = 5000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
