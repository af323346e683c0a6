"""The demo pipeline with its GPU defaults (`auto`) on a simulated autoscaling GPU cluster (issue 11
part 3b): a CPU-only head whose autoscaler runs Ray's fake multi-node provider, with a GPU worker type
that starts at 0 nodes. The GPU requests make the autoscaler add a GPU node; the job runs with
MEDDAP_DEVICE=cpu, so every GPU request is made as on a real cluster while the arithmetic runs on the
CPU. Ray's state API then says where each piece ran. 110-150 s on the shared 2-core box: marked slow.

Part 3a (a head that declares GPUs) is the suite's demo job itself: tests/_demo_run.py submits it to a
head started with --num-gpus=1 and tests/test_jobs.py checks the placement, so the suite pays for one
end-to-end job on a GPU head, not two.

The demo is shrunk hard by overrides (1 classifier, 1 adjective, 1 ratio, 2 folds, 1 epoch, 32 px,
one shared adapter); what is checked is placement, not results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from _demo_run import ROOT, submit
from _sim_cluster import autoscaling_head, check_gpu_placement, cluster_state, stop

SMALL = ["data.folds=2", "data.image_size=32", "data.phantom.per_class=8", "data.phantom.size=48",
         "data.external.phantom.per_class=3", "data.external.phantom.size=48",
         "diffusion.resolution=32", "diffusion.train.epochs=1", "diffusion.lora.per_fold=false",
         'generate.adjectives=[""]', "generate.ratios=[1.0]", "generate.steps=2",
         "classify.models=[squeezenet1_1]", "classify.epochs=1", "classify.batch_size=16",
         "report.gradcam_images=1", "report.contact_sheet_per_cell=1", "classify.controls=[]"]


def _run() -> dict:
    tmp = tempfile.mkdtemp(prefix="meddap-gpu-autoscale-")
    run_dir = os.path.join(tmp, "run")
    proc, url, ray_tmp, config = autoscaling_head(tmp)
    extra = [f"ray.autoscaling_config={config}"]  # the driver runs on the head, where the autoscaler's config is
    try:
        # Nodes share this machine's disk: run the checkout in place (no --working-dir upload, whose
        # per-node cleanup would race on the one shared session folder of a fake multi-node cluster).
        res = submit(url, ["python", str(ROOT / "jobs" / "pipeline.py"), "--config", "demo", f"run_dir={run_dir}",
                           *SMALL, *extra],
                     env_vars={"MEDDAP_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}, upload=False, timeout=900)
        state = cluster_state(url) if res.returncode == 0 else None
    finally:
        stop(proc, ray_tmp)
    result = {"run_dir": run_dir, "returncode": res.returncode, "log": res.stdout + res.stderr, "state": state,
              "log_file": os.path.join(tmp, "job.log"), "tmp": tmp}
    Path(result["log_file"]).write_text(result["log"])
    Path(tmp, "state.json").write_text(json.dumps(state, indent=1))
    return result


def _cleanup(result: dict) -> None:
    """After the checks passed: a failed run's folder (job.log, state.json, run/) stays for a look."""
    if not os.environ.get("MEDDAP_KEEP_DEMO"):
        shutil.rmtree(result["tmp"], ignore_errors=True)


def _check(result: dict) -> tuple[set, list]:
    """Common checks; returns (GPU node ids, GPU-work actors)."""
    log = result["log"]
    assert result["returncode"] == 0, f"job failed (log: {result['log_file']}):\n{log[-6000:]}"
    run = Path(result["run_dir"])
    adapter = json.loads((run / "adapters" / "all" / "adapter.json").read_text())
    assert adapter["device"].startswith("cpu") and "MEDDAP_DEVICE=cpu" in adapter["device"]  # computed on the CPU
    assert len(pd.read_parquet(run / "synthetic" / "manifest.parquet")) > 0
    assert len(pd.read_parquet(run / "summary" / "trials.parquet")["trial_id"].unique()) == 4
    assert (run / "report.md").is_file()
    return check_gpu_placement(result["state"], log)


@pytest.mark.slow
def test_demo_with_gpu_defaults_on_an_autoscaling_cluster_from_zero_gpu_nodes():
    result = _run()
    gpu_nodes, work = _check(result)
    nodes = {n["node_id"]: n for n in result["state"]["nodes"]}
    head = [n for n in nodes.values() if n["is_head"]]
    assert len(head) == 1 and float((head[0]["resources"] or {}).get("GPU", 0)) == 0  # a CPU-only head
    assert gpu_nodes and not gpu_nodes & {head[0]["node_id"]}  # the GPU node was added by the autoscaler
    assert "0 GPU(s) now, up to 1 (autoscaler node types in" in result["log"]  # auto decided before it existed
    assert all(a["node_id"] != head[0]["node_id"] for a in work)
    _cleanup(result)
