"""finetune stage: one USLoRA adapter per fold (or one shared), each trained by a Ray Train TorchTrainer.

    python -m meddap finetune [--config demo] [key=value ...]

For each adapter (`adapters/fold-<k>/`, or `adapters/all/` when diffusion.lora.per_fold is false):
  - training images: fold k's training images (train rows with fold != k), or every train row;
  - a TorchTrainer with `diffusion.train.num_workers` workers, the LoRA gradients averaged across
    workers each step (see meddap.diffusion.train); each worker asks for one GPU when
    `diffusion.train.use_gpu` resolves to true (`auto`: the cluster has or can add GPUs, see
    meddap.placement; an SD-sized model with no GPU in sight is an error, never a silent CPU run);
  - a checkpoint every epoch (LoRA weights, optimizer, step, epoch, RNG, losses) through
    `ray.train.report`; the run is named after its settings and images, so a killed run started
    again with the same config finds its checkpoints (`ray.train.get_checkpoint`) and continues,
    ending with the same number of steps; `diffusion.train.max_failures` restarts a failed worker
    group from the last checkpoint;
  - rank 0 writes `pytorch_lora_weights.safetensors`, with diffusion.lora.class_words also
    `class_words.safetensors` (the learned token embeddings, meddap.diffusion.class_words),
    `loss.parquet` and, last, `adapter.json`.
An adapter whose `adapter.json` exists is complete and is not trained again.

Adapters run one after another, each on all the workers: a trainer already spreads over every GPU
it is given, sequential runs keep checkpoints and resumption per adapter simple, and on the 2-CPU
dev box two trainers side by side would only contend for the same cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any

from meddap import logs, storage
from meddap.config import Config
from meddap.diffusion.base import BUILTIN_MODELS
from meddap.errors import MeddapError
from meddap.layout import RunLayout, adapter_name

__all__ = ["run", "adapter_plan", "finetune_adapter", "complete_adapter", "made_from", "ADAPTER_JSON", "LOSS_PARQUET",
           "STATE_FILE"]

ADAPTER_JSON = "adapter.json"
LOSS_PARQUET = "loss.parquet"
STATE_FILE = "state.pt"


def _log(msg: str) -> None:
    logs.say(f"[finetune] {msg}")


# ---------------------------------------------------------------------------------------------
# What to train
# ---------------------------------------------------------------------------------------------
def _read_manifest(cfg: Config):
    path = RunLayout(cfg.run_dir).manifest
    if not storage.exists(path):
        raise MeddapError(f"no manifest at {path}: run `python -m meddap prepare` with this config first.")
    df = storage.read_parquet(path)
    need = {"image_id", "path", "class_name", "split", "fold", "sha256"}
    missing = sorted(need - set(df.columns))
    if missing:
        raise MeddapError(f"manifest {path} lacks columns {missing}; it was not written by meddap prepare.")
    return df


def adapter_plan(cfg: Config, manifest=None) -> list[dict[str, Any]]:
    """One entry per adapter: fold (-1 = shared), its training rows (sorted by image_id), their hash."""
    df = _read_manifest(cfg) if manifest is None else manifest
    train = df[df["split"] == "train"]
    unknown = sorted(set(train["class_name"]) - set(cfg.data.classes))
    if unknown:
        raise MeddapError(f"manifest has training images of classes {unknown} not in data.classes "
                          f"{cfg.data.classes}; rerun prepare with this config.")
    folds = list(range(cfg.data.folds)) if cfg.diffusion.lora.per_fold else [-1]
    plan = []
    for k in folds:
        rows = train if k < 0 else train[train["fold"] != k]
        if k >= 0 and not (train["fold"] == k).any():
            raise MeddapError(f"manifest has no validation images for fold {k} (data.folds={cfg.data.folds}); "
                              "rerun prepare with this config.")
        rows = rows.sort_values("image_id").reset_index(drop=True)
        if rows.empty:
            raise MeddapError(f"no training images for adapter {adapter_name(k)} in {RunLayout(cfg.run_dir).manifest}.")
        digest = hashlib.sha256("\n".join(f"{i}:{h}" for i, h in zip(rows["image_id"], rows["sha256"])).encode())
        plan.append({"fold": k, "rows": rows, "images_sha256": digest.hexdigest()})
    return plan


# FinetuneSettings fields that say how a device runs the same computation (state._EXECUTION_ONLY):
# an adapter made with other values of these is still this adapter.
_HOW_NOT_WHAT = ("mixed_precision", "gradient_checkpointing")


def made_from(cfg: Config, entry: dict) -> str:
    """sha256 of what an adapter is made from: its training images (ids and pixel hashes), prompts,
    base model and training settings. Recorded in adapter.json; an adapter whose record differs was
    made from other inputs and is never reused."""
    from meddap.diffusion.train import FinetuneSettings, class_prompts

    settings = {k: v for k, v in FinetuneSettings.from_config(cfg).identity().items() if k not in _HOW_NOT_WHAT}
    key = json.dumps({"settings": settings, "base_model": cfg.diffusion.base_model,
                      "prompts": class_prompts(cfg), "images": entry["images_sha256"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _run_name(cfg: Config, entry: dict, model: str) -> str:
    """Ray run name: changes whenever anything that shapes the adapter or its training steps changes
    (the worker count sets the effective batch), so a rerun with the same settings resumes its own
    checkpoints and never someone else's."""
    from meddap.diffusion.train import FinetuneSettings

    t = cfg.diffusion.train
    key = json.dumps({"made_from": made_from(cfg, entry), "settings": FinetuneSettings.from_config(cfg).identity(),
                      "num_workers": t.num_workers, **({"min_workers": t.min_workers} if t.min_workers else {})},
                     sort_keys=True)
    return f"{adapter_name(entry['fold'])}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def complete_adapter(cfg: Config, entry: dict) -> dict | None:
    """adapter.json's content when the adapter is finished AND made from this entry's inputs, else None.
    A finished adapter made from other inputs (prepare reran with another seed or data, the adapter
    folder was copied from another run) is removed, with a note, so it is trained again."""
    out = RunLayout(cfg.run_dir).adapter_dir(entry["fold"])
    done = storage.join(out, ADAPTER_JSON)
    if not storage.exists(done):
        return None
    try:
        meta = json.loads(storage.read_text(done))
    except (ValueError, UnicodeDecodeError):
        meta = {}
    want = made_from(cfg, entry)
    if meta.get("made_from") == want:
        return meta
    _log(f"{adapter_name(entry['fold'])}: {done} was made from other images or settings (made_from "
         f"{str(meta.get('made_from'))[:12]} != {want[:12]}); removing it and training this adapter again")
    storage.remove(out)
    return None


