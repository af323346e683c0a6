"""builtin:phantom: the shipped files are what the recipe recorded, they load through the same
from_pretrained path as SD-1.4, the recipe runs (and is deterministic), captions hold no class word,
a short USLoRA raises the judge's fidelity above the base model's, and the fidelity arithmetic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from meddap.classify.judge import fidelity_summary, label_fidelity, load_judge
from meddap.config import load_config
from meddap.diffusion import base
from meddap.diffusion.pretrain import PRETRAIN_RECORD, file_hashes, pretrain_base, settings_from
from meddap.errors import MeddapError

torch.set_num_threads(2)
SHIPPED = base.PHANTOM_DIR
WEIGHT_LIMIT_BYTES = 30 * 1024 * 1024
# builtin:phantom's weights are not in the package yet (docs/base-model.md): the tests that need them
# skip, saying so, and run as soon as meddap/models/phantom/ holds pretrain-base's output.
needs_shipped = pytest.mark.skipif(
    not (SHIPPED / PRETRAIN_RECORD).is_file(),
    reason=f"{SHIPPED} is missing from this checkout or install (the package ships it: see docs/base-model.md)")


def _record() -> dict:
    return json.loads((SHIPPED / PRETRAIN_RECORD).read_text())


# ---------------------------------------------------------------------------------------------
# The shipped files
# ---------------------------------------------------------------------------------------------
@needs_shipped
def test_shipped_files_are_exactly_what_the_recipe_recorded():
    record = _record()
    on_disk = {str(p.relative_to(SHIPPED).as_posix()) for p in SHIPPED.rglob("*") if p.is_file()}
    assert on_disk - {PRETRAIN_RECORD} == set(record["files"]), "files added to or missing from the shipped model"
    for rel, digest in record["files"].items():
        assert hashlib.sha256((SHIPPED / rel).read_bytes()).hexdigest() == digest, f"{rel} differs from the record"
    weights = [p for p in SHIPPED.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) <= WEIGHT_LIMIT_BYTES
    # What the docs quote comes from the record: settings, data, seed, steps, wall time and final losses.
    for key in ("settings", "data", "seed", "steps", "wall_seconds", "final_losses"):
        assert key in record
    assert record["settings"] == settings_from().to_dict(), "shipped with settings other than the recipe's"


@needs_shipped
def test_builtin_phantom_resolves_to_the_shipped_folder(tmp_path):
    cfg = load_config("demo", [f"run_dir={tmp_path}", "diffusion.base_model=builtin:phantom"])
    assert base.resolve_base_model(cfg) == str(SHIPPED)
    assert base.base_model_judge_dir("builtin:phantom", "fid.features") == SHIPPED / "judge"


def test_pretrain_output_is_a_base_model_that_loads_like_sd14(phantom_base_dir, tmp_path):
    """A pretrain-base folder given as diffusion.base_model loads through SD-1.4's from_pretrained path."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, record = phantom_base_dir
    cfg = load_config("demo", [f"run_dir={tmp_path}", f"diffusion.base_model={folder}"])
    assert base.resolve_base_model(cfg) == str(folder)
    parts = base.load_components(str(folder))
    assert isinstance(parts["unet"], UNet2DConditionModel) and isinstance(parts["vae"], AutoencoderKL)
    assert isinstance(parts["text_encoder"], CLIPTextModel) and isinstance(parts["tokenizer"], CLIPTokenizer)
    assert any(n.endswith("attn2.to_k") for n, _ in parts["unet"].named_modules())
    pipe = base.load_pipeline(str(folder))
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.vae_scale_factor == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])
    tok = parts["tokenizer"]
    for word in ("benign", "malignant", "no", "tumor", "dark", "bright", "ultrasound"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert base.base_model_judge_dir(str(folder), "fid.features") == folder / "judge"
    with pytest.raises(MeddapError, match="'builtin:huge' is not a builtin model.*builtin:tiny.*builtin:phantom"):
        base.resolve_base_model(load_config("demo", ["diffusion.base_model=builtin:huge"]))


def test_missing_shipped_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "PHANTOM_DIR", tmp_path / "nothing")
    with pytest.raises(MeddapError, match=r"diffusion\.base_model = 'builtin:phantom' needs the shipped folder "
                                          r".*nothing.*absent.*python -m meddap pretrain-base <folder>.*"
                                          r"diffusion\.base_model=<folder>"):
        base.resolve_base_model(load_config("demo", ["diffusion.base_model=builtin:phantom"]))
    with pytest.raises(MeddapError, match=r"builtin:phantom' \(for fid\.features\) needs the shipped folder"):
        base.base_model_judge_dir("builtin:phantom", "fid.features")
    with pytest.raises(MeddapError, match="fid.features.*judge.safetensors is missing.*pretrain-base <folder>"):
        load_judge(tmp_path / "nothing" / "judge", key="fid.features")


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------
def test_recipe_runs_every_phase_and_is_deterministic(phantom_base_dir, tmp_path):
    """The quick recipe (every phase, a few steps), once more into another folder: the same files."""
    folder, a = phantom_base_dir
    b = pretrain_base(tmp_path / "b", settings_from(quick=True), log=lambda _: None)
    assert a["files"] == b["files"] == file_hashes(folder)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "judge/judge.safetensors", "judge/judge.json"} <= set(a["files"])
    assert json.loads((folder / PRETRAIN_RECORD).read_text())["files"] == a["files"]
    assert not (folder / ".work").exists() and not (tmp_path / "b" / ".work").exists()
    for key in ("vae_l1", "unet_mse", "judge_cross_entropy"):
        assert np.isfinite(a["final_losses"][key])
    assert a["command"] == "python -m meddap pretrain-base OUT --quick" and a["settings"]["unet_steps"] == 3
    # The seed reaches the data (and the models: seeded from it the same way).
    from meddap.diffusion.pretrain import build_phantom_corpus

    quiet = lambda _: None  # noqa: E731
    imgs0, caps0, masks0 = build_phantom_corpus(settings_from(quick=True, corpus_size=4), quiet)
    imgs1, caps1, _ = build_phantom_corpus(settings_from(quick=True, corpus_size=4, seed=1), quiet)
    assert not np.array_equal(imgs0, imgs1)


