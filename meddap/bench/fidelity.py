"""`python -m meddap bench fidelity [--config demo] [--epochs 0,2,4,8] [--per-cell N] [key=value ...]`

Does USLoRA teach the classes? Label fidelity against LoRA training, on the demo's own data and the
shipped base model, without Ray:

1. the demo's phantom Dataset A is prepared in a temporary run dir (`prepare`, same seeds and split);
2. one fold's adapter is trained with the USLoRA core (`LoraFinetuner`, the config's settings; with
   diffusion.lora.class_words the generations use its text encoder, which holds the learned words);
3. after 0 epochs (= the base model without adapter: a fresh LoRA changes nothing) and after each
   listed epoch, `--per-cell` images per (adjective, class) are generated with the config's prompts,
   steps and guidance, and the reference judge beside the base model (`<folder>/judge/`) scores each
   one;
4. printed: fidelity (share judged as the prompted class) per class for the no-adjective prompt at
   every checkpoint, fidelity per adjective at the last, and the mean grey level of each adjective's
   images (dark < none < bright is what the adjectives should do), with training and generation time;
5. before training, the base model is also told each class's typical look in its own caption words
   (`LOOK_PROMPTS`: "an irregular tall spiculated mass with shadowing", ...): the share the judge
   puts in the class it describes shows how well the base can draw the classes at all, which bounds
   what a short USLoRA can reach;
6. at every checkpoint, without the judge: the **conditioning gap**, how much worse the model denoises
   each training image when given another class's prompt than its own (same noise, same timesteps; in
   thousandths of the loss). 0 means the class words change nothing; it grows as the adapter learns to
   use them, so it says whether USLoRA learned the classes even where the images cannot show it yet.

The issue's targets, printed beside the figures: >= 80 % mean no-adjective fidelity with every class
>= 60 % after training, the base model near chance. `--sheet PATH` writes a contact sheet of the last
checkpoint's images; `--out PATH` the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import pandas as pd
import torch

__all__ = ["main", "fidelity_curve", "base_fidelity"]

TARGET_MEAN, TARGET_CLASS = 0.80, 0.60


def base_fidelity(curve: list[dict]) -> str:
    """The base model's mean fidelity as printed: from the epoch-0 checkpoint, which exists only when
    --epochs lists 0 (the first checkpoint is otherwise an adapter's)."""
    base = next((r for r in curve if r["epoch"] == 0), None)
    return f"{base['mean']:.0%}" if base is not None else "not measured (add 0 to --epochs)"


def _args(cfg, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meddap bench fidelity", description=__doc__.split("\n\n")[1])
    p.add_argument("--epochs", default=None,
                   help="comma-separated LoRA epochs to evaluate at (default: 0, then quarters of diffusion.train.epochs)")
    p.add_argument("--per-cell", type=int, default=12, help="images per (adjective, class) at each checkpoint")
    p.add_argument("--adjectives", default=None,
                   help="comma-separated adjectives for the last checkpoint (default: the config's generate.adjectives)")
    p.add_argument("--fold", type=int, default=0, help="the fold whose adapter is trained")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="diffusers folder to use instead of diffusion.base_model")
    p.add_argument("--judge", default=None,
                   help="judge folder (default: <base model folder>/judge/, where pretrain-base writes it)")
    p.add_argument("--sheet", default=None, help="write a contact sheet PNG of the last checkpoint's images")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def _examples(cfg, fold: int):
    from meddap.diffusion.train import Example, class_prompts
    from meddap.stages import prepare
    from meddap.stages.finetune import adapter_plan

    prepare.run(cfg)
    plan = {e["fold"]: e for e in adapter_plan(cfg)}
    if fold not in plan:
        raise SystemExit(f"bench fidelity: no fold {fold} (adapters: {sorted(plan)})")
    prompts = class_prompts(cfg)
    rows = plan[fold]["rows"]
    return [Example(p, prompts[c]) for p, c in zip(rows["path"], rows["class_name"])]


# Each phantom class's typical look in the base model's own caption words and word order
# (meddap.diffusion.captions), as meddap.data.phantom draws the classes: benign oval, wider than tall,
# circumscribed, often a capsule and posterior enhancement; malignant irregular, taller than wide,
# spiculated, shadowing.
LOOK_PROMPTS = {
    "benign": "ultrasound image of an oval wide encapsulated mass with enhancement in the breast",
    "malignant": "ultrasound image of an irregular tall spiculated mass with shadowing in the breast",
    "normal": "ultrasound image of breast tissue",
}


@torch.no_grad()
def _generate(pipe, cfg, adjectives: list[str], per_cell: int, seed: int,
              prompts: dict[str, str] | None = None) -> pd.DataFrame:
    """per_cell images per (adjective, class): DataFrame of adjective, class_name, grey (H, W uint8).
    `prompts` (class -> prompt, no adjective): these instead of the config's class prompts."""
    from meddap.diffusion.prompts import class_prompt

    rows = []
    for adj in adjectives:
        for ci, cls in enumerate(cfg.data.classes):
            prompt = prompts[cls] if prompts is not None else class_prompt(cfg, adj, cls)
            gens = [torch.Generator("cpu").manual_seed(seed + 1000 * ci + i) for i in range(per_cell)]
            out = pipe(prompt=[prompt] * per_cell, height=cfg.generate_resolution, width=cfg.generate_resolution,
                       num_inference_steps=cfg.generate.steps, guidance_scale=cfg.generate.guidance_scale,
                       generator=gens, output_type="np").images                    # (B, H, W, 3) in [0, 1]
            rgb = (out * 255).round().clip(0, 255).astype(np.uint8)
            grey = np.clip(np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)
            rows += [{"adjective": adj, "class_name": cls, "grey": g, "rgb": c} for g, c in zip(grey, rgb)]
    return pd.DataFrame(rows)


@torch.no_grad()
def conditioning_gap(ft, repeats: int = 4, seed: int = 5, chunk: int = 16) -> float:
    """Mean over `ft`'s training images and `repeats` draws of (denoising loss under another class's prompt)
    - (loss under the image's own prompt), with the same noise and timestep for every prompt: > 0 when the
    model uses the class words, 0 when they change nothing. In the loss's own units (epsilon MSE)."""
    if len(ft.prompts) < 2:
        return float("nan")
    was_training = ft.unet.training
    ft.unet.eval()
    g = torch.Generator(device=ft.device).manual_seed(seed)
    n, n_prompts = len(ft.examples), len(ft.prompts)
    text = ft._encode_text(torch.arange(n_prompts))                   # (P, L, D)
    own_sum = other_sum = 0.0
    for _ in range(repeats):
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=ft.device)
            if ft.latent_mean is not None:
                latents = ft.latent_mean[idx, 0]
            else:
                latents = ft._encode_images(idx, torch.zeros(len(idx), dtype=torch.bool))[0]
            latents = (latents - ft.shift_factor) * ft.scaling_factor
            noise = torch.randn(latents.shape, generator=g, device=ft.device)
            t = torch.randint(0, ft.num_train_timesteps, (len(idx),), generator=g, device=ft.device)
            noisy = ft.noise_scheduler.add_noise(latents, noise, t).to(ft.weight_dtype)
            target = ft.target(latents, noise, t).float()
            per_prompt = torch.stack([
                (ft.unet(noisy, t, encoder_hidden_states=text[p].expand(len(idx), -1, -1)).sample.float() - target)
                .pow(2).mean((1, 2, 3)) for p in range(n_prompts)])    # (P, B)
            own = per_prompt[ft.prompt_ids[idx], torch.arange(len(idx))]
            own_sum += float(own.sum())
            other_sum += float(((per_prompt.sum(0) - own) / (n_prompts - 1)).sum())
    ft.unet.train(was_training)
    return (other_sum - own_sum) / (n * repeats)


