"""The embedded default dataset: procedural B-mode breast-ultrasound phantom images.

No real dataset can be downloaded on a fresh machine, so a first run uses these. Each image is made
the way a B-mode scanner makes one, in miniature:

1. a reflectivity map: skin line, subcutaneous fat crossed by Cooper's ligaments, glandular tissue,
   pectoral muscle, and per class a lesion (benign: circumscribed, oval, wider-than-tall, posterior
   enhancement; malignant: irregular and spiculated, taller-than-wide, posterior shadowing;
   normal: none);
2. fully developed speckle: complex Gaussian scatterers weighted by the reflectivity and blurred by an
   anisotropic point-spread function (short axially, long laterally); the envelope is Rayleigh;
3. depth attenuation with an imperfect time-gain compensation, then log compression to a dynamic
   range in dB, as a scanner's display does;
4. the probe footprint (linear: a rectangle; curvilinear: a fan), then burned-in text, a depth ruler
   and caliper '+' marks at random, independent of class except that calipers need a lesion (as in
   BUSI, where classifiers learn to latch onto such marks).

`variant="shifted"` is another "device" (gain, dynamic range, speckle size, curvilinear fan): the
embedded Dataset B. `random_device` draws a new simulated scanner from a range spanning both, and
`make_phantom_scan` makes an unlabeled scan with a lesion described by its look (`LesionShape`:
size, aspect, margin roughness, lobes, spicules, capsule, halo, posterior feature, calcifications),
never by class: the pretraining corpus of the `builtin:phantom` base model. Every image comes from its own seed, derived from (seed, variant, class, index),
so any single image can be remade alone. numpy + scipy.ndimage + PIL only; ~4 ms per 128 px image.
"""

from __future__ import annotations

import functools
import io
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from meddap import logs, storage
from meddap.errors import MeddapError

__all__ = [
    "PHANTOM_CLASSES", "PHANTOM_VARIANTS", "make_phantom_image", "phantom_image_rng", "phantom_file_name",
    "write_phantom", "phantom_contact_sheet", "LesionShape", "random_lesion_shape", "random_device",
    "make_phantom_scan",
]

PHANTOM_CLASSES = ("benign", "malignant", "normal")
PHANTOM_VARIANTS = ("standard", "shifted")
# Bump when the images a given (seed, variant, size) makes change: folders written by an older
# generator are then remade instead of skipped.
_GENERATOR_VERSION = 2
_PLAN_FILE = "phantom.json"
_MIN_SIZE = 16
_REF_SIZE = 128  # pixel-valued device settings below are given at this size and scaled with `size`


@dataclass(frozen=True)
class _Device:
    """One scanner's imaging chain. Lengths in pixels at _REF_SIZE px; depth fractions of the image."""
    psf_axial: float          # Gaussian PSF sigma along depth
    psf_lateral: float        # ... and across the beam; lateral > axial gives the horizontal speckle streaks
    dynamic_range_db: tuple[float, float]   # displayed dB range: small = harsh contrast
    gain_db: tuple[float, float]            # overall gain added before display
    attenuation_db: tuple[float, float]     # round-trip loss over the full depth
    tgc_share: tuple[float, float]          # share of that loss the time-gain compensation gives back
    fan: bool                 # curvilinear probe (fan-shaped image) instead of a linear one
    fan_half_angle_deg: tuple[float, float]
    frame_share: float        # share of linear images drawn inside a black frame, as many scanners save them
    text_share: float         # share of images with burned-in labels
    ruler_share: float        # share with a depth ruler (dots) on one side
    caliper_share: float      # share of lesion images with caliper marks
    smoothing: float          # display smoothing (speckle reduction) sigma of the grey image


_DEVICES = {
    "standard": _Device(psf_axial=0.55, psf_lateral=1.25, dynamic_range_db=(46.0, 54.0), gain_db=(-2.0, 2.0),
                        attenuation_db=(12.0, 20.0), tgc_share=(0.55, 0.85), fan=False,
                        fan_half_angle_deg=(0.0, 0.0), frame_share=0.4, text_share=0.5, ruler_share=0.3,
                        caliper_share=0.35, smoothing=0.45),
    "shifted": _Device(psf_axial=1.0, psf_lateral=2.2, dynamic_range_db=(36.0, 42.0), gain_db=(4.0, 8.0),
                       attenuation_db=(16.0, 24.0), tgc_share=(0.4, 0.65), fan=True,
                       fan_half_angle_deg=(24.0, 30.0), frame_share=0.0, text_share=0.7, ruler_share=0.6,
                       caliper_share=0.5, smoothing=0.0),
}

# Echo amplitudes of tissues relative to glandular tissue (1.0); 20*log10 gives their contrast in dB.
_AMP_GEL = 0.04
_AMP_SKIN = 4.0
_AMP_FAT = 0.22
_AMP_LIGAMENT = 1.1
_AMP_GLAND = 0.95
_AMP_MUSCLE = 0.42
# Chance of (posterior enhancement, no posterior feature, shadowing) per class.
_POSTERIOR_ODDS = {"benign": (0.7, 0.22, 0.08), "malignant": (0.1, 0.22, 0.68)}
_REFERENCE_DB = 18.0  # dB shown as white at 0 dB gain: gland lands mid-grey, skin near white

