"""Canonical image decoding, pixel hashes and a perceptual hash.

Every stage sees an image the same way: `read_grey(path)` returns an (H, W) uint8 greyscale array.

  grey (L, 1-bit)           -> as stored (1-bit becomes 0/255)
  RGB, CMYK, YCbCr          -> ITU-R 601-2 luma: round(0.299 R + 0.587 G + 0.114 B)
  RGBA, LA, palette + alpha -> composited over black first (colour * alpha / 255), then luma
  palette (P)               -> expanded to RGB (or RGBA when it has transparency), then as above
  16-bit grey (I;16*, I)    -> round(v * 255 / 65535): the full 16-bit range, never the image's own
                               min/max, so one bit depth always maps to the same 8-bit values
  EXIF orientation          -> applied (the image as a viewer shows it)
  multi-frame files         -> the first frame

With `size`, the grey image is resized to (size, size) with Pillow's antialiased bilinear filter.
Unreadable, truncated and non-image files raise `ImageDecodeError(path, reason)`.

`read_rgb(path)` is the colour twin, for classifiers and FID fed in colour (classify.channels=rgb):
(H, W, 3) uint8 by the same rules, except that colour stays colour (alpha still composited over black)
and grey modes are replicated to three equal channels; so a grey-content image gives three copies of
exactly what `read_grey` gives.
"""

from __future__ import annotations

import hashlib
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from meddap.errors import MeddapError

__all__ = [
    "ImageDecodeError",
    "read_grey",
    "read_rgb",
    "to_grey",
    "to_rgb",
    "read_image",
    "pixel_sha256",
    "phash",
    "phash_pair",
    "hamming",
    "hamming_matrix",
    "thumbnail",
    "thumbnail_correlation",
    "PHASH_BITS",
]

PHASH_BITS = 64
_PHASH_SIDE = 8          # 8 x 8 low-frequency DCT coefficients -> 64 bits
_PHASH_THUMB = 32        # DCT taken on a 32 x 32 thumbnail (the classic pHash recipe)
_UINT16_MAX = 65535
# ITU-R 601-2 luma weights, the same Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114])


class _UnsupportedMode(ValueError):
    """A pixel mode with no canonical grey form (e.g. 32-bit float)."""


class ImageDecodeError(MeddapError):
    """A file that cannot be decoded as an image; `path` and `reason` say which and why."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across pickling (thread/process pools, Ray)
        return (type(self), (self.path, self.reason))


def _composite_over_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, C) colour and (H, W) alpha, both uint8 -> (H, W, C) float composited over black."""
    return rgb.astype(np.float64) * (alpha.astype(np.float64)[..., None] / 255.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float or uint8 -> (H, W) uint8."""
    grey = rgb.astype(np.float64) @ _LUMA
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def to_grey(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image in any supported mode -> (H, W) uint8, as the module docstring says."""
    mode = img.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode == "1":
        return np.array(img.convert("L"), dtype=np.uint8)
    if mode in ("LA", "La"):
        if mode == "La":  # premultiplied: already composited over black
            return np.array(img.getchannel("L"), dtype=np.uint8)
        arr = np.array(img, dtype=np.uint8)  # (H, W, 2)
        out = _composite_over_black(arr[..., :1], arr[..., 1])[..., 0]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "RGBa"):
        arr = np.array(img.convert("RGBA"), dtype=np.uint8)  # (H, W, 4)
        return _luma(_composite_over_black(arr[..., :3], arr[..., 3]))
    if mode.startswith("I;16") or mode == "I":
        arr = np.array(img).astype(np.int64)
        arr = np.clip(arr, 0, _UINT16_MAX)
        return np.rint(arr * (255.0 / _UINT16_MAX)).astype(np.uint8)
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return _luma(np.array(img.convert("RGB"), dtype=np.uint8))
    raise _UnsupportedMode(f"unsupported pixel mode {mode!r} (supported: grey, RGB, RGBA, palette, 16-bit grey)")


def to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> (H, W, 3) uint8: grey modes replicated, alpha composited over black."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "RGBa"):
        arr = np.array(img.convert("RGBA"), dtype=np.uint8)  # (H, W, 4)
        return np.clip(np.rint(_composite_over_black(arr[..., :3], arr[..., 3])), 0, 255).astype(np.uint8)
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.array(img.convert("RGB"), dtype=np.uint8)
    grey = to_grey(img)                                      # (H, W): every grey mode by read_grey's rules
    return np.repeat(grey[..., None], 3, axis=2)


