"""The classification benchmark's AUC helpers, on scores whose AUC is known by construction."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from classification import auc_interval, pair_auc  # noqa: E402


def test_pair_auc_counts_ordered_pairs_and_half_ties_for_lists_and_arrays():
    # pairs (pos, neg): 0.9 beats both, 0.5 beats 0.1 and ties 0.5: (2 + 1 + 0.5) / 4
    assert pair_auc([0.9, 0.5], [0.1, 0.5]) == pytest.approx(0.875)
    assert pair_auc(np.array([0.9, 0.5]), np.array([0.1, 0.5])) == pytest.approx(0.875)
    assert pair_auc([], [0.1]) is None and pair_auc(np.array([]), np.array([0.1])) is None


def test_auc_interval_brackets_the_auc_and_collapses_when_the_classes_separate():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
    lo, hi = auc_interval(list(pos), list(neg))
    assert lo < pair_auc(pos, neg) < hi and hi - lo < 0.4
    assert auc_interval([0.9, 0.8, 0.95], [0.1, 0.2]) == [1.0, 1.0]
    assert auc_interval([], [0.1]) is None