_LABELS = (
    "L BREAST {h} O'CLOCK", "R BREAST {h} O'CLOCK", "LT BR {h}:00 {c}CM FN", "RT BR {h}:00 {c}CM FN",
    "L BR TRANS", "R BR SAG", "LEFT {h} OCLOCK", "RIGHT {h} OCLOCK", "RADIAL", "ANTI-RAD", "BREAST",
)
_SCANNER_TAGS = ("L12-5 BREAST", "ML6-15", "14L5", "C5-1", "eL18-4", "LOGIQ", "GAIN {g}", "DR {d}", "FR 28Hz")


# ---------------------------------------------------------------------------------------------
# Seeds and names
# ---------------------------------------------------------------------------------------------
def _stable_int(text: str) -> int:
    """A process-independent integer for a name (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def phantom_image_rng(seed: int, variant: str, class_name: str, index: int) -> np.random.Generator:
    """The generator of image `index` (1-based) of a class: the same for a given (seed, variant, class,
    index) whatever else is written, so any image can be remade alone."""
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), _stable_int(variant), _stable_int(class_name), int(index)]))


def phantom_file_name(class_name: str, index: int, mask: bool = False) -> str:
    """BUSI's naming: 'benign (12).png' and 'benign (12)_mask.png', 1-based."""
    return f"{class_name} ({index}){'_mask' if mask else ''}.png"


def _check_args(class_name: str | None, size: int, variant: str) -> None:
    if class_name is not None and class_name not in PHANTOM_CLASSES:
        raise MeddapError(f"phantom: unknown class {class_name!r}; the phantom makes {', '.join(PHANTOM_CLASSES)}. "
                          "Use a subset of these in data.classes, or real data for other classes.")
    if variant not in _DEVICES:
        raise MeddapError(f"phantom: unknown variant {variant!r}; choose one of {', '.join(PHANTOM_VARIANTS)}.")
    if not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise MeddapError(f"phantom: size {size!r} is too small; give an integer >= {_MIN_SIZE}.")


# ---------------------------------------------------------------------------------------------
# Anatomy: the reflectivity map
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) depth and lateral coordinates in [0, 1), pixel centres."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    y, x = np.meshgrid(t, t, indexing="ij")
    return y, x


def _wavy(rng: np.random.Generator, x: np.ndarray, amplitude: float, n: int = 3) -> np.ndarray:
    """A smooth random curve over x (a sum of a few low-frequency sines) for interfaces that are not flat."""
    out = np.zeros_like(x)
    for k in range(1, n + 1):
        out += rng.uniform(-1, 1) / k * np.sin(2 * np.pi * (k * rng.uniform(0.4, 1.2) * x + rng.uniform()))
    return amplitude * out


