"""What each stage ran with, and whether that still holds: the pipeline's memory between runs.

After a stage finishes, the pipeline writes `run_dir/stages/<stage>.json` (through meddap.storage,
so it works on s3:// too) holding:
  - `config`: the stage's effective settings, flattened to dotted keys: its own section and every
    upstream section its outputs depend on (finetune: data + diffusion; generate: + generate; ...),
    minus keys that only say *how* to run (workers, GPUs per trial, retries) and so cannot change
    what is computed;
  - `inputs`: sha256 of the run-dir files the stage read (manifest.parquet, adapter.json, ...);
  - `outputs`: size and sha256 of every file the stage wrote (Ray's checkpoints excepted), so a file
    cut short or corrupted after the stage finished (a crash, a full disk, a bad copy) is found;
  - `status` ("done"), `finished_at`, `seconds`, `meddap_version`.
While a stage runs its record says "running"; a stage stopped by Ctrl-C or SIGTERM says
"interrupted", one that raised says "failed" (with the error); either resumes on the next run.

`check_stage` compares a record with the current config and files and says one of:
  - done:        record present, settings and inputs equal, key outputs present;
  - missing:     no record (or its key outputs were deleted): run it (stages resume on their own); also
                 a done stage whose only changes are settings it absorbs itself (`changed` lists them:
                 the sweep's classify.per_model, which reruns only the trials they decide);
  - invalidated: settings or inputs differ; `changed` lists them as "key: old -> new";
  - damaged:     done, but recorded outputs are missing, of another size or (local run dirs) another
                 sha256; `damaged` lists them. The pipeline removes them and resumes the stage, which
                 remakes exactly those files (object stores get only the size check: a PUT lands whole
                 or not at all, and hashing would download every image again on each run).
The pipeline refuses to run over an invalidated stage unless told `--force STAGE`, so outputs made
with different settings are never mixed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
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
    "write_stopped",
    "clear_stage",
    "remove_damaged",
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
    "diffusion.train.num_workers", "diffusion.train.min_workers", "diffusion.train.use_gpu",
    "diffusion.train.max_failures",
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


# Keys of a section that decide only later stages: the label-fidelity gate (generate.filter*) lives in the
# generate section with its spares but chooses which images sweep trials use, never which images exist, so
# changing it reruns gated trials, not generate or fid.
_NOT_FOR_STAGE = {
    "generate": {"generate.filter", "generate.filter_value", "generate.filter_judge"},
    "fid": {"generate.filter", "generate.filter_value", "generate.filter_judge"},
}


@dataclass
class StageStatus:
    stage: str
    state: str  # "done" | "missing" | "invalidated" | "damaged"
    changed: list[str] = field(default_factory=list)  # "key: old -> new" lines
    record: dict | None = None
    damaged: list[str] = field(default_factory=list)  # "relative/path: why" lines

    def __str__(self) -> str:
        tail = ("; changed: " + "; ".join(self.changed)) if self.changed else ""
        tail += ("; damaged: " + "; ".join(self.damaged)) if self.damaged else ""
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


# Settings a stage absorbs by itself when they change: it reruns (no --force, nothing deleted first) and
# redoes only the work they decide. The sweep keys every trial by its classifier's classify.per_model
# settings (sweep.trial_made_from), so a change there reruns that classifier's trials and keeps the rest.
_REKEYED: dict[str, tuple[str, ...]] = {"sweep": ("classify.per_model.",)}
# ... and stages that see them only through an upstream stage's outputs (their input hashes).
_THROUGH_INPUTS: dict[str, tuple[str, ...]] = {"report": ("classify.per_model.",)}


def _per_model_used(cfg, key: str, value: Any) -> bool:
    """classify.per_model.<name>.<field>: set (not null) and for a classifier the grid trains."""
    parts = key.split(".")
    return value is not None and len(parts) == 4 and parts[2] in cfg.classify.models


def _deciding(cfg, stage: str, flat: dict[str, Any]) -> dict[str, Any]:
    """`flat` settings without those that do not decide `stage`'s outputs (also applied to a stage record's,
    so one written before a key was left out of here does not read as changed)."""
    skip = _EXECUTION_ONLY | _NOT_FOR_STAGE.get(stage, set())
    hidden = _THROUGH_INPUTS.get(stage, ())
    return {k: v for k, v in sorted(flat.items())
            if k not in skip and not (hidden and k.startswith(hidden))
            and not (k.startswith("classify.per_model.") and not _per_model_used(cfg, k, v))}


def stage_settings(cfg, stage: str) -> dict[str, Any]:
    """The dotted config keys (and values) that decide `stage`'s outputs."""
    full = cfg.to_dict()
    flat: dict[str, Any] = {}
    for section in _SECTIONS[stage]:
        flat.update(_flatten(full[section], section + "."))
    return _deciding(cfg, stage, flat)


