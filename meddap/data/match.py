"""Copies of one dataset's images in another, whatever their orientation: rotated by 90/180/270 degrees
or by a small angle, mirrored, rescaled, sharpened.

Every image is compared through its 32 x 32 thumbnail (meddap.data.decode.thumbnail, cached by prepare).
A copy's thumbnail differs from its source's by
  - a dihedral transform (rotation by a multiple of 90 degrees, optionally mirrored): exact on a
    square thumbnail, because a thumbnail squashes both sides to 32 pixels whatever the aspect;
  - a small rotation about the centre, with the canvas kept (corners filled with black), grown to hold
    the whole image (content shrinks by |cos| + |sin|) or cropped back and enlarged (content grows by it);
  - resampling and sharpening, which an antialiased 32-pixel thumbnail all but erases.

Search: each candidate-copy thumbnail is resampled under a grid of transforms (8 dihedral x angles
x the three zooms above) and compared with every source thumbnail by Pearson correlation over the
central disk (the corners, where a rotation brings in black, are left out): zero-mean unit vectors, so
a correlation is a dot product and the search is a chunked matrix product. Each copy's best
`_TOP_K` sources reaching `search` correlation are then refined on a finer grid of angles and zooms
around the best transform, and a pair is confirmed when the refined correlation reaches
`min_correlation`. Unrelated scans of one layout correlate well below that (0.82 at most among
~6,000 phantom pairs measured; see tests/data/test_match.py), while rotated, mirrored, rescaled
and sharpened copies reach 0.95 to 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = ["AlignedMatch", "find_aligned_copies", "transform_label", "THUMB_SIDE"]

THUMB_SIDE = 32
_DISK_RADIUS = 14.0       # pixels of the 32 x 32 thumbnail compared (a disk clear of the corners)
_TOP_K = 3                # sources refined per candidate copy
_CHUNK = 64               # candidate copies resampled at once (bounds memory at ~25 MB)
_REFINE_ANGLE_STEP = 0.5  # degrees
_REFINE_ZOOM = (0.96, 0.98, 1.0, 1.02, 1.04)


@dataclass(frozen=True)
class AlignedMatch:
    i: int              # row of the candidate copy (in `copies`)
    j: int              # row of the source (in `sources`)
    correlation: float  # after refinement
    dihedral: int       # 0..7: quarter turns (k % 4) and mirrored (k >= 4)
    angle: float        # degrees of the small rotation
    zoom: float         # content scale undone (1 = none)


def transform_label(m: AlignedMatch) -> str:
    """'rotated 90, mirrored, 7.5 deg, zoom 1.12' in words for the audit."""
    parts = []
    quarter, mirrored = m.dihedral % 4, m.dihedral >= 4
    if quarter:
        parts.append(f"rotated {90 * quarter}")
    if mirrored:
        parts.append("mirrored")
    if abs(m.angle) > 1e-9:
        parts.append(f"{m.angle:+.1f} deg")
    if abs(m.zoom - 1.0) > 1e-9:
        parts.append(f"zoom {m.zoom:.2f}")
    return ", ".join(parts) or "as stored"


# ---------------------------------------------------------------------------------------------
# Resampling maps: where each disk pixel of the transformed thumbnail is read from.
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _disk() -> tuple[np.ndarray, np.ndarray]:
    """(P,) y and x of the compared pixels, relative to the thumbnail centre."""
    c = (THUMB_SIDE - 1) / 2
    yy, xx = np.mgrid[:THUMB_SIDE, :THUMB_SIDE]
    inside = (yy - c) ** 2 + (xx - c) ** 2 <= _DISK_RADIUS ** 2
    return (yy[inside] - c).astype(np.float64), (xx[inside] - c).astype(np.float64)


def _dihedral(y: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (about the centre) mapped by quarter turns k % 4, then a left-right mirror if k >= 4."""
    for _ in range(k % 4):
        y, x = x, -y
    if k >= 4:
        x = -x
    return y, x


def _sampling_map(dihedral: int, angle: float, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """(4, P) flat source indices (THUMB_SIDE**2 = outside, reads 0) and (4, P) bilinear weights."""
    y, x = _disk()
    t = np.radians(angle)
    cos, sin = np.cos(t), np.sin(t)
    ys, xs = (cos * y - sin * x) / zoom, (sin * y + cos * x) / zoom
    ys, xs = _dihedral(ys, xs, dihedral)
    c = (THUMB_SIDE - 1) / 2
    ys, xs = ys + c, xs + c
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = ys - y0, xs - x0
    idx, w = [], []
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < THUMB_SIDE) & (xx >= 0) & (xx < THUMB_SIDE)
        idx.append(np.where(ok, yy * THUMB_SIDE + xx, THUMB_SIDE * THUMB_SIDE))
        w.append(np.where(ok, wt, 0.0))
    return np.stack(idx), np.stack(w).astype(np.float32)


