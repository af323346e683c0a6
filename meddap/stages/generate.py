"""Stage `generate`: synthetic images with adjective prompts, on Ray Data.

    python -m meddap generate --config demo

1. Plan (`meddap.diffusion.plan`): every image of the finished stage, its seed, prompt and path.
2. Reconcile with what is on disk (resume): a manifest row whose file exists and whose spec (seed,
   prompt, adapter weights, steps, guidance, size, scheduler, base model) matches the plan is kept;
   a file without a row (the run was killed after the PNG landed, before the manifest was rewritten)
   is re-listed when the provenance in its PNG text chunk matches the plan, else regenerated;
   everything else (deleted files, stale settings) is generated.
3. Generate what is missing: a Ray Dataset of requests, one block per batch, ordered by adapter so an
   actor switches adapters at most at a boundary; `map_batches` with `_GenerateActor` on an
   `ActorPoolStrategy` pool. With `generate.use_gpu` resolved to true (`auto`: the cluster has GPUs or
   its autoscaler can add them, meddap.placement) every actor asks for `generate.num_gpus_per_worker`
   GPUs whatever the cluster holds at that moment: the pool starts at one actor and grows to what
   the cluster can hold, so an autoscaler adds GPU nodes instead of the work landing on CPUs. Each
   actor loads the base model and every adapter once (peft named adapters, switched with
   `set_adapters`), writes each PNG atomically and returns manifest rows.
   The driver consumes results as they come (`iter_batches`) and rewrites
   `synthetic/manifest.parquet` atomically every few seconds, so a kill loses at most the batches
   in flight.
4. A contact sheet per adapter: `synthetic/contact-<adapter>.png`, adjective rows x class columns.

img2img (`generate.mode: img2img`): the plan names each image's source (a training image of its fold,
`meddap.diffusion.plan.source_sequence`); the actor reads it with `read_grey` at the generation
resolution (the grey form every consumer sees) and passes it with the request. The manifest records
`source_image_id` (null for txt2img); mode, strength and the source are part of each image's spec.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import numpy as np
import pandas as pd

from meddap import logs, storage
from meddap.diffusion.generate import PNG_META_KEY, check_scheduler_name
from meddap.diffusion.plan import GenerationPlan, build_plan
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.progress import Progress

__all__ = ["run", "reconcile", "pool_size", "manifest_rows", "contact_sheet", "MANIFEST_COLUMNS"]

# The contract's columns first, then provenance extras.
MANIFEST_COLUMNS = ["image_id", "path", "fold", "adjective", "class_name", "label", "index", "seed", "prompt",
                    "adapter", "steps", "guidance", "width", "height",
                    "file", "adapter_name", "adapter_sha256", "scheduler", "base_model", "spec",
                    "mode", "strength", "source_image_id"]
_INT_COLUMNS = ["fold", "label", "index", "seed", "steps", "width", "height"]
_FLUSH_EVERY_S = 5.0  # manifest rewrite period: bounds what a kill can lose to the batches in flight


# ---------------------------------------------------------------------------------------------
# Manifest rows and resume
# ---------------------------------------------------------------------------------------------
def manifest_rows(plan: GenerationPlan, images: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows (MANIFEST_COLUMNS) for plan rows `images`."""
    s = plan.settings
    out = images[["image_id", "path", "fold", "adjective", "class_name", "label", "index", "seed", "prompt",
                  "file", "adapter_name", "spec", "source_image_id"]].copy()
    out["mode"], out["strength"] = s.get("mode", "txt2img"), s.get("strength")
    out["adapter"] = out["adapter_name"].map(plan.adapters)
    out["adapter_sha256"] = out["adapter_name"].map(plan.adapter_sha256)
    out["steps"], out["guidance"] = s["steps"], float(s["guidance"])
    out["width"], out["height"] = s["width"], s["height"]
    out["scheduler"], out["base_model"] = s["scheduler"], s["base_model"]
    return _typed(out)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[MANIFEST_COLUMNS].astype({c: "int64" for c in _INT_COLUMNS})
    df["guidance"] = df["guidance"].astype("float64")
    df["strength"] = pd.to_numeric(df["strength"], errors="coerce").astype("float64")   # NaN for txt2img
    for c in ("image_id", "path", "adjective", "class_name", "prompt", "adapter", "file", "adapter_name",
              "adapter_sha256", "scheduler", "base_model", "spec", "mode"):
        df[c] = df[c].astype(str)
    df["source_image_id"] = df["source_image_id"].astype("string")                        # null for txt2img
    return df.reset_index(drop=True)