def test_recipe_killed_mid_unet_resumes_to_the_same_files(phantom_base_dir, tmp_path, monkeypatch):
    """Killed right after the UNet's step-2 checkpoint, rerun: it resumes there and writes exactly the
    files of an uninterrupted run, with the killed session's UNet time carried in the checkpoint."""
    from meddap.diffusion import pretrain

    folder, uninterrupted = phantom_base_dir
    save = pretrain._save_atomic

    def save_then_die(obj, path):
        save(obj, path)
        if path.name == "unet.pt" and obj["step"] == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pretrain, "_save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_base(tmp_path / "out", settings_from(quick=True), log=lambda _: None)
    monkeypatch.setattr(pretrain, "_save_atomic", save)
    lines: list[str] = []
    resumed = pretrain_base(tmp_path / "out", settings_from(quick=True), log=lines.append)
    assert "[pretrain] vae: resuming at step 3/3" in lines and "[pretrain] unet: resuming at step 2/3" in lines
    assert resumed["files"] == uninterrupted["files"]
    assert resumed["unet"]["resumed_seconds"] > 0 and resumed["untimed_steps"] == {}
    assert resumed["wall_seconds"]["unet"] >= resumed["unet"]["resumed_seconds"]


def test_recipe_refuses_a_work_dir_of_other_settings(tmp_path):
    (tmp_path / "out" / ".work").mkdir(parents=True)
    (tmp_path / "out" / ".work" / "settings.json").write_text(json.dumps({"seed": 5}))
    with pytest.raises(MeddapError, match="other settings"):
        pretrain_base(tmp_path / "out", settings_from(quick=True), log=lambda _: None)