def _zooms(angle: float) -> list[float]:
    """Canvas kept (1), grown to hold the rotated image (content shrank: undo by |cos|+|sin|), or cropped
    back and enlarged (content grew: undo by its inverse)."""
    if abs(angle) < 1e-9:
        return [1.0]
    grow = abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))
    return [1.0, float(grow), float(1.0 / grow)]


def _search_grid(max_angle: float, step: float) -> list[tuple[int, float, float]]:
    n = int(np.floor(max_angle / step + 1e-9)) if step > 0 else 0
    angles = [0.0] + [s * k * step for k in range(1, n + 1) for s in (1, -1)]
    return [(d, a, z) for d in range(8) for a in angles for z in _zooms(a)]


def _maps(grid: Sequence[tuple[int, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(T, 4, P) indices and weights of a grid of transforms."""
    pairs = [_sampling_map(*g) for g in grid]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _unit(v: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm rows along the last axis (flat rows stay 0: they correlate with nothing)."""
    v = v - v.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 1e-6)


def _resample(thumbs: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(N, S*S) thumbnails -> (N, T, P) unit vectors of each thumbnail under each transform."""
    padded = np.concatenate([thumbs, np.zeros((thumbs.shape[0], 1), np.float32)], axis=1)  # (N, S*S + 1)
    out = np.zeros((thumbs.shape[0], *idx.shape[0:1], idx.shape[2]), np.float32)          # (N, T, P)
    for k in range(4):
        out += padded[:, idx[:, k, :]] * w[None, :, k, :]
    return _unit(out)


def _as_matrix(thumbs: Sequence[np.ndarray]) -> np.ndarray:
    arr = np.stack([np.asarray(t, np.float32).reshape(THUMB_SIDE, THUMB_SIDE) for t in thumbs])
    return arr.reshape(len(thumbs), -1)                                                   # (N, S*S)


def _refine(copy_thumb: np.ndarray, source_vec: np.ndarray, dihedral: int, angle: float,
            zoom: float, coarse_step: float) -> tuple[float, float, float]:
    """Best (correlation, angle, zoom) on a finer grid around a coarse match."""
    half = max(coarse_step / 2, _REFINE_ANGLE_STEP)
    angles = angle + np.arange(-half, half + 1e-9, _REFINE_ANGLE_STEP)
    grid = [(dihedral, float(a), float(zoom * f)) for a in angles for f in _REFINE_ZOOM]
    idx, w = _maps(grid)
    vecs = _resample(copy_thumb[None], idx, w)[0]                                          # (T, P)
    corr = vecs @ source_vec                                                               # (T,)
    best = int(np.argmax(corr))
    return float(corr[best]), grid[best][1], grid[best][2]


def find_aligned_copies(copies: Sequence[np.ndarray], sources: Sequence[np.ndarray], min_correlation: float,
                        max_angle: float = 15.0, angle_step: float = 5.0,
                        search_margin: float = 0.1) -> list[AlignedMatch]:
    """Pairs (copy i, source j) whose 32 x 32 thumbnails correlate at least `min_correlation` after
    the best dihedral transform, small rotation (|angle| <= max_angle) and zoom. `search_margin`:
    how far below `min_correlation` a coarse-grid candidate may be and still be refined."""
    if not len(copies) or not len(sources):
        return []
    grid = _search_grid(max_angle, angle_step)
    idx, w = _maps(grid)
    copy_mat = _as_matrix(copies)                                                          # (Nc, S*S)
    src_vecs = _resample(_as_matrix(sources), *_maps([(0, 0.0, 1.0)]))[:, 0, :]           # (Ns, P)
    search = min_correlation - search_margin
    matches: list[AlignedMatch] = []
    for start in range(0, len(copy_mat), _CHUNK):
        chunk = copy_mat[start:start + _CHUNK]
        vecs = _resample(chunk, idx, w)                                                    # (n, T, P)
        corr = np.einsum("ntp,sp->nts", vecs, src_vecs, optimize=True)                     # (n, T, Ns)
        best_t = corr.argmax(axis=1)                                                       # (n, Ns)
        best = np.take_along_axis(corr, best_t[:, None, :], axis=1)[:, 0, :]               # (n, Ns)
        for a in range(len(chunk)):
            order = np.argsort(-best[a])[:_TOP_K]
            for j in order[best[a, order] >= search]:
                d, ang, z = grid[int(best_t[a, j])]
                r, ang, z = _refine(chunk[a], src_vecs[j], d, ang, z, angle_step)
                if r >= min_correlation:
                    matches.append(AlignedMatch(start + a, int(j), round(r, 4), d, ang, z))
    return matches
