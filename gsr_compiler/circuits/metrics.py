r"""Regression metrics per circuit, and their average across circuits.

For predictions :math:`\hat y` and labels :math:`y` of one circuit's scored nodes:

* Pearson :math:`r`, Spearman :math:`\rho` and Kendall :math:`\tau_b`
  (``scipy.stats``): does the model order gates the right way;
* :math:`R^2 = 1 - \sum (y - \hat y)^2 / \sum (y - \bar y)^2`;
* MAE :math:`= \operatorname{mean} |y - \hat y|`.

Metrics are computed per circuit and then averaged with equal weight per
circuit, so one 100k-gate circuit does not drown forty small ones.

Degenerate circuits: when the labels are constant (or fewer than two nodes are
scored), correlations and :math:`R^2` are undefined; they are reported as NaN
with ``degenerate=True`` and left out of the averages, which say how many
circuits they cover. A *constant prediction* on non-constant labels is a model
failure, not a data problem: its correlations are reported as 0, not NaN, so it
drags the average down instead of vanishing from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import torch
from scipy import stats

__all__ = ["METRIC_NAMES", "RegressionMetrics", "regression_metrics", "average_metrics"]

METRIC_NAMES: tuple[str, ...] = ("pearson", "spearman", "kendall", "r2", "mae")

ArrayLike = Union[np.ndarray, torch.Tensor, Iterable[float]]


@dataclass(frozen=True)
class RegressionMetrics:
    """Metrics of one circuit. ``degenerate`` marks labels with no spread."""

    pearson: float
    spearman: float
    kendall: float
    r2: float
    mae: float
    n: int
    degenerate: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready; NaN stays ``float('nan')``)."""
        return asdict(self)


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def regression_metrics(
    pred: ArrayLike, target: ArrayLike, mask: Optional[ArrayLike] = None
) -> RegressionMetrics:
    """Pearson, Spearman, Kendall tau, R2 and MAE of one circuit.

    Args:
        pred: predictions, one per node.
        target: labels, same length.
        mask: optional boolean mask of nodes to score (e.g. a sample's ``score_mask``).
    """
    p, t = _as_numpy(pred), _as_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} values, target {t.size}")
    if mask is not None:
        m = _as_numpy(mask).astype(bool)
        if m.shape != t.shape:
            raise ValueError(f"mask has {m.size} values, target {t.size}")
        p, t = p[m], t[m]
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred and target must be finite (found NaN or inf)")
    n = int(t.size)
    nan = float("nan")
    if n == 0:
        return RegressionMetrics(nan, nan, nan, nan, nan, 0, True, "no nodes")
    mae = float(np.abs(p - t).mean())
    if n < 2 or np.ptp(t) == 0:
        reason = "constant labels" if n >= 2 else "one node"
        return RegressionMetrics(nan, nan, nan, nan, mae, n, True, reason)
    r2 = 1.0 - float(((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    if np.ptp(p) == 0:  # no ordering information at all
        return RegressionMetrics(0.0, 0.0, 0.0, r2, mae, n)
    return RegressionMetrics(
        pearson=float(stats.pearsonr(p, t)[0]),
        spearman=float(stats.spearmanr(p, t)[0]),
        kendall=float(stats.kendalltau(p, t)[0]),
        r2=r2,
        mae=mae,
        n=n,
    )


def average_metrics(per_circuit: Mapping[str, RegressionMetrics]) -> dict[str, float]:
    """Equal-weight mean of each metric over the non-degenerate circuits.

    Returns ``{metric: mean, ..., "circuits": k, "degenerate": d}`` where ``k``
    circuits entered the correlation/R2 means and ``d`` were left out. MAE is
    averaged over every circuit that has nodes.
    """
    valid = [m for m in per_circuit.values() if not m.degenerate]
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        pool = [m for m in per_circuit.values() if m.n > 0] if name == "mae" else valid
        values = [getattr(m, name) for m in pool]
        out[name] = float(np.mean(values)) if values else math.nan
    out["circuits"] = len(valid)
    out["degenerate"] = len(per_circuit) - len(valid)
    return out
