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
import re
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from meddap.errors import MeddapError

__all__ = [
    "TINY_MODEL",
    "PHANTOM_MODEL",
    "PHANTOM_DIR",
    "BUILTIN_MODELS",
    "phantom_model_dir",
    "base_model_judge_dir",
    "SD14_CONFIG_DIR",
    "build_tiny_sd",
    "resolve_base_model",
    "load_pipeline",
    "check_base_model",
    "load_components",
    "is_single_file",
    "unet_config",
    "count_unet_parameters",
    "SD14_REPO",
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
                  PHANTOM_MODEL: "an SD-shaped model pretrained on unlabeled phantom scans, shipped in "
                                 "meddap/models/phantom/ (built by python -m meddap pretrain-base)"}
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


PRETRAIN_COMMAND = "python -m meddap pretrain-base <folder>"
JUDGE_SUBDIR = "judge"   # where pretrain-base writes the reference judge, beside the model


def phantom_model_dir(asked_by: str | None = None) -> str:
    """The shipped `builtin:phantom` folder; a MeddapError while it is absent (naming `asked_by`, the config
    key that needs it, when that is not diffusion.base_model itself)."""
    if not (PHANTOM_DIR / "model_index.json").is_file() or not (PHANTOM_DIR / "unet").is_dir():
        why = f" (for {asked_by})" if asked_by else ""
        raise MeddapError(
            f"diffusion.base_model = {PHANTOM_MODEL!r}{why} needs the shipped folder {PHANTOM_DIR}, which is absent "
            f"(the package ships it: this install lacks its data files; reinstall meddap from the repository, or "
            f"see docs/base-model.md). Or build the model with `{PRETRAIN_COMMAND}` "
            "(resumable; hours on a 2-core CPU), then either set diffusion.base_model=<folder> (a pretrain-base "
            f"output folder is a base model as it stands) or copy <folder> to {PHANTOM_DIR}. For plumbing only, "
            f"use diffusion.base_model={TINY_MODEL}.")
    return str(PHANTOM_DIR)


def base_model_judge_dir(base_model: str, key: str) -> Path:
    """The reference judge beside a base model: `<base model folder>/judge/`, as pretrain-base writes it.
    A MeddapError naming `key` (the config key that asked for the judge), the expected path and the fix
    when there is none: `builtin:tiny` and hub ids carry no judge; a folder without judge/ was not made by
    pretrain-base."""
    fix = (f"set diffusion.base_model to builtin:phantom or to a folder made by `{PRETRAIN_COMMAND}` (it writes "
           f"<folder>/{JUDGE_SUBDIR}/)")
    if base_model == PHANTOM_MODEL:
        folder = Path(phantom_model_dir(asked_by=key))
    elif base_model.startswith("builtin:") or not _looks_like_path(base_model):
        raise MeddapError(f"{key} takes the phantom judge beside the base model (<base model folder>/{JUDGE_SUBDIR}/), "
                          f"but diffusion.base_model = {base_model!r} has none. Fix: {fix}, or set {key} to "
                          "something else (see docs/configuration.md).")
    else:
        folder = Path(os.path.expanduser(base_model))
    judge = folder / JUDGE_SUBDIR
    if not judge.is_dir():
        raise MeddapError(f"{key} takes the phantom judge beside the base model, expected in {judge}, which is "
                          f"absent. Fix: {fix}, or set {key} to something else.")
    return judge


