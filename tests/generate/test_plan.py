import os
import subprocess
import sys

import pytest

from meddap.config import ConfigError, load_config
from meddap.diffusion.plan import (build_plan, image_seed, real_train_counts, select_synthetic, synthetic_count,
                                   synthetic_counts)
from meddap.errors import MeddapError
from meddap.stages.generate import manifest_rows

from .conftest import CLASSES, data_manifest

# Real training images per (fold, class) of the fixture manifest (fold k trains on fold != k).
N_TRAIN = {(0, "benign"): 2, (0, "malignant"): 2, (0, "normal"): 2,
           (1, "benign"): 3, (1, "malignant"): 2, (1, "normal"): 1}


def _cfg(tmp_path, *overrides):
    return load_config("demo", [f"run_dir={tmp_path}", "generate.adjectives=['', bright, dark]",
                                "generate.ratios=[0.5, 1.0, 2.0]", *overrides])


def test_synthetic_count_is_pythons_round_and_monotone():
    # the classifier grid selects int(round(r * n)): the plan must make at least that many
    assert synthetic_count(5, 0.5) == 2 and synthetic_count(7, 0.5) == 4  # halves to even
    assert synthetic_count(4, 0.5) == 2
    assert synthetic_count(1, 0.5) == 0
    assert synthetic_count(545, 2.0) == 1090
    for n in range(60):
        for r in (0.25, 0.5, 1.0, 1.5, 2.0):
            assert synthetic_count(n, r) == int(round(r * n))
    for n in range(60):
        counts = [synthetic_count(n, r) for r in (0.25, 0.5, 1.0, 1.5, 2.0)]
        assert counts == sorted(counts)
    with pytest.raises(ConfigError):
        synthetic_count(5, 0.0)


def test_real_train_counts_excludes_the_validation_fold_and_test_rows():
    assert real_train_counts(data_manifest(), CLASSES) == N_TRAIN


def test_counts_per_class_fold_and_ratio(tmp_path):
    cfg = _cfg(tmp_path)
    plan = build_plan(cfg, data_manifest(), check_adapters=False)
    counts = plan.counts()
    for (fold, c), n in N_TRAIN.items():
        got = counts[(counts["fold"] == fold) & (counts["class_name"] == c)]
        assert list(got["n"]) == [synthetic_count(n, 2.0)] * 3  # largest ratio only, per adjective
    assert len(plan) == 3 * 2 * sum(N_TRAIN.values())
    for fold in (0, 1):
        for r in (0.5, 1.0, 2.0):
            assert synthetic_counts(data_manifest(), cfg, fold, r) == \
                {c: synthetic_count(N_TRAIN[(fold, c)], r) for c in CLASSES}


def test_ratios_are_nested(tmp_path):
    cfg = _cfg(tmp_path)
    plan = build_plan(cfg, data_manifest(), check_adapters=False)
    syn = manifest_rows(plan, plan.images)
    half = select_synthetic(syn, data_manifest(), cfg, 1, "bright", 0.5)
    full = select_synthetic(syn, data_manifest(), cfg, 1, "bright", 1.0)
    double = select_synthetic(syn, data_manifest(), cfg, 1, "bright", 2.0)
    assert set(half["image_id"]) < set(full["image_id"]) < set(double["image_id"])
    assert len(half) == 2 + 1 + 0 and len(full) == 6 and len(double) == 12  # benign 1.5 -> 2, normal 0.5 -> 0
    for c in CLASSES:  # the first images by index
        assert sorted(half[half["class_name"] == c]["index"]) == list(range(len(half[half["class_name"] == c])))
    assert set(double["fold"]) == {1} and set(double["adjective"]) == {"bright"}
    with pytest.raises(MeddapError, match="run `python -m meddap generate`"):
        select_synthetic(syn[syn["index"] < 1], data_manifest(), cfg, 1, "bright", 1.0)


