"""Pretraining of the `builtin:phantom` base model: plain PyTorch, no Ray.

    python -m meddap pretrain-base OUT [--seed 0] [--quick]

One command makes the whole model, deterministically for its seed (on the same torch version and
thread count), resumably (a killed run continues from its last checkpoint under OUT/.work):

1. corpus: `corpus_size` unlabeled phantom scans (`meddap.data.phantom.make_phantom_scan`), each from
   a freshly drawn simulated scanner (speckle size, dynamic range, gain, attenuation, probe, framing,
   overlays) and, in `lesion_share` of them, a lesion described by its look only; half of them get one
   of the paper's adjectives with its image transform; captions from `meddap.diffusion.captions`
   (never a class word; half of them with one or two neutral filler words). Made at `scan_size` px
   and resized to `resolution` as the demo reads images.
2. VAE: an AutoencoderKL (scale factor 4) trained on random crops (L1 + a small KL term); its
   `scaling_factor` is set to 1 / std of the corpus latents, as SD's 0.18215 was.
3. UNet + text encoder: a UNet2DConditionModel with attn2 cross-attention and a CLIPTextModel over a
   word-level CLIPTokenizer, trained together on the cached latents with SD's objective (epsilon
   prediction, SD's scaled-linear betas), except that latent pixels at and around a lesion weigh
   `lesion_weight` times more in the loss (`lesion_loss_weights`: without it the model learned that a
   mass is there, not the shape its caption names); the shipped weights are an exponential moving average. The
   embeddings of the filler words and of the generation prompts' own words (class words, "tumor")
   stay at their random initial values: the model learns to ignore words it was not taught, so the
   classes are not in the base and USLoRA has to teach them.
4. judge: the reference phantom classifier (`meddap.classify.judge`) on its own class-labelled
   phantom set (seeds the demo never uses), for label fidelity and domain FID features.
5. OUT: a diffusers folder (`save_pretrained`: model_index.json, unet/, vae/, text_encoder/,
   tokenizer/, scheduler/), judge/, and `meddap_pretrain.json` (settings, data, seed, steps, wall time,
   final losses, versions and the sha256 of every file written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from meddap.errors import MeddapError

__all__ = [
    "PretrainSettings",
    "QUICK_SETTINGS",
    "PRETRAIN_RECORD",
    "PHANTOM_UNET",
    "PHANTOM_VAE",
    "PHANTOM_TEXT",
    "TOKENIZER_WORDS",
    "write_word_tokenizer",
    "build_phantom_corpus",
    "build_judge_set",
    "pretrain_base",
    "file_hashes",
    "settings_from",
    "parse_setting_overrides",
]

PRETRAIN_RECORD = "meddap_pretrain.json"
WORK_DIR = ".work"

# The architecture: SD-1.4's classes and wiring, sized for a 2-core CPU at 64 px.
PHANTOM_VAE = dict(
    in_channels=3, out_channels=3,
    # Three blocks -> two downsamplings -> scale factor 4: a 64 px image is a (4, 16, 16) latent, fine
    # enough for a lesion's margin (SD's factor 8 would leave a lesion ~2 latent pixels wide).
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
    # No attention in the mid block: the VAE is then fully convolutional and trains on crops.
    mid_block_add_attention=False,
)
PHANTOM_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    block_out_channels=(32, 64, 128), layers_per_block=1,
    # Cross-attention (attn2) at the two finer levels, as SD has it at its three finer ones.
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
PHANTOM_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
    # Captions are at most ~25 tokens; a 32-token context (SD: 77) saves cross-attention work.
    max_position_embeddings=32, projection_dim=64, hidden_act="quick_gelu",
)
# Words the tokenizer gives one token each: every caption word, plus the words of the generation prompts
# (class words included, as SD's CLIP has them: they get no training signal here, so USLoRA must give
# them meaning). Anything else is spelled out in characters.
_PROMPT_WORDS = ("tumor", "benign", "malignant", "normal", "no", "photo", "scan", "lesion")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_.,'!?()&/:;+"


def _tokenizer_words() -> tuple[str, ...]:
    from meddap.diffusion.captions import CAPTION_WORDS

    return tuple(dict.fromkeys(w for w in CAPTION_WORDS + _PROMPT_WORDS if w.isalpha()))


TOKENIZER_WORDS = _tokenizer_words()


@dataclass
class PretrainSettings:
    """Everything that determines the model. Defaults = the shipped `builtin:phantom`."""
    seed: int = 0
    resolution: int = 64          # the demo's diffusion.resolution
    scan_size: int = 96           # phantom scans are made at the demo's data.phantom.size, then resized
    corpus_size: int = 12000
    lesion_share: float = 0.65
    adjective_share: float = 0.5
    word_dropout: float = 0.2
    caption_dropout: float = 0.1
    filler_share: float = 0.5     # captions with 1-2 neutral words whose embeddings stay random
    lesion_weight: float = 5.0    # UNet loss weight on latent pixels at and next to the lesion (1 = SD's plain loss)
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    ema_decay: float = 0.999
    judge_per_class: int = 800    # per class and device (standard, shifted)
    judge_held_out: int = 150
    judge_epochs: int = 6
    judge_batch: int = 64
    judge_lr: float = 1e-3
    judge_seed: int = 1000        # the demo's phantoms use seeds 0 and 1
    threads: int = 2
    checkpoint_every: int = 250

    def to_dict(self) -> dict:
        return asdict(self)


# For the recipe's smoke test: every phase runs, in seconds. One thread: on a busy 2-core box two threads
# made the quick run 4x slower (measured 24 s CPU, 115 s wall vs 7 s CPU, 33 s wall).
QUICK_SETTINGS = dict(corpus_size=48, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, unet_warmup=1,
                      judge_per_class=4, judge_held_out=2, judge_epochs=1, judge_batch=8, checkpoint_every=2,
                      threads=1)


def _stable(text: str) -> int:
    return zlib.crc32(text.encode())


def _rng(seed: int, what: str, *index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _stable(what), *map(int, index)]))


def _torch_gen(seed: int, what: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(seed, what, step).integers(2 ** 62)))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge of one word (as transformers' CLIPTokenizer.bpe does it)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _merges_for(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which every word is one token: grown until no word splits."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(10 * sum(len(w) for w in words)):
        split = next((p for p in (_bpe(w, ranks) for w in words) if len(p) > 1), None)
        if split is None:
            return merges
        pair = (split[0], split[1])
        ranks[pair] = len(merges)
        merges.append(pair)
    raise RuntimeError("could not build merges for the tokenizer's words")


def write_word_tokenizer(folder: str | Path, words: tuple[str, ...] = TOKENIZER_WORDS, max_length: int = 32):
    """A CLIPTokenizer (saved in `folder`) that gives each of `words` one token and spells anything else
    in single characters: vocab.json + merges.txt in CLIP's format."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _merges_for(words)
    tokens = list(_CHARS) + [c + "</w>" for c in _CHARS]
    tokens += [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {w!r} into {tok.convert_ids_to_tokens(ids)}")
    tok.save_pretrained(str(folder))
    return tok


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _resize(grey: np.ndarray, size: int) -> np.ndarray:
    """The resize `meddap.data.decode.read_grey` applies (Pillow bilinear, antialiased)."""
    from PIL import Image

    if grey.shape[0] == size:
        return grey
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _corpus_item(s: PretrainSettings, i: int) -> tuple[np.ndarray, str, str, np.ndarray]:
    from meddap.data.phantom import make_phantom_scan, random_lesion_shape
    from meddap.diffusion.captions import ADJECTIVES, apply_adjective, make_caption

    rng = _rng(s.seed, "corpus", i)
    shape = random_lesion_shape(rng) if rng.uniform() < s.lesion_share else None
    grey, mask, facts = make_phantom_scan(rng, s.scan_size, shape)
    rgb = np.repeat(_resize(grey, s.resolution)[..., None], 3, axis=2)
    adjective = str(rng.choice(ADJECTIVES)) if rng.uniform() < s.adjective_share else ""
    rgb = apply_adjective(rgb, adjective, rng)
    caption = make_caption(shape, facts["fan"], adjective, rng, s.word_dropout, s.caption_dropout, s.filler_share)
    return rgb, caption, adjective, _resize(mask, s.resolution)


def build_phantom_corpus(s: PretrainSettings, log: Callable[[str], None] = print
                         ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(N, R, R, 3) uint8 images, their N captions and (N, R, R) uint8 lesion masks (0 or 255, all 0
    without a lesion; the lesion weight of the UNet loss reads them). Item i depends only on (seed, i)."""
    from meddap.progress import Progress

    images = np.zeros((s.corpus_size, s.resolution, s.resolution, 3), np.uint8)
    masks = np.zeros((s.corpus_size, s.resolution, s.resolution), np.uint8)
    captions = []
    progress = Progress(s.corpus_size, "pretrain corpus", "scans", every_s=15.0)
    for i in range(s.corpus_size):
        images[i], caption, _, masks[i] = _corpus_item(s, i)
        captions.append(caption)
        progress.update()
    return images, captions, masks


def lesion_loss_weights(masks: np.ndarray, latent_size: int, weight: float) -> torch.Tensor:
    """(N, R, R) uint8 lesion masks -> (N, 2, 1, h, h) per-latent-pixel weights of the UNet loss, for each
    image and its mirror (the UNet phase flips half its samples): `weight` on latent pixels the lesion
    touches and their 8 neighbours (its margin, capsule, halo and spicules sit there), 1 elsewhere.

    Why: a lesion covers a few percent of the image, so in SD's plain loss its shape is a small share of
    the error next to the speckle, and 5,000 steps taught the base model that a mass is there but not the
    shape its caption names (measured: "tall" and "wide" captions gave the same lesions). The weight makes
    the lesion's pixels count as if it were larger."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).float().div(255.0)[:, None]     # (N, 1, R, R)
    m = F.adaptive_avg_pool2d(m, latent_size)                                        # share of lesion per latent px
    m = (F.max_pool2d(m, 3, stride=1, padding=1) > 0.05).float()                    # + one latent px around it
    w = 1.0 + (float(weight) - 1.0) * m
    return torch.stack([w, w.flip(-1)], 1)


def build_judge_set(s: PretrainSettings, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, R, R) uint8 class-labelled phantoms of both devices (labels index PHANTOM_CLASSES)."""
    from meddap.data.phantom import PHANTOM_CLASSES, make_phantom_image, phantom_image_rng

    images, labels = [], []
    for variant in ("standard", "shifted"):
        for label, c in enumerate(PHANTOM_CLASSES):
            for i in range(1, per_class + 1):
                grey, _ = make_phantom_image(c, phantom_image_rng(seed, variant, c, i), s.scan_size, variant)
                images.append(_resize(grey, s.resolution))
                labels.append(label)
    return np.stack(images), np.asarray(labels)


def _judge_augment(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One training view: flip, half the time an adjective's transform, sometimes blur (decoded
    synthetic images are smoother than scans)."""
    from scipy import ndimage

    from meddap.diffusion.captions import ADJECTIVES, apply_adjective

    x = grey[:, ::-1] if rng.uniform() < 0.5 else grey
    if rng.uniform() < 0.5:
        rgb = apply_adjective(np.repeat(x[..., None], 3, axis=2), str(rng.choice(ADJECTIVES)), rng)
        x = np.clip(np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)
    if rng.uniform() < 0.3:
        x = ndimage.gaussian_filter(x.astype(np.float32), rng.uniform(0.4, 1.2)).round().astype(np.uint8)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> Any | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
def _to_pixels(rgb: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _train_vae(s: PretrainSettings, images: np.ndarray, work: Path, log) -> tuple[Any, dict]:
    from diffusers import AutoencoderKL

    from meddap.progress import Progress

    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**PHANTOM_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    ckpt_path = work / "vae.pt"
    state = _load(ckpt_path)
    losses: list[tuple[int, float, float]] = []
    start = 0
    clock = _PhaseClock(state)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        losses, start = state["losses"], state["step"]
        log(f"[pretrain] vae: resuming at step {start}/{s.vae_steps}")
    vae.train()
    progress = Progress(s.vae_steps - start, "pretrain vae", "steps", every_s=30.0)
    n, r, c = len(images), s.resolution, s.vae_crop
    for step in range(start, s.vae_steps):
        rng = _rng(s.seed, "vae", step)
        idx = rng.integers(0, n, s.vae_batch)
        ys, xs = rng.integers(0, r - c + 1, s.vae_batch), rng.integers(0, r - c + 1, s.vae_batch)
        crops = np.stack([images[i, y:y + c, x:x + c] for i, y, x in zip(idx, ys, xs)])
        x = _to_pixels(crops)                                             # (B, 3, c, c)
        lr = s.vae_lr * 0.5 * (1 + math.cos(math.pi * step / s.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=_torch_gen(s.seed, "vae-z", step))
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean()
        loss = l1 + s.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((step + 1, float(l1.detach()), float(kl.detach())))
        progress.update(extra=f"L1 {losses[-1][1]:.4f}")
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.vae_steps:
            _save_atomic({"model": vae.state_dict(), "optimizer": opt.state_dict(), "losses": losses,
                          "step": step + 1, **clock.state()}, ckpt_path)
    vae.eval()
    tail = losses[-min(100, len(losses)):]
    return vae, {"steps": s.vae_steps, "final_l1": float(np.mean([l for _, l, _ in tail])),
                 "final_kl": float(np.mean([k for _, _, k in tail])), "loss_window": len(tail), **clock.record()}


@torch.no_grad()
def _encode(vae, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every image and of its mirror: (N, 2, 4, h, w) each."""
    means, stds = [], []
    for flip in (False, True):
        m, sd = [], []
        for i in range(0, len(images), batch):
            x = _to_pixels(images[i:i + batch])
            if flip:
                x = x.flip(-1)
            post = vae.encode(x).latent_dist
            m.append(post.mean), sd.append(post.std)
        means.append(torch.cat(m)), stds.append(torch.cat(sd))
    return torch.stack(means, 1), torch.stack(stds, 1)


class _PhaseClock:
    """Wall time of a resumable phase across sessions: each checkpoint carries the seconds spent so far.
    A checkpoint written before this was recorded carries none: its steps are counted as untimed."""

    def __init__(self, state: dict | None):
        self.before = float(state.get("seconds", 0.0)) if state else 0.0
        self.untimed_steps = int(state.get("untimed_steps", 0 if "seconds" in state else state["step"])) if state else 0
        self.t0 = time.perf_counter()

    def state(self) -> dict:
        return {"seconds": self.before + time.perf_counter() - self.t0, "untimed_steps": self.untimed_steps}

    def record(self) -> dict:
        return {"resumed_seconds": self.before, "untimed_steps": self.untimed_steps}


def _ema_update(ema: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], decay: float) -> None:
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            key = f"{name}.{k}"
            if v.dtype.is_floating_point:
                ema[key].mul_(decay).add_(v, alpha=1.0 - decay)
            else:
                ema[key].copy_(v)


def _train_unet(s: PretrainSettings, latents: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor,
                scaling_factor: float, vocab_size: int, special: dict, frozen_ids: list[int], work: Path,
                log, weights: torch.Tensor) -> tuple[Any, Any, dict]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from meddap.diffusion.base import sd14_config
    from meddap.progress import Progress

    torch.manual_seed(s.seed + 1)
    unet = UNet2DConditionModel(**PHANTOM_UNET)
    torch.manual_seed(s.seed + 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **special, **PHANTOM_TEXT))
    # Filler (and class) words keep their random embeddings: their rows get no gradient, so with no weight
    # decay AdamW never moves them. The model learns to read such words as meaningless.
    frozen = torch.zeros(vocab_size, 1)
    frozen[torch.as_tensor(frozen_ids, dtype=torch.long)] = 1.0
    text.get_input_embeddings().weight.register_hook(lambda g: g * (1.0 - frozen))
    scheduler = DDPMScheduler.from_config(sd14_config("scheduler"))
    params = list(unet.parameters()) + list(text.parameters())
    # No weight decay: the class words' embeddings get no gradient and must stay as initialised.
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.0)
    modules = {"unet": unet, "text_encoder": text}
    ema = {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.state_dict().items()}
    ckpt_path = work / "unet.pt"
    state = _load(ckpt_path)
    losses: list[tuple[int, float]] = []      # (step, the weighted loss it optimised)
    plain: list[float] = []                    # SD's unweighted epsilon MSE of the same batches
    start = 0
    clock = _PhaseClock(state)
    if state is not None:
        plain = state.get("plain_losses", [])
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema, losses, start = state["ema"], state["losses"], state["step"]
        log(f"[pretrain] unet: resuming at step {start}/{s.unet_steps}")
    unet.train(), text.train()
    mean, std = latents
    n = mean.shape[0]
    progress = Progress(s.unet_steps - start, "pretrain unet", "steps", every_s=30.0)
    for step in range(start, s.unet_steps):
        g = _torch_gen(s.seed, "unet", step)
        idx = torch.randint(0, n, (s.unet_batch,), generator=g)
        flip = (torch.rand(s.unet_batch, generator=g) < 0.5).long()
        m, sd = mean[idx, flip], std[idx, flip]                          # (B, 4, h, w)
        z = (m + sd * torch.randn(m.shape, generator=g)) * scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.unet_batch,), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        lr = s.unet_lr * min(1.0, (step + 1) / s.unet_warmup)
        lr *= 0.55 + 0.45 * math.cos(math.pi * step / s.unet_steps)  # cosine down to 10 % of the peak
        for group in opt.param_groups:
            group["lr"] = lr
        cond = text(token_ids[idx])[0]                                    # (B, L, D)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        w = weights[idx, flip]                                            # (B, 1, h, w)
        err = (pred - noise).pow(2)
        loss = (err * w).mean() / w.mean()          # lesion-weighted; = F.mse_loss when lesion_weight is 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, modules, min(s.ema_decay, (1.0 + step) / (10.0 + step)))
        losses.append((step + 1, float(loss.detach())))
        plain.append(float(err.detach().mean()))
        progress.update(extra=f"loss {np.mean([v for _, v in losses[-50:]]):.4f}")
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.unet_steps:
            _save_atomic({"unet": unet.state_dict(), "text_encoder": text.state_dict(),
                          "optimizer": opt.state_dict(), "ema": ema, "losses": losses, "plain_losses": plain,
                          "step": step + 1,
                          **clock.state()}, ckpt_path)
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in ema.items() if k.startswith(name + ".")})
    unet.eval(), text.eval()
    tail = losses[-min(200, len(losses)):]
    return unet, text, {"steps": s.unet_steps, "final_loss": float(np.mean([v for _, v in tail])),
                        "final_plain_mse": float(np.mean(plain[-len(tail):])) if plain else None,
                        "loss_window": len(tail), "losses_every_100": [v for k, v in losses if k % 100 == 0],
                        **clock.record()}


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative posix paths), except the record and work files."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != PRETRAIN_RECORD and not rel.startswith(WORK_DIR):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------
def pretrain_base(out: str | os.PathLike, settings: PretrainSettings | None = None,
                  log: Callable[[str], None] = print, keep_work: bool = False, overwrite: bool = False) -> dict:
    """Run the recipe into `out` (see the module docstring); returns the record it writes."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTokenizer

    from meddap.classify.judge import save_judge, train_judge
    from meddap.data.phantom import PHANTOM_CLASSES
    from meddap.diffusion.base import sd14_config

    s = settings or PretrainSettings()
    out = Path(out).expanduser().absolute()
    work = out / WORK_DIR
    if s.threads < 1:
        raise MeddapError(f"pretrain-base --threads {s.threads}: give a positive number of torch CPU threads.")
    # A finished model (its record) or a folder of other files is never written over: one stray command
    # must not replace hours of pretraining. An unfinished run of this recipe (OUT/.work) resumes.
    others = sorted(p.name for p in out.iterdir() if p.name != WORK_DIR) if out.is_dir() else []
    if others and not overwrite:
        what = "a finished model (meddap_pretrain.json)" if PRETRAIN_RECORD in others else \
            "other files (" + ", ".join(others[:4]) + (", ..." if len(others) > 4 else "") + ")"
        raise MeddapError(f"{out} already holds {what}; choose an empty or new OUT, or pass --overwrite to "
                          f"replace it.")
    work.mkdir(parents=True, exist_ok=True)
    settings_file = work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != s.to_dict():
        raise MeddapError(f"{work} holds a pretraining run with other settings; delete {out} (or choose another OUT) "
                          "to start afresh.")
    settings_file.write_text(json.dumps(s.to_dict(), indent=1))
    torch.set_num_threads(s.threads)
    timings: dict[str, float] = {}
    spent_before = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}

    def phase_done(name: str, t0: float, resumed_seconds: float = 0.0) -> None:
        # resumed_seconds: the time earlier sessions spent in this unfinished phase, up to its last checkpoint
        # (a phase an earlier session finished is in spent_before already)
        resumed_seconds = 0.0 if name in spent_before else resumed_seconds
        timings[name] = spent_before.get(name, 0.0) + resumed_seconds + time.perf_counter() - t0
        (work / "timings.json").write_text(json.dumps({**spent_before, **timings}, indent=1))
        log(f"[pretrain] {name}: {timings[name]:.0f}s")

    # 1. corpus
    t0 = time.perf_counter()
    corpus_file = work / "corpus.npz"
    if corpus_file.is_file():
        with np.load(corpus_file) as z:
            images, captions, masks = z["images"], [str(c) for c in z["captions"]], z["masks"]
    else:
        images, captions, masks = build_phantom_corpus(s, log)
        np.savez(work / "corpus.tmp.npz", images=images, captions=np.asarray(captions), masks=masks)
        os.replace(work / "corpus.tmp.npz", corpus_file)
    phase_done("corpus", t0)

    # tokenizer
    tok_dir = work / "tokenizer"
    write_word_tokenizer(tok_dir, max_length=PHANTOM_TEXT["max_position_embeddings"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    token_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids                  # (N, L)
    special = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                   eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                   pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    # 2. VAE
    t0 = time.perf_counter()
    vae, vae_record = _train_vae(s, images, work, log)
    latents_file = work / "latents.pt"
    if latents_file.is_file():
        latents = torch.load(latents_file, map_location="cpu", weights_only=True)
    else:
        latents = _encode(vae, images)
        _save_atomic(latents, latents_file)
    scaling = float(1.0 / latents[0][:, 0].std())
    vae.register_to_config(scaling_factor=scaling)
    vae_record["scaling_factor"] = scaling
    phase_done("vae", t0, vae_record["resumed_seconds"])

    # 3. UNet + text encoder
    t0 = time.perf_counter()
    from meddap.diffusion.captions import FILLER_WORDS

    frozen_words = list(FILLER_WORDS) + list(_PROMPT_WORDS)
    frozen_ids = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in frozen_words]
    weights = lesion_loss_weights(masks, latents[0].shape[-1], s.lesion_weight)
    unet, text, unet_record = _train_unet(s, latents, token_ids, scaling, len(tokenizer), special, frozen_ids, work,
                                          log, weights)
    unet_record["frozen_embeddings"] = frozen_words
    phase_done("unet", t0, unet_record["resumed_seconds"])

    # 4. judge
    t0 = time.perf_counter()
    train_x, train_y = build_judge_set(s, s.judge_per_class, s.judge_seed)
    held_x, held_y = build_judge_set(s, s.judge_held_out, s.judge_seed + 1)
    judge_ckpt = work / "judge.pt"
    judge, judge_record = train_judge(
        train_x, train_y, PHANTOM_CLASSES, epochs=s.judge_epochs, batch_size=s.judge_batch, lr=s.judge_lr,
        seed=s.judge_seed, augment=_judge_augment, held_out=(held_x, held_y), log=log, image_size=s.resolution,
        state=_load(judge_ckpt), on_epoch=lambda st: _save_atomic(st, judge_ckpt))
    phase_done("judge", t0)

    # 5. save
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "judge"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(sd14_config("scheduler")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    judge_data = {"train": f"{s.judge_per_class} per class x (standard, shifted), seed {s.judge_seed}",
                  "held_out": f"{s.judge_held_out} per class x (standard, shifted), seed {s.judge_seed + 1}",
                  "augmentation": "flip; an adjective transform (p 0.5); Gaussian blur sigma 0.4-1.2 (p 0.3)"}
    # judge.json is one of the hashed model files: no wall times in it (they go to the record below).
    judge_history = [{k: v for k, v in row.items() if k != "seconds"} for row in judge_record["history"]]
    save_judge(judge, out / "judge", {"trained_on": judge_data, "history": judge_history,
                                      "held_out_accuracy": judge_record["history"][-1].get("held_out_accuracy")})
    wall = sum({**spent_before, **timings}.values())  # phases of every (resumed) session
    n_params = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
                "text_encoder": sum(p.numel() for p in text.parameters()),
                "judge": sum(p.numel() for p in judge.parameters())}
    adjective_count = sum(1 for c in captions if c.split(" ")[0] in ("colorful", "stylized", "high-contrast",
                                                                      "low-contrast", "posterized", "sheared",
                                                                      "solarized", "bright", "dark"))
    record = {
        "model": "builtin:phantom",
        "command": _command(s),
        "settings": s.to_dict(),
        "architecture": {"unet": PHANTOM_UNET, "vae": PHANTOM_VAE, "text_encoder": PHANTOM_TEXT,
                         "tokenizer_words": list(TOKENIZER_WORDS), "parameters": n_params},
        "data": {"corpus": f"{s.corpus_size} unlabeled phantom scans (meddap.data.phantom.make_phantom_scan), "
                           f"a new random device each, {s.lesion_share:.0%} with a lesion described by look "
                           f"(random_lesion_shape), made at {s.scan_size} px and resized to {s.resolution} px",
                 "captions_with_adjective": adjective_count, "empty_captions": sum(1 for c in captions if not c),
                 "distinct_captions": len(set(captions)), "caption_examples": captions[:8],
                 "judge": judge_data},
        "seed": s.seed,
        "steps": {"vae": s.vae_steps, "unet": s.unet_steps, "judge_epochs": s.judge_epochs},
        "final_losses": {"vae_l1": vae_record["final_l1"], "vae_kl": vae_record["final_kl"],
                         "unet_mse": unet_record["final_plain_mse"],       # SD's plain loss
                         "unet_weighted_loss": unet_record["final_loss"],  # what it optimised (lesion_weight)
                         "judge_cross_entropy": judge_record["history"][-1]["loss"]},
        "vae": vae_record, "unet": unet_record, "judge": judge_record,
        "judge_held_out_accuracy": judge_record["history"][-1].get("held_out_accuracy"),
        "wall_seconds": {"total": wall, **{**spent_before, **timings}},
        # steps of a phase interrupted before checkpoints carried their time: not in wall_seconds
        "untimed_steps": {name: rec["untimed_steps"] for name, rec in (("vae", vae_record), ("unet", unet_record))
                          if name not in spent_before and rec["untimed_steps"]},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": s.threads},
        "versions": _versions(),
    }
    record["files"] = file_hashes(out)
    (out / PRETRAIN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[pretrain] wrote {out} in {wall:.0f}s: unet loss {unet_record['final_loss']:.4f}, vae L1 "
        f"{vae_record['final_l1']:.4f}, judge held-out accuracy {record['judge_held_out_accuracy']:.3f}")
    return record


def parse_setting_overrides(items: list[str] | None) -> dict:
    """`pretrain-base --set KEY=VALUE` items -> {key: value}, each value of its setting's type. An unknown
    key or a value of the wrong type is a MeddapError naming the setting and the known ones."""
    recipe = PretrainSettings().to_dict()               # each setting's default gives its type
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MeddapError(f"pretrain-base --set {item!r}: expected KEY=VALUE, e.g. --set filler_share=0")
        if key not in recipe:
            raise MeddapError(f"pretrain-base --set {item!r}: unknown setting {key!r}; known: {sorted(recipe)}")
        if key in ("seed", "threads"):
            raise MeddapError(f"pretrain-base --set {item!r}: give the {key} with --{key}")
        kind = type(recipe[key])
        try:
            out[key] = kind(raw) if kind is not int else int(raw, 10)
        except ValueError:
            raise MeddapError(f"pretrain-base --set {item!r}: {key} takes a {kind.__name__} "
                              f"(the recipe's is {recipe[key]!r})") from None
    return out


def _command(s: PretrainSettings) -> str:
    """The pretrain-base command line that makes these settings (--quick, --seed, --threads, --set)."""
    def changed(preset: PretrainSettings) -> dict:
        return {f.name: getattr(s, f.name) for f in dataclasses.fields(PretrainSettings)
                if f.name not in ("seed", "threads") and getattr(s, f.name) != getattr(preset, f.name)}

    quick = not changed(settings_from(True))           # the --quick preset exactly, else the recipe's + --set
    preset = settings_from(quick)
    return ("python -m meddap pretrain-base OUT" + (" --quick" if quick else "")
            + (f" --seed {s.seed}" if s.seed != preset.seed else "")
            + (f" --threads {s.threads}" if s.threads != preset.threads else "")
            + "".join(f" --set {k}={v}" for k, v in changed(preset).items()))


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def settings_from(quick: bool = False, **overrides) -> PretrainSettings:
    """The shipped settings, or the smoke test's (`quick`), with `overrides`."""
    base = dict(QUICK_SETTINGS) if quick else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(PretrainSettings)}
    unknown = sorted(set(base) - names)
    if unknown:
        raise MeddapError(f"unknown pretraining settings {unknown}; known: {sorted(names)}")
    return PretrainSettings(**base)
