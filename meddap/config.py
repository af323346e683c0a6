"""Typed, validated configuration for every meddap stage.

One `Config` holds a section per component (data, diffusion, generate, classify, fid, report, ray).
It is built from a shipped YAML (`meddap/configs/<name>.yaml`) or any YAML path, then dotted
`key=value` overrides typed by the schema. Anything unknown, mistyped or out of range is refused
before work starts, with an error naming the key, the value and what is allowed.

Ray wants plain dicts (`train_loop_config`, `param_space`): use `to_dict()` at that edge only and
rebuild with `Config.from_dict()` inside the worker.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ExternalDataConfig",
    "PhantomConfig",
    "DiffusionConfig",
    "LoraConfig",
    "DiffusionTrainConfig",
    "GenerateConfig",
    "ClassifyConfig",
    "FidConfig",
    "ReportConfig",
    "RayConfig",
    "load_config",
    "shipped_configs",
    "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).parent / "configs"

PAPER_ADJECTIVES = [
    "", "colorful", "stylized", "high-contrast", "low-contrast",
    "posterized", "sheared", "solarized", "bright", "dark",
]


class ConfigError(ValueError):
    """A configuration value that is unknown, mistyped or out of range."""


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed: expected {allowed}.")


# ---------------------------------------------------------------------------------------------
# Sections. Each field's `help` is the documentation docs/configuration.md's key table is made from.
# ---------------------------------------------------------------------------------------------
def _f(default: Any, help: str) -> Any:
    """A field with documentation; mutable defaults (lists, dicts, sections) are copied per instance."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


SOURCES = ("busi", "imagefolder", "manifest", "phantom")

# classify.gpus_per_trial=auto on a cluster with (or able to add) GPUs: 4 classifier trials share a GPU
# (one trial of the paper's ResNet34 at batch 32 uses a fraction of a modern GPU; paper.yaml packs 4 too).
AUTO_GPUS_PER_TRIAL = 0.25

# Keys that were replaced: naming one gives an error that says what to write instead.
_RENAMED = {
    "classify.checkpoint_every": "classify.checkpoint_seconds (trial checkpoints are taken by time now, "
                                 "e.g. classify.checkpoint_seconds=60; 0 = every epoch)",
}


@dataclass
class PhantomConfig:
    per_class: int = _f(60, "Images per class the in-process phantom source makes (Dataset A).")
    size: int = _f(128, "Side in pixels of phantom images.")
    variant: Literal["standard", "shifted"] = _f("standard", "'shifted' imitates another device (Dataset B).")
    seed: int = _f(0, "Seed of the phantom generator.")

    def validate(self, prefix: str) -> None:
        _check(self.per_class >= 1, f"{prefix}.per_class", self.per_class, "an integer >= 1")
        _check(16 <= self.size <= 2048, f"{prefix}.size", self.size, "an integer in [16, 2048]")


@dataclass
class ExternalDataConfig:
    source: Optional[Literal["busi", "imagefolder", "manifest", "phantom"]] = _f(
        None, "Source of the unseen test set (Dataset B); null = none.")
    root: Optional[str] = _f(None, "Folder or manifest file of Dataset B (not needed for 'phantom').")
    split: Optional[str] = _f("val", "For 'imagefolder' with root/<split>/<class>/: which split to read (Kaggle: val).")
    images_root: Optional[str] = _f(None, "For 'manifest': the folder every listed image must lie in. Relative paths are read from it, absolute paths and paths with .. that leave it are refused. null = the manifest file's folder for relative paths (which must not leave it with ..); absolute paths are then taken as they are.")
    phantom: PhantomConfig = field(
        default_factory=lambda: PhantomConfig(per_class=40, variant="shifted", seed=1),
        metadata={"help": "Phantom settings when external.source is 'phantom'."})
    exclude_overlap: bool = _f(
        True, "true: Dataset B images that copy a Dataset A image (manifest column a_overlap) are left out of the "
              "external evaluation and Table 3; the report also gives Table 3 on all of Dataset B.")
    match_min_correlation: float = _f(
        0.9, "A Dataset B image copies a Dataset A image when their 32x32 thumbnails correlate at least this much "
             "after the best alignment (rotation by 90/180/270 or a small angle, mirror, zoom). Unrelated phantom "
             "scans stay below 0.82; rotated, mirrored, rescaled and sharpened copies reach 0.94-1.0.")
    match_max_angle: float = _f(15.0, "Largest small rotation (degrees, either way) searched when matching B to A.")

    def validate(self, prefix: str) -> None:
        if self.source not in (None, "phantom"):
            _check(bool(self.root), f"{prefix}.root", self.root,
                   f"a folder or file path when {prefix}.source is '{self.source}'")
        self.phantom.validate(f"{prefix}.phantom")
        _check(0.0 < self.match_min_correlation <= 1.0, f"{prefix}.match_min_correlation",
               self.match_min_correlation, "a number in (0, 1]")
        _check(0.0 <= self.match_max_angle <= 45.0, f"{prefix}.match_max_angle", self.match_max_angle,
               "a number of degrees in [0, 45] (larger turns are covered by the 90-degree rotations)")


