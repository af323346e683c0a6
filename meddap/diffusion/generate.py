"""Batched synthetic-image generation: the plain-PyTorch core (no Ray).

`SyntheticGenerator` loads the base pipeline once and every LoRA adapter once, as peft named
adapters; `generate_batch` switches between them with `set_adapters` (a flag flip, no reload) and
runs one pipeline call per run of same-adapter requests. Each image has its own seed and its own
CPU `torch.Generator`, so its starting noise does not depend on which batch, actor or device it
lands in; the Ray stage (`meddap.stages.generate`) and the benchmark both call this class.

A request with an `init_image` (img2img) goes through a `StableDiffusionImg2ImgPipeline` made with
`from_pipe` from the loaded pipeline: the same UNet (and its LoRA adapters), VAE, text encoder and
scheduler objects, no second load. It noises the source's latents to `strength` and denoises
int(steps x strength) steps; the noise again comes from the image's own generator.

An adapter trained with diffusion.lora.class_words holds `class_words.safetensors`, the learned
input embeddings of the class words. They belong to that adapter: `_activate` writes them into the
text encoder's embedding table when the adapter becomes active and puts the base model's rows back
for an adapter without them and for None (the text encoder is shared by all adapters and by the
img2img pipeline, which `from_pipe` builds over the same text encoder object).

Images are returned as the pipeline makes them, (H, W, 3) uint8 RGB, and saved as RGB PNGs:
the prompts ask for "colorful" and "solarized" images and a person looking at a contact sheet
should see what the model made; consumers read every image, real or synthetic, through
`meddap.data.decode.read_grey`, so one grey conversion rule applies to both (BUSI's PNGs are RGB
on disk too).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from meddap.config import ConfigError

__all__ = ["ImageRequest", "SyntheticGenerator", "resolve_device_dtype", "check_scheduler_name", "png_bytes",
           "png_metadata", "PNG_META_KEY"]

PNG_META_KEY = "meddap"  # PNG tEXt key holding the image's provenance (JSON)


@dataclass(frozen=True, eq=False)
class ImageRequest:
    """One image to make: its prompt, its seed, the named adapter (None = the base model), and for
    img2img the source image, (H, W) grey or (H, W, 3) RGB uint8 at the generation resolution."""

    prompt: str
    seed: int
    adapter: str | None = None
    init_image: np.ndarray | None = None


def resolve_device_dtype(precision: str = "auto", device: str | None = None) -> tuple[str, torch.dtype]:
    """(device, dtype): auto = fp16 on CUDA, fp32 on CPU. fp16 on CPU is refused (slow, not all ops)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = str(device).startswith("cuda")
    if precision == "auto":
        return device, torch.float16 if on_cuda else torch.float32
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise ConfigError(f"config key 'generate.precision' = {precision!r}: expected auto, fp32, fp16 or bf16.")
    if dtype == torch.float16 and not on_cuda:
        raise ConfigError("config key 'generate.precision' = 'fp16' needs a CUDA GPU; on CPU use fp32 "
                          "(or auto, which picks fp16 on GPU and fp32 on CPU).")
    return device, dtype


