"""Base models: the tiny SD round-trips through diffusers' loaders; SD-1.4 configs have SD-1.4's size;
missing weights give a MeddapError that says how to provide them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from meddap.config import load_config
from meddap.diffusion import base
from meddap.errors import MeddapError


def test_tiny_sd_is_a_normal_diffusers_folder(tiny_sd_dir):
    folder = Path(tiny_sd_dir)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"][1] == "UNet2DConditionModel"
    assert index["vae"][1] == "AutoencoderKL"
    assert index["text_encoder"][1] == "CLIPTextModel"
    assert index["tokenizer"][1] == "CLIPTokenizer"
    assert index["scheduler"][1] == "PNDMScheduler"
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 20e6  # "a few MB"


def test_tiny_sd_loads_and_generates(tiny_sd_dir):
    torch.set_num_threads(1)  # 1 thread: teammates share the 2 cores; 2 threads thrash under load
    pipe = base.load_pipeline(tiny_sd_dir)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8  # same latent geometry as SD
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert any(n.endswith("attn2.to_q") for n, _ in pipe.unet.named_modules())
    ids = pipe.tokenizer("ultrasound image of no tumor in the breast").input_ids
    unk = pipe.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert unk not in ids[1:-1]  # every character of a prompt is in the local vocabulary
    out = pipe("ultrasound image of benign tumor in the breast", num_inference_steps=3, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_build_tiny_is_idempotent_and_seeded(tiny_sd_dir, tmp_path):
    stamp = os.path.getmtime(Path(tiny_sd_dir) / "model_index.json")
    assert base.build_tiny_sd(tiny_sd_dir) == str(tiny_sd_dir)
    assert os.path.getmtime(Path(tiny_sd_dir) / "model_index.json") == stamp  # not rebuilt
    other = base.build_tiny_sd(tmp_path / "again")
    a = (Path(tiny_sd_dir) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (Path(other) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b  # seeded: every build is the same model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_resolve_base_model(tmp_path, tiny_sd_dir):
    cfg = load_config("demo", [f"run_dir={tmp_path / 'run'}", "diffusion.base_model=builtin:tiny",
                               "fid.features=inception", "fid.judge=null"])
    got = base.resolve_base_model(cfg)
    assert Path(got) == (tmp_path / "run" / "models" / "tiny-sd").absolute()
    assert (Path(got) / "model_index.json").is_file()
    cfg = load_config("demo", [f"diffusion.base_model={tiny_sd_dir}"])
    assert base.resolve_base_model(cfg) == str(tiny_sd_dir)
    cfg = load_config("demo", ["diffusion.base_model=CompVis/stable-diffusion-v1-4"])
    assert base.resolve_base_model(cfg) == "CompVis/stable-diffusion-v1-4"


def test_load_components(tiny_sd_dir):
    c = base.load_components(tiny_sd_dir)
    assert set(c) == {"unet", "vae", "text_encoder", "tokenizer", "noise_scheduler"}
    assert type(c["noise_scheduler"]).__name__ == "DDPMScheduler"
    assert c["noise_scheduler"].config.num_train_timesteps == 1000


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MeddapError, match="does not exist.*diffusion.base_model"):
        base.load_pipeline(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeddapError, match="not a diffusers folder"):
        base.load_components(str(tmp_path / "empty"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MeddapError, match=r"CompVis/stable-diffusion-v1-4.*HF_HOME.*HF_HUB_OFFLINE=1"):
        base.load_pipeline("CompVis/stable-diffusion-v1-4")
    with pytest.raises(MeddapError, match="CompVis/stable-diffusion-v1-4"):
        base.load_components("CompVis/stable-diffusion-v1-4")


def test_unresolvable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    """No network and no HF_HUB_OFFLINE: the clear error comes at once, not after the hub client's retries."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.meddap-test.invalid")  # .invalid never resolves
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(MeddapError, match=r"cannot be reached.*HF_HOME"):
        base.check_base_model("CompVis/stable-diffusion-v1-4")
    assert time.perf_counter() - t0 < 10


def test_sd14_shapes_from_shipped_configs():
    # Built on the meta device: shapes and counts without allocating SD's 3.4 GB of weights.
    unet = base.build_sd14_unet("meta")
    n = sum(p.numel() for p in unet.parameters())
    assert n == pytest.approx(859.5e6, rel=1e-3)
    assert unet.config.cross_attention_dim == 768
    vae = base.build_sd14_vae("meta")
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(83.65e6, rel=1e-3)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    te = base.build_sd14_text_encoder("meta")
    assert sum(p.numel() for p in te.parameters()) == pytest.approx(123.06e6, rel=1e-3)
    assert base.build_sd14_scheduler().config.prediction_type == "epsilon"
