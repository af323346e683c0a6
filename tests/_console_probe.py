"""A tiny Ray workload run under meddap's console, as a CLI command runs its stage (tests/test_console.py).

    python tests/_console_probe.py RUN_DIR [--verbose] [--light] [--fail]

It makes the chatter the issue lists: a worker's plain print (Ray prefixes it `(pid=...)`), Tune's
experiment table (printed by the driver) and its `Checkpoint successfully created` line (a worker's
logger), and Ray's own start-up lines (the driver's loggers, as Ray Data's progress logging); and
meddap's lines from the driver, a worker and a Progress loop.
--light: only the worker's print and meddap's lines (no Tune).
--fail: at the end, a task raises ValueError("boom in a worker").
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meddap import logs  # noqa: E402
from meddap.config import load_config  # noqa: E402
from meddap.progress import Progress  # noqa: E402
from meddap.raytools import ensure_ray  # noqa: E402


def _trainable(config):
    from ray import tune

    with tempfile.TemporaryDirectory() as d:
        Path(d, "state.txt").write_text("1")
        tune.report({"x": 1}, checkpoint=tune.Checkpoint.from_directory(d))


def main() -> None:
    run_dir = sys.argv[1]
    cfg = load_config("demo", [f"run_dir={run_dir}", "ray.num_cpus=2"])
    with logs.console(run_dir, "probe", verbose="--verbose" in sys.argv):
        logs.say("[probe] start")
        ensure_ray(cfg)
        import ray
        from ray import tune

        @ray.remote
        def work():
            print("plain worker chatter")
            logs.say("[probe] a line from a worker")
            return 1

        ray.get(work.remote())
        if "--light" not in sys.argv:
            tune.Tuner(_trainable, run_config=tune.RunConfig(
                name="probe", storage_path=os.path.abspath(os.path.join(run_dir, "ray")), verbose=0)).fit()
        loop = Progress(3, "probe loop", "steps", every_s=0.0)
        for _ in range(3):
            loop.update()
        logs.say("[probe] end")
        if "--fail" in sys.argv:  # a worker's error must reach the user with its cause
            @ray.remote
            def broken():
                raise ValueError("boom in a worker")

            ray.get(broken.remote())


if __name__ == "__main__":
    main()
