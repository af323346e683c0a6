"""sweep stage: the classifier grid on Ray Tune.

Grid: classify.models x generate.adjectives x generate.ratios x folds, plus one real-only baseline
(adjective None, ratio 0) per classifier and fold: M x F x (A x R + 1) trials (paper: 3 x 5 x 31 = 465),
times classify.repeats (each repeat with new seeds; all trials of one classifier, fold and repeat start
from the same weights and data-order seed: common random numbers). classify.controls adds equal-budget
control trials (column `augmentation`): `duplicate` per classifier x fold x ratio, `classical` per
classifier x fold x ratio x adjective with a classical twin (meddap.classify.controls; ids end in
`__dup` / `__cls`; real-only and synthetic ids are unchanged).

Label-fidelity gate (generate.filter): every real-only trial of repeat 0 scores its fold's synthetic
images (part `fidelity.parquet`); the real-only trials of generate.filter_judge are the judges. The
sweep then runs in two phases, two Tune experiments: every trial that does not depend on the gate
first, the gated synthetic trials after, each taking `filter_synthetic` of its pool with its fold
judge's scores (summary/fidelity_gate.parquet). A gate that leaves a trial short of its count stops
the sweep before the second phase with every shortfall listed.

How it runs
- The driver reads the manifests, checks that every needed (fold, adjective) has enough synthetic
  images (MeddapError before any training otherwise), and decodes every image any pending trial
  uses ONCE into uint8 arrays that it puts in Ray's object store. Trials read them zero-copy on the
  driver's node (Ray copies them once to any other node), so no trial decodes a file.
- Each trial is a Tune function trainable around `meddap.classify.trial.train_trial`, with
  `classify.cpus_per_trial` CPUs and `classify.gpus_per_trial` GPU (fractions pack several trials on
  one GPU; `auto` = a quarter of a GPU when the cluster has or can add GPUs, see meddap.placement),
  at most `classify.max_concurrent_trials` at once, retried `classify.max_failures` times.
  Once `classify.checkpoint_seconds` have passed since its last checkpoint, a trial reports one at the
  end of an epoch (`ray.tune.report(..., checkpoint=)`), so a retried trial continues from there
  (`ray.tune.get_checkpoint()`).
- Outputs, written by each trial as it finishes under `run_dir/trials/<trial_id>/`:
  `predictions.parquet`, `synthetic_eval.parquet` and `fidelity.parquet` (real-only trials), `model.pt`
  (per classify.save_models; always for the judges while a gate is on), and LAST `trials.parquet`, the
  marker that the trial is done. The driver
  merges these parts into `summary/trials.parquet`, `summary/predictions.parquet` and
  `summary/synthetic_eval.parquet` (atomic rewrites) after every finished trial.

Resume (our choice instead of Tuner.restore, which cannot follow a grid that changed): a new sweep
skips every trial whose `trials.parquet` part exists and was made from the same inputs (its
`made_from` column: sha256 of the classifier settings, the real images and the synthetic images the
trial uses), and runs only the others in a fresh Tune experiment `<storage>/sweep/run-<time>/`; a
trial with a checkpoint made from the same inputs in an earlier experiment
(`<storage>/sweep/*/<trial_id>/checkpoint_*/`) resumes from the latest one. Parts made from other
inputs are removed and their trials run again. Parts are keyed by trial_id and merged from scratch,
so rows are never lost or duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import uuid
from typing import Optional

import pandas as pd

from meddap import logs, storage
from meddap.config import Config
from meddap.errors import MeddapError
from meddap.layout import RunLayout

__all__ = ["run", "build_grid", "grid_size", "check_classifiers", "filter_label", "judge_spec", "fidelity_gate",
           "TRIAL_COLUMNS", "GATE_COLUMNS"]

TRIAL_COLUMNS = ["trial_id", "classifier", "adjective", "ratio", "fold", "eval_set", "accuracy", "sensitivity",
                 "specificity", "precision", "f1", "n_real", "n_synthetic", "best_epoch", "train_seconds",
                 "images_per_second", "n_eval", "confusion", "seed", "epochs", "resumed_from_epoch", "repeat",
                 "made_from", "augmentation", "filter"]
# Per-trial part files; "trials" is written last. "fidelity": a judge's scores of its fold's synthetic
# images, merged into summary/fidelity_gate.parquet with the gate's kept flags.
_PARTS = ("trials", "predictions", "synthetic_eval", "fidelity")
FIDELITY_COLUMNS = ["image_id", "fold", "source_fold", "adjective", "class_name", "label", "index", "fidelity", "judge"]
GATE_COLUMNS = [*FIDELITY_COLUMNS, "filter", "filter_value", "kept"]
_STATE_FILE = "state.pt"
_META_FILE = "meta.json"


def _log(msg: str) -> None:
    logs.say(f"[sweep] {msg}")


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def build_grid(cfg: Config):
    """Every trial of the sweep, fold by fold, a classifier's baseline before its synthetic trials, then
    its control trials (classify.controls): `duplicate` once per ratio (it does not depend on the
    adjective), `classical` per ratio and adjective that has a classical twin (an adjective without one,
    '' or 'stylized', has the duplicate as its control: meddap.classify.controls)."""
    from meddap.classify.controls import classical_name
    from meddap.classify.data import TrialSpec

    controls = cfg.classify.controls
    specs = []
    for repeat in range(cfg.classify.repeats):
        for fold in range(cfg.data.folds):
            for model in cfg.classify.models:
                specs.append(TrialSpec(model, fold, repeat=repeat))
                for adjective in cfg.generate.adjectives:
                    for ratio in cfg.generate.ratios:
                        specs.append(TrialSpec(model, fold, adjective, float(ratio), repeat=repeat))
                for ratio in cfg.generate.ratios:
                    if "duplicate" in controls:
                        specs.append(TrialSpec(model, fold, None, float(ratio), repeat, "duplicate"))
                    if "classical" in controls:
                        specs += [TrialSpec(model, fold, adjective, float(ratio), repeat, "classical")
                                  for adjective in cfg.generate.adjectives if classical_name(adjective)]
    return specs


def grid_size(cfg: Config) -> int:
    return len(build_grid(cfg))


def filter_label(cfg: Config) -> str:
    """How synthetic trials pick their images: 'none', or e.g. 'threshold 0.5' / 'drop_lowest 0.2'."""
    g = cfg.generate
    return "none" if g.filter == "none" else f"{g.filter} {g.filter_value:g}"


def gated(cfg: Config, spec) -> bool:
    """A synthetic trial whose images the label-fidelity gate picks (it waits for its fold's judge)."""
    return cfg.generate.filter != "none" and spec.augmentation == "synthetic"


def judge_spec(cfg: Config, fold: int):
    """The trial whose best model judges fold `fold`'s synthetic images: the real-only trial of
    generate.filter_judge (default: the first classifier), repeat 0 (one gate per fold for every repeat)."""
    from meddap.classify.data import TrialSpec

    return TrialSpec(cfg.filter_judge, fold)


def _is_judge(cfg: Config, spec) -> bool:
    return spec.real_only and spec.repeat == 0 and spec.classifier == cfg.filter_judge


# ---------------------------------------------------------------------------------------------
# Per-trial parts and their merge
# ---------------------------------------------------------------------------------------------
def _part(lay: RunLayout, trial_id: str, name: str) -> str:
    return lay.path("trials", trial_id, f"{name}.parquet")


def _done_trials(lay: RunLayout) -> set[str]:
    marker = os.sep + "trials.parquet"
    return {os.path.basename(os.path.dirname(p)) for p in storage.listdir(lay.path("trials"), recursive=True)
            if p.replace("/", os.sep).endswith(marker)}


# Classifier keys added after trials were first keyed, with the value that behaves as before they existed:
# left there they stay out of the key, so an upgrade does not rerun every finished trial.
_LATER_KEYS = {"classify.precise_bn": False, "classify.precise_bn_images": None}


def _inputs_key(cfg: Config, manifest: pd.DataFrame) -> str:
    """sha256 of what every trial shares: the classifier settings and the real images (ids, pixel
    hashes, splits, folds, labels) it trains and is evaluated on."""
    import hashlib

    from meddap.stages.state import stage_settings

    settings = {k: v for k, v in stage_settings(cfg, "sweep").items()
                if (k.startswith("classify.") or k in ("data.classes", "data.image_size"))
                and not (k in _LATER_KEYS and v == _LATER_KEYS[k])
                and not k.startswith("classify.per_model.")}  # in the keys of that classifier's trials only
    cols = [c for c in ("image_id", "sha256", "split", "fold", "label") if c in manifest.columns]
    real = manifest[cols].astype(str).sort_values("image_id").to_csv(index=False)
    return hashlib.sha256(json.dumps({"settings": settings, "real": real}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def trial_made_from(cfg: Config, spec, manifest: pd.DataFrame, synthetic: Optional[pd.DataFrame],
                    shared_key: str, judge_key: Optional[str] = None) -> str:
    """sha256 of what one trial is made from: `shared_key` (_inputs_key), its grid cell and the
    synthetic images it trains on (ids and generation specs, which hash the adapter's weights) or, for a
    real-only trial, those of its fold it scores (Figure 1a). A control trial: its control rows (real
    source images, transform and seed of each). A gated trial (generate.filter): its whole pool (spares
    included: which images it uses depends on the judge), the filter and the judge (trial id and
    `judge_key`, the judge's own made_from), so changing the filter or the judge's inputs reruns gated
    trials only. Kept with its outputs and checkpoints: a finished trial or a checkpoint made from other
    inputs is never reused."""
    import hashlib

    from meddap.classify.data import control_training_rows, select_training_rows, synthetic_pool

    extra = {}
    if spec.control:
        used = control_training_rows(manifest, spec, cfg.data.classes, cfg.generate.seed)
        rows = sorted(zip(used["image_id"].astype(str), used["source_image_id"].astype(str),
                          used["transform"].astype(str), used["seed"].astype(str)))
    else:
        if synthetic is None:
            used = pd.DataFrame(columns=["image_id", "spec"])
        elif spec.real_only:
            used = synthetic[synthetic["fold"].isin([spec.fold, -1])]
        elif gated(cfg, spec):
            used = synthetic_pool(synthetic, spec.fold, spec.adjective)
            extra = {"filter": [cfg.generate.filter, cfg.generate.filter_value],
                     "judge": [judge_spec(cfg, spec.fold).trial_id, judge_key]}
        else:
            _, used = select_training_rows(manifest, synthetic, spec, cfg.data.classes)
        ident = used["spec"] if "spec" in used else used["path"]
        rows = sorted(zip(used["image_id"].astype(str), ident.astype(str)))
    own = cfg.classify.per_model.get(spec.classifier)
    own = {k: v for k, v in (own.set_fields() if own is not None else {}).items() if v != getattr(cfg.classify, k)}
    if own:  # classify.per_model.<classifier>, where it differs from the shared settings: its trials' own
        extra["settings"] = own
    # Keys only gated trials, or classifiers with their own settings, have: every other trial keeps the key
    # of earlier sweeps.
    blob = json.dumps({"shared": shared_key, "spec": spec.to_dict(), "synthetic": rows, **extra}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def made_from_keys(cfg: Config, specs: list, manifest: pd.DataFrame, synthetic: Optional[pd.DataFrame],
                   shared_key: str) -> dict[str, str]:
    """trial_id -> trial_made_from for `specs`; judges' keys first, since gated trials include them."""
    keys = {s.trial_id: trial_made_from(cfg, s, manifest, synthetic, shared_key) for s in specs if not gated(cfg, s)}
    for s in specs:
        if gated(cfg, s):
            judge = judge_spec(cfg, s.fold)
            judge_key = keys.get(judge.trial_id) or trial_made_from(cfg, judge, manifest, synthetic, shared_key)
            keys[s.trial_id] = trial_made_from(cfg, s, manifest, synthetic, shared_key, judge_key)
    return keys


def _trial_rows(result, made_from: str = "", filter_: str = "none") -> pd.DataFrame:
    spec = result.spec
    rows = []
    for eval_set, m in result.metrics.items():
        rows.append({
            "trial_id": spec.trial_id, "classifier": spec.classifier, "adjective": spec.adjective,
            "ratio": float(spec.ratio), "fold": int(spec.fold), "eval_set": eval_set,
            **{k: float(m[k]) for k in ("accuracy", "sensitivity", "specificity", "precision", "f1")},
            "n_real": result.n_real, "n_synthetic": result.n_synthetic, "best_epoch": result.best_epoch,
            "train_seconds": float(result.train_seconds), "images_per_second": float(result.images_per_second),
            "n_eval": int(m["n"]), "confusion": json.dumps(m["confusion"]), "seed": result.seed,
            "epochs": result.epochs, "resumed_from_epoch": result.resumed_from_epoch, "repeat": int(spec.repeat),
            "made_from": made_from, "augmentation": spec.augmentation,
            "filter": filter_ if spec.augmentation == "synthetic" else "none"})
    return _typed(pd.DataFrame(rows, columns=TRIAL_COLUMNS))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    if "adjective" in df:  # null for real-only; keep a string column even when every row is null
        df["adjective"] = df["adjective"].astype("string")
    if "trial_id" in df and "ratio" in df:  # trials parts of sweeps before controls and the gate lack these
        if "augmentation" not in df:
            df["augmentation"] = None
        derived = df["adjective"].isna().map({True: "none", False: "synthetic"})
        df["augmentation"] = df["augmentation"].where(df["augmentation"].notna(), derived).astype(str)
        df["filter"] = df["filter"].fillna("none").astype(str) if "filter" in df else "none"
    return df


def _fidelity_part(result, images, cfg: Config) -> Optional[pd.DataFrame]:
    """A real-only trial's fidelity scores (meddap.classify.fidelity.prompted_probability) of every
    synthetic image of its fold it scored, with each image's pool (source_fold), class and index; None for
    other trials. Every real-only trial of repeat 0 writes them (a few bytes per image), so choosing another
    generate.filter_judge needs no rerun; the gate uses the judge's."""
    from meddap.classify.data import _pool_key
    from meddap.classify.fidelity import prompted_probability

    spec = result.spec
    if not spec.real_only or spec.repeat != 0 or result.synthetic_predictions is None \
            or result.synthetic_predictions.empty:
        return None
    preds = result.synthetic_predictions
    parts = []
    for eval_set, g in preds.groupby("eval_set", sort=True):
        adjective = eval_set.split(":", 1)[1]
        source = _pool_key(images, spec.fold, adjective)
        info = images.synthetic_rows[source].set_index(images.synthetic_rows[source]["image_id"].astype(str))
        probs = g[[f"prob_{c}" for c in cfg.data.classes]].to_numpy()          # (N, K)
        ids = g["image_id"].astype(str)
        parts.append(pd.DataFrame({
            "image_id": ids.to_numpy(), "fold": spec.fold, "source_fold": int(source[0]), "adjective": adjective,
            "class_name": info.loc[ids, "class_name"].to_numpy(), "label": g["label"].to_numpy(),
            "index": info.loc[ids, "index"].to_numpy(), "fidelity": prompted_probability(probs, g["label"].to_numpy()),
            "judge": spec.trial_id}))
    return pd.concat(parts, ignore_index=True)[FIDELITY_COLUMNS]


def fidelity_gate(fidelity: pd.DataFrame, method: str, value: Optional[float]) -> pd.DataFrame:
    """summary/fidelity_gate.parquet from the judges' fidelity parts: each image's fidelity per judge fold,
    with `kept` = what the gate (`method`, `value`) keeps in its (fold, adjective, class) pool
    (meddap.classify.fidelity.kept_mask; all True for 'none')."""
    from meddap.classify.fidelity import kept_mask

    value = float(value or 0.0)
    if fidelity.empty:
        return pd.DataFrame(columns=GATE_COLUMNS)
    parts = []
    for _, g in fidelity.groupby(["fold", "adjective", "class_name"], sort=True):
        g = g.sort_values("index")
        parts.append(g.assign(filter=method, filter_value=value if method != "none" else float("nan"),
                              kept=kept_mask(g, method, value)))
    return pd.concat(parts, ignore_index=True)[GATE_COLUMNS]


def _write_trial_outputs(cfg: Config, result, made_from: str = "", fidelity: Optional[pd.DataFrame] = None) -> None:
    """Parts of one finished trial; `trials.parquet` last, so its presence means complete."""
    import torch

    lay = RunLayout(cfg.run_dir)
    spec = result.spec
    storage.write_parquet(result.predictions, _part(lay, spec.trial_id, "predictions"))
    if spec.real_only:
        syn = pd.DataFrame([{"trial_id": spec.trial_id, "classifier": spec.classifier, "fold": spec.fold,
                             "adjective": adjective, "accuracy": v["accuracy"], "n": v["n"], "repeat": spec.repeat}
                            for adjective, v in sorted(result.synthetic_eval.items())],
                           columns=["trial_id", "classifier", "fold", "adjective", "accuracy", "n", "repeat"])
        storage.write_parquet(syn, _part(lay, spec.trial_id, "synthetic_eval"))
    if fidelity is not None:
        storage.write_parquet(fidelity, _part(lay, spec.trial_id, "fidelity"))
    keep = cfg.classify.save_models
    # A judge keeps its best weights while a gate is on: its scores can then be checked or recomputed.
    judge = cfg.generate.filter != "none" and _is_judge(cfg, spec)
    if keep == "all" or (keep == "fold0" and spec.fold == 0) or judge:
        with storage.open_output(lay.path("trials", spec.trial_id, "model.pt")) as f:
            torch.save({"state_dict": result.state_dict, "classifier": spec.classifier,
                        "classes": list(cfg.data.classes), "image_size": cfg.classify_image_size,
                        "trial_id": spec.trial_id, "best_epoch": result.best_epoch}, f)
    storage.write_parquet(_trial_rows(result, made_from, filter_label(cfg)), _part(lay, spec.trial_id, "trials"))


class _Summaries:
    """The merged summary files, rebuilt from per-trial parts (the source of truth)."""

    def __init__(self, cfg: Config):
        self.lay = RunLayout(cfg.run_dir)
        self.cfg = cfg
        self.frames: dict[str, dict[str, pd.DataFrame]] = {name: {} for name in _PARTS}
        self.dirty = set(_PARTS)  # summaries to rewrite: a paper grid merges ~870 parts, once per finished trial

    def add(self, trial_id: str, made_from: Optional[str] = None) -> bool:
        """Load a finished trial's parts; False when it has not finished (no trials part) or, given
        `made_from`, when its parts were made from other inputs."""
        if not storage.exists(_part(self.lay, trial_id, "trials")):
            return False
        if made_from is not None:
            try:
                part = storage.read_parquet(_part(self.lay, trial_id, "trials"))
            except (OSError, ValueError):  # cut short or corrupt: not finished
                return False
            if "made_from" not in part or not (part["made_from"] == made_from).all():
                return False
        for name in _PARTS:
            path = _part(self.lay, trial_id, name)
            if storage.exists(path):
                self.frames[name][trial_id] = storage.read_parquet(path)
                self.dirty.add(name)
        return True

    def drop(self, trial_id: str) -> None:
        for name in _PARTS:
            if self.frames[name].pop(trial_id, None) is not None:
                self.dirty.add(name)

    def write(self) -> None:
        for name in _PARTS:
            parts = [self.frames[name][t] for t in sorted(self.frames[name])]
            if not parts or name not in self.dirty:
                continue
            if name == "fidelity":
                g = self.cfg.generate
                storage.write_parquet(fidelity_gate(self.fidelity, g.filter, g.filter_value),
                                      self.lay.summary("fidelity_gate"))
            else:
                storage.write_parquet(_typed(pd.concat(parts, ignore_index=True)), self.lay.summary(name))
        self.dirty.clear()

    @property
    def fidelity(self) -> pd.DataFrame:
        """The judges' scores: of each fold, those of generate.filter_judge's real-only trial (repeat 0)."""
        judges = {judge_spec(self.cfg, k).trial_id for k in range(self.cfg.data.folds)}
        parts = [self.frames["fidelity"][t] for t in sorted(self.frames["fidelity"]) if t in judges]
        return _typed(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame(columns=FIDELITY_COLUMNS)

    @property
    def trials(self) -> pd.DataFrame:
        parts = list(self.frames["trials"].values())
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TRIAL_COLUMNS)

    def best_line(self) -> str:
        val = self.trials
        val = val[val["eval_set"] == "val"]
        if val.empty:
            return "best so far: -"
        row = val.sort_values(["accuracy", "trial_id"], ascending=[False, True]).iloc[0]
        return f"best so far (val accuracy): {row['trial_id']} {row['accuracy']:.3f}"


# ---------------------------------------------------------------------------------------------
# Checkpoints from earlier sweeps
# ---------------------------------------------------------------------------------------------
def _tune_root(cfg: Config) -> str:
    base = cfg.ray.storage_path or RunLayout(cfg.run_dir).ray_storage
    if not storage.is_uri(base):
        base = os.path.abspath(base)  # Tune wants an absolute path or a URI
    return storage.join(base, "sweep")


def _drop_checkpoints(root: str, trial_id: str) -> None:
    """Delete a finished trial's checkpoints in every experiment: its results are in its parts now, and
    a paper-size grid would otherwise keep ~465 x (model + optimizer + best weights)."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(root)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return
    for exp in fs.get_file_info(pafs.FileSelector(base)):
        if exp.type != pafs.FileType.Directory:
            continue
        trial_dir = exp.path.rstrip("/") + "/" + trial_id
        if fs.get_file_info(trial_dir).type != pafs.FileType.Directory:
            continue
        for item in fs.get_file_info(pafs.FileSelector(trial_dir)):
            if item.type == pafs.FileType.Directory and item.base_name.startswith("checkpoint_"):
                fs.delete_dir(item.path)


def _earlier_checkpoints(root: str, made_from: dict[str, str]) -> dict[str, str]:
    """trial_id -> directory of its latest checkpoint (highest epoch) in any earlier experiment, among
    checkpoints made from the trial's current inputs (`made_from`: trial_id -> key)."""
    best: dict[str, tuple[int, str]] = {}
    for path in storage.listdir(root, recursive=True):
        if not path.endswith("/" + _META_FILE) and not path.endswith(os.sep + _META_FILE):
            continue
        try:
            meta = json.loads(storage.read_text(path))
        except (OSError, ValueError):
            continue  # a checkpoint cut off while being written: ignore it, an older one will do
        ckpt_dir = path[: -len(_META_FILE) - 1]
        if not storage.exists(storage.join(ckpt_dir, _STATE_FILE)):
            continue
        tid, epoch = meta.get("trial_id"), int(meta.get("epoch", -1))
        if tid not in made_from or meta.get("made_from") != made_from[tid]:
            continue  # another grid's trial, or made from other images or settings
        if epoch > best.get(tid, (-1, ""))[0]:
            best[tid] = (epoch, ckpt_dir)
    return {tid: d for tid, (_, d) in best.items()}


# ---------------------------------------------------------------------------------------------
# The Tune trainable (runs in a Ray worker)
# ---------------------------------------------------------------------------------------------
def _load_state(checkpoint, trial_id: str) -> Optional[dict]:
    """The training state in `checkpoint` (tensors and plain data: weights_only), or None when it cannot
    be read (cut short by a crash or a full disk): the trial then starts over rather than fail."""
    import torch

    try:
        with checkpoint.as_directory() as d:
            return torch.load(os.path.join(d, _STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means the same: start over
        _log(f"{trial_id}: checkpoint {checkpoint.path} is unreadable ({type(e).__name__}: {e}); starting this "
             f"trial from its first epoch")
        return None


def _trainable(config: dict, shared: dict) -> None:
    import ray
    import torch
    from ray import tune

    from meddap.classify.data import TrialSpec
    from meddap.device import compute_device

    cfg = Config.from_dict(shared["cfg"])
    spec = TrialSpec.from_dict(config["trial"])
    made_from = config["trial"].get("made_from", "")
    lay = RunLayout(cfg.run_dir)
    if storage.exists(_part(lay, spec.trial_id, "trials")):  # finished before a retry: nothing to redo
        tune.report({"done": 1})
        return
    c = cfg.classify
    torch.set_num_threads(c.threads_per_trial or max(1, int(c.cpus_per_trial)))
    # shared["gpus_per_trial"]: classify.gpus_per_trial resolved on the driver; > 0 means Ray gave this
    # trial (a share of) a GPU. MEDDAP_DEVICE=cpu computes on the CPU anyway (tests).
    device = compute_device(shared["gpus_per_trial"] > 0, "classifier trial")

    checkpoint = tune.get_checkpoint()  # a retry inside this sweep
    resume_from = config["trial"].get("resume_from")
    if checkpoint is None and resume_from:  # a checkpoint left by an earlier sweep
        fs, fs_path = storage.filesystem(resume_from)  # s3:// run dirs: the endpoint from AWS_ENDPOINT_URL
        checkpoint = tune.Checkpoint(fs_path, filesystem=fs)
    state = _load_state(checkpoint, spec.trial_id) if checkpoint is not None else None

    fail_at = shared.get("fail_after_epoch", {}).get(spec.trial_id)

    def report(epoch: int, metrics: dict, ckpt_state: Optional[dict]) -> None:
        if ckpt_state is None:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(ckpt_state, os.path.join(d, _STATE_FILE))
                with open(os.path.join(d, _META_FILE), "w") as f:
                    json.dump({"trial_id": spec.trial_id, "epoch": epoch, "made_from": made_from}, f)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        if fail_at is not None and epoch == fail_at:  # test hook: a node lost mid-trial
            raise RuntimeError(f"injected failure in {spec.trial_id} after epoch {epoch}")

    result = run_trial(cfg, spec, shared["images"], made_from, device, state, report, get=ray.get)
    tune.report({"done": 1, "val_accuracy": result.metrics["val"]["accuracy"],
                 "test_accuracy": result.metrics["test"]["accuracy"] if "test" in result.metrics else float("nan")})


def run_trial(cfg: Config, spec, images, made_from: str, device, state: Optional[dict] = None, report=None,
              get=lambda x: x):
    """One trial from the sweep's decoded images to its parts on disk (the Tune trainable's body; no Ray
    here: `get` resolves object refs)."""
    from meddap.classify.data import trial_tensors
    from meddap.classify.trial import train_trial

    tensors = trial_tensors(images, spec, get=get)
    result = train_trial(spec, tensors, cfg.classify, cfg.data.classes, device, checkpoint=state, report=report)
    _write_trial_outputs(cfg, result, made_from, _fidelity_part(result, images, cfg))
    return result


def _error_line(trial) -> str:
    """The last line of a failed trial's error (its cause), or where Tune filed it."""
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # an unreadable error file must not stop the sweep's bookkeeping
        err = None
    lines = [ln for ln in str(err or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"see {trial.error_file or trial.path}"


class _TuneInterruptNoise:
    """Drops Ray Tune's log lines about an interrupt: its `Tuner.restore(...)` advice is wrong for a
    meddap user (rerunning the command resumes; trials are parts, not a Tune experiment), and its
    "Could not fetch metrics" lines for trials that never started buried the resume line (~33 lines)."""

    _NOISE = ("Tuner.restore(", "fetch metrics", "Stop signal received", "Wrote the latest version of all result")
    _LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self._NOISE)

    def __enter__(self):
        import logging

        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        import logging

        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _progress_callback(summaries: _Summaries, total: int, already: int, root: str, max_failures: int):
    from ray.tune import Callback

    from meddap.progress import Progress

    class _SweepProgress(Callback):
        def __init__(self):
            self.progress = Progress(total, "sweep", "trials", initial=already)
            self.failed: list[str] = []
            self.running: set[str] = set()
            self.interrupted = False

        def setup(self, **info):
            # Tune has just installed its Ctrl-C handler (it stops the experiment and returns normally);
            # wrap it so the stage can tell an interrupted sweep from one whose trials failed.
            if threading.current_thread() is not threading.main_thread():
                return
            tune_handler = signal.getsignal(signal.SIGINT)
            if not callable(tune_handler):
                return

            def _interrupt(signum, frame):
                self.interrupted = True
                tune_handler(signum, frame)

            signal.signal(signal.SIGINT, _interrupt)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.config["trial"]["trial_id"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["trial_id"]
            self.running.discard(tid)
            if summaries.add(tid, trial.config["trial"].get("made_from")):
                summaries.write()
                _drop_checkpoints(root, tid)
                self.progress.update(1, f"{len(self.running)} running, {len(self.failed)} failed | "
                                        f"{summaries.best_line()}")

        def on_trial_recover(self, iteration, trials, trial, **info):
            _log(f"trial {trial.config['trial']['trial_id']} failed and is retried from its last checkpoint "
                 f"(classify.max_failures={max_failures}): {_error_line(trial)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["trial_id"]
            self.running.discard(tid)
            self.failed.append(tid)
            _log(f"FAILED {tid}: {_error_line(trial)}")

    return _SweepProgress()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def _read_inputs(cfg: Config) -> tuple[pd.DataFrame, Optional[pd.DataFrame]]:
    lay = RunLayout(cfg.run_dir)
    if not storage.exists(lay.manifest):
        raise MeddapError(f"no manifest at {lay.manifest}: run `python -m meddap prepare` first.")
    manifest = storage.read_parquet(lay.manifest)
    synthetic = storage.read_parquet(lay.synthetic_manifest) if storage.exists(lay.synthetic_manifest) else None
    if synthetic is None:
        raise MeddapError(f"no synthetic manifest at {lay.synthetic_manifest}: the grid's synthetic trials need "
                          f"it; run `python -m meddap generate` first.")
    synthetic["adjective"] = synthetic["adjective"].fillna("").astype(str)
    return manifest, synthetic


def check_classifiers(cfg: Config, weights: bool = True) -> None:
    """MeddapError for a repeated or unknown name in classify.models and, with `weights` and
    classify.pretrained=imagenet, for ImageNet weights that cannot be loaded. `run` (the pipeline)
    calls it before fine-tuning, so a typo does not surface only after hours of finetune and generate."""
    from meddap.classify.models import build_classifier, check_classifier_name

    repeated = sorted({m for m in cfg.classify.models if cfg.classify.models.count(m) > 1})
    if repeated:  # one trial id per (classifier, adjective, ratio, fold): a repeat would run it twice
        raise MeddapError(f"classify.models = {cfg.classify.models} lists {', '.join(repeated)} more than once; "
                          f"list each classifier once.")
    for name in cfg.classify.models:  # MeddapError with the closest names
        check_classifier_name(name)
    for name in cfg.classify.per_model:  # a typo there would leave its settings silently unused
        check_classifier_name(name, "classify.per_model")
    if weights and cfg.classify.pretrained == "imagenet":
        for model in cfg.classify.models:
            build_classifier(model, len(cfg.data.classes), "imagenet", cfg.classify.weights_dir)


def resolve_gpus(cfg: Config) -> float:
    """classify.gpus_per_trial for the cluster this process is connected to (meddap.placement)."""
    from meddap.config import AUTO_GPUS_PER_TRIAL
    from meddap.placement import gpu_outlook, resolve_gpus_per_trial

    outlook = gpu_outlook(cfg)
    gpus = resolve_gpus_per_trial(cfg.classify.gpus_per_trial, outlook, AUTO_GPUS_PER_TRIAL)
    _log(f"classify.gpus_per_trial={cfg.classify.gpus_per_trial}: each trial asks for "
         f"{f'{gpus:g} GPU' if gpus else 'CPUs only'} ({outlook})")
    return gpus


_LOST = ("ActorDiedError", "NodeDiedError", "ActorUnavailableError", "node has died", "node was terminated",
         "WorkerCrashedError", "OwnerDiedError")


def _lost_with_its_node(error: Optional[str]) -> bool:
    """True for a trial that failed because its worker process or node went away (or with no error
    recorded, as Tune leaves a trial that died while being placed), not because its code raised."""
    return not error or any(k in error for k in _LOST)


def _tune_round(cfg: Config, specs: list, keys: dict, images, summaries: "_Summaries", total: int, already: int,
                root: str, gpus: float, fail_after_epoch: Optional[dict]):
    """One Tune experiment over `specs`; returns (progress callback, experiment name, {trial_id: error})."""
    from ray import tune

    from meddap.raytools import keep_sigint_handler

    earlier = _earlier_checkpoints(root, {s.trial_id: keys[s.trial_id] for s in specs})
    resumed = [s.trial_id for s in specs if s.trial_id in earlier]
    if resumed:
        _log(f"{len(resumed)} unfinished trials resume from their checkpoints: {', '.join(resumed[:5])}"
             f"{' ...' if len(resumed) > 5 else ''}")
    param_space = {"trial": tune.grid_search([{**s.to_dict(), "resume_from": earlier.get(s.trial_id),
                                               "made_from": keys[s.trial_id]} for s in specs])}
    shared = {"cfg": cfg.to_dict(), "images": images, "fail_after_epoch": dict(fail_after_epoch or {}),
              "gpus_per_trial": gpus}
    c = cfg.classify
    trainable = tune.with_resources(tune.with_parameters(_trainable, shared=shared),
                                    {"cpu": c.cpus_per_trial, "gpu": gpus})
    name = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    progress = _progress_callback(summaries, total, already, root, c.max_failures)
    # Checkpoints every few epochs force experiment snapshots; Tune's warning about that is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    fs, fs_path = storage.filesystem(root)  # the same filesystem (and S3 endpoint) as meddap.storage
    storage.makedirs(root)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=c.max_concurrent_trials,
            reuse_actors=True,  # a new trial skips the worker start and torch import (seconds per trial)
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=fs_path, storage_filesystem=fs, verbose=0, callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=c.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    with keep_sigint_handler(), _TuneInterruptNoise():  # Tune leaves its handler installed after fit()
        grid = tuner.fit()
    errors = {}
    for r in grid:
        if r.error is not None:
            lines = [ln for ln in str(r.error).strip().splitlines() if ln.strip()]
            errors[r.config["trial"]["trial_id"]] = lines[-1] if lines else type(r.error).__name__
    return progress, name, errors


def _connect(cfg: Config, images) -> float:
    """Join or start Ray, put the decoded arrays in its object store; returns classify.gpus_per_trial resolved."""
    import ray

    from meddap.raytools import ensure_ray

    ensure_ray(cfg)
    gpus = resolve_gpus(cfg)
    images.real_images = ray.put(images.real_images)
    images.synthetic_images = {k: ray.put(v) for k, v in images.synthetic_images.items()}
    return gpus


def _run_rounds(cfg: Config, pending: list, keys: dict, images, summaries: "_Summaries", total: int, root: str,
                gpus: float, fail_after_epoch: Optional[dict]):
    """Tune experiments over `pending` until every trial finished, one failed on its own, the sweep was
    interrupted or classify.max_failures extra rounds for lost nodes are spent. Returns (unfinished specs,
    errors by trial id, the last progress callback, the last experiment name)."""
    c = cfg.classify
    errors, rounds = {}, 1 + c.max_failures
    for round_no in range(1, rounds + 1):
        progress, name, round_errors = _tune_round(cfg, pending, keys, images, summaries, total,
                                                   len(summaries.frames["trials"]), root, gpus, fail_after_epoch)
        errors.update(round_errors)
        # Trials that finished in a worker whose completion the driver missed are still picked up here.
        for s in pending:
            if summaries.add(s.trial_id, keys[s.trial_id]):
                _drop_checkpoints(root, s.trial_id)
        summaries.write()
        finished = set(summaries.frames["trials"])
        pending = [s for s in pending if s.trial_id not in finished]
        if not pending or progress.interrupted or round_no == rounds:
            break
        lost = [s.trial_id for s in pending if _lost_with_its_node(errors.get(s.trial_id))]
        if len(lost) < len(pending):
            break  # a trial failed on its own (its code raised): another round would fail the same way
        # Tune retries a failed RUNNING trial itself, but not one whose worker or node was lost while it
        # was being placed (PENDING); a lost node must not fail the sweep while the cluster has others.
        _log(f"{len(lost)} trial(s) lost their worker or node ({', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}); "
             f"running them again from their checkpoints (round {round_no + 1} of at most {rounds}, "
             f"classify.max_failures={c.max_failures})")
    return pending, errors, progress, name


def _set_gate(cfg: Config, images, gated_specs: list, fidelity: pd.DataFrame) -> None:
    """Give `images` each gated (fold, adjective)'s pool with the fold judge's fidelity, after checking
    that the gate leaves every gated trial its full count. MeddapError listing every shortfall (never a
    silently smaller set): the judges' results stay on disk, so a rerun with more spares or a milder
    filter only runs the gated trials."""
    from meddap.classify.data import _pool_key, _real_train_rows, _synthetic_counts
    from meddap.classify.fidelity import filter_synthetic

    method, value = cfg.generate.filter, float(cfg.generate.filter_value)
    images.gate_filter = (method, value)
    gate, short = {}, []
    for spec in gated_specs:
        cell = (spec.fold, spec.adjective)
        if cell not in gate:
            pool = images.synthetic_rows[_pool_key(images, spec.fold, spec.adjective)]
            scores = fidelity[(fidelity["fold"] == spec.fold) & (fidelity["adjective"] == spec.adjective)]
            gate[cell] = pool.merge(scores[["image_id", "fidelity"]].astype({"image_id": str}),
                                    how="left", on="image_id")
        real = _real_train_rows(images.real_rows, spec.fold)
        need = {cfg.data.classes[c]: n for c, n in _synthetic_counts(real, spec.ratio, len(cfg.data.classes)).items()}
        try:
            filter_synthetic(gate[cell], need, method, value)
        except MeddapError as e:
            short.append(f"{spec.trial_id}: {e}")
    if short:
        raise MeddapError(
            f"the label-fidelity gate (generate.filter={method}, filter_value={value:g}, judge "
            f"{cfg.filter_judge}) leaves {len(short)} gated trial(s) short of their ratio's images, so they were not "
            f"run (the real-only judges and the other trials are kept; their fidelity is in "
            f"{RunLayout(cfg.run_dir).summary('fidelity_gate')}):\n  " + "\n  ".join(short[:10])
            + ("\n  ..." if len(short) > 10 else "")
            + "\nRaise generate.filter_overgenerate (then rerun generate, which adds only spares) or relax "
              "generate.filter_value, then rerun the sweep.")
    images.gate = gate


def run(cfg: Config, *, _fail_after_epoch: Optional[dict] = None) -> dict:
    """Run every grid trial not finished yet; returns counts. `_fail_after_epoch` ({trial_id: epoch})
    is a test hook that makes those trials fail right after that epoch's checkpoint.

    With a label-fidelity gate (generate.filter) the sweep runs in two phases: first every trial that
    does not depend on the gate (the real-only judges among them), then the gated synthetic trials,
    whose images are chosen by the judges' scores."""
    from meddap.classify.controls import unmapped_adjectives
    from meddap.classify.data import load_sweep_images
    from meddap.classify.models import build_classifier

    check_classifiers(cfg, weights=False)

    lay = RunLayout(cfg.run_dir)
    specs = build_grid(cfg)
    total = len(specs)
    manifest, synthetic = _read_inputs(cfg)
    shared_key = _inputs_key(cfg, manifest)
    keys = made_from_keys(cfg, specs, manifest, synthetic, shared_key)
    summaries = _Summaries(cfg)
    on_disk = _done_trials(lay)
    done = {s.trial_id for s in specs if s.trial_id in on_disk and summaries.add(s.trial_id, keys[s.trial_id])}
    stale = sorted(on_disk & set(keys) - done)
    gated_folds = {s.fold for s in specs if gated(cfg, s) and s.trial_id not in done}
    unscored = sorted(judge_spec(cfg, k).trial_id for k in gated_folds
                      if judge_spec(cfg, k).trial_id in done and judge_spec(cfg, k).trial_id not in summaries.frames["fidelity"])
    if unscored:
        # Finished by a sweep before the gate existed: they never wrote the fidelity scores the gate needs.
        _log(f"{len(unscored)} real-only judge trial(s) have no fidelity scores (finished before the label-fidelity "
             f"gate existed): running them again: {', '.join(unscored[:5])}")
        for tid in unscored:
            done.discard(tid)
            summaries.drop(tid)
        stale = sorted(set(stale) | set(unscored))
    if stale:
        # Finished with other inputs (prepare or generate ran again with other data or seeds, or parts
        # were copied from another run): their rows would describe other models.
        _log(f"{len(stale)} finished trial(s) were made from other images or settings: removed, running them "
             f"again: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}")
        for tid in stale:
            storage.remove(lay.path("trials", tid))
    summaries.write()  # a sweep killed between a trial's parts and the merge loses nothing
    todo = [s for s in specs if s.trial_id not in done]
    repeats = f" x {cfg.classify.repeats} repeats" if cfg.classify.repeats > 1 else ""
    controls = f" + controls ({', '.join(cfg.classify.controls)})" if cfg.classify.controls else ""
    _log(f"grid {total} trials ({len(cfg.classify.models)} classifiers x {len(cfg.generate.adjectives)} adjectives "
         f"x {len(cfg.generate.ratios)} ratios x {cfg.data.folds} folds + baselines{controls}{repeats}); {len(done)} "
         f"already done, {len(todo)} to run")
    if "classical" in cfg.classify.controls:
        twinless = [a for a in cfg.generate.adjectives if a in ("", "stylized") or a in unmapped_adjectives([a])]
        if twinless:
            _log(f"adjective(s) {', '.join(repr(a) for a in twinless)} have no classical twin: Table 4 compares them "
                 f"with the duplicate control only (docs/controls.md)")
    if not todo:
        return {"total": total, "done": len(done), "ran": 0, "failed": 0}

    if cfg.classify.pretrained == "imagenet":
        # Missing weights would otherwise fail every trial inside Ray, the reason buried in its logs.
        for model in sorted({s.classifier for s in todo}):
            build_classifier(model, len(cfg.data.classes), "imagenet", cfg.classify.weights_dir)
    todo_folds = {s.fold for s in todo}
    # Real-only trials also score every adjective's synthetic set of their fold (Figure 1a): decode
    # the pools of every fold with pending work. With spares (filter_overgenerate) or a gate, whole pools:
    # the judges score the spares too, and a gate tops counts up from them.
    whole = cfg.generate.filter != "none" or cfg.generate.filter_overgenerate > 0
    images = load_sweep_images(manifest, synthetic, [s for s in specs if s.fold in todo_folds],
                               cfg.data.classes, cfg.classify_image_size, channels=cfg.classify.channels,
                               exclude_overlap=cfg.data.external.exclude_overlap, whole_pools=whole,
                               run_seed=cfg.generate.seed)
    n_excluded = int((images.real_rows["eval_set"] == "external_overlap").sum())
    if n_excluded:
        _log(f"{n_excluded} Dataset B images copy a Dataset A image (manifest a_overlap): scored apart as "
             f"'external_overlap', left out of 'external' (data.external.exclude_overlap=true)")

    gpus = _connect(cfg, images)
    root = _tune_root(cfg)
    first = [s for s in todo if not gated(cfg, s)]
    second = [s for s in todo if gated(cfg, s)]
    if second:
        _log(f"label-fidelity gate {filter_label(cfg)}: {len(first)} trial(s) first (the real-only judges of "
             f"{cfg.filter_judge} among them), then {len(second)} gated synthetic trial(s)")
    failed, errors, progress, name = [], {}, None, ""
    for phase in (first, second):
        if not phase:
            continue
        if phase is second:
            _set_gate(cfg, images, second, summaries.fidelity)
        failed, errors, progress, name = _run_rounds(cfg, phase, keys, images, summaries, total, root, gpus,
                                                     _fail_after_epoch)
        if failed:
            if phase is first:  # the gated trials wait for judges that may have failed: not run either
                failed = failed + second
            break
    finished = set(summaries.frames["trials"])
    _log(f"{len(finished)}/{total} trials done; {summaries.best_line()}; summaries in {lay.summary('trials')}")
    if failed and progress is not None and progress.interrupted:
        raise KeyboardInterrupt  # Ctrl-C: the CLI says so (exit 130); the unfinished trials did not fail
    if failed:
        failed_ids = [s.trial_id for s in failed]
        raise MeddapError(
            f"{len(failed)} of {total} trials did not finish ({', '.join(failed_ids[:5])}{' ...' if len(failed) > 5 else ''}); "
            f"first error: {next((errors[t] for t in failed_ids if errors.get(t)), 'unknown')}; full errors in "
            f"{storage.join(root, name)}. Finished trials are kept: rerun `python -m meddap sweep` "
            f"to run the missing ones (each resumes from its last checkpoint).")
    return {"total": total, "done": len(finished), "ran": len(todo), "failed": 0}
