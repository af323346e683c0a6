"""USLoRA fine-tuning core: plain PyTorch, no Ray.

`LoraFinetuner` trains a LoRA adapter on a frozen Stable Diffusion with the paper's objective
(equation 1): MSE between the noise added at a random timestep and the UNet's prediction of it (or
of the velocity, when the scheduler's `prediction_type` is `v_prediction`). One epoch at a time
(`train_epoch`), with a `state_dict()` that holds everything a resumed run needs (LoRA weights,
optimizer, step, epoch, RNG, losses), so the Ray Train stage can checkpoint each epoch and the
benchmark can time steps without Ray.

Data parallelism is plain `torch.distributed`: when a process group is up (Ray Train sets one), each
rank takes its share of every step's global batch and the LoRA gradients (~0.4 M numbers on SD-1.4,
not the 860 M frozen weights) are averaged with one all_reduce per step.

No host work per step: the images (or their cached latents), the prompts' token ids or embeddings,
the epoch's index order and the random stream (flips, VAE posterior samples, noise, timesteps) all
live on the training device; the stream is a device generator reseeded from (seed, rank, epoch). Each
step's loss stays on the device and the epoch's losses are read once at its end (one host sync per
epoch, not one per step). On CUDA the optimizer is fused AdamW, which applies the fp16 loss scaler's
inf/nan check on the device instead of reading it back each step. On the CPU the stream, the order of
draws and the arithmetic are the same as the step-by-step host version this replaced.

With `class_words` (diffusion.lora.class_words, off by default: the paper's USLoRA freezes the text
encoder) the input-embedding rows of the tokens that differ between the class prompts train too, as in
textual inversion: the text encoder then encodes the P class prompts once per step with gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from meddap import logs
from meddap.config import ConfigError
from meddap.diffusion.class_words import varying_token_ids
from meddap.device import native_bf16
from meddap.diffusion.lora import add_uslora, count_trainable, load_lora_state, lora_parameters, lora_state

__all__ = [
    "FinetuneSettings",
    "Example",
    "LoraFinetuner",
    "training_prompt",
    "class_prompts",
    "load_image",
    "to_sd_pixels",
    "resolve_precision",
]


@dataclass(frozen=True)
class Example:
    """One training image: its file and the prompt of its class."""
    path: str
    prompt: str


@dataclass
class FinetuneSettings:
    """The settings of one adapter's training (from `diffusion.*` of the config)."""
    resolution: int = 224
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 1
    random_flip: bool = True
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    seed: int = 0
    rank: int = 4
    alpha: float | None = None
    targets: str = "cross_attention"
    class_words: bool = False
    class_word_lr: float = 5e-3

    @classmethod
    def from_config(cls, cfg, rank: int | None = None) -> "FinetuneSettings":
        d, t = cfg.diffusion, cfg.diffusion.train
        ranks = d.lora.ranks
        if rank is None:
            if len(ranks) != 1:
                raise ConfigError(f"config key 'diffusion.lora.rank' = {d.lora.rank!r}: finetune trains one rank; "
                                  "give one (e.g. diffusion.lora.rank=4). `run` selects among a list of ranks.")
            rank = ranks[0]
        return cls(resolution=d.resolution, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                   random_flip=t.random_flip, mixed_precision=t.mixed_precision,
                   gradient_checkpointing=t.gradient_checkpointing, cache_latents=t.cache_latents,
                   seed=t.seed, rank=rank, alpha=d.lora.alpha, targets=d.lora.targets,
                   class_words=d.lora.class_words, class_word_lr=t.class_word_lr)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """to_dict() less the class-word keys while class_words is off: they change nothing then, and an
        adapter made before the option existed keeps its identity (made_from, Ray run name)."""
        d = self.to_dict()
        if not self.class_words:
            d.pop("class_words"), d.pop("class_word_lr")
        return d