@dataclass
class DataConfig:
    source: Literal["busi", "imagefolder", "manifest", "phantom"] = _f(
        "phantom", "Where Dataset A comes from: busi | imagefolder | manifest | phantom.")
    root: Optional[str] = _f(None, "Folder (busi, imagefolder) or CSV/Parquet file (manifest) of Dataset A.")
    split: Optional[str] = _f(None, "For 'imagefolder' with root/<split>/<class>/: which split to read.")
    images_root: Optional[str] = _f(None, "For 'manifest': the folder every listed image must lie in. Relative paths are read from it, absolute paths and paths with .. that leave it are refused. null = the manifest file's folder for relative paths (which must not leave it with ..); absolute paths are then taken as they are.")
    classes: list[str] = _f(["benign", "malignant", "normal"],
                            "Class names in label order: label id = position here, never folder order.")
    folds: int = _f(5, "K of the K-fold cross-validation on the non-test images.")
    test_fraction: float = _f(0.15, "Share of Dataset A held out as the test split (paper: 120/780).")
    seed: int = _f(0, "Seed of the split and fold assignment.")
    image_size: int = _f(224, "Side in pixels images are resized to for training and evaluation.")
    strict: bool = _f(False, "true: any unreadable/skipped file is an error instead of a listed skip.")
    near_duplicate_bits: int = _f(
        6, "Hamming distance (of 64 perceptual-hash bits) at or under which two images are near-duplicate candidates.")
    near_duplicate_min_correlation: float = _f(
        0.95, "A candidate is a near duplicate only if the Pearson correlation of the two 32x32 thumbnails (one "
             "mirrored if that matched) reaches this; unrelated scans of one layout share many hash bits.")
    phantom: PhantomConfig = _f(PhantomConfig(), "Phantom settings when source is 'phantom'.")
    external: ExternalDataConfig = _f(ExternalDataConfig(), "The unseen test set (Dataset B).")

    def validate(self, prefix: str) -> None:
        if self.source != "phantom":
            _check(bool(self.root), f"{prefix}.root", self.root,
                   f"a folder or file path when {prefix}.source is '{self.source}'")
        _check(len(self.classes) >= 2, f"{prefix}.classes", self.classes, "at least two class names")
        _check(len(set(self.classes)) == len(self.classes), f"{prefix}.classes", self.classes, "unique names")
        _check(2 <= self.folds <= 50, f"{prefix}.folds", self.folds, "an integer in [2, 50]")
        _check(0.0 < self.test_fraction < 1.0, f"{prefix}.test_fraction", self.test_fraction, "a fraction in (0, 1)")
        _check(16 <= self.image_size <= 2048, f"{prefix}.image_size", self.image_size, "an integer in [16, 2048]")
        _check(0 <= self.near_duplicate_bits <= 32, f"{prefix}.near_duplicate_bits", self.near_duplicate_bits,
               "an integer in [0, 32]")
        _check(-1.0 <= self.near_duplicate_min_correlation <= 1.0, f"{prefix}.near_duplicate_min_correlation",
               self.near_duplicate_min_correlation, "a number in [-1, 1] (-1 turns the check off)")
        self.phantom.validate(f"{prefix}.phantom")
        self.external.validate(f"{prefix}.external")


@dataclass
class LoraConfig:
    rank: Union[int, list[int]] = _f(4, "LoRA rank; a list (e.g. [2, 4, 8]) makes `run` select the rank by FID.")
    alpha: Optional[float] = _f(None, "LoRA alpha; null = rank (scale 1).")
    targets: Literal["cross_attention", "all_attention"] = _f(
        "cross_attention", "cross_attention: attn2 q/k/v/out (the paper); all_attention: attn1 and attn2 (the authors' code).")
    per_fold: bool = _f(True, "true: one adapter per fold trained on that fold's training images only (leakage-safe).")
    class_words: bool = _f(
        False, "Also learn the token embeddings of the class words (the words that differ between the class prompts), "
               "as textual inversion does, at diffusion.train.class_word_lr: for a base model whose text encoder never "
               "saw them (builtin:phantom); SD-1.4's CLIP knows them. The adapter then holds class_words.safetensors "
               "(docs/finetune.md). false = the paper's USLoRA (text encoder frozen).")

    @property
    def ranks(self) -> list[int]:
        return list(self.rank) if isinstance(self.rank, list) else [self.rank]

    def validate(self, prefix: str) -> None:
        for r in self.ranks:
            _check(isinstance(r, int) and 1 <= r <= 1024, f"{prefix}.rank", self.rank, "integers in [1, 1024]")
        _check(len(self.ranks) >= 1, f"{prefix}.rank", self.rank, "a rank or a non-empty list of ranks")
        if self.alpha is not None:
            _check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "a positive number or null")


@dataclass
class DiffusionTrainConfig:
    epochs: int = _f(100, "Passes over the fold's training images (paper: 100).")
    lr: float = _f(1e-4, "AdamW learning rate, constant schedule.")
    batch_size: int = _f(1, "Images per optimizer step per worker (paper: 1).")
    num_workers: int = _f(1, "Ray Train workers (DDP over the LoRA parameters).")
    min_workers: Optional[int] = _f(
        None, "Elastic fine-tuning: a number below num_workers lets Ray Train start or continue with as few as this "
              "many workers when the cluster has fewer (a node lost); each step then averages over the workers in "
              "use, so the effective batch is batch_size x workers (docs/faults.md). null = exactly num_workers.")
    use_gpu: Union[Literal["auto"], bool] = _f(
        "auto", "One GPU per Ray Train worker. auto: yes when the Ray cluster has GPUs or its autoscaler can add "
                "GPU nodes (docs/gpu.md); a GPU-sized base model then never falls back to the CPU silently.")
    max_failures: int = _f(1, "Times Ray Train restarts a failed worker group from the last checkpoint.")
    random_flip: bool = _f(True, "Random horizontal flip of training images.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _f(
        "auto", "auto: bf16 without loss scaling on GPUs with native bf16 (Ampere+), else fp16 with loss scaling; "
                "fp32 on CPU. bf16 where it is only emulated (Turing) runs as fp16. The LoRA weights stay fp32.")
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in the backward pass (less memory, slower).")
    cache_latents: bool = _f(True, "Encode images (and their flips) and prompts once, not every step.")
    seed: int = _f(0, "Seed of noise, timesteps, flips and LoRA init.")
    class_word_lr: float = _f(5e-3, "AdamW learning rate of the class words' token embeddings when "
                                    "diffusion.lora.class_words is true (no weight decay).")

    def validate(self, prefix: str) -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "a positive number")
        _check(math.isfinite(self.class_word_lr) and self.class_word_lr > 0, f"{prefix}.class_word_lr",
               self.class_word_lr, "a positive number")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.num_workers >= 1, f"{prefix}.num_workers", self.num_workers, "an integer >= 1")
        _check(self.min_workers is None or 1 <= self.min_workers <= self.num_workers, f"{prefix}.min_workers",
               self.min_workers, f"null or an integer in [1, num_workers={self.num_workers}]")
        _check(self.max_failures >= -1, f"{prefix}.max_failures", self.max_failures, "an integer >= -1 (-1: forever)")


