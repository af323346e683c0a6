"""Toy images and a manifest for the diffusion tests (the prepare stage is tested elsewhere)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

CLASSES = ["benign", "malignant", "normal"]


def write_toy_manifest(folder: Path, n_train: int = 10, n_test: int = 2, folds: int = 2, size: int = 72) -> pd.DataFrame:
    """PNGs of a bright blob on speckle, one class each in turn, and a manifest with the prepare
    contract's columns: train rows spread over `folds` folds, test rows with fold -1."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_test):
        c = CLASSES[i % len(CLASSES)]
        a = (rng.random((size, size)) * 80).astype(np.uint8)
        a[size // 4: size // 4 + 30, 8 + i: 38 + i] = 160 + 30 * (i % 3)
        p = folder / f"{c} ({i}).png"
        Image.fromarray(a).save(p)
        split = "train" if i < n_train else "test"
        rows.append(dict(image_id=f"A/{c}/{i}", path=str(p), dataset="A", class_name=c, label=CLASSES.index(c),
                         split=split, fold=(i % folds) if split == "train" else -1, group_id=f"A/{c}/{i}",
                         sha256=hashlib.sha256(a.tobytes()).hexdigest(), width=size, height=size))
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def toy_manifest(tmp_path_factory) -> pd.DataFrame:
    return write_toy_manifest(tmp_path_factory.mktemp("toy-images"))
