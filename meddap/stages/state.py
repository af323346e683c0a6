"""What each stage ran with, and whether that still holds: the pipeline's memory between runs.

After a stage finishes, the pipeline writes `run_dir/stages/<stage>.json` (through meddap.storage,
so it works on s3:// too) holding:
  - `config`: the stage's effective settings, flattened to dotted keys: its own section and every
    upstream section its outputs depend on (finetune: data + diffusion; generate: + generate; ...),
    minus keys that only say *how* to run (workers, GPUs per trial, retries) and so cannot change
    what is computed;
  - `inputs`: sha256 of the run-dir files the stage read (manifest.parquet, adapter.json, ...);
  - `status` ("done"), `finished_at`, `seconds`, `meddap_version`.

`check_stage` compares a record with the current config and files and says one of:
  - done:        record present, settings and inputs equal, key outputs present;
  - missing:     no record (or its key outputs were deleted): run it (stages resume on their own);
  - invalidated: settings or inputs differ; `changed` lists them as "key: old -> new".
The pipeline refuses to run over an invalidated stage unless told `--force STAGE`, so outputs made
with different settings are never mixed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from meddap import storage
from meddap.errors import MeddapError
from meddap.layout import RunLayout

__all__ = [
    "STAGES",
    "UPSTREAM",
    "StageStatus",
    "stage_settings",
    "stage_inputs",
    "stage_outputs",
    "check_stage",
    "write_record",
    "write_started",
    "clear_stage",
    "read_record",
    "downstream",
    "refuse_if_invalidated",
]

STAGES = ("prepare", "finetune", "generate", "fid", "sweep", "report")

# Which stages' outputs each stage reads (direct dependencies).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "finetune": ("prepare",),
    "generate": ("prepare", "finetune"),
    "fid": ("prepare", "generate"),
    "sweep": ("prepare", "generate"),
    "report": ("prepare", "generate", "fid", "sweep"),
}

# Config sections that decide what each stage computes (its own plus what its inputs were made with).
_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "finetune": ("data", "diffusion"),
    "generate": ("data", "diffusion", "generate"),
    "fid": ("data", "diffusion", "generate", "fid"),
    "sweep": ("data", "diffusion", "generate", "classify"),
    "report": ("data", "diffusion", "generate", "fid", "classify", "report"),
}

# Keys that say how to run, not what to compute: changing them never invalidates finished work
# (so a run started on a cluster can be finished on one GPU with local-2080ti's packing).
_EXECUTION_ONLY = {
    "diffusion.train.num_workers", "diffusion.train.use_gpu", "diffusion.train.max_failures",
    "diffusion.train.gradient_checkpointing",
    # Precision is how the same computation runs on a device ("auto" already means fp16 on CUDA and
    # fp32 on CPU), so a run may continue on another machine with another precision setting.
    "diffusion.train.mixed_precision", "generate.precision", "classify.mixed_precision",
    "generate.batch_size", "generate.workers", "generate.num_gpus_per_worker", "generate.cpus_per_worker",
    "generate.use_gpu",
    "classify.cpus_per_trial", "classify.gpus_per_trial", "classify.max_concurrent_trials",
    "classify.max_failures", "classify.checkpoint_seconds", "classify.threads_per_trial",
    "fid.batch_size",
}


@dataclass
class StageStatus:
    stage: str
    state: str  # "done" | "missing" | "invalidated"
    changed: list[str] = field(default_factory=list)  # "key: old -> new" lines
    record: dict | None = None

    def __str__(self) -> str:
        tail = ("; changed: " + "; ".join(self.changed)) if self.changed else ""
        return f"{self.stage}: {self.state}{tail}"


# ---------------------------------------------------------------------------------------------
# What a stage depends on.
# ---------------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def stage_settings(cfg, stage: str) -> dict[str, Any]:
    """The dotted config keys (and values) that decide `stage`'s outputs."""
    full = cfg.to_dict()
    flat: dict[str, Any] = {}
    for section in _SECTIONS[stage]:
        flat.update(_flatten(full[section], section + "."))
    return {k: v for k, v in sorted(flat.items()) if k not in _EXECUTION_ONLY}


