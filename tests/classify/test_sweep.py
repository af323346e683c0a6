"""The grid on Ray Tune: size, clear errors, a real small run, and resume with no lost or duplicated rows."""

import os

import pandas as pd
import pytest
import torch

from _classify_helpers import CLASSES, tiny_overrides, write_tiny_run
from meddap import storage
from meddap.classify.metrics import classification_metrics
from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stages import sweep


def test_paper_grid_is_465_trials():
    cfg = load_config("paper", ["classify.controls=[]"])  # the paper's grid, without the controls
    specs = sweep.build_grid(cfg)
    assert len(specs) == sweep.grid_size(cfg) == 465
    ids = [s.trial_id for s in specs]
    assert len(set(ids)) == 465
    assert sum(s.real_only for s in specs) == 15
    assert "resnet34__real__r0__f0" in ids and "densenet121__none__r0.5__f4" in ids
    assert "squeezenet1_1__high-contrast__r2__f2" in ids


def test_demo_grid_matches_its_config():
    cfg = load_config("demo")
    c = cfg
    n_twins = sum(a in ("bright", "dark") for a in c.generate.adjectives)   # the demo's adjectives with a classical twin
    assert c.classify.controls == ["duplicate", "classical"]
    assert len(sweep.build_grid(cfg)) == sweep.grid_size(cfg) == len(c.classify.models) * c.data.folds * (
        len(c.generate.adjectives) * len(c.generate.ratios) + 1 + len(c.generate.ratios) * (1 + n_twins))


def test_repeats_multiply_the_grid_with_new_ids_and_seeds():
    from meddap.classify.trial import trial_seed

    one, two = load_config("paper", ["classify.controls=[]"]), load_config("paper", ["classify.repeats=2",
                                                                                    "classify.controls=[]"])
    specs = sweep.build_grid(two)
    assert len(specs) == sweep.grid_size(two) == 2 * 465 and len({s.trial_id for s in specs}) == 930
    first = [s.trial_id for s in specs if s.repeat == 0]
    assert first == [s.trial_id for s in sweep.build_grid(one)]      # repeat 0 keeps its ids
    assert "resnet34__dark__r2__f4__rep1" in {s.trial_id for s in specs}
    seeds = {(s.classifier, s.fold, s.repeat): set() for s in specs}
    for s in specs:
        seeds[(s.classifier, s.fold, s.repeat)].add(trial_seed(two.classify.seed, s))
    assert all(len(v) == 1 for v in seeds.values())                  # one seed per (classifier, fold, repeat)
    assert len({next(iter(v)) for v in seeds.values()}) == len(seeds)   # and a new one for each


def test_unknown_classifier_fails_before_work(tmp_path):
    cfg = load_config("demo", tiny_overrides(str(tmp_path / "run"), **{"classify.models": "[resnet34, densenet12]"}))
    with pytest.raises(MeddapError) as e:
        sweep.run(cfg)
    assert "densenet12" in str(e.value) and "densenet121" in str(e.value)
    cfg = load_config("demo", tiny_overrides(str(tmp_path / "run"), **{"classify.per_model.squeezenet1.epochs": 3}))
    with pytest.raises(MeddapError, match=r"unknown classifier 'squeezenet1' in classify\.per_model\. Did you mean "
                                          r"squeezenet1_1, squeezenet1_0"):
        sweep.run(cfg)


def test_repeated_classifier_fails_before_work(tmp_path):
    cfg = load_config("demo", tiny_overrides(str(tmp_path / "run"), **{"classify.models": "[squeezenet1_1, squeezenet1_1]"}))
    with pytest.raises(MeddapError, match="squeezenet1_1 more than once"):
        sweep.run(cfg)
    assert not (tmp_path / "run").exists()


