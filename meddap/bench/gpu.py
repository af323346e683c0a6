"""`python -m meddap bench gpu [--smoke] [--out PATH] [--only lora,generate,classify]`

The one-shot GPU check: every figure the paper's setup depends on, each beside a baseline measured
in the same run and as a fraction of the device's FLOP limit (its bf16 matmul throughput, also
measured in this run). About 3-5 minutes on one H100/H200.

  matmul    bf16 8192^3 matmuls: the device's FLOP limit for everything below
  lora      USLoRA training steps of meddap's own trainer (LoraFinetuner: cached latents, rank-4 LoRA on
            attn2 q/k/v/out) on SD-1.4's UNet with random weights, 224 px, batch 1: s/step and peak
            memory in fp16 (loss scaling) and bf16 (no scaler; only where the GPU has bf16 natively),
            against fp32 in this run and the paper's 0.33 s/step and 6.9 GB on an RTX 2080 Ti
  generate  images/s of meddap's generator (SyntheticGenerator, a rank-4 adapter loaded) on SD-1.4's
            shapes, fp16, 224 px, 30 steps, guidance 7.5, in batches of 16, 32 and 64, against one
            image per pipeline call (the authors' way) in this run
  classify  training images/s at 224 px, batch 32, of meddap's trial step (uint8 images resident on the
            device, normalised there, channels_last, bf16/fp16 autocast, fused Adam) for ResNet34,
            DenseNet121 and SqueezeNet1.1, against a plain fp32 NCHW loop in this run

FLOPs per step or image are counted in this run with torch's FlopCounterMode on the same code
(NOTES.md's counts: UNet forward 139.5 GFLOP at 224 px, one generated image 8.9 TFLOP).

No Ray, pandas, pyarrow or scipy: torch (+ torchvision for the classifiers), diffusers, transformers,
peft and accelerate only, and no downloads (SD-1.4's architecture from the configs shipped in
meddap/diffusion/sd14/, random weights built on the device; a character tokenizer written locally).
`--smoke` runs the same code on the CPU at toy sizes (the tests use it). The table is printed and
written as Markdown and JSON (default benchmarks/gpu-<device>.md/.json; --smoke writes only with --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["main", "PAPER"]

PAPER = {"s_per_step": 0.33, "memory_gb": 6.9, "gpu": "RTX 2080 Ti"}
PROMPT = "ultrasound image of benign tumor in the breast"
# Full run (one GPU) and --smoke (CPU, toy sizes): sizes and repeat counts of every section.
FULL = dict(matmul=8192, matmul_iters=50, resolution=224, lora_images=20, lora_warmup=3, lora_steps=20,
            gen_steps=30, gen_batches=(16, 32, 64), gen_single=4, cls_size=224, cls_batch=32, cls_warmup=3,
            cls_steps=20, sd14=True)
SMOKE = dict(matmul=256, matmul_iters=3, resolution=64, lora_images=2, lora_warmup=1, lora_steps=1,
             gen_steps=2, gen_batches=(2,), gen_single=1, cls_size=32, cls_batch=2, cls_warmup=1,
             cls_steps=1, sd14=False, threads=1)
CLASSIFIERS = ("resnet34", "densenet121", "squeezenet1_1")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meddap bench gpu", description=__doc__.split("\n\n")[1])
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the code path (tests)")
    p.add_argument("--out", default=None, help="Markdown table here (and .json beside it); default "
                                               "benchmarks/gpu-<device>.md (none with --smoke)")
    p.add_argument("--only", default="lora,generate,classify", help="comma-separated sections to run")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Timing and counting
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, repeats: int = 1) -> float:
    """Seconds per call of fn() (device work included)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _flops(fn) -> float:
    """FLOPs of one call of fn(), counted by torch (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _matmul_peak(device: torch.device, n: int, iters: int) -> tuple[float, str]:
    """(FLOP/s, dtype) of square matmuls: bf16 on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = _timed(device, lambda: a @ b, iters)
    return 2 * n ** 3 / seconds, str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Models with random weights, built on the device
# ---------------------------------------------------------------------------------------------
def _tokenizer(work: str):
    from transformers import CLIPTokenizer

    from meddap.diffusion.base import _write_tokenizer

    # Prompts are padded to 77 tokens either way; the character vocabulary's ids are valid rows of
    # SD-1.4's 49,408-row embedding, so the text encoder costs what the real one does.
    _write_tokenizer(Path(work, "tokenizer"))
    return CLIPTokenizer.from_pretrained(str(Path(work, "tokenizer")))