def _sha256(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def _adapter_folds(cfg) -> list[int]:
    return list(range(cfg.data.folds)) if cfg.diffusion.lora.per_fold else [-1]


def stage_inputs(cfg, stage: str) -> dict[str, str]:
    """run-dir files `stage` reads, relative to run_dir, as path -> sha256 ('absent' when missing)."""
    lay = RunLayout(cfg.run_dir)
    paths: list[str] = []
    if stage != "prepare":
        paths.append(lay.manifest)
    if stage == "generate":
        paths += [storage.join(lay.adapter_dir(f), "adapter.json") for f in _adapter_folds(cfg)]
    if stage in ("fid", "sweep", "report"):
        paths.append(lay.synthetic_manifest)
    if stage == "report":
        paths += [lay.summary("trials"), lay.summary("fid")]
    out = {}
    for p in paths:
        rel = p[len(str(cfg.run_dir)):].lstrip("/")
        out[rel] = _sha256(p) if storage.exists(p) else "absent"
    return out


def stage_outputs(cfg, stage: str) -> list[str]:
    """Paths (files or folders) a stage writes; `--force STAGE` removes them before redoing it."""
    lay = RunLayout(cfg.run_dir)
    outputs = {
        # data/ holds the manifest, the audit, the decode cache and the phantom images prepare writes.
        "prepare": [lay.path("data")],
        "finetune": [lay.path("adapters")],
        "generate": [lay.synthetic_dir],
        "fid": [lay.summary("fid"), lay.summary("memorization")],
        "sweep": [lay.summary("trials"), lay.summary("predictions"), lay.summary("synthetic_eval"),
                  lay.path("trials")],
        "report": [lay.path("report.md"), lay.path("report.html"), lay.figures]
        + [lay.summary(n) for n in ("table1", "table2", "table3", "fig1a")],
    }[stage]
    # Ray Train/Tune checkpoints are cleared only when they live in the run dir: a user-set
    # ray.storage_path may be shared by several runs (stale checkpoints there are never resumed,
    # because the stages' Ray run names hash the settings).
    if stage in ("finetune", "sweep") and cfg.ray.storage_path is None:
        outputs.append(storage.join(lay.ray_storage, stage))
    return outputs


def _key_outputs(cfg, stage: str) -> list[str]:
    """Files whose absence means the stage has to run again even if its record says done."""
    lay = RunLayout(cfg.run_dir)
    return {
        "prepare": [lay.manifest],
        "finetune": [storage.join(lay.adapter_dir(f), "adapter.json") for f in _adapter_folds(cfg)],
        "generate": [lay.synthetic_manifest],
        "fid": [lay.summary("fid")],
        "sweep": [lay.summary("trials")],
        "report": [lay.path("report.md")],
    }[stage]


def downstream(stage: str) -> list[str]:
    """`stage` and every stage that (transitively) reads its outputs, in pipeline order."""
    hit = {stage}
    for s in STAGES:
        if any(u in hit for u in UPSTREAM[s]):
            hit.add(s)
    return [s for s in STAGES if s in hit]


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------
def read_record(cfg, stage: str) -> dict | None:
    path = RunLayout(cfg.run_dir).stage_record(stage)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MeddapError(f"stage record {path} is not valid JSON ({e}); delete it and rerun with "
                          f"--force {stage} to redo the stage.") from None


def write_record(cfg, stage: str, seconds: float, extra: dict | None = None) -> dict:
    """Record that `stage` finished with the current settings and inputs."""
    from meddap import __version__

    record = {
        "stage": stage,
        "status": "done",
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "meddap_version": __version__,
        "config": stage_settings(cfg, stage),
        "inputs": stage_inputs(cfg, stage),
    }
    if extra:
        record.update(extra)
    storage.write_text(RunLayout(cfg.run_dir).stage_record(stage), json.dumps(record, indent=1, default=str))
    return record


def _diff(old: dict, new: dict, what: str) -> list[str]:
    """'<what>key: old -> new' for every key whose value differs (or is only on one side)."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a = repr(old[k]) if k in old else "(not recorded)"
        b = repr(new[k]) if k in new else "(not set)"
        if a != b:
            lines.append(f"{what}{k}: {a} -> {b}")
    return lines


def check_stage(cfg, stage: str) -> StageStatus:
    """done / missing / invalidated for `stage` under `cfg` (see the module docstring).

    A record with status "running" is a stage that started and did not finish: with the same
    settings it is `missing` (the stage resumes from its partial outputs); with other settings it is
    `invalidated`, because those partial outputs (checkpoints, images) belong to the old settings.
    """
    record = read_record(cfg, stage)
    if record is None:
        return StageStatus(stage, "missing")
    changed = _diff(record.get("config", {}), stage_settings(cfg, stage), "")
    if record.get("status") != "done":
        return StageStatus(stage, "invalidated" if changed else "missing", changed, record)
    changed += _diff(record.get("inputs", {}), stage_inputs(cfg, stage), "input ")
    if changed:
        return StageStatus(stage, "invalidated", changed, record)
    if not all(storage.exists(p) for p in _key_outputs(cfg, stage)):
        return StageStatus(stage, "missing", record=record)
    return StageStatus(stage, "done", record=record)


def write_started(cfg, stage: str) -> None:
    """Mark `stage` as running with the current settings, so a crash leaves a record of them."""
    storage.write_text(RunLayout(cfg.run_dir).stage_record(stage), json.dumps(
        {"stage": stage, "status": "running", "config": stage_settings(cfg, stage)}, indent=1, default=str))


def clear_stage(cfg, stage: str) -> list[str]:
    """Delete `stage`'s outputs and record (before redoing it); returns what existed and was removed."""
    removed = []
    for p in stage_outputs(cfg, stage) + [RunLayout(cfg.run_dir).stage_record(stage)]:
        if storage.exists(p):
            storage.remove(p)
            removed.append(p)
    return removed


def refuse_if_invalidated(cfg, statuses: Iterable[StageStatus], forced: Iterable[str]) -> None:
    """Raise MeddapError naming what changed unless every invalidated stage is being redone."""
    forced = set(forced)
    bad = [s for s in statuses if s.state == "invalidated" and s.stage not in forced]
    if not bad:
        return
    first = bad[0]
    redo = downstream(first.stage)
    lines = "\n".join(f"  - {c}" for c in first.changed[:20])
    more = f"\n  ... and {len(first.changed) - 20} more" if len(first.changed) > 20 else ""
    from meddap.status import half_finished_note

    half = half_finished_note(cfg, first)  # "" unless it was interrupted while running
    raise MeddapError(
        f"run_dir {cfg.run_dir} holds outputs of stage '{first.stage}' made with other settings or "
        f"inputs:\n{lines}{more}\n"
        + (f"{half}\nTo use the new settings instead, redo it and the stages after it ({', '.join(redo)}) with "
           f"`--force {first.stage}` (their outputs are deleted first), or use a new run_dir (run_dir=...): "
           f"mixing outputs of both settings would be wrong." if half else
           f"Mixing them with this run's would be wrong. Either redo it and the stages after it "
           f"({', '.join(redo)}) with `--force {first.stage}` (their outputs are deleted first), or use a "
           f"new run_dir (run_dir=...)."))
