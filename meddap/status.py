"""`python -m meddap status`: how far a run has got, read from its files (never written or locked).

Per stage, from its record (meddap.stages.state) and outputs:
  done     recorded done with these settings and inputs, and its key outputs are there;
  running  recorded as started with these settings and not finished: a run is going now, or one was
           interrupted (rerunning resumes it from its partial outputs);
  stale    ran, or started, with other settings or inputs: a run refuses to build on it until it
           is redone (`--force STAGE`) or the earlier settings are put back;
  missing  nothing recorded yet (or its key outputs were deleted).
Counts: adapters trained, synthetic images listed, FID sets scored and sweep trials finished, each
out of what this config plans; then the report's path and the latest log folder.

`stage_progress` is also what the pipeline quotes when it refuses a half-finished stage.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Optional

from meddap import storage
from meddap.config import Config, ConfigError
from meddap.errors import MeddapError
from meddap.layout import RunLayout

__all__ = ["show_status", "status_lines", "stage_progress", "config_with", "resume_overrides"]


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------
def stage_progress(cfg: Config, stage: str) -> Optional[tuple[int, Optional[int], str]]:
    """(done, total, unit) of a stage's work found on disk under `cfg`'s plan; total None when it
    cannot be known yet (the data manifest is missing); None for stages without countable parts."""
    lay = RunLayout(cfg.run_dir)
    folds = list(range(cfg.data.folds)) if cfg.diffusion.lora.per_fold else [-1]
    if stage == "finetune":
        done = sum(storage.exists(storage.join(lay.adapter_dir(f), "adapter.json")) for f in folds)
        return done, len(folds), "adapters"
    if stage == "generate":
        listed = len(storage.read_parquet(lay.synthetic_manifest, columns=["image_id"])) \
            if storage.exists(lay.synthetic_manifest) else 0
        return listed, _planned_images(cfg), "images"
    if stage == "fid":
        done = 0
        if storage.exists(lay.summary("fid")):
            fid = storage.read_parquet(lay.summary("fid"), columns=["fold", "adjective", "class_name"])
            done = len(fid[fid["class_name"] == "all"][["fold", "adjective"]].drop_duplicates())
        return done, len(folds) * len(cfg.generate.adjectives), "synthetic sets"
    if stage == "sweep":
        from meddap.stages.sweep import build_grid, grid_size

        ids = {s.trial_id for s in build_grid(cfg)}
        marker = "trials.parquet"
        finished = {p.replace("\\", "/").rstrip("/").split("/")[-2]
                    for p in storage.listdir(lay.path("trials"), recursive=True)
                    if p.replace("\\", "/").endswith("/" + marker)}
        return len(finished & ids), grid_size(cfg), "trials"
    return None


def _planned_images(cfg: Config) -> Optional[int]:
    from meddap.diffusion.plan import build_plan

    if not storage.exists(RunLayout(cfg.run_dir).manifest):
        return None
    try:
        return len(build_plan(cfg, check_adapters=False))
    except (MeddapError, ConfigError):
        return None


def _count(p: Optional[tuple]) -> str:
    if p is None:
        return ""
    done, total, unit = p
    return f"{unit} {done}/{total if total is not None else '?'}"


# ---------------------------------------------------------------------------------------------
# Earlier settings (a half-finished stage)
# ---------------------------------------------------------------------------------------------
def config_with(cfg: Config, dotted: dict[str, Any]) -> Config:
    """`cfg` with dotted keys set to the given values (keys this version no longer has are skipped)."""
    d = cfg.to_dict()
    for key, value in dotted.items():
        cur = d
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.get(p) if isinstance(cur, dict) else None
            if cur is None:
                break
        if isinstance(cur, dict) and parts[-1] in cur:
            cur[parts[-1]] = value
    return Config.from_dict(d, source="the stage's record")


def resume_overrides(cfg: Config, record: dict) -> list[str]:
    """key=value arguments that put back the settings a stage's record holds (where they differ)."""
    from meddap.stages.state import stage_settings

    old = record.get("config", {})
    now = stage_settings(cfg, record["stage"])
    out = []
    for k in sorted(old):
        if k in now and repr(old[k]) != repr(now[k]):
            v = old[k]
            text = json.dumps(v) if isinstance(v, (list, dict)) else ("null" if v is None else str(v).lower()
                                                                      if isinstance(v, bool) else str(v))
            out.append(f"{k}={text}")
    return out


