"""Node loss on a real multi-node Ray cluster made on this machine (issue 13 parts 1-2).

Run by tests/test_node_loss.py in a subprocess (a process can hold only one Ray; the suite's own
local Ray lives in the test process):

    python tests/_cluster_faults.py OUT_DIR

`ray.cluster_utils.Cluster` starts a head with no CPUs (it holds the driver and Ray's own actors)
and worker nodes of 1 CPU each, every one a separate raylet with its own processes. Each stage
runs through meddap's code; a watcher thread removes the worker node that runs the stage's work
as soon as the stage has made progress worth keeping (a registered checkpoint, some images, a trial
checkpoint), and the stage must finish on the node left. A fresh node is added before the next
stage, as a spot fleet replaces a preempted instance. What happened is written to
OUT_DIR/events.json; the test compares the outputs with undisturbed runs of the same code.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
# A watcher that never sees its trigger gives up (the test then fails with a reason). Measured: the elastic
# run's first registered checkpoint came 86 s in with the suite's other work beside it, and over 120 s
# with the suite in two xdist workers on the busy 2-core box.
TIMEOUT_S = 300

from _demo_run import TINY_SD  # tests/ is on sys.path (this file's folder when run as a script)


def overrides(run_dir: str) -> list[str]:
    """The smallest demo: 6 phantom images a class, tiny SD, one classifier, 2 folds. 10 fine-tuning epochs:
    the node goes when epoch 1's checkpoint is registered (at the Train controller's next poll, every
    0.5 s here), and the epochs after it must outlast that on a fast machine (about 0.2 s a step with the
    suite beside it on the 2-core box; 20 epochs cost about a minute more of the run for no more checks)."""
    return [f"run_dir={run_dir}", "data.phantom.per_class=6", "data.external.source=null",
            "diffusion.lora.per_fold=false", "diffusion.train.epochs=10", "diffusion.train.max_failures=2",
            "generate.adjectives=['', dark]", "generate.ratios=[1.0]", "generate.steps=6", "generate.batch_size=2",
            "generate.cpus_per_worker=0.5", "generate.workers=2", "classify.models=[squeezenet1_1]", "classify.epochs=4", "classify.per_model={}",
            "classify.checkpoint_seconds=0", "classify.batch_size=8", "classify.max_failures=3",
            "classify.image_size=32", "fid.dims=64", "classify.controls=[]", *TINY_SD]


class Chaos:
    """Removes the node running the stage's work (an actor of `actor_class`) when `trigger()` first holds.
    The stage must finish on the node that is left."""

    def __init__(self, cluster, events: list, stage: str, actor_class: str, trigger):
        self.cluster, self.events, self.stage = cluster, events, stage
        self.actor_class, self.trigger = actor_class, trigger
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=TIMEOUT_S)

    def _victim(self):
        from ray._private.state import actors  # the GCS's actor table (the state API needs a dashboard)

        busy = {a["Address"]["NodeID"] for a in actors().values()
                if self.actor_class in a["ActorClassName"] and a["State"] == "ALIVE"}
        for node in self.cluster.worker_nodes:
            if node.node_id in busy:
                return node
        return None

    def _run(self):
        t0 = time.time()
        while time.time() - t0 < TIMEOUT_S:
            if self.trigger():
                node = self._victim()
                if node is not None:
                    self.cluster.remove_node(node, allow_graceful=False)
                    self.events.append({"stage": self.stage, "removed": node.node_id, "at_s": round(time.time() - t0, 2)})
                    return
            time.sleep(0.05)
        self.events.append({"stage": self.stage, "error": "trigger never held"})


def registered_checkpoint(run_root: str):
    """A trigger: Ray Train has registered a checkpoint of the run (a checkpoint written to storage but
    not yet reported to the controller when the node dies is not resumed from, by Train's design)."""
    def check() -> bool:
        for snap in glob.glob(os.path.join(run_root, "*", "checkpoint_manager_snapshot.json")):
            try:
                if json.loads(Path(snap).read_text()).get("checkpoint_results"):
                    return True
            except (OSError, ValueError):
                pass  # being written
        return False
    return check


def top_up(cluster, events: list, n: int = 2) -> None:
    """Add worker nodes until `n` are alive, as a spot fleet replaces lost instances (main thread only:
    starting a node installs signal handlers)."""
    while len(cluster.worker_nodes) < n:
        events.append({"added": cluster.add_node(**NODE).node_id})
    cluster.wait_for_nodes()


def main(out_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from meddap import storage
    from meddap.config import load_config
    from meddap.layout import RunLayout
    from meddap.stages import finetune, generate, prepare, sweep

    out = Path(out_dir)
    events: list = []
    # Every Ray process of the cluster inherits this: after a node loss, elastic Train may first try the
    # old group size on a stale view of the cluster; that attempt gives up after this (default 60 s).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    # The Train controller polls its workers every 0.5 s (default 2 s): a checkpoint is registered, and a
    # lost worker noticed, that much sooner.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # A lost node is declared dead after ~3 s of missed health checks (Ray's default waits longer).
    head = {"num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    top_up(cluster, events)
    ray.init(address=cluster.address, log_to_driver=False)
    t_all = time.time()
    try:
        run_dir = str(out / "run")
        cfg = load_config("demo", overrides(run_dir))
        lay = RunLayout(run_dir)
        prepare.run(cfg)

        # 1. elastic finetune first: Train's resource view (refreshed every 20 s) then sees both nodes, so it
        # starts 2 workers (one per node); one node is lost and training continues with one.
        el_dir = str(out / "elastic")
        el = load_config("demo", overrides(el_dir) + ["diffusion.train.num_workers=2", "diffusion.train.min_workers=1"])
        storage.write_bytes(RunLayout(el_dir).manifest, storage.read_bytes(lay.manifest))
        t0 = time.time()
        with Chaos(cluster, events, "elastic", "RayTrainWorker",
                   registered_checkpoint(os.path.join(RunLayout(el_dir).ray_storage, "finetune"))):
            finetune.run(el)
        events.append({"stage": "elastic", "seconds": round(time.time() - t0, 1)})
        top_up(cluster, events)

        # 2. finetune (Ray Train, 1 worker): lose its node after the first epoch checkpoint.
        t0 = time.time()
        with Chaos(cluster, events, "finetune", "RayTrainWorker",
                   registered_checkpoint(os.path.join(lay.ray_storage, "finetune"))):
            finetune.run(cfg)
        events.append({"stage": "finetune", "seconds": round(time.time() - t0, 1)})
        top_up(cluster, events)

        # 3. generate (Ray Data actor pool on two nodes): lose one after the first images landed.
        pngs = os.path.join(lay.synthetic_dir, "all", "*", "*", "*.png")
        t0 = time.time()
        # At the first image: with the tiny SD a stage of 18 images is over in seconds (6 steps, not 2, leave the
        # watcher a window; at 2 steps it once found no live actor left to remove).
        with Chaos(cluster, events, "generate", "_GenerateActor", lambda: len(glob.glob(pngs)) >= 1):
            generate.run(cfg)
        events.append({"stage": "generate", "seconds": round(time.time() - t0, 1)})
        top_up(cluster, events)

        # 4. sweep (Ray Tune, trials on both nodes): lose one after a trial checkpointed.
        tckpt = os.path.join(lay.ray_storage, "sweep", "*", "*", "checkpoint_*")
        t0 = time.time()
        with Chaos(cluster, events, "sweep", "ImplicitFunc", lambda: glob.glob(tckpt)):
            sweep.run(cfg)
        events.append({"stage": "sweep", "seconds": round(time.time() - t0, 1)})
    finally:
        events.append({"total_s": round(time.time() - t_all, 1)})
        (out / "events.json").write_text(json.dumps(events, indent=1))
        ray.shutdown()
        cluster.shutdown()


def run_in_subprocess() -> dict:
    """Run main() in a fresh process (a process holds one Ray; the suite's own lives in the test process),
    in its own temp dir and Ray temp dir; {out, events, returncode, log}. Started in the background at
    the beginning of the test run (tests/_background.py)."""
    import atexit
    import shutil
    import signal
    import subprocess
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    import _background

    out = Path(tempfile.mkdtemp(prefix="meddap-node-loss-"))
    if not os.environ.get("MEDDAP_KEEP_DEMO"):
        atexit.register(shutil.rmtree, str(out), ignore_errors=True)
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / f"nl{os.getpid()}"  # short: unix socket paths
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ADDRESS", None)
    log = out / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_cluster_faults.py"), str(out)], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        _background.on_abort(lambda: os.killpg(proc.pid, signal.SIGTERM))
        try:
            returncode = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    events = json.loads((out / "events.json").read_text()) if (out / "events.json").exists() else []
    return {"out": out, "events": events, "returncode": returncode, "log": log.read_text()}


if __name__ == "__main__":
    main(sys.argv[1])
