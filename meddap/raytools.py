"""Starting or joining Ray: the one place the library decides how to connect."""

from __future__ import annotations

import os

__all__ = ["ensure_ray", "cluster_resources"]


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


def cluster_resources() -> dict:
    import ray

    ensure_ray()
    return dict(ray.cluster_resources())