def half_finished_note(cfg: Config, status) -> str:
    """For a stage that started with other settings and did not finish: what it holds and how to
    resume it ("" when the stage is not half-finished)."""
    record = status.record or {}
    if record.get("status") != "running":
        return ""
    overrides = resume_overrides(cfg, record)
    counted = ""
    try:
        old = config_with(cfg, record.get("config", {}))
        p = stage_progress(old, status.stage)
        if p is not None and p[1]:
            counted = f" ({p[0]} of {p[1]} {p[2]} done)"
    except (MeddapError, ConfigError, OSError, ValueError):
        pass  # the count is a courtesy; the advice below stands without it
    quoted = " ".join(f"'{o}'" if any(c in o for c in " \"[]{}*") else o for o in overrides)
    return (f"Stage '{status.stage}' is half-finished{counted}: it was interrupted while running with the "
            f"earlier settings. To resume it, rerun with them: {quoted or '(the earlier config)'}.")


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _started_at(cfg: Config, stage: str) -> str:
    try:
        fs, p = storage.filesystem(RunLayout(cfg.run_dir).stage_record(stage))
        mtime = fs.get_file_info(p).mtime
        return f"started {mtime.astimezone(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}" if mtime else ""
    except Exception:  # a timestamp is a courtesy
        return ""


def _latest_log_dir(cfg: Config):
    from meddap import logs

    root = logs.log_root(cfg.run_dir)
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return runs[-1] if runs else None, len(runs)


def _last_log_write(cfg: Config) -> str:
    """How long ago the latest command's log files changed: a hint whether a run is still going."""
    import time

    latest, _ = _latest_log_dir(cfg)
    if latest is None:
        return ""
    stamps = [p.stat().st_mtime for p in latest.glob("*.log")]
    if not stamps:
        return ""
    from meddap.logs import duration

    return f"logs last written {duration(max(0.0, time.time() - max(stamps)))} ago"


def _stage_line(cfg: Config, stage: str) -> tuple[str, str]:
    """(state word, details) of one stage."""
    from meddap.stages.state import check_stage

    try:
        st = check_stage(cfg, stage)
    except MeddapError as e:
        return "damaged", str(e)
    try:
        count = _count(stage_progress(cfg, stage))
    except Exception as e:  # a damaged file the count reads: the damage line below names it
        count = f"count unreadable ({type(e).__name__})"
    record = st.record or {}
    if st.state == "done":
        return "done", "; ".join(x for x in (count, f"{record.get('seconds', 0):.1f}s, finished "
                                             f"{record.get('finished_at', '?')}") if x)
    if st.state == "invalidated":
        first = st.changed[0] if st.changed else "?"
        more = f" (+{len(st.changed) - 1} more)" if len(st.changed) > 1 else ""
        how = "started" if record.get("status") == "running" else "ran"
        return "stale", "; ".join(x for x in (count, f"{how} with other settings or inputs: {first}{more}") if x)
    if st.state == "damaged":
        shown = "; ".join(st.damaged[:3]) + (f" (+{len(st.damaged) - 3} more)" if len(st.damaged) > 3 else "")
        return "damaged", "; ".join(x for x in (count, f"{shown}; `python -m meddap run` (same config) remakes "
                                                        f"them") if x)
    if record.get("status") in ("failed", "interrupted"):
        why = f"its last run {record['status']}" + (f": {record['error']}" if record.get("error") else "")
        return record["status"], "; ".join(x for x in (count, why, "rerun to resume") if x)
    if record.get("status") == "running":
        return "running", "; ".join(x for x in (count, _started_at(cfg, stage), _last_log_write(cfg),
                                                "if its process is gone, rerun to resume") if x)
    if record and st.changed:  # done; settings it absorbs itself changed (classify.per_model for the sweep)
        more = f" (+{len(st.changed) - 1} more)" if len(st.changed) > 1 else ""
        return "missing", "; ".join(x for x in (count, f"settings changed: {st.changed[0]}{more}; `python -m meddap "
                                                       f"run` redoes only the work they decide") if x)
    if record:
        return "missing", "; ".join(x for x in (count, "recorded done but its outputs are gone") if x)
    return "missing", count


