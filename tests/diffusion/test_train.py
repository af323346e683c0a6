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


@pytest.mark.parametrize("class_words", [False, True])
def test_resume_from_state_dict_matches_an_uninterrupted_run(tiny_sd_dir, toy_manifest, class_words):
    ex = _examples(toy_manifest, 3)
    straight = _trainer(tiny_sd_dir, ex, epochs=2, class_words=class_words)
    straight.fit()

    first = _trainer(tiny_sd_dir, ex, epochs=2, class_words=class_words)
    first.train_epoch(0)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["step"] == 3
    resumed = _trainer(tiny_sd_dir, ex, epochs=2, class_words=class_words)
    resumed.load_state_dict(state)
    resumed.fit()

    assert resumed.step == straight.step == 6
    assert [r[:2] for r in resumed.losses] == [r[:2] for r in straight.losses]
    np.testing.assert_allclose([r[2] for r in resumed.losses], [r[2] for r in straight.losses], rtol=1e-5)
    a, b = lora_state(resumed.unet), lora_state(straight.unet)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    words, again = straight.learned_words(), resumed.learned_words()
    assert sorted(words) == sorted(again) == (["o</w>"] if class_words else [])
    assert all(torch.allclose(words[k], again[k], atol=1e-6) for k in words)
    if class_words:  # the learned rows moved from epoch 1's and the resumed run moved them the same way
        assert not torch.allclose(state["class_words"]["rows"], straight.word_rows.detach(), atol=1e-6)


def test_class_words_train_only_their_rows(tiny_sd_dir, toy_manifest):
    """diffusion.lora.class_words: the tokens that differ between the class prompts (with the tiny SD's
    character tokenizer only "o</w>", from "no") learn their embedding rows; every other row of the
    text encoder's table, and so every prompt without those tokens, encodes exactly as before."""
    ex = _examples(toy_manifest, 3)  # one image of each class: three prompts
    base = load_components(tiny_sd_dir)["text_encoder"].get_input_embeddings().weight.detach().clone()
    ft = _trainer(tiny_sd_dir, ex, epochs=2, class_words=True, class_word_lr=1e-2)
    no = ft.prompts.index("ultrasound image of no tumor in the breast")
    benign = ft.prompts.index("ultrasound image of benign tumor in the breast")
    text_before = ft._encode_text(torch.arange(len(ft.prompts)))
    assert ft.tokenizer.convert_ids_to_tokens(ft.word_ids.tolist()) == ["o</w>"]
    assert ft.text_encoder.get_input_embeddings().weight.requires_grad is False  # the table is never trained
    ft.fit()

    table = ft.text_encoder.get_input_embeddings().weight.detach()
    changed = (table != base).any(1).nonzero().flatten().tolist()
    assert changed == ft.word_ids.tolist()
    words = ft.learned_words()
    assert list(words) == ["o</w>"] and words["o</w>"].dtype == torch.float32
    assert torch.equal(words["o</w>"], table[ft.word_ids[0]])
    assert words["o</w>"].shape == (table.shape[1],)
    text_after = ft._encode_text(torch.arange(len(ft.prompts)))
    assert not torch.allclose(text_after[no], text_before[no])      # the prompt with the class word changed
    torch.testing.assert_close(text_after[benign], text_before[benign], rtol=0, atol=0)  # one without: not at all
    # Training conditions on the learned rows: the same conditioning as the text encoder now gives.
    torch.testing.assert_close(ft._text(torch.arange(len(ex))), text_after[ft.prompt_ids], rtol=1e-5, atol=1e-6)


def test_class_words_need_prompts_that_differ(tiny_sd_dir, toy_manifest):
    ex = [Example(e.path, "ultrasound image of benign tumor in the breast") for e in _examples(toy_manifest, 2)]
    with pytest.raises(ConfigError, match=r"'diffusion\.lora\.class_words' = true .*have none"):
        _trainer(tiny_sd_dir, ex, class_words=True)


def _host_stepped_epoch(ft: LoraFinetuner, epoch: int) -> list[float]:
    """The step loop as it was before the no-host-work refactor: a CPU generator drawn in the same order
    (flips, VAE posterior noise, noise, timesteps), indices copied from the host each step, and the
    loss read with `.item()` every step. On the CPU the refactored `train_epoch` must match it exactly."""
    import torch.nn.functional as F

    order = ft._epoch_order(epoch)
    ft._reseed(epoch)
    g, b, losses = ft.generator, ft.settings.batch_size, []
    for s in range(ft.steps_per_epoch):
        idx = torch.from_numpy(order[s * b:(s + 1) * b].copy())
        flips = torch.rand(len(idx), generator=g) < 0.5
        mean, std = ft.latent_mean[idx, flips.long()], ft.latent_std[idx, flips.long()]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * ft.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, ft.num_train_timesteps, (len(idx),), generator=g)
        pred = ft.unet(ft.noise_scheduler.add_noise(latents, noise, t), t,
                       encoder_hidden_states=ft.cached_text[ft.prompt_ids[idx]]).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        ft.optimizer.step()
        ft.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
    return losses


