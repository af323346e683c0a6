"""Leakage audit: duplicate images, and the groups that keep related images on one side of every split.

Two images are
  - exact duplicates when their decoded pixels are identical (`pixel_sha256`);
  - near duplicates when their 64-bit DCT perceptual hashes differ in at most `data.near_duplicate_bits`
    bits, either as stored or with one of them mirrored left-right (a common augmentation).

A perceptual-hash candidate is confirmed only when the two 32x32 thumbnails also correlate at least
`data.near_duplicate_min_correlation` (Pearson, one mirrored if that matches better): scans of one
layout (skin, fat, gland layers) share many low-frequency hash bits without being copies, while a
resized, re-encoded or lightly edited copy correlates above 0.99.

A group is the unit a split never cuts. Each image starts in the group of its patient (`patient_id`,
when the source has one) or else of its file-name key: the file stem with mask and augmentation suffixes
removed (`benign (36)-rotated1-sharpened` -> `benign (36)`; the `(n)` numbering stays, it names the
source image), inside its folder. Groups joined by an exact or near duplicate pair are merged
(union-find), so copies of one image never straddle train/test or two folds. Dataset B is audited
against Dataset A but never merged with it. Across datasets only content decides (Kaggle's numbering is
not BUSI's): a B image overlaps A when it is an exact or near duplicate as above, or, with
`aligned_min_correlation`, a rotated (90/180/270 or a small angle), mirrored, rescaled or sharpened copy
(meddap.data.match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from meddap.data.decode import hamming_matrix, thumbnail_correlation
from meddap.data.match import find_aligned_copies, transform_label

__all__ = [
    "group_key",
    "DuplicatePair",
    "find_duplicates",
    "find_overlap",
    "assign_groups",
    "AUDIT_COLUMNS",
    "findings_frame",
    "pair_reason",
]

# Columns of run_dir/data/audit.parquet (one row per finding).
AUDIT_COLUMNS = ["kind", "dataset", "path", "other_path", "class_name", "other_class", "distance",
                 "reason", "other_split"]

_MASK_SUFFIX = re.compile(r"[_\- ]mask(?:[_\- ]?\d+)?$", re.IGNORECASE)
_AUG_WORDS = (
    "rotated|rotate|rot|flipped|flip|hflip|vflip|mirrored|mirror|sharpened|sharpen|blurred|blur|"
    "noisy|noise|zoomed|zoom|cropped|crop|shifted|shift|translated|scaled|sheared|shear|"
    "brightened|darkened|contrast|augmented|aug|copy"
)
# One augmentation token at the end of a stem: a separator, the word, optional digits.
_AUG_SUFFIX = re.compile(rf"[_\- ]+(?:{_AUG_WORDS})[_\- ]?\d*$", re.IGNORECASE)
_CHUNK = 1024  # rows per block of the pairwise hash-distance matrix (bounds memory at ~8 MB per block)


def group_key(rel_path: str) -> str:
    """File-name group key: folder + stem without mask/augmentation suffixes (case kept)."""
    rel = rel_path.replace("\\", "/")
    folder, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    stem = _MASK_SUFFIX.sub("", stem)
    while True:
        shorter = _AUG_SUFFIX.sub("", stem)
        if shorter == stem or not shorter.strip():
            break
        stem = shorter
    return f"{folder}/{stem.strip()}" if folder else stem.strip()


@dataclass(frozen=True)
class DuplicatePair:
    i: int            # row index (into the frame(s) given)
    j: int
    exact: bool
    distance: Optional[int]  # hash bits apart (0 for exact; None for a match found by alignment)
    mirrored: bool    # the near match is with one image mirrored
    correlation: Optional[float] = None  # thumbnail correlation that confirmed a near pair
    transform: Optional[str] = None      # how an aligned copy was aligned ("rotated 90, +7.0 deg")


def _near_distances(h1: np.ndarray, m1: np.ndarray, h2: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n1, n2) min bit distance over {as stored, one side mirrored}, and whether the min was mirrored."""
    plain = hamming_matrix(h1, h2)
    mirror = np.minimum(hamming_matrix(m1, h2), hamming_matrix(h1, m2))
    return np.minimum(plain, mirror), mirror < plain


def _hash_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return (frame["phash"].to_numpy(dtype=np.uint64), frame["phash_mirror"].to_numpy(dtype=np.uint64))


def _thumbs(frame: pd.DataFrame) -> Optional[list[np.ndarray]]:
    """(32, 32) uint8 thumbnails from the frame's `thumb` column (arrays or raw bytes), if it has one."""
    if "thumb" not in frame:
        return None
    out = []
    for t in frame["thumb"]:
        arr = np.frombuffer(t, dtype=np.uint8) if isinstance(t, (bytes, bytearray)) else np.asarray(t, np.uint8)
        side = int(round(np.sqrt(arr.size)))
        out.append(arr.reshape(side, side))
    return out


def _confirm(pair: DuplicatePair, t1, t2, min_correlation: Optional[float]) -> Optional[DuplicatePair]:
    """The pair with its thumbnail correlation, or None when the correlation is below the minimum."""
    if pair.exact or min_correlation is None or t1 is None:
        return pair
    r = thumbnail_correlation(t1[pair.i], t2[pair.j])
    if r < min_correlation:
        return None
    return DuplicatePair(pair.i, pair.j, pair.exact, pair.distance, pair.mirrored, round(r, 4))