def _png_spec(path: str) -> str | None:
    """The `spec` recorded in a PNG's provenance chunk, or None when unreadable / absent."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
            im.load()  # decodes every pixel: a truncated or corrupt file raises and is not re-listed
            return json.loads(im.text.get(PNG_META_KEY, "{}")).get("spec")
    except Exception:
        return None


def reconcile(plan: GenerationPlan, run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(manifest rows to keep, plan rows to generate, counts) for what is already on disk."""
    layout = RunLayout(run_dir)
    on_disk = set(storage.listdir(layout.synthetic_dir, recursive=True))
    planned = plan.images.set_index("image_id", drop=False)
    present = planned["path"].isin(on_disk).to_numpy()

    old = storage.read_parquet(layout.synthetic_manifest) if storage.exists(layout.synthetic_manifest) \
        else pd.DataFrame(columns=MANIFEST_COLUMNS)
    if not {"image_id", "spec"} <= set(old.columns):  # a manifest from elsewhere: trust only PNG provenance
        old = pd.DataFrame(columns=MANIFEST_COLUMNS)
    listed = old[old["image_id"].isin(planned.index)]
    same_spec = listed["spec"].to_numpy() == planned.loc[listed["image_id"], "spec"].to_numpy()
    valid = set(listed.loc[same_spec, "image_id"]) & set(planned.index[present])

    relisted = set()
    for image_id in planned.index[present & ~planned.index.isin(list(valid))]:
        # A finished PNG without a valid row: trust it only if its provenance matches the plan.
        if _png_spec(planned.at[image_id, "path"]) == planned.at[image_id, "spec"]:
            relisted.add(image_id)
    keep = plan.images["image_id"].isin(valid | relisted).to_numpy()
    kept = manifest_rows(plan, plan.images[keep])
    todo = plan.images[~keep].reset_index(drop=True)
    counts = {"planned": len(plan), "kept": len(valid), "relisted": len(relisted), "to_generate": len(todo),
              "overwritten": int((present & ~keep).sum()),  # files with other settings or unreadable
              "dropped_rows": len(old) - len(valid)}
    return kept, todo, counts


def _write_manifest(plan: GenerationPlan, rows: pd.DataFrame, path: str) -> None:
    order = plan.images[["image_id"]].reset_index().rename(columns={"index": "_order"})
    rows = rows.merge(order, on="image_id").sort_values("_order").drop(columns="_order")
    storage.write_parquet(_typed(rows), path)


