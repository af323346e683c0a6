"""Metrics against scikit-learn on the same predictions (3 classes, and Dataset B's 2 classes)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from meddap.classify.metrics import classification_metrics, confusion_matrix

CLASSES = ["benign", "malignant", "normal"]


def _sklearn(labels, preds, present):
    mcm = skm.multilabel_confusion_matrix(labels, preds, labels=present)  # (C, 2, 2): [[tn, fp], [fn, tp]]
    spec = [tn / (tn + fp) if tn + fp else 0.0 for (tn, fp), _ in mcm]
    kw = dict(labels=present, average="macro", zero_division=0)
    return {"accuracy": skm.accuracy_score(labels, preds), "sensitivity": skm.recall_score(labels, preds, **kw),
            "specificity": float(np.mean(spec)), "precision": skm.precision_score(labels, preds, **kw),
            "f1": skm.f1_score(labels, preds, **kw)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_classes_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    ours = classification_metrics(labels, preds, CLASSES)
    for k, v in _sklearn(labels, preds, [0, 1, 2]).items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    np.testing.assert_array_equal(ours["confusion"], skm.confusion_matrix(labels, preds, labels=[0, 1, 2]))
    assert ours["present"] == CLASSES and ours["n"] == 200


@pytest.mark.parametrize("seed", [0, 3])
def test_dataset_b_two_classes_match_sklearn(seed):
    """Labels only benign/malignant; the model may still predict 'normal', which is wrong."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    preds = np.where(rng.random(150) < 0.5, labels, rng.integers(0, 3, 150))
    assert (preds == 2).any()
    ours = classification_metrics(labels, preds, CLASSES)
    for k, v in _sklearn(labels, preds, [0, 1]).items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    assert ours["present"] == ["benign", "malignant"]
    assert np.asarray(ours["confusion"]).shape == (3, 3)


def test_dataset_b_by_hand():
    # benign: 2 images, one predicted normal (wrong); malignant: 2 images, both right.
    m = classification_metrics([0, 0, 1, 1], [0, 2, 1, 1], CLASSES)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["specificity"] == pytest.approx((1.0 + 1.0) / 2)   # the 'normal' prediction is not a malignant FP
    assert m["precision"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_never_predicted_class_counts_zero_precision():
    m = classification_metrics([0, 1, 2], [0, 0, 0], CLASSES)
    assert m["per_class"]["malignant"]["precision"] == 0.0
    assert m["precision"] == pytest.approx((1 / 3) / 3)


def test_rejects_out_of_range_and_empty():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        classification_metrics([], [], CLASSES)