# ---------------------------------------------------------------------------------------------
# The worker loop (runs inside Ray Train; all arguments are plain data)
# ---------------------------------------------------------------------------------------------
def _train_loop(config: dict) -> None:
    import ray.train
    import torch

    from meddap.device import compute_device, describe
    from meddap.diffusion.base import load_components, resolve_base_model
    from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner
    from meddap.progress import Progress

    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    # Ray gave this worker a GPU when use_gpu resolved to true; MEDDAP_DEVICE=cpu computes on the CPU anyway.
    device = compute_device(config["use_gpu"], "fine-tuning worker")
    if device.type == "cuda":
        import ray.train.torch
        device = ray.train.torch.get_device()  # this worker's GPU among the node's

    settings = FinetuneSettings.from_config(cfg)
    examples = [Example(p, q) for p, q in zip(config["paths"], config["prompts"])]
    # Resolved again here: `builtin:tiny` with an object-store run_dir builds into a node-local cache,
    # which the driver's node has but this worker's node may not; `builtin:phantom` is this node's install.
    model = resolve_base_model(cfg) if cfg.diffusion.base_model in BUILTIN_MODELS else config["model"]
    ft = LoraFinetuner(load_components(model, single_file_config=cfg.diffusion.single_file_config), examples,
                       settings, device=device, rank=rank, world_size=world)
    if rank == 0 and ft.word_rows is not None:
        _log(f"{config['name']}: also learning the class words' token embeddings {sorted(ft.learned_words())} "
             f"at lr {settings.class_word_lr} (diffusion.lora.class_words)")
    ckpt = ray.train.get_checkpoint()
    resumed_from = 0
    world_sizes: list[int] = []  # workers in use in each finished epoch (elastic runs change it)
    if ckpt is not None:
        try:
            with ckpt.as_directory() as d:  # tensors and plain data only: no pickled code is run
                state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - cut short by a crash or a full disk: start over
            if rank == 0:
                _log(f"{config['name']}: checkpoint {ckpt.path} is unreadable ({type(e).__name__}: {e}); "
                     f"training from the first epoch")
            state = None
        if state is not None:
            ft.load_state_dict(state)
            world_sizes = list(state.get("world_sizes", []))
            if rank == 0:
                _log(f"{config['name']}: resumed from checkpoint at epoch {ft.epoch}, step {ft.step}"
                     + (f", now on {world} worker(s) (was {state.get('world_size')})"
                        if state.get("world_size") != world else ""))
            resumed_from = ft.step
        ckpt = ckpt if state is not None else None

    remaining = ft.total_steps - ft.step
    progress = Progress(max(remaining, 1), f"finetune {config['name']}", unit="steps",
                        stream=None) if rank == 0 else None
    fail_at = config.get("fail_after_epoch")
    last = f"{ft.losses[-1][2]:.4f}" if ft.losses else "-"
    for epoch in range(ft.epoch, settings.epochs):
        t0 = time.perf_counter()
        # Losses stay on the device during an epoch (no host sync per step): progress shows the last
        # finished epoch's mean loss.
        rows = ft.train_epoch(epoch, on_step=(lambda s: progress.update(
            1, f"epoch {epoch + 1}/{settings.epochs} step {s}/{ft.total_steps} last epoch's loss {last}"))
            if progress else None)
        mean_loss = sum(r[2] for r in rows) / len(rows)
        last = f"{mean_loss:.4f}"
        world_sizes.append(world)
        metrics = {"epoch": epoch + 1, "step": ft.step, "loss": mean_loss,
                   "steps_per_s": len(rows) / max(time.perf_counter() - t0, 1e-9)}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({**ft.state_dict(), "world_sizes": world_sizes}, os.path.join(d, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0 and epoch + 1 < settings.epochs:  # the last epoch's figures are in the "done in" line
            _log(f"{config['name']}: epoch {epoch + 1}/{settings.epochs} done: step {ft.step}, "
                 f"mean loss {mean_loss:.4f}, {metrics['steps_per_s']:.2f} steps/s")
        if fail_at is not None and epoch + 1 == fail_at and ckpt is None:
            # Fault injection for tests: fail once, after a checkpoint, on the first attempt only.
            raise RuntimeError(f"injected failure after epoch {fail_at}")

    if rank == 0:
        _write_outputs(ft, dict(config, device=describe(device)), resumed_from, world_sizes)


def _write_outputs(ft, config: dict, resumed_from: int = 0, world_sizes: list[int] | None = None) -> None:
    """Adapter weights (and class words) and loss table first, adapter.json last (its presence marks completion)."""
    import pandas as pd

    from meddap.diffusion.class_words import CLASS_WORDS_NAME, class_words_bytes
    from meddap.diffusion.lora import LORA_WEIGHTS_NAME, lora_targets, save_lora

    out = config["out_dir"]
    with tempfile.TemporaryDirectory() as d:
        save_lora(ft.unet, d)
        storage.write_bytes(storage.join(out, LORA_WEIGHTS_NAME),
                            open(os.path.join(d, LORA_WEIGHTS_NAME), "rb").read())
    words = ft.learned_words()
    words_file = storage.join(out, CLASS_WORDS_NAME)
    if words:
        storage.write_bytes(words_file, class_words_bytes(words))
    elif storage.exists(words_file):  # left by an unfinished run with class words on: the generator would load it
        storage.remove(words_file)
    losses = pd.DataFrame(ft.losses, columns=["epoch", "step", "loss"]).astype(
        {"epoch": "int64", "step": "int64", "loss": "float64"})
    storage.write_parquet(losses, storage.join(out, LOSS_PARQUET))
    s = ft.settings
    meta = dict(config["meta"])
    meta.update({
        "rank": s.rank,
        "alpha": s.alpha if s.alpha is not None else float(s.rank),
        "targets": s.targets,
        "target_modules": len(lora_targets(ft.unet)),
        "trainable_params": ft.trainable,
        "total_params": ft.total,
        "trainable_share": ft.share,
        "epochs": s.epochs,
        "steps": ft.step,
        "steps_per_epoch": ft.steps_per_epoch,
        "resolution": s.resolution,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "num_workers": ft.world_size,
        "workers_per_epoch": list(world_sizes or []),  # elastic runs: the effective batch of each epoch
        "random_flip": s.random_flip,
        "mixed_precision": s.mixed_precision,
        "gradient_checkpointing": s.gradient_checkpointing,
        "cache_latents": s.cache_latents,
        "seed": s.seed,
        **({"class_words": sorted(words), "class_word_lr": s.class_word_lr, "class_words_file": CLASS_WORDS_NAME,
            "class_word_params": int(ft.word_rows.numel())}  # trained beside trainable_params (the LoRA's)
           if words else {}),
        "prediction_type": ft.prediction_type,
        "resumed_from_step": resumed_from,
        "device": config.get("device", ""),  # where the last run computed, e.g. "cuda:0 (NVIDIA H100 ...)"
        "weight_dtype": str(ft.weight_dtype).replace("torch.", ""),
        "loss_scaling": ft.scaler is not None,
        "final_loss": float(sum(r[2] for r in ft.losses[-ft.steps_per_epoch:]) / ft.steps_per_epoch),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    storage.write_text(storage.join(out, ADAPTER_JSON), json.dumps(meta, indent=2))


# ---------------------------------------------------------------------------------------------
# The driver side
# ---------------------------------------------------------------------------------------------
def _failure_callbacks(adapter: str, max_failures: int) -> list:
    """A Ray Train callback that prints a worker's failure (one meddap line, with its cause) from the
    controller: with the quiet console, Ray's own report of it goes to the log files only."""
    try:
        from ray.train import UserCallback
    except ImportError:  # Ray Train V1: no controller callbacks; its errors reach the driver as before
        return []

    class _SayFailures(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank, exc in sorted(worker_exceptions.items()):
                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                cause = lines[-1] if lines else type(exc).__name__
                _log(f"{adapter}: worker {rank} failed: {cause} (Ray Train restarts it from the last epoch "
                     f"checkpoint until diffusion.train.max_failures={max_failures} restarts are used up)")

    return [_SayFailures()]


def finetune_adapter(cfg: Config, entry: dict, model: str, fail_after_epoch: int | None = None,
                     use_gpu: bool | None = None) -> dict | None:
    """Train one adapter with a TorchTrainer unless its adapter.json exists; returns adapter.json's content.
    `use_gpu`: the resolved diffusion.train.use_gpu (None: resolve it here, see `resolve_gpu`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from meddap.device import forced_cpu

    from meddap.diffusion.train import class_prompts
    from meddap.raytools import keep_sigint_handler

    lay = RunLayout(cfg.run_dir)
    fold = entry["fold"]
    out = lay.adapter_dir(fold)
    done = storage.join(out, ADAPTER_JSON)
    finished = complete_adapter(cfg, entry)
    if finished is not None:
        _log(f"{adapter_name(fold)}: complete already ({done}); not retrained")
        return finished

    rows = entry["rows"]
    prompts = class_prompts(cfg)
    t = cfg.diffusion.train
    if use_gpu is None:
        use_gpu = resolve_gpu(cfg, model)
    name = _run_name(cfg, entry, model)
    meta = {
        "base_model": cfg.diffusion.base_model,
        "base_model_path": model,
        "per_fold": cfg.diffusion.lora.per_fold,
        "fold": fold,
        "adapter": adapter_name(fold),
        "n_images": int(len(rows)),
        "images_sha256": entry["images_sha256"],
        "image_ids": [str(i) for i in rows["image_id"]],
        "class_counts": {c: int((rows["class_name"] == c).sum()) for c in cfg.data.classes},
        "prompt_template": cfg.diffusion.prompt_template,
        "class_phrases": dict(cfg.diffusion.class_phrases),
        "prompts": prompts,
        "ray_run": name,
        "made_from": made_from(cfg, entry),
    }
    cpus = 1.0
    # A CPU worker claims one CPU and uses one torch thread: on a shared box more threads than claimed
    # CPUs thrash (measured: 2 threads under load ran the tiny model ~100x slower than 1). Use more
    # workers (DDP) to use more cores. A GPU worker only needs a few threads to feed its GPU.
    threads = 4 if use_gpu else int(cpus)
    loop_config = {
        "cfg": cfg.to_dict(), "model": model, "name": adapter_name(fold), "out_dir": out,
        "paths": [str(p) for p in rows["path"]], "prompts": [prompts[c] for c in rows["class_name"]],
        "meta": meta, "threads": threads, "fail_after_epoch": fail_after_epoch, "use_gpu": use_gpu,
    }
    storage_path = storage.join(cfg.ray.storage_path or lay.ray_storage, "finetune")
    # meddap.storage's filesystem (it honours AWS_ENDPOINT_URL for S3-compatible servers).
    fs, fs_path = storage.filesystem(storage_path)
    storage.makedirs(storage_path)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        # GPU workers talk NCCL; workers that compute on CPUs (MEDDAP_DEVICE=cpu on GPU nodes too) gloo.
        torch_config=TorchConfig(backend="nccl" if use_gpu and not forced_cpu() else "gloo"),
        # Elastic when min_workers is set: Train V2 (re)starts the group with what the cluster holds.
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
                                     use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(storage_path=fs_path, storage_filesystem=fs, name=name,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=_failure_callbacks(adapter_name(fold), t.max_failures)),
    )
    _log(f"{adapter_name(fold)}: training on {len(rows)} images, {t.epochs} epochs on {t.num_workers} worker(s)"
         f"{' with a GPU each' if use_gpu else ''} (Ray run {name} in {storage_path})")
    t0 = time.perf_counter()
    try:
        with keep_sigint_handler():
            trainer.fit()  # Train V2's Result.metrics may be None: the worker wrote the outputs itself
    except SystemExit:
        # Ray Train's Ctrl-C handler aborts the run and then calls sys.exit (status 0 or 1): report it as
        # the interrupt it is (exit 130 in the CLI), not as a success; the epoch checkpoints are kept.
        raise KeyboardInterrupt from None
    except TrainingFailedError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise MeddapError(
            f"fine-tuning adapter {adapter_name(fold)} failed (after diffusion.train.max_failures={t.max_failures} "
            f"retries): {lines[-1] if lines else type(e).__name__}. Fix the cause and rerun: training resumes from "
            f"the last epoch checkpoint under {storage_path}/{name}.") from None
    if not storage.exists(done):
        raise MeddapError(f"Ray Train finished adapter {adapter_name(fold)} without writing {done}; "
                          f"see the worker logs above (checkpoints under {storage_path}/{name}). If the run was "
                          f"interrupted, rerun to resume it from its last epoch checkpoint.")
    meta = json.loads(storage.read_text(done))
    _log(f"{adapter_name(fold)}: done in {time.perf_counter() - t0:.1f}s: {meta['steps']} steps, final loss "
         f"{meta['final_loss']:.4f} -> {out}")
    return meta


def run(cfg: Config) -> dict:
    """Train every adapter that is not complete yet; returns {adapter name: adapter.json content}."""
    from meddap.diffusion.base import check_base_model, resolve_base_model
    from meddap.raytools import ensure_ray

    from meddap.diffusion.train import FinetuneSettings, class_prompts

    FinetuneSettings.from_config(cfg)  # one rank, valid settings: refused before any work
    class_prompts(cfg)
    plan = adapter_plan(cfg)
    todo = [e for e in plan if complete_adapter(cfg, e) is None]
    results: dict[str, dict] = {}
    use_gpu = False
    if todo:
        model = resolve_base_model(cfg)
        check_base_model(model, cfg.diffusion.single_file_config)
        _print_accounting(cfg, model)
        ensure_ray(cfg)
        use_gpu = resolve_gpu(cfg, model)
    else:
        model = cfg.diffusion.base_model
    for entry in plan:
        results[adapter_name(entry["fold"])] = finetune_adapter(cfg, entry, model, use_gpu=use_gpu)
    return results


def resolve_gpu(cfg: Config, model: str) -> bool:
    """diffusion.train.use_gpu for this cluster and base model (meddap.placement); Ray must be up."""
    from meddap.diffusion.base import count_unet_parameters
    from meddap.placement import gpu_outlook, resolve_use_gpu
    from meddap.raytools import ensure_ray

    ensure_ray(cfg)
    outlook = gpu_outlook(cfg)
    use = resolve_use_gpu(cfg.diffusion.train.use_gpu, "diffusion.train.use_gpu", outlook, what="fine-tuning",
                          unet_parameters=count_unet_parameters(model, cfg.diffusion.single_file_config))
    _log(f"diffusion.train.use_gpu={cfg.diffusion.train.use_gpu}: workers {'ask for one GPU each' if use else 'use CPUs'}"
         f" ({outlook})")
    return use


def _print_accounting(cfg: Config, model: str) -> None:
    """Trainable parameters of this config's LoRA on the base UNet, counted without loading weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from meddap.diffusion.base import unet_config
    from meddap.diffusion.lora import add_uslora, count_trainable, lora_targets

    unet_cfg = unet_config(model, cfg.diffusion.single_file_config)
    l = cfg.diffusion.lora
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        add_uslora(unet, l.ranks[0], l.alpha, l.targets)
    n, total, share = count_trainable(unet)
    _log(f"USLoRA rank {l.ranks[0]} on {l.targets} ({len(lora_targets(unet))} projections): {n:,} trainable of "
         f"{total:,} UNet parameters = {100 * share:.4f} %")
