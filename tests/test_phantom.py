"""The embedded breast-ultrasound phantom: determinism, BUSI layout, class shapes, the shifted device,
learnability, and the `python -m meddap phantom` command."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddap.data.phantom import (
    PHANTOM_CLASSES, make_phantom_image, phantom_contact_sheet, phantom_file_name, phantom_image_rng,
    write_phantom,
)
from meddap.errors import MeddapError

SIZE = 64  # small images keep the tests fast; the generator scales every length with size


def _images(class_name: str, n: int, seed: int = 0, variant: str = "standard", size: int = SIZE):
    return [make_phantom_image(class_name, phantom_image_rng(seed, variant, class_name, i), size, variant)
            for i in range(1, n + 1)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom") / "A"
    summary = write_phantom(out, per_class=5, size=SIZE, seed=3)
    return out, summary


# --- single images ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["standard", "shifted"])
@pytest.mark.parametrize("class_name", PHANTOM_CLASSES)
def test_image_shapes_types_and_mask_values(class_name, variant):
    image, mask = make_phantom_image(class_name, np.random.default_rng(0), size=SIZE, variant=variant)
    assert image.shape == mask.shape == (SIZE, SIZE)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert image.std() > 10  # speckle and anatomy, not a flat image
    assert (mask.any()) == (class_name != "normal")


def test_same_seed_same_image_and_different_seed_differs():
    a = make_phantom_image("benign", np.random.default_rng(7), size=SIZE)
    b = make_phantom_image("benign", np.random.default_rng(7), size=SIZE)
    c = make_phantom_image("benign", np.random.default_rng(8), size=SIZE)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_per_image_seeds_differ_by_every_part():
    first = phantom_image_rng(0, "standard", "benign", 1).integers(0, 2**62)
    for other in [(1, "standard", "benign", 1), (0, "shifted", "benign", 1), (0, "standard", "malignant", 1),
                  (0, "standard", "benign", 2)]:
        assert phantom_image_rng(*other).integers(0, 2**62) != first
    assert phantom_image_rng(0, "standard", "benign", 1).integers(0, 2**62) == first


@pytest.mark.parametrize("size", [16, 33, 200])
def test_odd_and_extreme_sizes(size):
    for variant in ("standard", "shifted"):
        image, mask = make_phantom_image("malignant", np.random.default_rng(1), size=size, variant=variant)
        assert image.shape == mask.shape == (size, size)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(MeddapError, match=r"'cyst'.*benign, malignant, normal"):
        make_phantom_image("cyst", np.random.default_rng(0))
    with pytest.raises(MeddapError, match="variant"):
        make_phantom_image("benign", np.random.default_rng(0), variant="mri")
    with pytest.raises(MeddapError, match="size"):
        make_phantom_image("benign", np.random.default_rng(0), size=8)


# --- class properties ------------------------------------------------------------------------
def _aspect(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)  # width / height


def test_benign_wider_than_tall_malignant_taller_than_wide_normal_empty():
    benign = [_aspect(m) for _, m in _images("benign", 25)]
    malignant = [_aspect(m) for _, m in _images("malignant", 25)]
    assert np.mean(benign) > 1.2, benign
    assert np.mean(malignant) < 0.9, malignant
    assert all(not m.any() for _, m in _images("normal", 10))


@pytest.mark.parametrize("variant", ["standard", "shifted"])
def test_lesions_are_hypoechoic_and_masks_align(variant):
    """Inside the mask is darker than the tissue around it (a ring a few pixels outside): the lesion
    is hypoechoic and the mask sits on it, also after the fan's scan conversion."""
    from scipy import ndimage
    for class_name in ("benign", "malignant"):
        ratios = []
        for image, mask in _images(class_name, 8, size=128, variant=variant):
            inside = mask > 0
            ring = ndimage.binary_dilation(inside, iterations=6) & ~ndimage.binary_dilation(inside, iterations=2)
            ratios.append(image[inside].mean() / max(image[ring].mean(), 1.0))
        assert np.median(ratios) < 0.6, (class_name, ratios)


