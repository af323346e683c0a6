"""Draw docs/images/pipeline.png, the README's picture of the study (stages and the files between them).

    python tools/draw_pipeline.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "pipeline.png"

# (stage, what runs it, what it writes)
STAGES = [
    ("prepare", "leakage audit,\nsplits + folds", "manifest.parquet"),
    ("finetune", "USLoRA per fold\nRay Train", "adapters/fold-k"),
    ("generate", "adjective prompts\nRay Data", "synthetic PNGs"),
    ("fid", "FID / KID /\nmemorisation", "fid.parquet"),
    ("sweep", "classifier x adj x\nratio x fold, Ray Tune", "trials.parquet"),
    ("report", "tables 1-3, stats,\nfigures", "report.html"),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 2.9), dpi=110)
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 2.9)
    ax.axis("off")
    w, gap = 1.62, 0.36
    x0 = (12 - (len(STAGES) * w + (len(STAGES) - 1) * gap)) / 2
    colours = ["#dbe9f6", "#fde2c8", "#fde2c8", "#e4f1dc", "#e9e0f3", "#f3f3f3"]
    for i, (name, how, out) in enumerate(STAGES):
        x = x0 + i * (w + gap)
        ax.add_patch(FancyBboxPatch((x, 1.15), w, 1.25, boxstyle="round,pad=0.03,rounding_size=0.12",
                                    fc=colours[i], ec="#555555", lw=1.1))
        ax.text(x + w / 2, 2.12, name, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x + w / 2, 1.6, how, ha="center", va="center", fontsize=8.6, color="#333333")
        ax.text(x + w / 2, 0.85, out, ha="center", va="center", fontsize=8.4, family="monospace",
                color="#1f4e79")
        if i:
            ax.add_patch(FancyArrowPatch((x - gap + 0.02, 1.78), (x - 0.02, 1.78), arrowstyle="-|>",
                                         mutation_scale=14, color="#555555", lw=1.3))
    ax.text(6, 0.3, "real images + base Stable Diffusion  ->  files on disk under run_dir, one way, "
                    "each stage resumable  ->  does synthetic data help the classifiers?",
            ha="center", va="center", fontsize=9.2, style="italic", color="#444444")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, bbox_inches="tight", facecolor="white")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
