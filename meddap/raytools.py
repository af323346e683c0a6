"""Starting or joining Ray: the one place the library decides how to connect.

`ray.address` (config) decides, with RAY_ADDRESS (set by `ray job submit`) as the fallback:
  - null:             a fresh local Ray (`ray.init(address="local")`) unless RAY_ADDRESS is set, then
                      that cluster. Never the cluster `$RAY_TMPDIR/ray/ray_current_cluster` names: that
                      file outlives the head it names, and Ray retries a dead head forever.
  - "auto":           the cluster running on this machine, joined on purpose.
  - "local":          a fresh local Ray, even when RAY_ADDRESS is set.
  - host:port, ray://host:port: that cluster.
Any cluster to be joined must answer within `ray.connect_timeout_s`, else a one-line MeddapError
names the address and the fix.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

from meddap import logs
from meddap.errors import MeddapError

__all__ = ["ensure_ray", "cluster_resources", "keep_sigint_handler", "ray_address", "interrupt_on_sigterm"]

_DEFAULT_CONNECT_TIMEOUT_S = 30.0  # ray.connect_timeout_s's default, for callers without a config


def ray_address(cfg=None) -> tuple[str, str]:
    """(address to pass to ray.init, where it came from). The address is "local", "auto" or explicit."""
    configured = cfg.ray.address if cfg is not None else None
    if configured:
        return configured.strip(), "ray.address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    return "local", "default"


def _resolve_auto() -> str:
    """host:port of the cluster `ray.init(address="auto")` would join, or MeddapError when there is none."""
    from ray._private import services

    try:
        found = services.canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise MeddapError("ray.address=auto: no Ray cluster is running on this machine. Start one with "
                          "`ray start --head`, or set ray.address to null to start a local Ray for this run.")
    return found


def _host_port(address: str) -> tuple[str, int]:
    bare = address.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise MeddapError(f"ray address {address!r} is not host:port (or ray://host:port); fix ray.address "
                          f"(or RAY_ADDRESS), or set ray.address to null to start a local Ray.")
    return host.strip("[]"), int(port)


def _answers(address: str, timeout_s: float) -> bool:
    """True when something accepts connections at `address` within `timeout_s` (retrying refusals: a
    head that is still starting). Ray's own connect never gives up on a dead head."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)):
                return True
        except OSError:
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def ensure_ray(cfg=None) -> None:
    """Start or join Ray as `ray_address` says (see the module docstring); a no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    address, origin = ray_address(cfg)
    timeout = cfg.ray.connect_timeout_s if cfg is not None else _DEFAULT_CONNECT_TIMEOUT_S
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    with keep_signal_handlers(signal.SIGTERM):  # ray.init installs its own (a C++ stack dump on SIGTERM)
        if address == "local":
            num_cpus = cfg.ray.num_cpus if cfg is not None else None
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        else:
            target = _resolve_auto() if address == "auto" else address
            if not _answers(target, timeout):
                fix = ("start it (`ray start --head`) or" if address == "auto" else "check the address, start that "
                       "cluster, or")
                raise MeddapError(
                    f"the Ray cluster at {target} ({origin}={address}) did not answer within {timeout:g} s; {fix} "
                    f"set ray.address to null" + (" and unset RAY_ADDRESS" if origin == "RAY_ADDRESS" else "")
                    + " to start a local Ray for this run.")
            logs.say(f"[ray] joining the Ray cluster at {target} ({origin}={address})")
            ray.init(address=address, log_to_driver=True)
    # Worker lines must reach the driver (log_to_driver=True): the quiet console files them and shows
    # meddap's own (meddap.logs); this swaps Ray's printer for that filter when a quiet command runs.
    logs.attach_ray()


def cluster_resources() -> dict:
    import ray

    ensure_ray()
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def keep_signal_handlers(*signals: int):
    """Put the caller's handlers of `signals` back after the block (main thread only)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in signals} if main else {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python; leave it alone
                signal.signal(s, handler)


def keep_sigint_handler():
    """Put the caller's Ctrl-C (and SIGTERM) handlers back after the block.

    Ray Train's and Ray Tune's `fit()` install their own SIGINT handlers and leave them installed after
    they return (Ray 2.60). Ray Train's stale handler then swallows a later Ctrl-C (it "aborts" a run
    that is over), so a pipeline that fine-tuned could no longer be stopped in generate or sweep.
    """
    return keep_signal_handlers(signal.SIGINT, signal.SIGTERM)


def _sigterm_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (timeout, Slurm, Kubernetes, spot preemption) does what Ctrl-C does at this moment: the
    SIGINT handler in force (Tune's graceful stop, Train's abort) or KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _sigterm_like_ctrl_c:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_on_sigterm():
    """Within the block, SIGTERM is handled like Ctrl-C (the CLI and job entry points run in it); the
    previous handler is put back after, so calling `main()` in a process leaves no trace."""
    with keep_signal_handlers(signal.SIGTERM):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _sigterm_like_ctrl_c)
        yield