# ---------------------------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------------------------
def pool_size(cfg, resources: dict, use_gpu: bool | None = None, most_gpus: float | None = None) -> dict:
    """{workers, min_workers, num_cpus, num_gpus, threads} of the actor pool for the cluster's `resources`.

    `use_gpu`: the resolved generate.use_gpu (None: GPUs when `resources` has them). `most_gpus`: the
    most GPUs the cluster can have (its autoscaler's node types; default: those it has now).
    GPUs: one actor per `generate.num_gpus_per_worker` GPUs (or `generate.workers`), at least one even
    while the cluster has none: the pool starts with the actors that fit now (at least one) and
    grows to `workers` as GPU nodes join. CPU only: actors of `generate.cpus_per_worker` CPUs, never
    claiming every CPU: a pool that does starves Ray Data's other tasks and hangs forever (ray#44687;
    seen here on 2 CPUs). An automatically sized CPU pool spreads its torch threads over every CPU
    (`threads`), the one it leaves unclaimed included.
    """
    g = cfg.generate
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    free = max(cpus - 1.0, 0.0)  # CPUs the pool may claim: at least one stays free
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu:
        per = g.num_gpus_per_worker
        most = max(gpus, most_gpus or 0.0)
        n = g.workers or max(1, int(most // per))
        now = max(1, min(n, int(gpus // per)))
        # GPU nodes bring their own CPUs: one CPU per actor, less only when the cluster is that small now.
        num_cpus = min(1.0, free / now) if free > 0 else cpus / (2 * now)
        return {"workers": n, "min_workers": now, "num_cpus": num_cpus, "num_gpus": per, "threads": 1,
                "note": f"{now} to {n} actor(s) x {per:g} GPU" if now < n else f"{n} actor(s) x {per:g} GPU"}
    per = g.cpus_per_worker
    most = int(math.floor(free / per + 1e-9))
    note = ""
    if most < 1:  # a one-CPU cluster: a single actor on half of it
        per, most = cpus / 2, 1
        note = f"; only {cpus:g} CPU(s): 1 actor x {per:g} CPU"
    n = g.workers or most
    if n > most:
        note = f"; generate.workers={n} lowered to {most} to leave >= 1 of {cpus:g} CPUs free"
        n = most
    threads = max(1, int(round(per)))
    if g.workers is None:
        # The CPU left free is for Ray Data's own tasks, which use little of it: with the pool sized
        # automatically its actors also run their torch threads there (2 CPUs: one actor, 2 threads,
        # ~1.6x the images/s at the demo's 64 px). Ray still sees the CPU unclaimed, so nothing hangs.
        threads = max(threads, int(cpus // n))
    return {"workers": n, "min_workers": n, "num_cpus": per, "num_gpus": 0.0, "threads": threads,
            "note": f"{n} actor(s) x {per:g} CPU" + (f", {threads} torch threads each" if threads > per else "")
                    + note}


# Columns of a request block; the source columns are "" for txt2img.
_REQUEST_COLUMNS = ["image_id", "path", "adapter_name", "prompt", "seed", "spec", "source_image_id", "source_path"]


def _requests(todo: pd.DataFrame) -> pd.DataFrame:
    out = todo.reindex(columns=_REQUEST_COLUMNS)
    for c in ("source_image_id", "source_path"):
        out[c] = out[c].fillna("").astype(str)
    return out


class _GenerateActor:
    """Ray Data callable class: loads the model and adapters once, then makes batches of images."""

    def __init__(self, cfg: dict, model: str | None, adapters: dict[str, str], settings: dict, threads: int,
                 use_gpu: bool | None = None):
        import torch

        from meddap.config import Config
        from meddap.device import compute_device
        from meddap.diffusion.base import resolve_base_model
        from meddap.diffusion.generate import SyntheticGenerator

        # use_gpu: Ray gave this actor a GPU (None, in-process: whatever this process has).
        device = compute_device(torch.cuda.is_available() if use_gpu is None else use_gpu, "generation actor")
        if device.type == "cpu":
            torch.set_num_threads(threads)
        self.cfg = Config.from_dict(cfg)
        # None: resolve on this node. builtin:tiny with an s3:// run_dir lives in a node-local cache,
        # so a path from the driver's node would not exist here (the build is seeded and atomic).
        model = model or resolve_base_model(self.cfg)
        self.settings = settings
        self.gen = SyntheticGenerator.from_config(self.cfg, model, adapters, device=str(device))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _source(self, path: str) -> np.ndarray | None:
        """img2img's source as (S, S) grey uint8 at the generation resolution; None for txt2img ("")."""
        if not path:
            return None
        from meddap.data.decode import ImageDecodeError, read_grey

        try:
            return read_grey(storage.local_path(path), self.settings["height"])
        except ImageDecodeError as e:
            raise MeddapError(f"img2img source {e}. It is listed in the data manifest: put it back, or rerun "
                              "`python -m meddap prepare` (same config and run_dir), then generate.") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from meddap.diffusion.generate import ImageRequest, png_bytes, png_metadata

        t0 = time.perf_counter()
        sources = [self._source(str(p)) for p in batch["source_path"]]
        requests = [ImageRequest(str(p), int(s), str(a), src)
                    for p, s, a, src in zip(batch["prompt"], batch["seed"], batch["adapter_name"], sources)]
        images = self.gen.generate_batch(requests)  # (H, W, 3) uint8 each
        widths, heights = [], []
        for i, im in enumerate(images):
            if im.shape[:2] != (self.settings["height"], self.settings["width"]):  # checked before writing
                raise MeddapError(f"the pipeline made a {im.shape[1]}x{im.shape[0]} image, not the "
                                  f"{self.settings['width']}x{self.settings['height']} asked for (generate.resolution "
                                  "must be a multiple of the VAE scale factor times the UNet's downsampling).")
            meta = png_metadata(spec=str(batch["spec"][i]), image_id=str(batch["image_id"][i]),
                                seed=int(batch["seed"][i]), prompt=str(batch["prompt"][i]),
                                adapter=str(batch["adapter_name"][i]), **self.settings,
                                source_image_id=str(batch["source_image_id"][i]) if sources[i] is not None else None)
            with storage.open_output(str(batch["path"][i])) as f:  # atomic: no half-written PNG
                f.write(png_bytes(im, meta))
            heights.append(im.shape[0])
            widths.append(im.shape[1])
        n = len(images)
        return {"image_id": batch["image_id"], "out_width": np.array(widths), "out_height": np.array(heights),
                "worker": np.array([self.worker] * n),  # which actor made it: for the run's summary
                "busy_seconds": np.full(n, (time.perf_counter() - t0) / n)}  # actor time per image


def _unwrap(err: BaseException) -> BaseException | None:
    """The user-facing MeddapError/ConfigError inside a Ray error chain, if any.

    An exception in an actor's __init__ reaches the driver as ActorDiedError, which keeps only the
    original's text, so the message is taken from that text when no exception object is left.
    """
    import re

    from meddap.config import ConfigError

    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (MeddapError, ConfigError)):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    found = re.search(r"(MeddapError|ConfigError): (.+)", str(err))
    if found:
        return (ConfigError if found.group(1) == "ConfigError" else MeddapError)(found.group(2).strip())
    return None


def _generate_on_ray(cfg, plan: GenerationPlan, todo: pd.DataFrame, model: str | None, on_done) -> None:
    """model None: each actor resolves diffusion.base_model on its own node (the stage's case)."""
    import ray

    from meddap.raytools import ensure_ray

    ensure_ray(cfg)
    use_gpu, outlook = resolve_gpu(cfg)
    pool = pool_size(cfg, dict(ray.cluster_resources()), use_gpu, outlook.most)
    bs = cfg.generate.batch_size
    # One block per batch, each within one adapter: the plan is ordered by adapter, so an actor
    # switches adapters only where one adapter's images end.
    blocks = []
    for _, group in _requests(todo).groupby("adapter_name", sort=False):
        blocks += [group.iloc[i:i + bs] for i in range(0, len(group), bs)]
    logs.say(f"[generate] {len(todo)} images in {len(blocks)} batches of <= {bs} on {pool['note']}")
    ds = ray.data.from_pandas(blocks).map_batches(
        _GenerateActor,
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(min_size=pool["min_workers"], max_size=pool["workers"]),
        num_cpus=pool["num_cpus"],
        num_gpus=pool["num_gpus"] or None,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "model": model,
                               "adapters": plan.adapters,
                               "settings": plan.settings, "threads": pool["threads"], "use_gpu": use_gpu},
        batch_format="numpy",
    )
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="pandas"):
            on_done(out)
    except Exception as e:
        inner = _unwrap(e)
        if inner is not None:
            raise type(inner)(str(inner)) from None
        raise


def resolve_gpu(cfg):
    """(generate.use_gpu resolved for this cluster and base model, the cluster's GpuOutlook); Ray must be up."""
    from meddap.diffusion.base import count_unet_parameters, resolve_base_model
    from meddap.placement import gpu_outlook, resolve_use_gpu

    outlook = gpu_outlook(cfg)
    params = count_unet_parameters(resolve_base_model(cfg), cfg.diffusion.single_file_config)
    use = resolve_use_gpu(cfg.generate.use_gpu, "generate.use_gpu", outlook, what="generation",
                          unet_parameters=params)
    if use or outlook.most > 0:  # on a CPU-only cluster there is nothing to say
        logs.say(f"[generate] generate.use_gpu={cfg.generate.use_gpu}: actors {'ask for GPUs' if use else 'use CPUs'} "
                 f"({outlook})")
    return use, outlook


def _generate_in_process(cfg, plan: GenerationPlan, todo: pd.DataFrame, model: str | None, on_done) -> None:
    """The same actor code called directly, batch by batch, in this process (no Ray): for the
    benchmark's core-only figure and for tests of resume logic that need no actor start-up."""
    import torch

    actor = _GenerateActor(cfg.to_dict(), model, plan.adapters, plan.settings, threads=torch.get_num_threads())
    bs = cfg.generate.batch_size
    for _, group in _requests(todo).groupby("adapter_name", sort=False):
        for i in range(0, len(group), bs):
            batch = {c: group[c].to_numpy()[i:i + bs] for c in _REQUEST_COLUMNS}
            on_done(pd.DataFrame(actor(batch)))


# ---------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------
def contact_sheet(rows: pd.DataFrame, adjectives: list[str], classes: list[str], per_cell: int,
                  thumb: int = 96):
    """PIL image: one row per adjective, one column group per class, `per_cell` samples each, labelled."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_w, header_h, gap = 120, 22, 6
    cell_w = per_cell * thumb + (per_cell - 1) * 2
    width = label_w + len(classes) * (cell_w + gap)
    height = header_h + len(adjectives) * (thumb + gap)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(classes):
        draw.text((label_w + j * (cell_w + gap) + 2, 4), c, fill="black", font=font)
    for i, adj in enumerate(adjectives):
        y = header_h + i * (thumb + gap)
        draw.text((4, y + thumb // 2 - 6), adj or "(no adjective)", fill="black", font=font)
        for j, c in enumerate(classes):
            cell = rows[(rows["adjective"] == adj) & (rows["class_name"] == c)].sort_values("index")
            for k, path in enumerate(cell["path"].head(per_cell)):
                try:
                    import io
                    im = Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB")
                except Exception:
                    continue  # an unreadable sample leaves a blank tile; the manifest is the record
                x = label_w + j * (cell_w + gap) + k * (thumb + 2)
                sheet.paste(im.resize((thumb, thumb)), (x, y))
    return sheet


def _write_contact_sheets(cfg, manifest: pd.DataFrame) -> list[str]:
    import io

    layout = RunLayout(cfg.run_dir)
    written = []
    for name, rows in manifest.groupby("adapter_name", sort=True):
        sheet = contact_sheet(rows, cfg.generate.adjectives, cfg.data.classes, cfg.report.contact_sheet_per_cell,
                              thumb=max(64, min(cfg.generate_resolution, 128)))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        path = layout.path("synthetic", f"contact-{name}.png")
        storage.write_bytes(path, buf.getvalue())
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def run(cfg, *, in_process: bool = False) -> dict:
    """Generate every planned image that is not already on disk; returns counts and throughput.

    in_process: run the actor code in this process instead of on a Ray Data actor pool (tests and
    the benchmark; the CLI always uses Ray).
    """
    from meddap.diffusion.base import resolve_base_model

    t0 = time.perf_counter()
    layout = RunLayout(cfg.run_dir)
    plan = build_plan(cfg)  # raises on missing adapters, empty adjectives, bad ratios or template
    if cfg.generate.scheduler:
        check_scheduler_name(cfg.generate.scheduler)
    kept, todo, counts = reconcile(plan, cfg.run_dir)
    logs.say(f"[generate] plan: {counts['planned']} images "
          f"({len(plan.adapters)} adapter(s) x {len(cfg.generate.adjectives)} adjective(s) x "
             f"{len(cfg.data.classes)} classes, largest ratio {max(cfg.generate.ratios):g}); "
             f"on disk: {counts['kept']} listed + {counts['relisted']} re-listed from PNG provenance; "
             f"to generate: {counts['to_generate']}")
    if cfg.generate.mode == "img2img":
        logs.say(f"[generate] img2img, strength {cfg.generate.strength:g}: each image starts from a training image of "
                 "its fold (balanced, seeded; never a validation or test image)" if cfg.diffusion.lora.per_fold else
                 f"[generate] img2img, strength {cfg.generate.strength:g}, shared adapter: images start from any "
                 "training image, so fold k's images may come from fold k's validation images (never from test "
                 "images); diffusion.lora.per_fold: true keeps validation clean")
    if counts["dropped_rows"]:
        logs.say(f"[generate] {counts['dropped_rows']} manifest row(s) dropped: file missing, other settings, "
                 "or not in this plan (regenerated if planned)")

    done = [kept]
    _write_manifest(plan, kept, layout.synthetic_manifest)
    gen_seconds = 0.0
    workers: set[str] = set()
    if len(todo):
        resolve_base_model(cfg)  # builds builtin:tiny once here; actors then find it built (same node)
        by_id = todo.set_index("image_id", drop=False)
        progress = Progress(len(todo), "generate", "images")
        pending: list[pd.DataFrame] = []
        last_flush = time.perf_counter()
        t_gen = time.perf_counter()

        def on_done(out: pd.DataFrame) -> None:
            nonlocal last_flush
            workers.update(out["worker"].astype(str))
            rows = manifest_rows(plan, by_id.loc[out["image_id"].astype(str)].reset_index(drop=True))
            pending.append(rows)
            progress.update(len(rows), extra=f"{len(kept) + progress.done + len(rows)}/{len(plan)} in the run")
            if time.perf_counter() - last_flush >= _FLUSH_EVERY_S:
                done.extend(pending)
                pending.clear()
                _write_manifest(plan, pd.concat(done, ignore_index=True), layout.synthetic_manifest)
                last_flush = time.perf_counter()

        try:
            (_generate_in_process if in_process else _generate_on_ray)(cfg, plan, todo, None, on_done)
        finally:  # whatever finished is recorded, also on Ctrl-C or an actor failure
            done.extend(pending)
            _write_manifest(plan, pd.concat(done, ignore_index=True), layout.synthetic_manifest)
        gen_seconds = time.perf_counter() - t_gen

    manifest = storage.read_parquet(layout.synthetic_manifest)
    if len(manifest) != len(plan):
        raise MeddapError(f"generate finished with {len(manifest)} of {len(plan)} planned images listed in "
                          f"{layout.synthetic_manifest}; rerun `python -m meddap generate` to complete it.")
    sheets = _write_contact_sheets(cfg, manifest)
    n_new = counts["to_generate"]
    result = {**counts, "generated": n_new, "seconds": round(time.perf_counter() - t0, 2),
              "images_per_second": round(n_new / gen_seconds, 3) if gen_seconds > 0 else None,
              "workers_used": len(workers), "contact_sheets": sheets}
    logs.say(f"[generate] {len(manifest)} images listed in {layout.synthetic_manifest}; generated {n_new}"
             + (f" at {n_new / gen_seconds:.2f} images/s" if gen_seconds > 0 else "")
             + f"; contact sheets: {', '.join(sheets)}")
    return result
