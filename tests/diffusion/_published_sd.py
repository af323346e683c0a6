"""Stand-ins for Stable Diffusion as its publishers ship it, made from the tiny SD (random weights):

- `hub_cache(...)`: the Hugging Face hub cache layout `models--CompVis--stable-diffusion-v1-4/` with
  `refs/main`, `snapshots/<rev>/...` symlinks into `blobs/<sha256>`, SD-1.4's model_index.json (which
  names the safety checker and feature extractor whether or not their folders were downloaded), with
  or without those folders, default or only fp16 `variant` weight files, or configs and tokenizer only
  (what a single-file checkpoint needs beside it);
- `ldm_state_dict(folder)`: the tiny SD's weights in the original CompVis/LDM single-file key layout
  (`model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, `first_stage_model.encoder.down.0.block.0...`,
  `cond_stage_model.transformer.text_model...`), as `sd-v1-4.ckpt` holds SD-1.4. diffusers ships only
  the LDM -> diffusers direction in its wheel (its reverse is a repository script), so the reverse is
  written here for SD's UNet/VAE/CLIP layout, for any depth; loading the result through diffusers'
  own `from_single_file` and getting the original weights back is the check that it is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

REPO = "CompVis/stable-diffusion-v1-4"
REVISION = "133a221b8aa7292a167afc5127cb63fb5005638b"  # a 40-hex commit id, as the hub's snapshots are named
# SD-1.4's model_index.json on the hub lists these two even when a download skipped their folders.
SD14_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.2.2",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _tiny_safety_checker(out: Path) -> None:
    """A small StableDiffusionSafetyChecker and CLIPImageProcessor, saved as their folders are on the hub."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    config = CLIPConfig(text_config=dict(small), vision_config=dict(small, image_size=32, patch_size=8),
                        projection_dim=32)
    torch.manual_seed(5)
    StableDiffusionSafetyChecker(config).save_pretrained(out / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(crop_size=32, size=32).save_pretrained(out / "feature_extractor")


def _snapshot_files(tiny: Path, safety: bool, variant: str | None, configs_only: bool, work: Path) -> Path:
    """A plain folder with the files one download of SD-1.4 would leave, made from the tiny SD."""
    from safetensors.torch import load_file, save_file

    out = work / "files"
    shutil.rmtree(out, ignore_errors=True)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (tiny / part).iterdir():
            weights = f.name.endswith(".safetensors")
            if weights and configs_only:
                continue
            dest = out / part / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if weights and variant == "fp16":
                stem = _WEIGHTS[part]
                state = {k: v.half() for k, v in load_file(f).items()}
                save_file(state, out / part / f"{stem}.fp16.safetensors", metadata={"format": "pt"})
            else:
                shutil.copyfile(f, dest)
    (out / "model_index.json").write_text(json.dumps(SD14_MODEL_INDEX, indent=2))
    if safety:
        _tiny_safety_checker(out)
    return out


def hub_cache(cache: Path, tiny: str, *, safety: bool = False, variant: str | None = None,
              configs_only: bool = False, repo: str = REPO) -> Path:
    """Lay the tiny SD out under `cache` (HF_HUB_CACHE) exactly as huggingface_hub stores a download:
    blobs named by content hash, snapshot files as relative symlinks to them, refs/main naming the
    snapshot. Returns the snapshot folder."""
    files = _snapshot_files(Path(tiny), safety, variant, configs_only, cache.parent / f".src-{os.getpid()}")
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REVISION
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / (hashlib.sha256(data).hexdigest() if f.suffix in (".safetensors", ".bin")
                                 else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())  # LFS vs git ids
        blob.write_bytes(data)
        link = snapshot / f.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    shutil.rmtree(files.parent, ignore_errors=True)
    return snapshot


# ---------------------------------------------------------------------------------------------
# diffusers -> original LDM single-file layout
# ---------------------------------------------------------------------------------------------
_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def _unet_prefixes(config: dict) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, is a resnet) for SD's UNet of any depth."""
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    m = {"time_embedding.linear_1.": ("time_embed.0.", False), "time_embedding.linear_2.": ("time_embed.2.", False),
         "conv_in.": ("input_blocks.0.0.", False), "conv_norm_out.": ("out.0.", False), "conv_out.": ("out.2.", False),
         "mid_block.resnets.0.": ("middle_block.0.", True), "mid_block.attentions.0.": ("middle_block.1.", False),
         "mid_block.resnets.1.": ("middle_block.2.", True)}
    for i in range(levels):
        for j in range(per):
            k = (per + 1) * i + j + 1
            m[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{k}.0.", True)
            if down_attn[i]:
                m[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{k}.1.", False)
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(per + 1) * (i + 1)}.0.op.", False)
        for j in range(per + 1):
            k = (per + 1) * i + j
            m[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{k}.0.", True)
            if up_attn[i]:
                m[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{k}.1.", False)
        if i < levels - 1:
            m[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}.", False)
    return m


def _vae_prefixes(config: dict) -> dict[str, tuple[str, str]]:
    """diffusers prefix -> (LDM prefix, kind: resnet | attention | plain) for SD's VAE of any depth."""
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    m = {"encoder.conv_norm_out.": ("encoder.norm_out.", "plain"), "decoder.conv_norm_out.": ("decoder.norm_out.", "plain")}
    for side in ("encoder", "decoder"):
        m[f"{side}.mid_block.attentions.0."] = (f"{side}.mid.attn_1.", "attention")
        for k in range(2):
            m[f"{side}.mid_block.resnets.{k}."] = (f"{side}.mid.block_{k + 1}.", "resnet")
    for i in range(levels):
        for j in range(per):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", "resnet")
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", "plain")
        for j in range(per + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{levels - 1 - i}.block.{j}.", "resnet")
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{levels - 1 - i}.upsample.", "plain")
    return m


def _rename(key: str, prefixes: dict) -> tuple[str, object]:
    match = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if match is None:
        return key, None
    new, kind = prefixes[match]
    return new + key[len(match):], kind


def ldm_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The diffusers SD in `folder` as one original-layout state dict (what sd-v1-4.ckpt's
    "state_dict" holds), plus the LDM training buffers such a file carries."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    out: dict[str, torch.Tensor] = {}
    up = _unet_prefixes(dict(unet.config))
    for k, v in unet.state_dict().items():
        new, resnet = _rename(k, up)
        assert resnet is not None, f"no LDM name for UNet key {k}"
        if resnet:
            for a, b in _UNET_RESNET:
                new = new.replace(f".{a}.", f".{b}.")
        out["model.diffusion_model." + new] = v.clone()
    vp = _vae_prefixes(dict(vae.config))
    for k, v in vae.state_dict().items():
        new, kind = _rename(k, vp)
        if kind == "resnet":
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        elif kind == "attention":
            for a, b in _VAE_ATTENTION:
                new = new.replace(f"attn_1.{a}", f"attn_1.{b}")
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out["first_stage_model." + new] = v.clone()
    for k, v in text.state_dict().items():
        out["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v.clone()
    n_pos = text.config.max_position_embeddings
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out


def write_single_file(folder: str, path: Path) -> Path:
    """`sd-v1-4.ckpt` as CompVis publishes it ({"state_dict": ..., "global_step": ...}, pickled by torch.save)
    or `sd-v1-4.safetensors` (the flat state dict), by the suffix of `path`."""
    state = ldm_state_dict(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 470000}, path)
    return path
