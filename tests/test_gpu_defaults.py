"""GPU defaults that cannot fall back silently: `auto` from the cluster and its autoscaler, the
GPU-sized guard, bf16 only where native, MEDDAP_DEVICE, the pool that asks for GPUs before they
exist, config typing and stage records. Ray is not started: the decisions are plain functions."""

from __future__ import annotations

import pytest
import torch
import yaml

from meddap.config import AUTO_GPUS_PER_TRIAL, ConfigError, load_config
from meddap.errors import MeddapError
from meddap.placement import (GPU_SIZED_UNET_PARAMETERS, GpuOutlook, gpu_outlook, resolve_gpus_per_trial,
                              resolve_use_gpu)

SD14_UNET = 859_520_964


def _launcher_config(path, gpu_max_workers=3, gpus=1):
    """A cluster-launcher config as `ray up` leaves it on the head (~/ray_bootstrap_config.yaml)."""
    path.write_text(yaml.safe_dump({
        "cluster_name": "meddap", "max_workers": 8, "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8}, "node_config": {}},
            "gpu_a10g": {"resources": {"CPU": 4, "GPU": gpus}, "min_workers": 0, "max_workers": gpu_max_workers,
                         "node_config": {}},
            "cpu_only": {"resources": {"CPU": 16}, "min_workers": 0, "max_workers": 2, "node_config": {}},
        }}))
    return str(path)


# -- how `auto` learns whether GPUs can come -----------------------------------------------------
def test_outlook_from_the_autoscalers_node_types_when_none_are_up(tmp_path, monkeypatch):
    monkeypatch.setattr("meddap.placement.BOOTSTRAP_CONFIG", str(tmp_path / "absent.yaml"))
    cfg = load_config("demo", [f"ray.autoscaling_config={_launcher_config(tmp_path / 'c.yaml')}"])
    out = gpu_outlook(cfg, resources={"CPU": 8.0})
    assert (out.now, out.most, out.any) == (0.0, 3.0, True) and "c.yaml" in out.source
    # `ray up` heads: the default path is read when the key is null.
    monkeypatch.setattr("meddap.placement.BOOTSTRAP_CONFIG", _launcher_config(tmp_path / "boot.yaml", 2, gpus=4))
    assert gpu_outlook(load_config("demo"), resources={"CPU": 8.0}).most == 8.0
    # A fixed cluster without an autoscaler config: what it has now.
    monkeypatch.setattr("meddap.placement.BOOTSTRAP_CONFIG", str(tmp_path / "absent.yaml"))
    assert gpu_outlook(load_config("demo"), resources={"CPU": 2.0, "GPU": 2.0}).most == 2.0
    assert not gpu_outlook(load_config("demo"), resources={"CPU": 2.0}).any
    with pytest.raises(MeddapError, match="ray.autoscaling_config.*does not exist"):
        gpu_outlook(load_config("demo", [f"ray.autoscaling_config={tmp_path / 'nope.yaml'}"]), resources={})


def test_auto_uses_gpus_in_sight_and_never_runs_an_sd_sized_model_on_cpu_silently(capsys):
    none, some = GpuOutlook(0, 0, "fixed"), GpuOutlook(0, 2, "autoscaler")
    key = "diffusion.train.use_gpu"
    assert resolve_use_gpu("auto", key, some, what="fine-tuning", unet_parameters=SD14_UNET) is True
    assert resolve_use_gpu("auto", key, none, what="fine-tuning", unet_parameters=1_000_000) is False  # tiny: CPU is fine
    with pytest.raises(MeddapError, match=r"use_gpu=auto found no GPU.*859.5 M UNet parameters.*use_gpu=false"):
        resolve_use_gpu("auto", key, none, what="fine-tuning", unet_parameters=SD14_UNET)
    assert resolve_use_gpu(False, key, some, what="fine-tuning", unet_parameters=SD14_UNET) is False
    assert "WARNING" in capsys.readouterr().err  # asked for CPU with an SD-sized model: said loudly
    assert resolve_use_gpu(True, key, none, what="fine-tuning", unet_parameters=1) is True
    assert "Ray will wait" in capsys.readouterr().err
    assert GPU_SIZED_UNET_PARAMETERS < SD14_UNET


def test_gpus_per_trial_auto_and_explicit(capsys):
    none, some = GpuOutlook(0, 0, "fixed"), GpuOutlook(1, 1, "now")
    assert resolve_gpus_per_trial("auto", some, AUTO_GPUS_PER_TRIAL) == 0.25
    assert resolve_gpus_per_trial("auto", none, AUTO_GPUS_PER_TRIAL) == 0.0
    assert resolve_gpus_per_trial(0.5, none, AUTO_GPUS_PER_TRIAL) == 0.5
    assert "Tune will wait" in capsys.readouterr().err
    assert resolve_gpus_per_trial(0.0, some, AUTO_GPUS_PER_TRIAL) == 0.0


