"""meddap.stats on known answers: the paired bootstrap over test images and Holm's correction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meddap.stats import correctness_matrices, holm, paired_bootstrap


def test_identical_predictions_give_zero_interval_and_p_one():
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, size=(5, 117))                       # 5 folds, 117 test images
    r = paired_bootstrap(correct, correct.copy(), samples=10_000, seed=0)
    assert (r.observed, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (r.n_pairs, r.n_images, r.samples) == (5, 117, 10_000)


def test_clear_improvement_small_p_and_interval_above_zero():
    rng = np.random.default_rng(1)
    real = rng.random((5, 120)) < 0.70
    aug = real | (rng.random((5, 120)) < 0.5)                          # fixes about half the errors, breaks none
    r = paired_bootstrap(aug, real, samples=10_000, seed=0)
    assert r.observed == pytest.approx((aug.astype(float) - real).mean())
    assert 0 < r.ci_low < r.observed < r.ci_high
    assert r.p_value < 1e-3                                            # no draw at or below 0
    worse = paired_bootstrap(real, aug, samples=10_000, seed=0)        # sign flips, p the same
    assert worse.ci_high < 0 and worse.p_value == r.p_value


def test_bootstrap_matches_a_plain_loop_and_is_seeded():
    """The vectorised statistic is the mean over pairs of the accuracy difference on each resample."""
    rng = np.random.default_rng(2)
    aug, real = rng.integers(0, 2, (3, 40)), rng.integers(0, 2, (3, 40)) * rng.integers(0, 2, (3, 40))
    a = paired_bootstrap(aug, real, samples=10_000, seed=7)
    assert a == paired_bootstrap(aug, real, samples=10_000, seed=7)
    draws = np.random.default_rng(7).integers(0, 40, size=(10_000, 40))
    loop = np.array([np.mean([aug[p, d].mean() - real[p, d].mean() for p in range(3)]) for d in draws])
    low, high = np.quantile(loop, [0.025, 0.975])
    assert (a.ci_low, a.ci_high) == (pytest.approx(low), pytest.approx(high))
    share = min((loop <= 1e-12).mean(), (loop >= -1e-12).mean())
    assert a.p_value == pytest.approx(min(1.0, 2 * share))


def test_bootstrap_of_pure_noise_is_not_significant():
    rng = np.random.default_rng(3)
    aug, real = rng.random((5, 200)) < 0.7, rng.random((5, 200)) < 0.7
    assert paired_bootstrap(aug, real, samples=10_000, seed=0).p_value > 0.05
    with pytest.raises(ValueError, match="pair the same images"):
        paired_bootstrap(aug, real[:, :10])


def test_holm_known_values():
    # m = 4: sorted p 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06 (monotone), 0.04 -> capped order kept
    np.testing.assert_allclose(holm([0.03, 0.01, 0.04, 0.02]), [0.06, 0.04, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])           # capped at 1
    out = holm([0.01, np.nan, 0.04])                                   # NaN stays NaN, family of 2
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)
    assert holm([]).shape == (0,)


def test_correctness_matrices_align_images_and_pairs():
    rows = []
    for tid, preds in (("aug0", [0, 1, 1]), ("real0", [0, 0, 1]), ("aug1", [1, 1, 1]), ("real1", [0, 1, 0])):
        for img, (label, pred) in enumerate(zip([0, 1, 1], preds)):
            rows.append(dict(trial_id=tid, eval_set="test", image_id=f"i{2 - img}", label=label, pred=pred))
    rows.append(dict(trial_id="aug0", eval_set="val", image_id="v", label=0, pred=0))   # other eval set: ignored
    pred = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    a, r, images = correctness_matrices(pred, ["aug0", "aug1"], ["real0", "real1"], ("test",))
    assert images == ["i0", "i1", "i2"]                                # columns by image id, rows by pair
    np.testing.assert_array_equal(a, [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(r, [[1, 0, 1], [0, 1, 1]])
    _, _, none = correctness_matrices(pred, ["aug0"], ["missing"], ("test",))
    assert none == []
