"""Equal-budget controls for the classifier grid: real training images again, plain or transformed.

A synthetic trial (fold k, adjective a, ratio r) adds `synthetic_count(n_c, r)` images of each class c
(`meddap.diffusion.plan`, the one count rule). Its controls add exactly as many images per class, drawn
from fold k's training images (train rows with fold != k; never validation, test or external rows):
  - `duplicate`: the real images again, unchanged;
  - `classical`: the real images transformed by the adjective's classical counterpart (below), so the
    question "does the diffusion model add anything beyond a one-line transform?" has an answer.

Which real images: `meddap.diffusion.plan.source_sequence(pool, n, seed, k, c)`, successive seeded
permutations of the class's training images, so every prefix is balanced (each image floor(n/m) or
ceil(n/m) times), smaller ratios use a prefix of larger ones (nested, like the synthetic sets), and
duplicate, classical and img2img (`generate.mode: img2img` with per-fold adapters, same seed) image i
all start from the same real image: they differ only in what is done to it.

Adjective -> classical transform (parameters drawn per image from `control_seed`, ranges in
`ClassicalParams`):

| adjective | transform | what it does to pixels |
| --- | --- | --- |
| bright | brightness_up | multiply by a factor > 1 (mean up) |
| dark | brightness_down | multiply by a factor < 1 (mean down) |
| high-contrast | contrast_up | blend away from the image's mean grey (std up) |
| low-contrast | contrast_down | blend towards the image's mean grey (std down) |
| posterized | posterize | keep the top 2-3 bits (at most 4-8 grey levels) |
| solarized | solarize | invert every pixel at or above a threshold |
| sheared | shear | horizontal affine shear about the centre (black fill) |
| colorful | color_jitter | brightness, contrast, saturation and hue jitter (on grey images only brightness and contrast act) |
| stylized | none | names no single operation; any pick would be ours, not the prompt's |
| "" (none) | none | the plain prompt's twin is the duplicate control |

Adjectives are matched case-insensitively with spaces and underscores read as hyphens; an adjective not
in the table has no classical twin (`classical_name` returns None; `unmapped_adjectives` lists them so
a stage can say so): its classical control is the duplicate control, never a guessed transform.

Plain numpy / PyTorch: nothing here knows of Ray or the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from meddap.errors import MeddapError

__all__ = [
    "CONTROLS",
    "CLASSICAL_TRANSFORMS",
    "ClassicalParams",
    "classical_name",
    "unmapped_adjectives",
    "control_seed",
    "draw_params",
    "apply_transform",
    "classical_image",
    "classical_images",
    "control_rows",
    "CONTROL_COLUMNS",
]

CONTROLS = ("duplicate", "classical")

# The documented mapping (module docstring; docs/controls.md). None: no classical twin.
CLASSICAL_TRANSFORMS: dict[str, Optional[str]] = {
    "bright": "brightness_up",
    "dark": "brightness_down",
    "high-contrast": "contrast_up",
    "low-contrast": "contrast_down",
    "posterized": "posterize",
    "solarized": "solarize",
    "sheared": "shear",
    "colorful": "color_jitter",
    "stylized": None,
    "": None,
}

CONTROL_COLUMNS = ["image_id", "source_image_id", "path", "fold", "class_name", "label", "index", "control",
                   "adjective", "transform", "seed"]


@dataclass(frozen=True)
class ClassicalParams:
    """Ranges each image's transform parameters are drawn from (uniformly, from its own seed).

    Chosen so that every transform is clearly visible on a grey ultrasound image, as the adjective's
    effect is on an SD image, without destroying the anatomy; none is tuned on any result.
    """

    brightness_up: tuple[float, float] = (1.25, 1.6)      # multiplicative factor
    brightness_down: tuple[float, float] = (0.5, 0.8)
    contrast_up: tuple[float, float] = (1.5, 2.0)         # blend factor about the mean grey
    contrast_down: tuple[float, float] = (0.4, 0.7)
    posterize_bits: tuple[int, int] = (2, 3)              # bits kept, inclusive range
    solarize_threshold: tuple[int, int] = (96, 160)       # grey level from which pixels are inverted
    shear_degrees: tuple[float, float] = (10.0, 25.0)     # magnitude; the sign is drawn too
    jitter_brightness: float = 0.3                        # ColorJitter-style: factor in [1 - b, 1 + b]
    jitter_contrast: float = 0.3
    jitter_saturation: float = 0.5
    jitter_hue: float = 0.25                              # hue shift in [-h, h] of a full turn


def _normalise(adjective: str) -> str:
    return "-".join(str(adjective).strip().lower().replace("_", " ").replace("-", " ").split())


def classical_name(adjective: str) -> Optional[str]:
    """The adjective's classical transform, or None when it has none (no adjective, 'stylized', unknown)."""
    return CLASSICAL_TRANSFORMS.get(_normalise(adjective))