_HASHES: dict[tuple[str, int, int], str] = {}  # (local path, size, mtime_ns) -> sha256, for this process


def _sha256(path: str) -> str:
    """sha256 of a run-dir file; a local file unchanged since it was hashed (size and mtime) is not
    read again: `run` checks every stage's record more than once, and a paper run holds GBs of PNGs."""
    if storage.is_uri(path):
        return storage.sha256(path)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = storage.sha256(path)
    return _HASHES[key]


# adapter.json fields that say when and how a training ran, not what the adapter is: a remade adapter
# (resumed from its final checkpoint after its weights file was damaged) differs only in these.
_ADAPTER_VOLATILE = ("finished_at", "resumed_from_step", "ray_run")


def _input_sha256(path: str) -> str:
    if path.endswith("adapter.json"):
        try:
            meta = json.loads(storage.read_text(path))
        except (ValueError, UnicodeDecodeError):
            return _sha256(path)
        for k in _ADAPTER_VOLATILE:
            meta.pop(k, None)
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return _sha256(path)


def _adapter_folds(cfg) -> list[int]:
    return list(range(cfg.data.folds)) if cfg.diffusion.lora.per_fold else [-1]


def stage_inputs(cfg, stage: str) -> dict[str, str]:
    """run-dir files `stage` reads, relative to run_dir, as path -> sha256 ('absent' when missing)."""
    lay = RunLayout(cfg.run_dir)
    paths: list[str] = []
    if stage != "prepare":
        paths.append(lay.manifest)
    if stage == "generate":
        from meddap.diffusion.class_words import CLASS_WORDS_NAME
        from meddap.diffusion.lora import LORA_WEIGHTS_NAME

        for f in _adapter_folds(cfg):
            paths += [storage.join(lay.adapter_dir(f), "adapter.json"), storage.join(lay.adapter_dir(f), LORA_WEIGHTS_NAME)]
            # learned class words (diffusion.lora.class_words): listed only where the file exists, so
            # records of adapters without them (and of runs from before the option) stay valid
            words = storage.join(lay.adapter_dir(f), CLASS_WORDS_NAME)
            if storage.exists(words):
                paths.append(words)
    if stage in ("fid", "sweep", "report"):
        paths.append(lay.synthetic_manifest)
    if stage == "report":
        paths += [lay.summary("trials"), lay.summary("fid")]
    out = {}
    for p in paths:
        rel = p[len(str(cfg.run_dir)):].lstrip("/")
        out[rel] = _input_sha256(p) if storage.exists(p) else "absent"
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
                  lay.summary("fidelity_gate"), lay.path("trials")],
        "report": [lay.path("report.md"), lay.path("report.html"), lay.figures]
        + [lay.summary(n) for n in ("table1", "table2", "table3", "table3_full", "table4", "fig1a")],
    }[stage]
    # Ray Train/Tune checkpoints are cleared only when they live in the run dir: a user-set
    # ray.storage_path may be shared by several runs (stale checkpoints there are never resumed,
    # because the stages' Ray run names hash the settings).
    if stage in ("finetune", "sweep") and cfg.ray.storage_path is None:
        outputs.append(storage.join(lay.ray_storage, stage))
    return outputs


def _rel(cfg, path: str) -> str:
    return path[len(str(cfg.run_dir)):].lstrip("/").replace(os.sep, "/")


