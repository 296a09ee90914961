"""Continual-learning metrics from the accuracy matrix R[i][j] (after task i, on task j)."""
from __future__ import annotations

import math

import numpy as np


def _lower(r) -> np.ndarray:
    a = np.array([[np.nan if v is None else v for v in row] for row in r], dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError("the accuracy matrix must be square (tasks x tasks)")
    return a


# A task taught without held-out data has an empty column: every mean below skips what is missing.
def _mean(values) -> float:
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=float)
    return float(v.mean()) if len(v) else 0.0


def final_average_accuracy(r) -> float:
    a = _lower(r)
    return _mean(a[-1])


def average_incremental_accuracy(r) -> float:
    a = _lower(r)
    return _mean([_mean(a[i, : i + 1]) for i in range(len(a)) if not np.isnan(a[i, : i + 1]).all()])


def forgetting(r) -> float:
    """Mean over old tasks of (best accuracy before the last task) - (accuracy after the last)."""
    a = _lower(r)
    t = len(a)
    if t < 2:
        return 0.0
    return _mean([np.nanmax(a[j : t - 1, j]) - a[t - 1, j] for j in range(t - 1) if not np.isnan(a[j : t, j]).any()])


def backward_transfer(r) -> float:
    a = _lower(r)
    t = len(a)
    if t < 2:
        return 0.0
    return _mean([a[t - 1, j] - a[j, j] for j in range(t - 1)])


def summarise(r) -> dict:
    """All summary metrics of a (possibly partial: rows of tasks learned so far) matrix."""
    rows = [row for row in r if row is not None and any(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in row)]
    square = [list(row[: len(rows)]) for row in rows]
    if not square:
        return {}
    return {
        "final_average_accuracy": final_average_accuracy(square),
        "average_incremental_accuracy": average_incremental_accuracy(square),
        "forgetting": forgetting(square),
        "backward_transfer": backward_transfer(square),
    }
