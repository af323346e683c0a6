"""The run directory's layout: every path a stage reads or writes, in one place.

run_dir/
  data/manifest.parquet, data/audit.parquet          prepare
  models/tiny-sd/                                    builtin tiny base model (diffusion.base_model=builtin:tiny)
  adapters/fold-<k>/ | adapters/all/                 finetune (pytorch_lora_weights.safetensors, adapter.json, loss.parquet)
  synthetic/manifest.parquet, synthetic/<adapter>/<adjective>/<class>/<index>.png, synthetic/contact-<adapter>.png
  summary/{trials,predictions,fid,table1,table2,table3,table3_full,fig1a,rank_selection}.parquet
  figures/*.png, report.md, report.html              report
  ray/                                               Ray Train / Tune storage (checkpoints)
  stages/<stage>.json                                what each stage ran with (config + input hashes)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunLayout", "adjective_slug", "adapter_name"]


def adjective_slug(adjective: str) -> str:
    """Folder-safe name of an adjective; the empty (no-adjective) prompt is 'none'."""
    return adjective.replace(" ", "_") if adjective else "none"


def adapter_name(fold: int) -> str:
    """'fold-<k>' for a per-fold adapter, 'all' for the shared one (fold -1)."""
    return "all" if fold < 0 else f"fold-{fold}"


@dataclass(frozen=True)
class RunLayout:
    run_dir: str

    def path(self, *parts: str) -> str:
        from meddap.storage import join  # pyarrow: not at import, so config checks run without it (bench gpu)

        return join(self.run_dir, *parts)

    # prepare
    @property
    def manifest(self) -> str:
        return self.path("data", "manifest.parquet")

    @property
    def audit(self) -> str:
        return self.path("data", "audit.parquet")

    # base model / finetune
    @property
    def tiny_model(self) -> str:
        return self.path("models", "tiny-sd")

    def adapter_dir(self, fold: int) -> str:
        return self.path("adapters", adapter_name(fold))

    # generate
    @property
    def synthetic_dir(self) -> str:
        return self.path("synthetic")

    @property
    def synthetic_manifest(self) -> str:
        return self.path("synthetic", "manifest.parquet")

    # sweep / fid / report
    def summary(self, name: str) -> str:
        return self.path("summary", name if name.endswith(".parquet") else name + ".parquet")

    @property
    def figures(self) -> str:
        return self.path("figures")

    @property
    def ray_storage(self) -> str:
        return self.path("ray")

    def stage_record(self, stage: str) -> str:
        return self.path("stages", f"{stage}.json")
