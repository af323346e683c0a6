"""Controls and the label-fidelity gate in the sweep: the grid's control trials (ids, augmentation, counts
per class), judges before gated trials, the gate's top-up from spares and its shortfall message.
The two-phase sweep runs its real trials (train_trial on a tiny run) without Ray or Tune: `_tune_round`
is replaced by a loop over `run_trial`, the trainable's body, so the ordering is observed, not assumed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from _classify_helpers import CLASSES, tiny_overrides, write_tiny_run
from meddap import storage
from meddap.classify.controls import classical_name
from meddap.classify.data import TrialSpec, load_sweep_images, trial_tensors
from meddap.classify.fidelity import filter_synthetic
from meddap.config import load_config
from meddap.diffusion.plan import synthetic_count
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stages import sweep


def test_paper_grid_with_controls():
    """Duplicate once per classifier x fold x ratio; classical per adjective with a twin; the paper's 465
    ids (and their specs, hence made_from keys) are unchanged by turning the controls on."""
    plain = load_config("paper", ["classify.controls=[]"])
    cfg = load_config("paper")
    specs = sweep.build_grid(cfg)
    ids = [s.trial_id for s in specs]
    assert len(ids) == len(set(ids)) == sweep.grid_size(cfg) == 870
    by_aug = pd.Series([s.augmentation for s in specs]).value_counts().to_dict()
    twins = [a for a in cfg.generate.adjectives if classical_name(a)]
    assert len(twins) == 8 and "" not in twins and "stylized" not in twins
    assert by_aug == {"none": 15, "synthetic": 450, "duplicate": 3 * 5 * 3, "classical": 3 * 5 * 3 * 8}
    old = {s.trial_id: s.to_dict() for s in sweep.build_grid(plain)}
    assert {s.trial_id: s.to_dict() for s in specs if not s.control} == old
    assert "resnet34__real__r0.5__f0__dup" in ids and "densenet121__high-contrast__r2__f4__cls" in ids
    assert "resnet34__stylized__r1__f0__cls" not in ids          # no twin: its control is the duplicate
    dup = TrialSpec("resnet34", 0, None, 0.5, 1, "duplicate")
    assert dup.trial_id == "resnet34__real__r0.5__f0__dup__rep1"
    assert TrialSpec.from_dict(dup.to_dict()) == dup
    assert TrialSpec.from_dict(TrialSpec("resnet34", 0, "dark", 1.0).to_dict()).augmentation == "synthetic"
    with pytest.raises(ValueError, match="duplicate trials have adjective None and a ratio > 0"):
        TrialSpec("resnet34", 0, "dark", 1.0, 0, "duplicate")


def test_control_trials_have_the_synthetic_counts_per_class(tmp_path):
    torch.set_num_threads(1)
    run = write_tiny_run(tmp_path, train_per_class=5, test_per_class=1, external_per_class=1, size=24,
                         adjectives=("dark",), max_ratio=2.0)
    cfg = load_config("demo", tiny_overrides(run["run_dir"], **{"generate.adjectives": "[dark]",
                                                                "generate.ratios": "[0.5, 2.0]",
                                                                "classify.controls": "[duplicate, classical]"}))
    manifest = run["manifest"]
    specs = sweep.build_grid(cfg)
    assert {s.augmentation for s in specs} == {"none", "synthetic", "duplicate", "classical"}
    images = load_sweep_images(manifest, run["synthetic"], specs, CLASSES, 24, run_seed=cfg.generate.seed)
    for fold in (0, 1):
        train = manifest[(manifest.split == "train") & (manifest.fold != fold)]
        for ratio in (0.5, 2.0):
            syn = trial_tensors(images, TrialSpec("squeezenet1_1", fold, "dark", ratio))
            want = [synthetic_count(int((train.label == c).sum()), ratio) for c in range(3)]
            assert np.bincount(syn.train_labels[syn.n_real:].numpy(), minlength=3).tolist() == want
            for aug, adj in (("duplicate", None), ("classical", "dark")):
                t = trial_tensors(images, TrialSpec("squeezenet1_1", fold, adj, ratio, 0, aug))
                extra = t.train_labels[t.n_real:].numpy()
                assert t.n_synthetic == len(extra) == sum(want)
                assert np.bincount(extra, minlength=3).tolist() == want
                assert all(i.startswith(f"ctl-{aug}-f{fold}-") for i in t.train_image_ids[t.n_real:])
    # The images: duplicates are real training images of the fold; the classical twin of "dark" darkens them.
    fold, ratio = 0, 2.0
    dup = trial_tensors(images, TrialSpec("squeezenet1_1", fold, None, ratio, 0, "duplicate"))
    cls = trial_tensors(images, TrialSpec("squeezenet1_1", fold, "dark", ratio, 0, "classical"))
    real = dup.train_images[:dup.n_real].float()
    d, c = dup.train_images[dup.n_real:].float(), cls.train_images[cls.n_real:].float()
    assert all(any(torch.equal(x, r) for r in real) for x in d)                      # drawn from the fold's images
    assert (c.mean(dim=(1, 2, 3)) < d.mean(dim=(1, 2, 3))).all()                   # brightness_down, image by image


def _setup(tmp_path, **extra):
    """A tiny run with spares: ratio 1 of the fold's 4 real images per class, 3 spares (0.75) more generated."""
    run = write_tiny_run(tmp_path, train_per_class=8, test_per_class=1, external_per_class=1, size=24,
                         adjectives=("dark",), max_ratio=1.75)
    return run, _cfg(run["run_dir"], **extra)


