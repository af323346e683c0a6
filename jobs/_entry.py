"""Shared by the `ray job submit` entry points: parse `--config` and key=value, call one stage, exit.

A stage job runs its stage through the pipeline's bookkeeping (meddap.stages.pipeline.run_stages):
it is skipped when `run_dir/stages/<stage>.json` says it is done with these settings, refused when
settings or inputs changed (use --force), and recorded when it finishes.

Run by `ray job submit --working-dir . -- python jobs/<stage>.py ...`: the job server sets
RAY_ADDRESS, so `meddap.raytools.ensure_ray` joins the cluster the job runs in; run by hand with no
cluster, it starts a local Ray. The library never imports jobs/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the repo root; a cluster installs meddap with
# `pip install -e .`, a bare checkout (or a --working-dir upload) needs the root added.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = ["main"]


def main(stage: str, argv: list[str] | None = None) -> int:
    from meddap import logs
    from meddap.cli import resume_args, user_error_exit
    from meddap.config import load_config
    from meddap.raytools import interrupt_on_sigterm

    p = argparse.ArgumentParser(prog=f"jobs/{stage}.py",
                                description=f"meddap {stage} as a Ray job (ray job submit --working-dir . -- "
                                            f"python jobs/{stage}.py --config paper run_dir=s3://bucket/run)")
    p.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)")
    if stage == "pipeline":
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="redo STAGE and every stage after it that depends on it (repeatable)")
    else:
        p.add_argument("--force", nargs="?", const=stage, choices=[stage], metavar=stage,
                       help=f"redo {stage} even if its record says done (its earlier outputs are deleted first)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's own messages in the job's output too (MEDDAP_LOG=debug does the same); by "
                        "default they go to files under <run_dir>/logs/ (a local folder on the driver's node "
                        "for an s3:// or gs:// run_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        with interrupt_on_sigterm():  # `ray job stop` and preemption send SIGTERM: stop as Ctrl-C does
            cfg = load_config(args.config, args.overrides)
            with logs.console(cfg.run_dir, f"job-{stage}", verbose=args.verbose):
                _run(stage, args, cfg)
                where = logs.ray_log_dir()
                logs.say(f"[job] {stage} finished in {time.perf_counter() - t0:.1f}s; outputs under {cfg.run_dir}"
                         + (f"; Ray's own messages: {where}" if where else ""))
    except BaseException as e:  # noqa: BLE001 - one line for user errors and Ctrl-C; bugs re-raise
        resume = f"python jobs/{stage}.py {resume_args(argv if argv is not None else sys.argv[1:])}".strip()
        return user_error_exit(f"jobs/{stage}.py", e, resume=resume)
    return 0


def _run(stage: str, args, cfg) -> None:
    """Run the stage (or the pipeline)."""
    # No ray.init here: the pipeline and every stage that uses Ray call meddap.raytools.ensure_ray,
    # which joins this job's cluster (RAY_ADDRESS) or starts a local Ray; a skipped stage needs none.
    if stage == "pipeline":
        from meddap.stages.pipeline import run

        run(cfg, force=args.force)
    else:
        # One stage, with the pipeline's bookkeeping: skipped when its record says done, refused
        # when its settings or inputs changed, recorded when it finishes.
        from meddap.stages.pipeline import run_stages

        run_stages(cfg, (stage,), force=[args.force] if args.force else ())
