"""The generation plan: which synthetic images exist in a finished run, with their seeds and paths.

Counts follow the paper: per class, ratio x the real training images of that class in that fold.
Ratios are nested: only the largest ratio's images are generated per (fold, adjective, class), and a
trial with a smaller ratio r uses the first `synthetic_count(n, r)` of them by index. With ratios
(0.5, 1, 2) that is 2x the training set per adjective instead of 3.5x, and the 50 % set is a subset
of the 100 % set, so ratio comparisons differ only in the amount of synthetic data.

Rounding (one rule everywhere, `synthetic_count`, the same as `meddap.classify.data`): Python's
`round(r * n)`, halves to the even number, so 0.5 x 5 real images is 2 synthetic ones and 0.5 x 1
is 0. round() never decreases as r grows, so a smaller ratio never needs more images than the
largest one made.

Seeds: each image's seed is a SHA-256 of (generate.seed, fold, adjective, class, index), never
Python's `hash()` (salted per process). The same plan makes the same images, and any one image can
be regenerated alone.

With a shared adapter (diffusion.lora.per_fold: false, fold -1) one set serves every fold; it is as
large as the largest fold needs, and fold k uses its first `synthetic_count(n_k, r)` images.

Spares for a label-fidelity filter (`generate.filter_overgenerate` = s > 0): each (fold, adjective,
class) gets ceil(s x n_top) more images after the largest ratio's n_top, indexes n_top, n_top + 1, ...
Trials without a filter take the first images by index and so never see them; a filter that drops
images tops the counts up from them (`meddap.classify.fidelity.filter_synthetic`).

img2img sources (`generate.mode: img2img`): image i of (fold k, class c) starts from the real image
`source_sequence(pool, n, generate.seed, k, c)[i]`, where the pool is fold k's training images of
class c (train rows with fold != k): never its validation rows (fold == k) nor test/external rows. The
sequence is successive seeded permutations of the pool (sorted by image_id), so any prefix uses each
training image floor(n/m) or ceil(n/m) times, and it does not depend on the adjective: image i of every
adjective starts from the same real image, so adjectives differ by their prompt (and noise seed) only.
The classical controls (`meddap.classify.controls`) draw their real images from the same sequence.
Shared adapter (fold -1): the pool is every train row of the class. That keeps the test split out,
but fold k's images may then start from its own validation images, so fold k's model selection is
not leakage-free; the shared adapter itself was trained on those images too (per_fold: true is the
leakage-safe setting).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from meddap import storage
from meddap.config import ConfigError
from meddap.diffusion.prompts import check_template, class_prompt
from meddap.errors import MeddapError
from meddap.layout import RunLayout, adapter_name, adjective_slug

__all__ = [
    "GenerationPlan",
    "build_plan",
    "image_seed",
    "hash_seed",
    "synthetic_count",
    "extra_count",
    "source_pool",
    "source_sequence",
    "synthetic_counts",
    "real_train_counts",
    "select_synthetic",
    "check_generate_config",
    "generation_settings",
    "image_file",
    "PLAN_COLUMNS",
]

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_DONE = "adapter.json"  # written last by finetune: its presence marks a complete adapter
_SEED_MASK = (1 << 63) - 1  # torch.Generator.manual_seed and int64 Parquet columns both take it

PLAN_COLUMNS = ["image_id", "file", "path", "fold", "adapter_name", "adjective", "class_name", "label",
                "index", "seed", "prompt", "spec", "source_image_id", "source_path"]
# Settings that only img2img has: left out of a txt2img image's spec, so txt2img specs (and the
# resume of runs made before img2img existed) stay as they were.
_IMG2IMG_SETTINGS = ("mode", "strength")


def synthetic_count(n_real: int, ratio: float) -> int:
    """Synthetic images for `n_real` real ones at `ratio`: Python's round(ratio * n_real) (0.5 x 5 -> 2),
    exactly what the classifier grid (`meddap.classify.data`) selects."""
    if ratio <= 0:
        raise ConfigError(f"config key 'generate.ratios' holds {ratio!r}: expected numbers > 0.")
    return int(round(ratio * n_real))


def extra_count(n_top: int, share: float) -> int:
    """Spare images for a label-fidelity filter: ceil(share x n_top), 0 when share is 0."""
    if share <= 0 or n_top <= 0:
        return 0
    return int(math.ceil(round(share * n_top, 9)))  # round first: 0.3 x 10 is 3.0000000000000004


def hash_seed(kind: str, *parts) -> int:
    """Stable seed in [0, 2**63) from SHA-256 of 'meddap-<kind>|part|part|...': identical in every
    process, machine and Python version (never Python's salted hash())."""
    key = "|".join([f"meddap-{kind}", *(str(p) for p in parts)]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & _SEED_MASK


def image_seed(run_seed: int, fold: int, adjective: str, class_name: str, index: int) -> int:
    """Stable per-image seed in [0, 2**63): identical in every process, machine and Python version."""
    return hash_seed("synthetic", run_seed, fold, adjective, class_name, index)


def source_pool(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Real images a fold-`fold` image may start from (img2img) or a control may redraw: the fold's
    training rows (split train, fold != k); every train row for the shared adapter (fold -1). Never
    validation rows of a per-fold set, never test or external rows."""
    train = manifest[manifest["split"] == "train"]
    return train if fold < 0 else train[train["fold"] != fold]


def source_sequence(candidates, n: int, run_seed: int, fold: int, class_name: str) -> list[str]:
    """`n` ids from `candidates` (image ids of one class): round j is a permutation of the sorted ids
    seeded by (run_seed, fold, class, j), so every prefix is balanced (each id floor(n/m) or ceil(n/m)
    times) and a longer sequence extends a shorter one (nested ratios keep their sources)."""
    ids = sorted(str(c) for c in candidates)
    if n <= 0:
        return []
    if not ids:
        raise MeddapError(f"fold {fold} has no training images of class {class_name!r} to start img2img images "
                          f"or controls from, yet {n} are needed; check the data manifest (rerun prepare).")
    out: list[str] = []
    for j in range(math.ceil(n / len(ids))):
        rng = np.random.default_rng(hash_seed("sources", run_seed, fold, class_name, j))
        out += [ids[i] for i in rng.permutation(len(ids))]
    return out[:n]


def image_file(adapter: str, adjective: str, class_name: str, index: int) -> str:
    """Path of one synthetic image relative to run_dir."""
    return f"synthetic/{adapter}/{adjective_slug(adjective)}/{class_name}/{index:05d}.png"


def check_generate_config(cfg) -> None:
    """The generate section's rules, checked again here because a Config can be changed after loading."""
    g = cfg.generate
    if not g.adjectives:
        raise ConfigError("config key 'generate.adjectives' = [] is not allowed: expected a non-empty list "
                          "(\"\" is the no-adjective prompt), e.g. generate.adjectives='[\"\", bright, dark]'.")
    if len(set(g.adjectives)) != len(g.adjectives):
        raise ConfigError(f"config key 'generate.adjectives' = {g.adjectives!r} holds duplicates.")
    if not g.ratios or any(r <= 0 for r in g.ratios):
        raise ConfigError(f"config key 'generate.ratios' = {g.ratios!r} is not allowed: expected a non-empty "
                          "list of numbers > 0 (e.g. [0.5, 1.0, 2.0]).")
    check_template(g.prompt_template)


def _read_manifest(cfg) -> pd.DataFrame:
    path = RunLayout(cfg.run_dir).manifest
    if not storage.exists(path):
        raise MeddapError(f"the data manifest {path} does not exist: run `python -m meddap prepare "
                          f"--config {cfg.name}` (same run_dir) first.")
    return storage.read_parquet(path)


def real_train_counts(manifest: pd.DataFrame, classes: list[str]) -> dict[tuple[int, str], int]:
    """{(fold k, class): real images fold k trains on} = train rows of that class with fold != k."""
    train = manifest[manifest["split"] == "train"]
    folds = sorted(int(f) for f in train["fold"].unique() if int(f) >= 0)
    if not folds:
        raise MeddapError("the data manifest has no train rows with a fold >= 0: rerun prepare.")
    counts = {}
    for k in folds:
        fold_train = train[train["fold"] != k]
        per_class = fold_train["class_name"].value_counts()
        for c in classes:
            counts[(k, c)] = int(per_class.get(c, 0))
    return counts


def synthetic_counts(manifest: pd.DataFrame, cfg, fold: int, ratio: float) -> dict[str, int]:
    """Per class, the synthetic images a fold-`fold` trial with `ratio` uses (first ones by index)."""
    counts = real_train_counts(manifest, cfg.data.classes)
    if (fold, cfg.data.classes[0]) not in counts:
        raise MeddapError(f"fold {fold} has no training rows in the data manifest (folds: "
                          f"{sorted({k for k, _ in counts})}).")
    return {c: synthetic_count(counts[(fold, c)], ratio) for c in cfg.data.classes}


def select_synthetic(synthetic: pd.DataFrame, manifest: pd.DataFrame, cfg, fold: int, adjective: str,
                     ratio: float) -> pd.DataFrame:
    """Rows of synthetic/manifest.parquet a (fold, adjective, ratio) trial trains on, checked complete."""
    source_fold = fold if cfg.diffusion.lora.per_fold else -1
    need = synthetic_counts(manifest, cfg, fold, ratio)
    rows = synthetic[(synthetic["fold"] == source_fold) & (synthetic["adjective"] == adjective)]
    parts = []
    for c, n in need.items():
        got = rows[(rows["class_name"] == c) & (rows["index"] < n)]
        if len(got) < n:
            raise MeddapError(f"synthetic set {adapter_name(source_fold)}/{adjective_slug(adjective)}/{c} has "
                              f"{len(got)} of the {n} images ratio {ratio:g} needs: run `python -m meddap "
                              f"generate` (same config) to complete it.")
        parts.append(got.sort_values("index"))
    return pd.concat(parts, ignore_index=True)


@dataclass
class GenerationPlan:
    """Every image of a finished generate stage, one row each (columns PLAN_COLUMNS)."""

    images: pd.DataFrame
    adapters: dict[str, str]  # adapter name ('fold-0' | 'all') -> adapter folder
    adapter_sha256: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # steps, guidance, width, height, scheduler, base_model

    def __len__(self) -> int:
        return len(self.images)

    def counts(self) -> pd.DataFrame:
        """Images per (fold, adjective, class)."""
        return (self.images.groupby(["fold", "adjective", "class_name"], sort=False).size()
                .rename("n").reset_index())


def _adapter_hash(adapter_dir: str) -> str:
    """sha256 of the LoRA weights, and of the learned class words when the adapter has them (an adapter
    without them keeps the hash it always had)."""
    from meddap.diffusion.class_words import CLASS_WORDS_NAME

    h = hashlib.sha256(storage.read_bytes(storage.join(adapter_dir, ADAPTER_FILE)))
    words = storage.join(adapter_dir, CLASS_WORDS_NAME)
    if storage.exists(words):
        h.update(storage.read_bytes(words))
    return h.hexdigest()


def _check_adapter(adapter_dir: str, fold: int, cfg) -> None:
    done = storage.join(adapter_dir, ADAPTER_DONE)
    weights = storage.join(adapter_dir, ADAPTER_FILE)
    what = f"fold {fold}" if fold >= 0 else "the shared adapter (diffusion.lora.per_fold: false)"
    if not storage.exists(done) or not storage.exists(weights):
        raise MeddapError(f"no finished LoRA adapter for {what}: {adapter_dir} lacks {ADAPTER_DONE} or "
                          f"{ADAPTER_FILE}. Run `python -m meddap finetune --config {cfg.name}` (same run_dir) "
                          "first; an adapter folder without adapter.json is an unfinished one.")


def generation_settings(cfg) -> dict:
    """What, besides seed and prompt, decides an image's pixels (recorded, and hashed into `spec`)."""
    g = cfg.generate
    res = cfg.generate_resolution
    return {"steps": g.steps, "guidance": float(g.guidance_scale), "width": res, "height": res,
            "scheduler": g.scheduler or "", "base_model": cfg.diffusion.base_model,
            "mode": g.mode, "strength": float(g.strength) if g.mode == "img2img" else None}


def _spec(settings: dict, adapter_sha: str, seed: int, prompt: str, source: str | None = None) -> str:
    """Hash of everything that decides an image's pixels. `source`: img2img's source image (id and the
    pixel hash prepare recorded), so a changed or re-drawn source regenerates the image."""
    blob = {k: v for k, v in settings.items() if k not in _IMG2IMG_SETTINGS}
    blob.update({"adapter_sha256": adapter_sha, "seed": seed, "prompt": prompt})
    if settings.get("mode") == "img2img":
        blob.update(mode="img2img", strength=settings["strength"], source=source)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _source_info(pool: pd.DataFrame) -> dict[str, dict]:
    """image_id -> {image_id, path, key}; key adds prepare's pixel hash, so a changed file changes the spec."""
    pixels = pool["sha256"].astype(str) if "sha256" in pool.columns else pd.Series("", index=pool.index)
    return {str(i): {"image_id": str(i), "path": str(p), "key": f"{i}:{h}"}
            for i, p, h in zip(pool["image_id"], pool["path"], pixels)}


def build_plan(cfg, manifest: pd.DataFrame | None = None, check_adapters: bool = True) -> GenerationPlan:
    """The full plan from the data manifest and config; raises MeddapError/ConfigError on bad input."""
    check_generate_config(cfg)
    manifest = _read_manifest(cfg) if manifest is None else manifest
    classes = cfg.data.classes
    counts = real_train_counts(manifest, classes)
    folds = sorted({k for k, _ in counts})
    top = max(cfg.generate.ratios)
    layout = RunLayout(cfg.run_dir)

    # (fold the images belong to, {class: how many}): the largest ratio's count plus the filter's spares
    if cfg.diffusion.lora.per_fold:
        targets = [(k, {c: synthetic_count(counts[(k, c)], top) for c in classes}) for k in folds]
    else:
        targets = [(-1, {c: max(synthetic_count(counts[(k, c)], top) for k in folds) for c in classes})]
    spare = cfg.generate.filter_overgenerate
    targets = [(fold, {c: n + extra_count(n, spare) for c, n in per_class.items()}) for fold, per_class in targets]
    img2img = cfg.generate.mode == "img2img"

    adapters, shas = {}, {}
    for fold, _ in targets:
        name = adapter_name(fold)
        adapters[name] = layout.adapter_dir(fold)
        if check_adapters:
            _check_adapter(adapters[name], fold, cfg)
            shas[name] = _adapter_hash(adapters[name])
        else:
            shas[name] = ""
    settings = generation_settings(cfg)
    local_root = None if storage.is_uri(cfg.run_dir) else storage.local_path(cfg.run_dir)

    rows = []
    for fold, per_class in targets:
        name = adapter_name(fold)
        sources: dict[str, list] = {c: [None] * n for c, n in per_class.items()}
        if img2img:
            pool = source_pool(manifest, fold)
            info = _source_info(pool)
            for c, n in per_class.items():
                ids = source_sequence(pool.loc[pool["class_name"] == c, "image_id"], n, cfg.generate.seed, fold, c)
                sources[c] = [info[i] for i in ids]
        for adjective in cfg.generate.adjectives:
            for c, n in per_class.items():
                prompt = class_prompt(cfg, adjective, c)
                label = classes.index(c)
                for i in range(n):
                    seed = image_seed(cfg.generate.seed, fold, adjective, c, i)
                    rel = image_file(name, adjective, c, i)
                    src = sources[c][i]
                    rows.append({
                        "image_id": f"syn-{name}-{adjective_slug(adjective)}-{c}-{i:05d}",
                        "file": rel,
                        "path": storage.join(local_root or cfg.run_dir, *rel.split("/")),
                        "fold": fold, "adapter_name": name, "adjective": adjective, "class_name": c,
                        "label": label, "index": i, "seed": seed, "prompt": prompt,
                        "spec": _spec(settings, shas[name], seed, prompt, src and src["key"]),
                        "source_image_id": src and src["image_id"], "source_path": src and src["path"],
                    })
    images = pd.DataFrame(rows, columns=PLAN_COLUMNS)
    images = images.astype({"fold": "int64", "label": "int64", "index": "int64", "seed": "int64"})
    return GenerationPlan(images=images, adapters=adapters, adapter_sha256=shas, settings=settings)
