"""`python -m meddap report`: the tables, statistics and figures a researcher reads.

Reads summary/trials.parquet (required), summary/predictions.parquet (the bootstrap over test images),
summary/fid.parquet, summary/memorization.parquet, summary/synthetic_eval.parquet, the synthetic
manifest, the manifest and the fold-0 model files (each optional: what is absent is named in the
report's notes, never filled in). Writes
  summary/table1.parquet, table2.parquet, table3.parquet, table3_full.parquet (Table 3 on all of
  Dataset B), table4.parquet (synthetic vs equal-budget controls), fig1a.parquet  (see meddap.report)
  figures/accuracy_<classifier>.png   mean test accuracy, adjective x ratio
  figures/fid.png                     overall FID and KID per adjective (only when FID was computed)
  figures/contact_<adjective>.png     synthetic samples per class (rows)
  figures/fig1a.png                   real-only classifiers on each adjective's synthetic set
  figures/fidelity.png                label fidelity per adjective and class (summary/fidelity_gate.parquet)
  figures/memorization.png            the synthetic images closest to a real training image, beside it
  figures/gradcam_<classifier>.png    test images, real-only vs best augmented Grad-CAM (fold 0)
  report.md, report.html              the tables (percentages), statistics, figures (HTML inlines them)
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from meddap import logs, storage
from meddap.errors import MeddapError
from meddap.answer import answer
from meddap.fid import primary_dims
from meddap.layout import RunLayout, adjective_slug
from meddap.report import (TABLE4_COLUMNS, best_settings, collapsed_baselines, crn_violations, fig1a, load_trials,
                           study_trials, table1, table2, table3, table4)

__all__ = ["run", "Report"]


# ---------------------------------------------------------------------------------------------
# A tiny document model rendered to both Markdown and HTML
# ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Blocks: ("h", level, text) | ("p", text) | ("list", [items]) | ("table", DataFrame) | ("img", rel, caption)."""

    run_dir: str
    blocks: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("list", list(items)))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def img(self, rel: str, caption: str) -> None:
        if not storage.exists(storage.join(self.run_dir, rel)):  # only what was written is linked
            raise MeddapError(f"internal: report links {rel}, which was not written")
        self.blocks.append(("img", rel, caption))

    def note(self, text: str) -> None:
        self.notes.append(text)

    # -- rendering ----------------------------------------------------------------------------
    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "list":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                out.append(_md_table(b[1]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'><title>meddap report</title><style>"
               "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
               "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
               "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
               "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline_html(b[1])}</p>")
            elif b[0] == "list":
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                df = b[1]
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
                body = "".join("<tr>" + "".join(f"<td>{_inline_html(str(v))}</td>" for v in row) + "</tr>"
                               for row in df.itertuples(index=False))
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(storage.read_bytes(storage.join(self.run_dir, b[1]))).decode()
                out.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def _md_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[str(v).replace("|", "\\|") for v in row]
                                                for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then render Markdown's **bold** and `code` (the only inline markup the report uses)."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def _adj_label(adj) -> str:
    if adj is None or (isinstance(adj, float) and np.isnan(adj)):
        return "real only"
    return '"" (none)' if adj == "" else str(adj)


def _pct(v, digits: int = 2) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{100 * v:.{digits}f}"


def _pm(mean, std) -> str:
    if pd.isna(mean):
        return "n/a"
    return _pct(mean) if pd.isna(std) else f"{_pct(mean)} ± {_pct(std)}"


def _num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None or pd.isna(v) else format(v, fmt)


def _setting(adj, ratio) -> str:
    return f"real + {ratio:.0%} {_adj_label(adj)}"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _save(fig, run_dir: str, rel: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(storage.join(run_dir, rel), buf.getvalue())
    return rel


def _figure(w: float, h: float):
    # matplotlib's object API (no pyplot): no global state, no display backend needed (Agg).
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def _accuracy_heatmaps(t1: pd.DataFrame, run_dir: str) -> list[tuple[str, str]]:
    out = []
    for clf, g in t1.groupby("classifier", sort=True):
        aug = g[g["adjective"].notna()]
        if aug.empty:
            continue
        adjs = list(dict.fromkeys(aug["adjective"]))
        ratios = sorted(aug["ratio"].unique())
        grid = np.full((len(adjs), len(ratios)), np.nan)
        for r in aug.itertuples():
            grid[adjs.index(r.adjective), ratios.index(r.ratio)] = 100 * r.accuracy_mean
        fig = _figure(1.6 + 1.1 * len(ratios), 1.0 + 0.45 * len(adjs))
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(ratios)), [f"{x:.0%}" for x in ratios])
        ax.set_yticks(range(len(adjs)), [_adj_label(a) for a in adjs])
        for i in range(len(adjs)):
            for j in range(len(ratios)):
                if not np.isnan(grid[i, j]):
                    light = im.norm(grid[i, j]) > 0.6      # dark text on viridis' light end
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="k" if light else "w",
                            fontsize=8)
        base = g[g["adjective"].isna()]["accuracy_mean"]
        title = f"{clf}: test accuracy (%)"
        if len(base):
            title += f"\nreal only: {100 * base.iloc[0]:.1f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("synthetic share of real training set")
        fig.colorbar(im, ax=ax)
        out.append((_save(fig, run_dir, f"figures/accuracy_{clf}.png"), f"{clf}: mean test accuracy over folds"))
    return out


def _features_label(fid: pd.DataFrame) -> str:
    """'phantom-judge (32-d)': the feature extractor of the FID rows (older files: inception)."""
    names = sorted(set(fid["features"].astype(str))) if "features" in fid.columns else ["inception"]
    dims = sorted({int(d) for d in fid["dims"]}) if len(fid) else []
    return ", ".join(names) + (f" ({'/'.join(str(d) for d in dims)}-d)" if dims else "")


def _fid_figure(fid_all: pd.DataFrame, run_dir: str) -> Optional[str]:
    ok = fid_all[fid_all["fid"].notna()]    # one feature size (fid.dims)
    if ok.empty:
        return None
    per = ok.groupby("adjective").agg(fid=("fid", "mean"), kid=("kid", "mean")).reset_index()
    fig = _figure(2 + 0.7 * len(per), 3.2)
    ax1, ax2 = fig.subplots(1, 2)
    labels = [_adj_label(a) for a in per["adjective"]]
    ax1.bar(labels, per["fid"], color="tab:blue")
    ax1.set_title(f"FID, {_features_label(ok)} features, mean over folds", fontsize=9)
    ax2.bar(labels, per["kid"], color="tab:orange")
    ax2.set_title("KID, mean over folds", fontsize=9)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    return _save(fig, run_dir, "figures/fid.png")


