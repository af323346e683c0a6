"""Tables recomputed from a hand-made trials.parquet, best-setting selection on validation, clear errors,
and the report stage's files (every linked image exists)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from meddap import storage
from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.layout import RunLayout, adjective_slug
from meddap.report import METRICS, best_settings, fig1a, load_trials, table1, table2, table3

torch.set_num_threads(1)
CLASSES = ["benign", "malignant", "normal"]
FOLDS = [0, 1, 2]
SETTINGS = [(None, 0.0), ("", 0.5), ("", 1.0), ("dark", 0.5), ("dark", 1.0)]


def _trial_id(clf, adj, ratio, fold):
    slug = "real" if adj is None else adjective_slug(adj)
    return f"{clf}__{slug}__r{ratio:g}__f{fold}"


def _make_trials(seed: int = 0) -> pd.DataFrame:
    """Random metrics, except: for squeezenet1_1, ("dark", 1.0) is best on validation while ("", 0.5)
    is best on test, so choosing on test would pick a different setting."""
    rng = np.random.default_rng(seed)
    rows = []
    for clf in ("squeezenet1_1", "resnet18"):
        for adj, ratio in SETTINGS:
            for fold in FOLDS:
                for ev in ("val", "test", "external"):
                    m = {k: float(rng.uniform(0.55, 0.8)) for k in METRICS}
                    if clf == "squeezenet1_1" and (adj, ratio) == ("dark", 1.0) and ev == "val":
                        m["accuracy"] = 0.9 + 0.01 * fold
                    if clf == "squeezenet1_1" and (adj, ratio) == ("", 0.5) and ev == "test":
                        m["accuracy"] = 0.95
                    rows.append(dict(trial_id=_trial_id(clf, adj, ratio, fold), classifier=clf, adjective=adj,
                                     ratio=ratio, fold=fold, eval_set=ev, **m, n_real=30,
                                     n_synthetic=int(30 * ratio), best_epoch=1, train_seconds=1.0,
                                     images_per_second=10.0))
    df = pd.DataFrame(rows)
    df["adjective"] = df["adjective"].astype("string")     # the sweep's dtype: NA for real-only
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)   # row order must not matter


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    return _make_trials()


def _sel(t, clf, adj, ratio, ev):
    m = (t.classifier == clf) & (t.ratio == ratio) & (t.eval_set == ev)
    m &= t.adjective.isna() if adj is None else t.adjective.eq(adj).fillna(False).astype(bool)
    return t[m].sort_values("fold")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def test_table1_means_std_and_fid(trials):
    fid = pd.DataFrame([
        dict(fold=f, adjective=a, class_name=c, fid=v, kid=v / 100, dims=64, n_real=10, n_synthetic=10, status="ok")
        for f, v0 in ((0, 1.0), (1, 3.0)) for a, v in (("", v0), ("dark", v0 + 10)) for c in ("all", "benign")])
    t1 = table1(trials, fid)
    assert len(t1) == 2 * len(SETTINGS)
    for r in t1.itertuples():
        acc = _sel(trials, r.classifier, r.adjective, r.ratio, "test")["accuracy"].to_numpy()
        assert r.accuracy_mean == pytest.approx(np.mean(acc))
        assert r.accuracy_std == pytest.approx(np.std(acc, ddof=1))
        assert r.n_folds == 3
    none = t1[(t1.adjective == "")]
    assert (none.fid == 2.0).all() and (none.fid_folds == 2).all()      # mean over folds of class "all"
    assert (t1[t1.adjective == "dark"].fid == 12.0).all()
    assert t1[t1.adjective.isna()].fid.isna().all()                     # real-only has no FID
    # Missing weights: null, never a number.
    missing = fid.assign(fid=np.nan, kid=np.nan, status="missing_weights: x")
    assert table1(trials, missing)["fid"].isna().all()


def test_best_setting_is_chosen_on_validation_not_test(trials):
    best = best_settings(trials).set_index("classifier")
    assert (best.loc["squeezenet1_1", "adjective"], best.loc["squeezenet1_1", "ratio"]) == ("dark", 1.0)
    t2 = table2(trials).set_index("classifier")
    assert t2.loc["squeezenet1_1", "selected_by"] == "val_accuracy"
    assert (t2.loc["squeezenet1_1", "adjective"], t2.loc["squeezenet1_1", "ratio"]) == ("dark", 1.0)
    # The test-best setting would have been ("", 0.5): selection did not peek at test.
    test_means = trials[(trials.classifier == "squeezenet1_1") & (trials.eval_set == "test") & trials.adjective.notna()] \
        .groupby(["adjective", "ratio"])["accuracy"].mean()
    assert test_means.idxmax() == ("", 0.5)
    # Generic check for every classifier: the chosen setting has the highest mean validation accuracy.
    for clf, r in best.iterrows():
        val = trials[(trials.classifier == clf) & (trials.eval_set == "val") & trials.adjective.notna()]
        means = val.groupby(["adjective", "ratio"])["accuracy"].mean()
        assert means.max() == pytest.approx(r.val_accuracy)
        assert means.idxmax() == (r.adjective, r.ratio)


def test_table2_statistics_equal_scipy(trials):
    t2 = table2(trials)
    assert list(t2.classifier) == ["resnet18", "squeezenet1_1"]
    for r in t2.itertuples():
        real = _sel(trials, r.classifier, None, 0.0, "test")
        aug = _sel(trials, r.classifier, r.adjective, r.ratio, "test")
        for m in METRICS:
            assert getattr(r, f"real_{m}") == pytest.approx(real[m].mean())
            assert getattr(r, f"aug_{m}") == pytest.approx(aug[m].mean())
            assert getattr(r, f"aug_{m}_std") == pytest.approx(np.std(aug[m].to_numpy(), ddof=1))
        a, b = aug["accuracy"].to_numpy(), real["accuracy"].to_numpy()       # both sorted by fold
        ref = stats.ttest_rel(a, b)
        assert r.t_statistic == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)
        d = a - b
        half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
        assert r.mean_difference == pytest.approx(d.mean())
        assert (r.ci_low, r.ci_high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
        assert r.n_pairs == 3


def test_identical_paired_differences_leave_t_test_undefined(trials):
    t = trials.copy()
    real = t.adjective.isna() & (t.classifier == "resnet18") & (t.eval_set == "test")
    t.loc[real, "accuracy"] = 0.5
    best = best_settings(t).set_index("classifier").loc["resnet18"]
    aug = (t.classifier == "resnet18") & (t.eval_set == "test") & t.adjective.eq(best.adjective).fillna(False) \
        & (t.ratio == best.ratio)
    t.loc[aug, "accuracy"] = 0.625                              # +12.5 points in every fold
    r = table2(t).set_index("classifier").loc["resnet18"]
    assert r.mean_difference == pytest.approx(0.125) and r.ci_low == pytest.approx(0.125)
    assert np.isnan(r.t_statistic) and np.isnan(r.p_value)


def test_table3_external_and_its_absence(trials):
    t3 = table3(trials)
    best = best_settings(trials).set_index("classifier")
    for r in t3.itertuples():
        assert (r.adjective, r.ratio) == (best.loc[r.classifier, "adjective"], best.loc[r.classifier, "ratio"])
        a = _sel(trials, r.classifier, r.adjective, r.ratio, "external")["accuracy"].to_numpy()
        b = _sel(trials, r.classifier, None, 0.0, "external")["accuracy"].to_numpy()
        assert r.aug_accuracy == pytest.approx(a.mean()) and r.real_accuracy == pytest.approx(b.mean())
        assert r.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue)
    empty = table3(trials[trials.eval_set != "external"])
    assert empty.empty and "external" in empty.attrs["note"]
    assert "aug_accuracy" in empty.columns


def test_fig1a_means():
    se = pd.DataFrame([dict(trial_id=f"c__real__r0__f{f}", classifier="c", fold=f, adjective=a, accuracy=acc, n=10)
                       for f, (a, acc) in enumerate([("", 0.5), ("", 0.7), ("dark", 0.2)])])
    f = fig1a(se).set_index("adjective")
    assert f.loc["", "accuracy_mean"] == pytest.approx(0.6) and f.loc["", "n_folds"] == 2
    assert f.loc["dark", "accuracy_mean"] == pytest.approx(0.2) and f.loc["", "n_images"] == 20


def test_clear_errors(tmp_path, trials):
    with pytest.raises(MeddapError, match="meddap sweep"):
        load_trials(str(tmp_path / "nothing"))
    no_base = trials[~(trials.adjective.isna() & (trials.classifier == "resnet18"))]
    with pytest.raises(MeddapError, match=r"real-only baseline.*resnet18"):
        table2(no_base)
    no_ext_base = trials[~(trials.adjective.isna() & (trials.eval_set == "external"))]
    with pytest.raises(MeddapError, match="real-only baseline"):
        table3(no_ext_base)
    no_val = trials[trials.eval_set != "val"]
    with pytest.raises(MeddapError, match="validation"):
        table2(no_val)


# ---------------------------------------------------------------------------------------------
# The report stage
# ---------------------------------------------------------------------------------------------
def _png(path, arr):
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, trials):
    from meddap.classify.models import build_classifier

    root = tmp_path_factory.mktemp("report")
    run_dir = str(root / "run")
    lay = RunLayout(run_dir)
    rng = np.random.default_rng(1)
    img_dir = root / "imgs"
    img_dir.mkdir()
    manifest = pd.DataFrame([dict(image_id=f"t{c}{i}", path=_png(img_dir / f"t{c}{i}.png", rng.integers(0, 255, (40, 40))),
                                  dataset="A", class_name=cls, label=c, split="test", fold=-1, group_id=f"t{c}{i}")
                             for c, cls in enumerate(CLASSES) for i in range(2)])
    storage.write_parquet(manifest, lay.manifest)
    synth = pd.DataFrame([dict(image_id=f"s{f}{a}{c}{i}", path=_png(img_dir / f"s{f}{a}{c}{i}.png",
                                                                   rng.integers(0, 255, (24, 24, 3))),
                               fold=f, adjective=a, class_name=cls, label=c, index=i)
                          for f in FOLDS for a in ("", "dark") for c, cls in enumerate(CLASSES) for i in range(3)])
    storage.write_parquet(synth, lay.synthetic_manifest)
    storage.write_parquet(trials, lay.summary("trials"))
    storage.write_parquet(pd.DataFrame([dict(trial_id=f"{clf}__real__r0__f{f}", classifier=clf, fold=f, adjective=a,
                                             accuracy=float(rng.uniform(0.3, 0.9)), n=9)
                                        for clf in ("squeezenet1_1", "resnet18") for f in FOLDS for a in ("", "dark")]),
                          lay.summary("synthetic_eval"))
    status = "missing_weights: pytorch-fid Inception weights not found"
    storage.write_parquet(pd.DataFrame([dict(fold=f, adjective=a, class_name=c, fid=None, kid=None, kid_std=None,
                                             dims=2048, n_real=20, n_synthetic=9, status=status)
                                        for f in FOLDS for a in ("", "dark") for c in [*CLASSES, "all"]])
                          .astype({"fid": float, "kid": float, "kid_std": float}), lay.summary("fid"))
    # s000 is an img2img image, a near copy of its own source; s001 a txt2img image (no source)
    storage.write_parquet(pd.DataFrame([dict(image_id=sid, fold=0, adjective="", class_name="benign",
                                             nearest_real_id=rid, nearest_real_class="benign", distance=d,
                                             reference_distance=1.0, threshold_distance=0.1, flagged=d < 0.1, dims=64,
                                             source_image_id=src, source_distance=sd,
                                             source_flagged=None if sd is None else sd < 0.1)
                                        for sid, rid, d, src, sd in (("s000", "t00", 0.05, "t00", 0.05),
                                                                     ("s001", "t01", 0.5, None, None))])
                          .astype({"source_image_id": "string", "source_distance": float, "source_flagged": "boolean"}),
                          lay.summary("memorization"))
    # Label fidelity: no-adjective images right except malignant ones; every dark image wrong.
    storage.write_parquet(pd.DataFrame([dict(image_id=r.image_id, fold=r.fold, adjective=r.adjective,
                                             class_name=r.class_name,
                                             predicted=r.class_name if (r.adjective == "" and r.class_name != "malignant")
                                             else "normal" if r.class_name != "normal" else "benign",
                                             correct=r.adjective == "" and r.class_name != "malignant", confidence=0.9,
                                             mean_intensity=50.0 if r.adjective == "" else 20.0, judge="phantom-judge")
                                        for r in synth.itertuples()]), lay.summary("fidelity"))
    storage.write_parquet(pd.DataFrame([dict(rank=r, fold=-1, fid=None, kid=k, dims=2048, status=st, chosen=r == 4)
                                        for r, k, st in ((2, 0.031, "kid only"), (4, 0.012, "kid only"),
                                                         (8, 0.020, "kid only"))]).astype({"fid": float}),
                          lay.summary("rank_selection"))
    # Fold-0 weights for squeezenet only (real-only and its validation-chosen setting); resnet18 has none.
    for adj, ratio in ((None, 0.0), ("dark", 1.0)):
        torch.manual_seed(0)
        model = build_classifier("squeezenet1_1", len(CLASSES))
        buf = storage.join(run_dir, "trials", _trial_id("squeezenet1_1", adj, ratio, 0), "model.pt")
        storage.makedirs(storage.join(run_dir, "trials", _trial_id("squeezenet1_1", adj, ratio, 0)))
        torch.save({"state_dict": model.state_dict(), "classifier": "squeezenet1_1", "classes": CLASSES,
                    "image_size": 32}, buf)
    cfg = load_config("demo", [f"run_dir={run_dir}", "report.gradcam_images=2", "report.contact_sheet_per_cell=2"])
    from meddap.stages import report as stage

    return cfg, stage.run(cfg)


def test_report_files_and_links(report_run):
    cfg, out = report_run
    lay = RunLayout(cfg.run_dir)
    for name in ("table1", "table2", "table3", "fig1a"):
        assert storage.exists(lay.summary(name)), name
    md = storage.read_text(lay.path("report.md"))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    expected = {"figures/accuracy_resnet18.png", "figures/accuracy_squeezenet1_1.png", "figures/contact_none.png",
                "figures/contact_dark.png", "figures/fig1a.png", "figures/gradcam_squeezenet1_1.png",
                "figures/memorization.png"}
    assert set(links) == expected
    for rel in links:
        data = storage.read_bytes(storage.join(cfg.run_dir, rel))
        assert data[:8] == b"\x89PNG\r\n\x1a\n", rel
    html = storage.read_text(lay.path("report.html"))
    assert html.count("data:image/png;base64,") == len(links)
    assert "figures/fid.png" not in md                     # no FID figure without FID values
    t2 = storage.read_parquet(lay.summary("table2"))
    assert set(t2.selected_by) == {"val_accuracy"}


def test_report_counts_img2img_near_copies_of_their_own_source(report_run):
    cfg, _ = report_run
    md = storage.read_text(RunLayout(cfg.run_dir).path("report.md"))
    assert "near copies of own source / img2img images" in md and "| 1 / 1 |" in md


def test_report_notes_missing_parts(report_run):
    cfg, out = report_run
    md = storage.read_text(RunLayout(cfg.run_dir).path("report.md"))
    assert any("missing_weights" in n for n in out["notes"])
    assert "missing_weights: pytorch-fid Inception weights not found" in md
    assert any("resnet18" in s and "model file absent" in s for s in out["skipped"])
    assert "real + 100% dark" in md                       # squeezenet's validation-chosen setting
    assert "| 0 | \"\" (none) | 1 / 2 |" in md              # memorisation: flagged / images per set
    assert not any("memorisation" in s for s in out["skipped"])
    assert "## LoRA rank selection" in md and "Chosen rank: 4." in md
    assert "## Label fidelity (reference judge)" in md
    n = len(FOLDS) * len(CLASSES) * 3                      # images per adjective
    assert f'| "" (none) | 100 | 0 | 100 | 67 | {n} | 50.0 |' in md
    assert f"| dark | 0 | 0 | 0 | 0 | {n} | 20.0 |" in md
    assert "| 4 | -1 | n/a | 0.0120 | 2048 | yes |" in md


def test_report_stage_without_trials_says_run_sweep(tmp_path):
    from meddap.stages import report as stage

    cfg = load_config("demo", [f"run_dir={tmp_path / 'empty'}"])
    with pytest.raises(MeddapError, match="meddap sweep"):
        stage.run(cfg)


def test_report_with_only_trials_lists_what_is_missing(tmp_path, trials):
    from meddap.stages import report as stage

    run_dir = str(tmp_path / "run")
    lay = RunLayout(run_dir)
    storage.write_parquet(trials[trials.eval_set != "external"], lay.summary("trials"))
    cfg = load_config("demo", [f"run_dir={run_dir}"])
    out = stage.run(cfg)
    md = storage.read_text(lay.path("report.md"))
    assert storage.read_parquet(lay.summary("table3")).empty
    assert storage.read_parquet(lay.summary("fig1a")).empty
    notes = " ".join(out["notes"])
    for missing in ("external-set", "synthetic_eval.parquet", "fid.parquet", "synthetic manifest", "manifest is absent"):
        assert missing in notes, missing
    assert "Not available: no external-set" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {"figures/accuracy_resnet18.png", "figures/accuracy_squeezenet1_1.png"}
    assert all(storage.exists(storage.join(run_dir, rel)) for rel in links)


# ---------------------------------------------------------------------------------------------
# The bootstrap over test images, Holm, selection counts, Table 3 with Dataset B copies set apart
# ---------------------------------------------------------------------------------------------
N_TEST = 30


def _predictions(trials: pd.DataFrame, correct_of) -> pd.DataFrame:
    """predictions.parquet rows for every (trial, eval set): `correct_of(trial_row, eval_set)` -> (N,) bool."""
    rows = []
    first = trials.drop_duplicates(["trial_id", "eval_set"])
    for r in first.itertuples():
        n = N_TEST if r.eval_set != "external_overlap" else 4
        labels = np.arange(n) % 3
        correct = correct_of(r, n)
        pred = np.where(correct, labels, (labels + 1) % 3)
        rows += [dict(trial_id=r.trial_id, eval_set=r.eval_set, image_id=f"{r.eval_set}-{i}", label=int(labels[i]),
                      pred=int(pred[i])) for i in range(n)]
    return pd.DataFrame(rows)


def test_bootstrap_columns_identical_and_clearly_better(trials):
    best = best_settings(trials).set_index("classifier")
    assert (best["n_settings_compared"] == 4).all()                  # 2 adjectives x 2 ratios
    noise = np.random.default_rng(0).random((len(FOLDS), N_TEST)) < 0.6

    def same(r, n):                                                  # the model's correctness depends on the fold only
        return noise[r.fold, :n]

    t2 = table2(trials, _predictions(trials, same)).set_index("classifier")
    for clf in t2.index:
        r = t2.loc[clf]
        assert (r.boot_ci_low, r.boot_ci_high, r.boot_p, r.p_holm) == (0.0, 0.0, 1.0, 1.0)
        assert (r.n_settings_compared, r.n_test_images, r.boot_samples) == (4, N_TEST, 10_000)

    chosen = {(c, b.adjective, b.ratio) for c, b in best.iterrows()}

    def better(r, n):                                                # chosen squeezenet setting: all correct
        if (r.classifier, r.adjective, r.ratio) in chosen and r.classifier == "squeezenet1_1":
            return np.ones(n, bool)
        return noise[r.fold, :n]

    t2 = table2(trials, _predictions(trials, better)).set_index("classifier")
    sq, rn = t2.loc["squeezenet1_1"], t2.loc["resnet18"]
    d = (1 - noise.mean(axis=1)).mean()                               # the real-only errors it fixed, in accuracy units
    assert sq.boot_ci_low > 0 and sq.boot_ci_low < d < sq.boot_ci_high and sq.boot_p < 1e-3
    assert sq.p_holm == pytest.approx(min(1.0, 2 * sq.boot_p)) and rn.p_holm == 1.0   # Holm over the 2 classifiers
    assert not np.isnan(sq.p_value)                                  # the fold t-test stays beside it
    no_pred = table2(trials)
    assert no_pred["boot_p"].isna().all() and "predictions.parquet is absent" in no_pred.attrs["note"]
    preds = _predictions(trials, same)
    partial = table2(trials, preds[~preds.trial_id.str.startswith("resnet18__real")]).set_index("classifier")
    assert np.isnan(partial.loc["resnet18", "boot_p"]) and partial.loc["squeezenet1_1", "boot_p"] == 1.0
    assert "no paired bootstrap for resnet18" in partial.attrs["note"]


def test_table3_states_used_and_excluded_and_the_full_set(trials):
    t = trials.copy()
    t["n_eval"] = np.where(t.eval_set == "external", 8, N_TEST)
    overlap = t[t.eval_set == "external"].assign(eval_set="external_overlap", n_eval=2, accuracy=1.0)
    t = pd.concat([t, overlap], ignore_index=True)
    t3 = table3(t)
    assert (t3.n_used == 8).all() and (t3.n_excluded == 2).all()
    full = table3(t, full=True).set_index("classifier")
    assert (full.n_used == 10).all() and (full.n_excluded == 0).all()
    for clf, r in full.iterrows():
        real = _sel(t, clf, None, 0.0, "external")["accuracy"].to_numpy()
        assert r.real_accuracy == pytest.approx(((8 * real + 2 * 1.0) / 10).mean())   # weighted by images
    preds = _predictions(t, lambda r, n: np.ones(n, bool))
    full_b = table3(t, preds, full=True)
    assert (full_b.n_test_images == N_TEST + 4).all() and (full_b.boot_p == 1.0).all()
    assert (table3(t, preds).n_test_images == N_TEST).all()


def test_report_states_selection_tests_warning_and_crn(tmp_path, trials):
    from meddap.stages import report as stage

    run_dir = str(tmp_path / "run")
    lay = RunLayout(run_dir)
    t = trials.assign(seed=0, n_eval=np.where(trials.eval_set == "test", N_TEST, 8))
    t.loc[(t.classifier == "resnet18") & (t.fold == 1) & t.adjective.eq("dark").fillna(False), "seed"] = 5
    t = pd.concat([t, t[t.eval_set == "external"].assign(eval_set="external_overlap", n_eval=2)], ignore_index=True)
    storage.write_parquet(t, lay.summary("trials"))
    storage.write_parquet(_predictions(t, lambda r, n: np.ones(n, bool)), lay.summary("predictions"))
    cfg = load_config("demo", [f"run_dir={run_dir}", "diffusion.lora.per_fold=false"])
    out = stage.run(cfg)
    md = storage.read_text(lay.path("report.md"))
    assert "**Warning: diffusion.lora.per_fold is false.**" in md
    assert "chosen from 4 candidates" in md and "(best of 4)" in md
    for words in ("**Fold t-test**", "not the test set's own sampling variance", "**Paired bootstrap over test images**",
                  "10,000", "does not account for training variance", "**p Holm**",
                  "Neither test nor Holm's correction accounts for the selection among the candidates",
                  "**Common random numbers**"):
        assert words in md, words
    assert "| p (fold t-test) |" in md and "| p (bootstrap) |" in md and "| p Holm |" in md
    assert any("resnet18 fold 1 repeat 0" in n and "different seeds" in n for n in out["notes"])
    assert "n used = 8 images; 2 Dataset B images that copy a Dataset A image" in md
    assert "### Table 3 on all of Dataset B (copies of Dataset A images included)" in md and "n = 10 images" in md
    assert (storage.read_parquet(lay.summary("table3_full")).n_used == 10).all()

# The first screen: question, answer per classifier with its interval, what it means
# ---------------------------------------------------------------------------------------------
def test_report_opens_with_the_answer_before_the_tables(report_run):
    cfg, _ = report_run
    lay = RunLayout(cfg.run_dir)
    md = storage.read_text(lay.path("report.md"))
    head = md[:md.index("## Table 1")]
    assert head.index("## Summary") < head.index("**Question.**") < head.index("**Answer**")
    t2 = storage.read_parquet(lay.summary("table2"))
    for r in t2.to_dict("records"):  # each classifier, with Table 2's own difference and t-interval
        line = next(ln for ln in head.splitlines() if ln.startswith(f"- **{r['classifier']}**, test set"))
        assert f"{100 * r['mean_difference']:+.1f} pp [95 % CI {100 * r['ci_low']:+.1f}, " \
               f"{100 * r['ci_high']:+.1f}]" in line
    assert "- **squeezenet1_1**, external set" in head
    assert "t-interval over folds" in head and "not clinical performance" in head
    assert "phantom images" in head  # the demo config: the numbers say nothing about the method
    html = storage.read_text(lay.path("report.html"))
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Table 1")


def test_answer_uses_the_paired_bootstrap_when_the_tables_have_it(trials):
    from meddap.answer import answer

    t2 = table2(trials)
    plain = answer(t2, None, n_folds=3, n_settings=4)
    assert all("t-interval" not in a for a in plain.answers) and "t-interval over folds" in plain.meaning[0]
    boot = t2.assign(boot_ci_low=0.01, boot_ci_high=0.04, boot_p=0.02, p_holm=0.04, n_settings_compared=4)
    out = answer(boot, None, n_folds=3)
    assert all("[95 % CI +1.0, +4.0], Holm-adjusted p = 0.04; higher with synthetic images." in a for a in out.answers)
    assert "paired bootstrap, Holm-adjusted p" in out.meaning[0] and "among 4 settings" in out.meaning[1]
    assert "p-values are Holm-adjusted" in out.meaning[1]
    below = t2.assign(boot_ci_low=-0.05, boot_ci_high=-0.01, boot_p=float("nan"))
    assert all(a.endswith("lower with synthetic images.") for a in answer(below, None, n_folds=3).answers)
    none = t2.assign(ci_low=float("nan"), ci_high=float("nan"))   # one fold: no interval, no verdict
    assert all("cannot tell" in a for a in answer(none, None, n_folds=1).answers)
    assert [c.split(":")[0] for c in out.console] == list(t2["classifier"])


def test_a_bootstrap_p_of_zero_reads_as_below_one_over_the_draws():
    from meddap.answer import _p_text

    assert _p_text(0.0, {"boot_samples": 10000}) == "p < 0.0001"  # no draw crossed 0: not "p = 0"
    assert _p_text(0.0123, {"boot_samples": 10000}) == "p = 0.0123"
    assert _p_text(0.0, {}) == "p = 0"  # a t-test p of 0 (underflow) has no draw count to bound it


def test_a_baseline_that_predicts_one_class_is_named():
    import json as _json

    import pandas as _pd

    from meddap.report import collapsed_baselines

    one_class = _json.dumps([[6, 0, 0], [6, 0, 0], [6, 0, 0]])  # rows: true class, columns: predicted
    trained = _json.dumps([[4, 1, 1], [1, 4, 1], [0, 2, 4]])
    rows = [dict(trial_id=f"{c}__real__r0__f{f}", classifier=c, adjective=None, ratio=0.0, fold=f, eval_set=e,
                 confusion=conf, repeat=0, accuracy=0.5)
            for c, f, conf in [("resnet34", 0, one_class), ("resnet34", 1, trained), ("densenet121", 0, trained)]
            for e in ("test", "val")]
    rows.append(dict(rows[2], trial_id="resnet34__dark__r1__f1", adjective="dark", ratio=1.0, confusion=one_class))
    assert collapsed_baselines(_pd.DataFrame(rows)) == {"resnet34": [0]}  # synthetic trials are not baselines


def test_a_fidelity_gate_judge_that_predicts_one_class_is_flagged():
    """The gate's judge is the fold's real-only trial: one that labels every test image alike makes every
    fidelity score describe the judge, and the report says so for that judge only."""
    import json as _json

    import pandas as _pd

    from meddap.stages.report import _collapsed_judges, _fidelity_lead

    one_class = _json.dumps([[6, 0, 0], [6, 0, 0], [6, 0, 0]])
    trained = _json.dumps([[4, 1, 1], [1, 4, 1], [0, 2, 4]])
    trials = _pd.DataFrame([dict(trial_id=f"resnet34__real__r0__f{f}", classifier="resnet34", adjective=None,
                                 ratio=0.0, fold=f, eval_set="test", confusion=conf, repeat=0, accuracy=0.5)
                            for f, conf in [(0, one_class), (1, trained)]])
    gate = _pd.DataFrame({"judge": ["resnet34__real__r0__f0", "resnet34__real__r0__f1"], "fold": [0, 1],
                          "filter": ["none"] * 2, "filter_value": [0.0] * 2})
    assert _collapsed_judges(gate, trials) == ["resnet34__real__r0__f0"]
    lead = _fidelity_lead(gate, None, trials)
    assert "Read with care:** resnet34__real__r0__f0 predicted one class" in lead and "__f1 predicted" not in lead
    assert "Read with care" not in _fidelity_lead(gate, None, trials.assign(confusion=trained))


def test_figure_1a_warns_about_a_real_only_classifier_that_did_not_learn():
    """Figure 1(a) scores synthetic images with real-only classifiers: one that puts every test image in
    one class scores that class's share, and the figure's section says so for that classifier only."""
    import json as _json

    import pandas as _pd

    from meddap.stages.report import _fig1a_caveat

    one_class = _json.dumps([[6, 0, 0], [6, 0, 0], [6, 0, 0]])
    trained = _json.dumps([[4, 1, 1], [1, 4, 1], [0, 2, 4]])
    trials = _pd.DataFrame([dict(trial_id=f"{c}__real__r0__f{f}", classifier=c, adjective=None, ratio=0.0, fold=f,
                                 eval_set="test", confusion=conf, repeat=0, accuracy=0.5)
                            for c, f, conf in [("squeezenet1_1", 0, one_class), ("squeezenet1_1", 1, trained),
                                               ("densenet121", 0, trained)]])
    text = _fig1a_caveat(trials, ["densenet121", "squeezenet1_1"])
    assert "squeezenet1_1 (fold(s) 0)" in text and "densenet121" not in text
    assert _fig1a_caveat(trials.assign(confusion=trained), ["densenet121", "squeezenet1_1"]) is None
    assert _fig1a_caveat(trials, ["densenet121"]) is None   # not in the figure: nothing to warn about


def test_details_say_how_each_classifier_was_trained():
    """The report's Details name the training schedule, one clause per group of classifiers that share it."""
    from meddap.config import load_config
    from meddap.stages.report import _training_line

    cfg = load_config("demo")
    line = _training_line(cfg, ["densenet121", "resnet34", "squeezenet1_1"])
    assert line.startswith("Classifiers trained from random initialisation with Adam; ")
    assert "densenet121, resnet34: 4 epochs, lr 0.001, batch 8; squeezenet1_1: 16 epochs, lr 0.0001, batch 8 " \
           "(classify.per_model)" in line
    paper = _training_line(load_config("paper"), ["resnet34", "squeezenet1_1"])
    assert "from ImageNet weights" in paper and "resnet34, squeezenet1_1: 100 epochs, lr 0.001, batch 32;" in paper
    assert "per_model" not in paper
