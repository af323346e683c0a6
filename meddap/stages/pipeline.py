"""The whole study: prepare -> finetune -> generate -> fid -> sweep -> report.

`run(cfg, force=())` runs each stage that is not done yet in `cfg.run_dir` and skips the rest
(`meddap.stages.state` decides from each stage's record). `force=["sweep"]` deletes the outputs of
sweep and of every stage after it that reads them (report), then redoes them. A stage whose recorded
settings differ from the current config is refused with a message listing the changed keys, unless
it is forced: outputs from different settings are never mixed.

Rank selection (the paper's FID comparison of LoRA ranks 2, 4, 8): when `diffusion.lora.rank` is a
list, each rank is fine-tuned in `run_dir/rank-selection/rank-<r>/` (one shared adapter on the
whole training pool, so a rank costs one adapter, not one per fold), a no-adjective set the size of
the training set is generated (ratio 1.0), its FID against the real training images is computed by
the fid stage, and the rank with the lowest FID is used for the main run. All of it is recorded in
`summary/rank_selection.parquet` (rank, fold, fid, kid, features, dims, status, chosen).
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Callable, Iterable

from meddap import logs, storage
from meddap.config import Config
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stages import state
from meddap.stages.state import STAGES

__all__ = ["run", "run_stages", "select_rank", "choose_rank", "stage_function"]


def _log(msg: str) -> None:
    logs.say(f"[pipeline] {msg}")


def stage_function(stage: str) -> Callable:
    """`meddap.stages.<stage>.run`, imported when needed (stages pull in torch, diffusers, Ray)."""
    try:
        module = importlib.import_module(f"meddap.stages.{stage}")
    except ModuleNotFoundError as e:
        if e.name == f"meddap.stages.{stage}":
            raise MeddapError(f"stage '{stage}' is not available in this installation "
                              f"(meddap/stages/{stage}.py is missing).") from None
        raise
    return module.run


def _check_force(force: Iterable[str]) -> list[str]:
    import difflib

    force = list(force or ())
    for f in force:
        if f not in STAGES:
            close = difflib.get_close_matches(f, STAGES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise MeddapError(f"--force {f}: no such stage.{hint} Stages: {', '.join(STAGES)}.")
    return force


def _with(cfg: Config, **dotted) -> Config:
    """A validated copy of `cfg` with dotted keys replaced (e.g. diffusion__lora__rank=8)."""
    d = cfg.to_dict()
    for key, value in dotted.items():
        cur = d
        parts = key.split("__")
        for p in parts[:-1]:
            cur = cur[p]
        cur[parts[-1]] = value
    return Config.from_dict(d, source="pipeline override")


def _mark_stopped(cfg: Config, stage: str, status: str, error: str | None = None) -> None:
    try:
        state.write_stopped(cfg, stage, status, error)
    except (OSError, MeddapError):  # a full disk or lost bucket must not hide why the stage stopped
        pass


def _command() -> str:
    import sys

    return " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "python (interactive)"


def run_stages(cfg: Config, stages: Iterable[str], force: Iterable[str] = (), *,
               timings: dict | None = None, label: str = "") -> dict[str, dict]:
    """Run `stages` (in pipeline order) under `cfg`, skipping done ones; returns per-stage timings.

    Every forced stage and every stage downstream of it has its outputs deleted first, then runs.
    A stage invalidated by changed settings is refused (MeddapError) unless forced. A stage whose
    inputs changed because an upstream stage ran again in this call is redone (outputs deleted). A
    done stage whose outputs were damaged since has those files removed and is resumed to remake them.
    The run_dir's lock (meddap.runlock) is held throughout: another process writing it is refused.
    """
    from meddap.runlock import run_lock

    with run_lock(cfg, _command()):
        return _run_stages(cfg, stages, force, timings=timings, label=label)


def _refuse_unready_upstream(cfg: Config, stages: list[str], redo: set[str]) -> None:
    """Before a forced stage's outputs are deleted: every stage it reads that this call does not run must be
    done and intact. Otherwise the redo would fail on that input after the finished outputs were gone
    (`python -m meddap generate --force` with a damaged adapter lost the images it had)."""
    cleared = [s for s in stages if s in redo]
    # the stages the cleared ones read, directly or not (state.downstream, read the other way round)
    outside = [u for u in STAGES if u not in stages and any(s in state.downstream(u) for s in cleared)]
    bad: list[tuple[str, str]] = []                    # (stage, why)
    for u in outside:
        try:
            st = state.check_stage(cfg, u)
        except MeddapError as e:                       # an unreadable stage record
            bad.append((u, f"{u}: {e}"))
            continue
        if st.state == "done":
            continue
        missing = (f"is to run again for changed settings ({st.changed[0]}"
                   + (f"; +{len(st.changed) - 1} more" if len(st.changed) > 1 else "") + ")"
                   if st.changed else "has not finished")
        why = {"missing": missing, "invalidated": "was made with other settings or inputs",
               "damaged": "has outputs damaged or missing since it finished ("
                          + "; ".join(st.damaged[:3]) + ("; ..." if len(st.damaged) > 3 else "") + ")"}[st.state]
        bad.append((u, f"{u} {why}"))
    if bad:
        first = bad[0][0]
        raise MeddapError(
            f"--force {', '.join(cleared)}: cannot redo {'it' if len(cleared) == 1 else 'them'} in run_dir {cfg.run_dir}: "
            f"the input stage {'; '.join(why for _, why in bad)}. Nothing was deleted. Remake the input first, e.g. "
            f"`python -m meddap {first}`, or run the whole study with `python -m meddap run` (it redoes only what "
            f"is needed), with the same --config and run_dir.")


def _run_stages(cfg: Config, stages: Iterable[str], force: Iterable[str] = (), *,
                timings: dict | None = None, label: str = "") -> dict[str, dict]:
    stages = [s for s in STAGES if s in set(stages)]
    redo: set[str] = set()
    for f in _check_force(force):
        redo.update(state.downstream(f))
    # Refuse before any work when settings changed under a stage that is not being redone.
    state.refuse_if_invalidated(
        cfg, [st for st in (state.check_stage(cfg, s) for s in stages)
              if not all(c.startswith("input ") for c in st.changed)], redo)

    _refuse_unready_upstream(cfg, stages, redo)

    timings = {} if timings is None else timings
    ran: set[str] = set()
    for stage in stages:
        name = f"{label}{stage}"
        status = state.check_stage(cfg, stage)
        if stage in redo:
            removed = state.clear_stage(cfg, stage)
            _log(f"{name}: forced; removed {len(removed)} earlier output(s) first" if removed else f"{name}: forced")
        elif status.state == "done":
            _log(f"{name}: done already (recorded {status.record.get('finished_at')}), skipped")
            timings[name] = {"stage": name, "seconds": 0.0, "action": "skipped"}
            continue
        elif status.state == "invalidated":
            upstream_ran = [u for u in state.UPSTREAM[stage] if u in ran]
            only_inputs = all(c.startswith("input ") for c in status.changed)
            if not (only_inputs and upstream_ran):
                state.refuse_if_invalidated(cfg, [status], redo)
            removed = state.clear_stage(cfg, stage)
            _log(f"{name}: inputs changed since it ran ({', '.join(upstream_ran)} ran again): redoing; "
                 f"removed {len(removed)} earlier output(s)")
        elif status.state == "damaged":
            removed = state.remove_damaged(cfg, status)
            shown = "; ".join(status.damaged[:5]) + (f"; ... {len(status.damaged) - 5} more" if len(status.damaged) > 5 else "")
            _log(f"{name}: {len(status.damaged)} output(s) damaged or missing since it finished ({shown}); "
                 f"removed {len(removed)} file(s), remaking them")
        elif status.changed:  # done, but settings it absorbs itself changed (state._REKEYED)
            shown = "; ".join(status.changed[:3]) + (f"; ... {len(status.changed) - 3} more" if len(status.changed) > 3 else "")
            _log(f"{name}: running again for changed settings ({shown}); it redoes only the work they decide")
        else:
            how = {"running": "was killed", "interrupted": "was interrupted", "failed": "failed"}
            _log(f"{name}: running" + (f" (resuming: its last run {how.get(status.record.get('status'), 'stopped')})"
                                       if status.record else ""))
        state.write_started(cfg, stage)
        t0 = time.perf_counter()
        try:
            stage_function(stage)(cfg)
        except KeyboardInterrupt:
            _mark_stopped(cfg, stage, "interrupted")
            raise
        except Exception as e:
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            _mark_stopped(cfg, stage, "failed", f"{type(e).__name__}: {lines[0] if lines else ''}")
            raise
        seconds = time.perf_counter() - t0
        state.write_record(cfg, stage, seconds)
        ran.add(stage)
        timings[name] = {"stage": name, "seconds": seconds, "action": "ran"}
        _log(f"{name}: finished in {seconds:.1f}s")
    return timings


# ---------------------------------------------------------------------------------------------
# Rank selection.
# ---------------------------------------------------------------------------------------------
def choose_rank(rows: list[dict]) -> tuple[int, str]:
    """(index of the chosen row, why). Lowest FID among rows with one; else lowest KID; else the first
    rank, saying that no distance could be computed (no number is ever invented)."""
    def ok(v) -> bool:
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    for metric in ("fid", "kid"):
        have = [i for i, r in enumerate(rows) if ok(r.get(metric))]
        if have:
            best = min(have, key=lambda i: rows[i][metric])
            return best, f"lowest {metric.upper()}"
    reasons = sorted({str(r.get("status")).split(":")[0] for r in rows})  # the kind; details stay in `status`
    return 0, ("no FID or KID could be computed (" + "; ".join(reasons) + "): kept the first rank "
               "listed; provide pytorch-fid's Inception weights (fid.weights) to select by FID")


def _rank_cfg(cfg: Config, rank: int) -> Config:
    sub_dir = storage.join(cfg.run_dir, "rank-selection", f"rank-{rank}")
    return _with(cfg, run_dir=sub_dir, diffusion__lora__rank=rank, diffusion__lora__per_fold=False,
                 generate__adjectives=[""], generate__ratios=[1.0])


def _settings_for_selection(cfg: Config) -> dict:
    settings = state.stage_settings(cfg, "fid")
    return {k: v for k, v in settings.items()
            if not k.startswith("generate.adjectives") and not k.startswith("generate.ratios")}


def select_rank(cfg: Config, force: Iterable[str] = (), timings: dict | None = None) -> int:
    """Fine-tune, generate and score every rank in `diffusion.lora.rank`; returns the chosen rank."""
    import json

    import pandas as pd

    lay = RunLayout(cfg.run_dir)
    out = lay.summary("rank_selection")
    record_path = lay.stage_record("rank_selection")
    settings = _settings_for_selection(cfg)
    redo = "finetune" in {s for f in force for s in state.downstream(f)}
    if storage.exists(record_path) and storage.exists(out) and not redo:
        rec = json.loads(storage.read_text(record_path))
        changed = [k for k in sorted(set(rec["config"]) | set(settings))
                   if repr(rec["config"].get(k)) != repr(settings.get(k))]
        if not changed:
            table = storage.read_parquet(out)
            chosen = int(table.loc[table["chosen"], "rank"].iloc[0])
            _log(f"rank selection: done already, rank {chosen} was chosen ({rec.get('why')})")
            return chosen
        raise MeddapError(
            f"rank selection in {cfg.run_dir} was made with other settings ({', '.join(changed[:10])}). "
            f"Redo it with `--force finetune` or use a new run_dir.")

    t0 = time.perf_counter()
    rows = []
    for rank in cfg.diffusion.lora.ranks:
        sub = _rank_cfg(cfg, rank)
        # The sub-run reads the main run's manifest: same images, same splits.
        if not storage.exists(RunLayout(sub.run_dir).manifest) or redo:
            storage.write_bytes(RunLayout(sub.run_dir).manifest, storage.read_bytes(lay.manifest))
            state.write_record(sub, "prepare", 0.0, extra={"copied_from": lay.manifest})
        _log(f"rank selection: rank {rank} in {sub.run_dir}")
        run_stages(sub, ("finetune", "generate", "fid"), force=["finetune"] if redo else (),
                   timings=timings, label=f"rank-{rank}/")
        fid = storage.read_parquet(RunLayout(sub.run_dir).summary("fid"))
        from meddap.fid import primary_dims

        hit = fid[(fid["adjective"] == "") & (fid["class_name"] == "all") & (fid["dims"] == primary_dims(cfg.fid, fid))]
        if hit.empty:
            raise MeddapError(f"rank selection: {RunLayout(sub.run_dir).summary('fid')} has no overall "
                              f"(class_name 'all') row for the no-adjective set; the fid stage's output "
                              f"does not match its contract.")
        r = hit.iloc[0]
        rows.append({"rank": rank, "fold": int(r["fold"]), "fid": r["fid"], "kid": r["kid"],
                     "features": str(r["features"]) if "features" in r else "inception", "dims": int(r["dims"]), "status": str(r["status"]), "run_dir": sub.run_dir})
    best, why = choose_rank(rows)
    for i, r in enumerate(rows):
        r["chosen"] = i == best
        r["selected_by"] = why
    storage.write_parquet(pd.DataFrame(rows), out)
    storage.write_text(record_path, json.dumps({"stage": "rank_selection", "status": "done", "why": why,
                                                "seconds": time.perf_counter() - t0, "config": settings},
                                               indent=1, default=str))
    chosen = rows[best]["rank"]
    _log(f"rank selection: chose rank {chosen} ({why}); table in {out}")
    for r in rows:
        _log(f"  rank {r['rank']}: fid={r['fid']} kid={r['kid']} features={r['features']} dims={r['dims']} "
             f"status={r['status']}")
    return chosen


# ---------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------
def _timing(t: dict, total: float) -> str:
    share = f" ({100 * t['seconds'] / total:.0f} %)" if total > 0 and t["seconds"] >= 0.05 * total else ""
    return f"{t['stage']} {t['seconds']:.1f}s{share}"


def _preflight(cfg: Config, force: list[str]) -> None:
    """Settings only a late stage uses, checked before any work: fid's feature extractor and judge files,
    the sweep's classifier names and ImageNet weights would otherwise fail only after fine-tuning and
    generation (hours on the paper)."""
    def pending(stage: str) -> bool:
        return state.check_stage(cfg, stage).state != "done" or any(stage in state.downstream(f) for f in force)

    if pending("fid"):
        from meddap.fid import check_features_source

        check_features_source(cfg.fid, cfg.diffusion.base_model)
    if pending("sweep"):
        from meddap.stages.sweep import check_classifiers

        check_classifiers(cfg)


def run(cfg: Config, force: Iterable[str] = ()) -> dict:
    """Run every stage that is not done; returns {"timings": [...], "report": path, "rank": int}."""
    from meddap.runlock import run_lock

    force = _check_force(force)
    _preflight(cfg, force)
    with run_lock(cfg, _command()):
        return _run(cfg, force)


def _run(cfg: Config, force: list[str]) -> dict:
    from meddap.raytools import ensure_ray

    t_all = time.perf_counter()
    timings: dict[str, dict] = {}
    log_dir = logs.active_log_dir()
    _log(f"run_dir {cfg.run_dir} (config '{cfg.name}')" + (f"; forced: {', '.join(force)}" if force else "")
         + (f"; Ray's own messages go to {log_dir}" if log_dir else ""))

    import ray

    t0 = time.perf_counter()
    already = ray.is_initialized()
    ensure_ray(cfg)
    timings["ray start"] = {"stage": "ray start", "seconds": time.perf_counter() - t0,
                            "action": "already connected" if already else "ran"}

    run_stages(cfg, ("prepare",), force, timings=timings)
    rank = cfg.diffusion.lora.ranks[0]
    if len(cfg.diffusion.lora.ranks) > 1:
        t0 = time.perf_counter()
        rank = select_rank(cfg, force, timings)
        timings["rank selection"] = {"stage": "rank selection", "seconds": time.perf_counter() - t0,
                                     "action": "ran"}
        cfg = _with(cfg, diffusion__lora__rank=rank)
    run_stages(cfg, STAGES[1:], force, timings=timings)

    total = time.perf_counter() - t_all
    ran = [t for t in timings.values() if t["action"] == "ran"]
    skipped = [t["stage"] for t in timings.values() if t["action"] == "skipped"]
    report = RunLayout(cfg.run_dir).path("report.md")
    _log(f"report: {report} | timings: {', '.join(_timing(t, total) for t in ran) or 'nothing ran'}; "
         f"total {total:.1f}s" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    return {"timings": list(timings.values()), "total_seconds": total, "report": report, "rank": rank}