def test_captions_never_name_a_class_and_adjectives_transform_the_image():
    from meddap.data.phantom import random_lesion_shape
    from meddap.diffusion.captions import ADJECTIVES, apply_adjective, check_caption, make_caption

    rng = np.random.default_rng(0)
    captions = [make_caption(random_lesion_shape(rng) if i % 3 else None, bool(i % 2),
                             ADJECTIVES[i % len(ADJECTIVES)] if i % 2 else "", rng, 0.2, 0.1) for i in range(600)]
    words = {w for c in captions for w in c.replace("-", " ").split()}
    assert not words & {"benign", "malignant", "normal", "tumor", "no"}
    assert {"oval", "irregular", "spiculated", "shadowing", "dark", "bright", "convex"} <= words
    assert "" in captions
    with pytest.raises(ValueError, match="class words"):
        check_caption("ultrasound image of no tumor in the breast")
    grey = np.repeat(np.random.default_rng(1).integers(40, 200, (32, 32), dtype=np.uint8)[..., None], 3, axis=2)
    dark, bright = apply_adjective(grey, "dark", rng), apply_adjective(grey, "bright", rng)
    assert dark.mean() < grey.mean() < bright.mean()
    colorful = apply_adjective(grey, "colorful", rng)
    assert np.abs(colorful[..., 0].astype(int) - colorful[..., 1]).mean() > 5     # no longer grey


# ---------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------
def test_fidelity_arithmetic_on_known_inputs():
    prompted = ["benign"] * 4 + ["malignant"] * 2 + ["normal"] * 2
    predicted = ["benign", "benign", "benign", "normal", "malignant", "benign", "normal", "normal"]
    correct = label_fidelity(prompted, predicted)
    assert correct.tolist() == [True, True, True, False, True, False, True, True]
    scored = pd.DataFrame({"adjective": [""] * 8, "class_name": prompted, "correct": correct,
                           "mean_intensity": [10.0] * 4 + [20.0] * 4})
    s = fidelity_summary(scored).set_index("class_name")
    assert s.loc["benign", "fidelity"] == 0.75 and s.loc["malignant", "fidelity"] == 0.5
    assert s.loc["normal", "fidelity"] == 1.0
    assert s.loc["all", "fidelity"] == pytest.approx(0.75)           # mean of the class shares, not 6/8
    assert s.loc["all", "n"] == 8 and s.loc["all", "mean_intensity"] == 15.0
    with pytest.raises(ValueError, match="2 prompted classes but 1"):
        label_fidelity(["a", "b"], ["a"])


@needs_shipped
def test_short_uslora_on_the_shipped_base_raises_fidelity(tmp_path):
    """12 phantom images per class, a few LoRA epochs with the class words learned (the demo's
    diffusion.lora.class_words): the judge finds the prompted class more often than in the base model's
    images for the same prompts and seeds. Without the class words (the paper's USLoRA, text encoder
    frozen) this base does not get there: its text encoder never saw the class words (docs/base-model.md,
    'Fidelity': 25-47 % after USLoRA, 28 % without)."""
    from meddap.classify.judge import judge_predict
    from meddap.data.phantom import make_phantom_image, phantom_image_rng
    from meddap.diffusion.pretrain import _resize
    from meddap.diffusion.train import Example, FinetuneSettings, LoraFinetuner
    from PIL import Image

    classes = ("benign", "malignant", "normal")
    examples = []
    for c in classes:
        for i in range(1, 13):
            grey, _ = make_phantom_image(c, phantom_image_rng(0, "standard", c, i), 96)
            path = tmp_path / f"{c}-{i}.png"
            Image.fromarray(grey).save(path)
            examples.append(Example(str(path), f"ultrasound image of {'no' if c == 'normal' else c} tumor in the breast"))
    model = str(SHIPPED)
    settings = FinetuneSettings(resolution=64, epochs=LORA_TEST_EPOCHS, lr=LORA_TEST_LR, batch_size=1, rank=4,
                                class_words=True)
    ft = LoraFinetuner(base.load_components(model), examples, settings)
    pipe = base.load_pipeline(model)
    pipe.unet, pipe.text_encoder = ft.unet, ft.text_encoder  # the adapter and the words as trained so far
    judge = load_judge(SHIPPED / "judge")

    def fidelity() -> dict[str, float]:
        ft.unet.eval()
        out = {}
        for k, c in enumerate(classes):
            prompt = f"ultrasound image of {'no' if c == 'normal' else c} tumor in the breast"
            gens = [torch.Generator().manual_seed(100 + i) for i in range(PER_CLASS)]
            with torch.no_grad():
                rgb = pipe([prompt] * PER_CLASS, height=64, width=64, num_inference_steps=10, guidance_scale=3.0,
                           generator=gens, output_type="np").images
            grey = np.stack([_resize(np.uint8(np.rint(im.mean(-1) * 255)), 64) for im in rgb])
            out[c] = float((judge_predict(judge, grey) == k).mean())
        ft.unet.train()
        return out

    before = fidelity()
    ft.fit()
    after = fidelity()
    assert np.mean(list(after.values())) > np.mean(list(before.values())) + 0.2, (before, after)
    assert max(after[c] - before[c] for c in classes) >= 0.5, (before, after)


