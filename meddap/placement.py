"""GPU placement for the Ray stages: what the `auto` GPU settings resolve to, decided on the driver.

`diffusion.train.use_gpu`, `generate.use_gpu` and `classify.gpus_per_trial` default to `auto`: use
GPUs when the Ray cluster has them or can add them. `gpu_outlook()` says which, from the running
cluster, in this order:

1. GPUs in the cluster now (`ray.cluster_resources()`).
2. The autoscaler's cluster config in the GCS, where the platform reports one (autoscaler v2 setups,
   KubeRay; the same source Ray Train and Ray Data size their requests from): its node groups' GPUs
   times their max counts.
3. The cluster launcher's config on this node: `ray.autoscaling_config`, else
   `~/ray_bootstrap_config.yaml`, which `ray up` writes on the head where `ray job submit` runs the
   driver: node types' `resources.GPU` times their `max_workers` (the head counts once).
4. Otherwise a fixed cluster: the GPUs it has now (none).

`true`/a number asks for GPUs whatever the outlook (a warning when none can come: Ray would wait);
`false`/`0` never asks. When the work is GPU-sized (a base model whose UNet has at least
`GPU_SIZED_UNET_PARAMETERS` parameters, as SD-1.x's 859.5 M), `auto` without any GPU in sight is an
error that says how to proceed, and `false` runs on the CPU with a loud warning: such a model never
lands on a CPU silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from meddap.errors import MeddapError

__all__ = ["GpuOutlook", "gpu_outlook", "resolve_use_gpu", "resolve_gpus_per_trial", "gpu_sized",
           "warn", "GPU_SIZED_UNET_PARAMETERS", "BOOTSTRAP_CONFIG"]

# A UNet this large takes minutes per step or image on a CPU (SD-1.x: 859.5 M parameters); the
# builtin tiny model (~1 M) and other test-sized models stay far below.
GPU_SIZED_UNET_PARAMETERS = 100_000_000
# Where `ray up` leaves the cluster config on the head node (the autoscaler reads it from there).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class GpuOutlook:
    now: float                      # GPUs in the cluster now
    most: float                     # the most GPUs the cluster can have (>= now)
    source: str                     # how `most` was decided, for the log

    @property
    def any(self) -> bool:
        return self.most > 0

    def __str__(self) -> str:
        return f"{self.now:g} GPU(s) now, up to {self.most:g} ({self.source})"


def warn(msg: str) -> None:
    """A warning a user must not miss: on stderr, on its own lines, whatever the log level."""
    from meddap import logs

    logs.error(f"\n[meddap] WARNING: {msg}\n")


def _gcs_max_gpus() -> Optional[float]:
    try:
        import ray._private.state as state

        most = state.state.get_max_resources_from_cluster_config()
    except Exception:  # an older Ray, or no config reported: not an answer
        return None
    if not most:
        return None
    return float(most.get("GPU", 0) or 0)


def _launcher_max_gpus(path: str) -> Optional[float]:
    """GPUs a cluster-launcher config's node types can add up to; None when the file is absent."""
    import yaml

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return None
    try:
        config = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MeddapError(f"cannot read the autoscaler's cluster config {path} (ray.autoscaling_config): {e}. "
                          f"Fix the file or point ray.autoscaling_config elsewhere.") from None
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    total = 0.0
    for name, node_type in types.items():
        gpus = float(((node_type or {}).get("resources") or {}).get("GPU", 0) or 0)
        count = 1 if name == head else int((node_type or {}).get("max_workers", config.get("max_workers", 0)) or 0)
        total += gpus * max(count, 0)
    return total


def gpu_outlook(cfg=None, resources: Optional[dict] = None) -> GpuOutlook:
    """GPUs of the Ray cluster this process is connected to, now and at most (see the module doc).

    `resources` replaces `ray.cluster_resources()` (tests)."""
    if resources is None:
        import ray

        resources = dict(ray.cluster_resources())
    now = float(resources.get("GPU", 0) or 0)
    gcs = _gcs_max_gpus()
    if gcs is not None:
        return GpuOutlook(now, max(now, gcs), "autoscaler cluster config in the GCS")
    path = (cfg.ray.autoscaling_config if cfg is not None else None) or BOOTSTRAP_CONFIG
    launcher = _launcher_max_gpus(path)
    if launcher is not None:
        return GpuOutlook(now, max(now, launcher), f"autoscaler node types in {path}")
    if cfg is not None and cfg.ray.autoscaling_config:
        raise MeddapError(f"ray.autoscaling_config = {cfg.ray.autoscaling_config!r} does not exist on this node. "
                          f"Point it at the cluster config the autoscaler runs with (on a `ray up` head: "
                          f"{BOOTSTRAP_CONFIG}), or set it to null.")
    return GpuOutlook(now, now, "no autoscaler config found: a fixed cluster")


def resolve_use_gpu(setting: Any, key: str, outlook: GpuOutlook, *, what: str,
                    unet_parameters: Optional[int] = None) -> bool:
    """`auto` / true / false of `key` -> whether `what` asks Ray for GPUs."""
    sized = gpu_sized(unet_parameters)
    size = f"a GPU-sized model ({unet_parameters / 1e6:,.1f} M UNet parameters)" if sized else ""
    if setting is True:
        if not outlook.any:
            warn(f"{key}=true: {what} asks Ray for GPUs, but this cluster has none and, as far as meddap can tell, "
                 f"cannot add any ({outlook}). Ray will wait until GPU nodes join. Set ray.autoscaling_config if "
                 f"the autoscaler's config lives elsewhere, or {key}=auto to use the CPUs.")
        return True
    if setting is False:
        if sized:
            warn(f"{key}=false: {what} runs {size} on CPUs. Expect minutes per step or image; set {key}=auto "
                 f"to use GPUs ({outlook}).")
        return False
    if setting != "auto":
        raise MeddapError(f"config key '{key}' = {setting!r}: expected auto, true or false.")
    if outlook.any:
        return True
    if sized:
        raise MeddapError(
            f"{key}=auto found no GPU for {what}: the Ray cluster has none and cannot add any ({outlook}), and "
            f"{size} on CPUs takes minutes per step or image. Run on a cluster with GPUs (or GPU node types its "
            f"autoscaler can start; ray.autoscaling_config names the autoscaler's config), or set {key}=false to "
            f"run on the CPUs anyway.")
    return False


def resolve_gpus_per_trial(setting: Any, outlook: GpuOutlook, auto_share: float) -> float:
    """classify.gpus_per_trial: `auto` -> `auto_share` with GPUs in sight, else 0; a number as given."""
    if setting == "auto":
        return auto_share if outlook.any else 0.0
    share = float(setting)
    if share > 0 and not outlook.any:
        warn(f"classify.gpus_per_trial={share:g}: trials ask Ray for GPUs, but this cluster has none and, as far "
             f"as meddap can tell, cannot add any ({outlook}). Tune will wait until GPU nodes join; set "
             f"classify.gpus_per_trial=auto (or 0) to train on the CPUs.")
    return share


def gpu_sized(unet_parameters: Optional[int]) -> bool:
    return unet_parameters is not None and unet_parameters >= GPU_SIZED_UNET_PARAMETERS
