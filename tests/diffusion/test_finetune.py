"""The finetune stage: per-fold training sets, clear errors, and a real Ray Train run that is
interrupted, resumed to the same step count, and not retrained on a rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from meddap import storage
from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stages import finetune


def _cfg(run_dir: Path, *overrides: str):
    return load_config("demo", [f"run_dir={run_dir}", "data.folds=2", "diffusion.train.epochs=2",
                                "ray.num_cpus=1", *overrides])


def _with_manifest(run_dir: Path, manifest: pd.DataFrame) -> None:
    storage.write_parquet(manifest, RunLayout(str(run_dir)).manifest)


def test_per_fold_plan_uses_only_that_folds_training_images(tmp_path, toy_manifest):
    cfg = _cfg(tmp_path)
    plan = finetune.adapter_plan(cfg, toy_manifest)
    assert [e["fold"] for e in plan] == [0, 1]
    train = toy_manifest[toy_manifest["split"] == "train"]
    for e in plan:
        ids = set(e["rows"]["image_id"])
        assert ids == set(train.loc[train["fold"] != e["fold"], "image_id"])
        assert not ids & set(train.loc[train["fold"] == e["fold"], "image_id"])  # no validation images
        assert not ids & set(toy_manifest.loc[toy_manifest["split"] != "train", "image_id"])  # no test images
    assert plan[0]["images_sha256"] != plan[1]["images_sha256"]
    shared = finetune.adapter_plan(_cfg(tmp_path, "diffusion.lora.per_fold=false"), toy_manifest)
    assert [e["fold"] for e in shared] == [-1] and len(shared[0]["rows"]) == len(train)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(MeddapError, match="no manifest.*prepare"):
        finetune.run(_cfg(tmp_path))


def test_missing_base_model_is_a_clear_error(tmp_path, toy_manifest, monkeypatch):
    _with_manifest(tmp_path, toy_manifest)
    with pytest.raises(MeddapError, match="does not exist.*diffusion.base_model"):
        finetune.run(_cfg(tmp_path, f"diffusion.base_model={tmp_path / 'no-such-sd'}"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MeddapError, match="CompVis/stable-diffusion-v1-4.*HF_HUB_OFFLINE"):
        finetune.run(_cfg(tmp_path, "diffusion.base_model=CompVis/stable-diffusion-v1-4"))
    assert not (tmp_path / "adapters").exists()


class _FakeTrainer:
    """Stands in for TorchTrainer: fit() installs a SIGINT handler and leaves it, as Ray Train 2.60 does,
    then ends the way Ray Train's Ctrl-C handler ends it (sys.exit) or returns normally."""

    outcome = "sigint"

    def __init__(self, *args, **kwargs):
        pass

    def fit(self):
        import signal
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # Ray Train's, never put back by Ray
        if _FakeTrainer.outcome == "sigint":
            raise SystemExit(0)  # what Ray Train's handler does after aborting the run


