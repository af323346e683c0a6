"""Simulated GPU clusters on a CPU-only machine, for tests (not a test module).

Ray schedules on logical resources, so a CPU machine can host a cluster that *declares* GPUs:

- `gpu_head(tmp)`: `ray start --head --num-gpus=1` (tests/_demo_run.py's safe head: own temp dir,
  free loopback ports, stopped by signalling the `ray start --block` it started, never `ray stop`);
- `autoscaling_head(tmp)`: a CPU-only head whose autoscaler runs Ray's fake multi-node provider
  (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`, provider `fake_multinode`) with a
  GPU worker type that starts at 0 nodes: GPU requests make the autoscaler start a (local) GPU node.

Jobs run with MEDDAP_DEVICE=cpu, so every GPU request stays as it is while the compute runs on the
CPU. `cluster_state(url)` reads Ray's state API (nodes, actors, tasks with their node ids and
required resources) in a separate process, and `stop(...)` ends the head and then any fake worker
node processes of that cluster (found by the cluster's own temp dir in their command line).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _demo_run import ROOT, TINY_SD, _free_port, start_head, submit

__all__ = ["gpu_head", "autoscaling_head", "cluster_state", "stop", "gpu_of", "check_gpu_placement", "GPU_WORKER_TYPE",
           "GPU_WORK", "autoscaling_demo", "SMALL"]

GPU_WORKER_TYPE = "gpu_worker"
_PORTS = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
          "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
          "node-manager-port", "object-manager-port"]
# Small object stores: the box is shared and a simulated node needs only a few MB.
_OBJECT_STORE = 300 * 2**20


def gpu_head(tmp: str, gpus: int = 1) -> tuple[subprocess.Popen, str, str]:
    """(process, dashboard URL, Ray temp dir) of a 2-CPU head that declares `gpus` logical GPUs."""
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    proc, url = start_head(tmp, extra_args=(f"--num-gpus={gpus}", f"--object-store-memory={_OBJECT_STORE}"),
                           ray_tmp=ray_tmp)
    return proc, url, ray_tmp


def autoscaling_config(gcs_port: int, path: Path) -> str:
    """The fake multi-node provider's cluster config: a CPU-only head, GPU workers from 0 to 1 node."""
    config = {
        "cluster_name": "meddap-fake",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            GPU_WORKER_TYPE: {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": _OBJECT_STORE},
                              "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def autoscaling_head(tmp: str) -> tuple[subprocess.Popen, str, str, str]:
    """(process, dashboard URL, Ray temp dir, autoscaler config path) of a CPU-only head whose
    autoscaler can add one GPU node (fake multi-node provider, worker type starting at 0)."""
    ports = {n: _free_port() for n in _PORTS}
    config = autoscaling_config(ports["port"], Path(tmp) / "autoscaling.yaml")
    ray_tmp = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    proc, url = start_head(tmp, ports=ports, ray_tmp=ray_tmp,
                           extra_args=(f"--autoscaling-config={config}", "--num-gpus=0",
                                       f"--object-store-memory={_OBJECT_STORE}"),
                           env_extra={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    return proc, url, ray_tmp, config


def cluster_state(url: str) -> dict:
    """{"nodes", "actors", "tasks"} from Ray's state API (run in a child process: token auth, no ray.init)."""
    code = r"""
import json, sys
from ray.util.state import list_actors, list_nodes, list_tasks
url = sys.argv[1]
out = {
    "nodes": [dict(node_id=n.node_id, is_head=n.is_head_node, resources=n.resources_total, state=n.state,
                   labels=n.labels) for n in list_nodes(address=url, detail=True, limit=1000)],
    "actors": [dict(class_name=a.class_name, name=a.name, node_id=a.node_id, state=a.state,
                    required=a.required_resources) for a in list_actors(address=url, detail=True, limit=10000)],
    "tasks": [dict(name=t.name, type=t.type, node_id=t.node_id, state=t.state, required=t.required_resources)
              for t in list_tasks(address=url, detail=True, limit=10000)],
}
print("STATE" + json.dumps(out, default=str))
"""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120)
    line = next((l for l in res.stdout.splitlines() if l.startswith("STATE")), None)
    if line is None:
        raise RuntimeError(f"state API query failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(line[len("STATE"):])


def gpu_of(required: dict | None) -> float:
    """GPUs in a required-resources dict, also when Ray names them per placement-group bundle."""
    return float(sum(v for k, v in (required or {}).items() if k == "GPU" or k.startswith("GPU_group_")))


# The GPU-sized work of the pipeline, by the class of the Ray actor that runs it.
GPU_WORK = {"RayTrainWorker": "fine-tuning worker", "MapWorker(MapBatches(_GenerateActor))": "generation actor",
            "ImplicitFunc": "sweep trial"}
# What the stages say when `auto` turned their GPU requests on (the job log).
GPU_AUTO_LINES = ("[finetune] diffusion.train.use_gpu=auto: workers ask for one GPU each",
                  "[generate] generate.use_gpu=auto: actors ask for GPUs",
                  "[sweep] classify.gpus_per_trial=auto: each trial asks for 0.25 GPU")


def check_gpu_placement(state: dict, log: str) -> tuple[set, list]:
    """Issue 11 part 3: from Ray's state API, the fine-tuning workers, generation actors and sweep trials
    all asked for GPUs and ran on GPU nodes, and nothing that asked for a GPU ran on a CPU-only node.
    Returns (GPU node ids, GPU-work actors)."""
    for line in GPU_AUTO_LINES:
        assert line in log, line
    gpu_nodes = {n["node_id"] for n in state["nodes"] if float((n["resources"] or {}).get("GPU", 0)) > 0}
    assert gpu_nodes, "no node declares a GPU"
    work = [a for a in state["actors"] if a["class_name"] in GPU_WORK]
    assert {a["class_name"] for a in work} == set(GPU_WORK), "each kind of GPU work ran"
    for a in work:
        assert gpu_of(a["required"]) > 0, f"{GPU_WORK[a['class_name']]} asked for no GPU: {a['required']}"
        assert a["node_id"] in gpu_nodes, f"{GPU_WORK[a['class_name']]} ran on a CPU-only node"
    for item in state["actors"] + state["tasks"]:
        if gpu_of(item["required"]) > 0 and item.get("node_id"):
            assert item["node_id"] in gpu_nodes, item
    return gpu_nodes, work


def _processes_of(ray_tmp: str) -> list[int]:
    mine = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmd and int(pid) != os.getpid():
            mine.append(int(pid))
    return mine


def stop(proc: subprocess.Popen, ray_tmp: str, grace: float = 15.0) -> None:
    """End the head (`ray start --block`) and every process of this cluster, fake worker nodes
    included: all of them were started by this test (each named by the cluster's own temp dir in its
    command line; workers end with their raylet). SIGTERM to all at once, SIGKILL after `grace` s."""
    targets = [proc.pid] + _processes_of(ray_tmp) if proc.poll() is None else _processes_of(ray_tmp)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline:
            targets = ([proc.pid] if proc.poll() is None else []) + _processes_of(ray_tmp)
            if not targets:
                return
            time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


SMALL = ["data.folds=2", "data.image_size=32", "data.phantom.per_class=8", "data.phantom.size=48",
         "data.external.phantom.per_class=3", "data.external.phantom.size=48",
         "diffusion.resolution=32", "diffusion.train.epochs=1", "diffusion.lora.per_fold=false",
         'generate.adjectives=[""]', "generate.ratios=[1.0]", "generate.steps=2",
         "classify.models=[squeezenet1_1]", "classify.epochs=1", "classify.per_model={}", "classify.batch_size=16",
         "report.gradcam_images=1", "report.contact_sheet_per_cell=1", "classify.controls=[]", *TINY_SD]


def autoscaling_demo() -> dict:
    """The shrunk demo submitted to an autoscaling fake multi-node cluster with GPU workers from 0, with
    MEDDAP_DEVICE=cpu (tests/test_gpu_cluster.py); {run_dir, returncode, log, state, log_file, tmp}."""
    tmp = tempfile.mkdtemp(prefix="meddap-gpu-autoscale-")
    run_dir = os.path.join(tmp, "run")
    proc, url, ray_tmp, config = autoscaling_head(tmp)
    import _background

    _background.on_abort(lambda: stop(proc, ray_tmp))
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