def _contact_sheets(synth: pd.DataFrame, classes: list[str], per_cell: int, run_dir: str,
                    skipped: list[str]) -> list[tuple[str, str]]:
    from PIL import Image

    folds = sorted(synth["fold"].unique())
    fold = 0 if 0 in folds else folds[0]
    sub = synth[synth["fold"] == fold]
    out = []
    for adj in list(dict.fromkeys(sub.sort_values("adjective")["adjective"])):
        g = sub[sub["adjective"] == adj]
        fig = _figure(1.3 * per_cell + 1.2, 1.3 * len(classes) + 0.4)
        axes = np.atleast_2d(fig.subplots(len(classes), per_cell, squeeze=False))
        for i, cls in enumerate(classes):
            rows = g[g["class_name"] == cls].sort_values("index").head(per_cell)
            for j in range(per_cell):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(cls, fontsize=8)
                if j >= len(rows):
                    continue
                path = rows.iloc[j]["path"]
                try:
                    with Image.open(storage.local_path(path)) as im:
                        ax.imshow(np.asarray(im.convert("RGB")))
                except (OSError, ValueError) as e:
                    skipped.append(f"contact sheet image {path}: {type(e).__name__}: {e}")
        fig.suptitle(f"adjective {_adj_label(adj)} (fold {fold})", fontsize=9)
        rel = f"figures/contact_{adjective_slug(adj)}.png"
        out.append((_save(fig, run_dir, rel), f"synthetic samples, adjective {_adj_label(adj)}, rows = classes"))
    return out


def _fig1a_figure(f1a: pd.DataFrame, best: pd.DataFrame, run_dir: str, n_classes: int) -> str:
    fig = _figure(2 + 0.7 * f1a["adjective"].nunique(), 3.4)
    ax = fig.subplots()
    adjs = sorted(f1a["adjective"].unique())
    # A classifier guessing uniformly at random scores 1 / K on any class mix.
    ax.axhline(100 / n_classes, ls="--", lw=1, color="grey", label=f"chance ({100 / n_classes:.0f} %)")
    for clf, g in f1a.groupby("classifier"):
        g = g.set_index("adjective").reindex(adjs)
        ax.plot(range(len(adjs)), 100 * g["accuracy_mean"], marker="o", label=clf)
        chosen = best[best["classifier"] == clf]
        if len(chosen) and chosen.iloc[0]["adjective"] in adjs:
            k = adjs.index(chosen.iloc[0]["adjective"])
            ax.plot([k], [100 * g["accuracy_mean"].iloc[k]], "o", ms=13, mfc="none", mec="red")
    ax.set_xticks(range(len(adjs)), [_adj_label(a) for a in adjs], rotation=45, fontsize=8)
    ax.set_ylabel("accuracy on synthetic set (%)")
    ax.set_title("Real-only classifiers tested on synthetic sets (red: chosen adjective)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, run_dir, "figures/fig1a.png")


def _memorization_figure(mem: pd.DataFrame, synth: pd.DataFrame, manifest: pd.DataFrame, n_pairs: int,
                         run_dir: str, skipped: list[str]) -> Optional[str]:
    """The `n_pairs` synthetic images closest to a real training image, each beside that image."""
    from PIL import Image

    closest = mem.sort_values("distance").head(n_pairs)
    synth_path = dict(zip(synth["image_id"].astype(str), synth["path"]))
    real_path = dict(zip(manifest["image_id"].astype(str), manifest["path"]))
    fig = _figure(2 * 2.0, 2.0 * len(closest) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(closest), 2, squeeze=False))
    for i, r in enumerate(closest.itertuples()):
        for j, (iid, paths, what) in enumerate(((r.image_id, synth_path, "synthetic"),
                                                (r.nearest_real_id, real_path, "nearest real"))):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{what} {iid}" + (f"\nd={r.distance:.3g}{' FLAGGED' if r.flagged else ''}" if j == 0 else ""),
                         fontsize=7)
            if iid not in paths:
                skipped.append(f"memorisation figure: no path for {what} image {iid}")
                continue
            try:
                with Image.open(storage.local_path(paths[iid])) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
            except (OSError, ValueError) as e:
                skipped.append(f"memorisation figure image {paths[iid]}: {type(e).__name__}: {e}")
    fig.suptitle("Closest synthetic / real training pairs (feature space)", fontsize=9)
    return _save(fig, run_dir, "figures/memorization.png")


def _gradcam_images(manifest: pd.DataFrame, n: int) -> pd.DataFrame:
    """`n` test images spread over the classes (round robin, by image_id)."""
    test = manifest[manifest["split"] == "test"].sort_values("image_id")
    by_class = [g for _, g in test.groupby("class_name", sort=True)]
    picked, k = [], 0
    while len(picked) < min(n, len(test)):
        for g in by_class:
            if k < len(g) and len(picked) < n:
                picked.append(g.iloc[k])
        k += 1
    return pd.DataFrame(picked)


def _load_model(path: str):
    import torch

    from meddap.classify.models import build_classifier

    ckpt = torch.load(storage.local_path(path), map_location="cpu", weights_only=True)
    model = build_classifier(ckpt["classifier"], len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), list(ckpt["classes"]), int(ckpt["image_size"])


def _trial_id(trials: pd.DataFrame, clf: str, adj, ratio: float, fold: int) -> Optional[str]:
    m = (trials["classifier"] == clf) & (trials["fold"] == fold) & (trials["ratio"] == ratio)
    if "repeat" in trials:
        m &= trials["repeat"] == 0
    m &= trials["adjective"].isna() if adj is None else (trials["adjective"] == adj)
    ids = trials.loc[m, "trial_id"].unique()
    return str(ids[0]) if len(ids) else None