def _score(judge, images: pd.DataFrame) -> pd.DataFrame:
    from PIL import Image

    from meddap.classify.judge import judge_predict, label_fidelity

    size = judge.image_size  # resized as meddap.data.decode.read_grey resizes
    grey = np.stack([g if g.shape[0] == size else
                     np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR))
                     for g in images["grey"]])
    pred = np.asarray(judge.classes, dtype=object)[judge_predict(judge, grey)]
    return images.assign(predicted=pred, correct=label_fidelity(images["class_name"], pred),
                         mean_intensity=[float(g.mean()) for g in images["grey"]])


def fidelity_curve(cfg, epochs: list[int], per_cell: int, adjectives: list[str], fold: int = 0,
                   model: str | None = None, judge_dir: str | None = None, log=print) -> dict:
    """Train one fold's adapter and score generations at each epoch in `epochs` (0 = no adapter).
    Returns {"curve": rows per epoch, "adjectives": rows of the last epoch, "images": last DataFrame, ...}."""
    from meddap.classify.judge import fidelity_summary, load_judge
    from meddap.diffusion.base import base_model_judge_dir, load_components, load_pipeline, resolve_base_model
    from meddap.diffusion.train import FinetuneSettings, LoraFinetuner

    judge_dir = judge_dir or base_model_judge_dir(model or cfg.diffusion.base_model, "bench fidelity --judge")
    model = model or resolve_base_model(cfg)
    judge = load_judge(judge_dir, key="bench fidelity --judge")
    examples = _examples(cfg, fold)
    settings = FinetuneSettings.from_config(cfg)
    ft = LoraFinetuner(load_components(model), examples, settings)
    pipe = load_pipeline(model)
    pipe.unet = ft.unet                                  # the adapter being trained, in place
    if settings.class_words:
        pipe.text_encoder = ft.text_encoder              # holds the class words as learned so far
    look = None
    if set(cfg.data.classes) <= set(LOOK_PROMPTS):
        # Before any training (a fresh LoRA changes nothing): can the base draw each class when told its look
        # in the words it was pretrained on? USLoRA can hardly make a class more recognisable than this.
        ft.unet.eval()
        look_images = _score(judge, _generate(pipe, cfg, [""], per_cell, cfg.generate.seed, LOOK_PROMPTS))
        ft.unet.train()
        look_sum = fidelity_summary(look_images).set_index("class_name")["fidelity"]
        look = {"prompts": {c: LOOK_PROMPTS[c] for c in cfg.data.classes}, "mean": float(look_sum["all"]),
                **{c: float(look_sum[c]) for c in cfg.data.classes}}
        log(f"[bench fidelity] base model told each class's look: fidelity {look['mean']:.0%} ("
            + ", ".join(f"{c} {look[c]:.0%}" for c in cfg.data.classes) + ")")
    curve, train_s, last = [], 0.0, None
    for target in sorted(set(epochs)):
        t0 = time.perf_counter()
        while ft.epoch < target:
            ft.train_epoch()
        train_s += time.perf_counter() - t0
        ft.unet.eval()
        final = target == max(epochs)
        t0 = time.perf_counter()
        images = _score(judge, _generate(pipe, cfg, adjectives if final else [""], per_cell, cfg.generate.seed))
        gen_s = time.perf_counter() - t0
        ft.unet.train()
        summary = fidelity_summary(images)
        gap = conditioning_gap(ft)
        plain = summary[summary["adjective"] == ""].set_index("class_name")["fidelity"]
        row = {"epoch": target, "steps": ft.step, "train_seconds": round(train_s, 1),
               "generate_seconds": round(gen_s, 1), "images": int(len(images)), "conditioning_gap": gap,
               "mean": float(plain["all"]), **{c: float(plain[c]) for c in cfg.data.classes}}
        curve.append(row)
        log(f"[bench fidelity] epoch {target} (step {ft.step}): no-adjective fidelity {row['mean']:.0%} ("
            + ", ".join(f"{c} {row[c]:.0%}" for c in cfg.data.classes)
            + f"); conditioning gap {1000 * gap:.2f}e-3; trained {train_s:.0f}s")
        if final:
            last = (images, summary)
    images, summary = last
    per_adj = summary[summary["class_name"] == "all"][["adjective", "fidelity", "n", "mean_intensity"]]
    per_adj_class = summary[summary["class_name"] != "all"].pivot(index="adjective", columns="class_name",
                                                                    values="fidelity")
    return {"curve": curve, "look": look, "adjectives": per_adj.to_dict("records"),
            "adjective_class": {a: r.to_dict() for a, r in per_adj_class.iterrows()},
            "images": images, "examples": len(examples), "settings": settings.to_dict(), "model": model,
            "class_words": sorted(ft.learned_words())}


