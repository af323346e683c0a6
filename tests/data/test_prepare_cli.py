"""`python -m meddap prepare` end to end on temp dirs: the phantom demo, BUSI- and Kaggle-like folders
with every nasty case, a manifest source, reruns, and clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from meddap.cli import main
from meddap.data.decode import pixel_sha256, read_grey
from meddap.stages.prepare import MANIFEST_COLUMNS

CONTRACT = {"image_id": str, "path": str, "dataset": str, "class_name": str, "label": int, "split": str,
            "fold": int, "group_id": str, "sha256": str, "width": int, "height": int}


def _check_contract(m: pd.DataFrame, classes: list[str], folds: int) -> None:
    assert list(m.columns)[:len(CONTRACT)] == list(CONTRACT)
    assert m["image_id"].is_unique and m["path"].is_unique
    for col, tp in CONTRACT.items():
        assert all(isinstance(v, (tp, np.integer) if tp is int else tp) for v in m[col]), col
    assert set(m["dataset"]) <= {"A", "B"}
    assert (m["label"] == [classes.index(c) for c in m["class_name"]]).all()
    a, b = m[m["dataset"] == "A"], m[m["dataset"] == "B"]
    assert set(a["split"]) == {"train", "test"} and (b["split"] == "external").all()
    assert set(a.loc[a["split"] == "train", "fold"]) == set(range(folds))
    assert (m.loc[m["split"] != "train", "fold"] == -1).all()
    per_group = a.groupby("group_id").agg(s=("split", "nunique"), f=("fold", "nunique"))
    assert (per_group["s"] == 1).all() and (per_group["f"] == 1).all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m["path"])
    assert not m["path"].str.contains("_mask").any()


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["prepare", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# The embedded default.
# ---------------------------------------------------------------------------------------------
def test_demo_prepare_phantom_and_idempotent_rerun(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", "demo", f"run_dir={run_dir}", "data.phantom.per_class=12", "data.phantom.size=64",
            "data.external.phantom.per_class=6", "data.external.phantom.size=64"]
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    manifest = run_dir / "data" / "manifest.parquet"
    assert f"manifest: {manifest}" in out
    m = pd.read_parquet(manifest)
    _check_contract(m, ["benign", "malignant", "normal"], folds=2)
    assert (m["dataset"] == "A").sum() == 36 and (m["dataset"] == "B").sum() == 12
    assert set(m.loc[m["dataset"] == "B", "class_name"]) == {"benign", "malignant"}
    assert str(run_dir / "data" / "phantom" / "A") in m["path"].iloc[0]
    row = m.iloc[5]
    grey = read_grey(row["path"])
    assert pixel_sha256(grey) == row["sha256"] and grey.shape == (row["height"], row["width"]) == (64, 64)
    test = m[m["split"] == "test"].groupby("class_name").size()
    assert ((test - 0.2 * 12).abs() < 1).all()  # demo: test_fraction 0.2 of 12 per class, stratified

    before = {p: p.stat().st_mtime_ns for p in (run_dir / "data").glob("*.parquet")}
    rc, out2, err = _run(capsys, *args)
    assert rc == 0, err
    assert "[prepare: decode]" not in out2                      # nothing decoded again
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "data").glob("*.parquet")} == before
    pd.testing.assert_frame_equal(pd.read_parquet(manifest), m)


# ---------------------------------------------------------------------------------------------
# BUSI-like Dataset A and Kaggle-like Dataset B with the nasty cases.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nasty(tmp_path_factory, builders):
    b = builders
    root = tmp_path_factory.mktemp("nasty")
    a = root / "Dataset_BUSI_with_GT"
    files = b.busi_tree(a, {"benign": 14, "malignant": 9, "normal": 7}, size=40)
    # formats: RGBA, 16-bit grey, palette, 1-bit (valid images, decoded to the canonical form)
    g = b.pattern(500, 40)
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    b.save(a / "benign" / "benign (15).png", rgba)
    Image.fromarray((b.pattern(501, 40).astype(np.uint16) * 257)).save(a / "benign" / "benign (16).png")
    Image.fromarray(np.stack([b.pattern(502, 40)] * 3, -1)).convert("P").save(a / "malignant" / "malignant (10).png")
    # unusable files: truncated, text with an image name, an empty file
    b.truncated_png(a / "malignant" / "malignant (11).png")
    (a / "normal" / "normal (8).png").write_text("not really a png")
    (a / "normal" / "normal (9).png").write_bytes(b"")
    (a / "normal" / ".DS_Store").write_bytes(b"\0\0")
    # a copy of one image under another name and class (BUSI has such), and a class not configured
    shutil.copy(files["benign"][0], a / "malignant" / "malignant (12).png")
    b.save(a / "unsure" / "unsure (1).png", b.pattern(503, 40))
    # Dataset B, Kaggle layout: root/{train,val}/{benign,malignant}/ with augmentation-chain names
    kag = root / "ultrasound breast classification"
    b.busi_tree(kag / "train", {"benign": 3, "malignant": 3}, size=40, seed0=2000, masks=False)
    b.busi_tree(kag / "val", {"benign": 5, "malignant": 4}, size=40, seed0=3000, masks=False,
                name_fmt="{cls} ({i})-rotated1-sharpened")
    shutil.copy(files["benign"][3], kag / "val" / "benign" / "benign (90)-sharpened.png")          # exact
    near = Image.open(files["malignant"][2]).resize((36, 36), Image.Resampling.BILINEAR)
    near.save(kag / "val" / "malignant" / "malignant (91)-rotated2.jpg", quality=92)               # near
    return {"a": a, "b": kag, "files": files}


def _paper_args(nasty, run_dir, *extra):
    return ["--config", "paper", f"data.root={nasty['a']}", f"data.external.root={nasty['b']}",
            f"run_dir={run_dir}", "data.folds=3", *extra]


def test_paper_prepare_on_busi_and_kaggle_layouts(nasty, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, out, err = _run(capsys, *_paper_args(nasty, run_dir))
    assert rc == 0, err
    m = pd.read_parquet(run_dir / "data" / "manifest.parquet")
    audit = pd.read_parquet(run_dir / "data" / "audit.parquet")
    _check_contract(m, ["benign", "malignant", "normal"], folds=3)
    a = m[m["dataset"] == "A"]
    # 14+2 benign, 9+1+1 malignant (palette, copy), 7 normal; masks, broken and unknown-class files not in
    assert a.groupby("class_name").size().to_dict() == {"benign": 16, "malignant": 11, "normal": 7}
    assert (m["dataset"] == "B").sum() == 11 and not m["path"].str.contains("/train/").any()
    assert (a["width"] == 40).all()
    # the canonical form of the odd formats
    by_name = a.set_index(a["path"].map(lambda p: Path(p).name))
    assert by_name.loc["benign (16).png", "sha256"] == pixel_sha256(read_grey(by_name.loc["benign (16).png", "path"]))

    skipped = audit[audit["kind"] == "skipped"]
    skipped = skipped.set_index(skipped["path"].map(lambda p: Path(p).name))
    assert set(skipped.index) == {"malignant (11).png", "normal (8).png", "normal (9).png"}
    assert "truncated" in skipped.loc["malignant (11).png", "reason"]
    assert "not an image" in skipped.loc["normal (8).png", "reason"]
    assert "empty file" in skipped.loc["normal (9).png", "reason"]
    assert (audit["kind"] == "unknown_class").sum() == 1 and (audit["kind"] == "ignored").sum() == 1
    for name in ("malignant (11).png", "normal (8).png", "normal (9).png"):
        assert name in out                                         # listed in the printed summary too

    # the copy filed under another class: one group, found as an exact duplicate
    benign1 = a[a["path"].str.endswith("benign (1).png")].iloc[0]
    copy = a[a["path"].str.endswith("malignant (12).png")].iloc[0]
    assert benign1["group_id"] == copy["group_id"] and benign1["fold"] == copy["fold"]
    dup = audit[audit["kind"] == "exact_duplicate"]
    assert len(dup) == 1 and {dup["class_name"].iloc[0], dup["other_class"].iloc[0]} == {"benign", "malignant"}
    assert "filed under different classes" in out

    # A/B overlap: the exact copy and the resized JPEG, with their A split
    ov = audit[audit["kind"] == "ab_overlap"]
    pairs = {(Path(r.path).name, Path(r.other_path).name, r.distance == 0) for r in ov.itertuples()}
    assert ("benign (90)-sharpened.png", "benign (4).png", True) in pairs
    assert any(p[0] == "malignant (91)-rotated2.jpg" and p[1] == "malignant (3).png" for p in pairs)
    assert len(ov) == 2 and set(ov["other_split"]) <= {"train", "test"}
    assert "A/B overlap: 2 pair(s) (1 exact, 1 near, 0 rotated/mirrored/rescaled copies)" in out
    assert "2 of 11 B images match an A image" in out
    flagged = m[m["a_overlap"]]["path"].map(lambda p: Path(p).name)
    assert set(flagged) == {"benign (90)-sharpened.png", "malignant (91)-rotated2.jpg"}   # alone in their B groups
    assert not m.loc[m["dataset"] == "A", "a_overlap"].any()
    # B's group key strips the augmentation chain
    assert "B:benign/benign (1)" in set(m["group_id"])


def test_strict_turns_skips_into_an_error(nasty, tmp_path, capsys):
    rc, out, err = _run(capsys, *_paper_args(nasty, tmp_path / "run", "data.strict=true"))
    assert rc == 2
    assert "3 file(s) cannot be used and data.strict=true" in err and "malignant (11).png" in err
    assert not (tmp_path / "run" / "data" / "manifest.parquet").exists()


def test_errors_name_the_path(nasty, tmp_path, capsys):
    rc, _, err = _run(capsys, "--config", "paper", f"data.root={tmp_path / 'missing'}",
                      f"run_dir={tmp_path / 'r'}")
    assert rc == 2 and str(tmp_path / "missing") in err and "does not exist" in err
    empty = tmp_path / "busi"
    shutil.copytree(nasty["a"], empty)
    for p in (empty / "normal").iterdir():
        if p.name.endswith(")_mask.png") or "_mask" not in p.name:
            p.unlink()
    rc, _, err = _run(capsys, "--config", "paper", f"data.root={empty}", f"run_dir={tmp_path / 'r'}")
    assert rc == 2 and str(empty / "normal") in err and "no image files" in err
    rc, _, err = _run(capsys, *_paper_args(nasty, tmp_path / "r", "data.external.split=test"))
    assert rc == 2 and "split folder" in err and "'train', 'val'" in err
    rc, _, err = _run(capsys, *_paper_args(nasty, tmp_path / "r", "data.folds=40"))
    assert rc == 2 and "too few" in err and "data.folds" in err


def test_unusable_run_dir_or_output_path_is_one_line_not_a_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDDAP_TRACEBACK", raising=False)
    a_file = tmp_path / "f"
    a_file.write_text("not a folder")
    rc, _, err = _run(capsys, "--config", "demo", f"run_dir={a_file}")
    assert rc == 2 and "NotADirectoryError" in err and str(a_file) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    rc = main(["phantom", str(a_file / "sub"), "--per-class", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and str(a_file / "sub") in err and "writable" in err
    monkeypatch.setenv("MEDDAP_TRACEBACK", "1")
    with pytest.raises(NotADirectoryError):
        main(["phantom", str(a_file / "sub"), "--per-class", "1"])


def test_all_images_of_a_class_unreadable(tmp_path, capsys, builders):
    b = builders
    root = tmp_path / "A"
    b.busi_tree(root, {"benign": 4, "malignant": 4}, masks=False)
    (root / "normal").mkdir()
    (root / "normal" / "normal (1).png").write_text("x")
    rc, _, err = _run(capsys, "--config", "paper", f"data.root={root}", "data.external.source=null",
                      f"run_dir={tmp_path / 'r'}")
    assert rc == 2 and "no image of class 'normal'" in err and str(root / "normal") in err


def test_manifest_source_with_patients_and_fixed_test(tmp_path, capsys, builders):
    b = builders
    rows = []
    for i in range(30):
        cls = ["benign", "malignant"][i % 2]
        p = b.save(tmp_path / "imgs" / f"{i}.png", b.pattern(700 + i, 32))
        rows.append({"path": f"imgs/{i}.png", "class_name": cls, "patient_id": f"pt{i // 3}",
                     "split": "test" if i >= 24 else "train"})
    rows.append({"path": "imgs/missing.png", "class_name": "benign", "patient_id": "pt99", "split": "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    run_dir = tmp_path / "run"
    rc, out, err = _run(capsys, "--config", "paper", "data.source=manifest", f"data.root={tmp_path / 'm.csv'}",
                        "data.classes=[benign, malignant]", "data.external.source=null", f"run_dir={run_dir}",
                        "data.folds=4")
    assert rc == 0, err
    m = pd.read_parquet(run_dir / "data" / "manifest.parquet")
    assert len(m) == 30 and "file not found" in out
    assert set(m.loc[m["split"] == "test", "path"].map(lambda p: int(Path(p).stem))) == set(range(24, 30))
    assert m.groupby("patient_id")["fold"].nunique().max() == 1
    assert m["group_id"].str.startswith("A:patient:").all()
    audit = pd.read_parquet(run_dir / "data" / "audit.parquet")
    assert (audit["kind"] == "split_conflict").sum() == 0


def test_bad_config_key_and_value_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "meddap", "prepare", "--config", "demo", "data.fodls=3",
                           f"run_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'data.fodls'" in proc.stderr and "data.folds" in proc.stderr
    assert "Traceback" not in proc.stderr
    rc = main(["prepare", "--config", "demo", "data.near_duplicate_bits=99", f"run_dir={tmp_path}"])
    assert rc == 2
    assert not (tmp_path / "data").exists()


def test_manifest_relative_paths_that_do_not_resolve_are_listed_with_the_folder(tmp_path, capsys, builders):
    """Paths written relative to the current directory instead of the manifest's folder: the error
    lists the first few resolved paths with their reason and says what they are relative to."""
    b = builders
    for i in range(4):
        b.save(tmp_path / "data" / "imgs" / f"{i}.png", b.pattern(900 + i, 32))
    manifests = tmp_path / "lists"
    manifests.mkdir()
    rows = [{"path": f"data/imgs/{i}.png", "class_name": ["benign", "malignant"][i % 2]} for i in range(4)]
    pd.DataFrame(rows).to_csv(manifests / "m.csv", index=False)  # relative to tmp_path, not to lists/
    rc, _, err = _run(capsys, "--config", "paper", "data.source=manifest", f"data.root={manifests / 'm.csv'}",
                      "data.classes=[benign, malignant]", "data.external.source=null", f"run_dir={tmp_path / 'r'}")
    assert rc == 2
    assert "no image of class 'benign'" in err and f"manifest {manifests / 'm.csv'}" in err
    assert f"{manifests / 'data' / 'imgs' / '0.png'}: file not found" in err  # resolved path + reason
    assert f"resolved against the manifest's own folder, {manifests}" in err


def test_unknown_class_names_in_a_manifest_are_named_with_counts(tmp_path, capsys, builders):
    """A typo in class_name ('cyst' for a class the config does not have) is named, with its row count."""
    b = builders
    rows = []
    for i in range(28):
        b.save(tmp_path / "imgs" / f"{i}.png", b.pattern(1000 + i, 32))
        cls = ["benign", "malignant"][i % 2] if i < 24 else ("cyst" if i < 27 else "fibroadenoma")
        rows.append({"path": f"imgs/{i}.png", "class_name": cls})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    rc, out, err = _run(capsys, "--config", "paper", "data.source=manifest", f"data.root={tmp_path / 'm.csv'}",
                        "data.classes=[benign, malignant]", "data.external.source=null", "data.folds=3",
                        f"run_dir={tmp_path / 'r'}")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if "not in data.classes" in ln)
    assert "Dataset A: 4 manifest row(s) whose class_name is not in data.classes" in line
    assert "'cyst' (3)" in line and "'fibroadenoma' (1)" in line and "add the classes to data.classes" in line
    audit = pd.read_parquet(tmp_path / "r" / "data" / "audit.parquet")
    assert sorted(audit.loc[audit["kind"] == "unknown_class", "class_name"]) == ["cyst"] * 3 + ["fibroadenoma"]
