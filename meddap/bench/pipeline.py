"""`python -m meddap bench pipeline [--config demo] [k=v] [--keep] [--out FILE]`: the demo end to end.

Runs the whole pipeline in a fresh temporary run dir (so nothing is skipped) and reports:
  - each stage's wall time and share of the total;
  - Ray's own overhead on this machine: `ray.init` (local start), starting one actor and calling it,
    one task round trip, and per Tune trial the time a trial slot spent outside its training loop
    (sweep wall time x concurrent slots - sum of the trials' train_seconds, per trial), which holds
    Tune's scheduling, actor reuse, result/checkpoint syncing and each trial's data loading;
  - Ray Train's fixed cost (a TorchTrainer.fit() whose loop does nothing, 1 worker) against the
    finetune stage (one fit() per adapter), and Tune's per-trial cost on a grid of empty trials;
  - for fine-tuning, the stage's wall time against the adapters' own training seconds where
    adapter.json records them.
Ray must not be running in this process yet, so the start is measured (the CLI starts none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from meddap import storage
from meddap.config import Config
from meddap.layout import RunLayout

__all__ = ["main", "ray_overheads", "empty_run_overheads", "trial_overhead"]


def ray_overheads() -> dict:
    """Seconds for one actor start + first call, and for one trivial task round trip (Ray running)."""
    import ray

    @ray.remote(num_cpus=0)
    class _Ping:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    def _task() -> int:
        return 1

    t0 = time.perf_counter()
    actor = _Ping.remote()
    ray.get(actor.ping.remote())
    actor_start = time.perf_counter() - t0
    ray.kill(actor)
    ray.get(_task.remote())  # warm a worker for the task
    t0 = time.perf_counter()
    for _ in range(10):
        ray.get(_task.remote())
    task = (time.perf_counter() - t0) / 10
    return {"actor_start_s": actor_start, "task_round_trip_s": task}


def _empty_loop(config: dict) -> None:
    """A Train loop / Tune trainable that does no work: what remains is Ray's own cost."""
    from ray import tune

    if config.get("tune"):
        tune.report({"done": 1})


def empty_run_overheads(storage_dir: str, trials: int = 8) -> dict:
    """Wall seconds of a Ray Train fit() with an empty loop (1 CPU worker), and per trial of a Tune
    grid of `trials` empty trials (1 CPU each): Ray's fixed costs with no work to hide them."""
    from ray import train, tune
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    TorchTrainer(_empty_loop, train_loop_config={},
                 scaling_config=train.ScalingConfig(num_workers=1, use_gpu=False),
                 run_config=train.RunConfig(storage_path=storage_dir, name="empty-train")).fit()
    train_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    tune.Tuner(tune.with_resources(_empty_loop, {"cpu": 1}),
               param_space={"tune": True, "i": tune.grid_search(list(range(trials)))},
               run_config=tune.RunConfig(storage_path=storage_dir, name="empty-tune", verbose=0)).fit()
    tune_wall = time.perf_counter() - t0
    return {"train_empty_fit_s": train_fit, "tune_empty_trials": trials, "tune_empty_wall_s": tune_wall,
            "tune_empty_per_trial_s": tune_wall / trials}


def trial_overhead(cfg: Config, sweep_seconds: float) -> dict | None:
    """Per-trial time outside the training loop, from trials.parquet's train_seconds and the sweep's wall."""
    import math

    import ray

    path = RunLayout(cfg.run_dir).summary("trials")
    if not storage.exists(path) or sweep_seconds <= 0:
        return None
    trials = storage.read_parquet(path).drop_duplicates("trial_id")
    cpus = float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else float(os.cpu_count() or 1)
    slots = max(1, math.floor(cpus / cfg.classify.cpus_per_trial))
    if cfg.classify.max_concurrent_trials:
        slots = min(slots, cfg.classify.max_concurrent_trials)
    slots = min(slots, len(trials))
    train = float(trials["train_seconds"].sum())
    per_trial = (sweep_seconds * slots - train) / len(trials)
    return {"trials": int(len(trials)), "slots": slots, "sum_train_seconds": train,
            "sweep_wall_seconds": sweep_seconds, "non_training_seconds_per_trial": per_trial,
            "training_share_of_slot_time": train / (sweep_seconds * slots)}


