"""Real-image-guided generation (generate.mode: img2img) and the label-fidelity filter's spares: sources
from the fold's training images only, recorded per image; specs, resume and the Ray Data path."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from meddap.config import ConfigError, load_config
from meddap.data.decode import read_grey
from meddap.diffusion.generate import SyntheticGenerator
from meddap.diffusion.plan import (build_plan, extra_count, generation_settings, image_seed, select_synthetic,
                                   synthetic_count)
from meddap.stages import generate as stage
from meddap.stages.generate import manifest_rows

from .conftest import CLASSES, make_cfg

# Three folds, so that fold k's training rows (fold != k) and its validation rows (fold == k) both exist
# beside other folds' rows; plus test and external rows that must never be a source.
TRAIN3 = {(0, "benign"): 3, (0, "malignant"): 2, (0, "normal"): 1,
          (1, "benign"): 2, (1, "malignant"): 1, (1, "normal"): 2,
          (2, "benign"): 4, (2, "malignant"): 2, (2, "normal"): 1}


def _manifest3() -> pd.DataFrame:
    rows = []
    for (fold, c), n in TRAIN3.items():
        for i in range(n):
            rows.append({"image_id": f"A-{c}-{fold}-{i}", "path": f"/data/{c}/{fold}-{i}.png", "class_name": c,
                         "label": CLASSES.index(c), "split": "train", "fold": fold, "sha256": f"h{fold}{i}"})
    for split in ("test", "external"):
        for c in CLASSES:
            rows.append({"image_id": f"{split}-{c}", "path": f"/data/{split}-{c}.png", "class_name": c,
                         "label": CLASSES.index(c), "split": split, "fold": -1, "sha256": "t"})
    return pd.DataFrame(rows)


def _cfg(tmp_path, *overrides):
    return load_config("demo", [f"run_dir={tmp_path}", "data.folds=3", "generate.adjectives=['', bright]",
                                "generate.ratios=[0.5, 1.0, 2.0]", "generate.mode=img2img", *overrides])


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def test_img2img_sources_are_the_folds_training_images_balanced_and_shared_by_adjectives(tmp_path):
    m = _manifest3()
    plan = build_plan(_cfg(tmp_path), m, check_adapters=False)
    im = plan.images
    by_id = m.set_index("image_id")
    assert im["source_image_id"].notna().all()
    for _, row in im.iterrows():
        src = by_id.loc[row["source_image_id"]]
        # fold k's training images only: never its validation rows (fold == k), never test or external
        assert src["split"] == "train" and src["fold"] != row["fold"] and src["class_name"] == row["class_name"]
        assert row["source_path"] == src["path"]
    for (fold, adjective, c), g in im.groupby(["fold", "adjective", "class_name"]):
        n_train = sum(n for (f, cc), n in TRAIN3.items() if f != fold and cc == c)
        times = g["source_image_id"].value_counts()
        assert len(times) == min(len(g), n_train)                       # every training image before any twice
        assert times.max() - times.min() <= 1                           # balanced
        for ratio in (0.5, 1.0):                                        # every prefix balanced too
            head = g.sort_values("index")["source_image_id"].iloc[:synthetic_count(n_train, ratio)]
            assert head.value_counts().max() <= math.ceil(ratio)
    a = im[im["adjective"] == ""].sort_values(["fold", "class_name", "index"])["source_image_id"].tolist()
    b = im[im["adjective"] == "bright"].sort_values(["fold", "class_name", "index"])["source_image_id"].tolist()
    assert a == b                                                       # image i of every adjective: same source
    again = build_plan(_cfg(tmp_path), m, check_adapters=False).images
    assert again["source_image_id"].tolist() == im["source_image_id"].tolist()   # deterministic
    other = build_plan(_cfg(tmp_path, "generate.seed=5"), m, check_adapters=False).images
    assert other["source_image_id"].tolist() != im["source_image_id"].tolist()


def test_shared_adapter_sources_are_training_rows_never_test(tmp_path):
    m = _manifest3()
    im = build_plan(_cfg(tmp_path, "diffusion.lora.per_fold=false"), m, check_adapters=False).images
    train = m[m["split"] == "train"].set_index("image_id")
    assert set(im["fold"]) == {-1} and set(im["source_image_id"]) <= set(train.index)
    assert (train.loc[im["source_image_id"], "class_name"].to_numpy() == im["class_name"].to_numpy()).all()


def test_txt2img_records_no_source_and_keeps_its_old_spec(tmp_path):
    m = _manifest3()
    cfg = _cfg(tmp_path, "generate.mode=txt2img")
    plan = build_plan(cfg, m, check_adapters=False)
    rows = manifest_rows(plan, plan.images)
    assert rows["source_image_id"].isna().all() and rows["strength"].isna().all() and (rows["mode"] == "txt2img").all()
    # The spec formula of runs made before img2img existed: their images are kept on resume.
    old = {k: v for k, v in generation_settings(cfg).items() if k not in ("mode", "strength")}
    r = plan.images.iloc[5]
    blob = json.dumps({**old, "adapter_sha256": "", "seed": int(r["seed"]), "prompt": r["prompt"]}, sort_keys=True)
    assert r["spec"] == hashlib.sha256(blob.encode()).hexdigest()[:16]
    # strength does nothing to txt2img pixels, so it does not change their spec; it does for img2img
    assert build_plan(_cfg(tmp_path, "generate.mode=txt2img", "generate.strength=0.3"), m,
                      check_adapters=False).images["spec"].equals(plan.images["spec"])
    i2i = build_plan(_cfg(tmp_path), m, check_adapters=False).images
    assert not (i2i["spec"] == plan.images["spec"]).any()
    weaker = build_plan(_cfg(tmp_path, "generate.strength=0.5"), m, check_adapters=False).images
    assert not (weaker["spec"] == i2i["spec"]).any()
    changed = m.assign(sha256=m["sha256"].where(m["image_id"] != "A-benign-0-0", "new-pixels"))
    moved = build_plan(_cfg(tmp_path), changed, check_adapters=False).images
    differs = moved["spec"] != i2i["spec"]
    assert differs.any() and (i2i.loc[differs, "source_image_id"] == "A-benign-0-0").all()


def test_filter_spares_extend_each_set_and_unfiltered_trials_ignore_them(tmp_path):
    m = _manifest3()
    cfg = _cfg(tmp_path, "generate.filter_overgenerate=0.5")
    plan = build_plan(cfg, m, check_adapters=False)
    counts = plan.counts().set_index(["fold", "adjective", "class_name"])["n"]
    for fold in (0, 1, 2):
        for c in CLASSES:
            n_top = synthetic_count(sum(n for (f, cc), n in TRAIN3.items() if f != fold and cc == c), 2.0)
            assert counts[(fold, "bright", c)] == n_top + extra_count(n_top, 0.5) == n_top + math.ceil(n_top / 2)
    syn = manifest_rows(plan, plan.images)
    base = manifest_rows(*(lambda p: (p, p.images))(build_plan(_cfg(tmp_path), m, check_adapters=False)))
    for r in (0.5, 2.0):                                                # the same images as without spares
        assert select_synthetic(syn, m, cfg, 1, "bright", r)["image_id"].tolist() == \
            select_synthetic(base, m, cfg, 1, "bright", r)["image_id"].tolist()
    # spares keep the balanced source draw going: the spare's sources continue the same sequence
    spare = plan.images[(plan.images["fold"] == 2) & (plan.images["adjective"] == "")]
    plain = build_plan(_cfg(tmp_path), m, check_adapters=False).images
    plain = plain[(plain["fold"] == 2) & (plain["adjective"] == "")]
    assert spare[spare["index"] < len(plain) // 3]["source_image_id"].isin(plain["source_image_id"]).all()
    assert extra_count(10, 0.3) == 3 and extra_count(1, 0.1) == 1 and extra_count(0, 0.5) == 0


def test_img2img_settings_are_checked_at_the_door():
    with pytest.raises(ConfigError, match="generate.strength"):
        load_config("demo", ["generate.strength=0"])
    with pytest.raises(ConfigError, match=r"generate.strength.*int\(generate.steps x strength\) >= 1"):
        load_config("demo", ["generate.mode=img2img", "generate.steps=2", "generate.strength=0.4"])
    load_config("demo", ["generate.mode=txt2img", "generate.steps=2", "generate.strength=0.4"])   # unused there
    with pytest.raises(ConfigError, match="generate.mode"):
        load_config("demo", ["generate.mode=inpaint"])
    with pytest.raises(ConfigError, match="generate.filter_overgenerate"):
        load_config("demo", ["generate.filter_overgenerate=-0.1"])


# ---------------------------------------------------------------------------------------------
# The stage, with real source files
# ---------------------------------------------------------------------------------------------
def _with_real_images(run_dir) -> pd.DataFrame:
    """Write a distinct grey PNG (40 px, other than the 32 px generation size) for every row of the
    fixture's data manifest and point the manifest at them."""
    m = pd.read_parquet(run_dir / "data" / "manifest.parquet")
    rng = np.random.default_rng(3)
    folder = run_dir / "data" / "images"
    folder.mkdir()
    paths = []
    for iid in m["image_id"]:
        p = folder / f"{iid}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    m["path"] = paths
    m.to_parquet(run_dir / "data" / "manifest.parquet", index=False)
    return m