def test_generation_pool_asks_for_gpus_before_any_exist(tmp_path):
    from meddap.stages.generate import pool_size

    cfg = load_config("demo", [f"run_dir={tmp_path}"])
    pool = pool_size(cfg, {"CPU": 2.0}, use_gpu=True, most_gpus=4.0)  # autoscaler: 0 GPUs now, 4 at most
    assert pool["num_gpus"] == 1.0 and pool["min_workers"] == 1 and pool["workers"] == 4
    pool = pool_size(cfg, {"CPU": 16.0, "GPU": 2.0}, use_gpu=True, most_gpus=4.0)
    assert (pool["min_workers"], pool["workers"]) == (2, 4)
    assert pool_size(cfg, {"CPU": 16.0, "GPU": 2.0}, use_gpu=False)["num_gpus"] == 0.0


# -- config typing, migration, records ------------------------------------------------------------
def test_gpu_keys_are_typed_auto_or_value():
    cfg = load_config("demo")
    assert (cfg.diffusion.train.use_gpu, cfg.generate.use_gpu, cfg.classify.gpus_per_trial) == ("auto",) * 3
    cfg = load_config("demo", ["diffusion.train.use_gpu=false", "generate.use_gpu=true", "classify.gpus_per_trial=0"])
    assert (cfg.diffusion.train.use_gpu, cfg.generate.use_gpu, cfg.classify.gpus_per_trial) == (False, True, 0.0)
    assert type(cfg.to_dict()["classify"]["gpus_per_trial"]) is float
    for bad in ("diffusion.train.use_gpu=2", "generate.use_gpu=maybe", "classify.gpus_per_trial=true",
                "classify.gpus_per_trial=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("demo", [bad])
    with pytest.raises(ConfigError, match=r"classify.checkpoint_every.*replaced by classify.checkpoint_seconds"):
        load_config("demo", ["classify.checkpoint_every=5"])


def test_gpu_and_checkpoint_settings_never_invalidate_finished_stages():
    from meddap.stages.state import stage_settings

    a = load_config("demo")
    b = load_config("demo", ["diffusion.train.use_gpu=true", "generate.use_gpu=false",
                             "classify.gpus_per_trial=0.5", "classify.checkpoint_seconds=5"])
    for stage in ("finetune", "generate", "sweep"):
        assert stage_settings(a, stage) == stage_settings(b, stage)


# -- devices and precision -------------------------------------------------------------------------
def test_meddap_device_cpu_keeps_compute_on_cpu(monkeypatch):
    from meddap.device import compute_device

    monkeypatch.setenv("MEDDAP_DEVICE", "cpu")
    assert compute_device(True, "test").type == "cpu"
    monkeypatch.setenv("MEDDAP_DEVICE", "gpu")
    with pytest.raises(MeddapError, match="MEDDAP_DEVICE='gpu'.*cpu"):
        compute_device(True, "test")
    monkeypatch.delenv("MEDDAP_DEVICE")
    if not torch.cuda.is_available():  # given a GPU by Ray but no CUDA here: an error, not a CPU run
        with pytest.raises(MeddapError, match="scheduled with a GPU.*no CUDA"):
            compute_device(True, "fine-tuning worker")
    assert compute_device(False, "test").type == "cpu"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device whose bf16 is native (Ampere+) or only emulated (Turing), as torch reports them."""
    def make(native: bool):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: True if including_emulation else native)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "H100" if native else "RTX 2080 Ti")
        return torch.device("cuda", 0)
    return make


def test_finetune_precision_bf16_only_where_native(fake_gpu):
    from meddap.diffusion.train import resolve_precision

    h100 = fake_gpu(True)
    assert resolve_precision("auto", h100) == (torch.bfloat16, torch.bfloat16, False)  # no scaler
    assert resolve_precision("fp16", h100) == (torch.float16, torch.float16, True)
    turing = fake_gpu(False)  # is_bf16_supported() says True here (emulation): not good enough
    assert torch.cuda.is_bf16_supported()
    assert resolve_precision("auto", turing) == (torch.float16, torch.float16, True)
    assert resolve_precision("bf16", turing) == (torch.float16, torch.float16, True)
    assert resolve_precision("auto", torch.device("cpu")) == (torch.float32, None, False)


def test_classifier_autocast_bf16_only_where_native(fake_gpu):
    from meddap.classify.trial import autocast_dtype

    assert autocast_dtype("auto", fake_gpu(True)) == torch.bfloat16
    assert autocast_dtype("auto", fake_gpu(False)) == torch.float16
    assert autocast_dtype("bf16", fake_gpu(False)) == torch.float16
    assert autocast_dtype("auto", torch.device("cpu")) is None


def test_shipped_cluster_yaml_lets_auto_see_its_gpu_node_types(monkeypatch):
    """On a head started by `ray up cluster.yaml`, ~/ray_bootstrap_config.yaml holds these node types:
    `auto` must see that GPU nodes can be added although the cluster starts with none."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "cluster.yaml"
    monkeypatch.setattr("meddap.placement.BOOTSTRAP_CONFIG", str(shipped))
    out = gpu_outlook(load_config("paper"), resources={"CPU": 8.0})
    assert out.now == 0 and out.most >= 1
    assert resolve_use_gpu("auto", "diffusion.train.use_gpu", out, what="fine-tuning", unet_parameters=SD14_UNET)
