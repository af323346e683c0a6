"""Kill the driver of `python -m meddap run` at chosen points of each stage, rerun, and check the result.

    python tools/killpoints.py OUT_DIR [--signal KILL|TERM] [--only finetune,sweep]

For every kill point: a fresh run_dir, `run` started, the driver sent SIGKILL (or SIGTERM) when its
output shows the point was reached, the same command run again to the end; then the run dir is
compared with an undisturbed run of the same config:
  - adapters (safetensors tensors), synthetic PNG pixels, trials and predictions (metrics, no
    duplicates, none missing), report present;
  - the first run's stage record (running = killed, interrupted = SIGTERM) and exit status;
  - Ray processes the killed driver left running (a local Ray dies with its driver).
Prints a Markdown table (docs/faults.md holds the one measured on the 2-core dev box). Minutes of
CPU: run it under `nice`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = ["data.phantom.per_class=8", "data.external.phantom.per_class=4", "diffusion.lora.per_fold=false",
             "diffusion.train.epochs=20", "generate.adjectives=['', dark]", "generate.ratios=[0.5]",
             "generate.steps=2", "generate.batch_size=2", "classify.models=[squeezenet1_1]", "classify.epochs=4",
             "classify.checkpoint_seconds=0", "report.gradcam_images=1"]

# (stage, what the driver has printed when the kill is sent, extra delay in seconds, in words)
KILL_POINTS = [
    ("prepare", r"\[pipeline\] prepare: running", 0.3, "0.3 s into prepare (writing the phantom)"),
    ("finetune", r"epoch 2/20 done", 0.0, "after epoch 2 of 20 (checkpointed)"),
    ("generate", r"\[generate\] \d+/\d+ images .*in the run", 0.0, "after the first generated batch"),
    ("fid", r"\[pipeline\] fid: running", 0.0, "as fid starts"),
    ("sweep", r"\[sweep\] finished ", 0.0, "after the first finished trial"),
    ("report", r"\[pipeline\] report: running", 1.0, "1 s into report (figures)"),
]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "meddap", "run", f"run_dir={run_dir}", *OVERRIDES]


def _env(tag: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", RAY_TMPDIR=f"/tmp/kp{os.getpid()}{tag}")
    env.pop("RAY_ADDRESS", None)
    os.makedirs(env["RAY_TMPDIR"], exist_ok=True)
    return env


def _ray_processes(ray_tmp: str) -> list[int]:
    """pids of processes whose command line names this run's Ray temp dir (its raylet, GCS, workers)."""
    out = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def run_and_kill(run_dir: Path, pattern: str, delay: float, sig: int, tag: str) -> dict:
    env = _env(tag)
    proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    rx = re.compile(pattern)
    fired: dict = {}
    lines = []

    def fire():
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
            fired["at"] = time.time()

    for line in proc.stdout:
        lines.append(line)
        if not fired and rx.search(line):
            fired["seen"] = True
            threading.Thread(target=fire, daemon=True).start()
    rc = proc.wait()
    time.sleep(3)  # a local Ray shuts down with its driver; give it a moment
    left = _ray_processes(env["RAY_TMPDIR"])
    for pid in left:  # ours only: they name our private RAY_TMPDIR
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"rc": rc, "killed": "at" in fired, "log": "".join(lines), "ray_left": len(left)}


