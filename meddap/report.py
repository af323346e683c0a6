"""The paper's tables from the sweep's Parquet summaries, with the statistics; plain pandas / scipy.

  table1(trials, fid)   mean and std over folds of test accuracy per classifier x adjective x ratio
                        (real-only rows included, adjective null, ratio 0), with each adjective's overall
                        FID / KID (mean over folds; null when FID is missing)
  table2(trials, predictions)
                        per classifier: real-only vs its best augmented (adjective, ratio), the best chosen
                        on mean VALIDATION accuracy over folds (never on test: choosing on the scores you
                        report inflates the gain) out of `n_settings_compared` candidates; test
                        accuracy/sensitivity/specificity/precision/F1 means; on test accuracy: the fold
                        t-test (paired by fold and repeat: mean difference, its 95 % t-interval ci_low/ci_high,
                        t_statistic, p_value), the paired bootstrap over test images (boot_ci_low,
                        boot_ci_high, boot_p; meddap.stats) and p_holm (boot_p Holm-adjusted over the
                        classifiers of the table)
  table3(trials, predictions, full=False)
                        the same comparison on the external set (Dataset B) accuracy, same chosen setting;
                        n_used / n_excluded external images (B copies of A images, left out under
                        data.external.exclude_overlap); full=True scores all of Dataset B
  table4(trials, predictions)
                        equal-budget controls (classify.controls): per classifier, at Table 2's validation-chosen
                        ratio, every adjective's synthetic trials vs its classical twin and vs the duplicate
                        control; the same tests as Table 2 (fold t-test, paired bootstrap over test images,
                        p_holm over every comparison of the table)
  fig1a(synthetic_eval) real-only classifiers' accuracy on each adjective's synthetic set, mean over folds

Control trials (augmentation duplicate / classical) take part in Table 4 only: Tables 1-3 and the
selection are made from the real-only and synthetic trials (`study_trials`).

Trials pair by (fold, repeat): common random numbers make a cell's augmented and real-only trials start
alike (meddap.classify.trial.trial_seed). Nothing is re-derived by hand: every number is a pandas
aggregate, a scipy test of trials.parquet rows or a bootstrap of predictions.parquet rows.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy import stats

from meddap import storage
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stats import correctness_matrices, holm, paired_bootstrap

__all__ = [
    "METRICS",
    "collapsed_baselines",
    "SELECTED_BY",
    "CONFIDENCE",
    "load_trials",
    "best_settings",
    "table1",
    "table2",
    "table3",
    "table4",
    "TABLE4_COLUMNS",
    "study_trials",
    "fig1a",
    "crn_violations",
    "EXTERNAL_SETS",
]

METRICS = ["accuracy", "sensitivity", "specificity", "precision", "f1"]
SELECTED_BY = "val_accuracy"
CONFIDENCE = 0.95
# Paired differences whose spread is below this (relative) are identical up to float round-off.
_DEGENERATE = 1e-9
_TRIAL_COLUMNS = ["trial_id", "classifier", "adjective", "ratio", "fold", "eval_set", *METRICS]
# Eval sets of Dataset B: the images used, and the copies of Dataset A images set apart (exclude_overlap).
EXTERNAL_SETS = ("external", "external_overlap")
_PAIR = ["fold", "repeat"]


def load_trials(run_dir: str) -> pd.DataFrame:
    """summary/trials.parquet, or a MeddapError saying to run the sweep."""
    path = RunLayout(run_dir).summary("trials")
    if not storage.exists(path):
        raise MeddapError(f"trials.parquet not found at {path}: run `python -m meddap sweep` first "
                          f"(same --config and run_dir); the report's tables are made from it.")
    trials = storage.read_parquet(path)
    missing = [c for c in _TRIAL_COLUMNS if c not in trials.columns]
    if missing:
        raise MeddapError(f"{path} lacks columns {missing}; it was not written by this meddap's sweep. "
                          f"Rerun `python -m meddap sweep`.")
    return _normalise(trials)


def _normalise(trials: pd.DataFrame) -> pd.DataFrame:
    """adjective as plain objects with None for real-only: pandas' nullable string dtype (the sweep's)
    makes `== "dark"` yield NA on real-only rows, which cannot index a frame."""
    adj = trials["adjective"].astype(object)
    out = trials.assign(adjective=adj.where(trials["adjective"].notna(), None))
    if "repeat" not in out:  # sweeps before classify.repeats: one repeat, number 0
        out = out.assign(repeat=0)
    derived = out["adjective"].isna().map({True: "none", False: "synthetic"})
    aug = out["augmentation"].where(out["augmentation"].notna(), derived) if "augmentation" in out else derived
    filt = out["filter"].fillna("none").astype(str) if "filter" in out else "none"  # sweeps before the gate: none
    return out.assign(repeat=out["repeat"].fillna(0).astype(int), augmentation=aug.astype(str), filter=filt)


def study_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The real-only and synthetic trials (Tables 1-3 and the selection), without the control trials."""
    trials = _normalise(trials)
    return trials[trials["augmentation"].isin(("none", "synthetic"))]


