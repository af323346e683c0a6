"""Leakage-safe held-out test split and K folds: stratified by class, grouped, deterministic for a seed.

Two stages, so that the test split does not depend on K:
  1. groups -> test or rest, aiming at `test_fraction` of every class in test;
  2. rest groups -> K folds, aiming at an equal share of every class in each fold.
Each stage is a greedy assignment: groups are taken largest first (ties in a seeded random order) and
each goes to the bin that most needs its classes: argmax over bins of sum_c w_c * need[bin, c] * n[g, c]
(the move that most lowers the weighted squared distance to the targets), with w_c = 1 / images of
class c so small classes count as much as large ones (plus the same term for the bin's total size).
A group never spans two bins, so with groups the class shares are approximate; with one image per
group they are within one image of the target.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from meddap.errors import MeddapError

__all__ = ["make_splits", "greedy_assign"]


def greedy_assign(counts: np.ndarray, targets: np.ndarray, order: np.ndarray) -> np.ndarray:
    """counts (G, C) images per group and class; targets (B, C) wanted images per bin and class;
    order: the groups in the order to place them. Returns (G,) bin index per group."""
    # The bin sizes are balanced too (an extra column: all classes together), which also breaks ties
    # between bins that need a group's classes equally towards the emptier one.
    counts = np.concatenate([counts, counts.sum(axis=1, keepdims=True)], axis=1)     # (G, C+1)
    targets = np.concatenate([targets, targets.sum(axis=1, keepdims=True)], axis=1)  # (B, C+1)
    totals = counts.sum(axis=0).astype(np.float64)       # (C+1,)
    weights = 1.0 / np.maximum(totals, 1.0)              # (C+1,)
    filled = np.zeros_like(targets, dtype=np.float64)    # (B, C+1)
    out = np.full(len(counts), -1, dtype=np.int64)
    for g in order:
        need = targets - filled                           # (B, C+1)
        v = counts[g].astype(np.float64)                  # (C+1,)
        # Change in sum_c w_c (need - v)^2 when g joins each bin; the smallest is the best move.
        cost = ((need - v) ** 2 - need ** 2) @ weights    # (B,)
        b = int(np.argmin(cost))
        out[g] = b
        filled[b] += v
    return out


def _group_table(labels: np.ndarray, groups: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique group ids (G,) and their class counts (G, C)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(uniq), n_classes), dtype=np.int64)
    np.add.at(counts, (inv, labels), 1)
    return uniq, counts


def _order(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Largest groups first; equal sizes in a seeded random order."""
    shuffled = rng.permutation(len(counts))
    sizes = counts.sum(axis=1)[shuffled]
    return shuffled[np.argsort(-sizes, kind="stable")]


def make_splits(labels: Sequence[int], groups: Sequence[str], n_classes: int, test_fraction: float,
                folds: int, seed: int, fixed_split: Optional[Sequence[Optional[str]]] = None) -> pd.DataFrame:
    """Per image: `split` ("train" | "test") and `fold` (0..folds-1 on train, -1 on test).

    `fixed_split` (optional, per image "train" | "test"): a split the source already decided (a
    manifest's split column); then only the folds are made here, from its train images.
    Raises MeddapError when there are too few groups to give every fold (and the test split) images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups], dtype=object)
    n = len(labels)
    if n == 0:
        raise MeddapError("no images to split: Dataset A has no usable images.")
    rng = np.random.default_rng(seed)

    if fixed_split is not None:
        is_test = np.asarray([s == "test" for s in fixed_split], dtype=bool)
    else:
        uniq, counts = _group_table(labels, groups, n_classes)
        if len(uniq) < folds + 1:
            raise MeddapError(
                f"only {len(uniq)} leakage-safe groups in Dataset A: too few for a test split and "
                f"{folds} folds. Lower data.folds, or add images.")
        targets = np.stack([test_fraction * counts.sum(axis=0), (1 - test_fraction) * counts.sum(axis=0)])
        bins = greedy_assign(counts, targets, _order(counts, rng))   # 0 = test, 1 = rest
        test_groups = set(uniq[bins == 0].tolist())
        is_test = np.asarray([g in test_groups for g in groups], dtype=bool)
        if not is_test.any() or is_test.all():
            which = "test" if not is_test.any() else "training"
            hint = "raise" if which == "test" else "lower"
            raise MeddapError(f"data.test_fraction={test_fraction} leaves an empty {which} split with these "
                              f"{len(uniq)} leakage-safe groups ({n} images); {hint} data.test_fraction "
                              f"or add images.")

    fold = np.full(n, -1, dtype=np.int64)
    train_idx = np.nonzero(~is_test)[0]
    uniq, counts = _group_table(labels[train_idx], groups[train_idx], n_classes)
    if len(uniq) < folds:
        raise MeddapError(
            f"only {len(uniq)} leakage-safe groups in Dataset A's training split: too few for "
            f"data.folds={folds}. Lower data.folds, or add images.")
    targets = np.tile(counts.sum(axis=0) / folds, (folds, 1))        # (K, C)
    bins = greedy_assign(counts, targets, _order(counts, rng))
    fold_of_group = dict(zip(uniq.tolist(), bins.tolist()))
    fold[train_idx] = [fold_of_group[g] for g in groups[train_idx]]
    empty = sorted(set(range(folds)) - set(fold[train_idx].tolist()))
    if empty:
        raise MeddapError(f"fold(s) {empty} received no images ({len(uniq)} groups for {folds} folds); "
                          f"lower data.folds.")
    return pd.DataFrame({"split": np.where(is_test, "test", "train"), "fold": fold})