def check_scheduler_name(name: str):
    """The diffusers scheduler class called `name`, or ConfigError listing the valid names."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None or not hasattr(cls, "from_config"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ConfigError(f"config key 'generate.scheduler' = {name!r} is not a diffusers scheduler class. "
                          f"Use null (the base model's own) or one of: {', '.join(known)}.")
    return cls


def _make_scheduler(name: str, config):
    return check_scheduler_name(name).from_config(config)


class SyntheticGenerator:
    """Base pipeline + named LoRA adapters, loaded once; `generate_batch` makes images.

    model: a diffusers folder or hub id (`meddap.diffusion.base.resolve_base_model`).
    adapters: {name: adapter folder holding pytorch_lora_weights.safetensors} (local or URI).
    """

    def __init__(self, model: str | None, adapters: dict[str, str] | None = None, *, steps: int = 30,
                 guidance_scale: float = 7.5, resolution: int = 224, scheduler: str | None = None,
                 precision: str = "auto", device: str | None = None, single_file_config: str | None = None,
                 pipeline=None, strength: float = 0.75):
        from meddap.diffusion.base import load_pipeline

        self.device, self.dtype = resolve_device_dtype(precision, device)
        self.steps, self.guidance_scale, self.resolution = steps, float(guidance_scale), resolution
        self.strength = float(strength)  # img2img requests only
        self._img2img = None
        if pipeline is not None:  # built in memory (the GPU benchmark's SD-1.4-shaped random model)
            self.pipe = pipeline.to(self.device, self.dtype)
            self.pipe.set_progress_bar_config(disable=True)
        else:
            self.pipe = load_pipeline(model, device=self.device, dtype=self.dtype,  # safety checker off
                                      single_file_config=single_file_config)
        if scheduler:
            self.pipe.scheduler = _make_scheduler(scheduler, self.pipe.scheduler.config)
        self.scheduler_name = type(self.pipe.scheduler).__name__
        self.adapters = dict(adapters or {})
        self._scales: dict[str, float] = {}
        self._words: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter -> (ids (K,), rows (K, D))
        self._base_rows: dict[int, torch.Tensor] = {}  # token id -> the base model's row, for every id any adapter sets
        for name, folder in self.adapters.items():
            self._load_adapter(name, folder)
        self._active: str | None = "\0unset"

    @classmethod
    def from_config(cls, cfg, model: str, adapters: dict[str, str] | None = None,
                    device: str | None = None) -> "SyntheticGenerator":
        g = cfg.generate
        return cls(model, adapters, steps=g.steps, guidance_scale=g.guidance_scale,
                   resolution=cfg.generate_resolution, scheduler=g.scheduler, precision=g.precision,
                   device=device, single_file_config=cfg.diffusion.single_file_config, strength=g.strength)

    def _load_adapter(self, name: str, folder: str) -> None:
        import os

        weights, info, words = _adapter_files(folder)
        # Loading from a file (not a state dict) keeps diffusers' LoRA metadata (alpha) in effect.
        self.pipe.load_lora_weights(os.path.dirname(weights), weight_name=os.path.basename(weights),
                                    adapter_name=name)
        self._scales[name] = _alpha_scale(weights, info)
        if words is not None:
            from meddap.diffusion.class_words import read_class_words

            table = self.pipe.text_encoder.get_input_embeddings().weight
            ids, rows = read_class_words(words, self.pipe.tokenizer, table.shape[1])
            for i in ids.tolist():
                self._base_rows.setdefault(i, table[i].detach().clone())
            self._words[name] = (ids, rows)

    @torch.no_grad()
    def _set_class_words(self, adapter: str | None) -> None:
        """The text encoder's rows for `adapter`: its learned class words, the base rows elsewhere."""
        if not self._base_rows:
            return
        table = self.pipe.text_encoder.get_input_embeddings().weight
        for i, row in self._base_rows.items():
            table[i] = row
        if adapter in self._words:
            ids, rows = self._words[adapter]
            table[ids.to(table.device)] = rows.to(table.device, table.dtype)

    def _activate(self, adapter: str | None) -> None:
        if adapter == self._active:
            return
        if adapter is None:
            if self.adapters:
                self.pipe.disable_lora()
        else:
            if adapter not in self.adapters:
                raise KeyError(f"adapter {adapter!r} was not loaded (loaded: {sorted(self.adapters)})")
            self.pipe.enable_lora()
            self.pipe.set_adapters([adapter], adapter_weights=[self._scales.get(adapter, 1.0)])
        self._set_class_words(adapter)
        self._active = adapter

    @property
    def img2img(self):
        """The img2img pipeline over this generator's own components (built once, on first use)."""
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            self._img2img = StableDiffusionImg2ImgPipeline.from_pipe(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def _init_batch(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, S, S, 3) float32 in [0, 1] from (S, S) grey or (S, S, 3) uint8 sources at the resolution."""
        out = []
        for im in images:
            im = np.asarray(im)
            if im.ndim == 2:
                im = np.repeat(im[:, :, None], 3, axis=2)                  # grey -> (S, S, 3)
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape != (self.resolution, self.resolution, 3):
                raise ValueError(f"an img2img source must be a {self.resolution}x{self.resolution} uint8 grey or "
                                 f"RGB image, got dtype {im.dtype} shape {im.shape}")
            out.append(im.astype(np.float32) / 255.0)
        return np.stack(out)

    @torch.inference_mode()
    def _run(self, prompts: list[str], seeds: list[int], init: list[np.ndarray] | None = None) -> list[np.ndarray]:
        # One CPU generator per image: the image's (1, 4, H/8, W/8) starting latents depend only on
        # its seed, whatever else is in the batch and whichever device runs the UNet.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = dict(prompt=prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      generator=generators, output_type="np")
        if init is None:
            out = self.pipe(height=self.resolution, width=self.resolution, **common)
        else:  # the output has the source's size, the resolution
            out = self.img2img(image=self._init_batch(init), strength=self.strength, **common)
        images = out.images  # (B, H, W, 3) float in [0, 1]
        return [np.asarray((im * 255).round().clip(0, 255), dtype=np.uint8) for im in images]

    def generate_batch(self, requests: Sequence[ImageRequest]) -> list[np.ndarray]:
        """(H, W, 3) uint8 images in request order; one pipeline call per run of requests with the same
        adapter and kind (txt2img, or img2img with a source)."""
        results: list[np.ndarray | None] = [None] * len(requests)

        def kind(r: ImageRequest) -> tuple:
            return r.adapter, r.init_image is None

        start = 0
        while start < len(requests):
            end = start
            while end < len(requests) and kind(requests[end]) == kind(requests[start]):
                end += 1
            self._activate(requests[start].adapter)
            chunk = requests[start:end]
            init = None if chunk[0].init_image is None else [r.init_image for r in chunk]
            for i, im in enumerate(self._run([r.prompt for r in chunk], [r.seed for r in chunk], init)):
                results[start + i] = im
            start = end
        return results  # type: ignore[return-value]

    def generate_one(self, prompt: str, seed: int, adapter: str | None = None,
                     init_image: np.ndarray | None = None) -> np.ndarray:
        return self.generate_batch([ImageRequest(prompt, seed, adapter, init_image)])[0]


def _adapter_files(folder: str) -> tuple[str, str | None, str | None]:
    """(local path of the adapter's weights file, text of its adapter.json or None, local path of its
    class_words.safetensors or None: trained without diffusion.lora.class_words) for an adapter folder:
    a local folder as it is (no object-store layer needed, e.g. in `bench gpu`), an s3:// or gs:// one
    through meddap.storage (the files as cached downloads)."""
    import os

    from meddap.diffusion.class_words import CLASS_WORDS_NAME
    from meddap.diffusion.lora import LORA_WEIGHTS_NAME

    if os.path.isdir(folder):
        info, words = os.path.join(folder, "adapter.json"), os.path.join(folder, CLASS_WORDS_NAME)
        return (os.path.join(folder, LORA_WEIGHTS_NAME), open(info).read() if os.path.isfile(info) else None,
                words if os.path.isfile(words) else None)
    from meddap import storage

    info, words = storage.join(folder, "adapter.json"), storage.join(folder, CLASS_WORDS_NAME)
    return (storage.local_path(storage.join(folder, LORA_WEIGHTS_NAME)),
            storage.read_text(info) if storage.exists(info) else None,
            storage.local_path(words) if storage.exists(words) else None)


def _alpha_scale(weights_file: str, adapter_json: str | None) -> float:
    """alpha / rank from adapter.json when the weights file does not carry peft's LoRA config itself.

    diffusers' LoRA format stores no alpha unless saved with `unet_lora_adapter_metadata`; loading
    then assumes alpha = rank (scale 1), so an adapter trained with another alpha needs this factor.
    """
    from safetensors import safe_open

    with safe_open(weights_file, "pt") as f:
        if "lora_adapter_metadata" in (f.metadata() or {}):
            return 1.0  # diffusers applied the saved alpha already
    if adapter_json is None:
        return 1.0
    info = json.loads(adapter_json)
    rank, alpha = info.get("rank"), info.get("alpha")
    return float(alpha) / float(rank) if rank and alpha else 1.0


def png_metadata(**fields) -> dict:
    return {PNG_META_KEY: json.dumps(fields, sort_keys=True, default=str)}


def png_bytes(image: np.ndarray, meta: dict | None = None) -> bytes:
    """PNG bytes of an (H, W, 3) or (H, W) uint8 image with tEXt provenance chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
