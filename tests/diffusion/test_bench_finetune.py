"""The finetune benchmark times real steps of the core (one setting, in-process, tiny model)."""

from __future__ import annotations

import torch

from meddap.bench.finetune import _parse, bench_one


def test_bench_one_times_steps_and_reports_memory(tiny_sd_dir, toy_manifest):
    torch.set_num_threads(1)
    spec = dict(model="tiny", tiny_dir=tiny_sd_dir, images=list(toy_manifest["path"][:3]), resolution=64,
                steps=2, warmup=1, device="cpu", threads=1, cache_latents=False, gradient_checkpointing=True,
                mixed_precision="auto", rank=4, targets="cross_attention")
    r = bench_one(spec)
    assert r["steps"] == 2 and r["steps_per_s"] > 0
    assert abs(r["s_per_step"] * r["steps_per_s"] - 1) < 1e-9
    assert r["memory_kind"] == "process peak RSS" and r["peak_memory_gb"] > 0.1
    assert r["precision"] == "float32" and r["trainable_params"] == 4864


def test_bench_flags():
    a = _parse(["--model", "sd14", "--steps", "3", "--resolution", "224"])
    assert (a.model, a.steps, a.resolution, a.only) == ("sd14", 3, 224, "all")