@dataclass
class DiffusionConfig:
    base_model: str = _f("CompVis/stable-diffusion-v1-4",
                         "Hub id (from the Hugging Face cache or the hub), a local diffusers folder, or a single-file "
                         "checkpoint (sd-v1-4.ckpt / .safetensors); 'builtin:tiny' builds a few-MB SD with random "
                         "weights into <run_dir>/models/ (plumbing); 'builtin:phantom' is the small SD-shaped model "
                         "pretrained on phantom scans, shipped in meddap/models/phantom/ with its reference judge "
                         "(the demo's; rebuilt by `python -m meddap pretrain-base <folder>`, whose output folder can "
                         "also be given here).")
    single_file_config: Optional[str] = _f(
        None, "For a single-file base_model: the diffusers folder or hub id whose configs and tokenizer describe it "
              "(a checkpoint holds neither); null = CompVis/stable-diffusion-v1-4 from the Hugging Face cache.")
    resolution: int = _f(224, "Training (and default generation) resolution in pixels (paper: 224).")
    prompt_template: str = _f("ultrasound image of {class_phrase} tumor in the breast",
                              "Training prompt per class; must contain {class_phrase}.")
    class_phrases: dict[str, str] = _f({"benign": "benign", "malignant": "malignant", "normal": "no"},
                                       "Words for each class in prompts (normal -> 'no', as the paper).")
    lora: LoraConfig = _f(LoraConfig(), "USLoRA settings.")
    train: DiffusionTrainConfig = _f(DiffusionTrainConfig(), "Fine-tuning settings.")

    def validate(self, prefix: str) -> None:
        _check(bool(self.base_model), f"{prefix}.base_model", self.base_model, "a hub id or a folder path")
        _check(32 <= self.resolution <= 2048 and self.resolution % 8 == 0, f"{prefix}.resolution",
               self.resolution, "a multiple of 8 in [32, 2048]")
        _check("{class_phrase}" in self.prompt_template, f"{prefix}.prompt_template", self.prompt_template,
               "a template containing {class_phrase}")
        self.lora.validate(f"{prefix}.lora")
        self.train.validate(f"{prefix}.train")


