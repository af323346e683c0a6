"""Sources: which files are images of which class; masks never; clear errors for bad layouts."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from meddap.config import load_config
from meddap.data.sources import is_mask, list_busi, list_imagefolder, list_manifest, list_source
from meddap.errors import MeddapError

CLASSES = ["benign", "malignant", "normal"]


def _by_class(listing) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in listing.records:
        out[r.class_name] = out.get(r.class_name, 0) + 1
    return out


@pytest.mark.parametrize("name, mask", [
    ("benign (12)_mask.png", True), ("benign (12)_mask_1.png", True), ("benign (12)_mask_2.png", True),
    ("x_MASK.png", True), ("x-mask.jpg", True), ("benign (12).png", False), ("masked (3).png", False),
    ("maskless.png", False),
])
def test_is_mask(name, mask):
    assert is_mask(name) is mask


def test_busi_reads_images_not_masks_and_reports_other_files(tmp_path, builders):
    builders.busi_tree(tmp_path, {"benign": 4, "malignant": 3, "normal": 3})
    (tmp_path / "benign" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "benign" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "benign" / "readme.txt").write_text("not an image")    # a candidate: decode will skip it
    builders.save(tmp_path / "unsure" / "u (1).png", builders.pattern(1))  # a class not in the config
    (tmp_path / "README.txt").write_text("loose file next to the class folders")
    builders.save(tmp_path / "benign" / ".ipynb_checkpoints" / "benign (1)-checkpoint.png", builders.pattern(1))
    listing = list_busi(str(tmp_path), CLASSES)
    names = sorted(Path(r.path).name for r in listing.records)
    assert not any("_mask" in n for n in names)
    assert _by_class(listing) == {"benign": 5, "malignant": 3, "normal": 3}
    assert "readme.txt" in names
    assert listing.masks == 4 + 1 + 3 + 1 + 3 + 1  # _mask per image, _mask_1 on every third
    kinds = sorted((f.kind, Path(f.path).name) for f in listing.findings)
    assert kinds == [("ignored", ".DS_Store"), ("ignored", "README.txt"), ("ignored", "Thumbs.db"),
                     ("ignored", "benign (1)-checkpoint.png"), ("unknown_class", "u (1).png")]
    assert all(Path(r.path).is_absolute() for r in listing.records)


def test_class_folders_matched_by_name_ignoring_case_not_order(tmp_path, builders):
    builders.busi_tree(tmp_path, {"Normal": 2, "BENIGN": 2, "malignant": 2}, masks=False)
    listing = list_busi(str(tmp_path), ["malignant", "normal", "benign"])
    assert _by_class(listing) == {"malignant": 2, "normal": 2, "benign": 2}


def test_missing_root_and_empty_class_folder_are_errors_naming_the_path(tmp_path, builders):
    with pytest.raises(MeddapError, match=str(tmp_path / "nope")):
        list_busi(str(tmp_path / "nope"), CLASSES)
    builders.busi_tree(tmp_path, {"benign": 2, "malignant": 2}, masks=True)
    (tmp_path / "normal").mkdir()
    builders.save(tmp_path / "normal" / "normal (1)_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(MeddapError, match=r"normal holds no image files \(only 1 masks\)"):
        list_busi(str(tmp_path), CLASSES)


def test_dataset_a_needs_every_class_dataset_b_may_hold_a_subset(tmp_path, builders):
    builders.busi_tree(tmp_path, {"benign": 2, "malignant": 2})
    with pytest.raises(MeddapError, match=r"\['normal'\] missing"):
        list_busi(str(tmp_path), CLASSES)
    listing = list_busi(str(tmp_path), CLASSES, dataset="B", require_all=False)
    assert _by_class(listing) == {"benign": 2, "malignant": 2}
    assert any("normal" in n for n in listing.notes)


def test_root_without_any_class_folder(tmp_path, builders):
    builders.busi_tree(tmp_path / "images", {"cats": 2}, masks=False)
    with pytest.raises(MeddapError, match="no class folder"):
        list_busi(str(tmp_path), CLASSES)
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(MeddapError, match="is a file"):
        list_busi(str(f), CLASSES)


def test_imagefolder_split_layout(tmp_path, builders):
    builders.busi_tree(tmp_path / "train", {"benign": 3, "malignant": 2}, masks=False)
    builders.busi_tree(tmp_path / "val", {"benign": 2, "malignant": 1}, masks=False, seed0=100)
    listing = list_imagefolder(str(tmp_path), CLASSES, split="val", dataset="B", require_all=False)
    assert _by_class(listing) == {"benign": 2, "malignant": 1}
    assert listing.root == str(tmp_path / "val")
    listing = list_imagefolder(str(tmp_path), CLASSES, split="train", dataset="B", require_all=False)
    assert _by_class(listing) == {"benign": 3, "malignant": 2}
    with pytest.raises(MeddapError, match=r"root/<split>/<class>/ with splits \['train', 'val'\]"):
        list_imagefolder(str(tmp_path), CLASSES, split=None, dataset="B", require_all=False)
    with pytest.raises(MeddapError, match="split folder .*test.* does not exist"):
        list_imagefolder(str(tmp_path), CLASSES, split="test", dataset="B", require_all=False)


def test_imagefolder_flat_layout_and_default_split_fallback(tmp_path, builders):
    builders.busi_tree(tmp_path, {"benign": 2, "malignant": 2, "normal": 2}, masks=False)
    (tmp_path / "benign" / "sub").mkdir()
    builders.save(tmp_path / "benign" / "sub" / "deep.png", builders.pattern(77))
    assert _by_class(list_imagefolder(str(tmp_path), CLASSES)) == {"benign": 3, "malignant": 2, "normal": 2}
    # data.external.split defaults to 'val'; a flat root/<class>/ layout still reads, with a note
    listing = list_imagefolder(str(tmp_path), CLASSES, split="val", dataset="B", require_all=False)
    assert len(listing.records) == 7 and any("no 'val' folder" in n for n in listing.notes)


def test_manifest_csv_and_parquet(tmp_path, builders):
    paths = [builders.save(tmp_path / "img" / f"{i}.png", builders.pattern(i)) for i in range(6)]
    table = pd.DataFrame({
        "path": ["img/0.png", str(paths[1]), "img/2.png", "img/3.png", "img/4.png", "img/5.png"],
        "class_name": ["benign", "Malignant", "normal", "cyst", "benign", "normal"],
        "patient_id": ["p1", "p1", "p2", None, "p3", "p4"],
        "split": ["train", "train", "test", "train", "train", "train"],
    })
    table.to_csv(tmp_path / "m.csv", index=False)
    table.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        listing = list_manifest(str(tmp_path / name), CLASSES)
        assert [Path(r.path).name for r in listing.records] == ["0.png", "1.png", "2.png", "4.png", "5.png"]
        assert listing.records[0].path == str(paths[0])  # relative to the manifest's folder
        assert listing.records[1].class_name == "malignant"
        assert [r.patient_id for r in listing.records] == ["p1", "p1", "p2", "p3", "p4"]
        assert [r.source_split for r in listing.records] == ["train", "train", "test", "train", "train"]
        assert [f.kind for f in listing.findings] == ["unknown_class"] and "cyst" in listing.findings[0].reason


def test_manifest_errors(tmp_path):
    with pytest.raises(MeddapError, match="does not exist"):
        list_manifest(str(tmp_path / "none.csv"), CLASSES)
    pd.DataFrame({"file": ["a.png"], "class_name": ["benign"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(MeddapError, match=r"lacks column\(s\) \['path'\]"):
        list_manifest(str(tmp_path / "bad.csv"), CLASSES)
    pd.DataFrame({"path": ["a.png", "b.png"], "class_name": ["benign", "malignant"],
                  "split": ["train", "validation"]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(MeddapError, match="'validation'"):
        list_manifest(str(tmp_path / "s.csv"), CLASSES[:2])
    with pytest.raises(MeddapError, match="no rows with split 'val'"):
        list_manifest(str(tmp_path / "s.csv"), CLASSES[:2], split="val")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(MeddapError, match="unknown file type"):
        list_manifest(str(tmp_path / "x.json"), CLASSES)


def test_list_source_phantom_uses_write_phantom_and_reads_as_busi(tmp_path, monkeypatch, builders):
    """The phantom source asks write_phantom for run_dir/data/phantom/{A,B} and reads them as BUSI."""
    calls = []

    def fake_write_phantom(out_dir, per_class=60, variant="standard", size=128, seed=0,
                           classes=("benign", "malignant", "normal"), say=True):
        calls.append((out_dir, per_class, variant, size, seed, tuple(classes)))
        builders.busi_tree(Path(out_dir), {c: per_class for c in classes}, size=size, seed0=seed * 1000)
        return {}

    # A stand-in module: this test checks the source's side of the contract, not the generator.
    monkeypatch.setitem(sys.modules, "meddap.data.phantom", SimpleNamespace(write_phantom=fake_write_phantom))
    cfg = load_config("demo", [f"run_dir={tmp_path}/run", "data.phantom.per_class=3",
                               "data.external.phantom.per_class=2"])
    a = list_source(cfg, "A")
    b = list_source(cfg, "B")
    assert a.source == "phantom" and _by_class(a) == {"benign": 3, "malignant": 3, "normal": 3}
    assert _by_class(b) == {"benign": 2, "malignant": 2}  # like Kaggle's Dataset B: no normal class
    assert a.root == str(tmp_path / "run" / "data" / "phantom" / "A")
    assert calls[1][2] == "shifted" and calls[1][5] == ("benign", "malignant")
    assert calls[0][1:] == (3, "standard", cfg.data.phantom.size, cfg.data.phantom.seed, tuple(CLASSES))


def test_manifest_paths_that_leave_their_root_are_refused(tmp_path, builders):
    """`..` out of the manifest's folder, or (with images_root) any path outside that root, is refused
    naming the rows and the fix; paths inside it, written any way, are read."""
    data = tmp_path / "data"
    outside = builders.save(tmp_path / "secret" / "x.png", builders.pattern(9))
    inside = [builders.save(data / "img" / f"{i}.png", builders.pattern(i)) for i in range(3)]

    def manifest(paths, name="m.csv"):
        pd.DataFrame({"path": paths, "class_name": ["benign", "malignant", "normal"][:len(paths)]}).to_csv(
            data / name, index=False)
        return str(data / name)

    # Inside the manifest's folder, even via a detour; an absolute path is taken as written (no root given).
    ok = list_manifest(manifest(["img/0.png", "img/../img/1.png", str(inside[2])]), CLASSES)
    assert [r.path for r in ok.records] == [str(p) for p in inside]
    with pytest.raises(MeddapError, match=r"1 path\(s\) leave its folder .*row 1: relative path '\.\./secret/x\.png'"
                                          r".*data\.images_root"):
        list_manifest(manifest(["img/0.png", "../secret/x.png", "img/2.png"]), CLASSES)
    # With images_root: relative paths are read from it; absolute ones must lie in it.
    rooted = list_manifest(manifest(["0.png", "1.png", str(inside[2])]), CLASSES, images_root=str(data / "img"))
    assert [r.path for r in rooted.records] == [str(p) for p in inside]
    assert [r.rel_path for r in rooted.records] == ["0.png", "1.png", "2.png"]
    with pytest.raises(MeddapError, match=rf"leave the images root .*absolute path '{outside}'"):
        list_manifest(manifest(["0.png", str(outside), "2.png"]), CLASSES, images_root=str(data / "img"),
                      images_root_key="data.external.images_root")
    with pytest.raises(MeddapError, match="images_root .* does not exist"):
        list_manifest(manifest(["0.png"]), CLASSES[:1], images_root=str(tmp_path / "nope"))
