"""Split and fold invariants: no group in two splits or folds, stratification, determinism, counts add up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meddap.data.splits import greedy_assign, make_splits
from meddap.errors import MeddapError


def _busi_like(seed: int = 0, dup_share: float = 0.2):
    """780 images (437/210/133) with groups of 1-4 images, some groups mixing classes."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 437 + [1] * 210 + [2] * 133)
    groups, g, i = np.empty(780, dtype=object), 0, 0
    order = rng.permutation(780)
    while i < 780:
        size = int(rng.integers(2, 5)) if rng.random() < dup_share else 1
        for k in order[i:i + size]:
            groups[k] = f"g{g}"
        i += size
        g += 1
    return labels, groups


def _check_invariants(df, labels, groups, folds):
    frame = df.assign(label=labels, group=groups)
    # every image has exactly one place; folds only on train
    assert set(frame["split"]) == {"train", "test"}
    assert (frame.loc[frame["split"] == "test", "fold"] == -1).all()
    assert set(frame.loc[frame["split"] == "train", "fold"]) == set(range(folds))
    # no group in two splits, or in two folds
    per_group = frame.groupby("group").agg(splits=("split", "nunique"), folds=("fold", "nunique"))
    assert (per_group["splits"] == 1).all() and (per_group["folds"] == 1).all()
    # class counts add up
    by = frame.groupby(["split", "fold", "label"]).size()
    assert by.sum() == len(labels)
    for c in np.unique(labels):
        assert by.xs(c, level="label").sum() == (labels == c).sum()
    return frame


@pytest.mark.parametrize("dup_share", [0.0, 0.3])
def test_invariants_and_stratification(dup_share):
    labels, groups = _busi_like(1, dup_share)
    df = make_splits(labels, groups, 3, test_fraction=0.15, folds=5, seed=0)
    frame = _check_invariants(df, labels, groups, 5)
    totals = np.bincount(labels)
    test = np.bincount(frame.loc[frame["split"] == "test", "label"], minlength=3)
    tol = 1 if dup_share == 0 else 4   # grouped: approximate, within a few images per class
    assert np.all(np.abs(test - 0.15 * totals) <= tol), test
    train = frame[frame["split"] == "train"]
    per_fold = train.groupby(["fold", "label"]).size().unstack()   # (K, C)
    target = (totals - test) / 5
    assert np.all(np.abs(per_fold.to_numpy() - target) <= tol + 0.5), per_fold


def test_deterministic_for_a_seed_and_independent_of_row_order():
    labels, groups = _busi_like(2, 0.3)
    a = make_splits(labels, groups, 3, 0.15, 5, seed=7)
    b = make_splits(labels, groups, 3, 0.15, 5, seed=7)
    pd.testing.assert_frame_equal(a, b)
    c = make_splits(labels, groups, 3, 0.15, 5, seed=8)
    assert not a.equals(c)
    perm = np.random.default_rng(0).permutation(len(labels))
    d = make_splits(labels[perm], groups[perm], 3, 0.15, 5, seed=7)
    inv = np.argsort(perm)
    pd.testing.assert_frame_equal(d.iloc[inv].reset_index(drop=True), a)


def test_test_split_does_not_depend_on_folds():
    labels, groups = _busi_like(3, 0.3)
    a = make_splits(labels, groups, 3, 0.15, 5, seed=0)
    b = make_splits(labels, groups, 3, 0.15, 3, seed=0)
    assert (a["split"] == b["split"]).all()
    _check_invariants(b, labels, groups, 3)


def test_fixed_test_split_from_source():
    labels, groups = _busi_like(4, 0.0)
    fixed = np.where(np.arange(780) % 10 == 0, "test", "train")
    df = make_splits(labels, groups, 3, 0.15, 4, seed=0, fixed_split=fixed)
    assert (df["split"].to_numpy() == fixed).all()
    assert set(df.loc[df["split"] == "train", "fold"]) == {0, 1, 2, 3}


def test_too_few_groups_is_a_clear_error():
    labels = np.array([0, 0, 1, 1, 0, 1])
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    with pytest.raises(MeddapError, match="too few for a test split and 5 folds"):
        make_splits(labels, groups, 2, 0.2, 5, seed=0)


def test_greedy_assign_balances_classes():
    counts = np.array([[1, 0]] * 8 + [[0, 1]] * 4)
    targets = np.array([[4, 2], [4, 2]], dtype=float)
    bins = greedy_assign(counts, targets, np.arange(12))
    filled = np.array([counts[bins == b].sum(axis=0) for b in range(2)])
    np.testing.assert_array_equal(filled, targets)


def test_few_groups_still_fill_every_fold():
    """Ties between bins go to the emptier one: 4 single-image groups fill 3 folds."""
    df = make_splits([0, 0, 1, 1], ["a", "b", "c", "d"], 2, 0.2, 3, seed=0, fixed_split=["train"] * 4)
    assert sorted(df["fold"].value_counts().tolist()) == [1, 1, 2]
