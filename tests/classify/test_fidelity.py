"""Label fidelity: the probability of the prompted class, on known inputs; the filter's selection and
its top-up from spare images, with the counts the plan generates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from meddap.classify.data import IMAGENET_MEAN, IMAGENET_STD
from meddap.classify.fidelity import (filter_synthetic, fidelity_scores, kept_mask, prompted_probability,
                                      spares_needed)
from meddap.diffusion.plan import extra_count, synthetic_count
from meddap.errors import MeddapError


def test_prompted_probability_picks_each_images_own_class():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    assert prompted_probability(probs, np.array([0, 2, 0])) == pytest.approx([0.7, 0.6, 0.25])
    with pytest.raises(ValueError, match="labels"):
        prompted_probability(probs, np.array([0, 3, 1]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        prompted_probability(probs, np.array([0, 1]))


class _MeanLogits(nn.Module):
    """logits = (m, -m, 0) with m = the image's mean input value: a classifier whose answer is known."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))                                        # (B,)
        return torch.stack([m, -m, torch.zeros_like(m)], dim=1)          # (B, 3)


def test_fidelity_scores_are_the_softmax_of_the_prompted_class():
    levels = [0, 60, 128, 200, 255]
    images = torch.stack([torch.full((1, 8, 8), v, dtype=torch.uint8) for v in levels])  # (5, 1, 8, 8)
    labels = np.array([0, 1, 2, 0, 1])
    got = fidelity_scores(_MeanLogits(), images, labels, batch_size=2)   # batches of 2, 2, 1
    expected = []
    for v, y in zip(levels, labels):
        # the trial's input: grey -> 3 channels, ImageNet normalisation; then mean over channels and pixels
        m = np.mean([(v / 255 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD)])
        logits = np.array([m, -m, 0.0])
        expected.append(np.exp(logits[y]) / np.exp(logits).sum())
    assert got == pytest.approx(expected, rel=1e-5)
    assert fidelity_scores(_MeanLogits(), images[:0], labels[:0]).shape == (0,)


def _pool(fidelity: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for c, values in fidelity.items():
        for i, f in enumerate(values):
            rows.append({"image_id": f"syn-{c}-{i}", "class_name": c, "index": i, "fidelity": f})
    frame = pd.DataFrame(rows, columns=["image_id", "class_name", "index", "fidelity"])
    return frame.sample(frac=1.0, random_state=0)                        # order must not matter


def test_threshold_keeps_passing_images_and_tops_up_from_the_spares():
    # 4 images the ratio needs (index 0-3) + 2 spares (4, 5)
    pool = _pool({"benign": [0.9, 0.2, 0.8, 0.4, 0.95, 0.7], "normal": [0.6, 0.6, 0.6]})
    got = filter_synthetic(pool, {"benign": 4, "normal": 2}, "threshold", 0.5)
    assert list(got.loc[got.class_name == "benign", "index"]) == [0, 2, 4, 5]   # 1 and 3 replaced by spares
    assert list(got.loc[got.class_name == "normal", "index"]) == [0, 1]
    smaller = filter_synthetic(pool, {"benign": 2, "normal": 1}, "threshold", 0.5)
    assert list(smaller.loc[smaller.class_name == "benign", "index"]) == [0, 2]  # nested: a prefix
    with pytest.raises(MeddapError, match="keeps 2 of the 6.*needs 4.*lower the threshold"):
        filter_synthetic(pool, {"benign": 4}, "threshold", 0.85)
    plain = filter_synthetic(pool.drop(columns="fidelity"), {"benign": 4}, "none")
    assert list(plain["index"]) == [0, 1, 2, 3]                          # no gate: first by index, no spares


def test_drop_lowest_drops_a_share_of_each_class_with_ties_by_index():
    pool = _pool({"benign": [0.5, 0.1, 0.9, 0.1, 0.8, 0.7, 0.3, 0.6, 0.2, 0.4]})
    keep = kept_mask(pool.sort_values("index"), "drop_lowest", 0.3)     # floor(0.3 x 10) = 3 dropped
    assert list(np.flatnonzero(~keep)) == [1, 3, 8]                      # 0.1 (idx 1), 0.1 (idx 3), 0.2
    got = filter_synthetic(pool, {"benign": 6}, "drop_lowest", 0.3)
    assert list(got["index"]) == [0, 2, 4, 5, 6, 7]
    with pytest.raises(MeddapError, match="no fidelity score"):
        filter_synthetic(pool.assign(fidelity=np.nan), {"benign": 1}, "drop_lowest", 0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        filter_synthetic(pool, {"benign": 1}, "drop_lowest", 1.0)


@pytest.mark.parametrize("n_real", [1, 3, 7, 40, 437])
@pytest.mark.parametrize("top", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_the_plans_spares_always_fill_drop_lowest_at_the_largest_ratio(n_real, top, share):
    """With filter_overgenerate >= p / (1 - p), drop_lowest p keeps at least the largest ratio's count."""
    p = share / (1 + share)                                              # the largest p this share covers
    assert spares_needed("drop_lowest", p) == pytest.approx(share)
    n_top = synthetic_count(n_real, top)
    total = n_top + extra_count(n_top, share)
    rng = np.random.default_rng(n_real)
    pool = _pool({"benign": list(rng.random(total))})
    got = filter_synthetic(pool, {"benign": n_top}, "drop_lowest", p)
    assert len(got) == n_top