def test_ctrl_c_in_ray_train_is_an_interrupt_and_ctrl_c_works_afterwards(tmp_path, toy_manifest, monkeypatch):
    import signal

    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _FakeTrainer)
    cfg = _cfg(tmp_path)
    entry = finetune.adapter_plan(cfg, toy_manifest)[0]
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(_FakeTrainer, "outcome", "sigint")
    with pytest.raises(KeyboardInterrupt):  # not SystemExit(0): the CLI exits 130, not 0
        finetune.finetune_adapter(cfg, entry, "builtin:tiny", use_gpu=False)
    assert signal.getsignal(signal.SIGINT) is before  # a later Ctrl-C (generate, sweep) is not swallowed
    monkeypatch.setattr(_FakeTrainer, "outcome", "returns")
    with pytest.raises(MeddapError, match="without writing.*rerun to resume"):
        finetune.finetune_adapter(cfg, entry, "builtin:tiny", use_gpu=False)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_ray_train_run_interrupted_resumed_and_not_retrained(tmp_path, toy_manifest, tiny_sd_dir, ray_session):
    _with_manifest(tmp_path, toy_manifest)
    cfg = _cfg(tmp_path, "diffusion.lora.per_fold=false", f"diffusion.base_model={tiny_sd_dir}",
               "diffusion.train.max_failures=0")
    (entry,) = finetune.adapter_plan(cfg)
    out = Path(RunLayout(cfg.run_dir).adapter_dir(-1))

    # First attempt dies after its epoch-1 checkpoint (as a killed run would), leaving no adapter.
    with pytest.raises(MeddapError, match="failed.*resumes from the last epoch checkpoint"):
        finetune.finetune_adapter(cfg, entry, tiny_sd_dir, fail_after_epoch=1)
    assert not (out / finetune.ADAPTER_JSON).exists()

    # Started again with the same config: resumes from the checkpoint, ends with the same step count.
    result = finetune.run(cfg)["all"]
    n = len(entry["rows"])
    assert result["resumed_from_step"] == n  # batch 1, one worker: one step per image per epoch
    assert result["steps"] == 2 * n and result["epochs"] == 2
    assert result["n_images"] == n and result["images_sha256"] == entry["images_sha256"]
    assert result["image_ids"] == sorted(entry["rows"]["image_id"])
    assert result["fold"] == -1 and result["per_fold"] is False
    assert result["targets"] == "cross_attention" and result["rank"] == 4
    assert 0 < result["trainable_share"] < 0.05 and result["trainable_params"] > 0
    assert result["prompts"]["normal"] == "ultrasound image of no tumor in the breast"

    loss = pd.read_parquet(out / finetune.LOSS_PARQUET)
    assert list(loss.columns) == ["epoch", "step", "loss"]
    assert loss["step"].tolist() == list(range(1, 2 * n + 1))
    assert sorted(loss["epoch"].unique()) == [0, 1]
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 0

    # The adapter is a diffusers LoRA any user can load.
    from meddap.diffusion.base import load_pipeline
    pipe = load_pipeline(tiny_sd_dir)
    pipe.load_lora_weights(str(out))
    assert any(".lora_" in name for name, _ in pipe.unet.named_parameters())

    # A rerun finds adapter.json and does not train again.
    stamp = os.path.getmtime(out / finetune.ADAPTER_JSON)
    again = finetune.run(cfg)["all"]
    assert again == json.loads((out / finetune.ADAPTER_JSON).read_text())
    assert os.path.getmtime(out / finetune.ADAPTER_JSON) == stamp


def test_a_finished_adapter_made_from_other_images_is_never_reused(tmp_path, toy_manifest, capsys):
    """adapter.json keeps `made_from` (sha256 of images, prompts, base model, settings); an adapter
    whose record differs (prepare reran with another seed, a folder copied from another run) is
    removed and trained again; execution-only settings (precision) do not count."""
    cfg = _cfg(tmp_path, "diffusion.lora.per_fold=false")
    (entry,) = finetune.adapter_plan(cfg, toy_manifest)
    out = Path(RunLayout(cfg.run_dir).adapter_dir(-1))
    out.mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (out / finetune.ADAPTER_JSON).write_text(json.dumps({"made_from": finetune.made_from(cfg, entry), "steps": 7}))
    assert finetune.complete_adapter(cfg, entry) == {"made_from": finetune.made_from(cfg, entry), "steps": 7}
    fp16 = _cfg(tmp_path, "diffusion.lora.per_fold=false", "diffusion.train.mixed_precision=fp16")
    assert finetune.made_from(fp16, entry) == finetune.made_from(cfg, entry)

    swapped = toy_manifest.copy()
    train = swapped.index[swapped["split"] == "train"]
    swapped.loc[train[0], "sha256"] = "f" * 64  # another image under the same id
    (other,) = finetune.adapter_plan(cfg, swapped)
    assert finetune.made_from(cfg, other) != finetune.made_from(cfg, entry)
    assert finetune.complete_adapter(cfg, other) is None
    assert "was made from other images or settings" in capsys.readouterr().out
    assert not out.exists(), "the stale adapter is removed, so it is trained again"