def _smooth_noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean unit-std smooth random field: tissue texture on a scale larger than speckle."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma, mode="reflect")
    return field / (field.std() + 1e-6)


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) echo amplitude of the breast without a lesion: gel, skin, fat + ligaments, gland, muscle."""
    y, x = _grid(size)
    x1 = x[0]  # (size,) lateral positions
    px = 1.0 / size
    skin = rng.uniform(0.03, 0.06) + _wavy(rng, x1, 0.006)                         # (size,) depth of skin line
    fat_end = skin + rng.uniform(0.12, 0.28) + _wavy(rng, x1, 0.035)             # fat/gland interface
    gland_end = np.maximum(fat_end + rng.uniform(0.3, 0.5) + _wavy(rng, x1, 0.025), fat_end + 0.15)
    skin_w = max(rng.uniform(0.010, 0.018), 1.2 * px)

    amp = np.full((size, size), _AMP_GEL, np.float32)
    below_skin = y > skin[None, :]
    fat = below_skin & (y <= fat_end[None, :])
    gland = (y > fat_end[None, :]) & (y <= gland_end[None, :])
    muscle = y > gland_end[None, :]

    # Fat: dark lobules of varying brightness.
    lobules = _smooth_noise(rng, size, (2.5 * size / _REF_SIZE, 4.0 * size / _REF_SIZE))
    amp[fat] = (_AMP_FAT * np.exp(0.35 * lobules))[fat]
    # Gland: bright, mottled, streaky along the lateral direction (ducts and fibrous strands run in-plane).
    mottle = _smooth_noise(rng, size, (1.2 * size / _REF_SIZE, 3.5 * size / _REF_SIZE))
    amp[gland] = (_AMP_GLAND * np.exp(0.45 * mottle))[gland]
    # Pectoral muscle: dark with bright horizontal fibre streaks.
    striae = _smooth_noise(rng, size, (0.6 * size / _REF_SIZE, 7.0 * size / _REF_SIZE))
    amp[muscle] = (_AMP_MUSCLE * np.exp(0.7 * striae))[muscle]

    # Skin: a bright line (entry echo) with a darker dermis just under it.
    d = y - skin[None, :]
    amp += (_AMP_SKIN * np.exp(-0.5 * (d / skin_w) ** 2)).astype(np.float32)
    amp[(d > 1.5 * skin_w) & (d < 3.0 * skin_w)] *= 0.6

    # Cooper's ligaments: thin bright curved strands from the gland's surface up towards the skin.
    for _ in range(rng.integers(2, 6)):
        x0 = rng.uniform(0.0, 1.0)
        lean = rng.uniform(-0.9, 0.9)          # lateral travel per unit of depth
        bend = rng.uniform(-1.5, 1.5)
        top, bottom = np.interp(x0, x1, skin), np.interp(x0, x1, fat_end)
        s = np.clip((y - top) / max(bottom - top, 1e-3), 0.0, 1.0)             # 0 at skin, 1 at gland
        curve_x = x0 + lean * (y - bottom) + bend * (s - s ** 2) * (bottom - top)
        width = max(rng.uniform(0.004, 0.008), 0.5 * px)
        strand = np.exp(-0.5 * ((x - curve_x) / width) ** 2) * ((y > top) & (y < bottom + 0.02))
        amp += (_AMP_LIGAMENT * rng.uniform(0.5, 1.0) * strand).astype(np.float32)
    return amp


def _soft_inside(signed: np.ndarray, edge: float) -> np.ndarray:
    """Soft 0..1 membership from a signed 'inside' distance (> 0 inside), edge blur in the same units."""
    return np.clip(0.5 + signed / (2 * edge), 0.0, 1.0)


def _lesion_outline(rng: np.random.Generator, size: int, cx: float, cy: float, half_w: float, half_h: float,
                    angle: float, harmonics: list[tuple[int, float]]) -> tuple[np.ndarray, float]:
    """(size, size) signed distance inside the margin (> 0 inside, image units) of an ellipse rotated by
    `angle` whose radius is modulated by cosine `harmonics` (k, amplitude) at random phases, and its
    mean radius."""
    y, x = _grid(size)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((x - cx) * ca + (y - cy) * sa) / half_w                 # lesion frame, unit = half width/height
    v = (-(x - cx) * sa + (y - cy) * ca) / half_h
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(rho)
    for k, a in harmonics:
        boundary += a * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    mean_radius = np.sqrt(half_w * half_h)
    return (boundary - rho) * mean_radius, float(mean_radius)


def _capsule(size: int, signed: np.ndarray) -> np.ndarray:
    """A thin echogenic capsule along the margin."""
    return 0.9 * np.exp(-0.5 * (signed / (0.9 / size)) ** 2)


def _halo(rng: np.random.Generator, size: int, signed: np.ndarray) -> np.ndarray:
    """A thick echogenic halo just outside the margin (infiltration)."""
    halo = rng.uniform(2.0, 4.0) / size
    return 1.2 * np.exp(-0.5 * ((signed + halo) / halo) ** 2) * (signed < 0)


def _spicules(rng: np.random.Generator, size: int, cx: float, cy: float, mean_radius: float, signed: np.ndarray,
              count: int) -> np.ndarray:
    """`count` thin dark or bright strands radiating from the lesion."""
    y, x = _grid(size)
    px = 1.0 / size
    extra = np.zeros((size, size), np.float32)
    for _ in range(count):
        phi = rng.uniform(-np.pi, np.pi)
        length = rng.uniform(0.6, 1.5) * mean_radius
        # distance from the ray at angle phi leaving the lesion centre, in image units
        dx, dy = np.cos(phi), np.sin(phi)
        along = (x - cx) * dx + (y - cy) * dy
        across = np.abs(-(x - cx) * dy + (y - cy) * dx)
        width = rng.uniform(0.6, 1.2) * px
        reach = np.clip(1.0 - (along - mean_radius) / length, 0.0, 1.0) * (along > 0.5 * mean_radius)
        strand = np.exp(-0.5 * (across / width) ** 2) * reach * (signed < 0)
        extra += (rng.choice([-0.7, 0.9])) * strand              # dark or bright radiating strands
    return extra


def _lesion(rng: np.random.Generator, size: int, class_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside 0..1, hard mask, extra echo) of one lesion: shape, internal echoes, margins.

    Shapes follow BI-RADS descriptors: benign = oval, circumscribed, parallel (wider-than-tall);
    malignant = irregular, angular/spiculated margins, not parallel (taller-than-wide). The classes
    overlap a little (some malignant lesions are fairly round, some benign ones lobulated), as real
    ones do, so the task is learnable from shape but not trivial.
    """
    px = 1.0 / size
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.6)
    if class_name == "benign":
        half_w = rng.uniform(0.09, 0.2)
        half_h = half_w * rng.uniform(0.42, 0.9)
        angle = rng.normal(0.0, 0.12)                            # radians: parallel to the skin
        harmonics = [(k, rng.uniform(0.0, 0.06 if rng.uniform() < 0.3 else 0.02)) for k in (2, 3)]  # gently lobulated
        spicules = 0
    else:
        half_w = rng.uniform(0.07, 0.13)
        half_h = half_w * rng.uniform(0.85, 1.6)
        angle = rng.normal(0.0, 0.2)
        roughness = 0.4 if rng.uniform() < 0.2 else 1.0         # a fifth look almost circumscribed
        harmonics = [(k, roughness * rng.uniform(0.04, 0.14)) for k in (3, 4, 5, 7, 9)]  # angular, microlobulated
        spicules = int(rng.integers(0, 13))
    signed, mean_radius = _lesion_outline(rng, size, cx, cy, half_w, half_h, angle, harmonics)
    edge = (0.6 if class_name == "benign" else 1.2) * px
    inside = _soft_inside(signed, edge)
    mask = signed > 0

    extra = np.zeros((size, size), np.float32)                   # echo around the lesion: capsule, halo, spicules
    if class_name == "benign" and rng.uniform() < 0.5:
        extra += _capsule(size, signed)
    if class_name == "malignant":
        if rng.uniform() < 0.5:
            extra += _halo(rng, size, signed)
        extra += _spicules(rng, size, cx, cy, mean_radius, signed, spicules)
    return inside.astype(np.float32), mask, extra