def collapsed_baselines(trials: pd.DataFrame, eval_set: str = "test") -> dict[str, list[int]]:
    """{classifier: folds} whose real-only baseline predicted one class for every `eval_set` image.

    Such a baseline scores the share of that class (chance on balanced classes), so a "gain" over it
    measures the baseline's failure to train, not what the synthetic images add; the duplicate control
    of Table 4 (the same number of extra training steps on real images) tells the two apart."""
    trials = _normalise(trials)
    if "confusion" not in trials:
        return {}
    rows = trials[_real_only(trials) & (trials["eval_set"] == eval_set) & trials["confusion"].notna()]
    out: dict[str, list[int]] = {}
    for r in rows.itertuples():
        predicted = np.asarray(json.loads(r.confusion)).sum(axis=0)
        if predicted.sum() > 0 and int((predicted > 0).sum()) == 1:
            out.setdefault(r.classifier, []).append(int(r.fold))
    return {c: sorted(set(f)) for c, f in sorted(out.items())}


def _real_only(trials: pd.DataFrame) -> pd.Series:
    return trials["adjective"].isna()


def _need_baselines(trials: pd.DataFrame, eval_set: str, classifiers: list[str], table: str) -> None:
    have = set(trials.loc[_real_only(trials) & (trials["eval_set"] == eval_set), "classifier"])
    lacking = [c for c in classifiers if c not in have]
    if lacking:
        raise MeddapError(
            f"{table} needs the real-only baseline (adjective null, ratio 0) on eval_set '{eval_set}' for "
            f"classifier(s) {lacking}, but trials.parquet has none. Rerun `python -m meddap sweep` so the "
            f"real-only trials are present (they are part of every sweep grid).")


def best_settings(trials: pd.DataFrame) -> pd.DataFrame:
    """Per classifier, the augmented (adjective, ratio) with the highest mean validation accuracy over
    folds (and repeats): columns classifier, adjective, ratio, val_accuracy, n_val_folds, selected_by,
    n_settings_compared (how many (adjective, ratio) candidates it was chosen from).
    Ties go to the smaller ratio, then the adjective first in alphabetical order (deterministic)."""
    trials = study_trials(trials)
    aug = trials[~_real_only(trials)]
    val = aug[aug["eval_set"] == "val"]
    lacking = sorted(set(aug["classifier"]) - set(val["classifier"]))
    if lacking:
        raise MeddapError(f"trials.parquet has augmented trials but no validation ('val') rows for {lacking}: "
                          f"the best setting is chosen on validation accuracy. Rerun `python -m meddap sweep`.")
    means = (val.groupby(["classifier", "adjective", "ratio"])["accuracy"]
             .agg(val_accuracy="mean", n_val_folds="count").reset_index())
    means = means.sort_values(["classifier", "val_accuracy", "ratio", "adjective"],
                              ascending=[True, False, True, True])
    best = means.groupby("classifier", sort=True).head(1).reset_index(drop=True)
    best["selected_by"] = SELECTED_BY
    best["n_settings_compared"] = best["classifier"].map(means.groupby("classifier").size()).astype(int)
    return best[["classifier", "adjective", "ratio", "val_accuracy", "n_val_folds", "selected_by",
                 "n_settings_compared"]]