def _gradcam_figures(trials: pd.DataFrame, best: pd.DataFrame, manifest: pd.DataFrame, n_images: int,
                     run_dir: str, skipped: list[str]) -> list[tuple[str, str]]:
    import torch

    from meddap.classify.data import model_input
    from meddap.classify.gradcam import grad_cam, overlay
    from meddap.data.decode import read_grey

    pick = _gradcam_images(manifest, n_images)
    if pick.empty:
        skipped.append("Grad-CAM: the manifest has no test images")
        return []
    lay = RunLayout(run_dir)
    out = []
    for b in best.itertuples():
        folds = sorted(trials.loc[trials["classifier"] == b.classifier, "fold"].unique())
        fold = 0 if 0 in folds else folds[0]
        models = []
        for label, adj, ratio in (("real only", None, 0.0), (_setting(b.adjective, b.ratio), b.adjective, b.ratio)):
            tid = _trial_id(trials, b.classifier, adj, ratio, fold)
            path = lay.path("trials", tid or "?", "model.pt")
            if tid is None or not storage.exists(path):
                skipped.append(f"Grad-CAM {b.classifier} ({label}): model file absent at {path} "
                               f"(the sweep keeps fold-0 weights when classify.save_models is fold0 or all)")
                break
            try:
                models.append((label, *_load_model(path)))
            except Exception as e:  # a foreign or corrupt file: listed, the rest of the report goes on
                skipped.append(f"Grad-CAM {b.classifier} ({label}): {path} could not be loaded "
                               f"({type(e).__name__}: {str(e)[:160]})")
                break
        if len(models) < 2:
            continue
        try:  # each model sees the images at its own training size
            greys = {m[3]: np.stack([read_grey(p, m[3]) for p in pick["path"]]) for m in models}  # (N, S, S)
        except MeddapError as e:  # a test image moved or damaged since prepare
            skipped.append(f"Grad-CAM {b.classifier}: {e}")
            continue
        fig = _figure(3 * 2.2, 2.2 * len(pick) + 0.3)
        axes = np.atleast_2d(fig.subplots(len(pick), 3, squeeze=False))
        for j, (label, model, classes, size) in enumerate(models):
            x = model_input(torch.from_numpy(greys[size])[:, None])                   # (N, 3, S, S)
            with torch.no_grad():
                preds = model(x).argmax(1).tolist()
            heat = grad_cam(model, x)                                                 # (N, S, S) in [0, 1]
            for i, row in enumerate(pick.itertuples()):
                axes[i, j + 1].imshow(overlay(greys[size][i], heat[i]))
                axes[i, j + 1].set_title(f"{label}\npred {classes[preds[i]]}", fontsize=7)
                if j == 0:
                    axes[i, 0].imshow(greys[size][i], cmap="gray")
                    axes[i, 0].set_title(f"{row.image_id}\ntrue {row.class_name}", fontsize=7)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{b.classifier}, fold {fold}: Grad-CAM of the predicted class", fontsize=9)
        out.append((_save(fig, run_dir, f"figures/gradcam_{b.classifier}.png"),
                    f"{b.classifier}: test images; Grad-CAM of the real-only and the best augmented model"))
    return out


# ---------------------------------------------------------------------------------------------
# Formatted tables
# ---------------------------------------------------------------------------------------------
def _fidelity_section(rep: Report, scored: pd.DataFrame, classes: list[str]) -> None:
    """Label fidelity: share of each (adjective, class) set the reference judge puts in the prompted class."""
    from meddap.classify.judge import fidelity_summary

    summary = fidelity_summary(scored.assign(adjective=scored["adjective"].fillna("").astype(str)))
    judge = str(scored["judge"].iloc[0])
    rep.h(2, "Label fidelity (reference judge)")
    rep.p(f"Share of synthetic images that the reference judge (`{judge}`, trained on its own phantom set, never "
          f"on this run's images) assigns to the class their prompt asked for; chance is {1 / len(classes):.0%}. "
          "`all` is the mean over classes. Mean intensity: grey level 0-255 of the images as generated.")
    rows = []
    for adj, g in summary.groupby("adjective", sort=False):
        by = dict(zip(g["class_name"], g["fidelity"]))
        rows.append({"adjective": _adj_label(adj), **{c: _pct(by.get(c), 0) for c in [*classes, "all"]},
                     "images": int(g.loc[g["class_name"] == "all", "n"].iloc[0]),
                     "mean intensity": _num(g.loc[g["class_name"] == "all", "mean_intensity"].iloc[0], ".1f")})
    rep.table(pd.DataFrame(rows))



