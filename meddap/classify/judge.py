"""The reference phantom judge: a small CNN that says which phantom class an image shows.

It is trained once, by `python -m meddap pretrain-base`, on its own class-labelled phantom set (seeds
the demo never uses; both devices; the adjectives' photometric transforms and blur as augmentation, so
"dark" or "posterized" images are still judged by their anatomy), and shipped beside the
base model it was made with (`<model folder>/judge/judge.safetensors` + `judge.json`; for
`builtin:phantom`, `meddap/models/phantom/judge/`). Two uses:

- label fidelity: the share of synthetic images it assigns to the class their prompt asked for
  (`label_fidelity`);
- a domain feature extractor for FID/KID/memorisation (`fid.features: phantom-judge`): its
  penultimate layer, `embedding_dims` numbers per image.

Input: (B, H, W) uint8 grey at `image_size` (what `meddap.data.decode.read_grey` returns), each
image standardised to zero mean and unit variance inside the network.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from meddap.errors import MeddapError

__all__ = [
    "JUDGE_WEIGHTS",
    "JUDGE_INFO",
    "PhantomJudge",
    "train_judge",
    "save_judge",
    "load_judge",
    "judge_predict",
    "label_fidelity",
    "fidelity_summary",
]

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_INFO = "judge.json"


class PhantomJudge(nn.Module):
    """Conv blocks (conv-GroupNorm-SiLU-conv-SiLU-maxpool), global average pool, a `embedding_dims`-d
    embedding (the FID features), a linear head over the classes."""

    def __init__(self, classes: Sequence[str], widths: Sequence[int] = (8, 16, 32, 64), embedding_dims: int = 32,
                 image_size: int = 64):
        super().__init__()
        self.classes = list(classes)
        self.widths = [int(w) for w in widths]
        self.embedding_dims = int(embedding_dims)
        self.image_size = int(image_size)
        layers: list[nn.Module] = []
        c = 1
        for w in self.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(min(4, w), w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c, self.embedding_dims)
        self.head = nn.Linear(self.embedding_dims, len(self.classes))

    def config(self) -> dict:
        return {"classes": self.classes, "widths": self.widths, "embedding_dims": self.embedding_dims,
                "image_size": self.image_size}

    def embedding(self, grey: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey (uint8 or float 0..255) -> (B, embedding_dims)."""
        x = grey.float()
        x = (x - x.mean((1, 2), keepdim=True)) / (x.std((1, 2), keepdim=True) + 1e-3)
        return F.silu(self.embed(self.body(x[:, None]).mean((2, 3))))

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey -> (B, classes) logits."""
        return self.head(self.embedding(grey))


class JudgeFeatures(nn.Module):
    """The judge's embedding as an FID feature extractor: (B, 3, H, W) in [0, 1] -> (B, embedding_dims),
    the interface `meddap.fid.extract_features` drives (its inputs are grey replicated to 3 channels)."""

    def __init__(self, judge: PhantomJudge):
        super().__init__()
        self.judge = judge
        self.dims = judge.embedding_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.embedding(x[:, 0] * 255.0)


# ---------------------------------------------------------------------------------------------
# Training (plain PyTorch; pretrain-base calls it)
# ---------------------------------------------------------------------------------------------
def train_judge(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, epochs: int, batch_size: int,
                lr: float, seed: int, augment: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                held_out: tuple[np.ndarray, np.ndarray] | None = None,
                log: Callable[[str], None] = print, image_size: int = 64,
                state: dict | None = None, on_epoch: Callable[[dict], None] | None = None) -> tuple[PhantomJudge, dict]:
    """Train a judge on (N, H, W) uint8 `images` with int `labels`; `augment(image, rng)` makes one
    training view. Deterministic for `seed`. `state` (from `on_epoch`) resumes after a finished epoch.
    Returns the judge (eval mode) and a record: per-epoch loss and held-out accuracy."""
    torch.manual_seed(seed)
    judge = PhantomJudge(classes, image_size=image_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.0)
    history: list[dict] = []
    start = 0
    if state is not None:
        judge.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
    y = torch.as_tensor(labels, dtype=torch.long)
    steps = math.ceil(len(images) / batch_size)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(images))
        judge.train()
        total = 0.0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            batch = torch.from_numpy(np.stack([augment(images[i], rng) for i in idx]))
            loss = F.cross_entropy(judge(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        row = {"epoch": epoch + 1, "loss": total / steps, "seconds": time.perf_counter() - t0}
        if held_out is not None:
            pred = judge_predict(judge, held_out[0])
            row["held_out_accuracy"] = float((pred == np.asarray(held_out[1])).mean())
        history.append(row)
        log(f"[judge] epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}"
            + (f", held-out accuracy {row['held_out_accuracy']:.3f}" if "held_out_accuracy" in row else "")
            + f" ({row['seconds']:.0f}s)")
        if on_epoch is not None:
            on_epoch({"model": judge.state_dict(), "optimizer": opt.state_dict(), "history": history,
                      "epoch": epoch + 1})
    return judge.eval(), {"history": history}


@torch.no_grad()
def judge_predict(judge: PhantomJudge, images: np.ndarray, batch_size: int = 256,
                  probabilities: bool = False) -> np.ndarray:
    """Class index (or (N, classes) probabilities) of (N, H, W) uint8 grey images."""
    judge.eval()
    out = []
    for i in range(0, len(images), batch_size):
        logits = judge(torch.as_tensor(np.asarray(images[i:i + batch_size])))
        out.append(logits.softmax(1) if probabilities else logits.argmax(1))
    if not out:
        return np.zeros((0, len(judge.classes))) if probabilities else np.zeros(0, dtype=np.int64)
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def save_judge(judge: PhantomJudge, folder: str | Path, record: dict) -> None:
    """judge.safetensors (weights) and judge.json (architecture, classes, how it was trained)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / JUDGE_WEIGHTS))
    (folder / JUDGE_INFO).write_text(json.dumps({**judge.config(), **record}, indent=1, sort_keys=True) + "\n")


