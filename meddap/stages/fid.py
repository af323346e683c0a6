"""`python -m meddap fid`: FID / KID of every synthetic set against its fold's real training images,
and a memorisation check (nearest real training image of each synthetic image).

For each (fold or shared adapter, adjective) in the synthetic manifest, every generated image (the
largest ratio's set; smaller ratios are its prefixes) is compared with the real training images of the
same fold (fold k's training images are the train rows with fold != k; a shared adapter, fold -1, saw
every train row), per class and over all classes ("all"). Fair comparisons:
  - equal N: per class, the larger side is subsampled (seeded by fid.seed, fold, adjective and class) to
    the smaller side's count; "all" is the union of those, so both sides also share one class mix. Rows
    hold n_real == n_synthetic (the N compared) and n_real_available / n_synthetic_available;
  - one resize path: both sides are read at the generation resolution with one Pillow filter (the
    synthetic images are already that size) before the extractor (which resizes to its own input);
  - the images the classifiers see: grey or colour as classify.channels says;
  - no per-class FID where N < the feature dimension (its covariance would be singular and the value
    mostly the eps regulariser's): fid null, status "fid_not_computed: ..." saying so, KID still given;
  - fid.dims, plus each of fid.extra_dims (the paper config adds 64, the magnitude the paper's FIDs
    suggest), each row labelled with its dims.
Outputs:
  summary/fid.parquet           fold, adjective, class_name, fid, kid, kid_std, features, dims, n_real, n_synthetic, status,
                                n_real_available, n_synthetic_available,
                                settings and made_from (what the numbers were made with and from: sha256 of
                                the compared images; a rerun keeps only sets whose both match)
  summary/memorization.parquet  image_id, fold, adjective, class_name, nearest_real_id, nearest_real_class,
                                distance, reference_distance, threshold_distance, flagged, features, dims
  summary/fidelity.parquet      (only with fid.judge) image_id, fold, adjective, class_name, predicted,
                                correct, confidence, mean_intensity, judge: the reference judge's class of
                                every synthetic image (label fidelity = share of correct)
The feature extractor is `fid.features` (`meddap.fid.build_feature_extractor`): every row names it
(`features`) and its `dims`. When pytorch-fid's Inception weights are absent, rows carry fid/kid null and
status "missing_weights: <reason and where to put the file>"; no number is made up.

Features are computed in one process: this one when it has CUDA (or no Ray cluster with GPUs is
around), else one Ray task holding a GPU of the cluster (a CPU-only head node would take an hour on
the paper's ~60,000 images). Resumable: (fold, adjective) sets already in fid.parquet, computed with the same
settings and image counts, are kept; each finished set is written at once.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from meddap import logs, storage
from meddap.errors import MeddapError
from meddap.fid import (
    INCEPTION_INPUT_SIZE,
    MissingWeightsError,
    build_feature_extractor,
    extract_features,
    fid_from_features,
    kernel_inception_distance,
    load_inception,
    memorization,
    source_distance,
)
from meddap.layout import RunLayout, adapter_name
from meddap.progress import Progress

__all__ = ["run", "fid_for_sets", "equal_n", "score_fidelity", "FID_COLUMNS", "MEMORIZATION_COLUMNS",
           "FIDELITY_COLUMNS"]

FID_COLUMNS = ["fold", "adjective", "class_name", "fid", "kid", "kid_std", "features", "dims", "n_real", "n_synthetic",
               "status", "n_real_available", "n_synthetic_available"]
MEMORIZATION_COLUMNS = ["image_id", "fold", "adjective", "class_name", "nearest_real_id", "nearest_real_class",
                        "distance", "reference_distance", "threshold_distance", "flagged", "features", "dims",
                        # img2img: the image's own source (null / NaN / NA for txt2img images)
                        "source_image_id", "source_distance", "source_flagged"]
FIDELITY_COLUMNS = ["image_id", "fold", "adjective", "class_name", "predicted", "correct", "confidence",
                    "mean_intensity", "judge"]
ALL_CLASSES = "all"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reader(path: str, size: int, channels: str = "grey") -> np.ndarray:
    from meddap.data.decode import read_image

    # Synthetic images live under run_dir, which may be an object store.
    return read_image(storage.local_path(path), size, channels)   # (S, S) or (S, S, 3) uint8


class _FeatureCache:
    """Features per image path, so each fold's real images pass through the extractor once."""

    def __init__(self, extractor: nn.Module, batch_size: int, image_size: int, device: str,
                 reader: Callable[[str, int], np.ndarray] = _reader):
        self.extractor, self.batch_size, self.image_size, self.device = extractor, batch_size, image_size, device
        self.reader = reader
        self._feats: dict[str, np.ndarray] = {}

    def get(self, paths: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        todo = list(dict.fromkeys(p for p in paths if p not in self._feats))
        if todo:
            feats = extract_features(todo, self.extractor, self.batch_size, self.image_size, self.device,
                                     reader=self.reader, progress=progress.update if progress else None)
            self._feats.update(zip(todo, feats))
        if not paths:
            return np.zeros((0, 0))
        return np.stack([self._feats[p] for p in paths])        # (N, D)


def _distances(real: np.ndarray, synth: np.ndarray, cfg_fid, fid_needs_n_dims: bool = False) -> dict:
    """fid / kid / kid_std of two feature sets, or a status saying why not. With `fid_needs_n_dims`
    (per-class rows) FID is left out when N < the feature dimension; KID stands."""
    n_real, n_synth = len(real), len(synth)
    if n_real < 2 or n_synth < 2:
        return {"fid": None, "kid": None, "kid_std": None,
                "status": f"too_few_images: n_real={n_real}, n_synthetic={n_synth} (need >= 2 each)"}
    kid, kid_std = kernel_inception_distance(real, synth, cfg_fid.kid_subset_size, cfg_fid.kid_subsets,
                                             seed=cfg_fid.seed)
    out = {"kid": kid, "kid_std": None if np.isnan(kid_std) else kid_std}
    dims = real.shape[1]
    if fid_needs_n_dims and min(n_real, n_synth) < dims:
        return {**out, "fid": None,
                "status": f"fid_not_computed: N={min(n_real, n_synth)} < dims={dims} (the covariance is singular, "
                          f"so FID would mostly measure the regulariser); KID given"}
    return {**out, "fid": fid_from_features(real, synth, method=cfg_fid.method), "status": "ok"}


def equal_n(real_df: pd.DataFrame, synth_df: pd.DataFrame, classes: Sequence[str], seed: int, fold: int,
            adjective: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row positions (real, synthetic) with, per class, min(n_real, n_synthetic) images on each side:
    the larger side subsampled without replacement, seeded by (seed, fold, adjective, class)."""
    keep_r, keep_s = [], []
    for c, cls in enumerate(classes):
        r = np.flatnonzero((real_df["class_name"] == cls).to_numpy())
        s = np.flatnonzero((synth_df["class_name"] == cls).to_numpy())
        n = min(len(r), len(s))
        rng = np.random.default_rng([seed, fold + 1, zlib.crc32(adjective.encode()), c])
        keep_r.append(np.sort(rng.choice(r, n, replace=False)) if len(r) > n else r)
        keep_s.append(np.sort(rng.choice(s, n, replace=False)) if len(s) > n else s)
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    return cat(keep_r), cat(keep_s)


def fid_for_sets(real_paths: Sequence[str], synth_paths: Sequence[str], cfg_fid, device: str | None = None,
                 extractor: nn.Module | None = None, image_size: int = INCEPTION_INPUT_SIZE,
                 base_model: str | None = None) -> dict:
    """FID and KID between two lists of image files (the rank selection's call); pass the generation
    resolution as `image_size` so both sides take one resize path.

    Returns {fid, kid, kid_std, dims, n_real, n_synthetic, status}; fid/kid are None and status is
    "missing_weights: ..." when pytorch-fid's Inception weights are absent (and `extractor` is None).
    """
    device = device or _device()
    out = {"features": type(extractor).__name__ if extractor is not None else cfg_fid.features, "dims": cfg_fid.dims,
           "n_real": len(real_paths), "n_synthetic": len(synth_paths)}
    if extractor is None:
        try:
            fe = build_feature_extractor(cfg_fid, device, base_model)
        except MissingWeightsError as e:
            return {**out, "fid": None, "kid": None, "kid_std": None, "status": e.status}
        extractor, image_size = fe.module, fe.image_size
        out.update(features=fe.name, dims=fe.dims)
    cache = _FeatureCache(extractor, cfg_fid.batch_size, image_size, device)
    progress = Progress(len(real_paths) + len(synth_paths), "fid features", "images")
    real, synth = cache.get(list(real_paths), progress), cache.get(list(synth_paths), progress)
    out["dims"] = int(real.shape[1]) if real.size else out["dims"]
    return {**out, **_distances(real, synth, cfg_fid)}


def _real_training(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Real images the adapter of `fold` was trained on (fold -1: the shared adapter saw all train rows)."""
    train = manifest[manifest["split"] == "train"]
    return train if fold < 0 else train[train["fold"] != fold]


def _read_input(path: str, what: str, stage: str) -> pd.DataFrame:
    if not storage.exists(path):
        raise MeddapError(f"{what} was not found at {path}: run `python -m meddap {stage}` first "
                          f"(same --config and run_dir).")
    return storage.read_parquet(path)


def _group_rows(fold: int, adjective: str, dims: int, real_df: pd.DataFrame, synth_df: pd.DataFrame,
                classes: list[str], cfg_fid, cache: _FeatureCache | None, missing: MissingWeightsError | None,
                progress: Progress | None, memorize: bool, features: str = "inception") -> tuple[list[dict], pd.DataFrame]:
    """fid.parquet rows (one per class and 'all', equal N on both sides) and, with `memorize`, the
    memorisation rows (every synthetic image against every real training image) of one synthetic set; every
    row names the extractor (`features`) and its `dims`."""
    rows: list[dict] = []
    mem = pd.DataFrame(columns=MEMORIZATION_COLUMNS)
    real_feats = synth_feats = None
    dims = cfg_fid.dims if dims is None else dims
    if cache is not None:
        real_feats = cache.get(real_df["path"].tolist(), progress)      # (Nr, D)
        synth_feats = cache.get(synth_df["path"].tolist(), progress)    # (Ns, D)
    keep_r, keep_s = equal_n(real_df, synth_df, classes, cfg_fid.seed, fold, adjective)
    r_cls, s_cls = real_df["class_name"].to_numpy(), synth_df["class_name"].to_numpy()
    for cls in [*classes, ALL_CLASSES]:
        r_sel = keep_r if cls == ALL_CLASSES else keep_r[r_cls[keep_r] == cls]
        s_sel = keep_s if cls == ALL_CLASSES else keep_s[s_cls[keep_s] == cls]
        row = {"fold": fold, "adjective": adjective, "class_name": cls, "features": features, "dims": dims,
               "n_real": len(r_sel), "n_synthetic": len(s_sel),
               "n_real_available": len(r_cls) if cls == ALL_CLASSES else int((r_cls == cls).sum()),
               "n_synthetic_available": len(s_cls) if cls == ALL_CLASSES else int((s_cls == cls).sum())}
        if missing is not None:
            row.update(fid=None, kid=None, kid_std=None, status=missing.status)
        else:
            row.update(_distances(real_feats[r_sel], synth_feats[s_sel], cfg_fid, fid_needs_n_dims=cls != ALL_CLASSES))
        rows.append(row)
    if memorize and cache is not None and len(real_df) >= 2 and len(synth_df):
        m = memorization(synth_feats, real_feats, cfg_fid.memorization_threshold)
        nearest = real_df.iloc[m["nearest"]]
        src_ids, src_dist, src_flag = _source_check(synth_df, cache, progress, m["threshold_distance"])
        mem = pd.DataFrame({
            "image_id": synth_df["image_id"].astype(str).to_numpy(), "fold": fold, "adjective": adjective,
            "class_name": synth_df["class_name"].to_numpy(),
            "nearest_real_id": nearest["image_id"].astype(str).to_numpy(),
            "nearest_real_class": nearest["class_name"].to_numpy(),
            "distance": m["distance"], "reference_distance": m["reference"],
            "threshold_distance": m["threshold_distance"], "flagged": m["flagged"], "features": features, "dims": dims,
            "source_image_id": src_ids, "source_distance": src_dist, "source_flagged": src_flag,
        })
    return rows, mem


def _source_check(synth_df: pd.DataFrame, cache: _FeatureCache, progress: Progress | None,
                  threshold_distance: float) -> tuple[pd.Series, np.ndarray, pd.Series]:
    """(source_image_id, source_distance, source_flagged) per synthetic row: img2img images against the
    real image each started from (`source_path`, joined from the data manifest by `_with_sources`),
    flagged with the nearest-real check's own threshold; null for txt2img rows."""
    n = len(synth_df)
    ids = (synth_df["source_image_id"] if "source_image_id" in synth_df else pd.Series([None] * n)).astype("string")
    dist = np.full(n, np.nan)
    flag = pd.Series([pd.NA] * n, dtype="boolean")
    paths = synth_df["source_path"] if "source_path" in synth_df else pd.Series([None] * n)
    has = paths.notna().to_numpy()
    if has.any():
        own = cache.get(synth_df.loc[has, "path"].tolist(), progress)            # (n_src, D)
        src = cache.get(paths[has].astype(str).tolist(), progress)               # (n_src, D)
        dist[has] = source_distance(own, src)
        flag[has] = dist[has] < threshold_distance
    return ids.reset_index(drop=True), dist, flag


def _with_sources(synth: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """`source_path` per synthetic row from the data manifest (null for txt2img rows); a source id the
    manifest no longer lists (prepare was rerun) is reported and left unchecked."""
    if "source_image_id" not in synth.columns or synth["source_image_id"].isna().all():
        return synth.assign(source_path=None)
    where = dict(zip(manifest["image_id"].astype(str), manifest["path"].astype(str)))
    ids = synth["source_image_id"]
    paths = ids.map(lambda i: where.get(str(i)) if pd.notna(i) else None)
    lost = int((ids.notna() & paths.isna()).sum())
    if lost:
        logs.say(f"[fid] {lost} img2img image(s) name a source the data manifest no longer lists; their source "
                 f"check is left empty. Rerun `python -m meddap generate` (same config) to remake them from today's "
                 f"manifest.")
    return synth.assign(source_path=paths)


def _settings(cfg_fid, image_size: int, extractor_name: str, dims: int | None = None, channels: str = "grey") -> str:
    """Everything that changes a row's numbers: a kept row must have been made with the same."""
    return (f"{extractor_name};dims={cfg_fid.dims if dims is None else dims};size={image_size};channels={channels};"
            f"equal_n=stratified;method={cfg_fid.method};"
            f"kid={cfg_fid.kid_subset_size}x{cfg_fid.kid_subsets};seed={cfg_fid.seed};"
            f"memorization_threshold={cfg_fid.memorization_threshold}")


def _made_from(real_df: pd.DataFrame, synth_df: pd.DataFrame) -> str:
    """sha256 of the images a set's rows compare: real (image_id, pixel sha256) and synthetic (image_id,
    generation spec, which hashes the adapter's weights). Rows made from other images are never kept."""
    import hashlib

    h = hashlib.sha256()
    pixels = real_df["sha256"] if "sha256" in real_df else real_df["path"]
    for i, d in sorted(zip(real_df["image_id"].astype(str), pixels.astype(str))):
        h.update(f"r {i} {d}\n".encode())
    spec = synth_df["spec"].astype(str) if "spec" in synth_df else synth_df["path"].astype(str)
    for i, d in sorted(zip(synth_df["image_id"].astype(str), spec)):
        h.update(f"s {i} {d}\n".encode())
    return h.hexdigest()


def _finished_groups(lay: RunLayout, settings: dict[int, str], current: dict,
                     primary: int) -> tuple[pd.DataFrame, pd.DataFrame, set]:
    """Rows of earlier runs worth keeping: sets computed (not missing weights) with the same settings (per
    dims) and made from the same images as now (`current`: (fold, adjective) -> made_from).
    Returns the rows, the memorisation rows of sets kept at the `primary` dims, and {(fold, adjective, dims)}."""
    empty = pd.DataFrame(columns=FID_COLUMNS), pd.DataFrame(columns=MEMORIZATION_COLUMNS), set()
    if not storage.exists(lay.summary("fid")):
        return empty
    old = storage.read_parquet(lay.summary("fid"))
    old_mem = (storage.read_parquet(lay.summary("memorization")) if storage.exists(lay.summary("memorization"))
               else pd.DataFrame(columns=MEMORIZATION_COLUMNS))
    if not {"settings", "made_from", "dims"} <= set(old.columns):
        return empty
    done = set()
    for (fold, adj, dims), g in old.groupby(["fold", "adjective", "dims"]):
        key = (int(fold), str(adj))
        overall = g[g["class_name"] == ALL_CLASSES]
        if (key in current and int(dims) in settings and len(overall) == 1
                and (g["settings"] == settings[int(dims)]).all()
                and not g["status"].str.startswith("missing_weights").any()
                and (g["made_from"] == current[key]).all()):
            done.add((*key, int(dims)))
    keep = old[[(int(f), str(a), int(d)) in done for f, a, d in zip(old["fold"], old["adjective"], old["dims"])]]
    keep_mem = old_mem[[(int(f), str(a), primary) in done for f, a in zip(old_mem["fold"], old_mem["adjective"])]] \
        if len(old_mem) else old_mem
    return keep, keep_mem, done


def _write(lay: RunLayout, rows: list[pd.DataFrame], mems: list[pd.DataFrame]) -> None:
    fid = pd.concat([r for r in rows if len(r)], ignore_index=True) if any(len(r) for r in rows) \
        else pd.DataFrame(columns=FID_COLUMNS)
    mem = pd.concat([m for m in mems if len(m)], ignore_index=True) if any(len(m) for m in mems) \
        else pd.DataFrame(columns=MEMORIZATION_COLUMNS)
    fid = fid.astype({"fid": "float64", "kid": "float64", "kid_std": "float64", "fold": "int64", "dims": "int64",
                      "n_real": "int64", "n_synthetic": "int64", "n_real_available": "int64",
                      "n_synthetic_available": "int64", "features": "str"})
    mem = mem.reindex(columns=MEMORIZATION_COLUMNS)  # rows kept from a run before the source columns: nulls
    mem = mem.astype({"distance": "float64", "reference_distance": "float64", "threshold_distance": "float64",
                      "flagged": "bool", "fold": "int64", "dims": "int64", "source_image_id": "string",
                      "source_distance": "float64", "source_flagged": "boolean"})
    storage.write_parquet(fid.sort_values(["fold", "adjective", "dims", "class_name"]).reset_index(drop=True),
                          lay.summary("fid"))
    storage.write_parquet(mem.reset_index(drop=True), lay.summary("memorization"))


def _gpu_elsewhere(cfg) -> bool:
    """True when this process has no CUDA but the Ray cluster it runs in (or is told of) has a GPU."""
    if torch.cuda.is_available():
        return False
    import ray

    from meddap.raytools import ensure_ray, ray_address

    if not ray.is_initialized():
        if ray_address(cfg)[0] == "local":
            return False   # no cluster to use: starting a local Ray would not add a GPU
        ensure_ray(cfg)
    return ray.cluster_resources().get("GPU", 0) >= 1


def _run_on_worker(cfg_dict: dict) -> dict:
    from meddap.config import Config

    return run(Config.from_dict(cfg_dict), _remote=False)


def _extractors(cfg, extractor: nn.Module | None, device: str) -> tuple[dict[int, tuple], str]:
    """({dims: (extractor or None, MissingWeightsError or None)}, features name), primary dims first.
    inception: fid.dims and fid.extra_dims; another fid.features: its one encoder (its own dims); an injected
    `extractor` (tests): fid.dims."""
    if extractor is not None:
        return {cfg.fid.dims: (extractor, None)}, type(extractor).__name__
    name = cfg.fid.features
    if name != "inception":
        # MeddapError naming fid.features when it cannot be built
        fe = build_feature_extractor(cfg.fid, device, cfg.diffusion.base_model)
        if cfg.fid.extra_dims:
            logs.say(f"[fid] fid.extra_dims {cfg.fid.extra_dims} apply to inception features only; "
                     f"{fe.name} has {fe.dims} dims")
        logs.say(f"[fid] features: {fe.label}")
        return {fe.dims: (_AtInputSize(fe.module, fe.image_size), None)}, fe.name
    out = {}
    for dims in [cfg.fid.dims, *cfg.fid.extra_dims]:
        try:
            out[dims] = (load_inception(dims, cfg.fid.weights, device), None)
        except MissingWeightsError as e:
            out[dims] = (None, e)
    return out, "inception"


class _AtInputSize(nn.Module):
    """An encoder fed at its own input side: images are read at the generation resolution for every
    extractor (one resize path); pytorch-fid's Inception resizes inside, this does the same for others."""

    def __init__(self, module: nn.Module, size: int):
        super().__init__()
        self.module, self.size = module, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, 3, H, W) in [0, 1]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.module(x)


def run(cfg, *, extractor: nn.Module | None = None, image_size: int | None = None, _remote: bool | None = None) -> dict:
    """Compute fid.parquet and memorization.parquet. `extractor` replaces pytorch-fid's Inception (tests use
    a small feature extractor; then only fid.dims is computed) and `image_size` the generation resolution
    images are read at; the stage itself always uses Inception.
    `_remote` (None = decide) runs the stage in a Ray task with one GPU when this process has none."""
    if extractor is None and (_remote if _remote is not None else _gpu_elsewhere(cfg)):
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        logs.say(f"[fid] computing in a Ray task with {gpus} GPU(s) (this process has no CUDA).")
        task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=1)(_run_on_worker)
        return ray.get(task.remote(cfg.to_dict()))
    lay = RunLayout(cfg.run_dir)
    manifest = _read_input(lay.manifest, "the manifest", "prepare")
    synth = _read_input(lay.synthetic_manifest, "the synthetic manifest", "generate")
    synth = _with_sources(synth.assign(adjective=synth["adjective"].fillna("").astype(str)), manifest)
    device = _device()
    # One resize path: both sides read at the generation resolution with one filter (synthetic images are
    # already that size); the extractor then resizes both alike to its own input.
    image_size = image_size or cfg.generate_resolution
    channels = cfg.classify.channels
    primary = cfg.fid.dims

    extractors, features = _extractors(cfg, extractor, device)
    primary = next(iter(extractors))
    missing = extractors[primary][1]
    if missing is not None:
        logs.say(f"[fid] FID/KID cannot be computed: {missing.reason}.\n[fid] Rows are written with fid/kid null "
                 f"and status 'missing_weights'; the report says so. Rerun `python -m meddap fid` once the "
                 f"weights are in place.")
    reader = functools.partial(_reader, channels=channels)
    caches = {d: (_FeatureCache(ex, cfg.fid.batch_size, image_size, device, reader) if ex is not None else None)
              for d, (ex, _) in extractors.items()}

    groups = [(int(f), str(a)) for f, a in synth[["fold", "adjective"]].drop_duplicates().itertuples(index=False)]
    groups = sorted(groups)
    current = {(f, a): _made_from(_real_training(manifest, f), synth[(synth["fold"] == f) & (synth["adjective"] == a)])
               for f, a in groups}
    settings = {d: _settings(cfg.fid, image_size, features if ex is not None else "none", d, channels)
                for d, (ex, _) in extractors.items()}
    kept, kept_mem, done = _finished_groups(lay, settings, current, primary)
    todo = [(f, a, d) for f, a in groups for d in extractors if (f, a, d) not in done]
    if done:
        logs.say(f"[fid] {len(done)} of {len(groups) * len(extractors)} (synthetic set, dims) already done; "
                 f"computing {len(todo)}.")
    paths: set = set()
    for fold, adj, dims in todo:
        if caches[dims] is not None:
            paths.update(_real_training(manifest, fold)["path"])
            paths.update(synth[(synth["fold"] == fold) & (synth["adjective"] == adj)]["path"])
    n_passes = sum(c is not None for c in caches.values())
    progress = Progress(len(paths) * n_passes, "fid features", "images") if paths else None

    rows, mems = [kept], [kept_mem]
    for fold, adj, dims in todo:
        real_df = _real_training(manifest, fold).reset_index(drop=True)
        synth_df = synth[(synth["fold"] == fold) & (synth["adjective"] == adj)].reset_index(drop=True)
        group_rows, mem = _group_rows(fold, adj, dims, real_df, synth_df, list(cfg.data.classes), cfg.fid,
                                      caches[dims], extractors[dims][1], progress, memorize=dims == primary,
                                      features=features)
        rows.append(pd.DataFrame(group_rows, columns=FID_COLUMNS).assign(settings=settings[dims],
                                                                         made_from=current[(fold, adj)]))
        mems.append(mem)
        _write(lay, rows, mems)   # after every set, so a crash loses no finished set
        overall = group_rows[-1]
        if extractors[dims][1] is None:  # no load error; with missing weights every set would say the same (said once, above)
            shown = (f"fid={overall['fid']:.3f} kid={overall['kid']:.4f} (N={overall['n_real']} each)"
                     if overall["fid"] is not None else "not computed: " + overall["status"].split(":")[0])
            logs.say(f"[fid] {adapter_name(fold)} adjective={adj or '(none)'} dims={dims}: {shown}")
    if not todo:
        _write(lay, rows, mems)
    n_flagged = int(sum(int(m["flagged"].sum()) for m in mems if len(m)))
    fidelity = score_fidelity(cfg, synth, device) if cfg.fid.judge else None
    return {"groups": len(groups), "computed": len({(f, a) for f, a, _ in todo}), "missing_weights": missing is not None,
            "flagged": n_flagged, "fidelity": fidelity}


def score_fidelity(cfg, synth: pd.DataFrame, device: str = "cpu") -> float | None:
    """The reference judge's class of every synthetic image -> summary/fidelity.parquet (FIDELITY_COLUMNS).
    Prints and returns the mean no-adjective fidelity over classes (None when there is no such prompt)."""
    from meddap.classify.judge import fidelity_summary, judge_predict, load_judge
    from meddap.diffusion.base import base_model_judge_dir

    judge = load_judge(base_model_judge_dir(cfg.diffusion.base_model, "fid.judge"), key="fid.judge").to(device)
    unknown = sorted(set(synth["class_name"]) - set(judge.classes))
    if unknown:
        raise MeddapError(f"fid.judge = {cfg.fid.judge!r} knows the classes {judge.classes}, not {unknown}: it judges "
                          "phantom images only. Set fid.judge=null for other data.")
    grey = np.stack([_reader(p, judge.image_size) for p in synth["path"]]) if len(synth) else \
        np.zeros((0, judge.image_size, judge.image_size), np.uint8)
    probs = judge_predict(judge, grey, probabilities=True)                          # (N, classes)
    predicted = np.asarray(judge.classes, dtype=object)[probs.argmax(1)] if len(synth) else np.zeros(0, object)
    df = pd.DataFrame({
        "image_id": synth["image_id"].astype(str).to_numpy(), "fold": synth["fold"].astype("int64").to_numpy(),
        "adjective": synth["adjective"].astype(str).to_numpy(), "class_name": synth["class_name"].astype(str).to_numpy(),
        "predicted": predicted.astype(str), "correct": synth["class_name"].to_numpy() == predicted,
        "confidence": probs.max(1) if len(synth) else np.zeros(0),
        # of the full-resolution synthetic image as read for every consumer (grey, 0..255)
        "mean_intensity": [float(_reader(p, None).mean()) for p in synth["path"]],
        "judge": cfg.fid.judge,
    }, columns=FIDELITY_COLUMNS)
    storage.write_parquet(df.astype({"correct": "bool"}), RunLayout(cfg.run_dir).summary("fidelity"))
    if not len(df):
        return None
    summary = fidelity_summary(df)
    plain = summary[(summary["adjective"] == "") & (summary["class_name"] == "all")]
    for adj, g in summary.groupby("adjective"):
        per_class = ", ".join(f"{r.class_name} {r.fidelity:.0%}" for r in g.itertuples() if r.class_name != "all")
        overall = g[g["class_name"] == "all"]["fidelity"].iloc[0]
        logs.say(f"[fid] label fidelity ({cfg.fid.judge}) adjective={adj or '(none)'}: {overall:.0%} ({per_class})")
    return float(plain["fidelity"].iloc[0]) if len(plain) else None
