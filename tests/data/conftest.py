"""Builders of small on-disk datasets for the data-layer tests (BUSI-like, Kaggle-like, nasty files)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def pattern(seed: int, size: int = 48) -> np.ndarray:
    """(size, size) uint8 image with seed-specific low-frequency structure, so perceptual hashes of
    different seeds are far apart (unlike pure noise, whose hashes are all alike after blurring)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-3, 4, img.shape)  # a little texture
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def save_rgb(path: Path, grey: np.ndarray) -> Path:
    """Stored as RGB though grey, as BUSI ships its PNGs."""
    return save(path, np.stack([grey] * 3, axis=-1))


def busi_tree(root: Path, per_class: dict[str, int], size: int = 48, seed0: int = 0, masks: bool = True,
              name_fmt: str = "{cls} ({i})") -> dict[str, list[Path]]:
    """root/<class>/<class> (i).png (+ _mask.png, and _mask_1.png on every third)."""
    out: dict[str, list[Path]] = {}
    seed = seed0
    for cls, n in per_class.items():
        out[cls] = []
        for i in range(1, n + 1):
            seed += 1
            stem = name_fmt.format(cls=cls, i=i)
            out[cls].append(save_rgb(root / cls / f"{stem}.png", pattern(seed, size)))
            if masks:
                save(root / cls / f"{stem}_mask.png", np.zeros((size, size), np.uint8))
                if i % 3 == 0:
                    save(root / cls / f"{stem}_mask_1.png", np.full((size, size), 255, np.uint8))
    return out


def truncated_png(path: Path, seed: int = 999) -> Path:
    save(path, pattern(seed))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def builders():
    return SimpleNamespace(pattern=pattern, save=save, save_rgb=save_rgb, busi_tree=busi_tree,
                           truncated_png=truncated_png)
