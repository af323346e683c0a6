"""Shared by the `ray job submit` entry points: parse `--config` and key=value, call one stage, exit.

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
    from meddap.config import ConfigError, load_config
    from meddap.errors import MeddapError

    p = argparse.ArgumentParser(prog=f"jobs/{stage}.py",
                                description=f"meddap {stage} as a Ray job (ray job submit --working-dir . -- "
                                            f"python jobs/{stage}.py --config paper run_dir=s3://bucket/run)")
    p.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)")
    if stage == "pipeline":
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="redo STAGE and every stage after it that depends on it (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        from meddap.raytools import ensure_ray

        ensure_ray(cfg)
        if stage == "pipeline":
            from meddap.stages.pipeline import run

            run(cfg, force=args.force)
        else:
            import importlib

            importlib.import_module(f"meddap.stages.{stage}").run(cfg)
    except (ConfigError, MeddapError) as e:
        print(f"jobs/{stage}.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"[job] {stage} finished in {time.perf_counter() - t0:.1f}s; outputs under {cfg.run_dir}", flush=True)
    return 0
