"""SD-1.4 as users bring it: a diffusers folder (test_base.py), the Hugging Face hub cache (with or
without the safety checker and feature extractor, fp16 variant files only) and the original
single-file checkpoint, each a random-weight stand-in in the exact layout, loaded by the code the
stages run (check_base_model, load_pipeline, load_components, SyntheticGenerator)."""

from __future__ import annotations

import shutil

import pytest
import torch

from ._published_sd import REPO, hub_cache, ldm_state_dict, write_single_file
from meddap.diffusion import base
from meddap.errors import MeddapError


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub (and so diffusers) reads, offline like this machine."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))  # what HF_HOME=... sets at start-up
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def tiny_state(tiny_sd_dir):
    parts = base.load_components(tiny_sd_dir)
    return {k: {n: t.clone() for n, t in parts[k].state_dict().items()} for k in ("unet", "vae", "text_encoder")}


def _same(module, reference: dict, cast=None) -> None:
    got = module.state_dict()
    assert set(reference) <= set(got)
    for k, v in reference.items():
        want = v.to(cast).to(v.dtype) if cast is not None else v
        assert torch.equal(got[k].to(v.dtype), want), k


@pytest.mark.parametrize("safety", [True, False], ids=["with-safety-checker", "without-safety-checker"])
def test_hub_cache_snapshot_loads_offline(hf_cache, tiny_sd_dir, tiny_state, safety):
    """A download of CompVis/stable-diffusion-v1-4 in the hub cache: its model_index.json names the safety
    checker and feature extractor; without their folders (a common 1.2 GB saving) it loads all the same."""
    snapshot = hub_cache(hf_cache, tiny_sd_dir, safety=safety)
    assert (snapshot / "safety_checker").is_dir() == safety and (snapshot / "unet").is_symlink() is False
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    base.check_base_model(REPO)
    pipe = base.load_pipeline(REPO)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(pipe, part), tiny_state[part])
    parts = base.load_components(REPO)
    _same(parts["unet"], tiny_state["unet"])
    assert type(parts["noise_scheduler"]).__name__ == "DDPMScheduler"
    assert base.count_unet_parameters(REPO) == sum(v.numel() for v in tiny_state["unet"].values())


def test_hub_cache_with_only_fp16_variant_files(hf_cache, tiny_sd_dir, tiny_state):
    """`from_pretrained(..., variant="fp16")` downloads only `*.fp16.safetensors`: loaded as that variant."""
    snapshot = hub_cache(hf_cache, tiny_sd_dir, variant="fp16")
    assert (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (snapshot / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (snapshot / "text_encoder" / "model.fp16.safetensors").exists()
    base.check_base_model(REPO)
    pipe = base.load_pipeline(REPO)  # fp32 pipeline on the CPU from fp16 files
    assert pipe.unet.dtype == torch.float32
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(pipe, part), tiny_state[part], cast=torch.float16)
    _same(base.load_components(REPO)["vae"], tiny_state["vae"], cast=torch.float16)


def test_incomplete_snapshot_says_what_is_missing(hf_cache, tiny_sd_dir):
    snapshot = hub_cache(hf_cache, tiny_sd_dir)
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MeddapError, match=r"no weights for unet.*huggingface-cli download"):
        base.check_base_model(REPO)
    shutil.rmtree(snapshot / "tokenizer")
    with pytest.raises(MeddapError, match=r"lacks tokenizer/"):
        base.load_pipeline(REPO)


@pytest.mark.parametrize("name", ["sd-v1-4.ckpt", "sd-v1-4.safetensors"])
def test_original_single_file_checkpoint_loads_with_cached_configs(hf_cache, tiny_sd_dir, tiny_state, tmp_path, name):
    """The original CompVis checkpoint (LDM key layout) through diffusers' from_single_file, offline: the
    configs and tokenizer it lacks come from the hub cache's CompVis/stable-diffusion-v1-4 (configs only)."""
    path = write_single_file(tiny_sd_dir, tmp_path / "models" / name)
    if name.endswith(".ckpt"):
        keys = torch.load(path, weights_only=True)["state_dict"]
        assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in keys
        assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in keys
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    with pytest.raises(MeddapError, match=r"configs and tokenizer.*huggingface-cli download"):
        base.check_base_model(str(path))  # nothing cached yet: says what to fetch (2 MB, no weights)
    hub_cache(hf_cache, tiny_sd_dir, configs_only=True)
    assert base.is_single_file(str(path))
    base.check_base_model(str(path))
    pipe = base.load_pipeline(str(path))
    assert pipe.safety_checker is None
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(pipe, part), tiny_state[part])
    parts = base.load_components(str(path))
    _same(parts["unet"], tiny_state["unet"])
    assert base.count_unet_parameters(str(path)) == sum(v.numel() for v in tiny_state["unet"].values())


def test_single_file_with_a_config_folder_generates(tiny_sd_dir, tmp_path, monkeypatch):
    """diffusion.single_file_config names a local diffusers folder (configs + tokenizer): the generation
    core runs on the single file."""
    from meddap.diffusion.generate import SyntheticGenerator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_single_file(tiny_sd_dir, tmp_path / "sd-v1-4.ckpt")
    gen = SyntheticGenerator(str(path), steps=1, resolution=32, single_file_config=tiny_sd_dir)
    image = gen.generate_one("ultrasound image of benign tumor in the breast", seed=0)
    assert image.shape == (32, 32, 3) and image.dtype.name == "uint8"


def test_ldm_layout_stand_in_covers_every_weight(tiny_sd_dir, tiny_state):
    """Every tiny-SD weight has exactly one original-layout key (no key silently dropped or doubled)."""
    state = ldm_state_dict(tiny_sd_dir)
    extra = {"betas", "alphas_cumprod", "model_ema.decay", "model_ema.num_updates",
             "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert len(state) - len(extra) == sum(len(v) for v in tiny_state.values())
