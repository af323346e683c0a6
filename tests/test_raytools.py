"""Starting Ray never hangs on someone else's cluster (issue 13 part 7), and SIGTERM acts like Ctrl-C.

The stale-file case is the one measured on this machine: after a `ray start --head` has stopped, its
`ray_current_cluster` file stays, and a bare `ray.init()` retries the dead head for more than 10
minutes. Each test here makes such a file in a private RAY_TMPDIR.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from meddap import raytools
from meddap.config import load_config
from meddap.errors import MeddapError

ROOT = Path(__file__).resolve().parents[1]


def _dead_address() -> str:
    """host:port where nothing listens (a port just freed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@pytest.fixture
def stale_ray_tmpdir(monkeypatch):
    """A short private RAY_TMPDIR whose ray/ray_current_cluster names a head that is gone."""
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths are limited
    dead = _dead_address()
    os.makedirs(os.path.join(tmp, "ray"))
    Path(tmp, "ray", "ray_current_cluster").write_text(dead)
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield tmp, dead
    shutil.rmtree(tmp, ignore_errors=True)


class _NoInit:
    """Stands in for ray.init where the test is about what happens before it."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    init = _NoInit()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return init


def test_address_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert raytools.ray_address(load_config("demo")) == ("local", "default")
    assert raytools.ray_address(None) == ("local", "default")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert raytools.ray_address(load_config("demo")) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert raytools.ray_address(load_config("demo", ["ray.address=auto"])) == ("auto", "ray.address")
    assert raytools.ray_address(load_config("demo", ["ray.address=local"])) == ("local", "ray.address")


def test_null_address_with_a_stale_cluster_file_starts_a_fresh_local_ray(stale_ray_tmpdir):
    """The real thing, in a subprocess (this process already runs the suite's Ray): meddap's ensure_ray
    with ray.address null starts its own Ray at once instead of retrying the dead head."""
    tmp, dead = stale_ray_tmpdir
    script = ("import ray; from meddap.config import load_config; from meddap.raytools import ensure_ray; "
              "ensure_ray(load_config('demo', ['ray.num_cpus=1'])); "
              "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    gcs = res.stdout.split("GCS", 1)[1].split()[0]
    assert gcs != dead
    assert "Failed to connect to GCS" not in res.stderr
    print(f"fresh local Ray next to a stale cluster file: {time.perf_counter() - t0:.1f}s")


def test_auto_with_a_stale_cluster_file_is_a_one_line_error(stale_ray_tmpdir, no_ray, monkeypatch):
    from ray._private import services

    tmp, dead = stale_ray_tmpdir
    # No other Ray runs here (on a shared machine one may: Ray's "auto" then joins it, as documented).
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
    dead = services.canonicalize_bootstrap_address(dead)  # Ray names the local host by its IP
    cfg = load_config("demo", ["ray.address=auto", "ray.connect_timeout_s=1"])
    t0 = time.perf_counter()
    with pytest.raises(MeddapError, match=rf"Ray cluster at {re.escape(dead)} \(ray.address=auto\) did not answer within 1 s"
                                          r".*ray start --head.*null"):
        raytools.ensure_ray(cfg)
    assert time.perf_counter() - t0 < 10
    assert no_ray.calls == []


def test_explicit_dead_address_fails_within_the_timeout(no_ray, monkeypatch):
    dead = _dead_address()
    monkeypatch.setenv("RAY_ADDRESS", dead)
    cfg = load_config("demo", ["ray.connect_timeout_s=2"])
    t0 = time.perf_counter()
    with pytest.raises(MeddapError) as e:
        raytools.ensure_ray(cfg)
    took = time.perf_counter() - t0
    assert 1.5 < took < 10, took  # it retried for the timeout (a head still starting), then gave up
    msg = str(e.value)
    assert "\n" not in msg and dead in msg and "RAY_ADDRESS" in msg and "unset RAY_ADDRESS" in msg
    assert no_ray.calls == []


def test_live_address_is_joined(no_ray, monkeypatch):
    """Something answers at the address: ensure_ray hands it to ray.init (and 'local' starts one)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    addr = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        raytools.ensure_ray(load_config("demo", [f"ray.address={addr}"]))
    finally:
        server.close()
    assert no_ray.calls[-1]["address"] == addr
    monkeypatch.setenv("RAY_ADDRESS", addr)
    raytools.ensure_ray(load_config("demo", ["ray.address=local", "ray.num_cpus=1"]))
    assert no_ray.calls[-1]["address"] == "local" and no_ray.calls[-1]["include_dashboard"] is False


def test_malformed_address_says_what_is_expected(no_ray):
    with pytest.raises(MeddapError, match="is not host:port"):
        raytools.ensure_ray(load_config("demo", ["ray.address=nohostport"]))


def test_sigterm_acts_like_ctrl_c():
    """SIGTERM runs the SIGINT handler in force (Tune's graceful stop, Train's abort), else raises
    KeyboardInterrupt; ray.init's own SIGTERM handler (a C++ stack dump) does not stay installed."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with raytools.interrupt_on_sigterm():
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            seen = []
            signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert seen == [signal.SIGINT]
            ours = signal.getsignal(signal.SIGTERM)
            with raytools.keep_sigint_handler():
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init / fit() would leave
            assert signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM], "the caller's handler is back"
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