def _cfg(run_dir: str, **extra):
    over = {"generate.adjectives": "[dark]", "generate.ratios": "[1.0]", "classify.epochs": 1,
            "classify.controls": "[duplicate, classical]",
            "generate.filter_overgenerate": 0.75, "generate.filter": "drop_lowest", "generate.filter_value": 0.3}
    over.update(extra)
    return load_config("demo", tiny_overrides(run_dir, **over))


class _Rounds:
    """Stands in for Tune: each round runs its trials one after another through `run_trial` (the
    trainable's body, on the real decoded images) and records what ran, and the training images of
    gated trials."""

    def __init__(self, monkeypatch):
        self.rounds: list[list[str]] = []
        self.train_ids: dict[str, list[str]] = {}
        monkeypatch.setattr(sweep, "_connect", lambda cfg, images: 0.0)
        monkeypatch.setattr(sweep, "_tune_round", self._round)

    def _round(self, cfg, specs, keys, images, summaries, total, already, root, gpus, fail_after_epoch):
        self.rounds.append([s.trial_id for s in specs])
        for s in specs:
            self.train_ids[s.trial_id] = trial_tensors(images, s).train_image_ids
            sweep.run_trial(cfg, s, images, keys[s.trial_id], "cpu")

        class _Progress:
            interrupted = False
        return _Progress(), "fake", {}


def test_judges_finish_before_gated_trials_which_top_up_from_spares(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    run, cfg = _setup(tmp_path)
    lay = RunLayout(cfg.run_dir)
    tune = _Rounds(monkeypatch)
    out = sweep.run(cfg)
    assert out["ran"] == out["total"] == 8      # 2 folds x (real, dark, dup, cls)
    judges = {"squeezenet1_1__real__r0__f0", "squeezenet1_1__real__r0__f1"}
    gated = {"squeezenet1_1__dark__r1__f0", "squeezenet1_1__dark__r1__f1"}
    assert len(tune.rounds) == 2 and judges <= set(tune.rounds[0]) and set(tune.rounds[1]) == gated
    assert not gated & set(tune.rounds[0])

    gate = storage.read_parquet(lay.summary("fidelity_gate"))
    assert list(gate.columns) == sweep.GATE_COLUMNS
    assert set(gate.judge) == judges and gate.fidelity.between(0, 1).all()
    synthetic = run["synthetic"]
    assert len(gate) == len(synthetic)          # every image of each fold's pool, spares included, once per fold
    for (fold, c), g in gate.groupby(["fold", "class_name"]):
        assert len(g) == 7 and (~g.kept).sum() == 2               # drop_lowest 0.3: floor(0.3 x 7) of all generated
        assert g.loc[~g.kept, "fidelity"].max() <= g.loc[g.kept, "fidelity"].min()
    manifest = run["manifest"]
    for tid in gated:
        fold = int(tid[-1])
        chosen = synthetic.set_index("image_id").loc[[i for i in tune.train_ids[tid] if i.startswith("syn-")]]
        train = manifest[(manifest.split == "train") & (manifest.fold != fold)]
        assert chosen.groupby("class_name").size().to_dict() == train.groupby("class_name").size().to_dict()
        kept = gate[(gate.fold == fold)].set_index("image_id")["kept"]
        assert kept.loc[chosen.index].all()                     # only images the gate kept
        assert (chosen["index"] >= train.groupby("class_name").size().min()).any()   # topped up from spares
        pool = gate[gate.fold == fold]
        need = train.groupby("class_name").size().to_dict()
        assert set(chosen.index) == set(filter_synthetic(pool, need, "drop_lowest", 0.3)["image_id"])

    trials = storage.read_parquet(lay.summary("trials"))
    assert set(trials.augmentation) == {"none", "synthetic", "duplicate", "classical"}
    assert set(trials.loc[trials.augmentation == "synthetic", "filter"]) == {"drop_lowest 0.3"}
    assert set(trials.loc[trials.augmentation != "synthetic", "filter"]) == {"none"}
    # The judges keep their best weights while a gate is on, whatever classify.save_models says (fold0 here).
    assert storage.exists(lay.path("trials", "squeezenet1_1__real__r0__f1", "model.pt"))

    # Another filter: only the gated trials run again (their made_from holds the filter and the judge).
    tune.rounds.clear()
    other = _cfg(run["run_dir"], **{"generate.filter_value": 0.2})
    assert sweep.run(other)["ran"] == 2
    assert len(tune.rounds) == 1 and set(tune.rounds[0]) == gated

    # A threshold no image reaches: every gated trial is named with its shortfall, nothing smaller is trained.
    tune.rounds.clear()
    strict = _cfg(run["run_dir"], **{"generate.filter": "threshold", "generate.filter_value": 1.0})
    with pytest.raises(MeddapError) as e:
        sweep.run(strict)
    msg = str(e.value)
    assert "leaves 2 gated trial(s) short" in msg and all(t in msg for t in gated)
    assert "keeps 0 of the" in msg and "Raise generate.filter_overgenerate" in msg
    assert tune.rounds == []                                   # judges were done; no gated trial ran short
    assert judges <= set(storage.read_parquet(lay.summary("trials")).trial_id)