def _fmt_table1(t1: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    aug = t1[t1["adjective"].notna()]
    ratios = sorted(aug["ratio"].unique())
    classifiers = sorted(t1["classifier"].unique())
    adjs = list(dict.fromkeys(aug["adjective"]))
    rows = []
    for adj in adjs:
        a = aug[aug["adjective"] == adj]
        fid = a["fid"].iloc[0] if len(a) else np.nan
        kid = a["kid"].iloc[0] if len(a) else np.nan
        row = {"adjective": _adj_label(adj), "FID": _num(fid), "KID": _num(kid, ".4f")}
        for clf in classifiers:
            c = a[a["classifier"] == clf]
            best = aug[aug["classifier"] == clf]["accuracy_mean"].max()
            for r in ratios:
                cell = c[c["ratio"] == r]
                txt = _pm(cell["accuracy_mean"].iloc[0], cell["accuracy_std"].iloc[0]) if len(cell) else "n/a"
                if len(cell) and cell["accuracy_mean"].iloc[0] == best:
                    txt = f"**{txt}**"
                row[f"{clf} {r:.0%}"] = txt
        rows.append(row)
    base = t1[t1["adjective"].isna()]
    baselines = [f"{r.classifier}: {_pm(r.accuracy_mean, r.accuracy_std)} % over {r.n_folds} fold(s)"
                 for r in base.itertuples()]
    return pd.DataFrame(rows), baselines


def _fmt_compare(t: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    rows = []
    blank = {"val acc (chosen on)": "", "Δ acc [95 % t-CI] (pp)": "", "p (fold t-test)": "",
             "Δ 95 % CI, bootstrap over images (pp)": "", "p (bootstrap)": "", "p Holm": ""}
    for r in t.to_dict("records"):
        real = {"classifier": r["classifier"], "train set": "real only"}
        aug = {"classifier": "", "train set": _setting(r["adjective"], r["ratio"])}
        for m in metrics:
            real[m] = _pm(r[f"real_{m}"], r[f"real_{m}_std"])
            aug[m] = _pm(r[f"aug_{m}"], r[f"aug_{m}_std"])
        real.update({**blank, "pairs": str(r["n_folds_real"])})
        ci = ("n/a" if pd.isna(r["ci_low"]) else f"[{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]")
        boot = ("n/a" if pd.isna(r["boot_ci_low"]) else f"[{100 * r['boot_ci_low']:.2f}, {100 * r['boot_ci_high']:.2f}]")
        diff = _num(100 * r["mean_difference"] if pd.notna(r["mean_difference"]) else np.nan, "+.2f")
        aug.update({"val acc (chosen on)": f"{_pct(r['val_accuracy'])} (best of {r['n_settings_compared']})",
                    "Δ acc [95 % t-CI] (pp)": f"{diff} {ci}", "p (fold t-test)": _num(r["p_value"], ".4f"),
                    "Δ 95 % CI, bootstrap over images (pp)": boot, "p (bootstrap)": _num(r["boot_p"], ".4f"),
                    "p Holm": _num(r["p_holm"], ".4f"), "pairs": str(r["n_pairs"])})
        rows += [real, aug]
    return pd.DataFrame(rows)


def _fmt_table4(t4: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in t4.to_dict("records"):
        ci = "n/a" if pd.isna(r["ci_low"]) else f"[{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]"
        boot = "n/a" if pd.isna(r["boot_ci_low"]) else f"[{100 * r['boot_ci_low']:.2f}, {100 * r['boot_ci_high']:.2f}]"
        diff = _num(100 * r["mean_difference"] if pd.notna(r["mean_difference"]) else np.nan, "+.2f")
        rows.append({"classifier": r["classifier"], "ratio": f"{r['ratio']:.0%}",
                     "adjective": _adj_label(r["adjective"]) + (" ✓" if r["selected"] else ""),
                     "control": r["control"] + (f" ({r['twin']})" if r["control"] == "classical" else ""),
                     "real only": _pct(r["real_accuracy"]),
                     "synthetic": _pm(r["synthetic_accuracy"], r["synthetic_accuracy_std"]),
                     "control acc": _pm(r["control_accuracy"], r["control_accuracy_std"]),
                     "Δ acc [95 % t-CI] (pp)": f"{diff} {ci}", "p (fold t-test)": _num(r["p_value"], ".4f"),
                     "Δ 95 % CI, bootstrap (pp)": boot, "p (bootstrap)": _num(r["boot_p"], ".4f"),
                     "p Holm": _num(r["p_holm"], ".4f"), "pairs": str(r["n_pairs"])})
    return pd.DataFrame(rows)


def _collapsed_judges(gate: pd.DataFrame, trials: pd.DataFrame) -> list[str]:
    """The gate's judge trials (real-only, one per fold) that predicted one class for every test image: their
    fidelity scores describe the judge (every image gets that class), not the synthetic images."""
    out = []
    for clf, folds in collapsed_baselines(trials).items():
        for fold in folds:
            hit = gate[(gate["judge"].astype(str).str.startswith(f"{clf}__real__")) & (gate["fold"] == fold)]
            out += sorted(set(hit["judge"].astype(str)))
    return sorted(set(out))


def _fidelity_lead(gate: pd.DataFrame, cfg, trials: pd.DataFrame | None = None) -> str:
    judges = ", ".join(sorted(gate["judge"].astype(str).unique()))
    method = str(gate["filter"].iloc[0])
    value = gate["filter_value"].iloc[0]
    gate_txt = ("no gate (generate.filter: none): every trial takes the first images by index; the scores are shown "
                "for reading" if method == "none" else
                f"gate `{method} {value:g}`: the share kept is of every image scored (spares included); counts per "
                f"trial are topped up from the spares, so each trial still has its ratio's count")
    collapsed = _collapsed_judges(gate, trials) if trials is not None else []
    warn = (f" **Read with care:** {', '.join(collapsed)} predicted one class for every test image, so the scores it "
            "gives describe that judge (every image gets its one class), not the synthetic images; a better-trained "
            "judge (generate.filter_judge, more classify.epochs) is needed before these scores mean anything."
            if collapsed else "")
    return (f"Fidelity = the probability the fold's real-only judge ({judges}; best epoch) gives to the class the "
            f"image was prompted for. Low fidelity: the image may teach the wrong label. {gate_txt}.{warn}")


def _fmt_fidelity(gate: pd.DataFrame) -> pd.DataFrame:
    g = (gate.assign(adjective=gate["adjective"].astype(str))
         .groupby(["adjective", "class_name"], sort=True)
         .agg(n=("fidelity", "size"), median=("fidelity", "median"), mean=("fidelity", "mean"),
              low=("fidelity", lambda f: float((f < 0.5).mean())), kept=("kept", "mean")).reset_index())
    return pd.DataFrame({"adjective": [_adj_label(a) for a in g["adjective"]], "class": g["class_name"],
                         "images (all folds)": g["n"], "median fidelity": [_num(v) for v in g["median"]],
                         "mean fidelity": [_num(v) for v in g["mean"]],
                         "fidelity < 0.5 (%)": [_pct(v, 1) for v in g["low"]],
                         "kept by the gate (%)": [_pct(v, 1) for v in g["kept"]]})


def _fidelity_figure(gate: pd.DataFrame, classes: list[str], run_dir: str) -> Optional[str]:
    """Box plot of fidelity per adjective, one box per class, the individual images as dots over it."""
    adjs = sorted(gate["adjective"].astype(str).unique())
    fig = _figure(2.0 + 0.9 * len(adjs) * max(1, len(classes)) / 2, 3.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(classes))
    rng = np.random.default_rng(0)  # jitter of the dots only
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for j, cls in enumerate(classes):
        pos, data = [], []
        for i, adj in enumerate(adjs):
            v = gate.loc[(gate["adjective"].astype(str) == adj) & (gate["class_name"] == cls), "fidelity"].to_numpy(float)
            if len(v):
                pos.append(i + (j - (len(classes) - 1) / 2) * width)
                data.append(v)
        if not data:
            continue
        colour = colours[j % len(colours)]
        ax.boxplot(data, positions=pos, widths=width * 0.8, showfliers=False, patch_artist=True,
                   boxprops={"facecolor": "none", "edgecolor": colour}, medianprops={"color": colour})
        for p, v in zip(pos, data):
            ax.plot(p + rng.uniform(-width / 4, width / 4, len(v)), v, ".", ms=2, alpha=0.35, color=colour)
        ax.plot([], [], "s", color=colour, label=cls)
    if str(gate["filter"].iloc[0]) == "threshold":  # what the gate keeps: on or above the line
        ax.axhline(float(gate["filter_value"].iloc[0]), ls="--", lw=0.8, color="grey", label="threshold")
    ax.set_xticks(range(len(adjs)), [_adj_label(a) for a in adjs], rotation=45, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fidelity (prob. of prompted class)")
    ax.set_title("Label fidelity of synthetic images, by the fold's real-only judge", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, run_dir, "figures/fidelity.png")


def _selection_and_tests(t2: pd.DataFrame, cfg, n_test: int) -> tuple[str, list[str]]:
    """What was selected on what, from how many candidates, and what each test does and does not account for."""
    n_cand = sorted(set(int(v) for v in t2["n_settings_compared"])) if len(t2) else [0]
    cand = " or ".join(str(v) for v in n_cand)
    n_pairs = sorted(set(int(v) for v in t2["n_pairs"])) if len(t2) else [0]
    lead = (f"**Selection.** For each classifier the augmented setting shown is the (adjective, ratio) with the highest "
            f"mean **validation** accuracy over folds and repeats, chosen from {cand} candidates "
            f"({len(cfg.generate.adjectives)} adjectives x {len(cfg.generate.ratios)} ratios). Validation images are "
            f"each fold's held-out training fold; test images were never used for choosing. The same trained models give "
            f"the validation and the test scores, so the chosen setting's validation accuracy is optimistic (the best of "
            f"{cand} noisy scores); its test accuracy is not, but a gain that exists only for the winner among {cand} "
            f"candidates is the kind of finding that does not replicate.")
    items = [
        f"**Fold t-test** (scipy `ttest_rel`, columns ci_low/ci_high/t_statistic/p_value): the {'/'.join(map(str, n_pairs))} "
        f"(fold, repeat) pairs of test accuracy are treated as independent samples. It sees the variance of "
        f"training (which folds trained, the seeds) but not the test set's own sampling variance: every fold is scored "
        f"on the same {n_test} test images and the fold models share about three quarters of their training images, so "
        f"its p-values are anti-conservative.",
        f"**Paired bootstrap over test images** (boot_ci_low/boot_ci_high/boot_p, {cfg.report.bootstrap_samples:,} "
        f"draws, seed {cfg.report.seed}): each draw resamples the {n_test} test images with replacement and takes the "
        f"mean over (fold, repeat) pairs of the accuracy difference, augmented - real, on those images; 95 % percentile "
        f"interval, two-sided p = min(1, 2 min(share <= 0, share >= 0)). It accounts for the test set's sampling "
        f"variance, with the pairing (same images, same models); it holds the trained models fixed, so it does not "
        f"account for training variance (seeds, fold composition) beyond averaging over the pairs.",
        "**p Holm**: the bootstrap p-values Holm-adjusted over the classifiers of the table (a family of "
        f"{len(t2)}). Neither test nor Holm's correction accounts for the selection among the candidates above: "
        "the p-values compare the chosen setting as if it had been fixed in advance.",
        f"**Common random numbers**: trials of one classifier, fold and repeat start from the same initial weights and "
        f"data-order seed whatever the adjective or ratio, so a paired difference reflects the training data, not the "
        f"luck of the initialisation. classify.repeats = {cfg.classify.repeats}"
        + ("; rerun with repeats > 1 to confirm a finding with new seeds." if cfg.classify.repeats == 1 else "."),
    ]
    return lead, items


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def _stand_in_note(cfg) -> Optional[str]:
    """A sentence for runs whose images or model stand in for the real ones (the demo)."""
    from meddap.diffusion.base import PHANTOM_MODEL, TINY_MODEL

    parts = []
    if cfg.data.source == "phantom":
        parts.append("phantom images instead of ultrasound scans")
    if cfg.diffusion.base_model == TINY_MODEL:
        parts.append("a tiny Stable Diffusion with random weights (diffusion.base_model=builtin:tiny) instead of SD-1.4")
    elif cfg.diffusion.base_model == PHANTOM_MODEL:
        parts.append("a small Stable-Diffusion-shaped model pretrained on phantom scans (diffusion.base_model="
                     "builtin:phantom, docs/base-model.md) instead of SD-1.4")
    if not parts:
        return None
    return (f"This run uses {' and '.join(parts)}: its numbers show that the pipeline works end to end; they say "
            f"nothing about whether the method helps on real images.")


def _training_line(cfg, classifiers: list[str]) -> str:
    """How the classifiers were trained, one clause per group of classifiers with the same schedule
    (classify.per_model gives one classifier its own)."""
    groups: dict[tuple, list[str]] = {}
    for name in classifiers:
        c = cfg.classify.for_model(name)
        groups.setdefault((c.epochs, c.lr, c.batch_size), []).append(name)
    start = "from ImageNet weights" if cfg.classify.pretrained == "imagenet" else "from random initialisation"
    parts = [f"{', '.join(names)}: {epochs} epochs, lr {lr:g}, batch {batch}"
             for (epochs, lr, batch), names in groups.items()]
    own = " (classify.per_model)" if len(groups) > 1 else ""
    return f"Classifiers trained {start} with Adam; {'; '.join(parts)}{own}; the best epoch on validation kept."


def _fig1a_caveat(trials: Optional[pd.DataFrame], classifiers: list[str]) -> Optional[str]:
    """A warning under Figure 1(a) naming the classifiers whose real-only classifier put every test image
    in one class: its accuracy on a synthetic set is that class's share, whatever the images show."""
    if trials is None:
        return None
    collapsed = {c: f for c, f in collapsed_baselines(trials).items() if c in classifiers}
    if not collapsed:
        return None
    named = "; ".join(f"{c} (fold(s) {', '.join(map(str, f))})" for c, f in collapsed.items())
    return (f"**Read with care:** the real-only classifier of {named} predicted one class for every test "
            f"image: it did not learn the classes, so its column says nothing about the synthetic images "
            f"(it scores the share of that class). Columns of classifiers that learned are label fidelity.")


def _optional(path: str) -> Optional[pd.DataFrame]:
    return storage.read_parquet(path) if storage.exists(path) else None


def run(cfg) -> dict:
    lay = RunLayout(cfg.run_dir)
    run_dir = cfg.run_dir
    all_trials = load_trials(run_dir)
    trials = study_trials(all_trials)  # control trials appear in Table 4 only
    gate = _optional(lay.summary("fidelity_gate"))
    fid = _optional(lay.summary("fid"))
    mem = _optional(lay.summary("memorization"))
    synth_eval = _optional(lay.summary("synthetic_eval"))
    synth = _optional(lay.synthetic_manifest)
    manifest = _optional(lay.manifest)
    predictions = _optional(lay.summary("predictions"))
    rep = Report(run_dir)
    skipped: list[str] = []
    boot = {"samples": cfg.report.bootstrap_samples, "seed": cfg.report.seed}

    # -- tables (Table 1 and 2 are the report's core: their errors stop it) ----------------------
    fid_dims = primary_dims(cfg.fid, fid)  # the feature size Table 1, the FID table and figure read
    t1 = table1(trials, fid, dims=fid_dims)
    t2 = table2(trials, predictions, **boot)
    if t2.attrs.get("note"):
        rep.note(t2.attrs["note"])
    best = best_settings(trials)
    try:
        t3 = table3(trials, predictions, **boot)
        t3_full = table3(trials, predictions, **boot, full=True)
        if t3.attrs.get("note"):
            rep.note(t3.attrs["note"])
    except MeddapError as e:  # e.g. no real-only external rows: Tables 1-2 still stand
        t3 = t3_full = table3(trials.iloc[0:0])
        t3.attrs["note"] = f"Table 3 not computed: {e}"
        rep.note(t3.attrs["note"])
    try:
        t4 = table4(all_trials, predictions, **boot)
    except MeddapError as e:  # Tables 1-3 still stand
        t4 = pd.DataFrame(columns=TABLE4_COLUMNS)
        t4.attrs["note"] = f"Table 4 not computed: {e}"
    if t4.attrs.get("note") and (cfg.classify.controls or len(t4)):
        rep.note(t4.attrs["note"])
    for clf, folds in collapsed_baselines(trials).items():
        rep.note(f"{clf}: the real-only baseline predicted one class for every test image in fold(s) "
                 f"{', '.join(map(str, folds))}, so it scores chance there: a difference against it measures a "
                 f"baseline that did not train, not what the synthetic images add. Table 4's duplicate control "
                 f"(as many extra real images) tells the two apart; more classify.epochs may train it.")
    crn = crn_violations(all_trials)
    if crn:
        rep.note(f"{len(crn)} (classifier, fold, repeat) cell(s) hold trials trained from different seeds "
                 f"({', '.join(crn[:3])}{' ...' if len(crn) > 3 else ''}): they come from a sweep before common random "
                 f"numbers, so their paired differences carry the variance of different initial weights. Delete "
                 f"those trials' folders under trials/ and rerun the sweep to train them alike.")
    f1a = None
    if synth_eval is None:
        rep.note("summary/synthetic_eval.parquet is absent: Figure 1(a) (real-only classifiers on the synthetic "
                 "sets) was not produced; the sweep writes it.")
    elif synth_eval.empty:
        rep.note("summary/synthetic_eval.parquet has no rows: Figure 1(a) was not produced.")
    else:
        f1a = fig1a(synth_eval)
    storage.write_parquet(t1, lay.summary("table1"))
    storage.write_parquet(t2, lay.summary("table2"))
    storage.write_parquet(t3, lay.summary("table3"))
    storage.write_parquet(t3_full, lay.summary("table3_full"))
    storage.write_parquet(t4, lay.summary("table4"))
    storage.write_parquet(f1a if f1a is not None else pd.DataFrame(
        columns=["classifier", "adjective", "accuracy_mean", "accuracy_std", "n_folds", "n_images"]),
        lay.summary("fig1a"))

    # -- FID status ------------------------------------------------------------------------------
    fid_rows = (fid[fid["dims"] == fid_dims] if fid is not None and "dims" in fid else fid)
    fid_all = fid_rows[fid_rows["class_name"] == "all"] if fid is not None else None
    if fid is None:
        rep.note("summary/fid.parquet is absent: run `python -m meddap fid`; the FID columns are empty.")
    else:
        below = fid["status"].str.startswith("fid_not_computed")
        if below.any():
            rep.note(f"Per-class FID not computed for {int(below.sum())} of {len(fid)} rows: fewer images per class "
                     f"than feature dimensions (the covariance would be singular); their KID is given.")
        bad = fid[(fid["status"] != "ok") & ~below]
        for status in bad["status"].unique():
            rep.note(f"FID/KID missing for {int((bad['status'] == status).sum())} of {len(fid)} rows: {status}")

    # -- figures ---------------------------------------------------------------------------------
    heatmaps = _accuracy_heatmaps(t1, run_dir)
    fid_fig = _fid_figure(fid_all, run_dir) if fid_all is not None else None
    if fid_all is not None and fid_fig is None:
        rep.note("No FID value was computed, so the FID-per-adjective figure was not drawn.")
    contacts = []
    if synth is None:
        rep.note("The synthetic manifest is absent: no contact sheets (run `python -m meddap generate`).")
    else:
        contacts = _contact_sheets(synth.assign(adjective=synth["adjective"].fillna("").astype(str)),
                                   list(cfg.data.classes), cfg.report.contact_sheet_per_cell, run_dir, skipped)
    fig1a_fig = _fig1a_figure(f1a, best, run_dir, len(cfg.data.classes)) if f1a is not None and len(f1a) else None
    fidelity_fig = _fidelity_figure(gate, list(cfg.data.classes), run_dir) if gate is not None and len(gate) else None
    if cfg.generate.filter != "none" and fidelity_fig is None:
        rep.note("generate.filter is on but summary/fidelity_gate.parquet is absent or empty: the fidelity figure "
                 "was not drawn (the sweep writes it from the real-only judges' scores).")
    gradcams = []
    if manifest is None:
        rep.note("The manifest is absent: no Grad-CAM figures (run `python -m meddap prepare`).")
    else:
        gradcams = _gradcam_figures(trials, best, manifest, cfg.report.gradcam_images, run_dir, skipped)

    # -- the document ----------------------------------------------------------------------------
    n_folds = trials["fold"].nunique()
    rep.h(1, f"meddap report: {cfg.name}")
    summary = answer(t2, None if t3.empty else t3, n_folds=n_folds, n_repeats=cfg.classify.repeats,
                     n_settings=len(cfg.generate.adjectives) * len(cfg.generate.ratios),
                     synthetic_data_note=_stand_in_note(cfg))
    rep.h(2, "Summary")
    rep.p(f"**Question.** {summary.question}")
    rep.p("**Answer**, per classifier: accuracy trained on real images only -> on real plus its best synthetic "
          "setting (chosen on validation accuracy), and the difference:")
    rep.items(summary.answers)
    rep.p("**What the numbers mean, and what they do not.**")
    meaning = list(summary.meaning)
    for clf, folds in collapsed_baselines(trials).items():
        meaning.append(f"{clf}'s real-only baseline predicted one class for every test image (fold(s) "
                       f"{', '.join(map(str, folds))}): a difference against it measures a baseline that did not "
                       f"train, not what the synthetic images add.")
    if len(t4):
        meaning.append("Table 4 sets each synthetic setting against equal-budget controls (as many extra duplicated "
                       "real images, or classically transformed ones): a gain that the controls match is a gain "
                       "from more training, not from the synthetic images.")
    rep.items(meaning)
    rep.h(2, "Details")
    classifiers = sorted(trials["classifier"].unique())
    rep.p(f"Run directory `{run_dir}`; classes {', '.join(cfg.data.classes)}; {n_folds} fold(s); "
          f"classifiers {', '.join(classifiers)}; written "
          f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Accuracies and other metrics are "
          f"percentages, mean ± standard deviation over folds. {_training_line(cfg, classifiers)}")
    rep.h(2, "Table 1: test accuracy by adjective and synthetic ratio")
    t1_fmt, baselines = _fmt_table1(t1)
    rep.p("FID/KID: synthetic set vs the same fold's real training images, all classes, mean over folds "
          + (f"on {_features_label(fid)} features " if fid is not None and len(fid) else "")
          + "(n/a: not computed, see notes). Bold: each classifier's best test cell (for reading only; the best "
          "setting of Table 2 is chosen on validation accuracy).")
    filters = sorted(set(t1.loc[t1["adjective"].notna(), "filter"])) if "filter" in t1 else ["none"]
    rep.p("Label-fidelity gate of the synthetic trials (column `filter` of summary/table1.parquet): "
          + ", ".join(f"`{f}`" for f in filters) + (" (no gate: the first images by index)." if filters == ["none"]
                                                     else " (docs/controls.md)."))
    rep.table(t1_fmt)
    rep.p("Real-only baselines (test accuracy): " + "; ".join(baselines) + ".")
    for rel, cap in heatmaps:
        rep.img(rel, cap)
    rep.h(2, "Table 2: real only vs best augmented setting (test set)")
    if not cfg.diffusion.lora.per_fold:
        rep.p("**Warning: diffusion.lora.per_fold is false.** One adapter was fine-tuned on every training image, "
              "validation folds included, so each fold's synthetic images derive from its own validation images: "
              "validation accuracy (which chose the setting below) is optimistic for augmented trials, and the "
              "comparison with the real-only baseline is not leakage-safe. Rerun with per_fold: true for "
              "publishable numbers.")
    test_rows = trials.loc[trials["eval_set"] == "test"]
    n_test = int(test_rows["n_eval"].max()) if "n_eval" in test_rows and len(test_rows) else 0
    lead, items = _selection_and_tests(t2, cfg, n_test)
    rep.p(lead)
    rep.items(items)
    rep.table(_fmt_compare(t2, ["accuracy", "sensitivity", "specificity", "precision", "f1"]))
    rep.h(2, "Table 3: robustness on the external set (Dataset B accuracy)")
    if t3.empty:
        rep.p("Not available: " + (t3.attrs.get("note") or "see notes"))
    else:
        n_used, n_excl = int(t3["n_used"].iloc[0]), int(t3["n_excluded"].iloc[0])
        n_flag = int(manifest["a_overlap"].sum()) if manifest is not None and "a_overlap" in manifest else None
        excluded = (f"{n_excl} Dataset B images that copy a Dataset A image (rotated, mirrored, rescaled or sharpened "
                    f"copies included; manifest column `a_overlap`, pairs in data/audit.parquet) were left out "
                    f"(data.external.exclude_overlap)" if n_excl else
                    "no Dataset B image was left out" + (f" ({n_flag} copy a Dataset A image and are included: "
                                                         f"data.external.exclude_overlap is false)" if n_flag else ""))
        rep.p(f"Same chosen settings as Table 2 (validation accuracy on Dataset A); same tests, the bootstrap "
              f"resampling the Dataset B images. n used = {n_used} images; {excluded}.")
        rep.table(_fmt_compare(t3, ["accuracy"]))
        if n_excl and not t3_full.empty:
            rep.h(3, "Table 3 on all of Dataset B (copies of Dataset A images included)")
            rep.p(f"n = {int(t3_full['n_used'].iloc[0])} images. For comparison only: copies of training images "
                  f"flatter the score.")
            rep.table(_fmt_compare(t3_full, ["accuracy"]))
    if cfg.classify.controls or len(t4):
        rep.h(2, "Table 4: synthetic images vs equal-budget controls (test set)")
        if t4.empty:
            rep.p("Not available: " + (t4.attrs.get("note") or "see notes"))
        else:
            rep.p("Per classifier, at the ratio Table 2 chose on validation accuracy, each adjective's synthetic trials "
                  "against controls that add exactly as many images per class from the fold's real training images: "
                  "`classical` = the real images through the adjective's classical twin (bright -> brightness, "
                  "sheared -> shear, ...; adjectives without a twin have none), `duplicate` = the real images again. "
                  "Δ = synthetic - control test accuracy, paired by (fold, repeat) with common random numbers; the "
                  "same tests as Table 2, p Holm-adjusted over all "
                  f"{len(t4)} comparisons of this table. ✓ = the adjective Table 2 selected.")
            rep.table(_fmt_table4(t4))
    if gate is not None and len(gate):
        rep.h(2, "Label fidelity of the synthetic images (the fold's real-only classifier)")
        rep.p(_fidelity_lead(gate, cfg, all_trials))
        collapsed = _collapsed_judges(gate, all_trials)
        if collapsed:
            rep.note(f"Label-fidelity judge(s) {', '.join(collapsed)} predicted one class for every test image: their "
                     f"fidelity scores (summary/fidelity_gate.parquet) describe the judge, not the synthetic images.")
        rep.table(_fmt_fidelity(gate))
        if fidelity_fig:
            rep.img(fidelity_fig, "Label fidelity (judge's probability of the prompted class) per adjective and class")
    rep.h(2, "FID, KID and memorisation")
    if fid_all is not None and len(fid_all):
        overall = fid[fid["class_name"] == "all"].sort_values(["dims", "fold", "adjective"], ascending=[False, True, True])
        rep.p("Each synthetic set against its fold's real training images at equal N (the larger side subsampled "
              "per class to the smaller's count, so both share one class mix), both read at the generation "
              f"resolution ({cfg.generate_resolution} px) with one filter, in {cfg.classify.channels} as the "
              "classifiers see them. `dims` labels the feature size; "
              f"dims = {fid_dims} is the one Table 1 shows.")
        avail = overall["n_real_available"] if "n_real_available" in overall else overall["n_real"]
        rep.table(pd.DataFrame({
            "fold": overall["fold"], "adjective": [_adj_label(a) for a in overall["adjective"]],
            "features": overall["features"] if "features" in overall else "inception",
            "dims": overall["dims"], "FID": [_num(v) for v in overall["fid"]],
            "KID": [_num(v, ".4f") for v in overall["kid"]],
            "N (each side)": overall["n_real"], "real available": avail,
            "synthetic available": overall.get("n_synthetic_available", overall["n_synthetic"]),
            "status": [s if len(s) < 40 else s[:37] + "..." for s in overall["status"]]}))
        rep.p(f"Features: {_features_label(overall)}. An FID is a distance in one feature space: values from "
              "different extractors (or dims) are different quantities and are never compared here.")
        features = set(overall["features"].astype(str)) if "features" in overall else {"inception"}
        if features == {"inception"}:
            rep.p("The paper's FID values (0.26 to 0.66) are far below what 2048-d Inception features give; they look "
                  "like low-dimensional features (fid.extra_dims: [64] reports those beside, labelled dims 64).")
        else:
            rep.p("These are domain-feature FIDs (the practice of RadImageNet-based FID in medical imaging): they "
                  "cannot be set beside the paper's Inception FIDs.")
        rep.p("Compare FIDs only at equal features, dims and N. With fewer images than dimensions the covariance "
              "is singular and FID is biased upwards; per-class FID is then not computed.")
    if fid_fig:
        rep.img(fid_fig, "Overall FID and KID per adjective (mean over folds)")
    if mem is not None and len(mem):
        m = (mem.groupby(["fold", "adjective"]).agg(n=("flagged", "size"), flagged=("flagged", "sum"),
                                                    median_distance=("distance", "median"),
                                                    threshold=("threshold_distance", "first")).reset_index())
        rep.p(f"Memorisation: synthetic images closer to a real training image (same feature space) than "
              f"{cfg.fid.memorization_threshold} x the median real-real nearest-neighbour distance are flagged "
              f"as near copies ({int(mem['flagged'].sum())} of {len(mem)}).")
        table = pd.DataFrame({"fold": m["fold"], "adjective": [_adj_label(a) for a in m["adjective"]],
                              "flagged / images": [f"{int(f)} / {int(n)}" for f, n in zip(m["flagged"], m["n"])],
                              "median NN distance": [_num(v) for v in m["median_distance"]],
                              "threshold": [_num(v) for v in m["threshold"]]})
        if "source_distance" in mem.columns and mem["source_distance"].notna().any():
            # img2img: each image against the real image it started from (docs/controls.md)
            src = (mem.assign(_s=mem["source_flagged"].fillna(False).astype(bool),
                              _n=mem["source_distance"].notna())
                   .groupby(["fold", "adjective"])[["_s", "_n"]].sum().reset_index())
            table["near copies of own source / img2img images"] = [
                f"{int(a)} / {int(b)}" for a, b in zip(src["_s"], src["_n"])]
            rep.p("img2img images are also compared with their own source image, by the same threshold: many "
                  "near copies mean generate.strength is too low for the images to differ from the real ones.")
        rep.table(table)
        if synth is not None and manifest is not None:
            rel = _memorization_figure(mem, synth, manifest, cfg.report.contact_sheet_per_cell, run_dir, skipped)
            rep.img(rel, "The synthetic images closest to a real training image, beside it")
    elif fid is not None:
        rep.p("Memorisation check: not computed (it needs the same features as FID; see notes).")
    ranks = _optional(lay.summary("rank_selection"))
    if ranks is not None and len(ranks):
        rep.h(2, "LoRA rank selection")
        chosen = sorted(set(ranks.loc[ranks["chosen"].astype(bool), "rank"].tolist()))
        rep.p("Each rank was fine-tuned (one adapter on the whole training pool), a no-adjective set the size of "
              "the training set was generated, and its FID against the real training images decided "
              f"(lowest wins; KID breaks a tie or stands in when FID is missing). Chosen rank: "
              f"{', '.join(str(r) for r in chosen) or 'none'}.")
        rep.table(pd.DataFrame({
            "rank": ranks["rank"], "fold": ranks["fold"], "FID": [_num(v) for v in ranks["fid"]],
            "KID": [_num(v, ".4f") for v in ranks["kid"]], "dims": ranks["dims"],
            "chosen": ["yes" if c else "" for c in ranks["chosen"]],
            "status": [str(x) if len(str(x)) < 40 else str(x)[:37] + "..." for x in ranks["status"]]}))
    fidelity = _optional(lay.summary("fidelity"))
    if fidelity is not None and len(fidelity):
        _fidelity_section(rep, fidelity, list(cfg.data.classes))
    rep.h(2, "Figure 1(a): real-only classifiers on each synthetic set")
    if f1a is not None and len(f1a):
        piv = f1a.pivot(index="adjective", columns="classifier", values="accuracy_mean")
        rep.table(pd.DataFrame({"adjective": [_adj_label(a) for a in piv.index],
                                **{c: [_pct(v) for v in piv[c]] for c in piv.columns}}))
        caveat = _fig1a_caveat(trials, list(piv.columns))
        if caveat:
            rep.p(caveat)
        rep.img(fig1a_fig, "Accuracy (%) of real-only classifiers on each adjective's synthetic images")
    else:
        rep.p("Not available (see notes).")
    rep.h(2, "Synthetic samples")
    for rel, cap in contacts:
        rep.img(rel, cap)
    if not contacts:
        rep.p("None (see notes).")
    rep.h(2, "Grad-CAM: real only vs best augmented (fold 0)")
    for rel, cap in gradcams:
        rep.img(rel, cap)
    if not gradcams:
        rep.p("None (see notes and skipped items).")
    rep.h(2, "Notes: what is missing and why")
    rep.items(rep.notes or ["Nothing is missing."])
    if skipped:
        rep.h(3, "Skipped items")
        rep.items(skipped)

    storage.write_text(lay.path("report.md"), rep.markdown())
    storage.write_text(lay.path("report.html"), rep.html())
    figures = [b[1] for b in rep.blocks if b[0] == "img"]
    logs.say(f"[report] {lay.path('report.md')} and report.html: {len(figures)} figures, {len(rep.notes)} notes, "
             f"{len(skipped)} skipped items.")
    for line in summary.console:
        logs.say(f"[report] {line}")
    for n in rep.notes:
        logs.say(f"[report] note: {n}")
    for s in skipped:
        logs.say(f"[report] skipped: {s}")
    return {"figures": figures, "notes": list(rep.notes), "skipped": skipped}
