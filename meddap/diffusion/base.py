"""Base Stable Diffusion models: the real one from the hub or a folder, a tiny offline one, and
SD-1.4-shaped models with random weights.

- `resolve_base_model(cfg)`: `diffusion.base_model` -> something `from_pretrained` accepts (a local
  diffusers folder or a hub id). `builtin:tiny` builds the tiny SD into `<run_dir>/models/tiny-sd`
  once (a local cache folder when run_dir is an object-store URI); `builtin:phantom` is the pretrained
  phantom model shipped inside the package (`meddap/models/phantom/`, made by
  `python -m meddap pretrain-base`; see docs/base-model.md).
- `load_pipeline(model)`: `StableDiffusionPipeline.from_pretrained` with the safety checker off, and a
  MeddapError that says how to provide the weights when they are missing.
- `load_components(model)`: UNet, VAE, text encoder, tokenizer and the training noise scheduler,
  for fine-tuning without building a pipeline.
- `build_tiny_sd(folder)`: a few-MB SD with the same classes as SD-1.4 (UNet2DConditionModel with
  attn2 cross-attention, 4-block AutoencoderKL so the VAE scale factor is 8, CLIPTextModel,
  CLIPTokenizer over a locally written character vocabulary, SD-1.4's PNDM scheduler config),
  saved with `save_pretrained` as a normal diffusers folder.
- `build_sd14_unet()`, `build_sd14_vae()`, `build_sd14_text_encoder()`: SD-1.4's architecture from
  the configs shipped in `meddap/diffusion/sd14/`, random weights: sized and timed like the real model.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from meddap.errors import MeddapError
from meddap.storage import is_uri

__all__ = [
    "TINY_MODEL",
    "PHANTOM_MODEL",
    "PHANTOM_DIR",
    "BUILTIN_MODELS",
    "phantom_model_dir",
    "SD14_CONFIG_DIR",
    "build_tiny_sd",
    "resolve_base_model",
    "load_pipeline",
    "check_base_model",
    "load_components",
    "sd14_config",
    "build_sd14_unet",
    "build_sd14_vae",
    "build_sd14_text_encoder",
    "build_sd14_scheduler",
]

TINY_MODEL = "builtin:tiny"
PHANTOM_MODEL = "builtin:phantom"
# The pretrained phantom base model and its reference judge (judge/), shipped as package data.
PHANTOM_DIR = Path(__file__).resolve().parent.parent / "models" / "phantom"
BUILTIN_MODELS = {TINY_MODEL: "a few-MB SD with random weights, built locally (plumbing tests)",
                  PHANTOM_MODEL: "an SD-shaped model pretrained on unlabeled phantom scans, shipped in the package"}
SD14_CONFIG_DIR = Path(__file__).parent / "sd14"

# The tiny model's architecture. Same classes and wiring as SD-1.4, channel counts cut ~10-40x.
# Bump _TINY_VERSION when any of this changes so stale cached builds are not reused.
_TINY_VERSION = 1
_TINY_SEED = 0
_TINY_UNET = dict(
    sample_size=8,  # latent side for the demo's 64 px (the pipeline's default height = 8 * 8)
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    # Cross-attention at the high-resolution level and in the mid block, none at the lowest, as SD.
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    # Four blocks -> three downsamplings -> VAE scale factor 8, exactly as SD.
    block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,  # CLIP's context length: prompts are padded to 77 tokens as in SD
    projection_dim=32,
    hidden_act="quick_gelu",
)
# Characters the tiny tokenizer knows; anything else becomes <|endoftext|> (CLIP's unk token).
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_.,'!?()&/:;+"
_TINY_COMPLETE = "model_index.json"


# ---------------------------------------------------------------------------------------------
# Tiny SD
# ---------------------------------------------------------------------------------------------
def _write_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer from single characters (each with and without the end-of-word `</w>`) and no
    merges: every word splits into characters, so any lowercase ASCII prompt tokenises offline."""
    from transformers import CLIPTokenizer

    tokens = [c for c in _TINY_CHARS] + [c + "</w>" for c in _TINY_CHARS]
    # Special tokens last, as in CLIP's vocabulary (so argmax(input_ids) finds <|endoftext|>).
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))


