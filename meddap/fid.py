"""Frechet distance and friends: FID, KID and a memorisation check on image features.

Everything here is plain numpy / PyTorch and knows nothing of Ray or the run directory:
  - `frechet_distance(mu1, sigma1, mu2, sigma2)`: the distance between two Gaussians, computed as
    pytorch-fid does (scipy's sqrtm, with an eps offset on the diagonals when the product is singular);
  - `kernel_inception_distance(real, synth, subset_size, n_subsets)`: KID, the unbiased MMD^2 with the
    cubic polynomial kernel, averaged over random subsets (better behaved than FID on a few hundred images);
  - `memorization(synth, real, threshold)`: each synthetic image's nearest real image, flagged as a near
    copy when closer than `threshold` x the median real-real nearest-neighbour distance;
  - `source_distance(synth, sources)`: each img2img image's distance to its own source image (row by row);
  - `load_inception(dims, weights, device)`: pytorch-fid's InceptionV3 as a (B, 3, H, W) -> (B, dims)
    extractor, from `fid.weights` or torch hub's cache, never downloaded behind the user's back when
    absent: `MissingWeightsError` says what is missing and where to put it;
  - `extract_features(paths, extractor, ...)`: any such extractor over image files (tests use a small one);
  - `build_feature_extractor(cfg_fid, device, base_model)`: the extractor `fid.features` names, as a
    `FeatureExtractor` (name, dims, input size, module): `inception` (pytorch-fid, the paper's), the
    domain encoder `phantom-judge` (the reference phantom classifier beside the base model, in
    `<folder>/judge/` as `pretrain-base` writes it: its penultimate layer), or a TorchScript encoder
    file given by path. FIDs from different extractors are different quantities: every row names its
    extractor and dims.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from meddap.errors import MeddapError

__all__ = [
    "FEATURE_EXTRACTORS",
    "check_features_source",
    "FeatureExtractor",
    "build_feature_extractor",
    "check_features_name",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_INPUT_SIZE",
    "MissingWeightsError",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "kernel_inception_distance",
    "memorization",
    "source_distance",
    "InceptionFeatures",
    "inception_weights_path",
    "load_inception",
    "extract_features",
    "primary_dims",
]

# pytorch-fid's port of the TensorFlow FID Inception (the file name torch hub caches it under).
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# Inception's native input side; pytorch-fid's InceptionV3 resizes every input to it (bilinear). The fid
# stage reads real and synthetic images at the generation resolution first (one Pillow filter for both).
INCEPTION_INPUT_SIZE = 299


class MissingWeightsError(MeddapError):
    """pytorch-fid's Inception weights are not on this machine (and are not downloaded implicitly)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)

    @property
    def status(self) -> str:
        """The `status` value the fid stage records for rows it could not compute."""
        return f"missing_weights: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Distances on features