def test_device_resident_loop_equals_the_host_stepped_loop(tiny_sd_dir, toy_manifest, monkeypatch):
    """Same seed, same arithmetic: the refactored epoch (order, random stream and losses on the device,
    read once) gives exactly the per-step host loop's losses and adapter, with no `.item()` in the loop."""
    ex = _examples(toy_manifest, 4)
    new = _trainer(tiny_sd_dir, ex, batch_size=2)
    old = _trainer(tiny_sd_dir, ex, batch_size=2)
    reads = {"item": 0, "tolist": 0}
    for name in reads:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            import sys

            # torch's unfused CPU AdamW reads its step counter, a CPU scalar (no device sync); on CUDA
            # the trainer uses fused AdamW, which does not. Every other read is counted.
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                reads[_name] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    rows = new.train_epoch(0)
    assert reads == {"item": 0, "tolist": 1}  # one read of the epoch's losses, none per step
    monkeypatch.undo()
    assert [r[2] for r in rows] == _host_stepped_epoch(old, 0)
    a, b = lora_state(new.unet), lora_state(old.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_stream_is_a_function_of_seed_rank_and_epoch(tiny_sd_dir, toy_manifest):
    ex = _examples(toy_manifest, 2)
    draws = {}
    for seed, rank, epoch in [(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0)]:
        ft = LoraFinetuner(load_components(tiny_sd_dir), ex, FinetuneSettings(resolution=64, seed=seed),
                           rank=rank, world_size=2)
        ft._reseed(epoch)
        draws.setdefault((seed, rank, epoch), []).append(torch.randn(4, generator=ft.generator, device=ft.device))
    assert torch.equal(*draws[(0, 0, 0)])
    others = [draws[k][0] for k in [(0, 1, 0), (0, 0, 1), (1, 0, 0)]]
    assert all(not torch.equal(draws[(0, 0, 0)][0], o) for o in others)


def test_checkpoint_with_other_settings_is_refused(tiny_sd_dir, toy_manifest):
    ex = _examples(toy_manifest, 1)
    state = _trainer(tiny_sd_dir, ex).state_dict()
    other = _trainer(tiny_sd_dir, ex, lr=5e-4)
    with pytest.raises(ValueError, match="other settings.*lr"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="other settings.*class_words"):
        _trainer(tiny_sd_dir, _examples(toy_manifest, 3), class_words=True).load_state_dict(
            _trainer(tiny_sd_dir, _examples(toy_manifest, 3)).state_dict())
    # A checkpoint from before the class-word keys existed had their defaults: it still resumes.
    older = {**state, "settings": {k: v for k, v in state["settings"].items() if not k.startswith("class_word")}}
    _trainer(tiny_sd_dir, ex).load_state_dict(older)
    # While class words are off their lr is no setting of the run (nor of its Ray run name): it resumes.
    _trainer(tiny_sd_dir, ex, class_word_lr=1e-2).load_state_dict(state)


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


def _ddp_worker(rank: int, world: int, port: int, model: str, paths: list, out: str, class_words: bool = False) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # With class words, two prompts in turn: each rank's share of a step holds other prompts.
        phrases = ["benign", "no"] if class_words else ["benign"]
        ex = [Example(p, f"ultrasound image of {phrases[i % len(phrases)]} tumor in the breast")
              for i, p in enumerate(paths)]
        ft = LoraFinetuner(load_components(model), ex, FinetuneSettings(resolution=64, epochs=2, lr=1e-3,
                                                                         class_words=class_words))
        ft.fit()
        torch.save({"state": lora_state(ft.unet), "step": ft.step, "world": ft.world_size,
                    "losses": ft.losses, "words": ft.learned_words()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("class_words", [False, True])
def test_data_parallel_ranks_share_steps_and_weights(tiny_sd_dir, toy_manifest, tmp_path, class_words):
    """Two gloo ranks: each takes half of every step's batch, LoRA gradients (and the class words',
    when learned) are averaged, so both ranks finish with the same adapter after ceil(n / 2) steps an epoch."""
    import socket

    import torch.multiprocessing as tmp_mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = list(toy_manifest["path"][:5])
    tmp_mp.spawn(_ddp_worker, args=(2, port, tiny_sd_dir, paths, str(tmp_path), class_words), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] == 2 * 3  # 5 images, 2 ranks, batch 1: 3 steps an epoch
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    assert any(float(v.abs().sum()) > 0 for k, v in r0["state"].items() if "lora_B" in k)
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k])
    assert sorted(r0["words"]) == sorted(r1["words"]) == (["o</w>"] if class_words else [])
    for k in r0["words"]:
        torch.testing.assert_close(r0["words"][k], r1["words"][k])
