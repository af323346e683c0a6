"""Images for the classifier grid: decoded once into uint8 tensors, selected per trial, augmented in batches.

Decoding happens once for the whole sweep (`load_sweep_images`): every real image of the manifest and
every synthetic image any trial can use goes into (N, C, S, S) uint8 arrays. A trial then only
indexes into them (`trial_tensors`); nothing is decoded in the epoch loop. Batches are turned into
model input on the trial's device (`model_input`): random flip, 1 -> 3 channels, ImageNet
normalisation.

Channels (classify.channels): "grey" decodes every image to grey (C = 1). "rgb" feeds images as the
authors did: synthetic images keep the colour they were generated with (C = 3); real images are read
in colour too, but when every one of them is grey content (BUSI stores grey scans as RGB) they are
kept as one channel and replicated to three on the device, so the object store holds a third of the
bytes and the network still sees exactly the RGB file.

A trial (fold k, adjective a, ratio r) trains on
  - real: manifest rows with split == "train" and fold != k;
  - synthetic: per class c, the first round(r * n_real(c)) images by `index` of (fold k, adjective a)
    in the synthetic manifest, where n_real(c) counts class c among those real rows; when the
    manifest holds no fold-k images for a, the shared adapter's (fold -1) images are used.
    (Python's round: halves go to the even number, e.g. round(0.5 * 5) = 2.)
Validation = train rows with fold == k; test = split "test"; external = split "external", except that
with data.external.exclude_overlap the B images that copy an A image (manifest `a_overlap`) form their
own eval set "external_overlap" (scored too, so the report can give Table 3 on all of B as well).
Trials of one (classifier, fold, repeat) share their seed (meddap.classify.trial.trial_seed), whatever
the adjective and ratio; `repeat` > 0 adds `__rep<k>` to the trial id (repeat 0 keeps the plain id).
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from meddap.errors import MeddapError
from meddap.progress import Progress

# torch and pandas are imported where tensors and frames are made: `python -m meddap status` reads
# trial ids from here without torch's import (seconds), `bench gpu` runs the batch transform without pandas.
if TYPE_CHECKING:
    import pandas as pd
    import torch

__all__ = [
    "AUGMENTATIONS",
    "TrialSpec",
    "EvalSet",
    "TrialTensors",
    "SweepImages",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "decode_images",
    "synthetic_source_fold",
    "select_training_rows",
    "control_training_rows",
    "synthetic_pool",
    "load_sweep_images",
    "trial_tensors",
    "imagenet_stats",
    "model_input",
]

# torchvision's ImageNet statistics (the normalisation the paper and the pretrained weights use).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EVAL_SPLITS = ("test", "external")
_EVAL_SETS = ("test", "external", "external_overlap")
CHANNELS = {"grey": 1, "rgb": 3}


AUGMENTATIONS = ("none", "synthetic", "duplicate", "classical")
# Trial-id suffix of the control trials; real-only and synthetic ids keep the form of earlier sweeps.
_CONTROL_SUFFIX = {"duplicate": "__dup", "classical": "__cls"}


@dataclass(frozen=True)
class TrialSpec:
    """One cell of the grid. `augmentation` says what is added to the fold's real training images:
    none (the real-only baseline: adjective None, ratio 0); synthetic (adjective's SD images at ratio);
    duplicate (real images again, as many per class as the synthetic set at ratio: adjective None);
    classical (real images through the adjective's classical twin, same counts). None = derived from
    adjective (none / synthetic), as every spec of earlier sweeps."""

    classifier: str
    fold: int
    adjective: Optional[str] = None
    ratio: float = 0.0
    repeat: int = 0
    augmentation: Optional[str] = None

    def __post_init__(self):
        aug = self.augmentation or ("none" if self.adjective is None else "synthetic")
        object.__setattr__(self, "augmentation", aug)
        if aug not in AUGMENTATIONS:
            raise ValueError(f"TrialSpec: augmentation {aug!r} is not one of {AUGMENTATIONS}")
        wants_adjective = aug in ("synthetic", "classical")
        if (self.adjective is not None) != wants_adjective or (self.ratio == 0) != (aug == "none"):
            raise ValueError(f"TrialSpec: {aug} trials have {'an adjective' if wants_adjective else 'adjective None'} "
                             f"and {'ratio 0' if aug == 'none' else 'a ratio > 0'}, got adjective={self.adjective!r}, "
                             f"ratio={self.ratio}")

    @property
    def real_only(self) -> bool:
        return self.augmentation == "none"

    @property
    def control(self) -> bool:
        return self.augmentation in _CONTROL_SUFFIX

    @property
    def trial_id(self) -> str:
        from meddap.layout import adjective_slug

        slug = "real" if self.adjective is None else adjective_slug(self.adjective)
        tail = _CONTROL_SUFFIX.get(self.augmentation, "")
        tail += f"__rep{self.repeat}" if self.repeat else ""  # repeat 0 keeps the ids of earlier sweeps
        return f"{self.classifier}__{slug}__r{self.ratio:g}__f{self.fold}{tail}"

    def to_dict(self) -> dict:
        d = {"classifier": self.classifier, "fold": self.fold, "adjective": self.adjective,
             "ratio": self.ratio, "repeat": self.repeat, "trial_id": self.trial_id}
        if self.control:  # only controls name it: real-only and synthetic specs (and made_from keys) stay as they were
            d["augmentation"] = self.augmentation
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        return cls(classifier=d["classifier"], fold=int(d["fold"]), adjective=d["adjective"],
                   ratio=float(d["ratio"]), repeat=int(d.get("repeat", 0)), augmentation=d.get("augmentation"))


@dataclass
class EvalSet:
    name: str
    images: torch.Tensor       # (N, C, S, S) uint8, C = 1 or 3
    labels: torch.Tensor       # (N,) int64
    image_ids: list[str]


@dataclass
class TrialTensors:
    train_images: torch.Tensor                       # (N, C, S, S) uint8, real then synthetic
    train_labels: torch.Tensor                       # (N,) int64
    n_real: int
    n_synthetic: int
    evals: dict[str, EvalSet]                        # "val", "test", optionally "external"
    synthetic_evals: dict[str, EvalSet] = field(default_factory=dict)  # adjective -> set (Figure 1a)
    train_image_ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
def _default_decoder(channels: int = 1) -> Callable[[str, int], np.ndarray]:
    from meddap.data.decode import read_grey, read_rgb

    return read_rgb if channels == 3 else read_grey


def _decode_any(decode: Callable, path: str, size: int) -> np.ndarray:
    """Decode a local path, or an s3:// / gs:// URI (a run dir in an object store: generate writes the
    synthetic images there) through a temporary local copy."""
    from meddap import storage

    if not storage.is_uri(path):
        return decode(path, size)
    from meddap.data.decode import ImageDecodeError

    suffix = os.path.splitext(path)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        try:
            tmp.write(storage.read_bytes(path))
        except OSError as e:
            raise ImageDecodeError(path, f"cannot be read from the object store ({e})") from None
        tmp.flush()
        try:
            return decode(tmp.name, size)
        except ImageDecodeError as e:
            raise ImageDecodeError(path, e.reason) from None


def decode_images(paths: Sequence[str], size: int, decode: Optional[Callable] = None, what: str = "decode",
                  workers: Optional[int] = None, channels: int = 1,
                  progress: Optional[Progress] = None) -> np.ndarray:
    """(N, channels, size, size) uint8 from image files (local paths or object-store URIs), decoded in a
    thread pool (Pillow releases the GIL). With channels 3 the decoder returns (S, S, 3) arrays (a grey
    (S, S) one is replicated). `progress`: a caller's Progress spanning several calls."""
    decode = decode or _default_decoder(channels)
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    if not len(paths):
        return out
    progress = progress or Progress(len(paths), what, "images", every_s=5.0)

    def one(i: int) -> None:
        img = _decode_any(decode, paths[i], size)  # (S, S) or (S, S, 3) uint8; ImageDecodeError names the file
        out[i] = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)[:channels]

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(one, range(len(paths))):
            progress.update(1)
    return out


