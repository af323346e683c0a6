"""The fine-tuning core without Ray: prompts, images, equation (1), caching, overfitting, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddap.config import ConfigError, load_config
from meddap.diffusion.base import load_components
from meddap.diffusion.lora import lora_state
from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner, class_prompts, load_image, training_prompt


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # 1 thread: teammates share the 2 cores; 2 threads thrash under load


def _examples(manifest, n):
    cfg = load_config("demo")
    prompts = class_prompts(cfg)
    rows = manifest[manifest["split"] == "train"].head(n)
    return [Example(p, prompts[c]) for p, c in zip(rows["path"], rows["class_name"])]


def _trainer(tiny_sd_dir, examples, **kw):
    settings = FinetuneSettings(**{"resolution": 64, "epochs": 2, "lr": 1e-3, "seed": 0, **kw})
    return LoraFinetuner(load_components(tiny_sd_dir), examples, settings)


def test_prompts_are_rendered_as_the_paper_words_them():
    cfg = load_config("demo")
    assert class_prompts(cfg) == {
        "benign": "ultrasound image of benign tumor in the breast",
        "malignant": "ultrasound image of malignant tumor in the breast",
        "normal": "ultrasound image of no tumor in the breast",
    }
    assert training_prompt("  an   image of {class_phrase}  tumor ", " no ") == "an image of no tumor"
    with pytest.raises(ConfigError, match="class_phrase"):
        training_prompt("an image of {adjective} {class_phrase}", "no")


def test_images_are_grey_replicated_and_in_range(toy_manifest):
    x = load_image(toy_manifest["path"].iloc[0], 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_loss_decreases_on_a_tiny_overfit_set(tiny_sd_dir, toy_manifest):
    ft = _trainer(tiny_sd_dir, _examples(toy_manifest, 2), epochs=12, lr=1e-2)
    assert ft.prediction_type == "epsilon"
    before = ft.eval_loss(repeats=8)
    ft.fit()
    after = ft.eval_loss(repeats=8)
    assert ft.step == 24 and len(ft.losses) == 24
    assert after < 0.95 * before, (before, after)


def test_cached_latents_give_the_same_training_as_encoding_every_step(tiny_sd_dir, toy_manifest):
    ex = _examples(toy_manifest, 3)
    cached = _trainer(tiny_sd_dir, ex, cache_latents=True)
    fresh = _trainer(tiny_sd_dir, ex, cache_latents=False)
    assert cached.latent_mean.shape == (3, 2, 4, 8, 8)  # each image and its flip, 64 px / 8
    assert fresh.latent_mean is None
    a = [r[2] for r in cached.train_epoch(0)]
    b = [r[2] for r in fresh.train_epoch(0)]
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_latents_are_scaled_by_the_vae_config(tiny_sd_dir, toy_manifest):
    ft = _trainer(tiny_sd_dir, _examples(toy_manifest, 2), random_flip=False)
    idx = torch.tensor([0, 1])
    ft.generator.manual_seed(3)
    z = ft._latents(idx)
    ft.generator.manual_seed(3)
    eps = torch.randn(z.shape, generator=ft.generator)
    expected = (ft.latent_mean[:, 0] + ft.latent_std[:, 0] * eps) * ft.vae.config.scaling_factor
    torch.testing.assert_close(z, expected)
    assert ft.scaling_factor == ft.vae.config.scaling_factor


def test_v_prediction_trains_on_the_velocity(tiny_sd_dir, toy_manifest):
    from diffusers import DDPMScheduler

    comps = load_components(tiny_sd_dir)
    comps["noise_scheduler"] = DDPMScheduler.from_config(comps["noise_scheduler"].config, prediction_type="v_prediction")
    ft = LoraFinetuner(comps, _examples(toy_manifest, 1), FinetuneSettings(resolution=64, epochs=1))
    z, n, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    torch.testing.assert_close(ft.target(z, n, t), comps["noise_scheduler"].get_velocity(z, n, t))
    assert not torch.allclose(ft.target(z, n, t), n)
    assert np.isfinite(ft.train_epoch(0)[0][2])


def test_resume_from_state_dict_matches_an_uninterrupted_run(tiny_sd_dir, toy_manifest):
    ex = _examples(toy_manifest, 3)
    straight = _trainer(tiny_sd_dir, ex, epochs=2)
    straight.fit()

    first = _trainer(tiny_sd_dir, ex, epochs=2)
    first.train_epoch(0)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["step"] == 3
    resumed = _trainer(tiny_sd_dir, ex, epochs=2)
    resumed.load_state_dict(state)
    resumed.fit()

    assert resumed.step == straight.step == 6
    assert [r[:2] for r in resumed.losses] == [r[:2] for r in straight.losses]
    np.testing.assert_allclose([r[2] for r in resumed.losses], [r[2] for r in straight.losses], rtol=1e-5)
    a, b = lora_state(resumed.unet), lora_state(straight.unet)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoint_with_other_settings_is_refused(tiny_sd_dir, toy_manifest):
    ex = _examples(toy_manifest, 1)
    state = _trainer(tiny_sd_dir, ex).state_dict()
    other = _trainer(tiny_sd_dir, ex, lr=5e-4)
    with pytest.raises(ValueError, match="other settings.*lr"):
        other.load_state_dict(state)


def test_gradient_checkpointing_trains_the_same_adapter(tiny_sd_dir, toy_manifest):
    ex = _examples(toy_manifest, 2)
    plain = _trainer(tiny_sd_dir, ex)
    ckpt = _trainer(tiny_sd_dir, ex, gradient_checkpointing=True)
    assert ckpt.unet.is_gradient_checkpointing
    a, b = plain.train_epoch(0), ckpt.train_epoch(0)
    np.testing.assert_allclose([r[2] for r in a], [r[2] for r in b], rtol=1e-5)
    sa, sb = lora_state(plain.unet), lora_state(ckpt.unet)
    assert any(float(v.abs().sum()) > 0 for k, v in sb.items() if "lora_B" in k)  # gradients reached LoRA
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def _ddp_worker(rank: int, world: int, port: int, model: str, paths: list, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ex = [Example(p, "ultrasound image of benign tumor in the breast") for p in paths]
        ft = LoraFinetuner(load_components(model), ex, FinetuneSettings(resolution=64, epochs=2, lr=1e-3))
        ft.fit()
        torch.save({"state": lora_state(ft.unet), "step": ft.step, "world": ft.world_size,
                    "losses": ft.losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_share_steps_and_weights(tiny_sd_dir, toy_manifest, tmp_path):
    """Two gloo ranks: each takes half of every step's batch, LoRA gradients are averaged, so both
    ranks finish with the same adapter after ceil(n / 2) steps an epoch."""
    import socket

    import torch.multiprocessing as tmp_mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = list(toy_manifest["path"][:5])
    tmp_mp.spawn(_ddp_worker, args=(2, port, tiny_sd_dir, paths, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] == 2 * 3  # 5 images, 2 ranks, batch 1: 3 steps an epoch
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    assert any(float(v.abs().sum()) > 0 for k, v in r0["state"].items() if "lora_B" in k)
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k])
