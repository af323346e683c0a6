"""Captions of the `builtin:phantom` base model's pretraining scans, and the photometric transforms
the paper's prompt adjectives stand for.

A caption says what a radiographer could see in an unlabeled scan and never its class:

    [adjective] [probe] ultrasound image of a [size] [shape] [orientation] [margin] mass
        [with <halo, shadowing | enhancement, calcifications joined by "and">] in the breast
    [adjective] [probe] ultrasound image of breast tissue              (no lesion)

- probe: "linear" or "convex" (fan-shaped image);
- size: "small" / "large" (half width < 0.1 / > 0.15 of the image), nothing in between;
- shape: "oval" or "round" (smooth), "lobulated" (a few large lobes), "irregular" (angular margin);
- orientation: "wide" (wider than tall) / "tall" (taller than wide), nothing when about round;
- margin: "spiculated" (4+ radiating strands), "encapsulated" (an echogenic rim);
- each descriptor is left out with probability `word_dropout`, and the whole caption is empty with
  probability `caption_dropout` (the unconditional prompt that classifier-free guidance needs);
- the adjective (one of the paper's nine, or none) is always paired with its transform of the image
  (`apply_adjective`): a "dark" caption is on a darkened image, a "sheared" one on a sheared image;
- with probability `filler_share`, one or two neutral words (`FILLER_WORDS`: "patient", "view",
  "left", ...) are put at random places. They say nothing about the image, and pretraining keeps their
  token embeddings at their random initial values, so the model learns that a word it was never taught
  carries no meaning. The class words are such words: the base model ignores them, and USLoRA must
  teach them.

The class words (benign, malignant, normal, and the phrase "no tumor") never occur: `check_caption`
refuses them, so the base model has no notion of the classes and USLoRA has to teach them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from meddap.data.phantom import LesionShape

__all__ = [
    "ADJECTIVES",
    "FORBIDDEN_WORDS",
    "CAPTION_WORDS",
    "apply_adjective",
    "lesion_words",
    "make_caption",
    "check_caption",
]

# The paper's adjectives (its "" = none is the absence of one).
ADJECTIVES = ("colorful", "stylized", "high-contrast", "low-contrast", "posterized", "sheared", "solarized",
              "bright", "dark")
# Class words a pretraining caption must never hold ("no tumor" is the normal class's phrase).
FORBIDDEN_WORDS = ("benign", "malignant", "normal")
FORBIDDEN_PHRASES = ("no tumor",)

_SMALL, _LARGE = 0.10, 0.15            # half width (image widths) below / above which size is named
_WIDE, _TALL = 0.85, 1.15              # aspect (height / width) below / above which orientation is named
_ROUGH = 0.25                          # roughness from which a margin is "irregular"
_LOBED = 0.04                          # lobulation from which a smooth lesion is "lobulated"
_SPICULATED = 4                        # strands from which a margin is "spiculated"

# Neutral words: random places in captions, embeddings frozen at their random init during pretraining.
FILLER_WORDS = ("patient", "view", "left", "right", "study", "clinical", "routine", "follow", "screening",
                "diagnostic", "exam", "case", "sample", "series", "frame", "region", "area", "plane", "section",
                "transverse", "sagittal", "radial", "oblique", "example", "typical", "shown", "here", "this",
                "some", "one", "two", "first", "second", "third", "archive", "record", "quality", "depth", "probe",
                "report")
# Every word a caption can contain (the tokenizer gives each one token).
CAPTION_WORDS = FILLER_WORDS + ("ultrasound", "image", "of", "a", "mass", "in", "the", "breast", "tissue", "with", "and",
                 "linear", "convex", "small", "large", "oval", "round", "lobulated", "irregular", "wide", "tall",
                 "spiculated", "encapsulated", "halo", "shadowing", "enhancement", "calcifications",
                 "bright", "dark", "high", "low", "contrast", "posterized", "solarized", "sheared", "colorful",
                 "stylized", "-")


# ---------------------------------------------------------------------------------------------
# Photometric transforms of the adjectives
# ---------------------------------------------------------------------------------------------
def _dark(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x * rng.uniform(0.3, 0.55)


def _bright(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - (255.0 - x) * rng.uniform(0.3, 0.55)


def _high_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (x - 128.0) * rng.uniform(1.8, 2.5) + 128.0


def _low_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = x.mean()
    return (x - m) * rng.uniform(0.3, 0.5) + m


def _posterized(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = int(rng.integers(3, 5))
    return np.floor(x / (256.0 / levels)) * (255.0 / (levels - 1))


def _solarized(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(96.0, 160.0)
    return np.where(x >= t, 255.0 - x, x)


def _sheared(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    s = rng.uniform(0.25, 0.45) * rng.choice((-1.0, 1.0))
    # Output (u, v) samples input (u + s * (v - h/2), v): rows slide sideways in proportion to depth.
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    out = img.transform((w, h), Image.AFFINE, (1.0, s, -s * h / 2.0, 0.0, 1.0, 0.0), resample=Image.BILINEAR)
    return np.asarray(out, dtype=np.float64)


def _colorful(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = x.mean(axis=2, keepdims=True) / 255.0                      # (H, W, 1)
    phases = rng.uniform(0.0, 1.0, size=3)
    cycles = rng.uniform(0.6, 1.4)
    # A random cosine palette over the grey level: every scan gets its own false colours.
    return 255.0 * (0.5 + 0.5 * np.cos(2.0 * np.pi * (cycles * g + phases[None, None, :])))


def _stylized(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    flat = img.filter(ImageFilter.MedianFilter(5))                 # speckle smoothed into flat patches
    edges = np.asarray(flat.filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    base = np.asarray(flat, dtype=np.float64)
    levels = 6.0
    return np.round(base / 255.0 * levels) * (255.0 / levels) * 0.85 + rng.uniform(1.5, 2.5) * edges


_TRANSFORMS = {
    "dark": _dark, "bright": _bright, "high-contrast": _high_contrast, "low-contrast": _low_contrast,
    "posterized": _posterized, "solarized": _solarized, "sheared": _sheared, "colorful": _colorful,
    "stylized": _stylized,
}


def apply_adjective(image: np.ndarray, adjective: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 with `adjective`'s transform ("" = unchanged)."""
    if not adjective:
        return image
    if adjective not in _TRANSFORMS:
        raise ValueError(f"no transform for adjective {adjective!r}; known: {', '.join(ADJECTIVES)}")
    out = _TRANSFORMS[adjective](image.astype(np.float64), rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def lesion_words(shape: LesionShape) -> dict[str, str]:
    """The descriptors of a lesion, by slot (size, shape, orientation, margin, halo, posterior, calcifications);
    a slot with nothing to say is absent."""
    words: dict[str, str] = {}
    if shape.half_width < _SMALL:
        words["size"] = "small"
    elif shape.half_width > _LARGE:
        words["size"] = "large"
    if shape.roughness >= _ROUGH:
        words["shape"] = "irregular"
    elif shape.lobulation >= _LOBED:
        words["shape"] = "lobulated"
    else:
        words["shape"] = "oval" if not (_WIDE <= shape.aspect <= _TALL) else "round"
    if shape.aspect < _WIDE:
        words["orientation"] = "wide"
    elif shape.aspect > _TALL:
        words["orientation"] = "tall"
    margin = [w for w, on in (("spiculated", shape.spicules >= _SPICULATED), ("encapsulated", shape.capsule)) if on]
    if margin:
        words["margin"] = " ".join(margin)
    if shape.halo:
        words["halo"] = "halo"
    if shape.posterior == "shadow":
        words["posterior"] = "shadowing"
    elif shape.posterior == "enhancement":
        words["posterior"] = "enhancement"
    if shape.calcifications:
        words["calcifications"] = "calcifications"
    return words


def make_caption(lesion: LesionShape | None, fan: bool, adjective: str, rng: np.random.Generator,
                 word_dropout: float, caption_dropout: float, filler_share: float = 0.0) -> str:
    """The caption of one scan (see the module docstring). `lesion` None: no lesion in the scan."""
    if rng.uniform() < caption_dropout:
        return ""

    def keep() -> bool:
        return rng.uniform() >= word_dropout

    head = [adjective] if adjective else []
    if keep():
        head.append("convex" if fan else "linear")
    head.append("ultrasound image of")
    if lesion is None:
        text = " ".join(head + ["breast tissue"])
    else:
        w = lesion_words(lesion)
        before = [w[k] for k in ("size", "shape", "orientation", "margin") if k in w and keep()]
        after = [w[k] for k in ("halo", "posterior", "calcifications") if k in w and keep()]
        article = "an" if before and before[0][0] in "aeiou" else "a"
        with_ = ["with", " and ".join(after)] if after else []
        text = " ".join(head + [article] + before + ["mass"] + with_ + ["in the breast"])
    if rng.uniform() < filler_share:
        words = text.split(" ")
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(FILLER_WORDS)))
        text = " ".join(words)
    check_caption(text)
    return text


def check_caption(text: str) -> None:
    """Refuse a caption holding a class word: the base model must not learn the classes."""
    low = f" {text.lower()} "
    bad = [w for w in FORBIDDEN_WORDS if f" {w} " in low] + [p for p in FORBIDDEN_PHRASES if p in low]
    if bad:
        raise ValueError(f"pretraining caption {text!r} contains class words {bad}: captions describe what a scan "
                         "shows, never its class")