def read_grey(path: str, size: int | None = None) -> np.ndarray:
    """Decode `path` into the canonical (H, W) uint8 grey form; (size, size) when `size` is given."""
    return _read(path, size, to_grey)  # (H, W) uint8


def read_rgb(path: str, size: int | None = None) -> np.ndarray:
    """Decode `path` into (H, W, 3) uint8 colour; (size, size, 3) when `size` is given."""
    return _read(path, size, to_rgb)   # (H, W, 3) uint8


def read_image(path: str, size: int | None = None, channels: str = "grey") -> np.ndarray:
    """`read_grey` for channels 'grey', `read_rgb` for 'rgb' (classify.channels)."""
    if channels not in ("grey", "rgb"):
        raise ValueError(f"channels {channels!r}: expected 'grey' or 'rgb'")
    return read_rgb(path, size) if channels == "rgb" else read_grey(path, size)


def _read(path: str, size: int | None, convert) -> np.ndarray:
    path = str(path)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* is not an error for a medical image; the hard limit
            # (DecompressionBombError) still raises below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # forces a full decode: truncated files fail here, not later
                img = ImageOps.exif_transpose(img)
                grey = convert(img)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except _UnsupportedMode as e:
        raise ImageDecodeError(path, str(e)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image file (format not recognised)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            reason = f"truncated or incomplete file ({reason})"
        raise ImageDecodeError(path, f"corrupt image data: {reason}") from None
    if grey.size == 0:
        raise ImageDecodeError(path, "image has no pixels")
    if size is not None:
        grey = np.array(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return grey  # (H, W) or (H, W, 3) uint8


def pixel_sha256(arr: np.ndarray) -> str:
    """sha256 (hex) of decoded pixels; the shape and dtype are part of the hash, so a 10x20 and a 20x10
    image with the same bytes differ."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}:{'x'.join(map(str, arr.shape))}:".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (32, 32) uint8 antialiased thumbnail: what the perceptual hash is taken of, and
    what near-duplicate candidates are compared on."""
    thumb = Image.fromarray(np.asarray(grey, dtype=np.uint8)).resize(
        (_PHASH_THUMB, _PHASH_THUMB), Image.Resampling.BILINEAR)
    return np.asarray(thumb, dtype=np.uint8)


def thumbnail_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two thumbnails, the better of b as is and b mirrored left-right.
    Flat (constant) thumbnails correlate 1.0 with each other if equal, else 0.0."""
    x = a.astype(np.float64).ravel() - a.mean()
    best = -1.0
    for y_img in (b, b[:, ::-1]):
        y = y_img.astype(np.float64).ravel() - y_img.mean()
        den = float(np.sqrt((x @ x) * (y @ y)))
        r = float(x @ y) / den if den > 0 else (1.0 if np.array_equal(a, y_img) else 0.0)
        best = max(best, r)
    return best


def _low_dct(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (8, 8) lowest-frequency orthonormal DCT-II coefficients of the 32 x 32 thumbnail."""
    from scipy.fft import dctn  # here, not at the top: image decoding (and `bench gpu`) runs without scipy

    coeffs = dctn(thumbnail(grey).astype(np.float64), type=2, norm="ortho")  # (32, 32)
    return coeffs[:_PHASH_SIDE, :_PHASH_SIDE]


def _bits(low: np.ndarray) -> int:
    """64 bits: coefficient > median of the 63 AC coefficients (the DC term only says brightness)."""
    flat = low.reshape(-1)
    med = np.median(flat[1:])
    value = 0
    for bit in flat > med:
        value = (value << 1) | int(bit)
    return value


def phash(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an (H, W) uint8 image, as a Python int in [0, 2**64)."""
    return _bits(_low_dct(grey))


def phash_pair(grey: np.ndarray) -> tuple[int, int]:
    """(hash, hash of the left-right mirrored image), from one DCT: mirroring a signal of length N
    multiplies its DCT-II coefficient k by (-1)**k, so the mirror's hash costs nothing extra."""
    low = _low_dct(grey)  # (8, 8), rows = vertical frequency, columns = horizontal frequency
    signs = np.where(np.arange(_PHASH_SIDE) % 2 == 0, 1.0, -1.0)[None, :]
    return _bits(low), _bits(low * signs)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) and (m,) uint64 hashes -> (n, m) int bit distances."""
    a = np.asarray(a, dtype=np.uint64)[:, None]
    b = np.asarray(b, dtype=np.uint64)[None, :]
    return np.bitwise_count(a ^ b).astype(np.int64)
