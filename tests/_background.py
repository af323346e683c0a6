"""The suite's end-to-end cluster runs, started in the background when the run begins (not a test module).

Each of them drives Ray in other processes and spends most of its wall time waiting on Ray (node
starts, health checks, worker-group restarts, the autoscaler): measured on the 2-core box, the
node-loss run used 43 s of CPU in 305 s of wall time. Run one after another at the end of the suite
they cost about 9 minutes of waiting; started at collection time, they wait while the other tests
run, and each test module only collects its run's result (`result(name)` blocks until it is there).
tests/conftest.py moves the tests that collect a result to the end of the run.

- `node_loss`: tests/_cluster_faults.py on a `ray.cluster_utils.Cluster` (tests/test_node_loss.py);
- `signals` (then node_loss, in one lane): the sweep driver stopped by SIGTERM, then SIGKILL, then rerun
  (tests/classify/test_sweep_signals.py);
- `demo_job` then `autoscale` then `s3_pipeline`, in one lane: the demo submitted as a Ray job to a head
  that declares a GPU (tests/test_jobs.py, tests/test_pipeline.py), then the demo on an autoscaling fake
  multi-node cluster (tests/test_gpu_cluster.py), then the whole pipeline with its run dir in a moto S3
  bucket, twice (tests/test_storage.py; about 100 s, mostly waiting on Ray, that the foreground tests,
  the suite's critical path, no longer wait for). Two lanes, not three: three Ray clusters starting at once
  beside the suite's own Ray slowed every one of them on 2 cores.

A run starts only when a selected test needs it (`-k`, a single file, `-m 'not slow'` all work as
before); one still running when the session ends early (-x, Ctrl-C) is stopped. What a run returns or raises is handed to the test that asks, so a failure is
reported by that test, with the run's own log.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

# name -> what asks for it: a fixture name in a selected test's closure, or a test's name
NEEDS = {
    "node_loss": {"faults"},                          # tests/test_node_loss.py
    "demo_job": {"job", "demo_cfg"},                  # tests/test_jobs.py, tests/test_pipeline.py
    "autoscale": {"test_demo_with_gpu_defaults_on_an_autoscaling_cluster_from_zero_gpu_nodes"},
    "signals": {"test_sigterm_then_sigkill_then_rerun"},  # tests/classify/test_sweep_signals.py
    "s3_pipeline": {"test_whole_pipeline_with_s3_run_dir"},   # tests/test_storage.py
}
LANES = (("signals", "node_loss"), ("demo_job", "autoscale", "s3_pipeline"))

_results: dict[str, tuple[bool, Any]] = {}
_done: dict[str, threading.Event] = {name: threading.Event() for name in NEEDS}
_threads: list[threading.Thread] = []
_abort_hooks: list[Callable[[], None]] = []
_t0 = time.monotonic()
_spans: dict[str, tuple[float, float]] = {}   # name -> (start, end) in seconds since import (the session start)
_marks: dict[str, float] = {}


def mark(label: str) -> None:
    _marks[label] = time.monotonic() - _t0


def on_abort(hook: Callable[[], None]) -> None:
    """Runs register how to stop what they started, for a session that ends before they do (-x, Ctrl-C)."""
    _abort_hooks.append(hook)


def abort() -> None:
    """At the end of the session: stop what still runs (nothing, when every result was collected)."""
    if any(t.is_alive() for t in _threads):
        for hook in _abort_hooks:
            try:
                hook()
            except Exception:
                pass


def _runner(name: str) -> Callable[[], Any]:
    if name == "node_loss":
        from _cluster_faults import run_in_subprocess
        return run_in_subprocess
    if name == "demo_job":
        from _demo_run import demo_job
        return demo_job
    if name == "signals":
        from test_sweep_signals import run_signals  # tests/classify (on sys.path once collected)
        return run_signals
    if name == "s3_pipeline":
        from test_storage import run_s3_pipeline
        return run_s3_pipeline
    from _sim_cluster import autoscaling_demo
    return autoscaling_demo


def _lane(names: tuple[str, ...]) -> None:
    for name in names:
        start_s = time.monotonic() - _t0
        try:
            _results[name] = (True, _runner(name)())
        except BaseException as exc:  # handed to the test that asks for it
            _results[name] = (False, exc)
        finally:
            _spans[name] = (start_s, time.monotonic() - _t0)
            _done[name].set()


def timeline() -> str:
    """One line for the end of the run: when each background run started and ended, in seconds since the
    session started (the suite cannot end before the last of them: shows which lane bounds its wall time)."""
    if not _spans:
        return ""
    return "background runs (s since start): " + ", ".join(
        f"{n} {a:.0f}-{b:.0f}" for n, (a, b) in sorted(_spans.items(), key=lambda kv: kv[1])) + "".join(
        f"; {label} from {t:.0f}" for label, t in _marks.items())


def start(asked: set[str]) -> list[str]:
    """Start the lanes holding a run some selected test asks for (`asked`: the selected tests' fixture
    names and names); returns the names started."""
    wanted = {n for n, askers in NEEDS.items() if askers & asked}
    started = []
    for lane in LANES:
        names = tuple(n for n in lane if n in wanted)
        if names:
            t = threading.Thread(target=_lane, args=(names,), name="bg-" + "+".join(names), daemon=True)
            t.start()
            _threads.append(t)
            started += names
    return started


def result(name: str, timeout: float = 1800) -> Any:
    """The run's return value (running it here if it was not started); re-raises what it raised."""
    if not any(name in t.name for t in _threads) and name not in _results:
        _lane((name,))
    if not _done[name].wait(timeout):
        raise TimeoutError(f"background run {name} did not finish in {timeout:.0f} s")
    ok, value = _results[name]
    if not ok:
        raise value
    return value