def _sd_parts(p: dict, work: str, device: torch.device) -> dict:
    """SD-1.4's UNet, VAE and text encoder with random weights (or the tiny SD's for --smoke), on `device`."""
    from meddap.diffusion import base

    if p["sd14"]:
        return dict(unet=base.build_sd14_unet(device), vae=base.build_sd14_vae(device),
                    text_encoder=base.build_sd14_text_encoder(device), tokenizer=_tokenizer(work),
                    noise_scheduler=base.build_sd14_scheduler("ddpm"))
    folder = base.build_tiny_sd(os.path.join(work, "tiny-sd"))
    return base.load_components(folder, device=device)


def _write_images(folder: str, n: int, size: int) -> list[str]:
    """Fine-tuning reads files through the real decode path: bench finetune's speckle-and-blob PNGs
    (that module imports neither Ray nor pandas, so this bench still runs without them)."""
    from meddap.bench.finetune import _write_images as write

    return write(folder, n, size)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def _lora_rows(p: dict, device: torch.device, work: str, peak: float) -> list[dict]:
    from meddap.device import native_bf16
    from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner

    images = _write_images(work, p["lora_images"], p["resolution"])
    examples = [Example(path, PROMPT) for path in images]
    precisions = ["no", "fp16", "bf16"] if device.type == "cuda" else ["no"]
    rows, baseline = [], None
    for precision in precisions:
        name = {"no": "fp32", "fp16": "fp16 + loss scaling", "bf16": "bf16, no scaler"}[precision]
        row = {"section": "lora", "what": f"USLoRA step, {p['resolution']} px, batch 1, {name}",
               "baseline": "fp32 step (this run)"}
        if precision == "bf16" and not native_bf16(device):
            rows.append({**row, "status": "skipped: this GPU has no native bf16"})
            continue
        _reset_memory(device)
        settings = FinetuneSettings(resolution=p["resolution"], epochs=1, batch_size=1, mixed_precision=precision,
                                    cache_latents=True, seed=0)
        ft = LoraFinetuner(_sd_parts(p, work, device), examples, settings, device=device, rank=0, world_size=1)
        ft.train_epoch(0, max_steps=p["lora_warmup"])
        flops = _flops(lambda: ft.train_step(torch.tensor([0], device=device)))
        steps = min(p["lora_steps"], ft.steps_per_epoch)  # one timed epoch prefix: batch 1, one image a step
        seconds = _timed(device, lambda: ft.train_epoch(1, max_steps=steps)) / steps
        row.update(value=seconds, unit="s/step", flops=flops, flop_rate=flops / seconds,
                   limit_fraction=flops / seconds / peak, peak_memory_gb=_peak_gb(device),
                   vs_paper_time=PAPER["s_per_step"] / seconds)
        if row["peak_memory_gb"] is not None:
            row["vs_paper_memory"] = PAPER["memory_gb"] / row["peak_memory_gb"]
        if baseline is None:
            baseline = row
        row["vs_baseline"] = baseline["value"] / seconds  # > 1: faster than fp32
        rows.append(row)
        del ft
    return rows


