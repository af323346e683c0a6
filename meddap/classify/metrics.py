"""Classification metrics over a fixed class list, including evaluation sets that lack some classes.

Definitions (K = len(classes); labels and predictions are indices into `classes`):
- confusion matrix: K x K, rows = true class, columns = predicted class, over the FULL class list.
- accuracy: share of images whose prediction equals the label.
- per class c, from the full confusion matrix: TP = C[c, c], FN = row sum - TP, FP = column sum - TP,
  TN = everything else. sensitivity (recall) = TP / (TP + FN); specificity = TN / (TN + FP);
  precision = TP / (TP + FP); F1 = 2 P R / (P + R). A 0/0 counts as 0 (scikit-learn's zero_division=0).
- macro averages are taken over the classes PRESENT in the evaluation labels only.

Dataset B (benign + malignant, no normal): the macro averages run over benign and malignant; a
prediction of "normal" is still a prediction, so it is wrong: it lowers accuracy and the true class's
sensitivity, and counts as a true negative for the other present class (it was not predicted as that
class). This equals scikit-learn's `recall/precision/f1_score(labels=<present>, average="macro")` and
the specificity from `multilabel_confusion_matrix(labels=<present>)`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["confusion_matrix", "classification_metrics", "METRIC_NAMES"]

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1")


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and preds {p.shape} differ in shape")
    for what, a in (("labels", y), ("preds", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{what} hold class indices outside [0, {num_classes})")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(labels: Sequence[int], preds: Sequence[int], classes: Sequence[str]) -> dict:
    """accuracy and macro sensitivity/specificity/precision/F1 (fractions) over the classes present in
    `labels`, plus `confusion` (K x K list), `per_class` ({class: {...}} for present classes), `n`, `present`."""
    k = len(classes)
    cm = confusion_matrix(labels, preds, k)
    n = int(cm.sum())
    if n == 0:
        raise ValueError("classification_metrics: empty evaluation set")
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = n - tp - fn - fp
    sens, spec, prec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp), _safe_div(tp, tp + fp)
    f1 = _safe_div(2 * prec * sens, prec + sens)
    present = np.flatnonzero(cm.sum(axis=1) > 0)
    out = {
        "accuracy": float(tp.sum() / n),
        "sensitivity": float(sens[present].mean()),
        "specificity": float(spec[present].mean()),
        "precision": float(prec[present].mean()),
        "f1": float(f1[present].mean()),
        "n": n,
        "present": [classes[i] for i in present],
        "confusion": cm.tolist(),
        "per_class": {classes[i]: {"sensitivity": float(sens[i]), "specificity": float(spec[i]),
                                   "precision": float(prec[i]), "f1": float(f1[i]), "support": int(cm[i].sum())}
                      for i in present},
    }
    return out