I2I = ("generate.mode=img2img", "generate.strength=0.5")  # 2 steps x 0.5 = 1 denoising step


def test_img2img_stage_records_sources_resumes_and_matches_the_core(run_dir, tiny_sd_dir):
    m = _with_real_images(run_dir)
    one = "generate.adjectives=[bright]"
    cfg = make_cfg(run_dir, tiny_sd_dir, *I2I, one)
    out = stage.run(cfg, in_process=True)
    assert out["generated"] == 12
    syn = pd.read_parquet(run_dir / "synthetic" / "manifest.parquet")
    assert (syn["mode"] == "img2img").all() and (syn["strength"] == 0.5).all()
    by_id = m.set_index("image_id")
    src = by_id.loc[syn["source_image_id"]]
    assert (src["split"].to_numpy() == "train").all()
    assert (src["fold"].to_numpy() != syn["fold"].to_numpy()).all()     # never the fold's validation images
    assert (src["class_name"].to_numpy() == syn["class_name"].to_numpy()).all()
    row = syn[(syn["fold"] == 1) & (syn["adjective"] == "bright")].iloc[0]
    with Image.open(row["path"]) as png:
        assert json.loads(png.text["meddap"])["source_image_id"] == row["source_image_id"]
    # the core, given the same source (read as every consumer reads it), makes the same image
    gen = SyntheticGenerator(tiny_sd_dir, {"fold-1": str(run_dir / "adapters" / "fold-1")}, steps=2,
                             resolution=32, strength=0.5)
    source = read_grey(by_id.loc[row["source_image_id"], "path"], 32)
    here = gen.generate_one(row["prompt"], int(row["seed"]), "fold-1", source)
    made = np.asarray(Image.open(row["path"]))
    assert np.abs(here.astype(int) - made.astype(int)).max() <= 2
    other = gen.generate_one(row["prompt"], int(row["seed"]), "fold-1", 255 - source)
    assert np.abs(other.astype(int) - made.astype(int)).mean() > 0.5    # the source matters
    assert int(row["seed"]) == image_seed(0, 1, "bright", row["class_name"], int(row["index"]))

    again = stage.run(cfg, in_process=True)                              # resume: nothing to do
    assert again["to_generate"] == 0 and again["kept"] == 12
    redo = stage.run(make_cfg(run_dir, tiny_sd_dir, "generate.mode=img2img", "generate.strength=1.0", one),
                     in_process=True)
    assert redo["to_generate"] == 12                                    # strength decides pixels
    txt = stage.run(make_cfg(run_dir, tiny_sd_dir, one), in_process=True)
    assert txt["to_generate"] == 12
    assert pd.read_parquet(run_dir / "synthetic" / "manifest.parquet")["source_image_id"].isna().all()