# ---------------------------------------------------------------------------------------------
# Which images a trial uses
# ---------------------------------------------------------------------------------------------
def synthetic_source_fold(synthetic: pd.DataFrame, fold: int, adjective: str) -> int:
    """Fold whose synthetic images serve `fold`: the fold's own adapter, else the shared one (-1)."""
    for source in (fold, -1):
        if ((synthetic["fold"] == source) & (synthetic["adjective"] == adjective)).any():
            return source
    have = sorted({(int(f), a) for f, a in zip(synthetic["fold"], synthetic["adjective"])})
    raise MeddapError(
        f"the synthetic manifest has no images for fold {fold} (nor a shared fold -1) with adjective "
        f"{adjective!r}; it holds (fold, adjective) = {have[:20]}{' ...' if len(have) > 20 else ''}. Run "
        f"`python -m meddap generate` with this config (generate.adjectives, diffusion.lora.per_fold) first.")


def _real_train_rows(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    return manifest[(manifest["split"] == "train") & (manifest["fold"] != fold)]


def _synthetic_counts(real: pd.DataFrame, ratio: float, n_classes: int) -> dict[int, int]:
    """Per label, the synthetic images a trial at `ratio` uses: the generation plan's own rule, so the
    sweep selects exactly what generate made (ratio 0, the real-only baseline, uses none)."""
    from meddap.diffusion.plan import synthetic_count

    counts = real["label"].value_counts()
    return {c: synthetic_count(int(counts.get(c, 0)), ratio) if ratio > 0 else 0 for c in range(n_classes)}


def select_training_rows(manifest: pd.DataFrame, synthetic: Optional[pd.DataFrame], spec: TrialSpec,
                         classes: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(real rows, synthetic rows) of a trial's training set, as the module docstring defines them."""
    import pandas as pd

    real = _real_train_rows(manifest, spec.fold)
    if spec.real_only:
        return real, (synthetic.iloc[:0] if synthetic is not None else pd.DataFrame())
    if spec.control:
        raise ValueError(f"trial {spec.trial_id} is a control: its extra rows come from control_training_rows")
    if synthetic is None:
        raise MeddapError(f"trial {spec.trial_id} needs synthetic images but there is no synthetic manifest; "
                          f"run `python -m meddap generate` first.")
    source = synthetic_source_fold(synthetic, spec.fold, spec.adjective)
    pool = synthetic[(synthetic["fold"] == source) & (synthetic["adjective"] == spec.adjective)]
    parts = []
    for label, need in _synthetic_counts(real, spec.ratio, len(classes)).items():
        have = pool[pool["label"] == label].sort_values("index")
        if len(have) < need:
            raise MeddapError(
                f"trial {spec.trial_id} needs the first {need} synthetic '{classes[label]}' images "
                f"(ratio {spec.ratio:g} x {int((real['label'] == label).sum())} real) of fold {source}, adjective "
                f"{spec.adjective!r}, but the synthetic manifest has {len(have)}. Generate more (the "
                f"largest generate.ratios must be covered) or lower generate.ratios.")
        parts.append(have.iloc[:need])
    return real, pd.concat(parts) if parts else pool.iloc[:0]


def control_training_rows(manifest: pd.DataFrame, spec: TrialSpec, classes: Sequence[str],
                          run_seed: int) -> pd.DataFrame:
    """The extra rows of a control trial (`meddap.classify.controls.control_rows`): per class the synthetic
    count at the trial's ratio, drawn from the fold's training images. `run_seed` = generate.seed."""
    from meddap.classify.controls import control_rows

    if not spec.control:
        raise ValueError(f"trial {spec.trial_id} is not a control trial")
    return control_rows(manifest, classes, spec.fold, spec.ratio, spec.augmentation, run_seed,
                        spec.adjective if spec.augmentation == "classical" else None)


def synthetic_pool(synthetic: pd.DataFrame, fold: int, adjective: str) -> pd.DataFrame:
    """Every synthetic row serving (fold, adjective), spares (generate.filter_overgenerate) included."""
    source = synthetic_source_fold(synthetic, fold, adjective)
    return synthetic[(synthetic["fold"] == source) & (synthetic["adjective"] == adjective)]


# ---------------------------------------------------------------------------------------------
# Decoded images for a whole sweep
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepImages:
    """Every image any trial of a sweep touches, decoded once.

    `real_rows` is the manifest with a `row` column into `real_images`; `synthetic_rows[(fold, adj)]`
    holds the used synthetic rows (sorted by label, index) with `row` into `synthetic_images[(fold, adj)]`.
    Image arrays may be replaced by Ray object refs: `trial_tensors(get=ray.get)` resolves them.
    `gate[(trial fold, adj)]`: the pool's rows with the fold judge's `fidelity`; a synthetic trial of that
    fold and adjective then takes its images with `filter_synthetic(..., *gate_filter)` (label-fidelity
    gate). `run_seed` (generate.seed) draws the control trials' real images (`control_training_rows`).
    """

    classes: list[str]
    image_size: int
    real_rows: pd.DataFrame
    real_images: object                                   # (N, C, S, S) uint8 array (or an object ref)
    synthetic_rows: dict[tuple[int, str], pd.DataFrame] = field(default_factory=dict)
    synthetic_images: dict[tuple[int, str], object] = field(default_factory=dict)
    run_seed: int = 0
    gate: dict[tuple[int, str], pd.DataFrame] = field(default_factory=dict)
    gate_filter: tuple[str, float] = ("none", 0.0)

    def nbytes(self) -> int:
        arrays = [self.real_images, *self.synthetic_images.values()]
        return int(sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)))