# ---------------------------------------------------------------------------------------------
# Prompts and images
# ---------------------------------------------------------------------------------------------
def training_prompt(template: str, class_phrase: str) -> str:
    """Fill `{class_phrase}`; words joined by exactly one space (the authors' code glued words).

    >>> training_prompt("ultrasound image of {class_phrase} tumor in the breast", "no")
    'ultrasound image of no tumor in the breast'
    """
    if "{class_phrase}" not in template:
        raise ConfigError(f"config key 'diffusion.prompt_template' = {template!r} must contain {{class_phrase}}.")
    try:
        text = template.format(class_phrase=class_phrase.strip())
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"config key 'diffusion.prompt_template' = {template!r}: only {{class_phrase}} is "
                          f"filled in at training time ({type(e).__name__}: {e}).") from None
    return " ".join(text.split())


def class_prompts(cfg) -> dict[str, str]:
    """Training prompt of each class in `data.classes`."""
    phrases = cfg.diffusion.class_phrases
    missing = [c for c in cfg.data.classes if c not in phrases]
    if missing:
        raise ConfigError(f"config key 'diffusion.class_phrases' has no phrase for {missing}.")
    return {c: training_prompt(cfg.diffusion.prompt_template, phrases[c]) for c in cfg.data.classes}


def to_sd_pixels(grey: torch.Tensor) -> torch.Tensor:
    """(..., R, R) uint8 grey -> (..., 3, R, R) float in [-1, 1]: grey replicated as SD wants RGB.
    The one pixel transform of fine-tuning; `_pixel_batch` applies it to a batch."""
    x = grey.float().div(127.5).sub(1.0)
    return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:])