def load_judge(folder: str | Path, key: str = "fid.features") -> PhantomJudge:
    """The judge saved in `folder` (eval mode). A missing or unreadable file is a MeddapError naming
    `key` (the config key that asked for it) and how to get the file back."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, info = folder / JUDGE_WEIGHTS, folder / JUDGE_INFO
    fix = (f"the judge is written beside the base model by `python -m meddap pretrain-base <folder>` (into "
           f"<folder>/judge/): set diffusion.base_model to such a folder, or set {key} to another value")
    for f in (weights, info):
        if not f.is_file():
            raise MeddapError(f"{key}: {f} is missing; {fix}.")
    try:
        cfg = json.loads(info.read_text())
        judge = PhantomJudge(cfg["classes"], cfg["widths"], cfg["embedding_dims"], cfg["image_size"])
        judge.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise MeddapError(f"{key}: cannot load the judge in {folder} ({type(e).__name__}: {str(e)[:200]}); {fix}.") from None
    return judge.eval()


# ---------------------------------------------------------------------------------------------
# Label fidelity
# ---------------------------------------------------------------------------------------------
def label_fidelity(prompted: Sequence[str], predicted: Sequence[str]) -> np.ndarray:
    """Per image: True where the judge's class is the class the prompt asked for."""
    prompted, predicted = np.asarray(prompted, dtype=object), np.asarray(predicted, dtype=object)
    if prompted.shape != predicted.shape:
        raise ValueError(f"{len(prompted)} prompted classes but {len(predicted)} predictions")
    return prompted == predicted


def fidelity_summary(scored: pd.DataFrame, by: Sequence[str] = ("adjective", "class_name")) -> pd.DataFrame:
    """Share of images judged as their prompted class: one row per `by` group (columns fidelity, n,
    mean_intensity), then one per adjective over all classes (class_name 'all', fidelity = the mean of the
    per-class shares, so a class with more images does not weigh more). `scored` needs columns
    adjective, class_name, correct (bool), mean_intensity."""
    by = list(by)
    per = (scored.groupby(by, sort=True)
           .agg(fidelity=("correct", "mean"), n=("correct", "size"), mean_intensity=("mean_intensity", "mean"))
           .reset_index())
    if "class_name" not in by:
        return per
    rest = [c for c in by if c != "class_name"]
    if rest:
        overall = (per.groupby(rest, sort=True)
                   .agg(fidelity=("fidelity", "mean"), n=("n", "sum")).reset_index())
        intensity = scored.groupby(rest, sort=True)["mean_intensity"].mean().reset_index()
        overall = overall.merge(intensity, on=rest)
    else:
        overall = pd.DataFrame({"fidelity": [per["fidelity"].mean()], "n": [per["n"].sum()],
                                "mean_intensity": [scored["mean_intensity"].mean()]})
    overall["class_name"] = "all"
    return pd.concat([per, overall[per.columns]], ignore_index=True)