def resolve_base_model(cfg) -> str:
    """`diffusion.base_model` as a local diffusers folder or hub id that `from_pretrained` accepts.

    `builtin:tiny` builds the tiny SD once: into `<run_dir>/models/tiny-sd` for a local run_dir, or
    into a node-local cache (`$MEDDAP_CACHE`, default ~/.cache/meddap) for an s3:// / gs:// run_dir,
    where each node builds the same seeded model itself instead of downloading it. `builtin:phantom`
    is the package's own folder, the same on every node.
    """
    from meddap.layout import RunLayout
    from meddap.storage import is_uri  # pyarrow: imported here so `bench gpu` loads this module without it

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
        p = Path(os.path.expanduser(model))
        if p.is_file():
            return  # a single-file checkpoint: checked where it is loaded
        if not p.is_dir():
            raise MeddapError(f"base model {model!r} does not exist (diffusion.base_model). Set "
                              f"diffusion.base_model to an existing diffusers folder (saved with `save_pretrained`, "
                              f"e.g. a download of CompVis/stable-diffusion-v1-4), a single-file checkpoint "
                              f"(sd-v1-4.ckpt / .safetensors), a hub id with its weights in HF_HOME's cache "
                              f"(HF_HUB_OFFLINE=1 offline), or {TINY_MODEL} for the tiny model.")
        if not (p / "model_index.json").is_file():
            raise MeddapError(f"base model folder {model!r} is not a diffusers folder (no model_index.json). "
                              "Point diffusion.base_model at a folder saved with `save_pretrained` "
                              "(holding unet/, vae/, text_encoder/, tokenizer/, scheduler/), a hub id, or a "
                              "single-file checkpoint (.ckpt / .safetensors).")


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


# ---------------------------------------------------------------------------------------------
# Weights as their publishers ship them: a diffusers folder, the Hugging Face hub cache
# (models--<org>--<name>/snapshots/<rev>/ with symlinks into blobs/, often without the safety checker
# and feature extractor, sometimes with only the fp16 `variant` files), or one original checkpoint file.
# ---------------------------------------------------------------------------------------------
SD14_REPO = "CompVis/stable-diffusion-v1-4"
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
# Components fine-tuning and generation need; the safety checker and feature extractor are never loaded.
_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTED = ("unet", "vae", "text_encoder")
_STEMS = r"(diffusion_pytorch_model|model|pytorch_model)"
_DEFAULT_WEIGHTS = re.compile(rf"^{_STEMS}(-\d+-of-\d+)?\.(safetensors|bin)$|^{_STEMS}\.(safetensors|bin)\.index\.json$")
_FP16_WEIGHTS = re.compile(rf"^{_STEMS}(-\d+-of-\d+)?\.fp16\.(safetensors|bin)$|^{_STEMS}\.(safetensors|bin)\.index\.fp16\.json$")
_OFF = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def is_single_file(model: str) -> bool:
    """True for a path to one checkpoint file (e.g. sd-v1-4.ckpt) rather than a folder or hub id."""
    return _looks_like_path(model) and Path(os.path.expanduser(model)).is_file()


def _cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of `repo_id` (refs/main), when it holds model_index.json."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _local_folder(model: str) -> Path | None:
    """Where `model`'s files are on this machine: the folder itself, or the hub cache's snapshot."""
    if _looks_like_path(model):
        return Path(os.path.expanduser(model))
    return _cached_snapshot(model)


def _weights_variant(folder: Path, dtype: torch.dtype | None = None) -> str | None:
    """None (the default weight files) or "fp16" (only `*.fp16.*` files, e.g. a download made with
    variant="fp16"). With both present, fp16 loads for an fp16 pipeline (half the bytes)."""
    default, fp16, missing = [], [], []
    for part in _WEIGHTED:
        names = os.listdir(folder / part) if (folder / part).is_dir() else []
        has_default = any(_DEFAULT_WEIGHTS.match(n) for n in names)
        has_fp16 = any(_FP16_WEIGHTS.match(n) for n in names)
        if has_default:
            default.append(part)
        if has_fp16:
            fp16.append(part)
        if not (has_default or has_fp16):
            missing.append(part)
    if missing:
        raise MeddapError(
            f"base model {folder} has no weights for {', '.join(missing)} (expected e.g. "
            f"{missing[0]}/diffusion_pytorch_model.safetensors, .bin, or the fp16 variant "
            f"diffusion_pytorch_model.fp16.safetensors; text_encoder/model.safetensors). An interrupted download? "
            f"Download the model again (`huggingface-cli download {SD14_REPO}`, optionally --include for fp16 files).")
    if len(fp16) == len(_WEIGHTED) and (dtype == torch.float16 or len(default) < len(_WEIGHTED)):
        return "fp16"
    if len(default) == len(_WEIGHTED):
        return None
    raise MeddapError(f"base model {folder} mixes weight variants: default files for {default}, only fp16 "
                      f"files for {sorted(set(_WEIGHTED) - set(default))}. Download one complete variant.")


