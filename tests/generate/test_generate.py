"""The generator core, the stage's resume logic (in process) and one Ray Data run with two actors."""

import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from meddap import storage
from meddap.config import ConfigError
from meddap.diffusion.generate import ImageRequest, SyntheticGenerator
from meddap.stages import generate as stage

from .conftest import make_cfg

PROMPT = "bright ultrasound image of benign tumor in the breast"


@pytest.fixture(scope="module")
def generator(tiny_sd_dir, gen_template):
    adapters = {f"fold-{k}": str(gen_template / "adapters" / f"fold-{k}") for k in (0, 1)}
    return SyntheticGenerator(tiny_sd_dir, adapters, steps=2, guidance_scale=7.5, resolution=32)


def _read(path):
    return np.asarray(Image.open(path))


def test_same_seed_same_pixels_and_batch_independence(generator):
    reqs = [ImageRequest(PROMPT, 1000 + i, "fold-0") for i in range(5)]
    a = generator.generate_batch(reqs)
    b = generator.generate_batch(reqs)
    assert all(x.shape == (32, 32, 3) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seeds, same batch: bit-identical
    assert not np.array_equal(a[0], a[1])  # other seed, other image
    alone = generator.generate_one(PROMPT, 1003, "fold-0")
    mixed = generator.generate_batch([ImageRequest("dark ultrasound image of no tumor in the breast", 7, "fold-1"),
                                      ImageRequest(PROMPT, 1003, "fold-0")])[1]
    # Own generator per image: same starting noise in any batch; BLAS kernels picked by batch size
    # may round differently, by at most a grey level or two.
    for other in (alone, mixed):
        diff = np.abs(other.astype(int) - a[3].astype(int))
        assert diff.max() <= 2 and (diff == 0).mean() > 0.9


def test_adapters_switch_without_reload(generator):
    f0 = generator.generate_one(PROMPT, 5, "fold-0")
    f1 = generator.generate_one(PROMPT, 5, "fold-1")
    base = generator.generate_one(PROMPT, 5, None)
    assert np.abs(f0.astype(int) - f1.astype(int)).mean() > 1
    assert np.abs(f0.astype(int) - base.astype(int)).mean() > 1
    assert np.array_equal(generator.generate_one(PROMPT, 5, "fold-0"), f0)  # switching back restores it
    with pytest.raises(KeyError, match="not loaded"):
        generator.generate_one(PROMPT, 5, "fold-7")


def test_scheduler_by_class_name(tiny_sd_dir, generator):
    ddim = SyntheticGenerator(tiny_sd_dir, scheduler="DDIMScheduler", steps=2, resolution=32)
    assert ddim.scheduler_name == "DDIMScheduler" and generator.scheduler_name == "PNDMScheduler"
    a = ddim.generate_one(PROMPT, 11)
    assert a.shape == (32, 32, 3) and np.array_equal(a, ddim.generate_one(PROMPT, 11))


def test_unknown_scheduler_and_cpu_fp16_are_refused(tiny_sd_dir):
    with pytest.raises(ConfigError, match="generate.scheduler"):
        SyntheticGenerator(tiny_sd_dir, scheduler="NoSuchScheduler", resolution=32)
    with pytest.raises(ConfigError, match="fp16"):
        SyntheticGenerator(tiny_sd_dir, precision="fp16", device="cpu", resolution=32)


def _manifest(run_dir):
    return pd.read_parquet(run_dir / "synthetic" / "manifest.parquet")


def test_stage_outputs_manifest_and_contact_sheet(run_dir, tiny_sd_dir):
    cfg = make_cfg(run_dir, tiny_sd_dir)
    out = stage.run(cfg, in_process=True)
    assert out["planned"] == out["generated"] == 24  # (6 + 6 images per adjective) x 2 adjectives
    m = _manifest(run_dir)
    for col in ("image_id", "path", "adjective", "class_name", "prompt", "adapter"):
        assert pd.api.types.is_string_dtype(m[col]), col
    for col in ("fold", "label", "index", "seed", "steps", "width", "height"):
        assert m[col].dtype == np.int64, col
    assert m["guidance"].dtype == np.float64
    assert m["image_id"].is_unique and len(m) == 24
    assert set(m["fold"]) == {0, 1} and set(m["adjective"]) == {"", "bright"}
    assert (m["steps"] == 2).all() and (m["width"] == 32).all() and (m["guidance"] == 7.5).all()
    assert m.loc[m["class_name"] == "normal", "prompt"].str.contains(" no tumor").all()
    assert (m["adapter"] == m["fold"].map(lambda k: str(run_dir / "adapters" / f"fold-{k}"))).all()
    per = m.groupby(["fold", "class_name"]).size() // 2
    assert per[(0, "benign")] == 2 and per[(1, "benign")] == 3 and per[(1, "normal")] == 1
    for p in m["path"]:
        im = Image.open(p)
        assert im.size == (32, 32) and im.mode == "RGB" and "meddap" in im.text
    assert not [f for f in os.listdir(run_dir / "synthetic" / "fold-0" / "none" / "benign") if f.startswith(".tmp")]
    sheet = Image.open(run_dir / "synthetic" / "contact-fold-1.png")
    assert sheet.size[1] > 2 * 64 and sheet.size[0] > 3 * 2 * 64  # 2 adjective rows x 3 classes x 2 samples
    assert os.path.exists(run_dir / "synthetic" / "contact-fold-0.png")


def test_resume_after_deletions_regenerates_exactly_those(run_dir, tiny_sd_dir):
    cfg = make_cfg(run_dir, tiny_sd_dir)
    stage.run(cfg, in_process=True)
    m = _manifest(run_dir)
    before = {p: _read(p) for p in m["path"]}
    mtimes = {p: os.stat(p).st_mtime_ns for p in m["path"]}
    again = stage.run(cfg, in_process=True)
    assert again["to_generate"] == 0 and again["kept"] == 24
    assert all(os.stat(p).st_mtime_ns == t for p, t in mtimes.items())

    gone = list(m["path"].iloc[[1, 9, 20]])
    for p in gone:
        os.unlink(p)
    out = stage.run(cfg, in_process=True)
    assert out["to_generate"] == 3 and out["kept"] == 21 and out["dropped_rows"] == 3
    changed = [p for p in m["path"] if os.stat(p).st_mtime_ns != mtimes.get(p)]
    assert sorted(changed) == sorted(gone)
    for p in gone:  # same seeds: the same images (up to batch-size rounding, see above)
        assert np.abs(_read(p).astype(int) - before[p].astype(int)).max() <= 2
    assert len(_manifest(run_dir)) == 24


def test_resume_after_a_kill_and_orphan_files(run_dir, tiny_sd_dir, monkeypatch):
    cfg = make_cfg(run_dir, tiny_sd_dir)
    calls = {"n": 0}
    real_call = stage._GenerateActor.__call__

    def dies_on_third_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill half-way
        return real_call(self, batch)

    monkeypatch.setattr(stage._GenerateActor, "__call__", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg, in_process=True)
    monkeypatch.setattr(stage._GenerateActor, "__call__", real_call)
    m = _manifest(run_dir)
    assert len(m) == 8  # the two finished batches of 4 are recorded, nothing else
    assert all(os.path.exists(p) for p in m["path"])

    # files whose rows were lost (killed between the PNG write and the manifest rewrite) are re-listed
    storage.write_parquet(m.iloc[:5], str(run_dir / "synthetic" / "manifest.parquet"))
    out = stage.run(cfg, in_process=True)
    assert out["kept"] == 5 and out["relisted"] == 3 and out["to_generate"] == 16
    assert len(_manifest(run_dir)) == 24

    # other settings: nothing is re-listed, every image is redone
    out = stage.run(make_cfg(run_dir, tiny_sd_dir, "generate.guidance_scale=3.0"), in_process=True)
    assert out["to_generate"] == 24 and out["overwritten"] == 24
    assert (_manifest(run_dir)["guidance"] == 3.0).all()


def test_missing_adapter_is_a_clear_error(run_dir, tiny_sd_dir):
    os.unlink(run_dir / "adapters" / "fold-1" / "adapter.json")
    with pytest.raises(stage.MeddapError, match="fold-1.*finetune"):
        stage.run(make_cfg(run_dir, tiny_sd_dir), in_process=True)


def test_pool_never_claims_every_cpu(run_dir, tiny_sd_dir):
    cfg = make_cfg(run_dir, tiny_sd_dir, "generate.workers=null", "generate.cpus_per_worker=1")
    assert stage.pool_size(cfg, {"CPU": 2.0})["workers"] == 1
    # the CPU left unclaimed lends its threads to an automatically sized pool, never to a chosen one
    assert stage.pool_size(cfg, {"CPU": 2.0})["threads"] == 2 and stage.pool_size(cfg, {"CPU": 16.0})["threads"] == 1
    assert stage.pool_size(make_cfg(run_dir, tiny_sd_dir, "generate.workers=1"), {"CPU": 2.0})["threads"] == 1
    assert stage.pool_size(cfg, {"CPU": 16.0, "GPU": 4.0})["workers"] == 4
    assert stage.pool_size(cfg, {"CPU": 16.0, "GPU": 4.0})["num_gpus"] == 1.0
    for cpus in (1.0, 2.0, 3.0, 8.0):
        for per in (0.5, 1.0, 2.0):
            for workers in ("null", "1", "4", "64"):
                c = make_cfg(run_dir, tiny_sd_dir, f"generate.workers={workers}", f"generate.cpus_per_worker={per}")
                pool = stage.pool_size(c, {"CPU": cpus})
                assert pool["workers"] >= 1
                assert pool["workers"] * pool["num_cpus"] <= cpus - min(1.0, cpus / 2) + 1e-9


def test_ray_data_run_with_two_actors(run_dir, tiny_sd_dir, ray_session):
    import ray.data

    cfg = make_cfg(run_dir, tiny_sd_dir, "generate.batch_size=2")  # 2 actors x 0.5 CPU of the 2
    ctx = ray.data.DataContext.get_current()
    before = ctx.wait_for_min_actors_s
    # Both actors up before the first batch is dispatched; otherwise, on a loaded box, the first
    # actor can finish all 12 batches before the second has imported torch.
    ctx.wait_for_min_actors_s = 300
    try:
        out = stage.run(cfg)
    finally:
        ctx.wait_for_min_actors_s = before
    assert out["generated"] == 24 and out["workers_used"] == 2
    m = _manifest(run_dir)
    assert len(m) == 24 and m["image_id"].is_unique
    # the same images the core makes in this process
    gen = SyntheticGenerator(tiny_sd_dir, {"fold-1": str(run_dir / "adapters" / "fold-1")}, steps=2, resolution=32)
    row = m[(m["fold"] == 1) & (m["adjective"] == "bright")].iloc[0]
    here = gen.generate_one(row["prompt"], int(row["seed"]), "fold-1")
    assert np.abs(here.astype(int) - _read(row["path"]).astype(int)).max() <= 2


def test_actor_errors_reach_the_user_as_meddap_errors():
    try:
        try:
            raise stage.MeddapError("weights missing: put them in /x")
        except stage.MeddapError as inner:
            raise RuntimeError("ray wrapper") from inner
    except RuntimeError as e:
        assert str(stage._unwrap(e)) == "weights missing: put them in /x"
    # an actor's __init__ failure arrives as ActorDiedError holding only the original's text
    text = RuntimeError("The actor died ... Traceback ...\nmeddap.errors.MeddapError: base model folder '/m' is "
                        "not a diffusers folder")
    assert isinstance(stage._unwrap(text), stage.MeddapError)
    assert "base model folder '/m'" in str(stage._unwrap(text))
    assert stage._unwrap(RuntimeError("something else")) is None


def test_adapter_alpha_from_adapter_json_scales_the_lora(tiny_sd_dir, gen_template, tmp_path):
    import json

    from .conftest import make_adapter

    # alpha = 2 x rank recorded in adapter.json (diffusers' file carries no alpha) == B doubled at alpha = rank
    scaled, doubled = tmp_path / "scaled", tmp_path / "doubled"
    make_adapter(tiny_sd_dir, scaled, seed=20, fold=0)
    info = json.loads((scaled / "adapter.json").read_text())
    (scaled / "adapter.json").write_text(json.dumps({**info, "rank": 4, "alpha": 8}))
    make_adapter(tiny_sd_dir, doubled, seed=20, fold=0, b_scale=2.0)
    gen = SyntheticGenerator(tiny_sd_dir, {"scaled": str(scaled), "doubled": str(doubled),
                                           "plain": str(gen_template / "adapters" / "fold-0")},
                             steps=2, resolution=32)
    a, b, c = (gen.generate_one(PROMPT, 3, n).astype(int) for n in ("scaled", "doubled", "plain"))
    assert np.abs(a - b).max() <= 2
    assert np.abs(a - c).mean() > 1


def test_class_words_belong_to_their_adapter(tiny_sd_dir, gen_template, tmp_path):
    """An adapter folder holding class_words.safetensors (as the finetune stage writes it) sets those rows of
    the pipeline's one text encoder while that adapter is active; another adapter and None get the base
    rows back. A prompt without the learned token ("o</w>" of "no" in the tiny character tokenizer) is
    untouched. img2img shares the same text encoder."""
    import json
    import shutil
    from pathlib import Path

    import torch

    from meddap.diffusion.class_words import CLASS_WORDS_NAME, class_words_bytes

    dim = json.loads((Path(tiny_sd_dir) / "text_encoder" / "config.json").read_text())["hidden_size"]
    words, same = tmp_path / "words", tmp_path / "same"
    shutil.copytree(gen_template / "adapters" / "fold-0", words)
    shutil.copytree(gen_template / "adapters" / "fold-0", same)           # the same LoRA without class words
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(0)) * 3
    (words / CLASS_WORDS_NAME).write_bytes(class_words_bytes({"o</w>": vector}))
    gen = SyntheticGenerator(tiny_sd_dir, {"words": str(words), "same": str(same),
                                           "plain": str(gen_template / "adapters" / "fold-1")}, steps=2, resolution=32)
    no, benign = "ultrasound image of no tumor in the breast", "ultrasound image of benign tumor in the breast"

    @torch.no_grad()
    def encoded(prompt):
        ids = gen.pipe.tokenizer(prompt, padding="max_length", max_length=gen.pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        return gen.pipe.text_encoder(ids)[0]                                # (1, 77, D)

    base_no, base_benign = encoded(no), encoded(benign)
    under = {}
    for adapter in ("words", "plain", None, "same", "words"):
        gen._activate(adapter)
        under.setdefault(adapter, []).append((encoded(no), encoded(benign)))
    assert not torch.allclose(under["words"][0][0], base_no)                # the learned word is in use
    torch.testing.assert_close(under["words"][0][1], base_benign, rtol=0, atol=0)
    torch.testing.assert_close(under["words"][1][0], under["words"][0][0], rtol=0, atol=0)  # switching back
    for other in ("plain", None, "same"):                                   # base rows restored
        torch.testing.assert_close(under[other][0][0], base_no, rtol=0, atol=0)
    assert gen.img2img.text_encoder is gen.pipe.text_encoder

    # Through generate_batch, as the stage calls it: the same LoRA with and without the class words.
    assert not np.array_equal(gen.generate_one(no, 3, "words"), gen.generate_one(no, 3, "same"))
    assert np.array_equal(gen.generate_one(benign, 3, "words"), gen.generate_one(benign, 3, "same"))


def test_class_words_of_another_tokenizer_are_a_clear_error(tiny_sd_dir, gen_template, tmp_path):
    import shutil

    import torch

    from meddap.diffusion.class_words import CLASS_WORDS_NAME, class_words_bytes
    from meddap.errors import MeddapError

    folder = tmp_path / "foreign"
    shutil.copytree(gen_template / "adapters" / "fold-0", folder)
    (folder / CLASS_WORDS_NAME).write_bytes(class_words_bytes({"benign</w>": torch.zeros(8)}))
    with pytest.raises(MeddapError, match=r"foreign/class_words\.safetensors: tokens \['benign</w>'\] are not in "
                                          r"this base model's tokenizer"):
        SyntheticGenerator(tiny_sd_dir, {"fold-0": str(folder)}, steps=2, resolution=32)
    (folder / CLASS_WORDS_NAME).write_bytes(class_words_bytes({"o</w>": torch.zeros(3)}))
    with pytest.raises(MeddapError, match=r"class_words\.safetensors: vectors of \['o</w>'\] have shape \(3,\)"):
        SyntheticGenerator(tiny_sd_dir, {"fold-0": str(folder)}, steps=2, resolution=32)