def table1(trials: pd.DataFrame, fid: pd.DataFrame | None = None, dims: int | None = None) -> pd.DataFrame:
    """classifier, adjective, ratio, accuracy_mean, accuracy_std, n_folds, fid, kid, fid_folds, filter (the
    label-fidelity gate the synthetic trials ran with, sweep.filter_label; 'none' for real-only rows); FID
    rows of feature size `dims` only (fid.dims) when fid.parquet holds several."""
    trials = study_trials(trials)
    if fid is not None and dims is not None and "dims" in fid:
        fid = fid[fid["dims"] == dims]
    test = trials[trials["eval_set"] == "test"]
    if test.empty:
        raise MeddapError("trials.parquet has no 'test' rows: Table 1 reports test accuracy. "
                          "Rerun `python -m meddap sweep`.")
    out = (test.groupby(["classifier", "adjective", "ratio"], dropna=False)
           .agg(accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"), n_folds=("accuracy", "count"),
                filter=("filter", lambda f: ", ".join(sorted(set(f))))).reset_index())
    out["adjective"] = out["adjective"].astype(object).where(out["adjective"].notna(), None)
    fid_by_adj, kid_by_adj, folds_by_adj = {}, {}, {}
    if fid is not None and len(fid):
        overall = fid[(fid["class_name"] == "all") & fid["fid"].notna()]
        for adj, g in overall.groupby("adjective"):
            fid_by_adj[adj], kid_by_adj[adj], folds_by_adj[adj] = g["fid"].mean(), g["kid"].mean(), len(g)
    out["fid"] = [fid_by_adj.get(a, np.nan) if a is not None else np.nan for a in out["adjective"]]
    out["kid"] = [kid_by_adj.get(a, np.nan) if a is not None else np.nan for a in out["adjective"]]
    out["fid_folds"] = [folds_by_adj.get(a, 0) if a is not None else 0 for a in out["adjective"]]
    out = out[[c for c in out.columns if c != "filter"] + ["filter"]]
    order = out["adjective"].isna().map({True: 0, False: 1})
    return (out.assign(_o=order).sort_values(["classifier", "_o", "adjective", "ratio"])
            .drop(columns="_o").reset_index(drop=True))


