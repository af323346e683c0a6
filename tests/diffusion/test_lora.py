"""USLoRA targets exactly the cross-attention projections; the SD-1.4 share is under 0.1 %; the saved
adapter is in diffusers' format and changes a fresh pipeline's output."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from meddap.config import ConfigError, load_config
from meddap.diffusion import base
from meddap.diffusion.lora import (LORA_WEIGHTS_NAME, add_uslora, count_trainable, lora_parameters, lora_targets,
                                   save_lora)

PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def _projections(unet, attn: tuple[str, ...]) -> list[str]:
    return sorted(n for n, m in unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and re.search(rf"\.({'|'.join(attn)})\.({'|'.join(map(re.escape, PROJ))})$", n))


def test_cross_attention_targets_exactly_attn2(tiny_sd_dir):
    unet = base.load_components(tiny_sd_dir)["unet"]
    expected = _projections(unet, ("attn2",))
    assert len(expected) == 4 * 4  # 4 transformer blocks in the tiny UNet, 4 projections each
    add_uslora(unet, rank=4)
    assert lora_targets(unet) == expected
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".attn2." in n and ".lora_" in n for n in trainable)
    # Nothing but LoRA weights train; B starts at zero so the model is unchanged until trained.
    assert all(".lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in unet.named_parameters() if "lora_B" in n)


def test_all_attention_targets_attn1_and_attn2(tiny_sd_dir):
    unet = base.load_components(tiny_sd_dir)["unet"]
    expected = _projections(unet, ("attn1", "attn2"))
    add_uslora(unet, rank=2, targets="all_attention")
    assert lora_targets(unet) == expected
    assert any(".attn1." in t for t in expected) and any(".attn2." in t for t in expected)


def test_sd14_rank4_cross_attention_share_below_0_1_percent():
    with torch.device("meta"):  # SD-1.4-shaped UNet without allocating its 3.4 GB
        unet = base.build_sd14_unet()
        base_total = sum(p.numel() for p in unet.parameters())
        targets = {n: m for n, m in unet.named_modules() if n in _projections(unet, ("attn2",))}
        add_uslora(unet, rank=4)
    trainable, total, share = count_trainable(unet)
    assert base_total == pytest.approx(859.52e6, rel=1e-4)
    assert len(targets) == 16 * 4  # 16 transformer blocks in SD-1.4's UNet
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in targets.values()) == 397_824
    assert total == base_total + trainable
    assert share < 0.001


@pytest.mark.parametrize("overrides, key", [
    (["diffusion.lora.rank=0"], "diffusion.lora.rank"),
    (["diffusion.train.epochs=-1"], "diffusion.train.epochs"),
    (["diffusion.lora.targets=everything"], "diffusion.lora.targets"),
    (["diffusion.lora.alpha=-2"], "diffusion.lora.alpha"),
])
def test_bad_settings_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("demo", overrides)


def test_add_uslora_refuses_bad_arguments(tiny_sd_dir):
    unet = base.load_components(tiny_sd_dir)["unet"]
    with pytest.raises(ConfigError, match="diffusion.lora.rank"):
        add_uslora(unet, rank=0)
    with pytest.raises(ConfigError, match="diffusion.lora.targets.*cross_attention"):
        add_uslora(unet, rank=4, targets="self_attention")


def _generate(pipe) -> np.ndarray:
    return pipe("ultrasound image of benign tumor in the breast", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_adapter_loads_into_fresh_pipeline_and_changes_output(tiny_sd_dir, tmp_path):
    torch.set_num_threads(1)  # 1 thread: teammates share the 2 cores; 2 threads thrash under load
    unet = base.load_components(tiny_sd_dir)["unet"]
    add_uslora(unet, rank=4)
    zero_dir = tmp_path / "fresh"
    save_lora(unet, zero_dir)  # B = 0: loading it must change nothing
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    trained_dir = tmp_path / "trained"
    path = save_lora(unet, trained_dir)
    assert path.endswith(LORA_WEIGHTS_NAME)

    pipe = base.load_pipeline(tiny_sd_dir)
    before = _generate(pipe)
    pipe.load_lora_weights(str(zero_dir))
    np.testing.assert_allclose(_generate(pipe), before, atol=1e-5)
    pipe.unload_lora_weights()

    pipe = base.load_pipeline(tiny_sd_dir)
    pipe.load_lora_weights(str(trained_dir))
    after = _generate(pipe)
    assert np.abs(after - before).mean() > 1e-3
    # The loaded weights are ours, module for module.
    ours = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    theirs = {n: p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    assert len(theirs) == len(ours)
    for n, p in ours.items():
        match = [q for m, q in theirs.items() if m.split(".lora_")[0] == n.split(".lora_")[0]
                 and m.split(".lora_")[1][0] == n.split(".lora_")[1][0]]
        assert len(match) == 1 and torch.allclose(match[0].float(), p.float())
