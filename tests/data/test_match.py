"""Dataset B copies of Dataset A images, found whatever their orientation (meddap.data.match), and the
prepare stage's a_overlap column and audit rows, on phantom scans (unrelated scans share one layout)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from meddap.data.decode import thumbnail
from meddap.data.match import find_aligned_copies, transform_label
from meddap.data.phantom import make_phantom_image, phantom_image_rng

SIZE = 160


def _phantom(i: int, cls: str = "benign", variant: str = "standard") -> np.ndarray:
    return make_phantom_image(cls, phantom_image_rng(0, variant, cls, i), SIZE, variant)[0]


# How Kaggle-like sets derive a copy: every edit a copy may carry, alone or chained.
EDITS = {
    "rotated 90": lambda p: p.rotate(90, expand=True),
    "rotated 180": lambda p: p.rotate(180),
    "rotated 270, mirrored": lambda p: p.rotate(270, expand=True).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "mirrored": lambda p: p.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "small angle": lambda p: p.rotate(7, resample=Image.Resampling.BILINEAR),
    "small angle, canvas grown": lambda p: p.rotate(-12, resample=Image.Resampling.BILINEAR, expand=True),
    "small angle, sharpened": lambda p: p.rotate(3, resample=Image.Resampling.BILINEAR).filter(ImageFilter.SHARPEN),
    "sharpened twice": lambda p: p.filter(ImageFilter.SHARPEN).filter(ImageFilter.SHARPEN),
    "rescaled, other aspect": lambda p: p.resize((120, 97), Image.Resampling.BICUBIC),
    "rotated 90, sharpened, rescaled": lambda p: p.rotate(90, expand=True).filter(ImageFilter.SHARPEN).resize((300, 300)),
}


@pytest.fixture(scope="module")
def sources():
    return [_phantom(i, cls) for cls in ("benign", "malignant", "normal") for i in range(1, 15)]


def test_rotated_mirrored_sharpened_rescaled_copies_found_unrelated_not(sources):
    thumbs = [thumbnail(s) for s in sources]
    picks = [0, 17, 33]
    copies, truth = [], []
    for name, edit in EDITS.items():
        for j in picks:
            copies.append(thumbnail(np.asarray(edit(Image.fromarray(sources[j])))))
            truth.append((name, j))
    # unrelated scans: the same device (other seeds) and another device
    unrelated = [thumbnail(_phantom(i)) for i in range(100, 115)] + \
                [thumbnail(_phantom(i, "malignant", "shifted")) for i in range(1, 11)]
    matches = find_aligned_copies(copies + unrelated, thumbs, min_correlation=0.9)
    found = {}
    for m in matches:
        found.setdefault(m.i, []).append(m)
    for i, (name, j) in enumerate(truth):
        assert [m.j for m in found.get(i, [])] == [j], (name, j, found.get(i))
        assert found[i][0].correlation >= 0.93, name
    assert not any(i >= len(copies) for i in found), "an unrelated scan was paired"
    by_edit = {name: found[i][0] for i, (name, _) in enumerate(truth)}
    assert transform_label(by_edit["rotated 180"]) == "rotated 180"
    assert by_edit["mirrored"].dihedral == 4 and by_edit["sharpened twice"].dihedral == 0
    assert abs(abs(by_edit["small angle"].angle) - 7) <= 1


def test_no_inputs_no_matches():
    assert find_aligned_copies([], [np.zeros((32, 32))], 0.9) == []


def _kaggle_copy(src: np.ndarray, edit: str, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(src)
    Image.merge("RGB", [EDITS[edit](grey)] * 3).save(path)


def test_prepare_flags_b_copies_and_their_b_group(tmp_path, capsys):
    """A BUSI-like phantom Dataset A; a Kaggle-like Dataset B holding rotated/sharpened copies of A images
    under Kaggle's own numbering, a sibling of one copy (same B stem) and unrelated scans."""
    from meddap.cli import main
    from meddap.data.phantom import write_phantom

    a_root, b_root = tmp_path / "A", tmp_path / "B" / "val"
    write_phantom(str(a_root), per_class=8, size=SIZE, seed=0, classes=("benign", "malignant", "normal"))
    a_img = lambda cls, i: np.asarray(Image.open(a_root / cls / f"{cls} ({i}).png").convert("L"))  # noqa: E731
    _kaggle_copy(a_img("benign", 2), "rotated 90, sharpened, rescaled", b_root / "benign" / "benign (40)-rotated1-sharpened.png")
    _kaggle_copy(a_img("malignant", 5), "small angle, sharpened", b_root / "malignant" / "malignant (7)-rotated2.png")
    # the same B source image as the first copy, edited beyond what the matcher searches (45 degrees)
    Image.fromarray(a_img("benign", 2)).rotate(45).save(b_root / "benign" / "benign (40)-rotated2.png")
    for i in range(1, 5):
        for cls in ("benign", "malignant"):
            Image.fromarray(_phantom(200 + i, cls)).save(b_root / cls / f"{cls} ({i}).png")
    rc = main(["prepare", "--config", "demo", f"run_dir={tmp_path / 'run'}", "data.source=busi", f"data.root={a_root}",
               "data.external.source=imagefolder", f"data.external.root={b_root.parent}"])
    out = capsys.readouterr().out
    assert rc == 0
    m = pd.read_parquet(tmp_path / "run" / "data" / "manifest.parquet")
    audit = pd.read_parquet(tmp_path / "run" / "data" / "audit.parquet")
    b = m[m["dataset"] == "B"].set_index(m.loc[m["dataset"] == "B", "path"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert set(b.index[b["a_overlap"]]) == {"benign (40)-rotated1-sharpened.png", "malignant (7)-rotated2.png",
                                            "benign (40)-rotated2.png"}
    assert m["a_overlap"].dtype == bool and not m.loc[m["dataset"] == "A", "a_overlap"].any()
    pairs = audit[audit["kind"] == "ab_overlap"]
    got = {(p.rsplit("/", 1)[-1], o.rsplit("/", 1)[-1]) for p, o in zip(pairs["path"], pairs["other_path"])}
    assert got == {("benign (40)-rotated1-sharpened.png", "benign (2).png"), ("malignant (7)-rotated2.png", "malignant (5).png")}
    assert pairs["reason"].str.contains("aligned copy with a Dataset A image").all()
    via = audit[audit["kind"] == "ab_overlap_group"]
    assert len(via) == 1 and via["path"].iloc[0].endswith("benign (40)-rotated2.png")
    assert "benign (40)-rotated1-sharpened.png" in via["reason"].iloc[0]
    assert "3 B images flagged a_overlap" in out and "exclude_overlap=true" in out
