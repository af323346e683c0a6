"""Canonical decoding: every pixel format -> (H, W) uint8; clear errors; hashes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from meddap.data.decode import (ImageDecodeError, hamming, hamming_matrix, phash, phash_pair, pixel_sha256,
                                read_grey, thumbnail, thumbnail_correlation)
from meddap.errors import MeddapError


@pytest.fixture
def grey(builders):
    return builders.pattern(7, 40)[:, :36]  # (40, 36): not square, so H/W mix-ups show


def test_grey_and_rgb_stored_grey_decode_identically(tmp_path, builders, grey):
    a = read_grey(str(builders.save(tmp_path / "g.png", grey)))
    b = read_grey(str(builders.save_rgb(tmp_path / "rgb.png", grey)))
    assert a.dtype == np.uint8 and a.shape == (40, 36)
    np.testing.assert_array_equal(a, grey)
    np.testing.assert_array_equal(b, grey)
    assert pixel_sha256(a) == pixel_sha256(b)


def test_rgb_uses_luma_weights(tmp_path, builders):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # pure red 200 -> 0.299 * 200 = 59.8 -> 60
    out = read_grey(str(builders.save(tmp_path / "red.png", rgb)))
    assert (out == 60).all()


def test_rgba_composited_over_black(tmp_path, builders):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, :3, 3] = 0        # transparent half -> black
    rgba[:, 3:4, 3] = 128     # half transparent -> 200 * 128 / 255 = 100.4 -> 100
    out = read_grey(str(builders.save(tmp_path / "a.png", rgba)))
    assert out.shape == (4, 6)
    assert (out[:, :3] == 0).all() and (out[:, 3] == 100).all() and (out[:, 4:] == 200).all()


def test_grey_alpha_composited_over_black(tmp_path, builders):
    la = np.zeros((3, 3, 2), np.uint8)
    la[..., 0], la[..., 1] = 100, 51  # 100 * 51 / 255 = 20
    out = read_grey(str(builders.save(tmp_path / "la.png", la, mode="LA")))
    assert (out == 20).all()


def test_palette_and_palette_with_transparency(tmp_path, grey):
    p = Image.fromarray(np.stack([grey] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p.save(tmp_path / "p.png")
    expected = np.asarray(p.convert("L"))
    np.testing.assert_array_equal(read_grey(str(tmp_path / "p.png")), expected)
    # index 0 transparent -> those pixels composite to black
    idx = np.asarray(p)
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    out = read_grey(str(tmp_path / "pt.png"))
    assert (out[idx == 0] == 0).all()
    assert (out[idx != 0] == expected[idx != 0]).all()


def test_16bit_scaled_by_full_range_not_image_range(tmp_path):
    arr = np.array([[0, 257, 32896], [65535, 1000, 2000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    out = read_grey(str(tmp_path / "d.png"))
    np.testing.assert_array_equal(out, np.rint(arr / 65535 * 255).astype(np.uint8))
    # a dark 16-bit image stays dark: no per-image stretching
    dark = np.full((5, 5), 1000, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert (read_grey(str(tmp_path / "dark.png")) == 4).all()


def test_one_bit_and_jpeg(tmp_path, grey):
    Image.fromarray(grey > 128).save(tmp_path / "b.png")
    out = read_grey(str(tmp_path / "b.png"))
    assert set(np.unique(out)) <= {0, 255} and out.shape == grey.shape
    Image.fromarray(grey).save(tmp_path / "j.jpg", quality=95)
    j = read_grey(str(tmp_path / "j.jpg"))
    assert j.shape == grey.shape and np.abs(j.astype(int) - grey).mean() < 4


def test_resize_gives_square_uint8(tmp_path, builders, grey):
    out = read_grey(str(builders.save(tmp_path / "g.png", grey)), size=16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    # antialiased: the mean brightness survives a 2.5x reduction
    assert abs(float(out.mean()) - float(grey.mean())) < 3


@pytest.mark.parametrize("case, content, reason", [
    ("text.png", b"this is not an image\n", "not an image"),
    ("empty.png", b"", "not an image"),
])
def test_non_images_raise_with_path_and_reason(tmp_path, case, content, reason):
    p = tmp_path / case
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError) as e:
        read_grey(str(p))
    assert isinstance(e.value, MeddapError)
    assert e.value.path == str(p) and reason in e.value.reason
    assert str(p) in str(e.value)


def test_truncated_and_missing_files(tmp_path, builders):
    p = builders.truncated_png(tmp_path / "cut.png")
    with pytest.raises(ImageDecodeError) as e:
        read_grey(str(p))
    assert "truncated" in e.value.reason or "corrupt" in e.value.reason
    with pytest.raises(ImageDecodeError, match="file not found"):
        read_grey(str(tmp_path / "nope.png"))
    with pytest.raises(ImageDecodeError, match="directory"):
        read_grey(str(tmp_path))


def test_unsupported_float_mode(tmp_path):
    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageDecodeError, match="unsupported pixel mode"):
        read_grey(str(tmp_path / "f.tif"))


def test_error_pickles_with_fields():
    e = pickle.loads(pickle.dumps(ImageDecodeError("/x.png", "bad")))
    assert (e.path, e.reason) == ("/x.png", "bad")


def test_pixel_sha256_depends_on_pixels_and_shape():
    a = np.zeros((10, 20), np.uint8)
    assert pixel_sha256(a) == pixel_sha256(a.copy())
    assert pixel_sha256(a) != pixel_sha256(a.reshape(20, 10))
    b = a.copy()
    b[3, 4] = 1
    assert pixel_sha256(a) != pixel_sha256(b)


def test_phash_robust_to_noise_and_rescale_but_separates_images(builders):
    a = builders.pattern(1, 64)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-5, 6, a.shape), 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(a).resize((48, 48), Image.Resampling.BILINEAR))
    assert hamming(phash(a), phash(noisy)) <= 4
    assert hamming(phash(a), phash(small)) <= 4
    others = [phash(builders.pattern(s, 64)) for s in range(2, 30)]
    assert min(hamming(phash(a), o) for o in others) > 8
    assert 0 <= phash(a) < 2 ** 64


def test_phash_pair_mirror_equals_hash_of_mirrored_image(builders):
    a = builders.pattern(3, 50)
    h, m = phash_pair(a)
    assert h == phash(a)
    assert m == phash(a[:, ::-1].copy())
    assert hamming(h, m) > 8  # the pattern is not symmetric, so mirroring changes the hash


def test_hamming_matrix_matches_scalar():
    vals = [0, 1, 2 ** 64 - 1, 0xF0F0_F0F0_F0F0_F0F0]
    mat = hamming_matrix(np.array(vals, dtype=np.uint64), np.array(vals, dtype=np.uint64))
    for i, x in enumerate(vals):
        for j, y in enumerate(vals):
            assert mat[i, j] == hamming(x, y)
    assert mat[0, 2] == 64


def test_thumbnail_and_correlation(builders):
    a = builders.pattern(11, 64)
    t = thumbnail(a)
    assert t.shape == (32, 32) and t.dtype == np.uint8
    assert thumbnail_correlation(t, t) == pytest.approx(1.0)
    assert thumbnail_correlation(t, t[:, ::-1].copy()) == pytest.approx(1.0)   # mirrored copies match
    assert thumbnail_correlation(t, 255 - t) < 0.5                             # an inverted image does not
    assert thumbnail_correlation(t, thumbnail(builders.pattern(12, 64))) < 0.9
    flat = np.full((32, 32), 7, np.uint8)
    assert thumbnail_correlation(flat, flat) == 1.0 and thumbnail_correlation(flat, t) == 0.0