def test_missing_source_file_is_a_clear_error(run_dir, tiny_sd_dir):
    m = _with_real_images(run_dir)
    for p in m["path"]:
        os.unlink(p)
    with pytest.raises(stage.MeddapError, match="img2img source.*file not found.*prepare"):
        stage.run(make_cfg(run_dir, tiny_sd_dir, *I2I), in_process=True)


def test_img2img_through_ray_data(run_dir, tiny_sd_dir, ray_session):
    m = _with_real_images(run_dir)
    cfg = make_cfg(run_dir, tiny_sd_dir, *I2I, "generate.adjectives=[dark]", "generate.ratios=[1.0]",
                   "generate.workers=1", "generate.cpus_per_worker=1")
    out = stage.run(cfg)
    assert out["generated"] == 12
    syn = pd.read_parquet(run_dir / "synthetic" / "manifest.parquet")
    assert syn["source_image_id"].notna().all()
    train = m[m["split"] == "train"].set_index("image_id")
    assert (train.loc[syn["source_image_id"], "fold"].to_numpy() != syn["fold"].to_numpy()).all()
    row = syn[syn["fold"] == 0].iloc[0]
    gen = SyntheticGenerator(tiny_sd_dir, {"fold-0": str(run_dir / "adapters" / "fold-0")}, steps=2,
                             resolution=32, strength=0.5)
    here = gen.generate_one(row["prompt"], int(row["seed"]), "fold-0",
                            read_grey(train.loc[row["source_image_id"], "path"], 32))
    made = np.asarray(Image.open(io.BytesIO(open(row["path"], "rb").read())))
    assert np.abs(here.astype(int) - made.astype(int)).max() <= 2