@dataclass
class GenerateConfig:
    prompt_template: str = _f("{adjective} ultrasound image of {class_phrase} tumor in the breast",
                              "Generation prompt; must contain {class_phrase}, may contain {adjective}.")
    adjectives: list[str] = _f(list(PAPER_ADJECTIVES), "Adjectives; \"\" is the no-adjective prompt.")
    ratios: list[float] = _f([0.5, 1.0, 2.0], "Synthetic images per class as a multiple of the fold's real ones.")
    steps: int = _f(30, "Denoising steps (paper: 30).")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale (paper: 7.5).")
    scheduler: Optional[str] = _f(None, "null = the base model's scheduler; or a diffusers scheduler class name.")
    resolution: Optional[int] = _f(None, "null = diffusion.resolution (not the pipeline's 512 default).")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _f("auto", "auto: fp16 on CUDA, fp32 on CPU.")
    use_gpu: Union[Literal["auto"], bool] = _f(
        "auto", "Generation actors on GPUs (generate.num_gpus_per_worker each). auto: yes when the Ray cluster has "
                "GPUs or its autoscaler can add GPU nodes; the pool then asks for GPUs even while none are up.")
    batch_size: int = _f(16, "Prompts per pipeline call.")
    workers: Optional[int] = _f(None, "Ray Data actors; null = one per GPU, or on CPU a pool that leaves CPUs free.")
    num_gpus_per_worker: float = _f(1.0, "GPUs per actor when GPUs are present.")
    cpus_per_worker: float = _f(1.0, "CPUs per actor on a CPU-only cluster (also its torch threads, at least 1); "
                                     "the pool always leaves >= 1 CPU free for Ray Data's own tasks. With "
                                     "generate.workers null the actors' torch threads also use that CPU "
                                     "(2 CPUs: 1 actor, 2 threads).")
    seed: int = _f(0, "Run seed from which each image's seed is derived.")
    mode: Literal["txt2img", "img2img"] = _f(
        "txt2img", "txt2img: from noise (the paper). img2img: each image starts from one real training image of its "
                   "fold (never validation or test), chosen by a seeded balanced draw; docs/controls.md.")
    strength: float = _f(0.75, "img2img only: how much of the source is replaced by noise (0 keeps it, 1 ignores it); "
                               "int(steps x strength) denoising steps run.")
    filter_overgenerate: float = _f(
        0.0, "Extra images per (fold, adjective, class) beyond the largest ratio's count, as a share of it (rounded "
             "up): spares a label-fidelity filter tops counts up from; unfiltered trials never use them.")
    filter: Literal["none", "threshold", "drop_lowest"] = _f(
        "none", "Label-fidelity gate of the sweep's synthetic trials (docs/controls.md): none; threshold (keep images "
                "whose fidelity, the judge's probability of the prompted class, is >= filter_value); drop_lowest "
                "(drop the filter_value share of lowest-fidelity images per fold, adjective and class). Counts are "
                "topped up from the spares (filter_overgenerate), so ratios hold. Decides trials, not images: "
                "changing it reruns only the gated trials, never generate.")
    filter_value: Optional[float] = _f(
        None, "threshold: the minimum fidelity in [0, 1]; drop_lowest: the share dropped, in [0, 1). Required when "
              "generate.filter is not none.")
    filter_judge: Optional[str] = _f(
        None, "Classifier whose real-only baseline trial of fold k (repeat 0, best epoch) judges fold k's synthetic "
              "images; one of classify.models; null = the first of classify.models.")

    def validate(self, prefix: str) -> None:
        _check("{class_phrase}" in self.prompt_template, f"{prefix}.prompt_template", self.prompt_template,
               "a template containing {class_phrase}")
        _check(len(self.adjectives) >= 1, f"{prefix}.adjectives", self.adjectives, "a non-empty list")
        _check(len(set(self.adjectives)) == len(self.adjectives), f"{prefix}.adjectives", self.adjectives,
               "unique adjectives")
        # Adjectives and ratios name folders and trial ids (`adjective_slug`, f"r{ratio:g}"): two that map to
        # one name would mix their images or results.
        from meddap.layout import adjective_slug

        slugs = [adjective_slug(a) for a in self.adjectives]
        _check(len(set(slugs)) == len(slugs), f"{prefix}.adjectives", self.adjectives,
               "adjectives that stay distinct as folder names ('' is stored as 'none', spaces as '_')")
        _check(not any(c in a for a in self.adjectives for c in "/\\") and not set(slugs) & {".", ".."},
               f"{prefix}.adjectives", self.adjectives, "adjectives without '/' or '\\' and other than '.' / '..'")
        _check(len(self.ratios) >= 1 and all(r > 0 for r in self.ratios), f"{prefix}.ratios", self.ratios,
               "a non-empty list of numbers > 0")
        _check(len({f"{r:g}" for r in self.ratios}) == len(self.ratios), f"{prefix}.ratios", self.ratios,
               "unique ratios")
        _check(self.steps >= 1, f"{prefix}.steps", self.steps, "an integer >= 1")
        _check(self.guidance_scale >= 0, f"{prefix}.guidance_scale", self.guidance_scale, "a number >= 0")
        if self.resolution is not None:
            _check(32 <= self.resolution <= 2048 and self.resolution % 8 == 0, f"{prefix}.resolution",
                   self.resolution, "null or a multiple of 8 in [32, 2048]")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        if self.workers is not None:
            _check(self.workers >= 1, f"{prefix}.workers", self.workers, "null or an integer >= 1")
        _check(0 < self.num_gpus_per_worker <= 8, f"{prefix}.num_gpus_per_worker", self.num_gpus_per_worker,
               "a number in (0, 8]")
        _check(0 < self.cpus_per_worker <= 256, f"{prefix}.cpus_per_worker", self.cpus_per_worker,
               "a number in (0, 256]")
        _check(0 < self.strength <= 1, f"{prefix}.strength", self.strength, "a number in (0, 1]")
        if self.mode == "img2img":
            # diffusers runs int(steps * strength) steps; 0 steps would return the source's noised latents.
            _check(int(self.steps * self.strength) >= 1, f"{prefix}.strength", self.strength,
                   f"a value with int(generate.steps x strength) >= 1 (generate.steps = {self.steps}); raise "
                   "one of them")
        _check(0 <= self.filter_overgenerate <= 10, f"{prefix}.filter_overgenerate", self.filter_overgenerate,
               "a share in [0, 10] (0.25 = a quarter more images)")
        self._validate_filter(prefix)

    def _validate_filter(self, prefix: str) -> None:
        if self.filter == "none":
            return
        from meddap.classify.fidelity import check_filter, spares_needed

        _check(self.filter_value is not None, f"{prefix}.filter_value", self.filter_value,
               f"a number when {prefix}.filter = {self.filter} (threshold: minimum fidelity in [0, 1], e.g. 0.5; "
               "drop_lowest: the share dropped in [0, 1), e.g. 0.2)")
        try:
            check_filter(self.filter, self.filter_value)
        except ValueError as e:
            raise ConfigError(f"config key '{prefix}.filter_value' = {self.filter_value!r} is not allowed with "
                              f"{prefix}.filter = {self.filter}: {e}.") from None
        # Without spares a gate that drops images leaves a trial short of its ratio's count: the sweep would
        # fail after the judges ran. drop_lowest p always fits with p / (1 - p); a threshold has no sure share.
        need = spares_needed(self.filter, self.filter_value)
        if self.filter == "drop_lowest":
            _check(self.filter_overgenerate >= need - 1e-9, f"{prefix}.filter_overgenerate", self.filter_overgenerate,
                   f"at least {need:.4g} (= p / (1 - p)) with {prefix}.filter = drop_lowest and filter_value = "
                   f"{self.filter_value:g}, so the spares always replace the dropped images; raise it (then rerun "
                   "generate, which adds only the spares) or lower filter_value")
        else:
            _check(self.filter_overgenerate > 0, f"{prefix}.filter_overgenerate", self.filter_overgenerate,
                   f"a share > 0 with {prefix}.filter = threshold: dropped images are replaced by spare images, and "
                   "without spares every dropped image leaves a trial short (e.g. 0.5; how many a threshold keeps "
                   "depends on the scores, so no share is sure: the sweep names any shortfall)")