def output_fingerprints(cfg, stage: str) -> dict[str, list]:
    """{path relative to run_dir: [bytes, sha256]} of every file the stage wrote (not Ray's checkpoints).
    On object stores sha256 is null: it would download every image again, and the size check suffices
    there (a PUT lands whole or not at all)."""
    skip = storage.join(RunLayout(cfg.run_dir).ray_storage, stage)
    local = not storage.is_uri(cfg.run_dir)
    out = {}
    for top in stage_outputs(cfg, stage):
        if top == skip:
            continue
        for path, size in sorted(storage.file_sizes(top).items()):
            if os.path.basename(path).startswith(".tmp-"):
                continue  # another writer's file in flight (storage.open_output), not an output
            out[_rel(cfg, path)] = [size, _sha256(path) if local else None]
    return out


def _check_outputs(cfg, stage: str, recorded: dict[str, list]) -> list[str]:
    """'path: why' for each recorded output that is gone, of another size, or (local) another hash."""
    skip = storage.join(RunLayout(cfg.run_dir).ray_storage, stage)
    sizes = {}
    for top in stage_outputs(cfg, stage):
        if top != skip:
            sizes.update({_rel(cfg, p): n for p, n in storage.file_sizes(top).items()})
    hash_too = not storage.is_uri(cfg.run_dir)
    bad = []
    for rel, (size, digest) in sorted(recorded.items()):
        if rel not in sizes:
            bad.append(f"{rel}: missing")
        elif sizes[rel] != size:
            bad.append(f"{rel}: {sizes[rel]} bytes, {size} when written")
        elif hash_too and digest and _sha256(storage.join(cfg.run_dir, rel)) != digest:
            bad.append(f"{rel}: content changed since it was written (sha256)")
    return bad


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
        "config_name": getattr(cfg, "name", None),     # what --config was (status names it when it differs)
        "config": stage_settings(cfg, stage),
        "inputs": stage_inputs(cfg, stage),
        "outputs": output_fingerprints(cfg, stage),
    }
    if extra:
        record.update(extra)
    storage.write_text(RunLayout(cfg.run_dir).stage_record(stage), json.dumps(record, indent=1, default=str))
    return record


def _unrecorded_defaults_dropped(old: dict, new: dict, stage: str) -> dict:
    """`new` without the keys the record predates that are at their defaults: a key added to meddap after
    a stage ran, left at its default, changes nothing that stage made (a new feature is off or behaves
    as before by default), so an upgrade does not turn every finished run dir stale. Set to anything
    else, it is a change like any other."""
    if all(k in old for k in new):
        return new
    defaults = _default_settings(stage)
    return {k: v for k, v in new.items() if k in old or k not in defaults or repr(v) != repr(defaults[k])}