def load_image(path: str, resolution: int) -> torch.Tensor:
    """(3, R, R) float in [-1, 1]: the canonical grey image of `path`, resized, through `to_sd_pixels`."""
    from meddap.data.decode import read_grey

    grey = torch.from_numpy(np.ascontiguousarray(read_grey(path, resolution)))  # (R, R) uint8
    return to_sd_pixels(grey).contiguous()


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
def resolve_precision(mixed_precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None, bool]:
    """(dtype of frozen weights, autocast dtype or None, use a GradScaler).

    CUDA: auto -> bf16 with no loss scaling where the GPU has bf16 in hardware (Ampere and newer), else
    fp16 with loss scaling (the paper's setting on its 2080 Ti); fp16 -> fp16 with loss scaling;
    bf16 -> bf16 where native, else fp16 with loss scaling and a note (emulated bf16 is slower than
    fp16); no -> fp32.
    CPU: always fp32 (CPU half-precision kernels are slow or missing); asking otherwise is noted.
    """
    if mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ConfigError(f"config key 'diffusion.train.mixed_precision' = {mixed_precision!r}: expected auto, no, fp16 or bf16.")
    if device.type != "cuda":
        if mixed_precision in ("fp16", "bf16"):
            logs.say(f"[finetune] mixed_precision={mixed_precision} applies on CUDA only; training in fp32 on {device}.")
        return torch.float32, None, False
    if mixed_precision == "no":
        return torch.float32, None, False
    if mixed_precision in ("auto", "bf16") and native_bf16(device):
        return torch.bfloat16, torch.bfloat16, False
    if mixed_precision == "bf16":
        print(f"[finetune] mixed_precision=bf16: {torch.cuda.get_device_name(device)} has no native bf16 (only "
              "emulated, slower than fp16); training in fp16 with loss scaling instead.", flush=True)
    return torch.float16, torch.float16, True


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move, and cast only when the dtype changes (diffusers warns on no-op casts)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class LoraFinetuner:
    """Trains one USLoRA adapter. `components` as from `meddap.diffusion.base.load_components`.

    The UNet is modified in place (LoRA added, base frozen). `rank`/`world_size` default to the
    torch.distributed process group when one is up.
    """

    def __init__(self, components: dict[str, Any], examples: Sequence[Example], settings: FinetuneSettings,
                 device: str | torch.device = "cpu", rank: int | None = None, world_size: int | None = None):
        if not examples:
            raise ValueError("no training images")
        if settings.epochs < 1:
            raise ConfigError(f"config key 'diffusion.train.epochs' = {settings.epochs!r}: expected an integer >= 1.")
        if settings.batch_size < 1:
            raise ConfigError(f"config key 'diffusion.train.batch_size' = {settings.batch_size!r}: expected >= 1.")
        dist = _dist()
        self.rank = rank if rank is not None else (dist.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if dist else 1)
        self.settings = settings
        self.examples = list(examples)
        self.device = torch.device(device)
        self.weight_dtype, self.amp_dtype, use_scaler = resolve_precision(settings.mixed_precision, self.device)

        self.unet = components["unet"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.noise_scheduler = components["noise_scheduler"]
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported "
                             "(epsilon or v_prediction)")
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.scaling_factor = self.vae.config.scaling_factor
        self.shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0

        # Frozen parts in the training dtype; the VAE stays fp32 when its config asks (SD's VAE
        # overflows in fp16).
        vae_dtype = torch.float32 if getattr(self.vae.config, "force_upcast", False) else self.weight_dtype
        _move(self.vae.requires_grad_(False).eval(), self.device, vae_dtype)
        # With class words the text encoder runs every step on the P class prompts, in fp32 so the learned
        # rows train in fp32 (P <= a few prompts: its cost is small beside the UNet's).
        _move(self.text_encoder.requires_grad_(False).eval(), self.device,
              torch.float32 if settings.class_words else self.weight_dtype)

        # Same seed on every rank -> identical LoRA init everywhere (also broadcast below).
        torch.manual_seed(settings.seed)
        add_uslora(self.unet, settings.rank, settings.alpha, settings.targets)
        _move(self.unet, self.device, self.weight_dtype)
        for p in lora_parameters(self.unet):
            p.data = p.data.float()  # LoRA weights (and so their grads and Adam moments) stay fp32
        if settings.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.params = lora_parameters(self.unet)
        self.trainable, self.total, self.share = count_trainable(self.unet)
        if dist and self.world_size > 1:
            for p in self.params:
                dist.broadcast(p.data, src=0)

        # Fused AdamW on CUDA: one kernel, and the loss scaler's inf/nan check stays on the device
        # (the unfused step reads it back to the host every step).
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, **fused)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.generator = torch.Generator(device=self.device)
        self._reseed(0)
        self.step = 0
        self.epoch = 0  # completed epochs
        self.losses: list[tuple[int, int, float]] = []  # (epoch, step, loss), mean over ranks

        self._prepare_data()
        self.word_ids: torch.Tensor | None = None     # (K,) token ids of the class words, when learned
        self.word_rows: torch.nn.Parameter | None = None  # (K, D) fp32: their embeddings, trained
        if settings.class_words:
            self._init_class_words()

    # -- class words (diffusion.lora.class_words) ---------------------------------------------
    def _init_class_words(self) -> None:
        """Learn the input-embedding rows of the tokens that tell the class prompts apart. The rows are
        their own small parameter (K, D), not the whole (V, D) table under a gradient mask: same AdamW
        arithmetic (elementwise; no weight decay), but the optimizer state, the checkpoints and the
        per-step all_reduce hold K rows, not the vocabulary (49408 x 768 on SD-1.4)."""
        ids = varying_token_ids(self.tokens.cpu())
        if not ids:
            raise ConfigError(
                f"config key 'diffusion.lora.class_words' = true learns the words that differ between the class "
                f"prompts, but this adapter's training prompts {self.prompts} have none (one class, or prompts "
                "identical after tokenizing). Set diffusion.lora.class_words=false, or give the classes different "
                "diffusion.class_phrases.")
        emb = self.text_encoder.get_input_embeddings()
        self._embedding_name = next(n for n, p in self.text_encoder.named_parameters() if p is emb.weight)
        self.word_ids = torch.tensor(ids, device=self.device)
        self.word_rows = torch.nn.Parameter(emb.weight.detach()[self.word_ids].float().clone())  # (K, D)
        dist = _dist()
        if dist and self.world_size > 1:
            dist.broadcast(self.word_rows.data, src=0)
        self.optimizer.add_param_group({"params": [self.word_rows], "lr": self.settings.class_word_lr,
                                        "weight_decay": 0.0})

    def _prompt_text(self) -> torch.Tensor:
        """(P, L, D) conditioning of every class prompt with the learned rows, differentiable in them:
        one text-encoder pass per step over the P prompts (not one per image)."""
        table = self.text_encoder.get_input_embeddings().weight.detach()
        table = table.index_put((self.word_ids,), self.word_rows.to(table.dtype))  # (V, D)
        out = torch.func.functional_call(self.text_encoder, {self._embedding_name: table}, (self.tokens,))
        return out[0].to(self.weight_dtype)

    @torch.no_grad()
    def _write_word_rows(self) -> None:
        """Copy the learned rows into the text encoder's table, so `text_encoder` (and whatever pipeline
        holds it, e.g. bench fidelity's) always encodes the words as trained so far."""
        if self.word_rows is not None:
            weight = self.text_encoder.get_input_embeddings().weight
            weight[self.word_ids] = self.word_rows.detach().to(weight.device, weight.dtype)

    def learned_words(self) -> dict[str, torch.Tensor]:
        """{token as the tokenizer spells it ("benign</w>"): (D,) fp32 vector} of the learned class words;
        {} when diffusion.lora.class_words is off."""
        if self.word_rows is None:
            return {}
        names = self.tokenizer.convert_ids_to_tokens(self.word_ids.tolist())
        return {n: r.detach().to("cpu", torch.float32).clone() for n, r in zip(names, self.word_rows)}

    # -- data ---------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        s = self.settings
        prompts = sorted({e.prompt for e in self.examples})
        self._prompt_index = {p: i for i, p in enumerate(prompts)}
        self.prompt_ids = torch.tensor([self._prompt_index[e.prompt] for e in self.examples],
                                       device=self.device)  # (N,)
        self.prompts = prompts
        self.tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids.to(self.device)  # (P, 77)
        # Decode every image once: the set is small (545 x 224^2 bytes for the paper) and reading files
        # every epoch is waste.
        from meddap.data.decode import read_grey

        self.pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(read_grey(e.path, s.resolution)))
                                   for e in self.examples])  # (N, R, R) uint8 grey
        self.cached_text = self._encode_text(torch.arange(len(prompts)))  # always small: one row per class
        self.latent_mean = self.latent_std = None
        if s.cache_latents:
            means, stds = [], []
            flips = (False, True) if s.random_flip else (False,)
            for flip in flips:
                m, sd = [], []
                for i in range(0, len(self.examples), 8):
                    idx = torch.arange(i, min(i + 8, len(self.examples)))
                    mean, std = self._encode_images(idx, torch.full((len(idx),), flip))
                    m.append(mean), sd.append(std)
                means.append(torch.cat(m)), stds.append(torch.cat(sd))
            self.latent_mean = torch.stack(means, 1)  # (N, F, 4, R/8, R/8), F = 2 with flips
            self.latent_std = torch.stack(stds, 1)
            if self.device.type == "cuda":
                # Encoders have done their work: free their GPU memory for the UNet (the text encoder
                # still encodes the class prompts every step when class words are learned).
                self.vae.to("cpu")
                if not s.class_words:
                    self.text_encoder.to("cpu")
                torch.cuda.empty_cache()
        else:
            self.pixels = self.pixels.to(self.device)  # encoded every step: keep the uint8 images on the device

    def _pixel_batch(self, idx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        grey = self.pixels[idx.to(self.pixels.device)]  # (B, R, R) uint8
        grey = torch.where(flips.to(grey.device).view(-1, 1, 1), grey.flip(-1), grey)
        return to_sd_pixels(grey)  # (B, 3, R, R) in [-1, 1]

    @torch.no_grad()
    def _encode_images(self, idx: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE's latent distribution: (B, 4, R/8, R/8) each, fp32."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self._pixel_batch(idx, flips).to(self.device, vae_dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def _encode_text(self, prompt_idx: torch.Tensor) -> torch.Tensor:
        ids = self.tokens[prompt_idx.to(self.device)]
        return self.text_encoder(ids)[0].to(self.weight_dtype)  # (B, 77, D) last hidden state

    # -- schedule -----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / (self.settings.batch_size * self.world_size))

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.settings.epochs

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Global order of the epoch, the same on every rank, padded by wrapping to whole steps."""
        order = np.random.default_rng([self.settings.seed, epoch]).permutation(len(self.examples))
        need = self.steps_per_epoch * self.settings.batch_size * self.world_size
        return np.resize(order, need)

    # -- training -----------------------------------------------------------------------------
    def _reseed(self, epoch: int) -> None:
        """Noise, timesteps and flips come from a stream seeded by (seed, rank, epoch): an epoch is
        reproduced exactly on resume, whatever happened before it."""
        self.generator.manual_seed(int(np.random.default_rng([self.settings.seed, self.rank, epoch]).integers(2**62)))

    def _latents(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B,) example indices on the device. Every draw comes from the device generator."""
        b = len(idx)
        if self.settings.random_flip:
            flips = torch.rand(b, generator=self.generator, device=self.device) < 0.5
        else:
            flips = torch.zeros(b, dtype=torch.bool, device=self.device)
        if self.latent_mean is not None:
            f = flips.long()
            mean, std = self.latent_mean[idx, f], self.latent_std[idx, f]
        else:
            mean, std = self._encode_images(idx, flips)
        eps = torch.randn(mean.shape, generator=self.generator, device=self.device)
        latents = mean + std * eps  # a sample of the VAE posterior, as without caching
        return (latents - self.shift_factor) * self.scaling_factor  # (B, 4, R/8, R/8)

    def _text(self, idx: torch.Tensor) -> torch.Tensor:
        pid = self.prompt_ids[idx]
        if self.word_rows is not None:
            return self._prompt_text()[pid]  # (B, L, D)
        if self.settings.cache_latents:
            return self.cached_text[pid]
        return self._encode_text(pid)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict: the noise (epsilon) or the velocity (v_prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, t)

    def loss_on(self, idx: torch.Tensor) -> torch.Tensor:
        """Equation (1) on the examples `idx`: || target - unet(z_t, t, c) ||^2, mean over elements."""
        idx = idx.to(self.device)
        latents = self._latents(idx)  # (B, 4, h, w)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        t = torch.randint(0, self.num_train_timesteps, (len(idx),), generator=self.generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = self.target(latents, noise, t)
        cond = self._text(idx)  # (B, 77, D)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            pred = self.unet(noisy.to(self.weight_dtype), t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def eval_loss(self, seed: int = 12345, repeats: int = 4) -> float:
        """Equation (1) averaged over every example `repeats` times with fixed noise and timesteps:
        a comparable number before and after training (the training loss itself is noisy)."""
        saved = self.generator.get_state()
        self.generator.manual_seed(seed)
        losses = [self.loss_on(torch.tensor([i], device=self.device))
                  for _ in range(repeats) for i in range(len(self.examples))]
        self.generator.set_state(saved)
        return float(torch.stack(losses).double().mean().item())

    def _sync_grads(self) -> None:
        dist = _dist()
        if not dist or self.world_size == 1:
            return
        params = self.params + ([self.word_rows] if self.word_rows is not None else [])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """(S,) per-step losses of this rank -> their mean over ranks, in one all_reduce."""
        dist = _dist()
        if not dist or self.world_size == 1:
            return values
        t = values.double()
        dist.all_reduce(t)
        return t / self.world_size

    def train_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step on examples `idx`; returns the loss as a detached device tensor (reading
        it would cost a host sync: `train_epoch` reads an epoch's losses at once)."""
        loss = self.loss_on(idx)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            # Average before unscaling: every rank then sees the same inf/nan check and keeps the
            # same loss scale, so the replicas never diverge.
            self._sync_grads()
            self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._sync_grads()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._write_word_rows()
        self.step += 1
        return loss.detach()

    def train_epoch(self, epoch: int | None = None, max_steps: int | None = None,
                    on_step: Callable[[int], None] | None = None) -> list[tuple[int, int, float]]:
        """Run one epoch (or its first `max_steps` steps, for benchmarks). Returns (epoch, step, loss)
        rows, the loss averaged over ranks. `on_step(step)` runs after each step (progress); the
        losses are read from the device once, at the end."""
        epoch = self.epoch if epoch is None else epoch
        # One copy of the epoch's order to the device; each step slices it there.
        order = torch.from_numpy(self._epoch_order(epoch)).to(self.device)  # (steps * B * world,)
        self._reseed(epoch)
        b, w = self.settings.batch_size, self.world_size
        first_step = self.step
        losses = []
        n_steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        for s in range(n_steps):
            mine = order[(s * w + self.rank) * b:(s * w + self.rank + 1) * b]
            losses.append(self.train_step(mine))
            if on_step is not None:
                on_step(self.step)
        values = self._mean_over_ranks(torch.stack(losses)).tolist() if losses else []  # the epoch's one sync
        rows = [(epoch, first_step + i + 1, float(v)) for i, v in enumerate(values)]
        self.losses.extend(rows)
        if max_steps is None:
            self.epoch = epoch + 1
        return rows

    def fit(self, epochs: int | None = None, on_epoch: Callable[["LoraFinetuner"], None] | None = None) -> None:
        """Train from the current epoch to `epochs` (default: settings.epochs)."""
        for e in range(self.epoch, epochs or self.settings.epochs):
            self.train_epoch(e)
            if on_epoch is not None:
                on_epoch(self)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "lora": lora_state(self.unet),
            "class_words": (None if self.word_rows is None else
                            {"ids": self.word_ids.cpu(), "rows": self.word_rows.detach().cpu().clone()}),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "rng": {"seed": self.settings.seed, "scheme": "generator reseeded from (seed, rank, epoch)",
                    "generator": self.generator.get_state()},
            "losses": list(self.losses),
            "settings": self.settings.to_dict(),
            "world_size": self.world_size,
            "saved_at": time.time(),
        }

    def load_state_dict(self, state: dict) -> None:
        # Compared as identities: class_word_lr means nothing while class_words is off (the Ray run name
        # ignores it then, so such a run finds this checkpoint). A key the checkpoint lacks was added
        # later: the checkpoint had its default.
        known = FinetuneSettings().to_dict()
        theirs = FinetuneSettings(**{**known, **{k: v for k, v in state.get("settings", {}).items()
                                                 if k in known}}).identity()
        mine = self.settings.identity()
        differ = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
                  if k != "epochs" and theirs.get(k) != mine.get(k)}
        if differ:
            raise ValueError(f"checkpoint was made with other settings: {differ}")
        load_lora_state(self.unet, state["lora"])
        if self.word_rows is not None:
            words = state.get("class_words") or {}
            if [int(i) for i in words.get("ids", [])] != self.word_ids.tolist():
                raise ValueError(f"checkpoint learned other class-word tokens ({words.get('ids')}) than these "
                                 f"prompts' ({self.word_ids.tolist()})")
            with torch.no_grad():
                self.word_rows.copy_(words["rows"].to(self.word_rows.device))
            self._write_word_rows()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self._reseed(self.epoch)  # the next epoch reseeds anyway; RNG state is a function of the epoch
        self.losses = [tuple(r) for r in state["losses"]]