def unmapped_adjectives(adjectives: Iterable[str]) -> list[str]:
    """Adjectives not in the mapping at all (not '' or 'stylized', which are mapped to none on purpose)."""
    return [a for a in adjectives if _normalise(a) not in CLASSICAL_TRANSFORMS]


def control_seed(run_seed: int, fold: int, adjective: str, class_name: str, index: int) -> int:
    """Seed of control image `index`'s transform parameters (SHA-256 based, like the synthetic images')."""
    from meddap.diffusion.plan import hash_seed

    return hash_seed("classical", run_seed, fold, adjective, class_name, index)


def draw_params(name: str, seed: int, params: ClassicalParams = ClassicalParams()) -> dict:
    """The parameters transform `name` uses for the image with `seed`; the same seed, the same draw."""
    rng = np.random.default_rng(int(seed))
    p = params

    def uniform(lo_hi: tuple[float, float]) -> float:
        return float(rng.uniform(*lo_hi))

    if name in ("brightness_up", "brightness_down", "contrast_up", "contrast_down"):
        return {"factor": uniform(getattr(p, name))}
    if name == "posterize":
        return {"bits": int(rng.integers(p.posterize_bits[0], p.posterize_bits[1] + 1))}
    if name == "solarize":
        return {"threshold": int(rng.integers(p.solarize_threshold[0], p.solarize_threshold[1] + 1))}
    if name == "shear":
        return {"degrees": uniform(p.shear_degrees) * (1.0 if rng.random() < 0.5 else -1.0)}
    if name == "color_jitter":
        return {"brightness": float(rng.uniform(1 - p.jitter_brightness, 1 + p.jitter_brightness)),
                "contrast": float(rng.uniform(1 - p.jitter_contrast, 1 + p.jitter_contrast)),
                "saturation": float(rng.uniform(1 - p.jitter_saturation, 1 + p.jitter_saturation)),
                "hue": float(rng.uniform(-p.jitter_hue, p.jitter_hue))}
    raise ValueError(f"unknown classical transform {name!r}; known: "
                     f"{sorted({v for v in CLASSICAL_TRANSFORMS.values() if v})}")


def apply_transform(image: np.ndarray, name: str, drawn: dict) -> np.ndarray:
    """One image, (C, H, W) uint8 with C = 1 (grey) or 3 (RGB), through transform `name` with the
    parameters `draw_params` gave; returns a new (C, H, W) uint8 array."""
    import torch  # here, not at the top: the sweep's grid (and `meddap status`) reads the mapping without torch
    import torchvision.transforms.v2.functional as F

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"classical transforms take (C, H, W) uint8 images with C = 1 or 3, got dtype {arr.dtype} "
                         f"shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr))                       # (C, H, W) uint8
    if name in ("brightness_up", "brightness_down"):
        y = F.adjust_brightness(x, drawn["factor"])
    elif name in ("contrast_up", "contrast_down"):
        y = F.adjust_contrast(x, drawn["factor"])
    elif name == "posterize":
        y = F.posterize(x, drawn["bits"])
    elif name == "solarize":
        y = F.solarize(x, drawn["threshold"])
    elif name == "shear":
        # Shear about the centre along x: the row at height dy above the centre moves tan(degrees) * dy
        # to the right (negative degrees: to the left); uncovered corners are black, like the scan's surround.
        y = F.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[drawn["degrees"], 0.0],
                     interpolation=F.InterpolationMode.BILINEAR, fill=[0.0] * x.shape[0])
    elif name == "color_jitter":
        # torchvision's ColorJitter operations in a fixed order; saturation and hue leave grey images as they are.
        y = F.adjust_brightness(x, drawn["brightness"])
        y = F.adjust_contrast(y, drawn["contrast"])
        y = F.adjust_saturation(y, drawn["saturation"])
        y = F.adjust_hue(y, drawn["hue"])
    else:
        raise ValueError(f"unknown classical transform {name!r}")
    return y.numpy().astype(np.uint8, copy=True)