def test_synthetic_manifest_lacking_fold_adjective_fails_before_training(tmp_path):
    run = write_tiny_run(tmp_path, train_per_class=4, test_per_class=1, external_per_class=1, size=24)
    syn = run["synthetic"]
    syn[~((syn.fold == 1) & (syn.adjective == "dark"))].to_parquet(RunLayout(run["run_dir"]).synthetic_manifest)
    cfg = load_config("demo", tiny_overrides(run["run_dir"]))
    with pytest.raises(MeddapError) as e:
        sweep.run(cfg)
    assert "fold 1" in str(e.value) and "'dark'" in str(e.value)
    assert not os.path.exists(RunLayout(run["run_dir"]).summary("trials"))


def test_missing_imagenet_weights_fail_before_ray(tmp_path):
    run = write_tiny_run(tmp_path, train_per_class=4, test_per_class=1, external_per_class=1, size=24)
    cfg = load_config("demo", tiny_overrides(run["run_dir"], **{"classify.pretrained": "imagenet",
                                                                "classify.weights_dir": str(tmp_path)}))
    with pytest.raises(MeddapError) as e:
        sweep.run(cfg)
    assert "squeezenet1_1-" in str(e.value) and ".pth" in str(e.value) and "classify.weights_dir" in str(e.value)


def test_tune_sweep_interrupted_then_resumed(tmp_path, ray_session):
    torch.set_num_threads(1)
    run = write_tiny_run(tmp_path, train_per_class=6, test_per_class=2, external_per_class=2,
                         adjectives=("dark",), size=36, overlap_external=1)
    # classify.per_model: squeezenet1_1's trials train 3 epochs (classify.epochs: 2)
    cfg = load_config("demo", tiny_overrides(run["run_dir"], **{"generate.adjectives": "[dark]",
                                                                "generate.ratios": "[1.0]",
                                                                "classify.per_model.squeezenet1_1.epochs": 3}))
    lay = RunLayout(cfg.run_dir)
    specs = sweep.build_grid(cfg)
    assert len(specs) == 4
    victim = "squeezenet1_1__dark__r1__f1"

    # 1) A trial dies after its epoch-1 checkpoint (a lost node); the others finish and are written.
    with pytest.raises(MeddapError) as e:
        sweep.run(cfg, _fail_after_epoch={victim: 1})
    assert "1 of 4 trials did not finish" in str(e.value) and victim in str(e.value)
    assert "injected failure" in str(e.value)
    first = storage.read_parquet(lay.summary("trials"))
    assert set(first.trial_id) == {s.trial_id for s in specs} - {victim}

    # 2) Rerun: only the victim runs, resuming at epoch 1; finished rows are kept as they were.
    out = sweep.run(cfg)
    assert out == {"total": 4, "done": 4, "ran": 1, "failed": 0}
    trials = storage.read_parquet(lay.summary("trials"))
    assert len(trials) == 4 * 4 and not trials.duplicated(["trial_id", "eval_set"]).any()
    # Dataset B copies of A images (a_overlap) are scored apart, out of "external" (exclude_overlap)
    assert set(trials.eval_set) == {"val", "test", "external", "external_overlap"}
    assert (trials.loc[trials.eval_set == "external", "n_eval"] == 2).all()
    assert (trials.loc[trials.eval_set == "external_overlap", "n_eval"] == 2).all()
    assert (trials["repeat"] == 0).all() and trials.groupby("fold")["seed"].nunique().eq(1).all()  # CRN
    assert list(trials.columns[:16]) == sweep.TRIAL_COLUMNS[:16]
    assert trials.set_index(["trial_id", "eval_set"]).loc[victim, "resumed_from_epoch"].eq(1).all()
    assert (trials["epochs"] == 3).all()
    pd.testing.assert_frame_equal(trials[trials.trial_id != victim].reset_index(drop=True),
                                  first.sort_values(["trial_id"], kind="stable").reset_index(drop=True),
                                  check_like=True)
    real = trials[trials.adjective.isna()]
    assert set(real.trial_id) == {"squeezenet1_1__real__r0__f0", "squeezenet1_1__real__r0__f1"}
    assert (real.ratio == 0).all() and (real.n_synthetic == 0).all()
    syn_rows = trials[trials.adjective == "dark"]
    assert (syn_rows.n_synthetic == syn_rows.n_real).all()
    for col in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert trials[col].between(0, 1).all()

    # Every metric can be recomputed from the predictions.
    preds = storage.read_parquet(lay.summary("predictions"))
    assert not preds.duplicated(["trial_id", "eval_set", "image_id"]).any()
    for (tid, ev), part in preds.groupby(["trial_id", "eval_set"]):
        row = trials[(trials.trial_id == tid) & (trials.eval_set == ev)].iloc[0]
        m = classification_metrics(part.label, part.pred, CLASSES)
        assert m["accuracy"] == pytest.approx(row.accuracy) and m["f1"] == pytest.approx(row.f1)
        assert len(part) == row.n_eval

    # Figure 1a: real-only models on each adjective's synthetic set of their fold.
    fig1a = storage.read_parquet(lay.summary("synthetic_eval"))
    assert sorted(fig1a.trial_id) == sorted(real.trial_id.unique()) and (fig1a.adjective == "dark").all()
    assert (fig1a.n == 3 * 3).all()

    # Best-epoch weights of fold 0 only (classify.save_models=fold0), loadable as the contract says.
    saved = {s.trial_id for s in specs if os.path.exists(lay.path("trials", s.trial_id, "model.pt"))}
    assert saved == {s.trial_id for s in specs if s.fold == 0}
    blob = torch.load(lay.path("trials", "squeezenet1_1__real__r0__f0", "model.pt"), weights_only=True)
    assert blob["classifier"] == "squeezenet1_1" and blob["classes"] == CLASSES and blob["image_size"] == 32
    from meddap.classify.models import build_classifier
    build_classifier("squeezenet1_1", 3).load_state_dict(blob["state_dict"])

    # Finished trials leave no checkpoints behind.
    leftovers = [p for p in storage.listdir(lay.ray_storage, recursive=True) if "/checkpoint_" in p]
    assert leftovers == []

    # 3) A third run has nothing to do and changes nothing.
    assert sweep.run(cfg)["ran"] == 0
    pd.testing.assert_frame_equal(storage.read_parquet(lay.summary("trials")), trials)