LORA_TEST_EPOCHS = 2  # the demo's USLoRA (lr 1e-4, batch 1, sampled at guidance 3) for 2 of its 6 epochs
LORA_TEST_LR = 1e-4
PER_CLASS = 6  # images generated per class before and after: one image is 17 points of a class's share


def test_recipe_never_writes_over_a_finished_model_or_other_files(phantom_base_dir, tmp_path):
    phantom_base_dir, _ = phantom_base_dir
    before = (phantom_base_dir / PRETRAIN_RECORD).read_bytes()
    with pytest.raises(MeddapError, match="already holds a finished model.*--overwrite"):
        pretrain_base(phantom_base_dir, settings_from(quick=True, seed=1), log=lambda _: None)
    assert (phantom_base_dir / PRETRAIN_RECORD).read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    with pytest.raises(MeddapError, match=r"other files \(notes.txt\)"):
        pretrain_base(tmp_path / "notes", settings_from(quick=True), log=lambda _: None)
    with pytest.raises(MeddapError, match="--threads 0"):
        pretrain_base(tmp_path / "t", settings_from(quick=True, threads=0), log=lambda _: None)


def test_lesion_loss_weights_cover_the_lesion_and_its_margin_and_mirror_it():
    from meddap.diffusion.pretrain import build_phantom_corpus, lesion_loss_weights

    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 20:28, 8:16] = 255                       # latent pixels (5..6, 2..3) at scale 4
    w = lesion_loss_weights(masks, 16, 5.0)
    assert w.shape == (2, 2, 1, 16, 16)
    hot = w[0, 0, 0] == 5.0
    expect = np.zeros((16, 16), bool)
    expect[4:8, 1:5] = True                           # the lesion's 2x2 latent pixels and one around them
    assert np.array_equal(hot.numpy(), expect)
    assert set(w[0, 0, 0].unique().tolist()) == {1.0, 5.0}
    assert torch.equal(w[0, 1], w[0, 0].flip(-1))     # the mirrored sample's weights are mirrored
    assert torch.equal(w[1], torch.ones(2, 1, 16, 16))  # no lesion: SD's plain loss
    assert torch.equal(lesion_loss_weights(masks, 16, 1.0), torch.ones(2, 2, 1, 16, 16))
    # The corpus's masks are its lesions: a scan whose caption names a mass has one, "breast tissue" none.
    imgs, caps, corpus_masks = build_phantom_corpus(settings_from(quick=True, corpus_size=12), lambda _: None)
    assert corpus_masks.shape == imgs.shape[:3]
    for cap, m in zip(caps, corpus_masks):
        if "mass" in cap.split():
            assert m.max() == 255
        if "tissue" in cap.split():
            assert m.max() == 0


def test_recipe_settings_changed_on_the_command_line_are_typed_checked_and_recorded():
    from meddap.diffusion.pretrain import _command, parse_setting_overrides

    assert parse_setting_overrides(["filler_share=0", "unet_steps=200"]) == {"filler_share": 0.0, "unet_steps": 200}
    for bad, says in (("nope=1", "unknown setting 'nope'"), ("unet_steps=1.5", "unet_steps takes a int"),
                      ("filler_share", "expected KEY=VALUE"), ("seed=3", "with --seed")):
        with pytest.raises(MeddapError, match=says):
            parse_setting_overrides([bad])
    assert _command(settings_from()) == "python -m meddap pretrain-base OUT"
    assert _command(settings_from(quick=True, seed=2)) == "python -m meddap pretrain-base OUT --quick --seed 2"
    changed = settings_from(filler_share=0.0, seed=1)
    assert _command(changed) == "python -m meddap pretrain-base OUT --seed 1 --set filler_share=0.0"