def _build_tiny_into(out: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    vocab_size = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")

    torch.manual_seed(_TINY_SEED)
    unet = UNet2DConditionModel(**_TINY_UNET)
    torch.manual_seed(_TINY_SEED + 1)
    vae = AutoencoderKL(**_TINY_VAE)
    torch.manual_seed(_TINY_SEED + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos,
                                                pad_token_id=eos, **_TINY_TEXT))
    scheduler = PNDMScheduler.from_config(sd14_config("scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "meddap_tiny.json").write_text(json.dumps({"version": _TINY_VERSION, "seed": _TINY_SEED}))


def _tiny_complete(folder: Path) -> bool:
    marker = folder / "meddap_tiny.json"
    if not (folder / _TINY_COMPLETE).is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == _TINY_VERSION
    except (OSError, ValueError):
        return False


def build_tiny_sd(folder: str | os.PathLike) -> str:
    """Build the tiny SD into `folder` (a local path) unless a complete build is already there.

    Built in a sibling temp folder and renamed into place, so `folder` is either absent or complete,
    and concurrent builders (Ray workers on one node) cannot leave a half-written model.
    Returns the folder as a string, ready for `from_pretrained`.
    """
    folder = Path(folder).expanduser().absolute()
    if _tiny_complete(folder):
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        _build_tiny_into(tmp)
        if folder.exists() and not _tiny_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)  # stale (older version) build
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _tiny_complete(folder):  # lost a race to a builder that failed: surface it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _local_cache_dir() -> Path:
    root = os.environ.get("MEDDAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meddap")
    return Path(root)


def phantom_model_dir(key: str = "diffusion.base_model") -> str:
    """The shipped `builtin:phantom` folder; a MeddapError naming `key` when the install lacks it."""
    if not (PHANTOM_DIR / "model_index.json").is_file() or not (PHANTOM_DIR / "unet").is_dir():
        raise MeddapError(f"{key} = {PHANTOM_MODEL!r}: the shipped model is missing from {PHANTOM_DIR} (an install "
                          "without package data?). Reinstall meddap (`pip install -e .` from a checkout), or rebuild "
                          "it with `python -m meddap pretrain-base OUT` and set diffusion.base_model=OUT.")
    return str(PHANTOM_DIR)


def resolve_base_model(cfg) -> str:
    """`diffusion.base_model` as a local diffusers folder or hub id that `from_pretrained` accepts.

    `builtin:tiny` builds the tiny SD once: into `<run_dir>/models/tiny-sd` for a local run_dir, or
    into a node-local cache (`$MEDDAP_CACHE`, default ~/.cache/meddap) for an s3:// / gs:// run_dir,
    where each node builds the same seeded model itself instead of downloading it. `builtin:phantom`
    is the package's own folder, the same on every node.
    """
    from meddap.layout import RunLayout

    model = cfg.diffusion.base_model
    if model == TINY_MODEL:
        if is_uri(cfg.run_dir):
            return build_tiny_sd(_local_cache_dir() / f"tiny-sd-v{_TINY_VERSION}")
        return build_tiny_sd(RunLayout(cfg.run_dir).tiny_model)
    if model == PHANTOM_MODEL:
        return phantom_model_dir()
    if model.startswith("builtin:"):
        raise MeddapError(f"diffusion.base_model = {model!r} is not a builtin model; builtin models: "
                          + "; ".join(f"{k} ({v})" for k, v in BUILTIN_MODELS.items()) + ".")
    return os.path.expanduser(model) if _looks_like_path(model) else model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    # A hub id is "org/name" (one slash); anything rooted, relative-dotted, deeper or existing is a path.
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(model) or model.count("/") > 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=4)
def _hub_resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _local_only() -> bool:
    """Look only in the local cache when offline by setting, or when the hub's host cannot even be
    resolved (no network): huggingface_hub would otherwise retry for ~30 s before failing the same way."""
    if _offline():
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    return not (host and _hub_resolvable(host))


def _how_to_provide(model: str) -> str:
    return (f"Provide the weights of {model!r} in one of these ways: (1) download the model elsewhere "
            f"(e.g. `huggingface-cli download {model}` or `git clone https://huggingface.co/{model}`) and set "
            f"diffusion.base_model=/path/to/that/diffusers/folder; (2) copy a populated Hugging Face cache to "
            f"this machine, point HF_HOME at it and set HF_HUB_OFFLINE=1; or (3) use "
            f"diffusion.base_model={TINY_MODEL} for the offline tiny model (tests and demo only).")


