"""bench fidelity: the conditioning gap measures what it says, and the command runs on a pretrain-base
folder and prints its table (the shipped model's figures are in docs/base-model.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.bench.fidelity import base_fidelity, conditioning_gap
from meddap.diffusion import base
from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner

def _finetuner(folder, tmp_path, prompts: tuple[str, str]) -> LoraFinetuner:
    rng = np.random.default_rng(0)
    examples = []
    for k, prompt in enumerate(prompts):
        for i in range(3):
            path = tmp_path / f"{k}-{i}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
            examples.append(Example(str(path), prompt))
    return LoraFinetuner(base.load_components(str(folder)), examples,
                         FinetuneSettings(resolution=64, epochs=1, batch_size=2, rank=2))


def test_conditioning_gap_swaps_sign_when_the_prompts_swap_and_is_zero_for_one_prompt(tiny_sd_dir, tmp_path):
    """Own prompt vs the other prompt, same noise and timesteps: giving every image the other class's
    prompt turns the gap into its negative, exactly; with one prompt there is nothing to compare."""
    torch.set_num_threads(1)
    a, b = "ultrasound image of benign tumor in the breast", "ultrasound image of no tumor in the breast"
    gap = conditioning_gap(_finetuner(tiny_sd_dir, tmp_path, (a, b)))
    swapped = conditioning_gap(_finetuner(tiny_sd_dir, tmp_path, (b, a)))
    assert gap != 0 and swapped == pytest.approx(-gap, rel=0.01)  # float32 sums
    assert np.isnan(conditioning_gap(_finetuner(tiny_sd_dir, tmp_path, (a, a))))


def test_bench_fidelity_runs_on_a_pretrain_base_folder(phantom_base_dir, tmp_path, capsys):
    """The command as a user types it (in this process: the imports are paid already)."""
    from meddap.cli import main

    folder, _ = phantom_base_dir
    out = tmp_path / "fidelity.json"
    threads = torch.get_num_threads()  # --threads sets this process's torch threads: put them back after
    try:
        rc = main(["bench", "--config", "demo", "fidelity", "--model", str(folder), "--epochs", "0,1",
                   "--per-cell", "1", "--adjectives", "dark", "--threads", "1", "--out", str(out),
                   "--sheet", str(tmp_path / "sheet.png"), "diffusion.train.batch_size=12", "generate.steps=2",
                   "data.phantom.per_class=10", "data.external.phantom.per_class=4"])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-2000:]
    assert "conditioning_gap" in stdout and "target: mean >= 80% and every class >= 60%" in stdout
    assert "Per adjective, last checkpoint" in stdout
    res = json.loads(out.read_text())
    assert [r["epoch"] for r in res["curve"]] == [0, 1]
    assert res["curve"][1]["steps"] > 0 and all(np.isfinite(r["conditioning_gap"]) for r in res["curve"])
    assert {r["adjective"] for r in res["adjectives"]} == {"", "dark"}
    # the base told each class's look in its caption words: prompts the recipe's captions can hold
    assert "told each class's look in its own caption words" in stdout
    from meddap.diffusion.captions import CAPTION_WORDS, FORBIDDEN_WORDS

    look = res["look"]
    assert set(look["prompts"]) == {"benign", "malignant", "normal"} and 0 <= look["mean"] <= 1
    for prompt in look["prompts"].values():   # ("an": make_caption's article before a vowel)
        assert set(prompt.split()) <= set(CAPTION_WORDS) | {"an"} and not set(prompt.split()) & set(FORBIDDEN_WORDS)
    assert Image.open(tmp_path / "sheet.png").size[0] > 0


def test_base_fidelity_comes_from_epoch_0_only():
    """The base without adapter is epoch 0; a curve that starts at an adapter's epoch has no base figure."""
    assert base_fidelity([{"epoch": 0, "mean": 0.28}, {"epoch": 2, "mean": 0.75}]) == "28%"
    assert base_fidelity([{"epoch": 2, "mean": 0.75}, {"epoch": 4, "mean": 0.8}]).startswith("not measured")
