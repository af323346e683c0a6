"""One classifier trial, plain PyTorch: tensors and settings in, metrics and predictions out.

`train_trial` builds a FRESH model for every trial (the authors' script kept training one network
across adjectives; we never do), seeded from `classify.seed` and the trial's classifier, fold and
repeat only: every adjective and ratio of one (classifier, fold, repeat) starts from the same initial
weights and the same data-order/flip seed (common random numbers), so a paired difference measures the
training data, not the luck of the draw. It trains it
with Adam for `classify.epochs` epochs on in-memory uint8 tensors (augmented on the device), picks the
epoch with the best validation accuracy (the earliest on ties), and evaluates that epoch's weights on
every evaluation set. With `classify.precise_bn` every BatchNorm layer's running statistics are
recomputed from the training images with the epoch's final weights before it is validated
(`precise_bn`, from at most `classify.precise_bn_images` of them), instead of the running averages kept
during the steps, which lag fast-changing weights (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"). On CUDA it uses autocast (bf16 where the GPU has it natively, else fp16 with a
grad scaler), channels_last and fused Adam (the scaler's inf check then stays on the device). Training
and validation images stay on the device for the whole trial and the normalisation constants are built
once, so a step does no host work; the epoch's losses and the validation accuracy are read once per
epoch. When `classify.checkpoint_seconds` have passed since the last checkpoint (checked at each
epoch's end) the `report` callback receives the full training state (model, optimizer, scaler, epoch,
best state, RNG states), and `checkpoint=` resumes from such a state; a resumed trial computes exactly
what an uninterrupted one does.
Ray knows nothing of this module: `meddap.stages.sweep` wraps it in a Tune trainable, the
benchmark calls it directly.
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from meddap.classify.data import EvalSet, TrialSpec, TrialTensors, imagenet_stats, model_input
from meddap.classify.metrics import classification_metrics
from meddap.classify.models import build_classifier, logits_of
from meddap.device import native_bf16

if TYPE_CHECKING:  # pandas is imported where frames are made: `bench gpu` runs this module without it
    import pandas as pd

__all__ = ["TrialResult", "train_trial", "trial_seed", "build_trial_model", "autocast_dtype", "train_step",
           "precise_bn", "predict", "predict_on_device"]

ReportFn = Callable[[int, dict, Optional[dict]], None]


@dataclass
class TrialResult:
    spec: TrialSpec
    seed: int
    metrics: dict[str, dict]                 # eval set -> classification_metrics(...)
    predictions: pd.DataFrame                # trial_id, eval_set, image_id, label, pred, prob_<class>...
    synthetic_eval: dict[str, dict]          # adjective -> {"accuracy", "n"} (real-only trials)
    best_epoch: int                          # 1-based
    best_val_accuracy: float
    train_seconds: float                     # wall time of the epoch loop (training + validation)
    images_per_second: float                 # training images per second of training steps
    state_dict: dict                         # best epoch's weights, on the CPU
    n_real: int
    n_synthetic: int
    epochs: int
    resumed_from_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    # Per-image predictions on the synthetic sets (eval_set "synthetic:<adjective>"): the label-fidelity
    # judges' scores (meddap.classify.fidelity) are the prompted class's column of these.
    synthetic_predictions: Optional[pd.DataFrame] = None


def trial_seed(base_seed: int, spec: TrialSpec) -> int:
    """Seed of a trial: a stable hash (not Python's hash(), which changes per process) of the base seed,
    the classifier, the fold and the repeat; deliberately NOT of the adjective or ratio (common random
    numbers: the real-only baseline and every augmented trial of a cell start alike)."""
    return zlib.crc32(f"{base_seed}:{spec.classifier}:f{spec.fold}:rep{spec.repeat}".encode()) & 0x7FFFFFFF


def build_trial_model(spec: TrialSpec, num_classes: int, seed: int, pretrained: str = "none",
                      weights_dir: Optional[str] = None) -> nn.Module:
    """A new network for this trial: the same seed gives the same initial weights, always."""
    torch.manual_seed(seed)
    return build_classifier(spec.classifier, num_classes, pretrained=pretrained, weights_dir=weights_dir)


def autocast_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """None = full fp32. 'auto': bf16 on CUDA GPUs with native bf16 (Ampere and newer), else fp16 (with
    a grad scaler, see train_trial); fp32 on CPU. 'bf16' where bf16 is only emulated (Turing) runs as
    fp16 too, with a note: emulated bf16 is slower than fp16."""
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if native_bf16(device) or device.type != "cuda":
        return torch.bfloat16
    if mode == "bf16":
        print(f"[sweep] classify.mixed_precision=bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
              "training in fp16 with loss scaling instead.", flush=True)
    return torch.float16


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               inputs: torch.Tensor, labels: torch.Tensor, amp: Optional[torch.dtype]) -> torch.Tensor:
    """One Adam step on a (B, 3, S, S) batch; returns the (detached) loss."""
    with torch.autocast(inputs.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = nn.functional.cross_entropy(logits_of(model(inputs)), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@torch.no_grad()
def precise_bn(model: nn.Module, images: torch.Tensor, batch_size: int, amp: Optional[torch.dtype] = None,
               channels_last: bool = False, stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> int:
    """Replace every BatchNorm layer's running mean and variance by the average of its batch statistics
    over `images` ((N, C, S, S) uint8 on the model's device, no flips) under the current weights; returns
    how many layers. PyTorch's running averages (momentum 0.1) still hold the statistics of weights
    from several steps back, and after a few dozen steps from scratch eval-mode outputs can collapse
    to one class while train-mode ones are right ("precise BN", Wu & Johnson 2021; the same recipe as
    torch.optim.swa_utils.update_bn). Only the BatchNorm layers run in train mode: dropout stays off,
    so no random numbers are drawn and a trial trains exactly as without it."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    was_training, momenta = model.training, [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
        m.train()
    # Near-equal chunks of batch_size to 2 * batch_size - 1 images: no lone last image (train-mode BatchNorm
    # needs 2 values per channel), and a chunk needs no more memory than about two training batches.
    for chunk in torch.tensor_split(images, max(1, images.shape[0] // max(batch_size, 2))):
        x = model_input(chunk, channels_last=channels_last, stats=stats)
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)


@torch.no_grad()
def predict_on_device(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                      amp: Optional[torch.dtype] = None, channels_last: bool = False,
                      stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """(N, 1, S, S) uint8 -> (N, K) float32 class probabilities on `device`, in eval mode (no host sync)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = model_input(images[i:i + batch_size].to(device, non_blocking=True), channels_last=channels_last,
                        stats=stats)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = logits_of(model(x))
        out.append(torch.softmax(logits.float(), dim=1))                 # (B, K)
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0), device=device)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
            amp: Optional[torch.dtype] = None, channels_last: bool = False,
            stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> np.ndarray:
    """(N, 1, S, S) uint8 -> (N, K) float32 class probabilities as a numpy array, in eval mode."""
    probs = predict_on_device(model, images, batch_size, device, amp, channels_last, stats)
    return probs.cpu().numpy() if probs.numel() else np.zeros((0, 0), np.float32)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _predictions_frame(trial_id: str, ev: EvalSet, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame({"trial_id": trial_id, "eval_set": ev.name, "image_id": ev.image_ids,
                          "label": ev.labels.numpy().astype(np.int64), "pred": probs.argmax(1).astype(np.int64)})
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, k].astype(np.float32)
    return frame


def train_trial(spec: TrialSpec, tensors: TrialTensors, cfg_classify, classes: Sequence[str],
                device: torch.device | str = "cpu", checkpoint: Optional[dict] = None,
                report: Optional[ReportFn] = None) -> TrialResult:
    """Train and evaluate one trial. `cfg_classify` is a ClassifyConfig (its classify.per_model settings of
    the trial's classifier apply); `checkpoint` a state the
    `report` callback was given earlier; `report(epoch, metrics, state_or_None)` runs after every
    epoch, with the state once `checkpoint_seconds` have passed since the last one."""
    import pandas as pd

    device = torch.device(device)
    c = cfg_classify.for_model(spec.classifier)   # classify.per_model.<classifier> over the shared settings
    seed = trial_seed(c.seed, spec)
    model = build_trial_model(spec, len(classes), seed, c.pretrained, c.weights_dir).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(c.mixed_precision, device)
    # Fused Adam on CUDA: one kernel per step, and the fp16 scaler's inf check stays on the device.
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, **({"fused": True} if device.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    stats = imagenet_stats(device)                                  # built once per trial

    train_x = tensors.train_images.to(device)                       # (N, 1, S, S) uint8, resident
    train_y = tensors.train_labels.to(device)                       # (N,)
    val = tensors.evals["val"]
    val_x, val_y = val.images.to(device), val.labels.to(device)     # resident too: validated every epoch
    n = train_x.shape[0]
    if n < 2:
        raise ValueError(f"trial {spec.trial_id}: {n} training images; need at least 2")

    start_epoch, best_epoch, best_acc, best_state = 0, 0, -1.0, None
    train_seconds, step_seconds, images_seen, history = 0.0, 0.0, 0, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best_epoch, best_acc = checkpoint["epoch"], checkpoint["best_epoch"], checkpoint["best_val_accuracy"]
        best_state = {k: v.to(device) for k, v in checkpoint["best_state"].items()}
        train_seconds, step_seconds = checkpoint["train_seconds"], checkpoint["step_seconds"]
        images_seen, history = checkpoint["images_seen"], list(checkpoint["history"])
        _set_rng_state(checkpoint["rng"], generator, device)

    bn_x = train_x   # the images precise BN averages over: at most classify.precise_bn_images, spread over the set
    if c.precise_bn and c.precise_bn_images is not None and n > c.precise_bn_images:
        bn_x = train_x[torch.linspace(0, n - 1, c.precise_bn_images, device=device).round().long()]

    model.train()
    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, c.epochs):
        t_epoch = time.perf_counter()
        order = torch.randperm(n, device=device, generator=generator)
        losses = []
        for i in range(0, n, c.batch_size):
            idx = order[i:i + c.batch_size]
            if idx.numel() < 2:
                break  # a lone last image breaks BatchNorm's batch statistics; it is reshuffled next epoch
            x = model_input(train_x[idx], flip=c.random_flip, generator=generator, channels_last=channels_last,
                            stats=stats)
            losses.append(train_step(model, optimizer, scaler, x, train_y[idx], amp))   # x: (B, 3, S, S)
            images_seen += idx.numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds += time.perf_counter() - t_epoch
        if c.precise_bn:  # before validation, so the best epoch's saved state holds these statistics
            precise_bn(model, bn_x, c.batch_size, amp, channels_last, stats)
        probs = predict_on_device(model, val_x, c.batch_size, device, amp, channels_last, stats)  # (n_val, K)
        hits = (probs.argmax(1) == val_y).sum()
        mean_loss = torch.stack(losses).mean() if losses else torch.full((), float("nan"), device=device)
        hits, mean_loss = torch.stack([hits.double(), mean_loss.double()]).tolist()      # the epoch's one sync
        val_acc = float(hits / val_y.numel())
        if val_acc > best_acc:
            best_epoch, best_acc = epoch + 1, val_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        train_seconds += time.perf_counter() - t_epoch
        record = {"epoch": epoch + 1, "loss": mean_loss,
                  "val_accuracy": val_acc, "best_val_accuracy": best_acc, "best_epoch": best_epoch}
        history.append(record)
        if report is not None:
            due = time.monotonic() - last_checkpoint >= c.checkpoint_seconds and epoch + 1 < c.epochs
            state = None
            if due:
                last_checkpoint = time.monotonic()
                state = {"epoch": epoch + 1, "model": _cpu_copy(model.state_dict()),
                         "optimizer": copy.deepcopy(optimizer.state_dict()), "scaler": scaler.state_dict(),
                         "best_epoch": best_epoch, "best_val_accuracy": best_acc, "best_state": _cpu_copy(best_state),
                         "train_seconds": train_seconds, "step_seconds": step_seconds,
                         "images_seen": images_seen, "history": list(history),
                         "rng": _rng_state(generator, device), "trial_id": spec.trial_id}
            report(epoch + 1, dict(record), state)

    model.load_state_dict(best_state)
    metrics, frames = {}, []
    for name, ev in tensors.evals.items():
        probs = predict(model, val_x if name == "val" else ev.images, c.batch_size, device, amp, channels_last, stats)
        metrics[name] = classification_metrics(ev.labels.numpy(), probs.argmax(1), classes)
        frames.append(_predictions_frame(spec.trial_id, ev, probs, classes))
    synthetic_eval, synthetic_frames = {}, []
    for adjective, ev in tensors.synthetic_evals.items():
        probs = predict(model, ev.images, c.batch_size, device, amp, channels_last, stats)
        synthetic_eval[adjective] = {"accuracy": float((probs.argmax(1) == ev.labels.numpy()).mean()),
                                     "n": int(ev.labels.numel())}
        synthetic_frames.append(_predictions_frame(spec.trial_id, ev, probs, classes))
    return TrialResult(
        spec=spec, seed=seed, metrics=metrics, predictions=pd.concat(frames, ignore_index=True),
        synthetic_eval=synthetic_eval, best_epoch=best_epoch, best_val_accuracy=best_acc,
        train_seconds=train_seconds, images_per_second=images_seen / step_seconds if step_seconds > 0 else 0.0,
        state_dict=_cpu_copy(best_state), n_real=tensors.n_real, n_synthetic=tensors.n_synthetic,
        epochs=c.epochs, resumed_from_epoch=start_epoch, history=history,
        synthetic_predictions=pd.concat(synthetic_frames, ignore_index=True) if synthetic_frames else None)