def _check_local(model: str) -> None:
    if _looks_like_path(model):
        p = Path(model)
        if not p.is_dir():
            raise MeddapError(f"base model folder {model!r} does not exist (diffusion.base_model). Set "
                              f"diffusion.base_model to an existing diffusers folder (saved with `save_pretrained`, "
                              f"e.g. a download of CompVis/stable-diffusion-v1-4), to a hub id with its weights in "
                              f"HF_HOME's cache (HF_HUB_OFFLINE=1 offline), or to {TINY_MODEL} for the tiny model.")
        if not (p / "model_index.json").is_file() and not (p / "unet").is_dir():
            raise MeddapError(f"base model folder {model!r} is not a diffusers folder (no model_index.json). "
                              "Point diffusion.base_model at a folder saved with `save_pretrained` "
                              "(holding unet/, vae/, text_encoder/, tokenizer/, scheduler/).")


def _wrap_load_error(model: str, err: Exception) -> MeddapError:
    if _offline():
        where = "offline (HF_HUB_OFFLINE=1), not in the local Hugging Face cache"
    elif _local_only():
        where = "the hub cannot be reached from this machine (its host does not resolve) and it is not in the " \
                "local Hugging Face cache"
    else:
        where = "not found locally and could not be downloaded"
    return MeddapError(f"could not load base model {model!r}: {where} "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                       + _how_to_provide(model))


def _load_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, EnvironmentError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
        errs += [HfHubHTTPError, HFValidationError, LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return tuple(errs)


def check_base_model(model: str) -> None:
    """Fail early (before starting workers) when `model` cannot be found: reads only its index file."""
    from diffusers import DiffusionPipeline

    _check_local(model)
    try:
        DiffusionPipeline.load_config(model, local_files_only=_local_only())
    except _load_errors() as e:
        raise _wrap_load_error(model, e) from None


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`StableDiffusionPipeline.from_pretrained(model)` with the safety checker off, on `device`.

    `model` is what `resolve_base_model` returns. Missing weights raise MeddapError saying how to
    provide them (a local folder, or HF_HOME + HF_HUB_OFFLINE=1).
    """
    from diffusers import StableDiffusionPipeline

    _check_local(model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=_local_only())
    except _load_errors() as e:
        raise _wrap_load_error(model, e) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_components(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The parts fine-tuning needs, without a pipeline: unet, vae, text_encoder (on `device`, `dtype`),
    tokenizer, and `noise_scheduler` (a DDPMScheduler from the model's scheduler config, as in SD's
    own training: same betas and prediction_type)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _check_local(model)
    kw = dict(local_files_only=_local_only())
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    except _load_errors() as e:
        raise _wrap_load_error(model, e) from None
    return dict(unet=unet.to(device), vae=vae.to(device), text_encoder=text_encoder.to(device),
                tokenizer=tokenizer, noise_scheduler=noise_scheduler)


# ---------------------------------------------------------------------------------------------
# SD-1.4-shaped models with random weights
# ---------------------------------------------------------------------------------------------
def sd14_config(part: str) -> dict:
    """The shipped SD-1.4 architecture config of `part` (unet, vae, text_encoder, scheduler)."""
    path = SD14_CONFIG_DIR / f"{part}.json"
    if not path.is_file():
        raise MeddapError(f"no shipped SD-1.4 config {path}; parts: "
                          + ", ".join(p.stem for p in sorted(SD14_CONFIG_DIR.glob('*.json'))))
    return json.loads(path.read_text())


def _on(device: str | torch.device | None):
    """Build under `device` ("meta" allocates nothing: for parameter counting of the 3.4 GB UNet)."""
    import contextlib
    return torch.device(device) if device is not None else contextlib.nullcontext()


def build_sd14_unet(device: str | torch.device | None = None, seed: int = 0):
    """SD-1.4's UNet2DConditionModel (859.5 M parameters) with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with _on(device):
        return UNet2DConditionModel.from_config(sd14_config("unet"))


def build_sd14_vae(device: str | torch.device | None = None, seed: int = 0):
    """SD-1.4's AutoencoderKL (83.7 M parameters) with random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with _on(device):
        return AutoencoderKL.from_config(sd14_config("vae"))


def build_sd14_text_encoder(device: str | torch.device | None = None, seed: int = 0):
    """SD-1.4's text encoder (CLIP ViT-L/14 text tower, 123 M parameters) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in sd14_config("text_encoder").items() if k not in ("architectures",)}
    torch.manual_seed(seed)
    with _on(device):
        return CLIPTextModel(CLIPTextConfig(**cfg))


def build_sd14_scheduler(kind: str = "ddpm"):
    """SD-1.4's noise schedule: `ddpm` for training, `pndm` (its shipped sampler) or `ddim`."""
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    cls = {"ddpm": DDPMScheduler, "pndm": PNDMScheduler, "ddim": DDIMScheduler}[kind]
    return cls.from_config(sd14_config("scheduler"))