@dataclass
class ClassifierSettings:
    """classify.per_model.<name>: training settings of one classifier that differ from classify's."""
    epochs: Optional[int] = _f(None, "Training epochs of this classifier's trials; null = classify.epochs.")
    lr: Optional[float] = _f(None, "Adam learning rate of this classifier's trials; null = classify.lr.")
    batch_size: Optional[int] = _f(None, "Batch size of this classifier's trials; null = classify.batch_size.")

    def set_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class ClassifyConfig:
    models: list[str] = _f(["resnet34", "densenet121", "squeezenet1_1"], "torchvision classification model names.")
    pretrained: Literal["imagenet", "none"] = _f("imagenet", "imagenet: torchvision weights (the authors'); none: random init.")
    weights_dir: Optional[str] = _f(None, "Folder holding torchvision weight files; null = torch hub's cache.")
    epochs: int = _f(100, "Training epochs per trial (paper: 100).")
    batch_size: int = _f(32, "Batch size (paper: 32).")
    lr: float = _f(1e-3, "Adam learning rate (paper: 1e-3).")
    image_size: Optional[int] = _f(None, "null = data.image_size.")
    random_flip: bool = _f(True, "Random horizontal flip during training.")
    precise_bn: bool = _f(
        False, "Recompute BatchNorm running statistics from the training images with each epoch's final weights "
               "before validating it (precise BN, Wu & Johnson 2021); false = PyTorch's running averages, as the "
               "paper. From scratch with a few dozen steps those lag the weights and eval-mode predictions can "
               "collapse to one class. One forward pass over the training images per epoch; no effect on networks "
               "without BatchNorm (SqueezeNet).")
    precise_bn_images: Optional[int] = _f(
        None, "Training images precise BN averages over, evenly spread over the trial's training set (real and "
              "synthetic alike); null = all. Bounds its cost on large sets: one forward pass over these per epoch.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _f(
        "auto", "auto: bf16 autocast on GPUs with native bf16, else fp16 with loss scaling; fp32 on CPU.")
    cpus_per_trial: float = _f(1.0, "CPUs each Tune trial claims.")
    gpus_per_trial: Union[Literal["auto"], float] = _f(
        "auto", f"GPU fraction each trial claims (e.g. 0.25 packs 4 trials on a GPU; 0 = CPU). auto: "
                f"{AUTO_GPUS_PER_TRIAL:g} when the Ray cluster has GPUs or its autoscaler can add GPU nodes, else 0.")
    max_concurrent_trials: Optional[int] = _f(None, "null = as many as resources allow.")
    max_failures: int = _f(2, "Retries of a failed trial (from its last checkpoint).")
    checkpoint_seconds: float = _f(
        60.0, "Seconds of training between trial checkpoints (taken at the end of an epoch; 0 = every epoch). "
              "By time, not epochs: an epoch of the paper takes ~0.2 s on an H100, a checkpoint ~350 MB.")
    threads_per_trial: Optional[int] = _f(None, "torch CPU threads in a trial; null = cpus_per_trial.")
    seed: int = _f(0, "Base seed; a trial's seed (initial weights, data order, flips) is derived from it and the "
                      "trial's classifier, fold and repeat only, so every adjective and ratio starts alike "
                      "(common random numbers).")
    repeats: int = _f(1, "Trials per (classifier, adjective, ratio, fold) cell, each repeat with new seeds; the "
                         "statistics pair augmented and real-only trials by (fold, repeat).")
    channels: Literal["rgb", "grey"] = _f(
        "grey", "rgb: images reach the classifiers (and FID) in colour, as the authors fed them: synthetic images "
                "as generated, grey real images replicated to 3 channels; grey: every image converted to grey.")
    save_models: Literal["none", "fold0", "all"] = _f(
        "fold0", "Which trials keep their best-epoch weights (report's Grad-CAM uses fold 0). With generate.filter on, "
                 "the judges' real-only trials keep theirs whatever this says.")
    controls: list[str] = _f(
        [], "Equal-budget control trials (docs/controls.md): duplicate (fold's real training images drawn again) per "
            "classifier x fold x ratio; classical (real images through the adjective's classical transform) per "
            "classifier x fold x ratio x adjective with a classical twin. Same per-class counts as the synthetic "
            "images at that ratio; Table 4 compares them with the synthetic trials.")
    per_model: dict[str, ClassifierSettings] = _f(
        {}, "Settings of one classifier that differ from the ones above, by name in classify.models: epochs, lr, "
            "batch_size (e.g. {squeezenet1_1: {epochs: 16, lr: 1.0e-4}}: SqueezeNet has no BatchNorm and from "
            "scratch needs a gentler, longer schedule). Names not in classify.models are unused. A change reruns "
            "only that classifier's trials (no --force needed).")

    def for_model(self, name: str) -> "ClassifyConfig":
        """These settings as `name`'s trials train with: classify.per_model.<name> over the shared ones."""
        override = self.per_model.get(name)
        return dataclasses.replace(self, **override.set_fields()) if override is not None else self

    def validate(self, prefix: str) -> None:
        _check(len(self.models) >= 1, f"{prefix}.models", self.models, "a non-empty list of torchvision model names")
        # A name not in classify.models is allowed (unused: `classify.models=[resnet34]` on the demo keeps its
        # squeezenet1_1 settings); names that are no torchvision classifier fail in sweep.check_classifiers.
        for name, override in self.per_model.items():
            at = f"{prefix}.per_model.{name}"
            if override.epochs is not None:
                _check(override.epochs >= 1, f"{at}.epochs", override.epochs, "null or an integer >= 1")
            if override.lr is not None:
                _check(override.lr > 0, f"{at}.lr", override.lr, "null or a positive number")
            if override.batch_size is not None:
                _check(override.batch_size >= 1, f"{at}.batch_size", override.batch_size, "null or an integer >= 1")
        _check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "a positive number")
        if self.precise_bn_images is not None:
            _check(self.precise_bn_images >= 2, f"{prefix}.precise_bn_images", self.precise_bn_images,
                   "null (all training images) or an integer >= 2 (BatchNorm needs 2 values per channel)")
        if self.image_size is not None:
            _check(16 <= self.image_size <= 2048, f"{prefix}.image_size", self.image_size, "null or [16, 2048]")
        _check(self.cpus_per_trial > 0, f"{prefix}.cpus_per_trial", self.cpus_per_trial, "a number > 0")
        _check(self.gpus_per_trial == "auto" or self.gpus_per_trial >= 0, f"{prefix}.gpus_per_trial",
               self.gpus_per_trial, "auto or a number >= 0")
        if self.max_concurrent_trials is not None:
            _check(self.max_concurrent_trials >= 1, f"{prefix}.max_concurrent_trials", self.max_concurrent_trials,
                   "null or an integer >= 1")
        _check(self.max_failures >= 0, f"{prefix}.max_failures", self.max_failures, "an integer >= 0")
        _check(self.checkpoint_seconds >= 0, f"{prefix}.checkpoint_seconds", self.checkpoint_seconds,
               "a number of seconds >= 0")
        _check(1 <= self.repeats <= 100, f"{prefix}.repeats", self.repeats, "an integer in [1, 100]")
        _check(all(c in ("duplicate", "classical") for c in self.controls) and len(set(self.controls)) == len(self.controls),
               f"{prefix}.controls", self.controls, "a list of distinct values from duplicate, classical (e.g. "
               "[duplicate, classical]; [] = no controls)")