def classical_image(image: np.ndarray, adjective: str, seed: int,
                    params: ClassicalParams = ClassicalParams()) -> np.ndarray:
    """`image` (C, H, W) uint8 transformed by `adjective`'s classical twin; a copy when it has none."""
    name = classical_name(adjective)
    if name is None:
        return np.array(image, dtype=np.uint8, copy=True)
    return apply_transform(image, name, draw_params(name, seed, params))


def classical_images(images: np.ndarray, adjective: str, seeds: Sequence[int],
                     params: ClassicalParams = ClassicalParams()) -> np.ndarray:
    """(N, C, H, W) uint8 (the sweep's decoded arrays) -> the same shape, image i with seeds[i]."""
    images = np.asarray(images)
    if images.ndim != 4 or len(seeds) != images.shape[0]:
        raise ValueError(f"classical_images needs (N, C, H, W) images and N seeds, got shape {images.shape} and "
                         f"{len(seeds)} seeds")
    out = np.empty_like(images)
    for i, s in enumerate(seeds):
        out[i] = classical_image(images[i], adjective, int(s), params)
    return out


def control_rows(manifest: pd.DataFrame, classes: Sequence[str], fold: int, ratio: float, control: str,
                 run_seed: int, adjective: Optional[str] = None) -> pd.DataFrame:
    """The extra images of a `control` trial (fold, ratio[, adjective]): per class exactly the synthetic
    count at `ratio`, drawn from fold `fold`'s training images (columns CONTROL_COLUMNS).

    `image_id` names the control image; `source_image_id` / `path` the real image it is made from (a
    data-manifest row); `seed` its transform's seed; `transform` the classical twin's name ("" for a
    duplicate, or for an adjective without a twin). `run_seed` should be generate.seed, so that with
    img2img the controls start from the same real images as the synthetic ones.
    """
    from meddap.diffusion.plan import real_train_counts, source_pool, source_sequence, synthetic_count
    from meddap.layout import adjective_slug

    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}: expected one of {CONTROLS}")
    if control == "classical" and adjective is None:
        raise ValueError("a classical control needs the adjective whose twin it is")
    if fold < 0:
        raise ValueError(f"controls belong to a trial's fold (>= 0), got {fold}")
    counts = real_train_counts(manifest, list(classes))
    if (fold, classes[0]) not in counts:
        raise MeddapError(f"fold {fold} has no training rows in the data manifest (folds: "
                          f"{sorted({k for k, _ in counts})}).")
    adjective = adjective if control == "classical" else ""
    transform = (classical_name(adjective) or "") if control == "classical" else ""
    slug = "dup" if control == "duplicate" else adjective_slug(adjective)
    pool = source_pool(manifest, fold)
    rows = []
    for label, c in enumerate(classes):
        need = synthetic_count(counts[(fold, c)], ratio)
        of_class = pool[pool["class_name"] == c]
        path_of = dict(zip(of_class["image_id"].astype(str), of_class["path"].astype(str)))
        for i, source in enumerate(source_sequence(of_class["image_id"], need, run_seed, fold, c)):
            rows.append({"image_id": f"ctl-{control}-f{fold}-{slug}-{c}-{i:05d}", "source_image_id": source,
                         "path": path_of[source], "fold": fold, "class_name": c, "label": label, "index": i,
                         "control": control, "adjective": adjective, "transform": transform,
                         "seed": control_seed(run_seed, fold, adjective, c, i)})
    out = pd.DataFrame(rows, columns=CONTROL_COLUMNS)
    return out.astype({"fold": "int64", "label": "int64", "index": "int64", "seed": "int64"})