def _check_folder(folder: Path, model: str) -> None:
    if not (folder / "model_index.json").is_file():
        raise MeddapError(f"base model folder {model!r} is not a diffusers folder (no model_index.json). "
                          "Point diffusion.base_model at a folder saved with `save_pretrained` "
                          "(holding unet/, vae/, text_encoder/, tokenizer/, scheduler/), a hub id, or a "
                          "single-file checkpoint (.ckpt / .safetensors).")
    absent = [p for p in _REQUIRED if not (folder / p).is_dir()]
    if absent:
        raise MeddapError(f"base model {model!r} ({folder}) lacks {', '.join(p + '/' for p in absent)}; "
                          f"meddap needs {', '.join(_REQUIRED)} (safety_checker/ and feature_extractor/ may be "
                          f"absent). Download the model again (`huggingface-cli download {SD14_REPO}`).")
    _weights_variant(folder)


def _source(model: str, dtype: torch.dtype | None = None) -> tuple[str, dict]:
    """(what `from_pretrained` should load, its keyword arguments) for a folder or hub id.

    A folder, or a hub id whose snapshot is in the local cache, loads from disk with no hub call, in
    the weight variant that is there. A cached snapshot that is incomplete is an error offline; online
    the hub id is loaded instead, so the download completes."""
    folder = _local_folder(model)
    if folder is not None:
        try:
            _check_folder(folder, model)
            return str(folder), dict(local_files_only=True, variant=_weights_variant(folder, dtype))
        except MeddapError:
            if _looks_like_path(model) or _local_only():
                raise
    return model, dict(local_files_only=_local_only())


def _single_file_config(config: str | None) -> tuple[str, bool]:
    """(diffusers folder or hub id holding the configs and tokenizer a single-file checkpoint needs,
    local-only?). A checkpoint holds neither; SD-1.4's come from the Hugging Face cache by default."""
    source = config or SD14_REPO
    key = "diffusion.single_file_config"
    if _looks_like_path(source):
        folder = Path(os.path.expanduser(source))
        if not (folder / "model_index.json").is_file() or not (folder / "tokenizer").is_dir():
            raise MeddapError(f"{key} = {source!r} is not a diffusers folder with model_index.json and tokenizer/; "
                              f"point it at a download of {SD14_REPO}'s configs (see below) or a saved pipeline.")
        return str(folder), True
    snapshot = _cached_snapshot(source)
    if snapshot is not None and (snapshot / "tokenizer").is_dir():
        return str(snapshot), True
    if not _local_only():
        return source, False  # diffusers downloads the configs and tokenizer only (~2 MB, no weights)
    raise MeddapError(
        f"a single-file checkpoint needs the configs and tokenizer of {source!r}, which are not in the local "
        f"Hugging Face cache and cannot be downloaded here. Fetch them once where the hub is reachable (2 MB, no "
        f"weights): `huggingface-cli download {source} model_index.json --include '*/config.json' "
        f"'scheduler/*' 'tokenizer/*'`, and copy the cache (HF_HOME) here; or set {key} to a diffusers folder.")


def _wrap(model: str, fn):
    try:
        return fn()
    except MeddapError:
        raise
    except _load_errors() as e:
        raise _wrap_load_error(model, e) from None