def _eval_set_of(rows: pd.DataFrame, exclude_overlap: bool) -> pd.Series:
    """Per real row, the eval set it is scored in ("" for training rows)."""
    out = rows["split"].where(rows["split"].isin(_EVAL_SPLITS), "").astype(object)
    external = rows["split"] == "external"
    if exclude_overlap and external.any():
        if "a_overlap" not in rows:
            raise MeddapError("the manifest has no a_overlap column (it was written before prepare checked Dataset B "
                              "for copies of Dataset A images), so data.external.exclude_overlap cannot be applied. "
                              "Rerun `python -m meddap prepare` (same config and run_dir), or set "
                              "data.external.exclude_overlap=false.")
        out[external & rows["a_overlap"].fillna(False).astype(bool)] = "external_overlap"
    return out


def _grey_content(images: np.ndarray) -> bool:
    """True when every image of (N, 3, S, S) has three equal channels."""
    return bool((images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all())


def load_sweep_images(manifest: pd.DataFrame, synthetic: Optional[pd.DataFrame], specs: Sequence[TrialSpec],
                      classes: Sequence[str], image_size: int, decode: Optional[Callable] = None,
                      channels: str = "grey", exclude_overlap: bool = False, whole_pools: bool = False,
                      run_seed: int = 0) -> SweepImages:
    """Decode the real images and, per (source fold, adjective), the synthetic images the largest
    ratio of any trial needs (`whole_pools`: every image of the pool, spares included, which the
    label-fidelity judges score and a gate tops counts up from), with `channels` as the module docstring
    says. Raises MeddapError before any training when the synthetic manifest lacks a needed (fold,
    adjective) or holds too few images. Control trials need no decoding: they index the real images."""
    if channels not in CHANNELS:
        raise MeddapError(f"classify.channels = {channels!r}: expected one of {sorted(CHANNELS)}.")
    n_channels = CHANNELS[channels]
    # For each synthetic pool, the most images per class any trial draws from it.
    needed: dict[tuple[int, str], pd.DataFrame] = {}
    for spec in specs:
        if spec.real_only or spec.control:
            continue
        _, rows = select_training_rows(manifest, synthetic, spec, classes)
        key = (synthetic_source_fold(synthetic, spec.fold, spec.adjective), spec.adjective)
        if whole_pools:
            rows = synthetic_pool(synthetic, spec.fold, spec.adjective)
        if key not in needed or len(rows) > len(needed[key]):
            needed[key] = rows  # nested ratios: the largest selection contains every smaller one
    # Checked first (above), decoded second: a missing synthetic set fails before minutes of decoding.
    real_rows = manifest[manifest["split"].isin(("train", *_EVAL_SPLITS))].reset_index(drop=True).copy()
    real_rows["row"] = np.arange(len(real_rows))
    real_rows["eval_set"] = _eval_set_of(real_rows, exclude_overlap)
    from meddap.data.decode import ImageDecodeError

    # One progress line for every image the sweep decodes (real and each synthetic set).
    n_images = len(real_rows) + sum(len(r) for r in needed.values())
    progress = Progress(n_images, "sweep: decode", "images", every_s=5.0,
                        note=f"{n_images * image_size ** 2 / 2 ** 20:.1f} MiB as uint8, for Ray's object store")
    try:
        real_images = decode_images(real_rows["path"].tolist(), image_size, decode, channels=n_channels,
                                    progress=progress)
        if n_channels == 3 and _grey_content(real_images):
            real_images = np.ascontiguousarray(real_images[:, :1])  # replicated to 3 on the device
    except ImageDecodeError as e:
        raise MeddapError(f"{e}. It is listed in the data manifest: put it back, or rerun `python -m meddap prepare` "
                          f"(same config and run_dir; `run --force prepare` in the pipeline) to make a manifest "
                          f"of the files there now.") from None
    syn_rows, syn_images = {}, {}
    for key, rows in sorted(needed.items()):
        rows = rows.sort_values(["label", "index"]).reset_index(drop=True).copy()
        rows["row"] = np.arange(len(rows))
        syn_rows[key] = rows
        try:
            syn_images[key] = decode_images(rows["path"].tolist(), image_size, decode, channels=n_channels,
                                            progress=progress)
        except ImageDecodeError as e:
            raise MeddapError(f"{e}. It is listed in the synthetic manifest: rerun `python -m meddap generate` "
                              f"(same config and run_dir), which regenerates missing or unreadable images, then "
                              f"the sweep.") from None
    return SweepImages(list(classes), image_size, real_rows, real_images, syn_rows, syn_images, run_seed=run_seed)


def _take(images: object, rows: Sequence[int], get: Callable) -> torch.Tensor:
    import torch

    arr = get(images) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(np.ascontiguousarray(arr[np.asarray(rows, dtype=np.int64)]))  # copy: writable


def _same_channels(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Grey (B, 1, S, S) parts replicated to 3 channels when another part is in colour."""
    c = max(p.shape[1] for p in parts)
    return [p.expand(-1, c, -1, -1) if p.shape[1] != c else p for p in parts]


def _eval_set(name: str, rows: pd.DataFrame, images: object, get: Callable) -> EvalSet:
    import torch

    return EvalSet(name, _take(images, rows["row"], get), torch.tensor(rows["label"].to_numpy(), dtype=torch.int64),
                   rows["image_id"].astype(str).tolist())


def _pool_key(data: SweepImages, fold: int, adjective: str) -> tuple[int, str]:
    for key in ((fold, adjective), (-1, adjective)):
        if key in data.synthetic_rows:
            return key
    raise MeddapError(f"no decoded synthetic images for fold {fold}, adjective {adjective!r} "
                      f"(load_sweep_images was given other trials).")


def trial_tensors(data: SweepImages, spec: TrialSpec, get: Callable = lambda x: x) -> TrialTensors:
    """The trial's training set, its validation/test/external sets and (real-only trials) the
    synthetic sets of its fold for every adjective, as uint8 tensors."""
    import pandas as pd
    import torch

    rows = data.real_rows
    real = rows[(rows["split"] == "train") & (rows["fold"] != spec.fold)]
    val = rows[(rows["split"] == "train") & (rows["fold"] == spec.fold)]
    if len(val) == 0:
        raise MeddapError(f"fold {spec.fold} has no validation images (train rows with fold == {spec.fold}) "
                          f"in the manifest; rerun `python -m meddap prepare`.")
    parts_x = [_take(data.real_images, real["row"], get)]          # (n_real, 1, S, S)
    parts_y = [torch.tensor(real["label"].to_numpy(), dtype=torch.int64)]
    ids = real["image_id"].astype(str).tolist()
    n_syn = 0
    if spec.augmentation == "synthetic":
        counts = _synthetic_counts(real, spec.ratio, len(data.classes))
        key = _pool_key(data, spec.fold, spec.adjective)
        gate = data.gate.get((spec.fold, spec.adjective))
        if gate is not None:  # label-fidelity gate: kept images, topped up from the spares
            from meddap.classify.fidelity import filter_synthetic

            chosen = filter_synthetic(gate, {data.classes[c]: n for c, n in counts.items()}, *data.gate_filter)
        else:
            pool = data.synthetic_rows[key]
            chosen = pd.concat([pool[pool["label"] == c].sort_values("index").iloc[:n] for c, n in counts.items()])
        parts_x.append(_take(data.synthetic_images[key], chosen["row"], get))
        parts_y.append(torch.tensor(chosen["label"].to_numpy(), dtype=torch.int64))
        ids += chosen["image_id"].astype(str).tolist()
        n_syn = len(chosen)
    elif spec.control:
        extra = control_training_rows(rows, spec, data.classes, data.run_seed)
        row_of = dict(zip(rows["image_id"].astype(str), rows["row"]))
        x = _take(data.real_images, [row_of[i] for i in extra["source_image_id"]], get)   # (n, C, S, S) uint8
        if spec.augmentation == "classical":
            from meddap.classify.controls import classical_images

            x = torch.from_numpy(classical_images(x.numpy(), spec.adjective, extra["seed"].tolist()))
        parts_x.append(x)
        parts_y.append(torch.tensor(extra["label"].to_numpy(), dtype=torch.int64))
        ids += extra["image_id"].astype(str).tolist()
        n_syn = len(extra)
    evals = {"val": _eval_set("val", val, data.real_images, get)}
    eval_of = rows["eval_set"] if "eval_set" in rows else rows["split"]
    for name in _EVAL_SETS:
        part = rows[eval_of == name]
        if len(part):
            evals[name] = _eval_set(name, part, data.real_images, get)
    synthetic_evals = {}
    if spec.real_only:
        for adjective in sorted({a for _, a in data.synthetic_rows}):
            key = _pool_key(data, spec.fold, adjective)
            synthetic_evals[adjective] = _eval_set(f"synthetic:{adjective}", data.synthetic_rows[key],
                                                   data.synthetic_images[key], get)
    return TrialTensors(torch.cat(_same_channels(parts_x)), torch.cat(parts_y), len(real), n_syn, evals,
                        synthetic_evals, ids)


# ---------------------------------------------------------------------------------------------
# Batch transform on the device
# ---------------------------------------------------------------------------------------------
def imagenet_stats(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors on `device`: build once, pass to `model_input`."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def model_input(batch: torch.Tensor, *, flip: bool = False, generator: Optional[torch.Generator] = None,
                channels_last: bool = False,
                stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """(B, C, S, S) uint8, C = 1 (grey, replicated) or 3 -> (B, 3, S, S) float32 ImageNet-normalised, with a
    random horizontal flip per image when `flip` (drawn from `generator`, on the batch's device). `stats`:
    `imagenet_stats` on the batch's device, built once by a caller that runs many batches (else built here)."""
    x = batch.float().div_(255.0)                                           # (B, C, S, S) in [0, 1]
    import torch

    if flip:
        coin = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5  # (B,)
        x = torch.where(coin[:, None, None, None], x.flip(-1), x)
    mean, std = stats if stats is not None else imagenet_stats(x.device)
    x = (x.expand(-1, 3, -1, -1) - mean) / std                              # (B, 3, S, S)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
