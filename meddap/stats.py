"""Statistics of paired classifier comparisons; plain numpy, known answers in tests/test_stats.py.

  paired_bootstrap(aug, real)  the paired bootstrap over TEST IMAGES: (pairs, images) 0/1 correctness of
                               the augmented and the real-only models on the same images; each draw
                               resamples the images with replacement and takes the mean over pairs of
                               the accuracy difference (augmented - real) on them. Percentile CI and
                               the two-sided p = min(1, 2 min(share <= 0, share >= 0)).
  holm(p)                      Holm's step-down adjustment of a family of p-values (NaN stays NaN and
                               is not counted in the family).

Why a bootstrap over images: the fold t-test treats fold models as independent samples, but they
share one test set (and ~75 % of their training images); the test set's own sampling variance, the
largest one with ~120 test images, is missing from it. Resampling the test images puts it back. The
bootstrap holds the trained models fixed: it does not account for the variance of training (seeds,
which images were in the training folds), which the fold t-test and `classify.repeats` speak to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BootstrapResult", "paired_bootstrap", "holm", "correctness_matrices"]

_CHUNK_ELEMENTS = 4_000_000   # index-matrix entries drawn at once (~32 MB of int64)


@dataclass(frozen=True)
class BootstrapResult:
    observed: float     # mean over pairs of (aug accuracy - real accuracy) on all images
    ci_low: float
    ci_high: float
    p_value: float
    n_images: int
    n_pairs: int
    samples: int


def paired_bootstrap(aug_correct: np.ndarray, real_correct: np.ndarray, samples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> BootstrapResult:
    """Paired bootstrap of the accuracy difference over test images (see the module docstring).

    `aug_correct`, `real_correct`: (P, N) arrays, 1 where pair p's model classified image n correctly
    (pairs = folds x repeats; every pair scored the same N images, in the same column order).
    The mean over pairs of the accuracy difference on a resample is the mean over the resampled images
    of the per-image difference averaged over pairs, so each draw is one gather and one mean."""
    aug = np.atleast_2d(np.asarray(aug_correct, dtype=np.float64))
    real = np.atleast_2d(np.asarray(real_correct, dtype=np.float64))
    if aug.shape != real.shape:
        raise ValueError(f"paired_bootstrap: aug {aug.shape} and real {real.shape} differ; pair the same images")
    n_pairs, n = aug.shape
    if n == 0 or n_pairs == 0:
        nan = float("nan")
        return BootstrapResult(nan, nan, nan, nan, n, n_pairs, samples)
    diff = (aug - real).mean(axis=0)                                   # (N,) per-image difference
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, samples, chunk):
        stop = min(start + chunk, samples)
        idx = rng.integers(0, n, size=(stop - start, n))               # (b, N) resampled image indices
        stats[start:stop] = diff[idx].mean(axis=1)
    # Round-off: identical images drawn in another order must give exactly 0, not 1e-17.
    stats = np.round(stats, 12)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min(float((stats <= 0).mean()), float((stats >= 0).mean())))
    return BootstrapResult(float(diff.mean()), float(low), float(high), p, n, n_pairs, samples)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values, in the input order; NaN entries stay NaN and do not count in the family."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(1.0, adjusted)
    return out


def correctness_matrices(predictions, aug_ids: list[str], real_ids: list[str],
                         eval_sets: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(P, N) correctness of the paired trials (aug_ids[p] with real_ids[p]) on the images every one of
    them scored in `eval_sets`, from predictions.parquet rows (trial_id, eval_set, image_id, label, pred).
    Returns (aug, real, image_ids); N = 0 when a trial has no predictions."""
    sub = predictions[predictions["eval_set"].isin(eval_sets)
                      & predictions["trial_id"].isin(set(aug_ids) | set(real_ids))]
    correct = (sub["label"].to_numpy() == sub["pred"].to_numpy()).astype(np.float64)
    table = (sub.assign(correct=correct).drop_duplicates(["trial_id", "image_id"])
             .pivot(index="trial_id", columns="image_id", values="correct"))
    ids = [*aug_ids, *real_ids]
    if any(t not in table.index for t in ids):
        return np.zeros((len(aug_ids), 0)), np.zeros((len(real_ids), 0)), []
    table = table.loc[ids].dropna(axis=1)                              # images every trial scored
    images = [str(c) for c in table.columns]
    values = table.to_numpy()
    return values[:len(aug_ids)], values[len(aug_ids):], images