def find_duplicates(frame: pd.DataFrame, near_bits: int,
                    min_correlation: Optional[float] = None) -> list[DuplicatePair]:
    """Exact and near duplicate pairs within one dataset. `frame` needs sha256, phash, phash_mirror
    (positional rows) and, for the correlation check, thumb. Exact copies are reported as a chain to
    their first copy, not every pair."""
    pairs: list[DuplicatePair] = []
    sha = frame["sha256"].to_numpy()
    first_of: dict[str, int] = {}
    for i, s in enumerate(sha):
        if s in first_of:
            pairs.append(DuplicatePair(first_of[s], i, True, 0, False))
        else:
            first_of[s] = i
    h, m = _hash_arrays(frame)
    thumbs = _thumbs(frame)
    n = len(frame)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        dist, mirrored = _near_distances(h[start:stop], m[start:stop], h, m)  # (chunk, n)
        ii, jj = np.nonzero(dist <= near_bits)
        for a, j in zip(ii.tolist(), jj.tolist()):
            i = start + a
            if j <= i or sha[i] == sha[j]:
                continue
            p = _confirm(DuplicatePair(i, j, False, int(dist[a, j]), bool(mirrored[a, j])), thumbs, thumbs,
                         min_correlation)
            if p is not None:
                pairs.append(p)
    return pairs


def find_overlap(ext: pd.DataFrame, base: pd.DataFrame, near_bits: int,
                 min_correlation: Optional[float] = None, aligned_min_correlation: Optional[float] = None,
                 max_angle: float = 15.0) -> list[DuplicatePair]:
    """Pairs (i in `ext`, j in `base`) that are exact or near duplicates across two datasets and, with
    `aligned_min_correlation` (needs the `thumb` column), copies under any dihedral transform, a rotation
    up to `max_angle` degrees and a zoom (meddap.data.match). One pair per (i, j): exact first, then a
    near duplicate by hash, then an aligned copy."""
    pairs: dict[tuple[int, int], DuplicatePair] = {}
    if len(ext) == 0 or len(base) == 0:
        return []
    base_sha = base["sha256"].to_numpy()
    ext_sha = ext["sha256"].to_numpy()
    hb, mb = _hash_arrays(base)
    he, me = _hash_arrays(ext)
    t_base, t_ext = _thumbs(base), _thumbs(ext)
    for start in range(0, len(ext), _CHUNK):
        stop = min(start + _CHUNK, len(ext))
        dist, mirrored = _near_distances(he[start:stop], me[start:stop], hb, mb)  # (chunk, n_base)
        exact = ext_sha[start:stop, None] == base_sha[None, :]
        ii, jj = np.nonzero((dist <= near_bits) | exact)
        for a, j in zip(ii.tolist(), jj.tolist()):
            is_exact = bool(exact[a, j])
            p = _confirm(DuplicatePair(start + a, j, is_exact, 0 if is_exact else int(dist[a, j]),
                                       False if is_exact else bool(mirrored[a, j])), t_ext, t_base, min_correlation)
            if p is not None:
                pairs[(p.i, p.j)] = p
    if aligned_min_correlation is not None and t_ext is not None and t_base is not None:
        for m in find_aligned_copies(t_ext, t_base, aligned_min_correlation, max_angle=max_angle):
            if (m.i, m.j) not in pairs:
                pairs[(m.i, m.j)] = DuplicatePair(m.i, m.j, False, None, m.dihedral >= 4, m.correlation,
                                                  transform_label(m))
    return [pairs[k] for k in sorted(pairs)]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def assign_groups(frame: pd.DataFrame, pairs: Iterable[DuplicatePair], dataset: str) -> pd.Series:
    """group_id per row: patient (when given) or file-name key, merged over duplicate pairs.
    The id is `<dataset>:<smallest base key in the group>`, so it is stable across runs."""
    n = len(frame)
    patient = frame["patient_id"] if "patient_id" in frame else pd.Series([None] * n)
    base_keys: list[str] = []
    for rel, pid in zip(frame["rel_path"], patient):
        base_keys.append(f"patient:{pid}" if isinstance(pid, str) and pid else group_key(rel))
    uf = _UnionFind(n)
    first_with_key: dict[str, int] = {}
    for i, k in enumerate(base_keys):
        if k in first_with_key:
            uf.union(first_with_key[k], i)
        else:
            first_with_key[k] = i
    for p in pairs:
        uf.union(p.i, p.j)
    name_of_root: dict[int, str] = {}
    for i, k in enumerate(base_keys):
        r = uf.find(i)
        if r not in name_of_root or k < name_of_root[r]:
            name_of_root[r] = k
    return pd.Series([f"{dataset}:{name_of_root[uf.find(i)]}" for i in range(n)], index=frame.index)


def findings_frame(rows: list[dict]) -> pd.DataFrame:
    """Audit rows -> a frame with exactly AUDIT_COLUMNS (missing values null)."""
    out = pd.DataFrame(rows, columns=AUDIT_COLUMNS)
    out["distance"] = out["distance"].astype("Int64")
    for c in AUDIT_COLUMNS:
        if c != "distance":
            out[c] = out[c].astype("string")
    return out


def pair_reason(p: DuplicatePair, near_bits: int, other_dataset: Optional[str] = None) -> str:
    """Why two images were paired, in words for the audit file and the printed summary."""
    where = f" with a Dataset {other_dataset} image" if other_dataset else ""
    if p.exact:
        return f"identical decoded pixels{where}"
    if p.transform is not None:
        return (f"aligned copy{where}: thumbnail correlation {p.correlation:.3f} after aligning it "
                f"({p.transform})")
    how = " (one mirrored)" if p.mirrored else ""
    corr = f", thumbnail correlation {p.correlation:.3f}" if p.correlation is not None else ""
    return f"perceptual hashes {p.distance} of 64 bits apart{how} <= {near_bits}{corr}{where}"