@dataclass(frozen=True)
class LesionShape:
    """A lesion described by its look, not its class: what the base model's captions can name.

    half_width: half the lesion's width (image widths); aspect: height / width (> 1 = taller than
    wide, i.e. not parallel to the skin); roughness: 0 (smooth oval) .. 1 (angular, microlobulated
    margin); lobulation: amplitude of a few large lobes; spicules: radiating strands; capsule, halo:
    echogenic rim inside / thick rim outside; posterior: 'enhancement' | 'none' | 'shadow';
    calcifications: bright dots inside.
    """
    half_width: float
    aspect: float
    roughness: float
    lobulation: float
    spicules: int
    capsule: bool
    halo: bool
    posterior: str
    calcifications: bool


def random_lesion_shape(rng: np.random.Generator) -> LesionShape:
    """A lesion whose descriptors are drawn independently over the range both phantom classes span (and
    beyond): no class's joint pattern is favoured, so a model trained on these shapes has no notion of
    which combinations make a class."""
    return LesionShape(
        half_width=float(rng.uniform(0.06, 0.2)),
        aspect=float(np.exp(rng.uniform(np.log(0.42), np.log(1.6)))),
        roughness=float(rng.uniform() ** 1.5),
        lobulation=float(rng.uniform(0.0, 0.08)),
        spicules=int(rng.integers(0, 13)) if rng.uniform() < 0.35 else 0,
        capsule=bool(rng.uniform() < 0.3),
        halo=bool(rng.uniform() < 0.3),
        posterior=str(rng.choice(("enhancement", "none", "shadow"))),
        calcifications=bool(rng.uniform() < 0.15),
    )


