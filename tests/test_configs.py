"""Every shipped YAML loads and validates; bad settings are refused before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meddap.config import Config, ConfigError, load_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_config_loads_and_round_trips(name):
    cfg = load_config(name)
    assert cfg.name == name
    again = Config.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    # Each shipped YAML says how to run it in its first lines.
    head = shipped_configs()[name].read_text().splitlines()[:12]
    assert any("python -m meddap" in line for line in head), f"{name}.yaml should open with its command"


def test_expected_configs_are_shipped():
    assert {"demo", "paper", "local-2080ti"} <= set(shipped_configs())


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'diffusion\.lora\.rnak'.*Did you mean 'diffusion\.lora\.rank'"):
        load_config("demo", ["diffusion.lora.rnak=8"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"'data\.folds' = 'three'.*expected int"):
        load_config("demo", ["data.folds=three"])
    with pytest.raises(ConfigError, match=r"classify\.models"):
        load_config("demo", ["classify.models=resnet34"])
    with pytest.raises(ConfigError, match=r"'data\.phantom' = 3 .*expected a mapping of keys \(a YAML section\)"):
        load_config("demo", ["data.phantom=3"])  # not the internal class name (PhantomConfig)


def test_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"'data\.folds' = 1 is not allowed"):
        load_config("demo", ["data.folds=1"])
    with pytest.raises(ConfigError, match=r"generate\.ratios"):
        load_config("demo", ["generate.ratios=[0.5, -1]"])
    with pytest.raises(ConfigError, match=r"diffusion\.lora\.rank"):
        load_config("demo", ["diffusion.lora.rank=0"])
    for lr in ("0", "-0.001", "nan"):
        with pytest.raises(ConfigError, match=r"'diffusion\.train\.class_word_lr' = .* expected a positive number"):
            load_config("demo", [f"diffusion.train.class_word_lr={lr}"])
    with pytest.raises(ConfigError, match=r"'diffusion\.lora\.class_words' = 'sometimes'.*expected bool"):
        load_config("demo", ["diffusion.lora.class_words=sometimes"])
    cfg = load_config("demo", ["diffusion.lora.class_words=true", "diffusion.train.class_word_lr=0.01"])
    assert cfg.diffusion.lora.class_words is True and cfg.diffusion.train.class_word_lr == 0.01


@pytest.mark.parametrize("override, message", [
    ("generate.ratios=[1, 1.0]", "unique ratios"),
    ("generate.adjectives=['', none]", "distinct as folder names"),  # '' is stored as 'none'
    ("generate.adjectives=['very bright', very_bright]", "distinct as folder names"),
    ("generate.adjectives=['a/b']", "without '/'"),
    ("generate.adjectives=['..']", "without '/'"),
])
def test_adjectives_and_ratios_that_collide_as_names_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])
    load_config("demo", ["generate.adjectives=['', dark, 'very bright']", "generate.ratios=[0.5, 1, 2]"])


def test_yaml_key_given_twice_is_refused_not_silently_overridden(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  folds: 3\n  seed: 1\n  folds: 4\n")
    with pytest.raises(ConfigError, match=r"(?s)key 'folds' is given twice.*line 4"):
        load_config(str(path))
    path.write_text("data:\n  folds: 3\ndata:\n  seed: 1\n")  # the first data: block would be dropped
    with pytest.raises(ConfigError, match="key 'data' is given twice"):
        load_config(str(path))
    path.write_text("data:\n  folds: 3\ngenerate:\n  ratios: [1.0]\n")
    assert load_config(str(path)).data.folds == 3


def test_demo_with_another_config_is_refused_not_ignored(tmp_path, capsys):
    from meddap.cli import main

    assert main(["demo", "--config", "paper", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "python -m meddap run --config paper" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_overrides_are_typed_by_the_schema():
    cfg = load_config("demo", ["data.folds=3", "data.root=123", "classify.lr=1e-3", "diffusion.lora.rank=[2, 4, 8]",
                               "generate.adjectives=['', dark]", "classify.gpus_per_trial=0.5"])
    assert cfg.data.folds == 3 and isinstance(cfg.data.folds, int)
    assert cfg.data.root == "123"  # a str key stays a str even when the text looks like a number
    assert cfg.classify.lr == 1e-3 and isinstance(cfg.classify.lr, float)
    assert cfg.diffusion.lora.ranks == [2, 4, 8]
    assert cfg.generate.adjectives == ["", "dark"]
    assert cfg.classify.gpus_per_trial == 0.5
    # a mapping's entries are typed too (classify.per_model.<name>), and unset ones fall back to the shared value
    cfg = load_config("demo", ["classify.per_model.resnet34.lr=1e-4", "classify.per_model.resnet34.epochs=7"])
    own = cfg.classify.for_model("resnet34")
    assert own.lr == 1e-4 and own.epochs == 7 and own.batch_size == cfg.classify.batch_size
    assert cfg.classify.for_model("densenet121").epochs == cfg.classify.epochs


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 as text; a float key in a config file takes it as the number it spells."""
    path = tmp_path / "mine.yaml"
    path.write_text("classify:\n  lr: 1e-3\n  per_model:\n    squeezenet1_1: {lr: 1e-4}\n")
    cfg = load_config(str(path))
    assert cfg.classify.lr == 1e-3 and cfg.classify.for_model("squeezenet1_1").lr == 1e-4
    path.write_text("classify:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"'classify\.lr' = 'fast'.*expected float"):
        load_config(str(path))


def test_cli_refuses_bad_config_before_any_work(tmp_path):
    """A config error exits 2 with the message and leaves no run dir behind."""
    run_dir = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "meddap", "run", "--config", "demo", f"run_dir={run_dir}",
                          "classify.epocs=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Did you mean 'classify.epochs'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not run_dir.exists()


def test_local_2080ti_is_the_paper_study_on_one_card():
    paper, local = load_config("paper"), load_config("local-2080ti")
    # Same science: every key that decides results equals the paper's.
    from meddap.stages.state import stage_settings

    diff = {k for k in stage_settings(paper, "report") if stage_settings(paper, "report")[k]
            != stage_settings(local, "report").get(k)}
    assert not diff, f"local-2080ti changes settings that decide results: {diff}"
    assert local.diffusion.train.mixed_precision == "fp16" and local.generate.precision == "fp16"
    assert local.classify.gpus_per_trial * local.classify.max_concurrent_trials <= 1.0
    assert local.diffusion.train.num_workers == 1


def test_statistics_colour_and_fid_keys_checked_at_the_door():
    paper = load_config("paper")
    assert paper.classify.channels == "rgb" and paper.fid.extra_dims == [64]
    assert paper.data.external.exclude_overlap and paper.classify.repeats == 1
    assert paper.report.bootstrap_samples >= 10_000
    for bad, key in (("report.bootstrap_samples=999", "report.bootstrap_samples"),
                     ("fid.extra_dims=[2048]", "fid.extra_dims"), ("fid.extra_dims=[65]", "fid.extra_dims"),
                     ("classify.channels=rgba", "classify.channels"), ("classify.repeats=0", "classify.repeats"),
                     ("classify.precise_bn_images=1", "classify.precise_bn_images"),
                     ("classify.per_model.resnet34.epochs=0", "classify.per_model.resnet34.epochs"),
                     ("classify.per_model.resnet34.lr=-1", "classify.per_model.resnet34.lr"),
                     ("classify.per_model.resnet34.epoch=3", "classify.per_model.resnet34.epoch"),
                     ("data.external.match_min_correlation=0", "data.external.match_min_correlation")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("demo", [bad])

def test_misspelled_config_name_suggests_the_shipped_one(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"config 'papr' is neither.*Did you mean 'paper'\?"):
        load_config("papr")
    from meddap.cli import main

    assert main(["run", "--config", "dmeo", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "Did you mean 'demo'?" in capsys.readouterr().err


def test_saved_config_is_named_after_its_file(tmp_path, capsys):
    """`config --config demo > mine.yaml`, then `--config mine.yaml`: the run calls itself 'mine'."""
    from meddap.cli import main

    assert main(["config", "--config", "demo", "data.folds=3"]) == 0
    saved = tmp_path / "mine.yaml"
    saved.write_text(capsys.readouterr().out)
    cfg = load_config(str(saved))
    assert cfg.name == "mine"
    assert cfg.data.folds == 3 and cfg.to_dict() == {**load_config("demo", ["data.folds=3"]).to_dict(), "name": "mine"}
    saved.write_text(saved.read_text() + "name: chosen\n")  # an explicit name still wins
    assert load_config(str(saved)).name == "chosen"


def test_demo_header_states_a_measured_time_with_the_machine():
    head = "\n".join(shipped_configs()["demo"].read_text().splitlines()[:12])
    import re

    # "measured <time> ... on <the machine>", so a reader can tell what the figure means for them
    assert re.search(r"measured \d+(\.\d+)? ?(s|min)\b[^\n]*\n?[^\n]* on (a|an|the) [^.]*(core|CPU|GPU)", head), head


@pytest.mark.parametrize("overrides, message", [
    (["classify.controls=[duplicate, mirror]"], r"'classify\.controls'.*distinct values from duplicate, classical"),
    (["classify.controls=[duplicate, duplicate]"], r"'classify\.controls'.*distinct values"),
    (["generate.filter=threshold"], r"'generate\.filter_value' = None.*a number when generate\.filter = threshold"),
    (["generate.filter=threshold", "generate.filter_value=1.5", "generate.filter_overgenerate=0.5"],
     r"'generate\.filter_value' = 1\.5 .*threshold.*\[0, 1\]"),
    (["generate.filter=drop_lowest", "generate.filter_value=1.0", "generate.filter_overgenerate=0.5"],
     r"drop_lowest.*\[0, 1\)"),
    (["generate.filter=threshold", "generate.filter_value=0.5"],
     r"'generate\.filter_overgenerate' = 0\.0 .*a share > 0 with generate\.filter = threshold.*spare images"),
    (["generate.filter=drop_lowest", "generate.filter_value=0.5", "generate.filter_overgenerate=0.5"],
     r"'generate\.filter_overgenerate' = 0\.5 .*at least 1 \(= p / \(1 - p\)\).*rerun generate"),
    (["generate.filter_judge=resnet50"], r"'generate\.filter_judge' = 'resnet50'.*one of classify\.models"),
])
def test_controls_and_gate_settings_are_checked_at_the_door(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_gate_settings_that_fit_load_and_decide_only_the_sweep():
    from meddap.stages.state import stage_settings

    cfg = load_config("demo", ["generate.filter=drop_lowest", "generate.filter_value=0.2",
                               "generate.filter_overgenerate=0.25", "generate.filter_judge=squeezenet1_1"])
    assert cfg.filter_judge == "squeezenet1_1" and load_config("demo").filter_judge == "resnet34"
    # Changing the gate reruns gated trials, never generate or fid (their images do not depend on it).
    for stage in ("generate", "fid"):
        assert not any(k.startswith("generate.filter") and k != "generate.filter_overgenerate"
                       for k in stage_settings(cfg, stage))
    assert stage_settings(cfg, "sweep")["generate.filter"] == "drop_lowest"