def test_posterior_enhancement_for_benign_and_shadowing_for_malignant():
    """Below the lesion vs the same depth beside it: brighter on average for benign, darker for malignant."""
    def below_vs_beside(class_name):
        out = []
        for image, mask in _images(class_name, 20, size=128):
            ys, xs = np.nonzero(mask)
            top, left, right = ys.max() + 4, xs.min(), xs.max() + 1
            if top >= 120:
                continue
            width = right - left
            below = image[top:top + 16, left + width // 4: right - width // 4]
            side_cols = np.r_[max(0, left - 2 * width):max(0, left - width), min(128, right + width):min(128, right + 2 * width)]
            beside = image[top:top + 16][:, side_cols]
            if below.size and beside.size:
                out.append(float(below.mean()) - float(beside.mean()))
        return np.mean(out)
    assert below_vs_beside("benign") > 5
    assert below_vs_beside("malignant") < -5


def test_shifted_variant_is_another_device():
    std = np.stack([im for c in PHANTOM_CLASSES for im, _ in _images(c, 8)])
    sft = np.stack([im for c in PHANTOM_CLASSES for im, _ in _images(c, 8, variant="shifted")])
    # Curvilinear fan: the top corners are black in every shifted image (but for burned-in text),
    # rarely in standard ones.
    def black_corner_share(stack):
        return (stack[:, : SIZE // 8, : SIZE // 8] == 0).mean(axis=(1, 2))   # (N,)
    assert black_corner_share(sft).min() > 0.6
    assert black_corner_share(std).mean() < 0.5
    # Other gain / dynamic range: intensity statistics differ clearly.
    assert abs(float(std.mean()) - float(sft.mean())) > 15
    # Larger speckle: after removing anatomy (a high-pass), neighbouring pixels correlate more.
    def speckle_corr(stack):
        from scipy import ndimage
        stack = stack.astype(float)
        fine = (stack - ndimage.gaussian_filter(stack, (0, 3, 3)))[:, SIZE // 3: 2 * SIZE // 3, SIZE // 3: 2 * SIZE // 3]
        lateral = np.corrcoef(fine[:, :, :-1].ravel(), fine[:, :, 1:].ravel())[0, 1]
        axial = np.corrcoef(fine[:, :-1, :].ravel(), fine[:, 1:, :].ravel())[0, 1]
        return (lateral + axial) / 2
    assert speckle_corr(sft) > speckle_corr(std) + 0.1


def test_text_and_calipers_appear_on_some_images():
    """Burned-in annotations are near-white pixels: some images have them, some don't."""
    saturated = [int((im >= 200).sum()) for c in ("benign", "malignant") for im, _ in _images(c, 20, size=128)]
    assert min(saturated) < max(saturated)
    assert sum(s > 30 for s in saturated) >= 5


# --- learnability ----------------------------------------------------------------------------
def test_class_is_learnable_from_the_image():
    """A random forest on 16x16 thumbnails, trained on one seed's images and tested on another's,
    beats chance (1/3) clearly. Measured: ~0.83 (logistic regression on the same features: ~0.73)."""
    from sklearn.ensemble import RandomForestClassifier

    def features(seed, n):
        x, y = [], []
        for label, c in enumerate(PHANTOM_CLASSES):
            for image, _ in _images(c, n, seed=seed):
                x.append(np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR), np.float32).ravel())
                y.append(label)
        return np.array(x) / 255.0, np.array(y)

    x_train, y_train = features(0, 100)
    x_test, y_test = features(1, 50)
    model = RandomForestClassifier(n_estimators=200, random_state=0, n_jobs=1).fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test).mean())
    print(f"phantom learnability: random forest on 16x16 thumbnails, held-out accuracy {accuracy:.3f}")
    assert accuracy > 0.6


# --- the BUSI layout on disk -----------------------------------------------------------------
def test_layout_names_masks_and_rgb(written):
    out, summary = written
    assert summary == {"benign": 5, "malignant": 5, "normal": 5, "out_dir": str(out)}
    for c in PHANTOM_CLASSES:
        names = sorted(p.name for p in (out / c).iterdir())
        expected = sorted([phantom_file_name(c, i) for i in range(1, 6)] + [phantom_file_name(c, i, True) for i in range(1, 6)])
        assert names == expected
        for i in range(1, 6):
            img = Image.open(out / c / f"{c} ({i}).png")
            msk = Image.open(out / c / f"{c} ({i})_mask.png")
            assert img.mode == msk.mode == "RGB" and img.size == msk.size == (SIZE, SIZE)
            arr = np.asarray(img)
            assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
            assert set(np.unique(np.asarray(msk))) <= {0, 255}
    plan = json.loads((out / "phantom.json").read_text())
    assert plan["seed"] == 3 and plan["variant"] == "standard" and plan["size"] == SIZE


