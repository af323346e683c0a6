"""Starting or joining Ray: the one place the library decides how to connect."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

__all__ = ["ensure_ray", "cluster_resources", "keep_sigint_handler"]


def ensure_ray(cfg=None) -> None:
    """Join the cluster this process runs in (ray job submit sets RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = cfg.ray.num_cpus if cfg is not None else None
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    # Worker lines must reach the driver (log_to_driver=True): the quiet console files them and shows
    # meddap's own (meddap.logs); this swaps Ray's printer for that filter when a quiet command runs.
    from meddap import logs

    logs.attach_ray()


def cluster_resources() -> dict:
    import ray

    ensure_ray()
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def keep_sigint_handler():
    """Put the caller's Ctrl-C handler back after the block.

    Ray Train's and Ray Tune's `fit()` install their own SIGINT handlers and leave them installed after
    they return (Ray 2.60). Ray Train's stale handler then swallows a later Ctrl-C (it "aborts" a run
    that is over), so a pipeline that fine-tuned could no longer be stopped in generate or sweep.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python; leave it alone
            signal.signal(signal.SIGINT, previous)