def _finetune_train_seconds(cfg: Config) -> float | None:
    lay = RunLayout(cfg.run_dir)
    folds = range(cfg.data.folds) if cfg.diffusion.lora.per_fold else [-1]
    total = 0.0
    for f in folds:
        p = storage.join(lay.adapter_dir(f), "adapter.json")
        if not storage.exists(p):
            return None
        meta = json.loads(storage.read_text(p))
        secs = meta.get("train_seconds", meta.get("seconds"))
        if secs is None:
            return None
        total += float(secs)
    return total


def main(cfg: Config, argv: list[str]) -> dict:
    import ray

    p = argparse.ArgumentParser(prog="python -m meddap bench pipeline")
    p.add_argument("--keep", action="store_true", help="keep the temporary run dir (its path is printed)")
    p.add_argument("--out", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    if ray.is_initialized():
        raise RuntimeError("bench pipeline measures Ray's start: run it in a fresh process")

    import torch

    from meddap.stages.pipeline import _with, run

    tmp = tempfile.mkdtemp(prefix="meddap-bench-")
    bench_cfg = _with(cfg, run_dir=os.path.join(tmp, "run"))
    print(f"[bench pipeline] config '{cfg.name}', run dir {bench_cfg.run_dir}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, cuda={torch.cuda.is_available()}", flush=True)
    try:
        result = run(bench_cfg)
        overhead = ray_overheads()
        overhead.update(empty_run_overheads(os.path.join(tmp, "empty")))
        timings = {t["stage"]: t["seconds"] for t in result["timings"]}
        total = result["total_seconds"]
        trials = trial_overhead(bench_cfg, timings.get("sweep", 0.0))
        ft_train = _finetune_train_seconds(bench_cfg)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print("\n[bench pipeline] stage             seconds   share")
    for stage, secs in timings.items():
        print(f"[bench pipeline] {stage:<16} {secs:8.1f}  {100 * secs / total:5.1f}%")
    print(f"[bench pipeline] {'total':<16} {total:8.1f}")
    print(f"[bench pipeline] Ray overhead: ray.init {timings.get('ray start', float('nan')):.2f}s, "
          f"actor start+first call {overhead['actor_start_s']:.3f}s, task round trip "
          f"{1000 * overhead['task_round_trip_s']:.1f} ms")
    print(f"[bench pipeline] Ray Train fit() of an empty loop (1 worker): {overhead['train_empty_fit_s']:.1f}s; "
          f"Tune grid of {overhead['tune_empty_trials']} empty trials: {overhead['tune_empty_wall_s']:.1f}s "
          f"({overhead['tune_empty_per_trial_s']:.2f}s per trial)")
    n_adapters = cfg.data.folds if cfg.diffusion.lora.per_fold else 1
    if "finetune" in timings:
        print(f"[bench pipeline] finetune: {n_adapters} Ray Train fit() calls x {overhead['train_empty_fit_s']:.1f}s "
              f"of fixed cost = {n_adapters * overhead['train_empty_fit_s']:.1f}s of the stage's "
              f"{timings['finetune']:.1f}s")
    if trials:
        print(f"[bench pipeline] sweep: {trials['trials']} trials on {trials['slots']} slots, "
              f"{trials['sum_train_seconds']:.1f}s in training loops of {trials['sweep_wall_seconds']:.1f}s wall "
              f"-> {trials['non_training_seconds_per_trial']:.2f}s per trial outside training "
              f"(Tune scheduling, actor reuse, syncing, data loading); training is "
              f"{100 * trials['training_share_of_slot_time']:.0f}% of slot time")
    if ft_train is not None and "finetune" in timings:
        print(f"[bench pipeline] finetune: {ft_train:.1f}s in training loops of {timings['finetune']:.1f}s wall "
              f"-> {timings['finetune'] - ft_train:.1f}s of Ray Train start, model loading and checkpointing")
    figures = {"timings": timings, "total_seconds": total, "ray": overhead, "sweep_trials": trials,
               "finetune_train_seconds": ft_train, "cpus": os.cpu_count(),
               "machine": f"{os.cpu_count()}-CPU, cuda={torch.cuda.is_available()}"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return figures
