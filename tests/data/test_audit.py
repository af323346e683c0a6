"""Leakage audit: group keys, exact/near duplicates within a dataset, overlap across datasets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meddap.data.audit import assign_groups, find_duplicates, find_overlap, group_key
from meddap.data.decode import phash_pair, pixel_sha256, thumbnail


@pytest.mark.parametrize("rel, key", [
    ("benign/benign (36)-rotated1-sharpened.png", "benign/benign (36)"),
    ("benign/benign (36)-rotated2.png", "benign/benign (36)"),
    ("benign/benign (36)-sharpened.png", "benign/benign (36)"),
    ("benign/benign (36).png", "benign/benign (36)"),
    ("benign/benign (36)_mask_1.png", "benign/benign (36)"),
    ("benign/benign (3).png", "benign/benign (3)"),          # the (n) numbering identifies the source image
    ("malignant/benign (36).png", "malignant/benign (36)"),  # other folder, other key
    ("a/b/img_007_flip.jpg", "a/b/img_007"),
    ("rotated.png", "rotated"),                               # never strips a whole name
])
def test_group_key(rel, key):
    assert group_key(rel) == key


def _frame(images: list[np.ndarray], rel_paths: list[str], patients=None) -> pd.DataFrame:
    pairs = [phash_pair(im) for im in images]
    return pd.DataFrame({
        "rel_path": rel_paths, "path": ["/x/" + r for r in rel_paths],
        "class_name": [r.split("/")[0] for r in rel_paths],
        "patient_id": patients if patients is not None else [None] * len(images),
        "sha256": [pixel_sha256(im) for im in images],
        "phash": np.array([p[0] for p in pairs], dtype=np.uint64),
        "phash_mirror": np.array([p[1] for p in pairs], dtype=np.uint64),
        "thumb": [thumbnail(im).tobytes() for im in images],
    })


def _noisy(im, seed):
    return np.clip(im.astype(int) + np.random.default_rng(seed).integers(-4, 5, im.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def dataset(builders):
    base = [builders.pattern(s, 64) for s in range(10)]
    images = base + [base[0].copy(), _noisy(base[1], 0), base[2][:, ::-1].copy(), base[3].copy()]
    rels = [f"benign/benign ({i})" + ".png" for i in range(10)] + [
        "benign/copy-of-0.png", "benign/noisy-1.png", "benign/mirror-2.png", "malignant/malignant (3).png"]
    return images, rels


def test_exact_and_near_duplicates_found_unrelated_not(dataset):
    images, rels = dataset
    frame = _frame(images, rels)
    pairs = find_duplicates(frame, near_bits=6)
    found = {(p.i, p.j): p for p in pairs}
    assert found[(0, 10)].exact and found[(0, 10)].distance == 0
    assert found[(3, 13)].exact                     # same pixels under another class: still a duplicate
    assert not found[(1, 11)].exact and found[(1, 11)].distance <= 6
    assert found[(2, 12)].mirrored and not found[(2, 12)].exact
    assert set(found) == {(0, 10), (3, 13), (1, 11), (2, 12)}


def test_correlation_check_rejects_look_alikes_keeps_copies(dataset, builders):
    """Same low-frequency layout (close hashes), different content: a candidate, but not a duplicate."""
    images, rels = dataset
    base = builders.pattern(0, 64).astype(int)
    y, x = np.mgrid[:64, :64]
    checker = np.where((y // 2 + x // 2) % 2 == 0, 1, -1) * 90   # only the highest thumbnail frequency
    look_alike = np.clip(base * 0.6 + 50 + checker, 0, 255).astype(np.uint8)
    frame = _frame(images + [look_alike], rels + ["benign/look-alike.png"])
    unchecked = {(p.i, p.j) for p in find_duplicates(frame, 6)}
    assert (0, 14) in unchecked and (10, 14) in unchecked           # the hash alone is fooled
    checked = {(p.i, p.j): p for p in find_duplicates(frame, 6, min_correlation=0.9)}
    assert (0, 14) not in checked and (10, 14) not in checked
    assert checked[(1, 11)].correlation > 0.99 and checked[(2, 12)].correlation > 0.99
    assert (0, 10) in checked and checked[(0, 10)].exact
    b = _frame([look_alike, images[11]], ["benign/x.png", "benign/y.png"])
    assert {(p.i, p.j) for p in find_overlap(b, frame.iloc[:10], 6, min_correlation=0.9)} == {(1, 1)}


def test_near_duplicate_threshold_is_respected(dataset):
    images, rels = dataset
    frame = _frame(images, rels)
    exact_only = find_duplicates(frame, near_bits=0)
    assert {(p.i, p.j) for p in exact_only if not p.exact} <= {(2, 12)}  # a mirror can be 0 bits apart
    assert {(p.i, p.j) for p in exact_only if p.exact} == {(0, 10), (3, 13)}


def test_groups_merge_names_and_duplicates(dataset, builders):
    images, rels = dataset
    images = images + [builders.pattern(50, 64), builders.pattern(51, 64)]
    rels = rels + ["benign/benign (7)-rotated1.png", "benign/benign (8)_flip.png"]
    frame = _frame(images, rels)
    groups = assign_groups(frame, find_duplicates(frame, 6), "A")
    assert groups[0] == groups[10] == "A:benign/benign (0)"
    assert groups[1] == groups[11] and groups[2] == groups[12]
    assert groups[3] == groups[13]                  # a duplicate across classes joins one group
    assert groups[7] == groups[14] and groups[8] == groups[15]   # same source image by name
    assert len(set(groups[[4, 5, 6, 9]])) == 4 and not set(groups[[4, 5, 6, 9]]) & set(groups[[0, 1, 2, 3]])
    assert list(assign_groups(frame.iloc[::-1].reset_index(drop=True),
                              find_duplicates(frame.iloc[::-1].reset_index(drop=True), 6), "A"))[::-1] \
        == list(groups)  # ids do not depend on row order


def test_patient_id_groups_and_duplicates_cross_patients(builders):
    images = [builders.pattern(s, 64) for s in range(5)]
    images.append(images[4].copy())
    rels = [f"benign/{i}.png" for i in range(6)]
    frame = _frame(images, rels, patients=["p1", "p1", "p2", None, "p3", "p4"])
    groups = assign_groups(frame, find_duplicates(frame, 6), "A")
    assert groups[0] == groups[1] == "A:patient:p1"
    assert groups[2] != groups[0] and groups[3] == "A:benign/3"
    assert groups[4] == groups[5]                   # same pixels under two patient ids: merged


def test_overlap_between_datasets(dataset, builders):
    images, rels = dataset
    a = _frame(images[:10], rels[:10])
    b_images = [images[0].copy(), _noisy(images[5], 3), images[6][:, ::-1].copy(), builders.pattern(80, 64)]
    b = _frame(b_images, ["benign/b0.png", "benign/b1.png", "benign/b2.png", "benign/b3.png"])
    pairs = find_overlap(b, a, near_bits=6)
    got = {(p.i, p.j): p for p in pairs}
    assert set(got) == {(0, 0), (1, 5), (2, 6)}
    assert got[(0, 0)].exact and not got[(1, 5)].exact and got[(2, 6)].mirrored
    assert find_overlap(b.iloc[:0], a, 6) == []


def test_chunked_pairs_match_small(builders, monkeypatch):
    import meddap.data.audit as audit

    images = [builders.pattern(s % 7, 32) for s in range(20)]  # many repeats
    frame = _frame(images, [f"c/{i}.png" for i in range(20)])
    full = {(p.i, p.j, p.exact) for p in find_duplicates(frame, 6)}
    monkeypatch.setattr(audit, "_CHUNK", 3)
    assert {(p.i, p.j, p.exact) for p in find_duplicates(frame, 6)} == full
    assert len(full) == 20 - 7  # each repeat chained to its first copy
