"""Fixtures for the generate tests: a run dir with a small data manifest and per-fold LoRA adapters
on the tiny SD (random lora_B so each adapter visibly changes the images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

# Train rows per (fold, class). Fold k trains on the other fold's rows:
# fold 0 -> benign 2, malignant 2, normal 2; fold 1 -> benign 3, malignant 2, normal 1.
TRAIN_ROWS = {(0, "benign"): 3, (0, "malignant"): 2, (0, "normal"): 1,
              (1, "benign"): 2, (1, "malignant"): 2, (1, "normal"): 2}
CLASSES = ["benign", "malignant", "normal"]


def data_manifest() -> pd.DataFrame:
    rows = []
    for (fold, c), n in TRAIN_ROWS.items():
        for i in range(n):
            rows.append({"image_id": f"A-{c}-{fold}-{i}", "path": f"/nowhere/{c}/{fold}-{i}.png", "dataset": "A",
                         "class_name": c, "label": CLASSES.index(c), "split": "train", "fold": fold,
                         "group_id": f"{c}-{fold}-{i}", "sha256": "0", "width": 32, "height": 32})
    for c in CLASSES:  # test rows never count
        rows.append({"image_id": f"A-{c}-test", "path": f"/nowhere/{c}/t.png", "dataset": "A", "class_name": c,
                     "label": CLASSES.index(c), "split": "test", "fold": -1, "group_id": f"{c}-t",
                     "sha256": "0", "width": 32, "height": 32})
    return pd.DataFrame(rows)


def make_adapter(model_dir: str, out_dir: str | Path, seed: int, fold: int, rank: int = 4,
                 b_scale: float = 1.0) -> None:
    """A diffusers-format LoRA on the tiny UNet's attn2 q/k/v/out with random B (a fresh LoRA has B = 0)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from meddap.diffusion.base import load_pipeline

    unet = load_pipeline(model_dir).unet
    torch.manual_seed(seed)  # peft's kaiming init of A: same seed, same A
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * b_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=get_peft_model_state_dict(unet))
    (out_dir / "adapter.json").write_text(json.dumps({"base_model": model_dir, "rank": rank, "alpha": rank,
                                                      "fold": fold, "per_fold": True}))


@pytest.fixture(scope="session")
def gen_template(tiny_sd_dir, tmp_path_factory) -> Path:
    """A run dir holding data/manifest.parquet and adapters/fold-{0,1}/ (copied per test)."""
    import torch

    # One thread: on a shared 2-core box two OpenMP threads spin-wait for each other and a tiny
    # model's CPU time grows tens of times (measured here: 0.11 s -> 7.3 s per image).
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen-template")
    (root / "data").mkdir()
    data_manifest().to_parquet(root / "data" / "manifest.parquet", index=False)
    for fold in (0, 1):
        make_adapter(tiny_sd_dir, root / "adapters" / f"fold-{fold}", seed=10 + fold, fold=fold)
    return root


def make_cfg(run_dir, model: str, *overrides: str):
    from meddap.config import load_config

    # The tiny SD's plumbing settings: guidance 7.5 as the core references below, Inception FID (the demo's
    # phantom-judge features live beside builtin:phantom only).
    return load_config("demo", [f"run_dir={run_dir}", f"diffusion.base_model={model}", "diffusion.resolution=32",
                                "generate.guidance_scale=7.5", "fid.features=inception", "fid.judge=null",
                                "generate.adjectives=['', bright]", "generate.ratios=[0.5, 1.0]",
                                "generate.steps=2", "generate.batch_size=4", "generate.workers=2",
                                "generate.cpus_per_worker=0.5", "report.contact_sheet_per_cell=2", *overrides])


@pytest.fixture
def run_dir(gen_template, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(gen_template, dst)
    return dst