def _paired(aug: pd.Series, real: pd.Series) -> dict:
    """Fold t-test of aug vs real over the (fold, repeat) pairs both have (indexed by them)."""
    folds = sorted(set(aug.dropna().index) & set(real.dropna().index))
    n = len(folds)
    out = {"n_pairs": n, "mean_difference": np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "t_statistic": np.nan, "p_value": np.nan}
    if n == 0:
        return out
    a, r = aug.loc[folds].to_numpy(float), real.loc[folds].to_numpy(float)
    diff = a - r
    out["mean_difference"] = float(diff.mean())
    if n >= 2:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1) * diff.std(ddof=1) / np.sqrt(n)
        out["ci_low"], out["ci_high"] = float(diff.mean() - half), float(diff.mean() + half)
        # Every fold moved by the same amount (common with few folds and small test sets): the t statistic
        # is a division by ~0 (scipy returns +-inf, p = 0, with a precision warning); say undefined instead.
        if diff.std(ddof=1) > _DEGENERATE * max(1.0, abs(diff.mean())):
            res = stats.ttest_rel(a, r)
            out["t_statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


_BOOT_COLUMNS = ["boot_ci_low", "boot_ci_high", "boot_p", "boot_samples", "n_test_images", "p_holm"]


def _bootstrap(predictions: pd.DataFrame | None, aug: pd.DataFrame, real: pd.DataFrame, eval_sets: tuple,
               samples: int, seed: int) -> dict:
    """boot_* columns of one comparison from the paired trials' per-image predictions."""
    out = {"boot_ci_low": np.nan, "boot_ci_high": np.nan, "boot_p": np.nan, "boot_samples": 0, "n_test_images": 0}
    if predictions is None:
        return out
    keys = sorted(set(aug.index) & set(real.index))
    if not keys:
        return out
    a, r, images = correctness_matrices(predictions, aug.loc[keys, "trial_id"].astype(str).tolist(),
                                        real.loc[keys, "trial_id"].astype(str).tolist(), eval_sets)
    if not images:
        return out
    res = paired_bootstrap(a, r, samples=samples, seed=seed, confidence=CONFIDENCE)
    return {"boot_ci_low": res.ci_low, "boot_ci_high": res.ci_high, "boot_p": res.p_value,
            "boot_samples": res.samples, "n_test_images": res.n_images}


def _compare(trials: pd.DataFrame, eval_set: str, metrics: list[str], table: str,
             predictions: pd.DataFrame | None = None, eval_sets: tuple | None = None,
             samples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """`eval_set` names the trials.parquet rows compared; `eval_sets` the predictions.parquet eval sets
    the bootstrap resamples (default: the same one)."""
    trials = study_trials(trials)
    classifiers = sorted(set(trials.loc[~_real_only(trials), "classifier"]))
    _need_baselines(trials, eval_set, classifiers, table)
    best = best_settings(trials).set_index("classifier") if classifiers else None
    rows = []
    for clf in classifiers:
        b = best.loc[clf]
        ev = trials[(trials["classifier"] == clf) & (trials["eval_set"] == eval_set)]
        real = ev[_real_only(ev)].set_index(_PAIR).sort_index()
        aug = ev[(ev["adjective"] == b["adjective"]) & (ev["ratio"] == b["ratio"])].set_index(_PAIR).sort_index()
        row = {"classifier": clf, "eval_set": eval_set, "adjective": b["adjective"], "ratio": float(b["ratio"]),
               "selected_by": b["selected_by"], "val_accuracy": float(b["val_accuracy"]),
               "n_settings_compared": int(b["n_settings_compared"]),
               "n_folds_real": len(real), "n_folds_aug": len(aug)}
        for m in metrics:
            row[f"real_{m}"] = real[m].mean() if len(real) else np.nan
            row[f"aug_{m}"] = aug[m].mean() if len(aug) else np.nan
            row[f"real_{m}_std"] = real[m].std() if len(real) else np.nan
            row[f"aug_{m}_std"] = aug[m].std() if len(aug) else np.nan
        row.update(_paired(aug["accuracy"], real["accuracy"]))
        row.update(_bootstrap(predictions, aug, real, eval_sets or (eval_set,), samples, seed))
        rows.append(row)
    cols = ["classifier", "eval_set", "adjective", "ratio", "selected_by", "val_accuracy", "n_settings_compared",
            "n_folds_real", "n_folds_aug",
            *[f"{s}_{m}{x}" for m in metrics for x in ("", "_std") for s in ("real", "aug")],
            "n_pairs", "mean_difference", "ci_low", "ci_high", "t_statistic", "p_value", *_BOOT_COLUMNS]
    out = pd.DataFrame(rows, columns=cols)
    out["p_holm"] = holm(out["boot_p"].to_numpy(float)) if len(out) else []
    out = out.astype({"boot_samples": "int64", "n_test_images": "int64", "n_settings_compared": "int64"})
    if predictions is None:
        out.attrs["note"] = (f"{table}: summary/predictions.parquet is absent, so the paired bootstrap over test "
                             f"images (boot_*, p_holm) was not computed; only the fold t-test is given.")
    elif out["boot_p"].isna().any():
        lacking = ", ".join(out.loc[out["boot_p"].isna(), "classifier"])
        out.attrs["note"] = (f"{table}: no paired bootstrap for {lacking}: predictions.parquet lacks per-image "
                             f"predictions of their compared trials on {'/'.join(eval_sets or (eval_set,))}; "
                             f"rerun those trials (`python -m meddap sweep`) to get them.")
    return out


def table2(trials: pd.DataFrame, predictions: pd.DataFrame | None = None, samples: int = 10_000,
           seed: int = 0) -> pd.DataFrame:
    """Real-only vs best augmented (chosen on validation) on the test set, every metric; on test accuracy
    the fold t-test, the paired bootstrap over test images and Holm's correction (see the module docstring)."""
    if not (~_real_only(trials)).any():
        raise MeddapError("trials.parquet has no augmented trials: Table 2 compares real-only with the best "
                          "augmented setting. Run `python -m meddap sweep` with generate.adjectives/ratios.")
    return _compare(trials, "test", METRICS, "Table 2", predictions, samples=samples, seed=seed)


TABLE4_COLUMNS = ["classifier", "eval_set", "ratio", "adjective", "selected", "control", "twin", "selected_by",
                  "n_settings_compared", "real_accuracy", "synthetic_accuracy", "synthetic_accuracy_std",
                  "control_accuracy", "control_accuracy_std", "n_folds_synthetic", "n_folds_control", "n_pairs",
                  "mean_difference", "ci_low", "ci_high", "t_statistic", "p_value", *_BOOT_COLUMNS]


def table4(trials: pd.DataFrame, predictions: pd.DataFrame | None = None, samples: int = 10_000,
           seed: int = 0) -> pd.DataFrame:
    """Synthetic images vs equal-budget controls on the test set (columns TABLE4_COLUMNS, one row per
    classifier x adjective x control). Per classifier, at the ratio Table 2 selected on validation
    accuracy (`best_settings`), each adjective's synthetic trials are compared with its classical twin
    (control 'classical'; adjectives without one have none) and with the duplicate control; `selected`
    marks Table 2's adjective. Differences are synthetic - control test accuracy, paired by (fold,
    repeat): the fold t-test and the paired bootstrap over test images as in Table 2, `p_holm` the
    bootstrap p Holm-adjusted over every row of the table. Empty (with attrs['note']) without controls."""
    from meddap.classify.controls import classical_name

    trials = _normalise(trials)
    ctl = trials[trials["augmentation"].isin(("duplicate", "classical"))]
    if ctl.empty or not (trials["augmentation"] == "synthetic").any():
        out = pd.DataFrame(columns=TABLE4_COLUMNS)
        out.attrs["note"] = ("Table 4 not computed: trials.parquet has no control trials (set classify.controls: "
                             "[duplicate, classical] and rerun `python -m meddap sweep`; only the controls run)."
                             if ctl.empty else "Table 4 not computed: trials.parquet has no synthetic trials.")
        return out
    best = best_settings(trials).set_index("classifier")
    test = trials[trials["eval_set"] == "test"]
    rows, missing = [], []
    for clf in best.index:
        b = best.loc[clf]
        ev = test[(test["classifier"] == clf) & (test["ratio"] == b["ratio"])]
        real = test[(test["classifier"] == clf) & (test["augmentation"] == "none")]
        dup = ev[ev["augmentation"] == "duplicate"].set_index(_PAIR).sort_index()
        syn_all = ev[ev["augmentation"] == "synthetic"]
        for adj in sorted(syn_all["adjective"].unique()):
            syn = syn_all[syn_all["adjective"] == adj].set_index(_PAIR).sort_index()
            twin = classical_name(adj) or ""
            cls = ev[(ev["augmentation"] == "classical") & (ev["adjective"] == adj)].set_index(_PAIR).sort_index()
            for control, c in (("classical", cls), ("duplicate", dup)):
                if control == "classical" and not twin:
                    continue  # no classical twin: its control is the duplicate (meddap.classify.controls)
                if c.empty:
                    missing.append(f"{clf} {control} at ratio {b['ratio']:g}" + (f" ({adj})" if control == "classical" else ""))
                    continue
                row = {"classifier": clf, "eval_set": "test", "ratio": float(b["ratio"]), "adjective": adj,
                       "selected": adj == b["adjective"], "control": control, "twin": twin,
                       "selected_by": b["selected_by"], "n_settings_compared": int(b["n_settings_compared"]),
                       "real_accuracy": real["accuracy"].mean() if len(real) else np.nan,
                       "synthetic_accuracy": syn["accuracy"].mean(), "synthetic_accuracy_std": syn["accuracy"].std(),
                       "control_accuracy": c["accuracy"].mean(), "control_accuracy_std": c["accuracy"].std(),
                       "n_folds_synthetic": len(syn), "n_folds_control": len(c)}
                row.update(_paired(syn["accuracy"], c["accuracy"]))
                row.update(_bootstrap(predictions, syn, c, ("test",), samples, seed))
                rows.append(row)
    out = pd.DataFrame(rows, columns=TABLE4_COLUMNS)
    out["p_holm"] = holm(out["boot_p"].to_numpy(float)) if len(out) else []
    out = out.astype({"boot_samples": "int64", "n_test_images": "int64", "n_settings_compared": "int64",
                      "n_folds_synthetic": "int64", "n_folds_control": "int64", "selected": bool})
    notes = []
    if missing:
        notes.append(f"Table 4: no control trials for {', '.join(dict.fromkeys(missing))} (classify.controls "
                     f"lacks them, or they did not finish): those comparisons are left out.")
    if predictions is None:
        notes.append("Table 4: summary/predictions.parquet is absent, so the paired bootstrap (boot_*, p_holm) was "
                     "not computed; only the fold t-test is given.")
    if notes:
        out.attrs["note"] = " ".join(notes)
    return out


def _full_external(trials: pd.DataFrame) -> pd.DataFrame:
    """trials.parquet rows with eval_set 'external_full': per trial, accuracy over every Dataset B image
    (the used ones and the A copies set apart), weighted by n_eval. Only accuracy is combined."""
    ext = trials[trials["eval_set"].isin(EXTERNAL_SETS)]
    if ext.empty:
        return ext
    n = ext["n_eval"].astype(float) if "n_eval" in ext else pd.Series(1.0, index=ext.index)
    keys = [c for c in ["trial_id", "classifier", "adjective", "ratio", "fold", "repeat"] if c in ext]
    g = ext.assign(_hits=ext["accuracy"] * n, _n=n).groupby("trial_id", sort=True)
    first = g[keys].first().reset_index(drop=True)
    hits, total = g["_hits"].sum().to_numpy(), g["_n"].sum().to_numpy()
    full = first.assign(eval_set="external_full", accuracy=hits / total, n_eval=total.astype(int))
    for m in METRICS:
        if m != "accuracy":
            full[m] = np.nan
    return _normalise(full)


def _external_counts(trials: pd.DataFrame) -> tuple[int, int]:
    """(images used, images set apart) of Dataset B, as the trials scored them."""
    def n(eval_set: str) -> int:
        rows = trials[trials["eval_set"] == eval_set]
        return int(rows["n_eval"].max()) if len(rows) and "n_eval" in rows else 0
    return n("external"), n("external_overlap")


def table3(trials: pd.DataFrame, predictions: pd.DataFrame | None = None, samples: int = 10_000,
           seed: int = 0, full: bool = False) -> pd.DataFrame:
    """Table 2's comparison on the external set (Dataset B) accuracy: the images used (B copies of A images
    left out under data.external.exclude_overlap) or, with `full`, every Dataset B image. Columns n_used and
    n_excluded say how many. Empty (with `attrs['note']`) when the sweep evaluated no external set."""
    trials = _normalise(trials)
    n_used, n_excluded = _external_counts(trials)
    if not (trials["eval_set"] == "external").any():
        empty = _compare(trials.iloc[0:0], "external", ["accuracy"], "Table 3")
        empty.attrs["note"] = ("no external-set (Dataset B) rows in trials.parquet: data.external.source was "
                               "not set when the sweep ran, so robustness (Table 3) was not measured.")
        return empty.assign(n_used=pd.Series(dtype="int64"), n_excluded=pd.Series(dtype="int64"))
    if full:
        rows = pd.concat([trials[~trials["eval_set"].isin(EXTERNAL_SETS)], _full_external(trials)],
                         ignore_index=True)
        out = _compare(rows, "external_full", ["accuracy"], "Table 3 (all of Dataset B)", predictions,
                       eval_sets=EXTERNAL_SETS, samples=samples, seed=seed)
        return out.assign(n_used=n_used + n_excluded, n_excluded=0)
    out = _compare(trials, "external", ["accuracy"], "Table 3", predictions, samples=samples, seed=seed)
    return out.assign(n_used=n_used, n_excluded=n_excluded)


def crn_violations(trials: pd.DataFrame) -> list[str]:
    """(classifier, fold, repeat) cells whose trials were trained from different seeds: trials from a sweep
    before common random numbers (their pairs then carry the extra variance of different initial weights)."""
    trials = _normalise(trials)
    if "seed" not in trials:
        return []
    seeds = trials.drop_duplicates("trial_id").groupby(["classifier", "fold", "repeat"])["seed"].nunique()
    return [f"{c} fold {f} repeat {r}" for (c, f, r), k in seeds.items() if k > 1]


def fig1a(synthetic_eval: pd.DataFrame) -> pd.DataFrame:
    """classifier, adjective, accuracy_mean, accuracy_std, n_folds, n_images (summed over folds)."""
    need = ["classifier", "fold", "adjective", "accuracy", "n"]
    missing = [c for c in need if c not in synthetic_eval.columns]
    if missing:
        raise MeddapError(f"synthetic_eval.parquet lacks columns {missing}; rerun `python -m meddap sweep`.")
    se = synthetic_eval.assign(adjective=synthetic_eval["adjective"].fillna("").astype(str))
    return (se.groupby(["classifier", "adjective"])
            .agg(accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                 n_folds=("fold", "nunique"), n_images=("n", "sum"))
            .reset_index().sort_values(["classifier", "adjective"]).reset_index(drop=True))