def _generator(p: dict, device: torch.device, work: str):
    from diffusers import StableDiffusionPipeline

    from meddap.diffusion import base
    from meddap.diffusion.generate import SyntheticGenerator
    from meddap.diffusion.lora import add_uslora, save_lora

    parts = _sd_parts(p, work, device)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=base.build_sd14_scheduler("pndm"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # A fresh rank-4 USLoRA adapter (B = 0), saved and loaded as generate loads trained ones.
    adapter = os.path.join(work, "adapter")
    save_lora(add_uslora(pipe.unet, 4), adapter)
    pipe.unet.delete_adapters(["default"])
    precision = "fp16" if device.type == "cuda" else "fp32"
    return SyntheticGenerator(None, {"fold-0": adapter}, steps=p["gen_steps"], guidance_scale=7.5,
                              resolution=p["resolution"], precision=precision, device=str(device), pipeline=pipe)


def _generate_rows(p: dict, device: torch.device, work: str, peak: float) -> list[dict]:
    from meddap.diffusion.generate import ImageRequest

    gen = _generator(p, device, work)
    what = f"{p['resolution']} px, {p['gen_steps']} steps, guidance 7.5, {str(gen.dtype).replace('torch.', '')}"
    requests = lambda n, s=0: [ImageRequest(PROMPT, s + i, "fold-0") for i in range(n)]  # noqa: E731
    gen.generate_batch(requests(1))  # warm-up: kernels, allocator, adapter switch
    flops = _flops(lambda: gen.generate_batch(requests(1)))  # one image: the 30-step loop with guidance
    single = _timed(device, lambda: [gen.generate_batch(requests(1, 100 + i)) for i in range(p["gen_single"])])
    single_rate = p["gen_single"] / single
    rows = [{"section": "generate", "what": f"images/s, one image per call (the authors' way), {what}",
             "value": single_rate, "unit": "images/s", "baseline": "this row", "vs_baseline": 1.0,
             "flops": flops, "flop_rate": single_rate * flops, "limit_fraction": single_rate * flops / peak}]
    for b in p["gen_batches"]:
        _reset_memory(device)
        gen.generate_batch(requests(b))  # warm-up at this batch size
        rate = b / _timed(device, lambda: gen.generate_batch(requests(b, 1000)))
        rows.append({"section": "generate", "what": f"images/s, batch {b}, {what}", "value": rate,
                     "unit": "images/s", "baseline": "one image per call (this run)", "vs_baseline": rate / single_rate,
                     "flops": flops, "flop_rate": rate * flops, "limit_fraction": rate * flops / peak,
                     "peak_memory_gb": _peak_gb(device)})
    return rows


def _classify_rows(p: dict, device: torch.device, peak: float) -> list[dict]:
    from torch import nn

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return [{"section": "classify", "what": f"training images/s, {n}", "status": "skipped: torchvision "
                 "is not installed (pip install torchvision)"} for n in CLASSIFIERS]
    from meddap.classify.data import imagenet_stats, model_input
    from meddap.classify.models import build_classifier, logits_of
    from meddap.classify.trial import autocast_dtype, train_step

    size, batch = p["cls_size"], p["cls_batch"]
    rows = []
    for name in CLASSIFIERS:
        torch.manual_seed(0)
        # Baseline: a plain fp32 NCHW loop on float images already normalised (no augmentation cost).
        model = build_classifier(name, 3).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 3, (batch,), device=device)

        def plain():
            loss = nn.functional.cross_entropy(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for _ in range(p["cls_warmup"]):
            plain()
        base_rate = batch / _timed(device, plain, p["cls_steps"])
        flops = _flops(plain)
        del model, opt
        # meddap's trial step: uint8 images on the device, flipped and normalised there, channels_last,
        # autocast in the precision the trial picks, fused Adam on CUDA.
        model = build_classifier(name, 3).to(device)
        channels_last = device.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        amp = autocast_dtype("auto", device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
        stats, gen = imagenet_stats(device), torch.Generator(device=device).manual_seed(0)

        def ours():
            inputs = model_input(images, flip=True, generator=gen, channels_last=channels_last, stats=stats)
            train_step(model, opt, scaler, inputs, y, amp)
        for _ in range(p["cls_warmup"]):
            ours()
        rate = batch / _timed(device, ours, p["cls_steps"])
        precision = str(amp).replace("torch.", "") if amp is not None else "fp32"
        rows.append({"section": "classify", "what": f"training images/s, {name}, {size} px, batch {batch}, "
                     f"fp32 NCHW (baseline)", "value": base_rate, "unit": "images/s", "baseline": "this row",
                     "vs_baseline": 1.0, "flops": flops / batch, "flop_rate": base_rate * flops / batch,
                     "limit_fraction": base_rate * flops / batch / peak})
        rows.append({"section": "classify", "what": f"training images/s, {name}, {size} px, batch {batch}, "
                     f"meddap trial step ({precision}{', channels_last' if channels_last else ''})",
                     "value": rate, "unit": "images/s", "baseline": "fp32 NCHW (this run)",
                     "vs_baseline": rate / base_rate, "flops": flops / batch, "flop_rate": rate * flops / batch,
                     "limit_fraction": rate * flops / batch / peak})
        del model, opt
        _reset_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(meta: dict, rows: list[dict]) -> str:
    """The Markdown table of a run (what is printed and written)."""
    lines = [f"# meddap bench gpu: {meta['device_name']}" + (" (SMOKE: CPU, toy sizes; not GPU figures)"
                                                              if meta["smoke"] else ""),
             "",
             f"- device: {meta['device']} ({meta['device_name']}); torch {meta['torch']}, diffusers "
             f"{meta['diffusers']}, CUDA {meta['cuda']}; {meta['date']}",
             f"- FLOP limit (measured here): {meta['peak_flops'] / 1e12:.3g} TFLOP/s, {meta['peak_dtype']} "
             f"{meta['matmul']}^3 matmuls; 'of limit' = achieved FLOP/s / this",
             "- FLOPs counted here by torch on the same code; NOTES.md's counts at 224 px for comparison: UNet "
             "forward 139.5 GFLOP, one image (30 steps, guidance) 8.9 TFLOP, training per image ResNet34 ~22, "
             "DenseNet121 ~17, SqueezeNet1.1 ~2.1 GFLOP",
             f"- paper (USLoRA, {PAPER['gpu']}, fp16): {PAPER['s_per_step']} s/step, {PAPER['memory_gb']} GB; "
             "memory here is torch's peak allocation (nvidia-smi adds the CUDA context, ~0.5 GB)",
             f"- total time: {meta['seconds']:.0f} s",
             "",
             "| what | value | baseline | x baseline | GFLOP each | of limit | peak GB | paper / this |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "status" in r:
            lines.append(f"| {r['what']} | {r['status']} | | | | | | |")
            continue
        paper = ""
        if "vs_paper_time" in r:
            paper = f"time x{r['vs_paper_time']:.2f}" + (f", memory x{r['vs_paper_memory']:.2f}"
                                                        if "vs_paper_memory" in r else "")
        lines.append(f"| {r['what']} | {_fmt(r['value'])} {r['unit']} | {r['baseline']} | x{_fmt(r['vs_baseline'])} | "
                     f"{_fmt(r.get('flops', 0) / 1e9)} | {_fmt(100 * r.get('limit_fraction', 0), '.2g')} % | "
                     f"{_fmt(r.get('peak_memory_gb'), '.2f')} | {paper} |")
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(cfg, argv: list[str]) -> list[dict]:
    args = _parse(argv)
    p = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        from meddap.errors import MeddapError

        raise MeddapError("`bench gpu` needs a CUDA GPU (torch sees none here); `--smoke` runs its code path on "
                          "the CPU at toy sizes. GPU figures stay pending until it runs on a GPU.")
    device = torch.device("cuda", torch.cuda.current_device()) if not args.smoke else torch.device("cpu")
    if "threads" in p:
        torch.set_num_threads(p["threads"])  # a shared CPU box: more threads than free cores thrash
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"lora", "generate", "classify"})
    if unknown:
        from meddap.errors import MeddapError

        raise MeddapError(f"bench gpu --only {args.only}: unknown section(s) {unknown}; use lora, generate, classify.")
    import diffusers

    t0 = time.perf_counter()
    peak, peak_dtype = _matmul_peak(device, p["matmul"], p["matmul_iters"])
    print(f"[bench gpu] {device_name}: FLOP limit {peak / 1e12:.3g} TFLOP/s ({peak_dtype} matmul)", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="meddap-bench-gpu-") as work:
        for section in sections:
            t = time.perf_counter()
            if section == "lora":
                rows += _lora_rows(p, device, work, peak)
            elif section == "generate":
                rows += _generate_rows(p, device, work, peak)
            else:
                rows += _classify_rows(p, device, peak)
            print(f"[bench gpu] {section}: {time.perf_counter() - t:.0f} s", flush=True)
    meta = {"device": str(device), "device_name": device_name, "smoke": args.smoke, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cuda": torch.version.cuda or "none",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peak_flops": peak,
            "peak_dtype": peak_dtype, "matmul": p["matmul"], "seconds": time.perf_counter() - t0, "sizes": p}
    text = table(meta, rows)
    print(text, flush=True)
    out = args.out or (None if args.smoke else os.path.join("benchmarks", f"gpu-{_slug(device_name)}.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        Path(out).with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        print(f"[bench gpu] written: {out} and {Path(out).with_suffix('.json')}", flush=True)
    return rows