def _sheet(images: pd.DataFrame, classes: list[str], path: str, per_row: int = 6) -> None:
    from PIL import Image, ImageDraw

    adjs = list(dict.fromkeys(images["adjective"]))
    size = images["rgb"].iloc[0].shape[0]
    label_w, gap = 120, 2
    sheet = Image.new("RGB", (label_w + per_row * (size + gap), len(adjs) * len(classes) * (size + gap)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    r = 0
    for adj in adjs:
        for cls in classes:
            g = images[(images["adjective"] == adj) & (images["class_name"] == cls)].head(per_row)
            top = r * (size + gap)
            draw.text((4, top + size // 2 - 6), f"{adj or '(none)'} / {cls}", fill=(230, 230, 230))
            for j, (rgb, ok) in enumerate(zip(g["rgb"], g["correct"])):
                sheet.paste(Image.fromarray(rgb), (label_w + j * (size + gap), top))
                if not ok:  # a red corner marks images the judge put in another class
                    draw.rectangle([label_w + j * (size + gap), top, label_w + j * (size + gap) + 5, top + 5],
                                   fill=(220, 30, 30))
            r += 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


def main(cfg, argv: list[str]) -> None:
    from meddap.config import Config

    a = _args(cfg, argv)
    torch.set_num_threads(a.threads)
    total = cfg.diffusion.train.epochs
    epochs = ([int(e) for e in a.epochs.split(",")] if a.epochs
              else sorted({0, max(1, total // 4), max(1, total // 2), total}))
    adjectives = ([x.strip() for x in a.adjectives.split(",")] if a.adjectives is not None
                  else list(cfg.generate.adjectives))
    if "" not in adjectives:
        adjectives = ["", *adjectives]
    with tempfile.TemporaryDirectory(prefix="meddap-bench-fidelity-") as tmp:
        d = cfg.to_dict()
        d["run_dir"] = tmp
        run_cfg = Config.from_dict(d, source="bench fidelity")
        t0 = time.perf_counter()
        res = fidelity_curve(run_cfg, epochs, a.per_cell, adjectives, a.fold, a.model, a.judge)
        wall = time.perf_counter() - t0
    classes = list(cfg.data.classes)
    print(f"\nLabel fidelity of generated images (reference judge), {cfg.name} config, fold {a.fold}: "
          f"{res['examples']} training images, LoRA rank {res['settings']['rank']}, lr {res['settings']['lr']}, "
          f"batch {res['settings']['batch_size']}"
          + (f", class words {res['class_words']} learned at lr {res['settings']['class_word_lr']}"
             if res["class_words"] else "")
          + f"; {a.per_cell} images per (adjective, class); "
          f"{cfg.generate.steps} steps, guidance {cfg.generate.guidance_scale}; model {res['model']}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {a.threads}; wall {wall:.0f}s\n")
    curve = pd.DataFrame(res["curve"])
    show = curve[["epoch", "steps", "mean", *classes, "conditioning_gap", "train_seconds", "generate_seconds"]].copy()
    for c in ["mean", *classes]:
        show[c] = [f"{100 * v:.0f} %" for v in show[c]]
    show["conditioning_gap"] = [f"{1000 * v:.2f}e-3" for v in show["conditioning_gap"]]
    print("No-adjective prompts, fidelity against LoRA training (epoch 0 = base model without adapter; "
          f"chance {100 / len(classes):.0f} %):")
    print(show.to_string(index=False))
    last = res["curve"][-1]
    ok = last["mean"] >= TARGET_MEAN and all(last[c] >= TARGET_CLASS for c in classes)
    print("conditioning gap: denoising loss of the training images under another class's prompt minus under their "
          "own (same noise and timesteps); 0 = the class words change nothing")
    print(f"target: mean >= {TARGET_MEAN:.0%} and every class >= {TARGET_CLASS:.0%} after training -> "
          f"{'met' if ok else 'NOT met'}; base without adapter: {base_fidelity(res['curve'])}")
    if res["look"] is not None:
        look = res["look"]
        print("\nBase model without adapter, told each class's look in its own caption words (what USLoRA builds "
              "on: a class the base cannot draw this way is hard to teach):")
        print(pd.DataFrame([{"class": c, "prompt": look["prompts"][c], "fidelity": f"{100 * look[c]:.0f} %"}
                            for c in classes]).to_string(index=False))
        print(f"mean {100 * look['mean']:.0f} %")
    print("\nPer adjective, last checkpoint:")
    rows = []
    for r in res["adjectives"]:
        per = res["adjective_class"].get(r["adjective"], {})
        rows.append({"adjective": r["adjective"] or "(none)", "fidelity": f"{100 * r['fidelity']:.0f} %",
                     **{c: f"{100 * per.get(c, float('nan')):.0f} %" for c in classes},
                     "mean intensity": f"{r['mean_intensity']:.1f}"})
    print(pd.DataFrame(rows).to_string(index=False))
    means = {r["adjective"]: r["mean_intensity"] for r in res["adjectives"]}
    if {"dark", "", "bright"} <= set(means):
        order = means["dark"] < means[""] < means["bright"]
        print(f"mean intensity dark {means['dark']:.1f} < none {means['']:.1f} < bright {means['bright']:.1f}: "
              f"{'yes' if order else 'NO'}")
    if a.sheet:
        _sheet(res["images"], classes, a.sheet)
        print(f"contact sheet: {a.sheet} (red corner: judged as another class)")
    if a.out:
        out = {k: v for k, v in res.items() if k != "images"}
        out.update(wall_seconds=wall, config=cfg.name, per_cell=a.per_cell, fold=a.fold)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
