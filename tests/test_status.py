"""`python -m meddap status` and the half-finished-stage message, on a run built by hand: a real
prepare (phantom, a few seconds), then adapter, generate and sweep outputs written as the stages
write them, and stage records in every state. No Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from meddap import storage
from meddap.cli import main
from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stages import pipeline, state
from meddap.stages.sweep import build_grid, grid_size
from meddap.status import resume_overrides, stage_progress, status_lines

SMALL = ["data.phantom.per_class=8", "data.phantom.size=48", "data.external.phantom.per_class=4",
         "data.external.phantom.size=48"]


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """prepare done; fold-0's adapter only (finetune running); sweep interrupted with classify.epochs=5."""
    run_dir = tmp_path_factory.mktemp("status") / "run"
    over = [f"run_dir={run_dir}", *SMALL]
    assert main(["prepare", "--config", "demo", *over]) == 0
    cfg = load_config("demo", over)
    state.write_record(cfg, "prepare", 1.0)
    lay = RunLayout(cfg.run_dir)
    state.write_started(cfg, "finetune")
    storage.write_text(storage.join(lay.adapter_dir(0), "adapter.json"), json.dumps({"steps": 1}))
    earlier = load_config("demo", [*over, "classify.epochs=5"])
    state.write_started(earlier, "sweep")
    for spec in build_grid(earlier)[:3]:  # three trials finished before the interrupt
        storage.write_parquet(pd.DataFrame({"trial_id": [spec.trial_id]}),
                              lay.path("trials", spec.trial_id, "trials.parquet"))
    return cfg, earlier


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_status_lines_each_stage_and_counts(half_run, capsys):
    cfg, earlier = half_run
    before = _snapshot(Path(cfg.run_dir))
    assert main(["status", "--config", "demo", f"run_dir={cfg.run_dir}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert _snapshot(Path(cfg.run_dir)) == before  # read-only
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows["prepare"].split()[1] == "done"
    assert rows["finetune"].split()[1] == "running" and "adapters 1/2" in rows["finetune"]
    planned = stage_progress(cfg, "generate")[1]
    assert planned and rows["generate"].split()[1] == "missing" and f"images 0/{planned}" in rows["generate"]
    assert rows["fid"].split()[1] == "missing" and "synthetic sets 0/6" in rows["fid"]
    sweep = rows["sweep"]
    assert sweep.split()[1] == "stale" and f"trials 3/{grid_size(cfg)}" in sweep
    assert "classify.epochs: 5 -> " in sweep
    assert rows["report"].split()[1] == "missing"
    assert f"report: {RunLayout(cfg.run_dir).path('report.md')} (not written yet)" in out
    assert "logs: " in out  # prepare's log folder


def test_half_finished_stage_offers_the_earlier_setting(half_run):
    cfg, earlier = half_run
    with pytest.raises(MeddapError) as e:
        pipeline.run_stages(cfg, state.STAGES)
    msg = str(e.value)
    assert f"Stage 'sweep' is half-finished (3 of {grid_size(earlier)} trials done)" in msg
    assert "rerun with them: classify.epochs=5" in msg
    assert "--force sweep" in msg  # the other way out is still offered
    assert resume_overrides(cfg, state.read_record(cfg, "sweep")) == ["classify.epochs=5"]


def test_settings_change_of_a_finished_stage_is_not_called_half_finished(half_run):
    cfg, _ = half_run
    changed = load_config("demo", [f"run_dir={cfg.run_dir}", *SMALL, "data.seed=7"])
    with pytest.raises(MeddapError) as e:
        pipeline.run_stages(changed, ("prepare",))
    assert "half-finished" not in str(e.value) and "data.seed: 0 -> 7" in str(e.value)


def test_status_of_a_run_dir_that_does_not_exist(tmp_path):
    lines = status_lines(load_config("demo", [f"run_dir={tmp_path / 'none'}"]))
    assert "nothing here yet" in lines[1]
    assert not (tmp_path / "none").exists()


def test_status_does_not_import_torch(tmp_path):
    """Quick from another shell: no torch, no Ray."""
    import subprocess
    import sys

    code = ("import sys; from meddap.cli import main; main(['status', 'run_dir=" + str(tmp_path) + "']); "
            "print('heavy:', sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "heavy: []" in res.stdout, res.stdout + res.stderr


def test_forced_stage_with_a_damaged_input_stage_is_refused_before_anything_is_deleted(tmp_path, monkeypatch, capsys):
    """`generate --force` when finetune's adapter was damaged after it finished: refused at once, naming the
    input stage and its file; the generated images are still there (the redo would have failed on the
    adapter after deleting them)."""
    run_dir = tmp_path / "run"
    over = [f"run_dir={run_dir}", *SMALL, "data.folds=2"]
    assert main(["prepare", "--config", "demo", *over]) == 0
    cfg = load_config("demo", over)
    lay = RunLayout(cfg.run_dir)
    for fold in range(cfg.data.folds):
        storage.write_text(storage.join(lay.adapter_dir(fold), "adapter.json"), json.dumps({"steps": 1}))
    state.write_record(cfg, "finetune", 1.0)
    image = lay.path("synthetic", "fold-0", "dark", "benign", "0.png")
    storage.write_bytes(image, b"png bytes")
    storage.write_parquet(pd.DataFrame({"path": [image]}), lay.synthetic_manifest)
    state.write_record(cfg, "generate", 1.0)
    storage.write_text(storage.join(lay.adapter_dir(1), "adapter.json"), "{broken")   # damaged after it finished
    monkeypatch.setattr(pipeline, "stage_function", lambda stage: pytest.fail(f"{stage} ran"))

    assert main(["generate", "--config", "demo", *over, "--force"]) == 2
    err = capsys.readouterr().err
    assert "--force generate: cannot redo it" in err and "Nothing was deleted" in err
    assert "finetune has outputs damaged or missing since it finished" in err
    assert "adapters" in err and "adapter.json" in err                   # names the damaged file
    assert "python -m meddap finetune" in err
    assert Path(lay.synthetic_manifest).is_file() and Path(image).is_file(), "finished generate outputs deleted"


def test_status_with_another_config_names_the_config_the_run_was_made_with(tmp_path):
    run_dir = tmp_path / "run"
    over = [f"run_dir={run_dir}", *SMALL]
    assert main(["prepare", "--config", "demo", *over]) == 0
    other = "\n".join(status_lines(load_config("paper", over)))
    assert "prepare   stale" in other
    assert "note: prepare ran with --config 'demo', not 'paper'" in other
    assert "python -m meddap status --config demo" in other
    same = "\n".join(status_lines(load_config("demo", over)))
    assert "prepare   done" in same and "note:" not in same