@functools.lru_cache(maxsize=None)
def _default_settings(stage: str) -> dict[str, Any]:
    """The stage's settings under an all-defaults config (built once per stage: check_stage runs often)."""
    from meddap.config import Config

    return stage_settings(Config(), stage)


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

    A record with status "running" (killed), "interrupted" or "failed" is a stage that started and did
    not finish: with the same settings it is `missing` (the stage resumes from its partial outputs);
    with other settings it is `invalidated` when it left outputs, because those partial outputs
    (checkpoints, images) belong to the old settings, and `missing` when it left none.
    """
    record = read_record(cfg, stage)
    if record is None:
        return StageStatus(stage, "missing")
    recorded = _deciding(cfg, stage, record.get("config", {}))
    changed = _diff(recorded, _unrecorded_defaults_dropped(recorded, stage_settings(cfg, stage), stage), "")
    rekeyed = _REKEYED.get(stage, ())

    def absorbed(lines: list[str]) -> bool:
        return bool(lines and rekeyed) and all(c.startswith(rekeyed) for c in lines)

    if record.get("status") != "done":
        # Partial outputs of other settings must not be resumed (unless the stage absorbs those settings
        # itself); a stage that stopped before writing anything (refused at the door: a wrong path, a
        # missing file) left nothing to mix.
        if absorbed(changed):
            return StageStatus(stage, "missing", changed, record)
        left = bool(changed) and any(storage.file_sizes(p) for p in stage_outputs(cfg, stage))
        return StageStatus(stage, "invalidated" if left else "missing", changed if left else [], record)
    changed += _diff(record.get("inputs", {}), stage_inputs(cfg, stage), "input ")
    if absorbed(changed):  # settings the stage absorbs itself: it is to run again (resuming), `changed` says why
        return StageStatus(stage, "missing", changed, record)
    if changed:
        return StageStatus(stage, "invalidated", changed, record)
    if not all(storage.exists(p) for p in _key_outputs(cfg, stage)):
        return StageStatus(stage, "missing", record=record)
    damaged = _check_outputs(cfg, stage, record.get("outputs") or {})
    if damaged:
        return StageStatus(stage, "damaged", record=record, damaged=damaged)
    return StageStatus(stage, "done", record=record)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_started(cfg, stage: str) -> None:
    """Mark `stage` as running with the current settings, so a crash leaves a record of them."""
    storage.write_text(RunLayout(cfg.run_dir).stage_record(stage), json.dumps(
        {"stage": stage, "status": "running", "started_at": _now(), "config_name": getattr(cfg, "name", None),
         "config": stage_settings(cfg, stage)},
        indent=1, default=str))


def write_stopped(cfg, stage: str, status: str, error: str | None = None) -> None:
    """Mark a running `stage` "interrupted" (Ctrl-C, SIGTERM) or "failed" (with `error`): its finished
    work stays and the next run resumes it; the record says why it is not done."""
    record = read_record(cfg, stage) or {"stage": stage, "config": stage_settings(cfg, stage)}
    record.update({"status": status, "stopped_at": _now()})
    if error:
        record["error"] = error
    storage.write_text(RunLayout(cfg.run_dir).stage_record(stage), json.dumps(record, indent=1, default=str))


def _followups(stage: str, rel: str) -> list[str]:
    """Completion markers that must go with a damaged file so the stage remakes it: an adapter's
    adapter.json, a trial's trials.parquet part."""
    parts = rel.split("/")
    if stage == "finetune" and len(parts) == 3 and parts[0] == "adapters":
        return [f"adapters/{parts[1]}/adapter.json"]
    if stage == "sweep" and len(parts) == 3 and parts[0] == "trials":
        return [f"trials/{parts[1]}/trials.parquet"]
    return []


def remove_damaged(cfg, status: StageStatus) -> list[str]:
    """Delete the damaged outputs `status` lists (and what marks them complete); returns what went."""
    gone = []
    for line in status.damaged:
        rel = line.split(": ", 1)[0]
        for r in [rel, *_followups(status.stage, rel)]:
            path = storage.join(cfg.run_dir, *r.split("/"))
            if storage.exists(path):
                storage.remove(path)
                gone.append(r)
    return gone


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
    # Forcing a stage redoes the stages after it that read it; a stale stage not among those (the sweep,
    # after a stale fid) needs its own --force, so the message names every one at once.
    roots, covered = [], set()
    for st in bad:
        if st.stage not in covered:
            roots.append(st)
            covered |= set(downstream(st.stage))
    redo = [s for s in STAGES if s in covered]
    force = " ".join(f"--force {st.stage}" for st in roots)
    if len(bad) == 1:
        lines = "\n".join(f"  - {c}" for c in first.changed[:20])
        more = f"\n  ... and {len(first.changed) - 20} more" if len(first.changed) > 20 else ""
        head = f"run_dir {cfg.run_dir} holds outputs of stage '{first.stage}' made with other settings or inputs:\n"
    else:
        lines = "\n".join(f"  {st.stage}:\n" + "\n".join(f"  - {c}" for c in st.changed[:10])
                          + (f"\n  ... and {len(st.changed) - 10} more" if len(st.changed) > 10 else "") for st in bad)
        more = ""
        head = (f"run_dir {cfg.run_dir} holds outputs of stages {', '.join(repr(st.stage) for st in bad)} made "
                f"with other settings or inputs:\n")
    from meddap.status import half_finished_note

    half = half_finished_note(cfg, first)  # "" unless it was interrupted while running
    raise MeddapError(
        f"{head}{lines}{more}\n"
        + (f"{half}\nTo use the new settings instead, redo it and the stages after it ({', '.join(redo)}) with "
           f"`{force}` (their outputs are deleted first), or use a new run_dir (run_dir=...): "
           f"mixing outputs of both settings would be wrong." if half else
           f"Mixing them with this run's would be wrong. Either redo {'it' if len(bad) == 1 else 'them'} and the "
           f"stages after ({', '.join(redo)}) with `{force}` (their outputs are deleted first), or use a "
           f"new run_dir (run_dir=...)."))
