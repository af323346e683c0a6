"""`python -m meddap bench finetune [--model tiny|sd14] [--steps N] [--resolution R] [key=value ...]`

Times USLoRA training steps of the plain-PyTorch core (no Ray) at batch 1 with each memory option
on and off (cache_latents x gradient_checkpointing) and reports steps/s, s/step and peak memory:
`torch.cuda.max_memory_allocated` on a GPU, the process's peak resident memory (VmHWM) on a CPU.
Each setting runs in its own process so peaks do not mix.

  --model tiny   the tiny SD (diffusion.base_model=builtin:tiny's architecture), default resolution
                 diffusion.resolution;
  --model sd14   SD-1.4's UNet, VAE and text encoder with random weights from the shipped configs
                 (sized and timed exactly like the real model; no download), default 224 px.
The paper's figures to beat (RTX 2080 Ti, fp16): 6.9 GB and <= 0.33 s/step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

__all__ = ["main", "bench_one"]

PAPER = {"memory_gb": 6.9, "s_per_step": 0.33, "gpu": "RTX 2080 Ti"}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meddap bench finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "sd14"], default="tiny")
    p.add_argument("--steps", type=int, default=None, help="timed steps per setting (default: tiny 30, sd14 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: tiny diffusion.resolution, sd14 224)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--only", choices=["all", "default"], default="all",
                   help="all: the four memory-option settings; default: the config's setting only")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def _write_images(folder: str, n: int, size: int) -> list[str]:
    """Speckle-and-blob grey PNGs: the bench needs files for the real decode path, not a dataset."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = (rng.random((size, size)) * 90).astype(np.uint8)
        a[size // 4: size // 2, size // 4 + i: size // 2 + i] = 200
        p = os.path.join(folder, f"img{i}.png")
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def _peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _components(model: str, tiny_dir: str, device: str):
    from meddap.diffusion import base

    if model == "tiny":
        return base.load_components(tiny_dir)
    # SD-1.4 shapes with random weights. The tokenizer only maps text to 77 ids; the tiny one's ids are
    # valid rows of SD's 49,408-row embedding, so timing and memory are SD-1.4's.
    tok = base.load_components(tiny_dir)["tokenizer"]
    return dict(unet=base.build_sd14_unet(), vae=base.build_sd14_vae(), text_encoder=base.build_sd14_text_encoder(),
                tokenizer=tok, noise_scheduler=base.build_sd14_scheduler("ddpm"))


def bench_one(spec: dict) -> dict:
    """One setting: build, cache, warm up, time `steps` steps. Returns the figures."""
    import torch

    from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    t0 = time.perf_counter()
    comps = _components(spec["model"], spec["tiny_dir"], spec["device"])
    n_img = spec["warmup"] + spec["steps"]
    examples = [Example(p, "ultrasound image of benign tumor in the breast") for p in spec["images"][:n_img]]
    settings = FinetuneSettings(resolution=spec["resolution"], epochs=1, lr=1e-4, batch_size=1,
                                mixed_precision=spec["mixed_precision"], cache_latents=spec["cache_latents"],
                                gradient_checkpointing=spec["gradient_checkpointing"], rank=spec["rank"],
                                targets=spec["targets"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ft = LoraFinetuner(comps, examples, settings, device=device, rank=0, world_size=1)
    setup_s = time.perf_counter() - t0
    ft.train_epoch(0, max_steps=spec["warmup"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for i in range(spec["steps"]):
        ft.train_step(torch.tensor([spec["warmup"] + i]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    out = {k: spec[k] for k in ("model", "resolution", "cache_latents", "gradient_checkpointing", "steps")}
    out.update(device=str(device), precision=str(ft.amp_dtype or torch.float32).replace("torch.", ""),
               s_per_step=dt / spec["steps"], steps_per_s=spec["steps"] / dt, setup_s=setup_s,
               trainable_params=ft.trainable, trainable_share=ft.share)
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
        out["memory_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_memory_gb"] = _peak_rss_gb()
        out["memory_kind"] = "process peak RSS"
    return out


def _child(spec: dict, q) -> None:
    try:
        q.put(("ok", bench_one(spec)))
    except BaseException as e:  # report, don't hang the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


def _run_isolated(spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(spec, q))
    p.start()
    status, value = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def main(cfg, argv: list[str]) -> list[dict]:
    import torch

    from meddap.diffusion.base import build_tiny_sd

    args = _parse(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    steps = args.steps or (30 if args.model == "tiny" else 3)
    resolution = args.resolution or (cfg.diffusion.resolution if args.model == "tiny" else 224)
    t = cfg.diffusion.train
    settings = [(t.cache_latents, t.gradient_checkpointing)] if args.only == "default" else \
        [(c, g) for c in (True, False) for g in (False, True)]
    results = []
    with tempfile.TemporaryDirectory(prefix="meddap-bench-") as tmp:
        tiny_dir = build_tiny_sd(os.path.join(tmp, "tiny-sd"))
        images = _write_images(tmp, args.warmup + steps, max(resolution, 64))
        print(f"[bench finetune] model={args.model} resolution={resolution} batch=1 steps={steps} "
              f"(+{args.warmup} warm-up) device={device} threads={args.threads or torch.get_num_threads()} "
              f"rank={cfg.diffusion.lora.ranks[0]} targets={cfg.diffusion.lora.targets} "
              f"mixed_precision={t.mixed_precision}; machine: {platform.machine()} {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
        for cache, ckpt in settings:
            spec = dict(model=args.model, tiny_dir=tiny_dir, images=images, resolution=resolution, steps=steps,
                        warmup=args.warmup, device=device, threads=args.threads, cache_latents=cache,
                        gradient_checkpointing=ckpt, mixed_precision=t.mixed_precision,
                        rank=cfg.diffusion.lora.ranks[0], targets=cfg.diffusion.lora.targets)
            r = _run_isolated(spec)
            r["load_average"] = os.getloadavg()[0]  # CPU figures on a shared box depend on it
            results.append(r)
            print(f"  cache_latents={str(cache):5} gradient_checkpointing={str(ckpt):5} | "
                  f"{r['steps_per_s']:7.3f} steps/s  {r['s_per_step']:7.3f} s/step | peak {r['peak_memory_gb']:6.2f} GB "
                  f"({r['memory_kind']}, {r['precision']}) | setup {r['setup_s']:.1f}s | load {r['load_average']:.1f}", flush=True)
    if device == "cpu":
        print(f"[bench finetune] CPU figures. GPU figures pending (no GPU here); the paper's to beat on an "
              f"{PAPER['gpu']}: {PAPER['memory_gb']} GB and <= {PAPER['s_per_step']} s/step "
              f"(run `python -m meddap bench finetune --model sd14` on a GPU).")
    else:
        best = min(results, key=lambda r: r["s_per_step"])
        print(f"[bench finetune] paper ({PAPER['gpu']}): {PAPER['memory_gb']} GB, <= {PAPER['s_per_step']} s/step; "
              f"fastest here: {best['s_per_step']:.3f} s/step at {best['peak_memory_gb']:.2f} GB")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results