def _shaped_lesion(rng: np.random.Generator, size: int,
                   shape: LesionShape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside 0..1, hard mask, extra echo) of a lesion drawn to `shape` (see `_lesion` for the class ones)."""
    px = 1.0 / size
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.6)
    half_w = shape.half_width
    half_h = half_w * shape.aspect
    angle = rng.normal(0.0, 0.12 + 0.08 * shape.roughness)
    harmonics = [(k, rng.uniform(0.0, shape.lobulation)) for k in (2, 3)]
    harmonics += [(k, shape.roughness * rng.uniform(0.04, 0.14)) for k in (3, 4, 5, 7, 9)]
    signed, mean_radius = _lesion_outline(rng, size, cx, cy, half_w, half_h, angle, harmonics)
    inside = _soft_inside(signed, (0.6 + 0.6 * shape.roughness) * px)
    mask = signed > 0
    extra = np.zeros((size, size), np.float32)
    if shape.capsule:
        extra += _capsule(size, signed)
    if shape.halo:
        extra += _halo(rng, size, signed)
    extra += _spicules(rng, size, cx, cy, mean_radius, signed, shape.spicules)
    return inside.astype(np.float32), mask, extra


def _calcifications(rng: np.random.Generator, amp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A few bright dots inside the lesion (microcalcifications)."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(0, len(ys), size=int(rng.integers(2, 7)))
    amp[ys[pick], xs[pick]] += 3.0
    return amp


def _posterior(rng: np.random.Generator, size: int, mask: np.ndarray, class_name: str) -> np.ndarray:
    """(size, size) amplitude factor under the lesion: mostly enhancement behind fluid-like benign
    lesions and shadowing behind malignant ones (sound absorbed by desmoplastic tissue), sometimes
    neither or the other one (_POSTERIOR_ODDS), as in real images."""
    feature = rng.choice(("enhancement", "none", "shadow"), p=_POSTERIOR_ODDS[class_name])
    return _posterior_factor(rng, size, mask, str(feature))


def _posterior_factor(rng: np.random.Generator, size: int, mask: np.ndarray, feature: str) -> np.ndarray:
    """(size, size) amplitude factor of posterior `feature` ('enhancement' | 'none' | 'shadow') under the lesion."""
    y, _ = _grid(size)
    cols = mask.any(axis=0)
    if not cols.any() or feature == "none":
        return np.ones((size, size), np.float32)
    rows = np.where(mask.any(axis=1))[0]
    # (size,) lateral weight: soft-edged; shadows are softer at their sides than enhancement
    soften = (0.8 if feature == "enhancement" else 2.0) * size / _REF_SIZE
    profile = ndimage.gaussian_filter1d(cols.astype(np.float32), max(soften, 0.5))
    # Start below the lesion's centre-of-mass depth per column: the lesion's own lower half is affected too.
    bottom_by_col = np.where(cols, size - 1 - np.argmax(mask[::-1], axis=0), rows.max()).astype(np.float32)
    below = np.clip((np.arange(size, dtype=np.float32)[:, None] - bottom_by_col[None, :]) / (0.04 * size) + 0.5, 0, 1)
    if feature == "enhancement":
        gain = rng.uniform(0.6, 1.4)                             # +4 .. +7.6 dB
        fade = np.exp(-(y - rows.max() / size).clip(0) / rng.uniform(0.25, 0.6))
        return (1.0 + gain * profile[None, :] * below * fade).astype(np.float32)
    strength = rng.uniform(0.45, 0.8)                            # -5 .. -14 dB
    return (1.0 - strength * profile[None, :] * below).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Imaging: speckle, attenuation, display
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _psf_energy(size: int, sigma: tuple[float, float]) -> float:
    """Sum of the squared PSF weights: white noise blurred by the PSF has this variance."""
    delta = np.zeros((8 * int(max(sigma) + 2) + 1,) * 2, np.float64)
    delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1.0
    return float((ndimage.gaussian_filter(delta, sigma) ** 2).sum())


def _speckle(rng: np.random.Generator, amp: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """Envelope of scatterers (complex Gaussian, weighted by `amp`) blurred by a Gaussian PSF: fully
    developed speckle, Rayleigh-distributed where tissue is uniform, with mean ~ amp."""
    size = amp.shape[0]
    scatter = rng.standard_normal((2, size, size), dtype=np.float32) * amp[None]   # (2, H, W) I/Q
    iq = ndimage.gaussian_filter(scatter, (0.0, *sigma), mode="reflect")
    # Normalise so a uniform region of amplitude a has E[envelope] = a (Rayleigh mean = sigma*sqrt(pi/2)).
    scale = 1.0 / (np.sqrt(_psf_energy(size, sigma)) * np.sqrt(np.pi / 2))
    return np.hypot(iq[0], iq[1]) * np.float32(scale)


def _display(rng: np.random.Generator, envelope: np.ndarray, device: _Device) -> np.ndarray:
    """Depth attenuation, time-gain compensation, log compression to the device's dynamic range."""
    size = envelope.shape[0]
    y, _ = _grid(size)
    loss_db = rng.uniform(*device.attenuation_db)
    tgc_db = loss_db * rng.uniform(*device.tgc_share)
    near_field_db = rng.uniform(0.0, 4.0)                        # focus lies below the skin: top rows a bit darker
    depth_db = (tgc_db - loss_db) * y - near_field_db * np.exp(-y / 0.08)
    db = 20.0 * np.log10(envelope + 1e-6) + depth_db + rng.uniform(*device.gain_db)
    dyn = rng.uniform(*device.dynamic_range_db)
    grey = (db - (_REFERENCE_DB - dyn)) * (255.0 / dyn)
    return np.clip(grey, 0.0, 255.0)


