"""`python -m meddap fid`: FID / KID of every synthetic set against its fold's real training images,
and a memorisation check (nearest real training image of each synthetic image).

For each (fold or shared adapter, adjective) in the synthetic manifest, every generated image (the
largest ratio's set; smaller ratios are its prefixes) is compared with the real training images of the
same fold (fold k's training images are the train rows with fold != k; a shared adapter, fold -1, saw
every train row), per class and over all classes ("all"). Outputs:
  summary/fid.parquet           fold, adjective, class_name, fid, kid, kid_std, features, dims, n_real, n_synthetic,
                                status, settings (what the numbers were made with: a rerun keeps only matching sets)
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

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from meddap import storage
from meddap.errors import MeddapError
from meddap.fid import (
    INCEPTION_INPUT_SIZE,
    MissingWeightsError,
    build_feature_extractor,
    extract_features,
    fid_from_features,
    kernel_inception_distance,
    memorization,
)
from meddap.layout import RunLayout, adapter_name
from meddap.progress import Progress

__all__ = ["run", "fid_for_sets", "score_fidelity", "FID_COLUMNS", "MEMORIZATION_COLUMNS", "FIDELITY_COLUMNS"]

FID_COLUMNS = ["fold", "adjective", "class_name", "fid", "kid", "kid_std", "features", "dims", "n_real", "n_synthetic",
               "status"]
MEMORIZATION_COLUMNS = ["image_id", "fold", "adjective", "class_name", "nearest_real_id", "nearest_real_class",
                        "distance", "reference_distance", "threshold_distance", "flagged", "features", "dims"]
FIDELITY_COLUMNS = ["image_id", "fold", "adjective", "class_name", "predicted", "correct", "confidence",
                    "mean_intensity", "judge"]
ALL_CLASSES = "all"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reader(path: str, size: int) -> np.ndarray:
    from meddap.data.decode import read_grey

    # Synthetic images live under run_dir, which may be an object store.
    return read_grey(storage.local_path(path), size)


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


def _distances(real: np.ndarray, synth: np.ndarray, cfg_fid) -> dict:
    """fid / kid / kid_std of two feature sets, or a status saying why not."""
    n_real, n_synth = len(real), len(synth)
    if n_real < 2 or n_synth < 2:
        return {"fid": None, "kid": None, "kid_std": None,
                "status": f"too_few_images: n_real={n_real}, n_synthetic={n_synth} (need >= 2 each)"}
    kid, kid_std = kernel_inception_distance(real, synth, cfg_fid.kid_subset_size, cfg_fid.kid_subsets,
                                             seed=cfg_fid.seed)
    return {"fid": fid_from_features(real, synth, method=cfg_fid.method), "kid": kid,
            "kid_std": None if np.isnan(kid_std) else kid_std, "status": "ok"}


def fid_for_sets(real_paths: Sequence[str], synth_paths: Sequence[str], cfg_fid, device: str | None = None,
                 extractor: nn.Module | None = None, image_size: int = INCEPTION_INPUT_SIZE) -> dict:
    """FID and KID between two lists of image files (the rank selection's call).

    Returns {fid, kid, kid_std, dims, n_real, n_synthetic, status}; fid/kid are None and status is
    "missing_weights: ..." when pytorch-fid's Inception weights are absent (and `extractor` is None).
    """
    device = device or _device()
    out = {"features": type(extractor).__name__ if extractor is not None else cfg_fid.features, "dims": cfg_fid.dims,
           "n_real": len(real_paths), "n_synthetic": len(synth_paths)}
    if extractor is None:
        try:
            fe = build_feature_extractor(cfg_fid, device)
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


def _group_rows(fold: int, adjective: str, real_df: pd.DataFrame, synth_df: pd.DataFrame, classes: list[str],
                cfg_fid, cache: _FeatureCache | None, missing: MissingWeightsError | None,
                progress: Progress | None, features: str = "inception",
                dims: int | None = None) -> tuple[list[dict], pd.DataFrame]:
    """fid.parquet rows (one per class and 'all') and memorisation rows of one synthetic set; every row
    names the extractor (`features`) and its `dims`."""
    rows: list[dict] = []
    mem = pd.DataFrame(columns=MEMORIZATION_COLUMNS)
    real_feats = synth_feats = None
    dims = cfg_fid.dims if dims is None else dims
    if cache is not None:
        real_feats = cache.get(real_df["path"].tolist(), progress)      # (Nr, D)
        synth_feats = cache.get(synth_df["path"].tolist(), progress)    # (Ns, D)
        dims = int(real_feats.shape[1]) if real_feats.size else dims
    for cls in [*classes, ALL_CLASSES]:
        r_mask = np.ones(len(real_df), bool) if cls == ALL_CLASSES else (real_df["class_name"] == cls).to_numpy()
        s_mask = np.ones(len(synth_df), bool) if cls == ALL_CLASSES else (synth_df["class_name"] == cls).to_numpy()
        row = {"fold": fold, "adjective": adjective, "class_name": cls, "features": features, "dims": dims,
               "n_real": int(r_mask.sum()), "n_synthetic": int(s_mask.sum())}
        if missing is not None:
            row.update(fid=None, kid=None, kid_std=None, status=missing.status)
        else:
            row.update(_distances(real_feats[r_mask], synth_feats[s_mask], cfg_fid))
        rows.append(row)
    if cache is not None and len(real_df) >= 2 and len(synth_df):
        m = memorization(synth_feats, real_feats, cfg_fid.memorization_threshold)
        nearest = real_df.iloc[m["nearest"]]
        mem = pd.DataFrame({
            "image_id": synth_df["image_id"].astype(str).to_numpy(), "fold": fold, "adjective": adjective,
            "class_name": synth_df["class_name"].to_numpy(),
            "nearest_real_id": nearest["image_id"].astype(str).to_numpy(),
            "nearest_real_class": nearest["class_name"].to_numpy(),
            "distance": m["distance"], "reference_distance": m["reference"],
            "threshold_distance": m["threshold_distance"], "flagged": m["flagged"], "features": features, "dims": dims,
        })
    return rows, mem


def _settings(cfg_fid, image_size: int, extractor_name: str) -> str:
    """Everything that changes a row's numbers: a kept row must have been made with the same."""
    return (f"{extractor_name};dims={cfg_fid.dims};size={image_size};method={cfg_fid.method};"
            f"kid={cfg_fid.kid_subset_size}x{cfg_fid.kid_subsets};seed={cfg_fid.seed};"
            f"memorization_threshold={cfg_fid.memorization_threshold}")


def _finished_groups(lay: RunLayout, settings: str, current: dict) -> tuple[pd.DataFrame, pd.DataFrame, set]:
    """Rows of earlier runs worth keeping: sets computed (not missing weights) with the same settings and
    the same image counts as now (`current`: (fold, adjective) -> (n_real, n_synthetic))."""
    if not storage.exists(lay.summary("fid")):
        return pd.DataFrame(columns=FID_COLUMNS), pd.DataFrame(columns=MEMORIZATION_COLUMNS), set()
    old = storage.read_parquet(lay.summary("fid"))
    old_mem = (storage.read_parquet(lay.summary("memorization")) if storage.exists(lay.summary("memorization"))
               else pd.DataFrame(columns=MEMORIZATION_COLUMNS))
    if "settings" not in old.columns:
        return pd.DataFrame(columns=FID_COLUMNS), pd.DataFrame(columns=MEMORIZATION_COLUMNS), set()
    done = set()
    for (fold, adj), g in old.groupby(["fold", "adjective"]):
        key = (int(fold), str(adj))
        overall = g[g["class_name"] == ALL_CLASSES]
        if (key in current and len(overall) == 1 and (g["settings"] == settings).all()
                and not g["status"].str.startswith("missing_weights").any()
                and (int(overall["n_real"].iloc[0]), int(overall["n_synthetic"].iloc[0])) == current[key]):
            done.add(key)
    keep = old[[(int(f), str(a)) in done for f, a in zip(old["fold"], old["adjective"])]]
    keep_mem = old_mem[[(int(f), str(a)) in done for f, a in zip(old_mem["fold"], old_mem["adjective"])]] \
        if len(old_mem) else old_mem
    return keep, keep_mem, done


def _write(lay: RunLayout, rows: list[pd.DataFrame], mems: list[pd.DataFrame]) -> None:
    fid = pd.concat([r for r in rows if len(r)], ignore_index=True) if any(len(r) for r in rows) \
        else pd.DataFrame(columns=FID_COLUMNS)
    mem = pd.concat([m for m in mems if len(m)], ignore_index=True) if any(len(m) for m in mems) \
        else pd.DataFrame(columns=MEMORIZATION_COLUMNS)
    fid = fid.astype({"fid": "float64", "kid": "float64", "kid_std": "float64", "fold": "int64", "dims": "int64",
                      "n_real": "int64", "n_synthetic": "int64", "features": "str"})
    mem = mem.astype({"distance": "float64", "reference_distance": "float64", "threshold_distance": "float64",
                      "flagged": "bool", "fold": "int64", "dims": "int64"})
    storage.write_parquet(fid.sort_values(["fold", "adjective", "class_name"]).reset_index(drop=True),
                          lay.summary("fid"))
    storage.write_parquet(mem.reset_index(drop=True), lay.summary("memorization"))


def _gpu_elsewhere(cfg) -> bool:
    """True when this process has no CUDA but the Ray cluster it runs in (or is told of) has a GPU."""
    if torch.cuda.is_available():
        return False
    import os

    import ray

    if not ray.is_initialized():
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            return False   # no cluster to use: starting a local Ray would not add a GPU
        from meddap.raytools import ensure_ray

        ensure_ray(cfg)
    return ray.cluster_resources().get("GPU", 0) >= 1


def _run_on_worker(cfg_dict: dict) -> dict:
    from meddap.config import Config

    return run(Config.from_dict(cfg_dict), _remote=False)


def run(cfg, *, extractor: nn.Module | None = None, image_size: int | None = None, _remote: bool | None = None) -> dict:
    """Compute fid.parquet and memorization.parquet. `extractor`/`image_size` replace pytorch-fid's
    Inception (tests use a small feature extractor); the stage itself always uses Inception.
    `_remote` (None = decide) runs the stage in a Ray task with one GPU when this process has none."""
    if extractor is None and (_remote if _remote is not None else _gpu_elsewhere(cfg)):
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        print(f"[fid] computing in a Ray task with {gpus} GPU(s) (this process has no CUDA).", flush=True)
        task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=1)(_run_on_worker)
        return ray.get(task.remote(cfg.to_dict()))
    lay = RunLayout(cfg.run_dir)
    manifest = _read_input(lay.manifest, "the manifest", "prepare")
    synth = _read_input(lay.synthetic_manifest, "the synthetic manifest", "generate")
    synth = synth.assign(adjective=synth["adjective"].fillna("").astype(str))
    device = _device()

    missing: MissingWeightsError | None = None
    features, dims = (type(extractor).__name__, None) if extractor is not None else (cfg.fid.features, cfg.fid.dims)
    if extractor is None:
        try:
            fe = build_feature_extractor(cfg.fid, device)
            extractor, image_size, features, dims = fe.module, fe.image_size, fe.name, fe.dims
            print(f"[fid] features: {fe.label}, images read at {fe.image_size} px", flush=True)
        except MissingWeightsError as e:
            missing = e
            print(f"[fid] FID/KID cannot be computed: {e.reason}.\n[fid] Rows are written with fid/kid null and "
                  f"status 'missing_weights'; the report says so. Rerun `python -m meddap fid` once the "
                  f"weights are in place.", flush=True)
    image_size = image_size or INCEPTION_INPUT_SIZE
    cache = None if missing is not None else _FeatureCache(extractor, cfg.fid.batch_size, image_size, device)

    groups = [(int(f), str(a)) for f, a in synth[["fold", "adjective"]].drop_duplicates().itertuples(index=False)]
    groups = sorted(groups)
    current = {(f, a): (len(_real_training(manifest, f)), int(((synth["fold"] == f) & (synth["adjective"] == a)).sum()))
               for f, a in groups}
    settings = _settings(cfg.fid, image_size, features if extractor is not None else "none")
    kept, kept_mem, done = _finished_groups(lay, settings, current)
    todo = [g for g in groups if g not in done]
    if done:
        print(f"[fid] {len(groups) - len(todo)} of {len(groups)} synthetic sets already done; computing {len(todo)}.")
    n_images = 0
    if cache is not None:
        paths = set()
        for fold, adj in todo:
            paths.update(_real_training(manifest, fold)["path"])
            paths.update(synth[(synth["fold"] == fold) & (synth["adjective"] == adj)]["path"])
        n_images = len(paths)
    progress = Progress(n_images, "fid features", "images") if n_images else None

    rows, mems = [kept], [kept_mem]
    for fold, adj in todo:
        real_df = _real_training(manifest, fold).reset_index(drop=True)
        synth_df = synth[(synth["fold"] == fold) & (synth["adjective"] == adj)].reset_index(drop=True)
        group_rows, mem = _group_rows(fold, adj, real_df, synth_df, list(cfg.data.classes), cfg.fid, cache,
                                      missing, progress, features, dims)
        rows.append(pd.DataFrame(group_rows, columns=FID_COLUMNS).assign(settings=settings))
        mems.append(mem)
        _write(lay, rows, mems)   # after every set, so a crash loses no finished set
        overall = group_rows[-1]
        shown = (f"fid={overall['fid']:.3f} kid={overall['kid']:.4f}" if overall["fid"] is not None
                 else "not computed: " + overall["status"].split(":")[0])
        print(f"[fid] {adapter_name(fold)} adjective={adj or '(none)'}: {shown}", flush=True)
    if not todo:
        _write(lay, rows, mems)
    n_flagged = int(sum(int(m["flagged"].sum()) for m in mems if len(m)))
    fidelity = score_fidelity(cfg, synth, device) if cfg.fid.judge else None
    return {"groups": len(groups), "computed": len(todo), "missing_weights": missing is not None,
            "flagged": n_flagged, "fidelity": fidelity}


def score_fidelity(cfg, synth: pd.DataFrame, device: str = "cpu") -> float | None:
    """The reference judge's class of every synthetic image -> summary/fidelity.parquet (FIDELITY_COLUMNS).
    Prints and returns the mean no-adjective fidelity over classes (None when there is no such prompt)."""
    from meddap.classify.judge import fidelity_summary, judge_predict, load_judge
    from meddap.diffusion.base import PHANTOM_DIR

    judge = load_judge(PHANTOM_DIR / "judge", key="fid.judge").to(device)
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
        print(f"[fid] label fidelity ({cfg.fid.judge}) adjective={adj or '(none)'}: {overall:.0%} ({per_class})",
              flush=True)
    return float(plain["fidelity"].iloc[0]) if len(plain) else None