def _chosen_rank(cfg: Config) -> tuple[Optional[int], str]:
    path = RunLayout(cfg.run_dir).summary("rank_selection")
    if not storage.exists(path):
        return None, (f"rank selection ({', '.join(map(str, cfg.diffusion.lora.ranks))}): not done yet; the stages "
                      f"after prepare wait for it (sub-runs under {storage.join(cfg.run_dir, 'rank-selection')})")
    table = storage.read_parquet(path)
    chosen = int(table.loc[table["chosen"].astype(bool), "rank"].iloc[0])
    return chosen, f"rank selection: done, rank {chosen} chosen"


def status_lines(cfg: Config) -> list[str]:
    """What `python -m meddap status` prints."""
    from meddap.stages.state import STAGES

    lay = RunLayout(cfg.run_dir)
    lines = [f"run_dir {cfg.run_dir} (config '{cfg.name}')"]
    if not storage.exists(cfg.run_dir):
        lines.append(f"  nothing here yet: start it with `python -m meddap run --config {cfg.name}` "
                     f"(same run_dir and overrides).")
        return lines
    stages = list(STAGES)
    if len(cfg.diffusion.lora.ranks) > 1:
        rank, line = _chosen_rank(cfg)
        if rank is not None:
            from meddap.stages.pipeline import _with

            cfg = _with(cfg, diffusion__lora__rank=rank)
        else:
            state, detail = _stage_line(cfg, "prepare")
            lines.append(f"  {'prepare':<9} {state:<8} {detail}".rstrip())
            lines.append("  " + line)
            return lines + _tail(cfg, lay)
        stages_note = line
    else:
        stages_note = ""
    stale = []
    for stage in stages:
        state, detail = _stage_line(cfg, stage)
        lines.append(f"  {stage:<9} {state:<8} {detail}".rstrip())
        if stage == "prepare" and stages_note:
            lines.append("  " + stages_note)
        if state == "stale":
            stale.append(stage)
    return lines + _other_config_note(cfg, stale) + _tail(cfg, lay)


def _other_config_note(cfg: Config, stale: list[str]) -> list[str]:
    """When the stale stages ran under another --config (their records say which): name it. A run dir
    looked at with the wrong --config otherwise reads as if every setting had changed."""
    from meddap.stages.state import read_record

    names = {}
    for stage in stale:
        try:
            name = (read_record(cfg, stage) or {}).get("config_name")
        except MeddapError:
            continue
        if name and name != cfg.name:
            names.setdefault(name, []).append(stage)
    return [f"  note: {', '.join(st)} ran with --config '{name}', not '{cfg.name}': "
            f"`python -m meddap status --config {name}` (with that run's key=value overrides) shows that run as it is"
            for name, st in names.items()]


def _tail(cfg: Config, lay: RunLayout) -> list[str]:
    report = lay.path("report.md")
    out = [f"report: {report}" + ("" if storage.exists(report) else " (not written yet)")]
    latest, n = _latest_log_dir(cfg)
    if latest is not None:
        out.append(f"logs: {latest} (latest of {n})")
    return out


def show_status(cfg: Config) -> None:
    from meddap import logs

    for line in status_lines(cfg):
        logs.say(line)