@functools.lru_cache(maxsize=16)
def _fan_coordinates(size: int, half_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """For a curvilinear probe: (2, size, size) sample coordinates into the (depth, beam) scan grid for
    every display pixel, and the (size, size) bool footprint of the fan. Lengths in image heights."""
    y, x = _grid(size)
    half = np.deg2rad(half_angle_deg)
    probe_radius, depth_span, top = 0.3, 0.96, 0.02              # the fan's centre line spans top .. top + depth_span
    dx, dy = x - 0.5, y - (top - probe_radius)                   # from the probe's centre of curvature
    depth = (np.sqrt(dx * dx + dy * dy) - probe_radius) / depth_span   # 0 at the probe face, 1 at full depth
    beam = 0.5 + np.arctan2(dx, dy) / (2 * half)                 # 0..1 across the beams
    inside = (depth >= 0) & (depth <= 1) & (beam >= 0) & (beam <= 1)
    coords = np.stack([depth * size - 0.5, beam * size - 0.5]).astype(np.float32)
    return coords, inside


def _shrink_into_frame(image: np.ndarray, mask: np.ndarray, top: int, left: int,
                       right: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink the scan into a black frame with `top`, `left`, `right` margins (pixels), as scanners that
    save the whole screen do; the (size, size) shape is kept."""
    size = image.shape[0]
    scan_h, scan_w = size - top, size - left - right
    matrix = (size / scan_h, size / scan_w)                      # output pixel -> input pixel scale
    offset = (0.5 * matrix[0] - 0.5, 0.5 * matrix[1] - 0.5)      # align pixel centres
    framed = np.zeros_like(image)
    framed[top:, left:size - right] = ndimage.affine_transform(image, matrix, offset, output_shape=(scan_h, scan_w),
                                                              order=1, mode="nearest")
    framed_mask = np.zeros_like(mask)
    framed_mask[top:, left:size - right] = ndimage.affine_transform(mask.astype(np.uint8), matrix, offset,
                                                                    output_shape=(scan_h, scan_w), order=0) > 0
    return framed, framed_mask


def _to_fan(image: np.ndarray, mask: np.ndarray, half_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Scan-convert a (depth, beam) image and its mask into a fan on a black background."""
    size = image.shape[0]
    coords, inside = _fan_coordinates(size, round(half_angle_deg))
    fan = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    fan[~inside] = 0.0
    fan_mask = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant") > 0.5
    return fan, fan_mask & inside


# ---------------------------------------------------------------------------------------------
# Burned-in annotations
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)                   # scalable when PIL has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _label(rng: np.random.Generator) -> str:
    lines = []
    if rng.uniform() < 0.85:
        lines.append(str(rng.choice(_LABELS)).format(h=int(rng.integers(1, 13)), c=int(rng.integers(1, 8))))
    if rng.uniform() < 0.5 or not lines:
        lines.append(str(rng.choice(_SCANNER_TAGS)).format(g=int(rng.integers(30, 80)), d=int(rng.integers(45, 75))))
    return "\n".join(lines)


def _annotate(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, device: _Device,
              frame: tuple[int, int, int]) -> np.ndarray:
    """Text labels, a depth ruler and caliper '+' marks drawn into the uint8 image (white-ish, like
    scanner overlays). `frame` = (top, left, right) black margins in pixels; the ruler sits in the right one."""
    size = image.shape[0]
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    ink = int(rng.integers(200, 256))
    if rng.uniform() < device.text_share and size >= 48:
        font = _font(max(6, round(size * 0.055)))
        text = _label(rng)
        corner = int(rng.integers(0, 3))                         # top-left, top-right, bottom-left
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=1)
        w, h = right - left, bottom - top
        pad = max(1, size // 64)
        pos_x = pad if corner != 1 else size - w - pad
        pos_y = pad if corner != 2 else size - h - pad
        draw.multiline_text((pos_x - left, pos_y - top), text, fill=ink, font=font, spacing=1)
    if rng.uniform() < device.ruler_share and size >= 32:
        step = size // int(rng.integers(6, 11))                  # a dot every "centimetre"
        ruler_x = size - 1 - max(frame[2] // 2, max(1, size // 64))
        for yy in range(frame[0] + step, size - 1, step):
            draw.point([(ruler_x, yy), (ruler_x - 1, yy)], fill=ink)
    if mask.any() and rng.uniform() < device.caliper_share:
        ys, xs = np.nonzero(mask)
        arm = max(1, round(size / 64))
        marks = []
        mid_row = int(ys[len(ys) // 2])                          # width caliper: lesion's left and right ends
        row_xs = xs[ys == mid_row]
        marks += [(int(row_xs.min()) - 1, mid_row), (int(row_xs.max()) + 1, mid_row)]
        if rng.uniform() < 0.6:                                  # and often a depth caliper too
            mid_col = int(np.sort(xs)[len(xs) // 2])
            col_ys = ys[xs == mid_col]
            marks += [(mid_col, int(col_ys.min()) - 1), (mid_col, int(col_ys.max()) + 1)]
        for mx, my in marks:
            draw.line([(mx - arm, my), (mx + arm, my)], fill=ink)
            draw.line([(mx, my - arm), (mx, my + arm)], fill=ink)
    return np.asarray(pil)


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------
def make_phantom_image(class_name: str, rng: np.random.Generator, size: int = 128,
                       variant: str = "standard") -> tuple[np.ndarray, np.ndarray]:
    """One phantom image of `class_name` ('benign' | 'malignant' | 'normal') and its lesion mask.

    Returns ((size, size) uint8 B-mode image, (size, size) uint8 mask: 255 on the lesion, 0 elsewhere;
    all 0 for 'normal'). Deterministic for a given generator state."""
    _check_args(class_name, size, variant)
    device = _DEVICES[variant]
    scale = size / _REF_SIZE
    amp = _tissue(rng, size)                                                   # (H, W) echo amplitude
    mask = np.zeros((size, size), bool)
    if class_name != "normal":
        inside, mask, extra = _lesion(rng, size, class_name)
        interior = rng.uniform(0.03, 0.1) if class_name == "benign" else rng.uniform(0.03, 0.09)
        texture = np.exp(0.5 * _smooth_noise(rng, size, (1.0 * scale + 0.3,) * 2))
        amp = amp * (1.0 - inside) + interior * texture * inside + extra.clip(-0.95 * amp, None)
        if class_name == "malignant" and rng.uniform() < 0.3:                  # microcalcifications: bright dots
            amp = _calcifications(rng, amp, mask)
        amp = amp * _posterior(rng, size, mask, class_name)
    return _scan(rng, amp, mask, device)


def _scan(rng: np.random.Generator, amp: np.ndarray, mask: np.ndarray, device: _Device) -> tuple[np.ndarray, np.ndarray]:
    """The imaging chain of `device` over an echo-amplitude map: speckle, display, probe footprint,
    annotations. Returns the uint8 image and the uint8 (0/255) lesion mask in the image's geometry."""
    size = amp.shape[0]
    scale = size / _REF_SIZE
    sigma = (device.psf_axial * scale * rng.uniform(0.9, 1.1), device.psf_lateral * scale * rng.uniform(0.9, 1.1))
    image = _display(rng, _speckle(rng, np.maximum(amp, 0.0), sigma), device)  # (H, W) float grey 0..255
    if device.smoothing > 0:
        image = ndimage.gaussian_filter(image, device.smoothing * scale)
    frame = (0, 0, 0)
    if device.fan:
        image, mask = _to_fan(image, mask, rng.uniform(*device.fan_half_angle_deg))
    elif rng.uniform() < device.frame_share:                                   # black frame around the scan
        top, left, right = (int(round(size * f)) for f in rng.uniform(0.02, 0.08, size=3))
        image, mask = _shrink_into_frame(image, mask, top, left, right)
        frame = (top, left, right)
    grey = _annotate(rng, np.round(image).astype(np.uint8), mask, device, frame)
    return grey, (mask.astype(np.uint8) * 255)


def random_device(rng: np.random.Generator) -> _Device:
    """A simulated scanner drawn from a range that spans the 'standard' and 'shifted' devices and beyond:
    speckle size (PSF), dynamic range, gain, attenuation and time-gain compensation, linear or
    curvilinear probe, framing, overlays and display smoothing all vary. Each setting is a narrow range
    around the device's own value, as one scanner's images vary a little."""
    def around(centre: float, spread: float) -> tuple[float, float]:
        return (centre - spread, centre + spread)

    fan = bool(rng.uniform() < 0.4)
    half_angle = rng.uniform(20.0, 34.0)
    return _Device(
        psf_axial=float(rng.uniform(0.45, 1.15)), psf_lateral=float(rng.uniform(1.0, 2.6)),
        dynamic_range_db=around(rng.uniform(34.0, 58.0), 3.0), gain_db=around(rng.uniform(-5.0, 9.0), 2.0),
        attenuation_db=around(rng.uniform(10.0, 24.0), 3.0), tgc_share=around(rng.uniform(0.4, 0.85), 0.1),
        fan=fan, fan_half_angle_deg=(half_angle, half_angle + 4.0) if fan else (0.0, 0.0),
        frame_share=float(rng.uniform(0.0, 0.6)), text_share=float(rng.uniform(0.0, 0.8)),
        ruler_share=float(rng.uniform(0.0, 0.7)), caliper_share=float(rng.uniform(0.0, 0.5)),
        smoothing=float(rng.uniform(0.0, 0.6)) if rng.uniform() < 0.7 else 0.0,
    )


def make_phantom_scan(rng: np.random.Generator, size: int = 128, lesion: LesionShape | None = None,
                      device: _Device | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One unlabeled scan: breast tissue with the lesion `lesion` (None: no lesion), imaged by `device`
    (None: `random_device(rng)`). The pretraining corpus of the `builtin:phantom` base model is made of
    these: lesions described by look (`LesionShape`), never by class.

    Returns ((size, size) uint8 image, (size, size) uint8 mask, facts) where facts records what a
    caption may say: {"lesion": bool, "fan": bool, "mask_share": float}."""
    if not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise MeddapError(f"phantom: size {size!r} is too small; give an integer >= {_MIN_SIZE}.")
    device = device or random_device(rng)
    scale = size / _REF_SIZE
    amp = _tissue(rng, size)
    mask = np.zeros((size, size), bool)
    if lesion is not None:
        inside, mask, extra = _shaped_lesion(rng, size, lesion)
        interior = rng.uniform(0.03, 0.1)
        texture = np.exp(0.5 * _smooth_noise(rng, size, (1.0 * scale + 0.3,) * 2))
        amp = amp * (1.0 - inside) + interior * texture * inside + extra.clip(-0.95 * amp, None)
        if lesion.calcifications and mask.any():
            amp = _calcifications(rng, amp, mask)
        amp = amp * _posterior_factor(rng, size, mask, lesion.posterior)
    grey, out_mask = _scan(rng, amp, mask, device)
    return grey, out_mask, {"lesion": bool(out_mask.any()), "fan": device.fan,
                            "mask_share": float((out_mask > 0).mean())}


# ---------------------------------------------------------------------------------------------
# Folders in the BUSI layout
# ---------------------------------------------------------------------------------------------
def _png_bytes(grey: np.ndarray) -> bytes:
    """RGB PNG with grey content, as BUSI stores its images and masks."""
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    storage.write_bytes(str(path), data)  # temp file + rename: no half-written image is ever seen


def _plan(seed: int, variant: str, size: int) -> dict:
    """What determines every file's content; files written under another plan are remade."""
    return {"generator": "meddap.data.phantom", "version": _GENERATOR_VERSION, "seed": int(seed),
            "variant": variant, "size": int(size)}


def _read_plan(out: Path, classes: tuple[str, ...]) -> dict | None:
    """The plan of a folder written before, None for a fresh folder. Refuses a folder that holds
    BUSI-named files but no plan (e.g. the real BUSI): writing there would overwrite real images."""
    plan_path = out / _PLAN_FILE
    if plan_path.exists():
        try:
            return json.loads(plan_path.read_text())
        except (OSError, ValueError) as e:
            raise MeddapError(f"phantom: cannot read {plan_path} ({e}); delete it and the class folders to remake "
                              "the phantom.") from e
    for name in PHANTOM_CLASSES + tuple(classes):
        folder = out / name
        if folder.is_dir() and any(p.suffix.lower() == ".png" for p in folder.iterdir()):
            raise MeddapError(f"phantom: {folder} already holds images that the phantom did not write (no "
                              f"{_PLAN_FILE} in {out}); refusing to overwrite them. Choose an empty folder.")
    return None


def _remove_surplus(out: Path, class_name: str, keep: int) -> int:
    """Delete phantom files of `class_name` numbered above `keep` (a smaller --per-class than before)."""
    folder = out / class_name
    removed = 0
    if not folder.is_dir():
        return 0
    prefix = f"{class_name} ("
    for p in folder.iterdir():
        name = p.name
        if not (name.startswith(prefix) and name.endswith(".png")):
            continue
        number = name[len(prefix):].split(")", 1)[0]
        if number.isdigit() and int(number) > keep:
            p.unlink()
            removed += 1
    return removed


def write_phantom(out_dir, per_class: int = 60, variant: str = "standard", size: int = 128, seed: int = 0,
                  classes=("benign", "malignant", "normal"), say: bool = True) -> dict:
    """Write the phantom in BUSI's layout: out_dir/<class>/<class> (i).png and <class> (i)_mask.png,
    i = 1..per_class, RGB PNGs with grey content, plus out_dir/phantom.json (the plan).

    Deterministic for (seed, variant, size); a rerun skips files already written under the same plan,
    so an interrupted run resumes and a larger per_class only adds images; files are written atomically
    (temp + rename). Returns {class: count, ..., "out_dir": str}.
    `say`: print a line of what was written (the prepare stage, which reports the images itself, does not).
    """
    classes = tuple(classes)
    for c in classes:
        _check_args(c, size, variant)
    if not classes:
        raise MeddapError("phantom: no classes to write; give at least one of " + ", ".join(PHANTOM_CLASSES))
    if int(per_class) < 1:
        raise MeddapError(f"phantom: per_class must be >= 1, got {per_class!r}.")
    if int(seed) < 0:
        raise MeddapError(f"phantom: seed must be >= 0, got {seed!r}.")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(seed, variant, size)
    old = _read_plan(out, classes)
    same_plan = old is not None and {k: old.get(k) for k in plan} == plan
    # Record the plan first: every file in the folder is then known to be ours, and a crash half-way
    # leaves a folder a rerun can finish.
    _write_atomic(out / _PLAN_FILE, (json.dumps({**plan, "classes": list(classes), "per_class": int(per_class)},
                                                indent=1) + "\n").encode())
    written = skipped = removed = 0
    t0 = time.perf_counter()
    for class_name in classes:
        folder = out / class_name
        folder.mkdir(exist_ok=True)
        for i in range(1, int(per_class) + 1):
            img_path = folder / phantom_file_name(class_name, i)
            mask_path = folder / phantom_file_name(class_name, i, mask=True)
            if same_plan and img_path.exists() and mask_path.exists():
                skipped += 1
                continue
            image, mask = make_phantom_image(class_name, phantom_image_rng(seed, variant, class_name, i), size, variant)
            _write_atomic(mask_path, _png_bytes(mask))           # mask first: an image never lacks its mask
            _write_atomic(img_path, _png_bytes(image))
            written += 1
        removed += _remove_surplus(out, class_name, int(per_class))
    if old is not None:                                           # classes written before but not asked for now
        for class_name in set(old.get("classes", [])) - set(classes):
            if class_name in PHANTOM_CLASSES:
                removed += _remove_surplus(out, class_name, 0)
    elapsed = time.perf_counter() - t0
    rate = f" ({written / elapsed:.0f} images/s)" if written and elapsed > 0 else ""
    if say:
        logs.say(f"[phantom] {out}: {variant}, {size} px, seed {seed}: "
                 + ", ".join(f"{c} {per_class}" for c in classes)
                 + f"; wrote {written}{rate}, kept {skipped} already there"
                 + (f", removed {removed} surplus files" if removed else ""))
    return {**{c: int(per_class) for c in classes}, "out_dir": str(out)}


def phantom_contact_sheet(out_path, variant: str = "standard", per_class: int = 4, size: int = 128,
                          seed: int = 0, classes=PHANTOM_CLASSES) -> str:
    """A PNG grid for a person to look at: one row per class (images 1..per_class, the same ones
    write_phantom makes for this seed), class names on the left."""
    gap, label_w = 2, 64
    sheet = Image.new("L", (label_w + per_class * (size + gap), len(classes) * (size + gap)), 40)
    draw = ImageDraw.Draw(sheet)
    for row, class_name in enumerate(classes):
        top = row * (size + gap)
        draw.text((4, top + size // 2 - 6), class_name, fill=230, font=_font(11))
        for col in range(per_class):
            rng = phantom_image_rng(seed, variant, class_name, col + 1)
            image, _ = make_phantom_image(class_name, rng, size, variant)
            sheet.paste(Image.fromarray(image), (label_w + col * (size + gap), top))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, optimize=True)
    return str(out_path)