def test_files_are_the_in_process_images(written):
    """An image on disk equals make_phantom_image with its own seed: any image can be remade alone."""
    out, _ = written
    image, mask = make_phantom_image("malignant", phantom_image_rng(3, "standard", "malignant", 4), SIZE)
    assert np.array_equal(np.asarray(Image.open(out / "malignant" / "malignant (4).png"))[..., 0], image)
    assert np.array_equal(np.asarray(Image.open(out / "malignant" / "malignant (4)_mask.png"))[..., 0], mask)


def test_deterministic_bytes_and_seed_matters(tmp_path, written):
    out, _ = written
    again = tmp_path / "again"
    write_phantom(again, per_class=5, size=SIZE, seed=3)
    assert _tree_digest(again) == _tree_digest(out)
    other = tmp_path / "other"
    write_phantom(other, per_class=5, size=SIZE, seed=4)
    assert _tree_digest(other).keys() == _tree_digest(out).keys()
    assert _tree_digest(other) != _tree_digest(out)


def test_rerun_skips_resumes_grows_and_shrinks(tmp_path, capsys):
    out = tmp_path / "p"
    write_phantom(out, per_class=3, size=SIZE, seed=0, classes=("benign", "malignant"))
    first = _tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    capsys.readouterr()
    write_phantom(out, per_class=3, size=SIZE, seed=0, classes=("benign", "malignant"))
    assert "wrote 0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes      # nothing rewritten
    # A crash half-way: one image lost; the rerun makes exactly it, identical.
    (out / "benign" / "benign (2).png").unlink()
    write_phantom(out, per_class=3, size=SIZE, seed=0, classes=("benign", "malignant"))
    assert "wrote 1" in capsys.readouterr().out
    assert _tree_digest(out) == first
    # More per class adds, fewer removes the surplus; no temp files are left behind.
    write_phantom(out, per_class=4, size=SIZE, seed=0, classes=("benign", "malignant"))
    assert len(list((out / "benign").glob("*.png"))) == 8
    write_phantom(out, per_class=2, size=SIZE, seed=0, classes=("benign",))
    assert len(list((out / "benign").glob("*.png"))) == 4
    assert not list((out / "malignant").glob("*.png"))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # Another seed remakes the files in place.
    write_phantom(out, per_class=2, size=SIZE, seed=9, classes=("benign",))
    assert _tree_digest(out)["benign/benign (1).png"] != first["benign/benign (1).png"]


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    real = tmp_path / "BUSI" / "benign"
    real.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(real / "benign (1).png")
    with pytest.raises(MeddapError, match="did not write"):
        write_phantom(tmp_path / "BUSI", per_class=2, size=SIZE)
    with pytest.raises(MeddapError, match="'cyst'"):
        write_phantom(tmp_path / "x", per_class=2, size=SIZE, classes=("benign", "cyst"))


def test_contact_sheet(tmp_path):
    path = phantom_contact_sheet(tmp_path / "sheet.png", variant="shifted", per_class=2, size=SIZE)
    sheet = Image.open(path)
    assert sheet.size[1] == 3 * (SIZE + 2) and sheet.size[0] > 2 * SIZE


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "B"
    done = subprocess.run([sys.executable, "-m", "meddap", "phantom", str(out), "--per-class", "2",
                           "--variant", "shifted", "--size", "48", "--seed", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 6" in done.stdout
    assert sorted(p.name for p in (out / "normal").iterdir()) == [
        "normal (1).png", "normal (1)_mask.png", "normal (2).png", "normal (2)_mask.png"]
    image, _ = make_phantom_image("benign", phantom_image_rng(5, "shifted", "benign", 2), 48, "shifted")
    assert np.array_equal(np.asarray(Image.open(out / "benign" / "benign (2).png"))[..., 0], image)