def test_shared_adapter_serves_every_fold(tmp_path):
    cfg = _cfg(tmp_path, "diffusion.lora.per_fold=false")
    plan = build_plan(cfg, data_manifest(), check_adapters=False)
    assert set(plan.images["fold"]) == {-1} and set(plan.images["adapter_name"]) == {"all"}
    counts = plan.counts().set_index(["adjective", "class_name"])["n"]
    assert counts[("", "benign")] == 6 and counts[("", "malignant")] == 4 and counts[("", "normal")] == 4
    syn = manifest_rows(plan, plan.images)
    fold0 = select_synthetic(syn, data_manifest(), cfg, 0, "dark", 1.0)
    assert set(fold0["fold"]) == {-1} and len(fold0) == 6


def test_paths_ids_prompts_and_seeds(tmp_path):
    plan = build_plan(_cfg(tmp_path), data_manifest(), check_adapters=False)
    im = plan.images
    first = im[(im["fold"] == 0) & (im["adjective"] == "") & (im["class_name"] == "normal")].iloc[0]
    assert first["file"] == "synthetic/fold-0/none/normal/00000.png"
    assert first["path"] == os.path.join(str(tmp_path), "synthetic/fold-0/none/normal/00000.png")
    assert first["prompt"] == "ultrasound image of no tumor in the breast"
    assert first["label"] == 2
    assert im["image_id"].is_unique and im["path"].is_unique
    assert im["seed"].is_unique and im["seed"].between(0, 2**63 - 1).all()
    assert first["seed"] == image_seed(0, 0, "", "normal", 0)
    # the same plan makes the same seeds; another run seed makes others
    assert (build_plan(_cfg(tmp_path), data_manifest(), check_adapters=False).images["seed"] == im["seed"]).all()
    other = build_plan(_cfg(tmp_path, "generate.seed=1"), data_manifest(), check_adapters=False).images
    assert not (other["seed"] == im["seed"]).any()


def test_seeds_do_not_depend_on_the_process():
    code = "from meddap.diffusion.plan import image_seed; print(image_seed(7, 3, 'dark', 'benign', 11))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip() for h in ("1", "2")}
    assert outs == {str(image_seed(7, 3, "dark", "benign", 11))}


def test_missing_adapter_names_the_folder_and_the_fix(tmp_path):
    (tmp_path / "data").mkdir()
    data_manifest().to_parquet(tmp_path / "data" / "manifest.parquet", index=False)
    (tmp_path / "adapters" / "fold-0").mkdir(parents=True)
    (tmp_path / "adapters" / "fold-0" / "pytorch_lora_weights.safetensors").write_bytes(b"x")  # unfinished
    with pytest.raises(MeddapError) as e:
        build_plan(_cfg(tmp_path))
    assert str(tmp_path / "adapters" / "fold-0") in str(e.value) and "meddap finetune" in str(e.value)


def test_missing_data_manifest_says_run_prepare(tmp_path):
    with pytest.raises(MeddapError, match="meddap prepare"):
        build_plan(_cfg(tmp_path))


def test_bad_generate_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="generate.adjectives"):
        load_config("demo", ["generate.adjectives=[]"])
    with pytest.raises(ConfigError, match="generate.ratios"):
        load_config("demo", ["generate.ratios=[0.5, 0]"])
    with pytest.raises(ConfigError, match="generate.ratios"):
        load_config("demo", ["generate.ratios=[-1.0]"])
    # a Config changed after loading is checked again by the plan
    for field, value, key in (("adjectives", [], "generate.adjectives"), ("ratios", [1.0, -0.5], "generate.ratios"),
                              ("prompt_template", "{adjective} ultrasound", "generate.prompt_template")):
        cfg = _cfg(tmp_path)
        setattr(cfg.generate, field, value)
        with pytest.raises(ConfigError, match=key):
            build_plan(cfg, data_manifest(), check_adapters=False)