class _FakeTuner:
    """Stands in for tune.Tuner: fit() installs a handler that stops the experiment on Ctrl-C and
    returns normally, as Tune 2.60 does, sets up the callbacks, and is interrupted (or not)."""

    interrupt = True

    def __init__(self, trainable, *, run_config, **kwargs):
        self.callbacks = run_config.callbacks

    def fit(self):
        import signal
        stopped = []
        original = signal.getsignal(signal.SIGINT)

        def tune_handler(signum, frame):  # like ray.tune.tune._setup_signal_catching's
            stopped.append(signum)
            signal.signal(signal.SIGINT, original)

        signal.signal(signal.SIGINT, tune_handler)
        for cb in self.callbacks:
            cb.setup(stop=None, num_samples=1, total_num_samples=1)
        if _FakeTuner.interrupt:
            signal.raise_signal(signal.SIGINT)
            assert stopped  # Tune's own handler still ran (it stops the experiment gracefully)
        return []  # no trial finished


def test_ctrl_c_during_the_sweep_is_an_interrupt_not_failed_trials(tmp_path, ray_session, monkeypatch):
    import signal

    from ray import tune

    run = write_tiny_run(tmp_path, train_per_class=4, test_per_class=1, external_per_class=1,
                         adjectives=("dark",), size=24)
    cfg = load_config("demo", tiny_overrides(run["run_dir"], **{"generate.adjectives": "[dark]",
                                                                "generate.ratios": "[1.0]"}))
    monkeypatch.setattr(tune, "Tuner", _FakeTuner)
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(_FakeTuner, "interrupt", True)
    with pytest.raises(KeyboardInterrupt):  # the CLI: "interrupted; finished work is kept", exit 130
        sweep.run(cfg)
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.setattr(_FakeTuner, "interrupt", False)
    with pytest.raises(MeddapError, match="4 of 4 trials did not finish"):
        sweep.run(cfg)
    assert signal.getsignal(signal.SIGINT) is before  # Tune's handler is not left behind


