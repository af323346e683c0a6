"""Table 4 (synthetic vs equal-budget controls) on a small known frame: which comparisons, the fold t-test,
the paired bootstrap and Holm exactly as meddap.stats computes them; controls stay out of Tables 1-2; the
report stage shows Table 4, Table 1's filter and the fidelity figure."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from meddap import storage
from meddap.config import load_config
from meddap.layout import RunLayout
from meddap.report import METRICS, best_settings, table1, table2, table4
from meddap.stats import holm, paired_bootstrap

N = 20                                       # test images
# (trial-id stem, adjective, ratio, augmentation) -> test accuracy per fold (k / N: exact in the predictions)
TEST_ACC = {("real__r0", None, 0.0, "none"): [0.50, 0.55],
            ("dark__r1", "dark", 1.0, "synthetic"): [0.80, 0.70],
            ("none__r1", "", 1.0, "synthetic"): [0.60, 0.65],
            ("dark__r1__cls", "dark", 1.0, "classical"): [0.60, 0.60],
            ("real__r1__dup", None, 1.0, "duplicate"): [0.50, 0.70]}
VAL_BEST = "dark__r1"                        # chosen on validation


def _tid(stem, fold):
    head, _, tail = stem.partition("__r")
    ratio, _, suffix = tail.partition("__")
    return f"sq__{head}__r{ratio}__f{fold}" + (f"__{suffix}" if suffix else "")


def _frames(filter_="none"):
    rows, preds = [], []
    for (stem, adj, ratio, aug), accs in TEST_ACC.items():
        for fold, acc in enumerate(accs):
            tid = _tid(stem, fold)
            for ev in ("val", "test"):
                a = acc if ev == "test" else (0.9 if stem == VAL_BEST else 0.6)
                rows.append(dict(trial_id=tid, classifier="sq", adjective=adj, ratio=ratio, fold=fold, eval_set=ev,
                                 **{m: a for m in METRICS}, repeat=0, augmentation=aug,
                                 filter=filter_ if aug == "synthetic" else "none"))
            k = int(round(acc * N))
            # correct on images (fold * 3 + i) % N for i < k: different images per fold and trial
            correct = np.zeros(N, bool)
            correct[(np.arange(k) + 3 * fold + len(stem)) % N] = True
            preds += [dict(trial_id=tid, eval_set="test", image_id=f"t{i}", label=0, pred=0 if correct[i] else 1)
                      for i in range(N)]
    trials = pd.DataFrame(rows)
    trials["adjective"] = trials["adjective"].astype("string")
    return trials, pd.DataFrame(preds)


def _correct(preds, tid):
    p = preds[preds.trial_id == tid].sort_values("image_id")
    return (p.label == p.pred).to_numpy(float)


def test_table4_comparisons_and_statistics():
    trials, preds = _frames()
    t4 = table4(trials, preds, samples=10_000, seed=3)
    got = [(r.adjective, r.control, r.twin, bool(r.selected)) for r in t4.itertuples()]
    # "" has no classical twin: compared with the duplicate only
    assert got == [("", "duplicate", "", False), ("dark", "classical", "brightness_down", True),
                   ("dark", "duplicate", "brightness_down", True)]
    assert (t4.ratio == 1.0).all() and (t4.n_settings_compared == 2).all() and (t4.selected_by == "val_accuracy").all()
    controls = {"classical": "dark__r1__cls", "duplicate": "real__r1__dup"}
    for r in t4.itertuples():
        syn = np.array(TEST_ACC[("dark__r1" if r.adjective == "dark" else "none__r1", r.adjective, 1.0, "synthetic")])
        ctl = np.array(TEST_ACC[(controls[r.control], "dark" if r.control == "classical" else None, 1.0, r.control)])
        assert r.synthetic_accuracy == pytest.approx(syn.mean()) and r.control_accuracy == pytest.approx(ctl.mean())
        assert r.real_accuracy == pytest.approx(0.525) and r.n_pairs == 2
        assert r.mean_difference == pytest.approx((syn - ctl).mean())
        if np.std(syn - ctl) > 0:
            ref = stats.ttest_rel(syn, ctl)
            assert r.t_statistic == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)
        else:
            assert np.isnan(r.p_value)
        stem = "dark__r1" if r.adjective == "dark" else "none__r1"
        a = np.stack([_correct(preds, _tid(stem, f)) for f in (0, 1)])
        b = np.stack([_correct(preds, _tid(controls[r.control], f)) for f in (0, 1)])
        ref = paired_bootstrap(a, b, samples=10_000, seed=3)
        assert (r.boot_ci_low, r.boot_ci_high, r.boot_p) == pytest.approx((ref.ci_low, ref.ci_high, ref.p_value))
        assert r.n_test_images == N and r.boot_samples == 10_000
    assert t4.p_holm.to_numpy() == pytest.approx(holm(t4.boot_p.to_numpy()))     # one family: every row


def test_controls_stay_out_of_tables_1_and_2_and_table4_needs_them():
    trials, preds = _frames("drop_lowest 0.2")
    t1 = table1(trials)
    assert len(t1) == 3 and set(t1.adjective.dropna()) == {"", "dark"}           # real, dark, "" at ratio 1
    assert dict(zip(t1.adjective.fillna("real"), t1["filter"])) == {"real": "none", "dark": "drop_lowest 0.2",
                                                                     "": "drop_lowest 0.2"}
    assert best_settings(trials).n_settings_compared.tolist() == [2]
    t2 = table2(trials, preds)
    assert t2.aug_accuracy.iloc[0] == pytest.approx(0.75) and t2.real_accuracy.iloc[0] == pytest.approx(0.525)
    plain = trials[trials.augmentation.isin(["none", "synthetic"])].drop(columns=["augmentation", "filter"])
    empty = table4(plain, preds)
    assert empty.empty and "classify.controls" in empty.attrs["note"]
    no_dup = table4(trials[trials.augmentation != "duplicate"], preds)
    assert list(no_dup.control) == ["classical"] and "sq duplicate at ratio 1" in no_dup.attrs["note"]


def test_report_shows_table4_filter_and_fidelity(tmp_path):
    from meddap.stages import report as stage
    from meddap.stages.sweep import GATE_COLUMNS

    trials, preds = _frames("threshold 0.5")
    run_dir = str(tmp_path / "run")
    lay = RunLayout(run_dir)
    storage.write_parquet(trials, lay.summary("trials"))
    storage.write_parquet(preds, lay.summary("predictions"))
    rng = np.random.default_rng(0)
    gate = pd.DataFrame([dict(image_id=f"syn-{f}-{a}-{c}-{i}", fold=f, source_fold=f, adjective=a, class_name=c,
                              label=k, index=i, fidelity=float(rng.random()), judge=f"sq__real__r0__f{f}")
                         for f in (0, 1) for a in ("", "dark") for k, c in enumerate(("benign", "malignant", "normal"))
                         for i in range(6)])
    gate = gate.assign(filter="threshold", filter_value=0.5, kept=gate.fidelity >= 0.5)[GATE_COLUMNS]
    storage.write_parquet(gate, lay.summary("fidelity_gate"))
    cfg = load_config("demo", [f"run_dir={run_dir}"])
    stage.run(cfg)
    md = storage.read_text(lay.path("report.md"))
    assert "## Table 4: synthetic images vs equal-budget controls (test set)" in md
    assert "classical (brightness_down)" in md and "dark ✓" in md
    assert "Label-fidelity gate of the synthetic trials" in md and "`threshold 0.5`" in md
    assert "## Label fidelity of the synthetic images (the fold's real-only classifier)" in md and "figures/fidelity.png" in md
    assert "gate `threshold 0.5`" in md
    assert len(storage.read_parquet(lay.summary("table4"))) == 3
    assert set(storage.read_parquet(lay.summary("table1"))["filter"]) == {"none", "threshold 0.5"}
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "figures/fidelity.png" in links and all(storage.exists(storage.join(run_dir, rel)) for rel in links)