# fid.features names (meddap.fid.FEATURE_EXTRACTORS describes them); anything path-like is a TorchScript file.
FID_FEATURES = ("inception", "phantom-judge")
FIDELITY_JUDGES = ("phantom-judge",)


def _path_like(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith((".pt", ".pth", ".ts")) or "/" in text


@dataclass
class FidConfig:
    features: str = _f(
        "inception", "Feature extractor of FID/KID/memorisation: inception (pytorch-fid, the paper's); "
                     "phantom-judge (domain encoder, 32-d: the judge beside the base model, "
                     "<diffusion.base_model folder>/judge/, as pretrain-base writes it); or the path of a "
                     "TorchScript encoder (.pt). FIDs from different extractors are not comparable.")
    dims: Literal[64, 192, 768, 2048] = _f(2048, "InceptionV3 feature size (pytorch-fid block): 64, 192, 768 or 2048 "
                                                 "(features=inception only; other extractors have their own).")
    extra_dims: list[int] = _f([], "Further Inception feature sizes reported beside `dims`, each labelled with its "
                                   "dims (the paper's FID magnitudes suggest 64); the memorisation check uses `dims` "
                                   "only; other fid.features have one size.")
    weights: Optional[str] = _f(None, "Path of pytorch-fid's pt_inception weights file; null = torch hub's cache.")
    batch_size: int = _f(50, "Images per Inception forward pass.")
    kid_subset_size: int = _f(100, "Subset size for KID's unbiased MMD estimate.")
    kid_subsets: int = _f(100, "Random subsets KID is averaged over (its std over them is reported too).")
    method: Literal["sqrtm", "eigh"] = _f(
        "sqrtm", "Matrix square root of FID: sqrtm = pytorch-fid's scipy sqrtm (+eps offset when singular); "
                 "eigh = the same trace from a symmetric eigendecomposition, much faster at 2048 dims on a CPU.")
    seed: int = _f(0, "Seed of KID's subset draws.")
    memorization_threshold: float = _f(
        0.1, "A synthetic image whose nearest real image is closer than this share of the median real-real "
             "nearest-neighbour distance is flagged as a near copy.")
    judge: Optional[str] = _f(
        None, "Reference classifier that scores every synthetic image's label fidelity (summary/fidelity.parquet): "
              "null = none; phantom-judge = the judge beside the base model (<diffusion.base_model folder>/judge/; "
              "phantom classes only).")

    def validate(self, prefix: str) -> None:
        _check(self.features in FID_FEATURES or _path_like(self.features), f"{prefix}.features", self.features,
               f"one of {', '.join(FID_FEATURES)}, or the path of a TorchScript encoder file (*.pt)")
        if self.judge is not None:
            _check(self.judge in FIDELITY_JUDGES, f"{prefix}.judge", self.judge,
                   f"null or one of {', '.join(FIDELITY_JUDGES)}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        _check(all(d in (64, 192, 768, 2048) for d in self.extra_dims) and len(set(self.extra_dims)) == len(self.extra_dims)
               and self.dims not in self.extra_dims, f"{prefix}.extra_dims", self.extra_dims,
               "a list of distinct sizes from 64, 192, 768, 2048, without fid.dims")
        _check(self.kid_subset_size >= 2, f"{prefix}.kid_subset_size", self.kid_subset_size, "an integer >= 2")
        _check(self.kid_subsets >= 1, f"{prefix}.kid_subsets", self.kid_subsets, "an integer >= 1")
        _check(self.memorization_threshold >= 0, f"{prefix}.memorization_threshold",
               self.memorization_threshold, "a number >= 0")


@dataclass
class ReportConfig:
    gradcam_images: int = _f(4, "Test images shown in the Grad-CAM figure per architecture.")
    contact_sheet_per_cell: int = _f(4, "Synthetic samples per (adjective, class) cell of a contact sheet.")
    bootstrap_samples: int = _f(10000, "Draws of the paired bootstrap over test images (Tables 2 and 3); >= 10,000.")
    seed: int = _f(0, "Seed of the bootstrap draws.")

    def validate(self, prefix: str) -> None:
        _check(self.gradcam_images >= 1, f"{prefix}.gradcam_images", self.gradcam_images, "an integer >= 1")
        _check(self.contact_sheet_per_cell >= 1, f"{prefix}.contact_sheet_per_cell",
               self.contact_sheet_per_cell, "an integer >= 1")
        _check(self.bootstrap_samples >= 10000, f"{prefix}.bootstrap_samples", self.bootstrap_samples,
               "an integer >= 10000 (fewer draws make the 2.5 % tails and small p-values noisy)")


@dataclass
class RayConfig:
    address: Optional[str] = _f(
        None, "null: start a fresh local Ray, unless RAY_ADDRESS is set (as `ray job submit` sets it), then join "
              "that; auto: join the Ray cluster running on this machine (the one `ray start --head` started last); "
              "host:port or ray://host:port: join that cluster.")
    num_cpus: Optional[int] = _f(None, "CPUs of a locally started Ray; null = all.")
    storage_path: Optional[str] = _f(None, "Ray Train/Tune storage; null = <run_dir>/ray.")
    autoscaling_config: Optional[str] = _f(
        None, "The autoscaler's cluster config on the driver's node, read to learn whether GPU nodes can be added "
              "(GPU settings 'auto'); null = ~/ray_bootstrap_config.yaml, where `ray up` puts it on the head.")
    connect_timeout_s: float = _f(
        30.0, "Seconds to wait for the cluster named by ray.address (or RAY_ADDRESS) to answer before giving up "
              "with an error, instead of Ray's endless retries.")

    def validate(self, prefix: str) -> None:
        _check(self.connect_timeout_s > 0, f"{prefix}.connect_timeout_s", self.connect_timeout_s, "a number > 0")
        _check(self.num_cpus is None or self.num_cpus >= 1, f"{prefix}.num_cpus", self.num_cpus,
               "null or an integer >= 1")
        _check(self.address is None or bool(self.address.strip()), f"{prefix}.address", self.address,
               "null, 'auto', 'local', host:port or ray://host:port")


@dataclass
class Config:
    run_dir: str = _f("runs/default", "Where everything the run writes goes: a local path (relative to the current folder; made absolute when the config is loaded) or s3:// / gs:// URI.")
    lock_stale_s: float = _f(
        600.0, "One process writes a run_dir at a time (lock file run_dir/meddap.lock, refreshed every quarter of "
               "this). A lock whose owner runs on another host and has not refreshed it for this many seconds is "
               "taken over; a dead owner on this host is detected at once.")
    data: DataConfig = _f(DataConfig(), "Datasets, splits and the leakage audit.")
    diffusion: DiffusionConfig = _f(DiffusionConfig(), "Base model and USLoRA fine-tuning.")
    generate: GenerateConfig = _f(GenerateConfig(), "Synthetic image generation.")
    classify: ClassifyConfig = _f(ClassifyConfig(), "Classifier grid.")
    fid: FidConfig = _f(FidConfig(), "FID / KID / memorisation.")
    report: ReportConfig = _f(ReportConfig(), "Report and figures.")
    ray: RayConfig = _f(RayConfig(), "Ray connection.")
    name: str = _f("custom", "Name of this configuration (shown in outputs).")

    def validate(self) -> "Config":
        _check(bool(self.run_dir), "run_dir", self.run_dir, "a path or URI")
        # A local run_dir is made absolute once, here: Ray Train and Tune start their workers in their own
        # folders, where a relative run_dir named another place (the demo's default `runs/demo` wrote its
        # adapters under Ray's session folder and then found none).
        if "://" not in self.run_dir:
            self.run_dir = os.path.abspath(os.path.expanduser(self.run_dir))
        _check(self.lock_stale_s >= 10, "lock_stale_s", self.lock_stale_s, "a number of seconds >= 10")
        self.data.validate("data")
        self.diffusion.validate("diffusion")
        self.generate.validate("generate")
        self.classify.validate("classify")
        self.fid.validate("fid")
        self.report.validate("report")
        self.ray.validate("ray")
        judge = self.generate.filter_judge
        _check(judge is None or judge in self.classify.models, "generate.filter_judge", judge,
               f"null (the first of classify.models) or one of classify.models = {self.classify.models}: the judge is "
               "that classifier's real-only trial")
        # The phantom judge lives beside the base model (<folder>/judge/): builtin:tiny has none.
        for key, value in (("fid.features", self.fid.features), ("fid.judge", self.fid.judge)):
            # (an unknown builtin:<name> is left to resolve_base_model, which lists the builtin models)
            if value == "phantom-judge" and self.diffusion.base_model == "builtin:tiny":
                raise ConfigError(f"config key '{key}' = 'phantom-judge' takes the judge beside the base model "
                                  f"(<base model folder>/judge/), but diffusion.base_model = "
                                  f"{self.diffusion.base_model!r} has none. Set diffusion.base_model to "
                                  f"builtin:phantom or a folder made by `python -m meddap pretrain-base <folder>`, "
                                  f"or set {key} to something else.")
        missing = [c for c in self.data.classes if c not in self.diffusion.class_phrases]
        _check(not missing, "diffusion.class_phrases", self.diffusion.class_phrases,
               f"a phrase for every class in data.classes (missing: {missing})")
        return self

    # -- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "<dict>") -> "Config":
        return _build(cls, d, "", source).validate()

    def to_yaml(self, header: bool = False) -> str:
        """The settings as YAML, without `name`: a saved config is named after its file when loaded
        (`config --config demo > mine.yaml`, then `--config mine.yaml`, calls itself 'mine')."""
        d = self.to_dict()
        d.pop("name", None)
        body = yaml.safe_dump(d, sort_keys=False)
        if not header:
            return body
        return (f"# meddap config: the effective settings of '{self.name}' (python -m meddap config).\n"
                f"# Saved to a file and loaded with --config FILE, it is named after the file; add a line\n"
                f"# `name: ...` to name it otherwise.\n" + body)

    @property
    def classify_image_size(self) -> int:
        return self.classify.image_size or self.data.image_size

    @property
    def filter_judge(self) -> str:
        """The classifier whose real-only trials judge label fidelity (generate.filter_judge, or the first model)."""
        return self.generate.filter_judge or self.classify.models[0]

    @property
    def generate_resolution(self) -> int:
        return self.generate.resolution or self.diffusion.resolution


# ---------------------------------------------------------------------------------------------
# Building typed sections from plain data.
# ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):  # a section inside one: its keys (classify.per_model: dict[str, {epochs, ...}])
        args = ["{" + ", ".join(f.name for f in dataclasses.fields(a)) + "}" if dataclasses.is_dataclass(a)
                else _type_name(a) for a in typing.get_args(tp)]
        return f"{origin.__name__}[{', '.join(args)}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):  # a section: say what a user writes, not the class name
        return "a mapping of keys (a YAML section)"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' = {value!r} (from {source}) has the wrong type: "
                      f"expected {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".", source)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' = {value!r} (from {source}) is not allowed: "
                          f"expected one of {_type_name(tp)}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            try:
                name = _coerce(kt, k, key, source)
            except ConfigError:
                raise ConfigError(f"config key '{key}' (from {source}) has the entry {k!r}: its name must be "
                                  f"{_type_name(kt)} (e.g. quoted in YAML).") from None
            out[name] = _coerce(vt, v, f"{key}.{k}", source)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text: take the number it spells
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _build(cls: type, d: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    for k in unknown:
        if prefix + k in _RENAMED:
            raise ConfigError(f"config key '{prefix}{k}' (from {source}) was replaced by {_RENAMED[prefix + k]}.")
    if unknown:
        k = unknown[0]
        import difflib
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{k}' (from {source}).{hint} "
                          f"Allowed keys here: {', '.join(prefix + n for n in names)}.")
    kwargs = {k: _coerce(hints[k], v, prefix + k, source) for k, v in d.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML + overrides.
# ---------------------------------------------------------------------------------------------
def shipped_configs() -> dict[str, Path]:
    """Names of the YAMLs shipped in meddap/configs/ -> their paths."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def _resolve(name_or_path: str) -> Path:
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    import difflib

    close = difflib.get_close_matches(name_or_path, list(shipped), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"config '{name_or_path}' is neither a shipped config ({', '.join(shipped)}) "
                      f"nor an existing YAML file.{hint}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (for example data.folds=3).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override key '{key}': '{'.'.join(parts[:i + 1])}' is not a section.")
        cur = nxt
    cur[parts[-1]] = value


def _typed_override(key: str, value: Any) -> Any:
    """Strings from the command line that the schema wants as str stay str (e.g. data.root=123)."""
    tp: Any = Config
    for p in key.split("."):
        if typing.get_origin(tp) is dict:  # a mapping's key (classify.per_model.<name>): on to its values' type
            tp = typing.get_args(tp)[1]
            continue
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if p not in hints:
            return value  # unknown key: _build reports it with a suggestion
        tp = hints[p]
    wants_str = tp is str or (typing.get_origin(tp) is Union and str in typing.get_args(tp))
    if wants_str and value is not None and not isinstance(value, str):
        return str(value)
    if typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)) \
            and not isinstance(value, str):
        return str(value)
    # YAML 1.1 reads "1e-3" (no dot) as a string; a float key takes it as the number it spells.
    wants_float = tp is float or (typing.get_origin(tp) is Union and float in typing.get_args(tp))
    if wants_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key_node.value}' is given twice in one mapping; keep one",
                    key_node.start_mark)
            seen.add(key_node.value)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(name_or_path: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a shipped config by name (or a YAML by path), apply `key=value` overrides, validate."""
    path = _resolve(name_or_path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}.")
    raw.setdefault("name", path.stem)
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(raw, key, _typed_override(key, value))
    source = str(path) + (" + overrides" if overrides else "")
    return _build(Config, raw, "", source).validate()


def iter_keys(cls: type = Config, prefix: str = ""):
    """(dotted key, type name, default, help) for every leaf key: docs/configuration.md's key table (tools/build_docs.py)."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        yield prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")