def test_trials_are_keyed_by_what_they_were_made_from(tmp_path, monkeypatch):
    """A finished trial's part carries `made_from`: a rerun with other real images, other synthetic
    images or other classifier settings does not take it as done (the sweep then removes and reruns it)."""
    run = write_tiny_run(tmp_path, train_per_class=4, test_per_class=1, external_per_class=1, size=24,
                         adjectives=("dark",))
    cfg = load_config("demo", tiny_overrides(run["run_dir"], **{"generate.adjectives": "[dark]",
                                                                "generate.ratios": "[1.0]"}))
    manifest, synthetic = run["manifest"], run["synthetic"].assign(spec="s")
    specs = {s.trial_id: s for s in sweep.build_grid(cfg)}
    syn, real = specs["squeezenet1_1__dark__r1__f0"], specs["squeezenet1_1__real__r0__f0"]

    def key(c=cfg, m=manifest, s=synthetic, spec=syn):
        return sweep.trial_made_from(c, spec, m, s, sweep._inputs_key(c, m))

    base = key()
    assert key() == base and key(spec=real) != base
    other_syn = synthetic.copy()
    other_syn.loc[other_syn.index[0], "spec"] = "regenerated"  # fold 0's first dark image (index 0)
    assert key(s=other_syn) != base
    other_real = manifest.copy()
    other_real.loc[other_real.index[0], "sha256"] = "other pixels"
    assert key(m=other_real) != base
    assert key(c=load_config("demo", tiny_overrides(run["run_dir"], **{
        "generate.adjectives": "[dark]", "generate.ratios": "[1.0]", "classify.lr": 0.01}))) != base
    assert key(c=load_config("demo", tiny_overrides(run["run_dir"], **{
        "generate.adjectives": "[dark]", "generate.ratios": "[1.0]", "classify.max_concurrent_trials": 2}))) == base
    # a key added later (classify.precise_bn) counts when set, and not at the value that behaves as before it
    # existed, so finished trials of earlier versions keep their key
    with_bn = {"generate.adjectives": "[dark]", "generate.ratios": "[1.0]", "classify.precise_bn": "true"}
    no_bn = {**with_bn, "classify.precise_bn": "false"}
    assert key(c=load_config("demo", tiny_overrides(run["run_dir"], **with_bn))) != key(
        c=load_config("demo", tiny_overrides(run["run_dir"], **no_bn)))
    import meddap.stages.state as state_mod

    settings = state_mod.stage_settings
    cfg_no_bn = load_config("demo", tiny_overrides(run["run_dir"], **no_bn))
    before = sweep._inputs_key(cfg_no_bn, manifest)
    # the settings as an earlier version had them: no precise_bn key at all
    monkeypatch.setattr(state_mod, "stage_settings",
                        lambda c, st: {k: v for k, v in settings(c, st).items() if k != "classify.precise_bn"})
    assert sweep._inputs_key(cfg_no_bn, manifest) == before
    monkeypatch.undo()
    # classify.per_model.<name> keys that classifier's trials only: the others keep theirs
    two = {"generate.adjectives": "[dark]", "generate.ratios": "[1.0]", "classify.models": "[squeezenet1_1, resnet34]"}
    cfg_two = load_config("demo", tiny_overrides(run["run_dir"], **two))
    cfg_own = load_config("demo", tiny_overrides(run["run_dir"], **two, **{"classify.per_model.squeezenet1_1.epochs": 3}))
    other = {s.trial_id: s for s in sweep.build_grid(cfg_two)}["resnet34__dark__r1__f0"]
    assert key(c=cfg_own) != key(c=cfg_two) and key(c=cfg_own, spec=real) != key(c=cfg_two, spec=real)
    assert key(c=cfg_own, spec=other) == key(c=cfg_two, spec=other)

    lay = RunLayout(cfg.run_dir)
    storage.write_parquet(pd.DataFrame({"trial_id": [syn.trial_id], "made_from": [base]}),
                          lay.path("trials", syn.trial_id, "trials.parquet"))
    summaries = sweep._Summaries(cfg)
    assert summaries.add(syn.trial_id, base) and not sweep._Summaries(cfg).add(syn.trial_id, key(s=other_syn))