def check_base_model(model: str, single_file_config: str | None = None) -> None:
    """Fail early (before starting workers) when `model` cannot be loaded: reads only small files."""
    from diffusers import DiffusionPipeline

    _check_local(model)
    if is_single_file(model):
        if not model.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise MeddapError(f"diffusion.base_model = {model!r} is a file but not a checkpoint "
                              f"({', '.join(SINGLE_FILE_SUFFIXES)}).")
        _single_file_config(single_file_config)
        return
    where, kw = _source(model)
    _wrap(model, lambda: DiffusionPipeline.load_config(where, local_files_only=kw["local_files_only"]))


def unet_config(model: str, single_file_config: str | None = None) -> dict:
    """The UNet's config (no weights read): for parameter counts and GPU decisions."""
    from diffusers import UNet2DConditionModel

    if is_single_file(model):
        source, local = _single_file_config(single_file_config)
        return dict(_wrap(source, lambda: UNet2DConditionModel.load_config(source, subfolder="unet",
                                                                          local_files_only=local)))
    where, kw = _source(model)
    return dict(_wrap(model, lambda: UNet2DConditionModel.load_config(where, subfolder="unet",
                                                                     local_files_only=kw["local_files_only"])))


def count_unet_parameters(model: str, single_file_config: str | None = None) -> int:
    """Parameters of `model`'s UNet, counted on the meta device (nothing allocated)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(model, single_file_config))
    return sum(p.numel() for p in unet.parameters())


def _load_single_file(path: str, dtype: torch.dtype, single_file_config: str | None):
    """diffusers' `from_single_file` on an original (LDM-layout) checkpoint, configs from a local folder."""
    from diffusers import StableDiffusionPipeline

    config, local = _single_file_config(single_file_config)
    return _wrap(path, lambda: StableDiffusionPipeline.from_single_file(
        os.path.expanduser(path), config=config, dtype=dtype, local_files_only=local or _local_only(), **_OFF))


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  single_file_config: str | None = None):
    """A StableDiffusionPipeline of `model` on `device`, without safety checker or feature extractor.

    `model` is what `resolve_base_model` returns: a diffusers folder, a hub id (its cached snapshot is
    loaded offline when present; the fp16 variant when only that was downloaded), or a single-file
    checkpoint. Missing weights raise MeddapError saying how to provide them.
    """
    from diffusers import StableDiffusionPipeline

    _check_local(model)
    if is_single_file(model):
        pipe = _load_single_file(model, dtype, single_file_config)
    else:
        where, kw = _source(model, dtype)
        pipe = _wrap(model, lambda: StableDiffusionPipeline.from_pretrained(where, dtype=dtype, **kw, **_OFF))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_components(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    single_file_config: str | None = None) -> dict[str, Any]:
    """The parts fine-tuning needs, without a pipeline: unet, vae, text_encoder (on `device`, `dtype`),
    tokenizer, and `noise_scheduler` (a DDPMScheduler from the model's scheduler config, as in SD's
    own training: same betas and prediction_type). Same sources as `load_pipeline`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _check_local(model)
    if is_single_file(model):
        pipe = _load_single_file(model, dtype, single_file_config)
        parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                     noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    else:
        where, kw = _source(model, dtype)
        plain = dict(local_files_only=kw["local_files_only"])

        def load():
            return dict(
                tokenizer=CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **plain),
                text_encoder=CLIPTextModel.from_pretrained(where, subfolder="text_encoder", dtype=dtype, **kw),
                vae=AutoencoderKL.from_pretrained(where, subfolder="vae", dtype=dtype, **kw),
                unet=UNet2DConditionModel.from_pretrained(where, subfolder="unet", dtype=dtype, **kw),
                noise_scheduler=DDPMScheduler.from_pretrained(where, subfolder="scheduler", **plain))
        parts = _wrap(model, load)
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(device)
    return parts


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
