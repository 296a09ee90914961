"""Continual-learning metrics on a known accuracy matrix R[i][j] (after task i, on task j)."""
from __future__ import annotations

import math

import pytest

from mmcl_edge import metrics

# class-IL style: None above the diagonal (task j not learned yet after task i)
R = [
    [0.90, None, None],
    [0.70, 0.80, None],
    [0.60, 0.50, 0.95],
]

# by hand:
FINAL = (0.60 + 0.50 + 0.95) / 3                                   # mean of the last row
INCREMENTAL = (0.90 + (0.70 + 0.80) / 2 + (0.60 + 0.50 + 0.95) / 3) / 3
# task 0: best before the last task = max(0.90, 0.70) = 0.90, last 0.60 -> 0.30
# task 1: best before the last task = 0.80, last 0.50 -> 0.30
FORGETTING = (0.30 + 0.30) / 2
BWT = ((0.60 - 0.90) + (0.50 - 0.80)) / 2


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(R) == pytest.approx(FINAL)


def test_average_incremental_accuracy():
    assert metrics.average_incremental_accuracy(R) == pytest.approx(INCREMENTAL)


def test_forgetting():
    assert metrics.forgetting(R) == pytest.approx(FORGETTING)


def test_forgetting_uses_best_earlier_accuracy_not_first():
    r = [[0.5, None, None], [0.9, 0.8, None], [0.4, 0.8, 0.7]]
    # task 0 peaked after task 1 (0.9), task 1 did not drop
    assert metrics.forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert metrics.backward_transfer(r) == pytest.approx(((0.4 - 0.5) + (0.8 - 0.8)) / 2)


def test_backward_transfer():
    assert metrics.backward_transfer(R) == pytest.approx(BWT)


def test_single_task_has_no_forgetting():
    assert metrics.forgetting([[0.7]]) == 0.0
    assert metrics.backward_transfer([[0.7]]) == 0.0
    assert metrics.final_average_accuracy([[0.7]]) == pytest.approx(0.7)


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError):
        metrics.final_average_accuracy([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])


def test_summarise_full_matrix():
    s = metrics.summarise(R)
    assert s["final_average_accuracy"] == pytest.approx(FINAL)
    assert s["average_incremental_accuracy"] == pytest.approx(INCREMENTAL)
    assert s["forgetting"] == pytest.approx(FORGETTING)
    assert s["backward_transfer"] == pytest.approx(BWT)


def test_summarise_partial_matrix_uses_tasks_learned_so_far():
    # the stream records full-width rows; after two of three tasks only two rows exist
    s = metrics.summarise(R[:2])
    assert s["final_average_accuracy"] == pytest.approx((0.70 + 0.80) / 2)
    assert s["average_incremental_accuracy"] == pytest.approx((0.90 + 0.75) / 2)
    assert s["forgetting"] == pytest.approx(0.90 - 0.70)
    assert s["backward_transfer"] == pytest.approx(0.70 - 0.90)

    s1 = metrics.summarise(R[:1])
    assert s1["final_average_accuracy"] == pytest.approx(0.90)
    assert s1["forgetting"] == 0.0 and s1["backward_transfer"] == 0.0


def test_summarise_domain_il_partial_ignores_future_columns():
    # domain-IL rows are evaluated on every domain, future ones included
    r = [[0.9, 0.3, 0.2], [0.8, 0.85, 0.4]]
    s = metrics.summarise(r)
    assert s["final_average_accuracy"] == pytest.approx((0.8 + 0.85) / 2)
    assert s["forgetting"] == pytest.approx(0.1)


def test_summarise_skips_empty_rows_and_nan():
    r = [[0.9, None, None], [0.7, 0.8, None], [None, None, None]]
    assert metrics.summarise(r)["final_average_accuracy"] == pytest.approx(0.75)
    r_nan = [[0.9, math.nan, math.nan], [0.7, 0.8, math.nan], [math.nan, math.nan, math.nan]]
    assert metrics.summarise(r_nan)["final_average_accuracy"] == pytest.approx(0.75)
    assert metrics.summarise([]) == {}