def rerun(run_dir: Path, tag: str) -> dict:
    t0 = time.time()
    res = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(tag), capture_output=True, text=True, timeout=1800)
    return {"rc": res.returncode, "seconds": time.time() - t0, "log": res.stdout + res.stderr}


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two finished run dirs (empty: equal)."""
    import numpy as np
    import pandas as pd
    from PIL import Image
    from safetensors.torch import load_file

    diffs = []
    wa, wb = (load_file(str(p / "adapters" / "all" / "pytorch_lora_weights.safetensors")) for p in (a, b))
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    if worst > 1e-6:
        diffs.append(f"adapter differs by {worst:g}")
    sa, sb = (pd.read_parquet(p / "synthetic" / "manifest.parquet") for p in (a, b))
    if list(sa["image_id"]) != list(sb["image_id"]):
        diffs.append("synthetic image lists differ")
    else:
        bad = sum(not np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
                  for x, y in zip(sa["path"], sb["path"]))
        if bad:
            diffs.append(f"{bad} synthetic images differ")
    ta, tb = (pd.read_parquet(p / "summary" / "trials.parquet") for p in (a, b))
    for t, name in ((ta, "killed"), (tb, "undisturbed")):
        if t.duplicated(["trial_id", "eval_set"]).any():
            diffs.append(f"duplicate trial rows in the {name} run")
    if set(ta["trial_id"]) != set(tb["trial_id"]):
        diffs.append(f"trial sets differ: {sorted(set(ta['trial_id']) ^ set(tb['trial_id']))}")
    else:
        cols = ["trial_id", "eval_set", "accuracy", "f1", "confusion", "best_epoch"]
        x = ta[cols].sort_values(["trial_id", "eval_set"]).reset_index(drop=True)
        y = tb[cols].sort_values(["trial_id", "eval_set"]).reset_index(drop=True)
        if not x.equals(y):
            diffs.append("trial metrics differ")
    pa, pb = (pd.read_parquet(p / "summary" / "predictions.parquet") for p in (a, b))
    key = [c for c in ("trial_id", "eval_set", "image_id") if c in pa.columns]
    if pa.duplicated(key).any() or len(pa) != len(pb):
        diffs.append(f"predictions: {len(pa)} rows vs {len(pb)}")
    if not (a / "report.md").exists():
        diffs.append("no report.md")
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    p.add_argument("--only", default="", help="comma-separated stages (default: every kill point)")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig = getattr(signal, f"SIG{args.signal}")
    ref = out / "undisturbed"
    if not (ref / "report.md").exists():
        shutil.rmtree(ref, ignore_errors=True)
        r = rerun(ref, "ref")
        if r["rc"] != 0:
            sys.exit("undisturbed run failed:\n" + r["log"][-3000:])
        print(f"undisturbed run: {r['seconds']:.0f}s", flush=True)
    rows = []
    only = set(filter(None, args.only.split(",")))
    for stage, pattern, delay, words in KILL_POINTS:
        if only and stage not in only:
            continue
        run_dir = out / f"killed-{stage}"
        shutil.rmtree(run_dir, ignore_errors=True)
        k = run_and_kill(run_dir, pattern, delay, sig, stage[:3])
        rec_path = run_dir / "stages" / f"{stage}.json"
        status = json.loads(rec_path.read_text())["status"] if rec_path.exists() else "no record"
        r = rerun(run_dir, stage[:3] + "2")
        diffs = compare(run_dir, ref) if r["rc"] == 0 else [f"rerun failed (exit {r['rc']})"]
        resumed = re.findall(r"\[pipeline\] (\w+): (running \(resuming[^)]*\)|done already|\d+ output\(s\) damaged)",
                             r["log"])
        rows.append({"stage": stage, "point": words, "exit": k["rc"], "killed": k["killed"],
                     "record": status, "ray_left": k["ray_left"], "rerun_exit": r["rc"],
                     "rerun_s": round(r["seconds"]), "resumed": "; ".join(f"{s}: {w}" for s, w in resumed
                                                                           if not w.startswith("done")),
                     "equal": "yes" if not diffs else "; ".join(diffs)})
        print(json.dumps(rows[-1]), flush=True)
        (out / f"log-{stage}.txt").write_text(k["log"] + "\n===== rerun =====\n" + r["log"])
    print(f"\n| stage | driver got SIG{args.signal} | exit | record left | Ray processes left | "
          f"rerun | rerun said | outputs equal to undisturbed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['stage']} | {r['point']} | {r['exit']} | {r['record']} | {r['ray_left']} | "
              f"exit {r['rerun_exit']}, {r['rerun_s']} s | {r['resumed'] or '-'} | {r['equal']} |")


if __name__ == "__main__":
    main()