def test_class_word_settings_are_part_of_made_from(tmp_path, toy_manifest):
    """diffusion.lora.class_words makes another adapter, and so does its lr while it is on; while it is off
    the lr changes nothing and made_from is what it was before the option existed."""
    import hashlib

    from meddap.diffusion.train import FinetuneSettings, class_prompts

    # Explicitly off: the demo config (which _cfg loads) turns the class words on.
    base = _cfg(tmp_path, "diffusion.lora.per_fold=false", "diffusion.lora.class_words=false")
    (entry,) = finetune.adapter_plan(base, toy_manifest)
    on = _cfg(tmp_path, "diffusion.lora.per_fold=false", "diffusion.lora.class_words=true")
    on_lr = _cfg(tmp_path, "diffusion.lora.per_fold=false", "diffusion.lora.class_words=true",
                 "diffusion.train.class_word_lr=0.001")
    off_lr = _cfg(tmp_path, "diffusion.lora.per_fold=false", "diffusion.lora.class_words=false",
                  "diffusion.train.class_word_lr=0.001")
    ids = {finetune.made_from(c, entry) for c in (base, on, on_lr)}
    assert len(ids) == 3
    assert finetune.made_from(off_lr, entry) == finetune.made_from(base, entry)
    # Off: the settings hashed are exactly the ones before the class-word keys were added.
    old = {k: v for k, v in FinetuneSettings.from_config(base).to_dict().items()
           if k not in ("mixed_precision", "gradient_checkpointing", "class_words", "class_word_lr")}
    key = json.dumps({"settings": old, "base_model": base.diffusion.base_model, "prompts": class_prompts(base),
                      "images": entry["images_sha256"]}, sort_keys=True)
    assert finetune.made_from(base, entry) == hashlib.sha256(key.encode()).hexdigest()


def test_adapter_with_class_words_is_written_and_loads_into_the_generator(tmp_path, toy_manifest, tiny_sd_dir):
    """The stage's writer puts class_words.safetensors (token -> fp32 vector) beside the LoRA weights and
    lists the words in adapter.json; the generator reads that folder and sets the rows while the adapter is
    active, the base rows otherwise."""
    import torch
    from safetensors.torch import load_file

    from meddap.diffusion.base import load_components
    from meddap.diffusion.generate import SyntheticGenerator
    from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner, class_prompts

    torch.set_num_threads(1)
    prompts = class_prompts(_cfg(tmp_path))
    rows = toy_manifest[toy_manifest["split"] == "train"].head(3)
    ft = LoraFinetuner(load_components(tiny_sd_dir), [Example(p, prompts[c]) for p, c in zip(rows["path"], rows["class_name"])],
                       FinetuneSettings(resolution=64, epochs=1, lr=1e-3, class_words=True, class_word_lr=1e-2))
    ft.fit()
    out = tmp_path / "adapter"
    finetune._write_outputs(ft, {"out_dir": str(out), "meta": {"base_model": tiny_sd_dir}})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter.json", "class_words.safetensors", "loss.parquet", "pytorch_lora_weights.safetensors"]
    saved = load_file(out / "class_words.safetensors")
    learned = ft.learned_words()
    assert list(saved) == ["o</w>"] and saved["o</w>"].dtype == torch.float32
    torch.testing.assert_close(saved["o</w>"], learned["o</w>"], rtol=0, atol=0)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["class_words"] == ["o</w>"] and meta["class_word_lr"] == 1e-2
    assert meta["class_word_params"] == saved["o</w>"].numel() and meta["trainable_params"] == ft.trainable

    gen = SyntheticGenerator(tiny_sd_dir, {"cw": str(out)}, steps=1, resolution=32)
    table = gen.pipe.text_encoder.get_input_embeddings().weight
    i = gen.pipe.tokenizer.convert_tokens_to_ids("o</w>")
    base_row = table[i].detach().clone()
    assert not torch.allclose(base_row, saved["o</w>"])
    gen._activate("cw")
    torch.testing.assert_close(table[i].detach(), saved["o</w>"], rtol=0, atol=0)
    gen._activate(None)
    torch.testing.assert_close(table[i].detach(), base_row, rtol=0, atol=0)
