"""Helpers for the classifier tests: a tiny run dir of shape-per-class PNGs with a manifest and a
synthetic manifest in the formats the prepare and generate stages write (written here, so these
tests need neither). A uniquely named module, not conftest, so `import` finds it unambiguously."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CLASSES = ["benign", "malignant", "normal"]



def _shape_image(label: int, rng: np.random.Generator, size: int, shift: int = 0) -> np.ndarray:
    """benign: a bright disc; malignant: a bright cross; normal: noise only. `shift` darkens (a style)."""
    img = rng.normal(60, 12, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    r = size // 5
    if label == 0:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 140
    elif label == 1:
        img[(abs(yy - cy) <= r // 3) & (abs(xx - cx) <= r)] += 140
        img[(abs(xx - cx) <= r // 3) & (abs(yy - cy) <= r)] += 140
    return np.clip(img - shift, 0, 255).astype(np.uint8)


def write_tiny_run(root: Path, *, folds: int = 2, train_per_class: int = 8, test_per_class: int = 3,
                   external_per_class: int = 3, adjectives=("", "dark"), max_ratio: float = 1.0,
                   shared_adapter: bool = False, size: int = 40, seed: int = 0, overlap_external: int = 0,
                   colour_synthetic: bool = False) -> dict:
    """Write <root>/images/*.png, <root>/run/data/manifest.parquet and
    <root>/run/synthetic/manifest.parquet; returns {"run_dir", "manifest", "synthetic"}. The first
    `overlap_external` Dataset B images are marked a_overlap (copies of A images, as prepare flags them);
    `colour_synthetic` tints synthetic images red (grey content otherwise, as real ones)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(split, label, fold, i, dataset="A"):
        image_id = f"{dataset}-{split}-{CLASSES[label]}-{i}"
        path = img_dir / f"{image_id}.png"
        Image.fromarray(_shape_image(label, rng, size)).save(path)
        rows.append(dict(image_id=image_id, path=str(path), dataset=dataset, class_name=CLASSES[label], label=label,
                         split=split, fold=fold, group_id=image_id, sha256="", width=size, height=size,
                         a_overlap=dataset == "B" and i < overlap_external))

    for label in range(3):
        for i in range(train_per_class):
            add("train", label, i % folds, i)
        for i in range(test_per_class):
            add("test", label, -1, i)
    for label in (0, 1):  # Dataset B lacks the normal class, like Kaggle's
        for i in range(external_per_class):
            add("external", label, -1, i, dataset="B")
    manifest = pd.DataFrame(rows)
    run_dir = root / "run"
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(run_dir / "data" / "manifest.parquet", index=False)

    syn = []
    syn_dir = run_dir / "synthetic"
    for fold in ([-1] if shared_adapter else range(folds)):
        for adjective in adjectives:
            for label in range(3):
                if fold >= 0:
                    n_real = int(((manifest.split == "train") & (manifest.fold != fold) & (manifest.label == label)).sum())
                else:
                    n_real = int(((manifest.split == "train") & (manifest.label == label)).sum())
                for index in range(int(round(max_ratio * n_real))):
                    image_id = f"syn-f{fold}-{adjective or 'none'}-{CLASSES[label]}-{index}"
                    path = syn_dir / f"{image_id}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    grey = _shape_image(label, rng, size, shift=30 if adjective == "dark" else 0)
                    if colour_synthetic:  # red tint: R kept, G and B dimmed
                        grey = np.stack([grey, grey // 2, grey // 3], axis=-1)
                    Image.fromarray(grey).save(path)
                    syn.append(dict(image_id=image_id, path=str(path), fold=fold, adjective=adjective,
                                    class_name=CLASSES[label], label=label, index=index, seed=index, prompt="",
                                    adapter="all" if fold < 0 else f"fold-{fold}", steps=1, guidance=1.0,
                                    width=size, height=size))
    synthetic = pd.DataFrame(syn)
    synthetic.to_parquet(syn_dir / "manifest.parquet", index=False)
    return {"run_dir": str(run_dir), "manifest": manifest, "synthetic": synthetic}


def tiny_overrides(run_dir: str, **extra) -> list[str]:
    base = {
        "run_dir": run_dir, "data.folds": 2, "data.image_size": 32, "data.classes": "[benign, malignant, normal]",
        "generate.adjectives": '["", dark]', "generate.ratios": "[0.5, 1.0]",
        "classify.models": "[squeezenet1_1]", "classify.pretrained": "none", "classify.epochs": 2,
        "classify.per_model": "{}",  # the demo's own SqueezeNet schedule (16 epochs) off: tests train classify.epochs
        "classify.batch_size": 8, "classify.checkpoint_seconds": 0, "classify.cpus_per_trial": 1,
        "classify.threads_per_trial": 1, "classify.max_failures": 0, "classify.save_models": "fold0", "classify.max_concurrent_trials": 1,
        "classify.controls": "[]",  # the demo's controls double the grid; tests that need them ask for them
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