# ---------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, float64 (N - 1 in the denominator)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0 against round-off)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between N(mu1, S1) and N(mu2, S2).

    method "sqrtm" is pytorch-fid's computation: scipy's sqrtm of S1 S2; with fewer images than feature
    dimensions the covariances are singular and that square root is unstable, so then `eps` is added to
    both diagonals first. method "eigh" uses Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD
    matrix whose eigenvalues are cheap and stable: the same value (to round-off) several times faster at
    2048 dims, where sqrtm's Schur decomposition dominates the stage's time on a CPU.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        root = _psd_sqrt(sigma1)
        middle = root @ sigma2 @ root
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    if method != "sqrtm":
        raise ValueError(f"frechet_distance method {method!r}: expected 'sqrtm' or 'eigh'")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm: "
                             "covariance statistics are not valid")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(real: np.ndarray, synth: np.ndarray, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """FID between two (N, D) feature sets."""
    mu1, s1 = feature_statistics(real)
    mu2, s2 = feature_statistics(synth)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps, method=method)


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3 (the KID kernel) between (m, D) sets."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    # Diagonals (a sample with itself) are left out: that is what makes the estimate unbiased.
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(real: np.ndarray, synth: np.ndarray, subset_size: int, n_subsets: int,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over `n_subsets` random subsets of min(subset_size, N_real, N_synth) images."""
    x, y = np.asarray(real, np.float64), np.asarray(synth, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {x.shape[0]} real and {y.shape[0]} synthetic")
    rng = np.random.default_rng(seed)
    vals = np.array([
        _polynomial_mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)],
                                  y[rng.choice(y.shape[0], m, replace=False)])
        for _ in range(n_subsets)
    ])
    return float(vals.mean()), float(vals.std(ddof=1)) if n_subsets > 1 else float("nan")


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) Euclidean distances, clipped at 0 against round-off."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def memorization(synth: np.ndarray, real: np.ndarray, threshold: float) -> dict[str, np.ndarray | float]:
    """Nearest real neighbour of each synthetic feature vector and a near-copy flag.

    Returns `nearest` (Ns,) indices into `real`, `distance` (Ns,), `reference` (the median real-real
    nearest-neighbour distance, each real image's own zero distance left out), `threshold_distance`
    (= threshold x reference) and `flagged` (Ns,) bool: distance < threshold_distance.
    """
    s, r = np.asarray(synth, np.float64), np.asarray(real, np.float64)
    if r.shape[0] < 2:
        raise ValueError(f"memorisation check needs at least 2 real images, got {r.shape[0]}")
    d_sr = _pairwise_distances(s, r)                       # (Ns, Nr)
    nearest = d_sr.argmin(axis=1) if s.shape[0] else np.zeros(0, dtype=np.int64)
    distance = d_sr[np.arange(s.shape[0]), nearest] if s.shape[0] else np.zeros(0)
    d_rr = _pairwise_distances(r, r)
    np.fill_diagonal(d_rr, np.inf)
    reference = float(np.median(d_rr.min(axis=1)))
    limit = threshold * reference
    return {"nearest": nearest, "distance": distance, "reference": reference,
            "threshold_distance": limit, "flagged": distance < limit}


def source_distance(synth: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance between row i of `synth` and row i of `sources`: an img2img image and the
    real image it started from. Compared with `memorization`'s threshold_distance, it says whether an
    image is a near copy of its own source, which the nearest-real check alone can miss when another
    real image happens to be closer."""
    s, r = np.asarray(synth, np.float64), np.asarray(sources, np.float64)
    if s.shape != r.shape:
        raise ValueError(f"source_distance needs one source per synthetic image: shapes {s.shape} vs {r.shape}")
    return np.sqrt(((s - r) ** 2).sum(axis=1)) if s.size else np.zeros(s.shape[0])


# ---------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------
class InceptionFeatures(nn.Module):
    """pytorch-fid's InceptionV3 block output as (B, dims) vectors; inputs (B, 3, H, W) in [0, 1]."""

    def __init__(self, inception: nn.Module, dims: int):
        super().__init__()
        self.inception = inception
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inception(x)[0]                           # (B, dims, h, w); h = w = 1 for 2048
        if out.shape[2:] != (1, 1):
            # The 64/192/768 blocks are spatial maps: pytorch-fid averages them to one vector each.
            out = F.adaptive_avg_pool2d(out, output_size=(1, 1))
        return out.flatten(1)                                # (B, dims)


def inception_weights_path(weights: str | None) -> str:
    """Local path of the Inception weights: `fid.weights` when set, else torch hub's cache entry.

    Raises MissingWeightsError (never downloads) when the file is not there.
    """
    hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    where = (f"put {INCEPTION_WEIGHTS_FILE} (from pytorch-fid's release 'fid_weights') in {hub_dir} "
             f"($TORCH_HOME/hub/checkpoints) or set fid.weights=/path/to/{INCEPTION_WEIGHTS_FILE}")
    if weights:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise MissingWeightsError(f"fid.weights={weights} does not exist; {where}")
        return path
    path = os.path.join(hub_dir, INCEPTION_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise MissingWeightsError(f"pytorch-fid Inception weights not found at {path} (no download "
                                  f"attempted: this machine may be offline); {where}")
    return path


@contextmanager
def _weights_from_state(state: dict):
    """Make pytorch-fid's loader return `state` instead of downloading (it has no path argument)."""
    import pytorch_fid.inception as pfi

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        yield
    finally:
        pfi.load_state_dict_from_url = original


def load_inception(dims: int, weights: str | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """pytorch-fid's FID InceptionV3 returning `dims`-d features, in eval mode on `device`."""
    from pytorch_fid.inception import InceptionV3

    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise MeddapError(f"fid.dims={dims} is not one of pytorch-fid's blocks "
                          f"{sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}")
    path = inception_weights_path(weights)
    bad = f"{path} could not be loaded as pytorch-fid's Inception weights"
    try:  # read the file before building the network, so a bad file fails fast
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated or foreign
        raise MissingWeightsError(f"{bad} ({type(e).__name__}: {str(e)[:200]}); replace it with "
                                  f"{INCEPTION_WEIGHTS_FILE}") from None
    first_and_last = {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight"}
    if not isinstance(state, dict) or not first_and_last <= set(state):
        raise MissingWeightsError(f"{bad} (it is not a state dict of pytorch-fid's FID Inception); replace it with "
                                  f"{INCEPTION_WEIGHTS_FILE}")
    try:
        with _weights_from_state(state):
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except (RuntimeError, KeyError, TypeError) as e:  # a checkpoint of another network
        raise MissingWeightsError(f"{bad} ({type(e).__name__}: {str(e)[:200]}); replace it with "
                                  f"{INCEPTION_WEIGHTS_FILE}") from None
    return InceptionFeatures(net, dims).eval().to(device)


def _default_reader(path: str, size: int) -> np.ndarray:
    from meddap.data.decode import read_grey

    return read_grey(path, size)


@torch.no_grad()
def extract_features(paths: Sequence[str], extractor: nn.Module, batch_size: int, image_size: int,
                     device: str | torch.device = "cpu",
                     reader: Callable[[str, int], np.ndarray] | None = None,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D) float64 features of image files, read at `image_size` as the canonical grey (H, W) uint8
    (replicated to 3 channels) or, from a colour reader, (H, W, 3) uint8; in [0, 1] (what pytorch-fid's
    Inception expects)."""
    read = reader or _default_reader
    extractor = extractor.eval().to(device)
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([read(p, image_size) for p in paths[start:start + batch_size]])  # (B, H, W[, 3]) uint8
        x = torch.from_numpy(batch).to(device=device, dtype=torch.float32).div_(255.0)
        x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)    # (B, 3, H, W)
        feats = extractor(x)                                                                 # (B, D)
        chunks.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
        if progress is not None:
            progress(len(batch))
    if not chunks:
        return np.zeros((0, 0))
    return np.concatenate(chunks)


# ---------------------------------------------------------------------------------------------
# Choosing the extractor: fid.features
# ---------------------------------------------------------------------------------------------
FEATURE_EXTRACTORS = {
    "inception": "pytorch-fid's InceptionV3 (fid.dims: 64/192/768/2048), ImageNet features, 299 px: the paper's FID",
    "phantom-judge": "the reference phantom classifier beside the base model (<diffusion.base_model folder>/judge/, "
                     "written by pretrain-base): its 32-d penultimate layer, 64 px (a domain encoder, as RadImageNet "
                     "encoders are for radiology)",
}
_TORCHSCRIPT_SIZE = 224  # input side of a TorchScript encoder without an `image_size` attribute


@dataclass
class FeatureExtractor:
    """An image encoder for FID/KID/memorisation. `module` maps (B, 3, H, W) in [0, 1] (grey replicated)
    to (B, dims); images are read at `image_size`. `name` goes into every row it produces."""
    name: str
    dims: int
    image_size: int
    module: nn.Module

    @property
    def label(self) -> str:
        return f"{self.name} ({self.dims}-d)"

    def features(self, paths: Sequence[str], batch_size: int, device: str | torch.device = "cpu",
                 reader: Callable[[str, int], np.ndarray] | None = None,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        return extract_features(paths, self.module, batch_size, self.image_size, device, reader, progress)


def primary_dims(cfg_fid, fid=None) -> int:
    """The feature size Table 1, the FID figure and rank selection read: fid.dims for Inception; for another
    fid.features, its one size as fid.parquet records it (phantom-judge: 32; fid.dims does not apply)."""
    if cfg_fid.features == "inception" or fid is None or "dims" not in fid or not len(fid):
        return cfg_fid.dims
    sizes = sorted({int(d) for d in fid["dims"].dropna()})
    return sizes[0] if len(sizes) == 1 else cfg_fid.dims


def _is_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".pt", ".pth", ".ts")) or os.sep in name


def check_features_name(name: str, key: str = "fid.features") -> None:
    """Refuse a `fid.features` value that is neither a known extractor nor a file path."""
    if name in FEATURE_EXTRACTORS or _is_path(name):
        return
    raise MeddapError(f"config key '{key}' = {name!r} is not a feature extractor. Use one of: "
                      + "; ".join(f"{k} ({v})" for k, v in FEATURE_EXTRACTORS.items())
                      + "; or the path of a TorchScript encoder file (*.pt) mapping (B, 3, H, W) images in [0, 1] "
                        "to (B, D) features.")


_TORCHSCRIPT_FIX = ("export your encoder with torch.jit.save(torch.jit.script(model), PATH) (input (B, 3, H, W) in "
                    "[0, 1], output (B, D); an `image_size` attribute sets H = W, else 224), or use "
                    + " / ".join(FEATURE_EXTRACTORS))


def check_features_source(cfg_fid, base_model: str) -> None:
    """What `fid.features` and `fid.judge` read, checked to exist without loading it: a TorchScript file,
    the judge beside `base_model`. MeddapError naming the key and the fix; the pipeline calls it before
    fine-tuning, so a wrong path does not surface only after hours of finetune and generate. Inception's
    weights are not checked: without them the fid stage records FID as not computed."""
    from meddap.diffusion.base import base_model_judge_dir

    name = getattr(cfg_fid, "features", "inception") or "inception"
    check_features_name(name)
    if name == "phantom-judge":
        base_model_judge_dir(base_model, "fid.features")
    elif name not in FEATURE_EXTRACTORS and not os.path.isfile(os.path.expanduser(name)):
        raise MeddapError(f"config key 'fid.features' = {name!r}: no such file. Give the path of a TorchScript "
                          f"encoder: {_TORCHSCRIPT_FIX}.")
    if getattr(cfg_fid, "judge", None):
        base_model_judge_dir(base_model, "fid.judge")


def _torchscript_encoder(path: str, key: str, device) -> FeatureExtractor:
    full = os.path.expanduser(path)
    fix = _TORCHSCRIPT_FIX
    if not os.path.isfile(full):
        raise MeddapError(f"config key '{key}' = {path!r}: no such file. Give the path of a TorchScript encoder: {fix}.")
    import warnings

    try:
        with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; the format still loads
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(full, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise MeddapError(f"config key '{key}' = {path!r} could not be loaded as TorchScript "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): {fix}.") from None
    size = int(getattr(module, "image_size", _TORCHSCRIPT_SIZE))
    with torch.no_grad():
        out = module(torch.zeros(2, 3, size, size))
    if out.ndim != 2 and out.ndim != 4:
        raise MeddapError(f"config key '{key}' = {path!r}: the encoder returned shape {tuple(out.shape)}; it must "
                          f"return (B, D) features: {fix}.")
    return FeatureExtractor(f"torchscript:{os.path.basename(full)}", int(out.reshape(2, -1).shape[1]), size,
                            module.to(device))


def build_feature_extractor(cfg_fid, device: str | torch.device = "cpu",
                            base_model: str | None = None) -> FeatureExtractor:
    """The extractor `cfg_fid.features` names. `inception` raises MissingWeightsError when pytorch-fid's
    weights are absent (the fid stage records that); `phantom-judge` is the judge beside `base_model`
    (diffusion.base_model: `<its folder>/judge/`, as pretrain-base writes it); anything that cannot be
    built raises a MeddapError naming fid.features and the fix."""
    name = getattr(cfg_fid, "features", "inception") or "inception"
    check_features_name(name)
    if name == "inception":
        return FeatureExtractor("inception", cfg_fid.dims, INCEPTION_INPUT_SIZE,
                                load_inception(cfg_fid.dims, cfg_fid.weights, device))
    if name == "phantom-judge":
        from meddap.classify.judge import JudgeFeatures, load_judge
        from meddap.diffusion.base import base_model_judge_dir

        if base_model is None:
            raise ValueError("fid.features = 'phantom-judge' needs base_model (diffusion.base_model)")
        judge = load_judge(base_model_judge_dir(base_model, "fid.features"), key="fid.features")
        return FeatureExtractor("phantom-judge", judge.embedding_dims, judge.image_size,
                                JudgeFeatures(judge).eval().to(device))
    return _torchscript_encoder(name, "fid.features", device)
