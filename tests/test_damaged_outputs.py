"""Damaged outputs (issue 13 part 5): what a stage record finds, what goes with a damaged file so its
stage remakes it, and that a write failing half-way (a full disk) leaves no half file under a final
name. The real generate stage's case is in tests/generate/test_damaged.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from meddap import storage
from meddap.config import load_config
from meddap.layout import RunLayout
from meddap.stages import state

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path):
    return load_config("demo", [f"run_dir={tmp_path / 'run'}", "diffusion.lora.per_fold=false"])


def test_truncated_safetensors_and_trial_parts_are_found_with_their_completion_markers(tmp_path):
    from safetensors.torch import save_file

    cfg = _cfg(tmp_path)
    lay = RunLayout(cfg.run_dir)
    storage.write_parquet(pd.DataFrame({"image_id": ["a"]}), lay.manifest)
    adapter = Path(lay.adapter_dir(-1))
    adapter.mkdir(parents=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(adapter / "pytorch_lora_weights.safetensors"))
    (adapter / "adapter.json").write_text("{}")
    state.write_record(cfg, "finetune", 1.0)
    part = Path(lay.path("trials", "t1"))
    part.mkdir(parents=True)
    storage.write_parquet(pd.DataFrame({"x": range(100)}), str(part / "predictions.parquet"))
    storage.write_parquet(pd.DataFrame({"trial_id": ["t1"]}), str(part / "trials.parquet"))
    storage.write_parquet(pd.DataFrame({"trial_id": ["t1"]}), lay.summary("trials"))
    state.write_record(cfg, "sweep", 1.0)
    assert state.check_stage(cfg, "finetune").state == "done" and state.check_stage(cfg, "sweep").state == "done"

    w = adapter / "pytorch_lora_weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    st = state.check_stage(cfg, "finetune")
    assert st.state == "damaged" and st.damaged[0].startswith("adapters/all/pytorch_lora_weights.safetensors: 200 bytes")
    # The weights go, and adapter.json with them: it marks the adapter complete, so it must be retrained.
    assert sorted(state.remove_damaged(cfg, st)) == ["adapters/all/adapter.json",
                                                     "adapters/all/pytorch_lora_weights.safetensors"]
    (part / "predictions.parquet").unlink()
    st = state.check_stage(cfg, "sweep")
    assert st.damaged == ["trials/t1/predictions.parquet: missing"]
    assert state.remove_damaged(cfg, st) == ["trials/t1/trials.parquet"]  # the trial runs again


def test_record_keeps_size_and_sha256_of_each_output(tmp_path):
    cfg = _cfg(tmp_path)
    lay = RunLayout(cfg.run_dir)
    storage.write_parquet(pd.DataFrame({"image_id": ["a", "b"]}), lay.manifest)
    rec = state.write_record(cfg, "prepare", 0.1)
    size, digest = rec["outputs"]["data/manifest.parquet"]
    assert size == os.path.getsize(lay.manifest) and digest == storage.sha256(lay.manifest)


_FULL_DISK = r"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG, as ENOSPC would
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
import pandas as pd, torch
from meddap import storage
out = sys.argv[1]
for name, write in [
    ("blob.bin", lambda p: storage.write_bytes(p, os.urandom(1 << 20))),
    ("table.parquet", lambda p: storage.write_parquet(pd.DataFrame({"x": range(200000)}), p)),
    ("model.pt", None),
]:
    try:
        if name == "model.pt":
            with storage.open_output(os.path.join(out, name)) as f:
                torch.save({"w": torch.randn(100000)}, f)
        else:
            write(os.path.join(out, name))
        print(name, "WRITTEN")
    except (OSError, RuntimeError) as e:  # torch.save reports the short write as a RuntimeError
        print(name, "FAILED", type(e).__name__)
"""


def test_a_write_that_fails_half_way_leaves_no_half_file(tmp_path):
    """A file-size limit makes the kernel fail the write after 64 KiB, as a full disk does."""
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([sys.executable, "-c", _FULL_DISK, str(out)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line.split()[1] for line in res.stdout.split("\n") if line] == ["FAILED"] * 3, res.stdout
    assert sorted(os.listdir(out)) == [], "no final file and no temp file left behind"


def test_generate_is_invalidated_when_an_adapters_class_words_change(tmp_path):
    """The learned class words are an input of generate like the LoRA weights: other words, other images.
    A record without the file (class_words off, or a run from before the option) stays done."""
    from safetensors.torch import save_file

    from meddap.diffusion.class_words import CLASS_WORDS_NAME

    cfg = _cfg(tmp_path)
    lay = RunLayout(cfg.run_dir)
    storage.write_parquet(pd.DataFrame({"image_id": ["a"]}), lay.manifest)
    adapter = Path(lay.adapter_dir(-1))
    adapter.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(adapter / "pytorch_lora_weights.safetensors"))
    (adapter / "adapter.json").write_text("{}")
    storage.write_parquet(pd.DataFrame({"image_id": ["s"]}), lay.synthetic_manifest)
    state.write_record(cfg, "generate", 1.0)
    assert state.check_stage(cfg, "generate").state == "done"

    words = adapter / CLASS_WORDS_NAME
    save_file({"benign</w>": torch.zeros(8)}, str(words))
    st = state.check_stage(cfg, "generate")
    assert st.state == "invalidated" and st.changed == [f"input adapters/all/{CLASS_WORDS_NAME}: (not recorded) -> "
                                                        f"{state.stage_inputs(cfg, 'generate')[f'adapters/all/{CLASS_WORDS_NAME}']!r}"]
    state.write_record(cfg, "generate", 1.0)
    assert state.check_stage(cfg, "generate").state == "done"
    save_file({"benign</w>": torch.ones(8)}, str(words))
    st = state.check_stage(cfg, "generate")
    assert st.state == "invalidated" and st.changed[0].startswith(f"input adapters/all/{CLASS_WORDS_NAME}: ")
