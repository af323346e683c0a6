"""The demo pipeline with its GPU defaults (`auto`) on simulated GPU clusters: Ray declares logical
GPUs on this CPU machine and the jobs run with MEDDAP_DEVICE=cpu, so every GPU request is made as on a
real cluster while the arithmetic runs on the CPU. Ray's state API then says where each piece ran.

(a) a head that declares a GPU (`ray start --num-gpus=1`), in the default run: ~90 s on a quiet
    2-core box, 115 s at a load average of 5;
(b) an autoscaling cluster (Ray's fake multi-node provider) whose head has no GPU and whose GPU worker
    type starts at 0 nodes: the GPU requests make the autoscaler add a GPU node. 110-150 s: marked slow
    (both together do not fit the default run's 90 s budget).

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
from _sim_cluster import autoscaling_head, cluster_state, gpu_head, gpu_of, stop

SMALL = ["data.folds=2", "data.image_size=32", "data.phantom.per_class=8", "data.phantom.size=48",
         "data.external.phantom.per_class=3", "data.external.phantom.size=48",
         "diffusion.resolution=32", "diffusion.train.epochs=1", "diffusion.lora.per_fold=false",
         'generate.adjectives=[""]', "generate.ratios=[1.0]", "generate.steps=2",
         "classify.models=[squeezenet1_1]", "classify.epochs=1", "classify.batch_size=16",
         "report.gradcam_images=1", "report.contact_sheet_per_cell=1"]
# The GPU-sized work of the pipeline, by the class of the Ray actor that runs it.
GPU_WORK = {"RayTrainWorker": "fine-tuning worker", "MapWorker(MapBatches(_GenerateActor))": "generation actor",
            "ImplicitFunc": "sweep trial"}


def _run(kind: str) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"meddap-gpu-{kind}-")
    run_dir = os.path.join(tmp, "run")
    if kind == "head":
        proc, url, ray_tmp = gpu_head(tmp)
        extra = []
    else:
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
    for line in ("[finetune] diffusion.train.use_gpu=auto: workers ask for one GPU each",
                 "[generate] generate.use_gpu=auto: actors ask for GPUs",
                 "[sweep] classify.gpus_per_trial=auto: each trial asks for 0.25 GPU"):
        assert line in log, line
    run = Path(result["run_dir"])
    adapter = json.loads((run / "adapters" / "all" / "adapter.json").read_text())
    assert adapter["device"].startswith("cpu") and "MEDDAP_DEVICE=cpu" in adapter["device"]  # computed on the CPU
    assert len(pd.read_parquet(run / "synthetic" / "manifest.parquet")) > 0
    assert len(pd.read_parquet(run / "summary" / "trials.parquet")["trial_id"].unique()) == 4
    assert (run / "report.md").is_file()

    state = result["state"]
    gpu_nodes = {n["node_id"] for n in state["nodes"] if float((n["resources"] or {}).get("GPU", 0)) > 0}
    assert gpu_nodes
    work = [a for a in state["actors"] if a["class_name"] in GPU_WORK]
    assert {a["class_name"] for a in work} == set(GPU_WORK), "each kind of GPU work ran"
    for a in work:
        assert gpu_of(a["required"]) > 0, f"{GPU_WORK[a['class_name']]} asked for no GPU: {a['required']}"
        assert a["node_id"] in gpu_nodes, f"{GPU_WORK[a['class_name']]} ran on a CPU-only node"
    # Nothing that asked for a GPU, actor or task, ran on a node without one.
    for item in state["actors"] + state["tasks"]:
        if gpu_of(item["required"]) > 0 and item.get("node_id"):
            assert item["node_id"] in gpu_nodes, item
    return gpu_nodes, work


@pytest.fixture(scope="module")
def on_gpu_head():
    return _run("head")


def test_demo_with_gpu_defaults_on_a_head_that_declares_gpus(on_gpu_head):
    gpu_nodes, work = _check(on_gpu_head)
    assert len(on_gpu_head["state"]["nodes"]) == 1
    _cleanup(on_gpu_head)


@pytest.mark.slow
def test_demo_with_gpu_defaults_on_an_autoscaling_cluster_from_zero_gpu_nodes():
    result = _run("autoscale")
    gpu_nodes, work = _check(result)
    nodes = {n["node_id"]: n for n in result["state"]["nodes"]}
    head = [n for n in nodes.values() if n["is_head"]]
    assert len(head) == 1 and float((head[0]["resources"] or {}).get("GPU", 0)) == 0  # a CPU-only head
    assert gpu_nodes and not gpu_nodes & {head[0]["node_id"]}  # the GPU node was added by the autoscaler
    assert "0 GPU(s) now, up to 1 (autoscaler node types in" in result["log"]  # auto decided before it existed
    assert all(a["node_id"] != head[0]["node_id"] for a in work)
    _cleanup(result)
