"""The report's first screen: the question, the answer per classifier with its interval, and what the
numbers do and do not mean. Plain text from Table 2 and Table 3 (meddap.report), nothing recomputed.

Which interval: the paired bootstrap (`boot_ci_low`, `boot_ci_high`, `boot_p`, with `p_holm` and
`n_settings_compared` when the tables have them) is preferred; otherwise the t-interval over folds
(`ci_low`, `ci_high`, `p_value`). A row whose interval is missing (one fold, say) gets no verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

__all__ = ["Answer", "answer", "QUESTION"]

QUESTION = ("Does adding synthetic images from the LoRA-adapted Stable Diffusion to the real training images "
            "raise a classifier's test accuracy, compared with training on the real images alone?")


@dataclass
class Answer:
    question: str
    answers: list[str] = field(default_factory=list)      # one line per classifier and evaluation set
    meaning: list[str] = field(default_factory=list)      # what the numbers do and do not mean
    console: list[str] = field(default_factory=list)      # one short line per classifier, for the terminal


def _ok(v) -> bool:
    return v is not None and not pd.isna(v)


def _interval(row: dict) -> tuple[Optional[float], Optional[float], Optional[float], str]:
    """(low, high, p, what) with the bootstrap preferred when the table has it."""
    if _ok(row.get("boot_ci_low")) and _ok(row.get("boot_ci_high")):
        p = row.get("p_holm") if _ok(row.get("p_holm")) else row.get("boot_p")
        what = "paired bootstrap" + (", Holm-adjusted p" if _ok(row.get("p_holm")) else "")
        return float(row["boot_ci_low"]), float(row["boot_ci_high"]), (float(p) if _ok(p) else None), what
    if _ok(row.get("ci_low")) and _ok(row.get("ci_high")):
        p = row.get("p_value")
        return float(row["ci_low"]), float(row["ci_high"]), (float(p) if _ok(p) else None), "t-interval over folds"
    return None, None, None, ""


def _pp(v: float) -> str:
    return f"{100 * v:+.1f}"


def _p_text(p: float, row: dict) -> str:
    """'p = 0.012'; a bootstrap p of 0 means no draw crossed 0: it is below 1 / draws, not zero."""
    draws = row.get("boot_samples")
    if p == 0 and _ok(draws) and draws:
        return f"p < {1 / float(draws):.1g}"
    return f"p = {p:.3g}"


def _setting(row: dict) -> str:
    adj = row.get("adjective")
    return f"+{float(row['ratio']):.0%} synthetic ({'no adjective' if adj == '' else repr(adj)})"


def _verdict(low: Optional[float], high: Optional[float]) -> str:
    if low is None:
        return "no interval (it needs two or more folds): cannot tell"
    if low > 0:
        return "higher with synthetic images"
    if high < 0:
        return "lower with synthetic images"
    return "no clear difference (the interval includes 0)"


def _lines(table: pd.DataFrame, where: str) -> tuple[list[str], dict[str, str], set[str]]:
    """Report lines, {classifier: short console text}, and the kinds of interval used."""
    answers, short, kinds = [], {}, set()
    for row in table.to_dict("records"):
        diff = row.get("mean_difference")
        low, high, p, what = _interval(row)
        kinds.add(what)
        ci = f" [95 % CI {_pp(low)}, {_pp(high)}]" if low is not None else ""
        pv = (f", {'Holm-adjusted ' if 'Holm' in what else ''}{_p_text(p, row)}" if p is not None else "")
        d = f"{_pp(diff)} pp" if _ok(diff) else "n/a"
        real, aug = row.get("real_accuracy"), row.get("aug_accuracy")
        acc = f"{100 * real:.1f} % -> {100 * aug:.1f} %, " if _ok(real) and _ok(aug) else ""
        verdict = _verdict(low, high)
        answers.append(f"**{row['classifier']}**, {where}: real only -> real {_setting(row)}: {acc}{d}{ci}{pv}; "
                       f"{verdict}.")
        short[row["classifier"]] = f"{where} {d}{ci}: {verdict.split(' (')[0]}"
    return answers, short, {k for k in kinds if k}


def answer(t2: pd.DataFrame, t3: Optional[pd.DataFrame], *, n_folds: int, n_settings: Optional[int] = None,
           synthetic_data_note: Optional[str] = None, n_repeats: int = 1) -> Answer:
    """The summary of Table 2 (test set) and Table 3 (external set, when present).

    n_settings: augmented (adjective, ratio) settings each best one was chosen from (the tables'
    `n_settings_compared` wins when present). synthetic_data_note: a sentence for runs whose data or
    model cannot speak to the method (the demo's phantom images and phantom-pretrained base model).
    """
    out = Answer(QUESTION)
    answers, short, kinds = _lines(t2, "test set")
    out.answers += answers
    external: dict[str, str] = {}
    if t3 is not None and len(t3):
        a3, external, k3 = _lines(t3, "external set")
        out.answers += a3
        kinds |= k3
    out.console = [f"{clf}: {text}" + (f"; {external[clf]}" if clf in external else "") for clf, text in short.items()]
    if "n_settings_compared" in t2.columns and t2["n_settings_compared"].notna().any():
        n_settings = int(t2["n_settings_compared"].dropna().max())

    how = " and ".join(sorted(kinds)) or "no interval could be computed"
    reps = f" x {n_repeats} repeats" if n_repeats > 1 else ""
    out.meaning.append(
        f"Each difference is the augmented classifier's accuracy minus the real-only one's, in percentage points "
        f"(pp), averaged over {n_folds} fold(s){reps}, with its 95 % interval ({how}). Test set: Dataset A's held-out "
        f"test split; external set: Dataset B, images from elsewhere (robustness).")
    chosen = f" among {n_settings} settings" if n_settings else ""
    adjusted = (" p-values are Holm-adjusted across the comparisons." if any("Holm" in k for k in kinds)
                else " p-values are not adjusted for comparing several classifiers.")
    out.meaning.append(
        f"Each classifier's augmented setting (adjective, ratio) was chosen on validation accuracy{chosen}, never "
        f"on the test scores shown. Validation and test scores come from the same trained models, so the "
        f"choice can still flatter the chosen setting a little; Table 2's bootstrap interval does not account "
        f"for the selection." + adjusted)
    out.meaning.append(
        "An interval that includes 0 means these data cannot tell the two apart; it is not evidence that "
        "augmentation does nothing. Few folds and small test sets give wide intervals.")
    out.meaning.append(
        "These are accuracies on held-out images of the same datasets, not clinical performance.")
    if synthetic_data_note:
        out.meaning.append(synthetic_data_note)
    return out
