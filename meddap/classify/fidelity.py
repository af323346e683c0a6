"""Label fidelity of synthetic images, and the rule that decides which ones an augmented trial uses.

Fidelity of a synthetic image = the probability a classifier trained on real images only (fold k's
real-only trial, the judge) gives to the class the image was prompted for. A "malignant" image the
judge calls benign with 0.9 has fidelity 0.1: it may teach the wrong label.

`filter_synthetic(pool, need, method, value)` picks, per class, the images a trial uses:
  - `none`: the first `need` by index (what the grid does without a gate);
  - `threshold` (value t in [0, 1]): images with fidelity >= t, the first `need` of them by index;
  - `drop_lowest` (value p in [0, 1)): the class's floor(p x N) lowest-fidelity images (N generated,
    ties broken by index) are dropped, then the first `need` of the rest by index.
Both gates decide per image, independently of the ratio, so the kept set of a smaller ratio is a
prefix of a larger ratio's (nested, as without a gate), and the counts still equal the ratio's: the
places of dropped images are filled from the next indexes, including the spares generation makes with
`generate.filter_overgenerate` (ceil(s x n_top) per class). drop_lowest p always fits the largest ratio
when s >= p / (1 - p) (`spares_needed`); a threshold that keeps too few is a clear error naming the
class, the counts and the fixes, never a silent shortfall.

Plain numpy / PyTorch / pandas: no Ray, no run directory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch is imported where images are scored: config validation uses check_filter without it
    import torch
    import torch.nn as nn

from meddap.errors import MeddapError

__all__ = ["FILTERS", "prompted_probability", "fidelity_scores", "kept_mask", "filter_synthetic", "spares_needed",
           "check_filter"]

FILTERS = ("none", "threshold", "drop_lowest")


def prompted_probability(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) probs[i, labels[i]] of (N, K) class probabilities: each image's probability of its prompted class."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"need (N, K) probabilities and (N,) labels, got {p.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got {y.min()}..{y.max()}")
    return p[np.arange(len(y)), y]


def fidelity_scores(model: nn.Module, images: torch.Tensor | np.ndarray, labels, batch_size: int = 64,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """(N,) fidelity of (N, 1, S, S) uint8 images (the sweep's decoded arrays) prompted for `labels`,
    scored by `model` exactly as a trial evaluates (`meddap.classify.trial.predict`: eval mode, the
    trial's normalisation, softmax)."""
    import torch

    from meddap.classify.trial import predict

    x = torch.as_tensor(images)
    if len(x) == 0:
        return np.zeros(0)
    probs = predict(model, x, batch_size, torch.device(device))          # (N, K)
    return prompted_probability(probs, np.asarray(labels))


def check_filter(method: str, value: float) -> None:
    """ValueError naming what is allowed for a filter method and its value."""
    if method not in FILTERS:
        raise ValueError(f"filter {method!r}: expected one of {', '.join(FILTERS)}")
    if method == "threshold" and not 0.0 <= value <= 1.0:
        raise ValueError(f"a threshold filter's value is a probability in [0, 1], got {value!r}")
    if method == "drop_lowest" and not 0.0 <= value < 1.0:
        raise ValueError(f"a drop_lowest filter's value is the share dropped, in [0, 1), got {value!r}")


def spares_needed(method: str, value: float) -> float:
    """The smallest generate.filter_overgenerate share with which `drop_lowest` always fills the largest
    ratio (p / (1 - p)); 0 for none; for a threshold no share guarantees it (it depends on the scores)."""
    check_filter(method, value)
    return value / (1.0 - value) if method == "drop_lowest" else 0.0


def kept_mask(rows: pd.DataFrame, method: str, value: float) -> np.ndarray:
    """(len(rows),) bool: which images of ONE class's pool the gate keeps (order of `rows`)."""
    check_filter(method, value)
    if method == "none":
        return np.ones(len(rows), dtype=bool)
    fid = pd.to_numeric(rows["fidelity"], errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(fid).any():
        missing = rows.loc[np.isnan(fid), "image_id"].astype(str).tolist()
        raise MeddapError(f"{len(missing)} synthetic image(s) have no fidelity score (e.g. {missing[:3]}): the "
                          f"label-fidelity gate needs every image of the pool scored by the fold's real-only judge.")
    if method == "threshold":
        return fid >= value
    drop = int(math.floor(value * len(rows) + 1e-9))
    order = np.lexsort((rows["index"].to_numpy(), fid))                  # lowest fidelity first, then index
    keep = np.ones(len(rows), dtype=bool)
    keep[order[:drop]] = False
    return keep


def filter_synthetic(pool: pd.DataFrame, need: Mapping[str, int], method: str = "none",
                     value: float = 0.0) -> pd.DataFrame:
    """Rows of `pool` (one fold's synthetic images of one adjective: class_name, index, image_id and,
    for a gate, fidelity) a trial uses: per class in `need`, exactly need[class] images, the first
    kept ones by index (module docstring). MeddapError when a class keeps too few."""
    parts = []
    for c, n in need.items():
        rows = pool[pool["class_name"] == c].sort_values("index")
        keep = kept_mask(rows, method, value)
        chosen = rows[keep].iloc[:n]
        if len(chosen) < n:
            fixes = ("generate more spares (raise generate.filter_overgenerate)" if method != "threshold" else
                     "lower the threshold or raise generate.filter_overgenerate")
            raise MeddapError(
                f"the {method} filter ({value:g}) keeps {int(keep.sum())} of the {len(rows)} synthetic '{c}' images "
                f"generated, and the trial needs {n}: {fixes}, then rerun generate and the sweep.")
        parts.append(chosen)
    return pd.concat(parts) if parts else pool.iloc[:0]
