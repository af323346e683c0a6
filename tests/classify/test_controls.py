"""Controls: the adjective -> classical transform mapping changes pixels the way the adjective says, and
control draws have the synthetic counts per class, from the fold's training images only."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from meddap.classify import controls as C
from meddap.diffusion.plan import real_train_counts, source_sequence, synthetic_count

CLASSES = ["benign", "malignant", "normal"]
# Rows per (fold, class) of split "train"; fold k trains on the other folds' rows.
TRAIN = {(0, "benign"): 5, (0, "malignant"): 3, (0, "normal"): 1,
         (1, "benign"): 4, (1, "malignant"): 2, (1, "normal"): 2,
         (2, "benign"): 6, (2, "malignant"): 1, (2, "normal"): 3}


def _manifest() -> pd.DataFrame:
    rows = []
    for (fold, c), n in TRAIN.items():
        for i in range(n):
            rows.append({"image_id": f"A-{c}-{fold}-{i}", "path": f"/data/{c}/{fold}-{i}.png", "class_name": c,
                         "label": CLASSES.index(c), "split": "train", "fold": fold})
    for split in ("test", "external"):
        for c in CLASSES:
            for i in range(3):
                rows.append({"image_id": f"{split}-{c}-{i}", "path": f"/data/{split}/{c}-{i}.png", "class_name": c,
                             "label": CLASSES.index(c), "split": split, "fold": -1})
    return pd.DataFrame(rows)


def _ramp(channels: int = 1, size: int = 32) -> np.ndarray:
    """(C, S, S) uint8 with every grey level 30..225 present: a horizontal ramp."""
    row = np.linspace(30, 225, size).round().astype(np.uint8)
    return np.broadcast_to(row, (channels, size, size)).copy()


SEEDS = range(6)


# ---------------------------------------------------------------------------------------------
# The mapping
# ---------------------------------------------------------------------------------------------
def test_every_paper_adjective_is_mapped_as_documented():
    from meddap.config import PAPER_ADJECTIVES

    expected = {"bright": "brightness_up", "dark": "brightness_down", "high-contrast": "contrast_up",
                "low-contrast": "contrast_down", "posterized": "posterize", "solarized": "solarize",
                "sheared": "shear", "colorful": "color_jitter", "stylized": None, "": None}
    assert {a: C.classical_name(a) for a in PAPER_ADJECTIVES} == expected
    assert C.classical_name("High Contrast") == "contrast_up" and C.classical_name(" low_contrast ") == "contrast_down"
    assert C.classical_name("blurry") is None                       # unknown: no twin, never a guess
    assert C.unmapped_adjectives(["", "stylized", "bright", "blurry"]) == ["blurry"]


@pytest.mark.parametrize("seed", SEEDS)
def test_bright_raises_and_dark_lowers_the_mean(seed):
    x = _ramp()
    bright, dark = C.classical_image(x, "bright", seed), C.classical_image(x, "dark", seed)
    assert bright.shape == x.shape and bright.dtype == np.uint8
    assert bright.mean() > x.mean() * 1.15 and dark.mean() < x.mean() * 0.85
    assert (bright >= x).all() and (dark <= x).all()                  # multiplicative: every pixel moves one way


@pytest.mark.parametrize("seed", SEEDS)
def test_contrast_spreads_or_squeezes_the_grey_levels(seed):
    x = _ramp()
    hi, lo = C.classical_image(x, "high-contrast", seed), C.classical_image(x, "low-contrast", seed)
    assert hi.std() > x.std() * 1.2 and lo.std() < x.std() * 0.75
    assert abs(float(lo.mean()) - float(x.mean())) < 2                # about the mean grey


@pytest.mark.parametrize("seed", SEEDS)
def test_posterize_keeps_few_levels(seed):
    x = _ramp(size=64)
    bits = C.draw_params("posterize", C.control_seed(0, 0, "posterized", "benign", seed))["bits"]
    y = C.classical_image(x, "posterized", C.control_seed(0, 0, "posterized", "benign", seed))
    assert bits in (2, 3)
    assert len(np.unique(y)) <= 2 ** bits < len(np.unique(x))
    assert (y % 2 ** (8 - bits) == 0).all() and (y <= x).all()       # the low bits are cleared


@pytest.mark.parametrize("seed", SEEDS)
def test_solarize_inverts_exactly_the_pixels_at_or_above_the_threshold(seed):
    x = _ramp(size=64)
    t = C.draw_params("solarize", seed)["threshold"]
    y = C.classical_image(x, "solarized", seed)
    above = x >= t
    assert 96 <= t <= 160 and above.any() and (~above).any()
    assert (y[above] == 255 - x[above]).all() and (y[~above] == x[~above]).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_shear_slants_a_vertical_line_by_tan_of_the_angle(seed):
    size = 41
    x = np.zeros((1, size, size), np.uint8)
    x[0, :, size // 2] = 255
    deg = C.draw_params("shear", seed)["degrees"]
    y = C.classical_image(x, "sheared", seed).astype(np.float64)[0]
    assert 10 <= abs(deg) <= 25
    cols = np.arange(size)
    for r in (5, 20, 35):                                              # centroid of the line in that row
        centre = (y[r] * cols).sum() / y[r].sum()
        expected = size // 2 - math.tan(math.radians(deg)) * (r - size // 2)
        assert centre == pytest.approx(expected, abs=0.6)


def test_colour_jitter_moves_grey_levels_and_hue():
    x = _ramp()
    assert any(not np.array_equal(C.classical_image(x, "colorful", s), x) for s in SEEDS)
    assert C.classical_image(x, "colorful", 0).shape == (1, 32, 32)    # grey stays grey
    red = np.zeros((3, 16, 16), np.uint8)
    red[0] = 200
    seed = next(s for s in range(100) if abs(C.draw_params("color_jitter", s)["hue"]) > 0.1)
    y = C.classical_image(red, "colorful", seed).reshape(3, -1).mean(1)
    assert y[1] > 20 or y[2] > 20                                      # no longer pure red: the hue turned


def test_no_twin_is_an_unchanged_copy_and_draws_are_deterministic():
    x = _ramp(3)
    for adjective in ("", "stylized", "blurry"):
        y = C.classical_image(x, adjective, 3)
        assert np.array_equal(y, x) and y is not x
    batch = np.stack([_ramp(), 255 - _ramp()])                         # (2, 1, S, S): the sweep's layout
    a = C.classical_images(batch, "dark", [11, 12])
    assert a.shape == batch.shape and np.array_equal(a, C.classical_images(batch, "dark", [11, 12]))
    assert np.array_equal(a[1], C.classical_image(batch[1], "dark", 12))
    assert C.draw_params("shear", 5) == C.draw_params("shear", 5) != C.draw_params("shear", 6)
    with pytest.raises(ValueError, match="uint8"):
        C.classical_image(x.astype(np.float32), "dark", 0)


# ---------------------------------------------------------------------------------------------
# Control draws
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("fold", [0, 1, 2])
def test_control_counts_equal_the_synthetic_counts_and_sources_are_training_images(fold, ratio):
    m = _manifest()
    n_real = real_train_counts(m, CLASSES)
    train_ids = set(m.loc[(m.split == "train") & (m.fold != fold), "image_id"])
    for control, adjective in (("duplicate", None), ("classical", "bright"), ("classical", "stylized")):
        rows = C.control_rows(m, CLASSES, fold, ratio, control, run_seed=7, adjective=adjective)
        per_class = rows["class_name"].value_counts()
        for c in CLASSES:
            assert per_class.get(c, 0) == synthetic_count(n_real[(fold, c)], ratio)
        assert set(rows["source_image_id"]) <= train_ids                # never validation, test or external
        src = m.set_index("image_id").loc[rows["source_image_id"]]
        assert (src["class_name"].to_numpy() == rows["class_name"].to_numpy()).all()
        assert (src["path"].to_numpy() == rows["path"].to_numpy()).all()
        assert rows["image_id"].is_unique and list(rows.columns) == C.CONTROL_COLUMNS
        for c, g in rows.groupby("class_name"):                         # balanced: each image floor or ceil times
            times = g["source_image_id"].value_counts()
            m_c = n_real[(fold, c)]
            assert times.max() - (times.min() if len(times) == m_c else 0) <= 1
    assert set(C.control_rows(m, CLASSES, fold, ratio, "classical", 7, "bright")["transform"]) <= {"brightness_up"}
    assert set(C.control_rows(m, CLASSES, fold, ratio, "classical", 7, "stylized")["transform"]) <= {""}


def test_controls_are_nested_paired_and_match_the_img2img_sources():
    m = _manifest()
    small = C.control_rows(m, CLASSES, 1, 0.5, "duplicate", 7)
    big = C.control_rows(m, CLASSES, 1, 2.0, "duplicate", 7)
    classical = C.control_rows(m, CLASSES, 1, 2.0, "classical", 7, "dark")
    for c in CLASSES:
        s, b = small[small.class_name == c], big[big.class_name == c]
        assert list(b["source_image_id"].iloc[:len(s)]) == list(s["source_image_id"])   # nested prefix
        assert list(classical.loc[classical.class_name == c, "source_image_id"]) == list(b["source_image_id"])
        pool = m[(m.split == "train") & (m.fold != 1) & (m.class_name == c)]["image_id"]
        assert list(b["source_image_id"]) == source_sequence(pool, len(b), 7, 1, c)    # img2img's draw
    assert C.control_rows(m, CLASSES, 1, 2.0, "classical", 7, "dark").equals(classical)  # deterministic
    other = C.control_rows(m, CLASSES, 1, 2.0, "classical", 8, "dark")
    assert not other["seed"].equals(classical["seed"])
    with pytest.raises(ValueError, match="adjective"):
        C.control_rows(m, CLASSES, 1, 1.0, "classical", 7)
    with pytest.raises(ValueError, match="duplicate"):
        C.control_rows(m, CLASSES, 1, 1.0, "mixup", 7)
