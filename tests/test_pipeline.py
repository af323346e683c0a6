"""The pipeline: skipping done stages, --force, change detection, rank choice, and the real demo's outputs.

Fast tests drive `run_stages` with recording stand-in stages (each writes its stage's key output), so
the bookkeeping is checked without models. The end-to-end tests reuse the demo run that
tests/test_jobs.py submits with `ray job submit` (tests/_demo_run.py runs it once per test session).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from meddap import storage
from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.layout import RunLayout
from meddap.stages import pipeline, state


# ---------------------------------------------------------------------------------------------
# Stand-in stages: they write what the real stage's record looks at, and log that they ran.
# ---------------------------------------------------------------------------------------------
def _fake_stage(stage: str, calls: list):
    def run(cfg):
        calls.append(stage)
        lay = RunLayout(cfg.run_dir)
        folds = range(cfg.data.folds) if cfg.diffusion.lora.per_fold else [-1]
        if stage == "prepare":
            storage.write_parquet(pd.DataFrame({"image_id": ["a", "b"], "seed": [cfg.data.seed] * 2}), lay.manifest)
        elif stage == "finetune":
            for f in folds:
                storage.write_text(storage.join(lay.adapter_dir(f), "adapter.json"),
                                   json.dumps({"rank": cfg.diffusion.lora.rank}))
        elif stage == "generate":
            storage.write_parquet(pd.DataFrame({"adjective": cfg.generate.adjectives}), lay.synthetic_manifest)
        elif stage == "fid":
            storage.write_parquet(pd.DataFrame({"fid": [1.0]}), lay.summary("fid"))
        elif stage == "sweep":  # its trials differ with classify.per_model, as the real sweep's do
            storage.write_parquet(pd.DataFrame({"acc": [0.5], "per_model": [repr(cfg.classify.per_model)]}),
                                  lay.summary("trials"))
        elif stage == "report":
            storage.write_text(lay.path("report.md"), "# report\n")
    return run


@pytest.fixture
def fake(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "stage_function", lambda stage: _fake_stage(stage, calls))
    return calls


def _cfg(tmp_path, *overrides):
    return load_config("demo", [f"run_dir={tmp_path / 'run'}", *overrides])


def test_second_run_skips_every_done_stage(tmp_path, fake):
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    assert fake == list(state.STAGES)
    for s in state.STAGES:
        rec = state.read_record(cfg, s)
        assert rec["status"] == "done" and rec["meddap_version"] and rec["config"]
    assert "data/manifest.parquet" in state.read_record(cfg, "finetune")["inputs"]
    fake.clear()
    timings = pipeline.run_stages(cfg, state.STAGES)
    assert fake == []
    assert all(t["action"] == "skipped" for t in timings.values())


def test_force_redoes_the_stage_and_what_depends_on_it(tmp_path, fake):
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    marker = RunLayout(cfg.run_dir).summary("predictions")  # a sweep output the stand-in never writes
    storage.write_parquet(pd.DataFrame({"x": [1]}), marker)
    fake.clear()
    pipeline.run_stages(cfg, state.STAGES, force=["sweep"])
    assert fake == ["sweep", "report"]
    assert not storage.exists(marker), "forced stage's earlier outputs are removed before it reruns"
    fake.clear()
    pipeline.run_stages(cfg, state.STAGES, force=["generate"])
    assert fake == ["generate", "fid", "sweep", "report"]
    with pytest.raises(MeddapError, match="Did you mean 'sweep'"):
        pipeline.run_stages(cfg, state.STAGES, force=["swep"])


def test_sweep_settings_are_checked_before_fine_tuning(tmp_path, fake, monkeypatch):
    import meddap.raytools

    def no_ray(cfg=None):
        raise AssertionError("Ray started before the classifier settings were checked")

    monkeypatch.setattr(meddap.raytools, "ensure_ray", no_ray)
    with pytest.raises(MeddapError, match="unknown classifier 'resnet99'.*resnet34"):
        pipeline.run(_cfg(tmp_path, "classify.models=[resnet34, resnet99]"))
    with pytest.raises(MeddapError, match=r"squeezenet1_1-.*\.pth.*classify.weights_dir"):
        pipeline.run(_cfg(tmp_path, "classify.models=[squeezenet1_1]", "classify.pretrained=imagenet",
                          f"classify.weights_dir={tmp_path}"))
    assert fake == [] and not os.path.exists(tmp_path / "run")


def test_fid_sources_are_checked_before_fine_tuning(tmp_path, fake):
    """fid.features / fid.judge name files the fid stage reads after finetune and generate: a wrong one
    fails at the start, naming the key and the fix."""
    with pytest.raises(MeddapError, match=r"'fid\.features' = '.*encoder\.pt': no such file.*torch\.jit\.save"):
        pipeline.run(_cfg(tmp_path, f"fid.features={tmp_path / 'encoder.pt'}", "fid.judge=null"))
    # a base-model folder without the judge pretrain-base writes beside it
    with pytest.raises(MeddapError, match=r"fid\.judge takes the phantom judge.*expected in .*judge.*pretrain-base"):
        pipeline.run(_cfg(tmp_path, f"diffusion.base_model={tmp_path}", "fid.features=inception"))
    with pytest.raises(MeddapError, match=r"fid\.features takes the phantom judge.*expected in .*judge"):
        pipeline.run(_cfg(tmp_path, f"diffusion.base_model={tmp_path}", "fid.judge=null"))
    assert fake == [] and not os.path.exists(tmp_path / "run")


def test_per_model_change_reruns_the_sweep_without_force(tmp_path, fake):
    """classify.per_model keys the sweep's trials (only that classifier's rerun), so a change there is no
    reason to refuse the run or delete the sweep's outputs: the sweep runs again, then the report."""
    from meddap.status import status_lines

    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    fake.clear()
    # an entry for a classifier the grid does not train, and an entry of nulls, change nothing
    pipeline.run_stages(_cfg(tmp_path, "classify.per_model.vit_b_16.epochs=3", "classify.per_model.resnet34.lr=null"),
                        state.STAGES)
    assert fake == []
    changed = _cfg(tmp_path, "classify.per_model.squeezenet1_1.epochs=3")
    st = state.check_stage(changed, "sweep")
    assert st.state == "missing" and st.changed == ["classify.per_model.squeezenet1_1.epochs: 16 -> 3"]
    assert any("sweep" in ln and "settings changed: classify.per_model.squeezenet1_1.epochs: 16 -> 3" in ln
               for ln in status_lines(changed))
    trials = RunLayout(changed.run_dir).summary("trials")
    before = storage.read_parquet(trials)
    pipeline.run_stages(changed, state.STAGES)
    assert fake == ["sweep", "report"]
    assert storage.read_parquet(trials)["per_model"][0] != before["per_model"][0]
    assert state.check_stage(changed, "sweep").state == "done" and state.check_stage(changed, "report").state == "done"
    # records holding keys that decide nothing (a null entry; the report's view of per_model, which it sees
    # through the sweep's outputs) still read as unchanged
    lay = RunLayout(changed.run_dir)
    for stage, extra in (("sweep", {"classify.per_model.squeezenet1_1.batch_size": None}),
                         ("report", {"classify.per_model.squeezenet1_1.epochs": 16})):
        record = state.read_record(changed, stage)
        record["config"].update(extra)
        storage.write_text(lay.stage_record(stage), json.dumps(record))
        assert state.check_stage(changed, stage).state == "done", stage
    # any other classifier setting changed with it: refused as before, naming both
    with pytest.raises(MeddapError, match=r"(?s)classify\.lr: 0\.001 -> 0\.01.*--force sweep"):
        pipeline.run_stages(_cfg(tmp_path, "classify.per_model.squeezenet1_1.epochs=4", "classify.lr=0.01"),
                            state.STAGES)


def test_changed_setting_is_refused_before_any_work(tmp_path, fake):
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    fake.clear()
    changed = _cfg(tmp_path, "diffusion.lora.rank=8", "generate.adjectives=['', bright]")
    with pytest.raises(MeddapError) as e:
        pipeline.run_stages(changed, state.STAGES)
    msg = str(e.value)
    assert "diffusion.lora.rank: 4 -> 8" in msg and "--force finetune" in msg and "new run_dir" in msg
    assert fake == [], "nothing may run when settings changed"
    assert json.loads(storage.read_text(storage.join(RunLayout(cfg.run_dir).adapter_dir(0), "adapter.json")))["rank"] == 4
    pipeline.run_stages(changed, state.STAGES, force=["finetune"])
    assert fake == ["finetune", "generate", "fid", "sweep", "report"]
    assert json.loads(storage.read_text(storage.join(RunLayout(cfg.run_dir).adapter_dir(0), "adapter.json")))["rank"] == 8


def test_execution_only_settings_do_not_invalidate(tmp_path, fake):
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    fake.clear()
    pipeline.run_stages(_cfg(tmp_path, "classify.gpus_per_trial=0.5", "generate.batch_size=4",
                             "diffusion.train.num_workers=2"), state.STAGES)
    assert fake == []


def test_inputs_changed_outside_the_pipeline_are_refused(tmp_path, fake):
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    fake.clear()
    # Someone wrote another manifest by hand: the adapters were trained on the old one. A one-stage
    # command (`python -m meddap finetune`) refuses, naming the changed input and the fix.
    storage.write_parquet(pd.DataFrame({"image_id": ["a", "c"]}), RunLayout(cfg.run_dir).manifest)
    for stage in ("finetune", "generate", "sweep"):
        with pytest.raises(MeddapError, match=rf"(?s)input data/manifest.parquet.*--force {stage}"):
            pipeline.run_stages(cfg, (stage,))
    assert fake == []
    # The whole run sees that the manifest is not the one prepare wrote (its record keeps the size and
    # sha256 of each output) and remakes it from the config; the stages after it then match it again.
    pipeline.run_stages(cfg, state.STAGES)
    assert fake == ["prepare"]
    assert list(storage.read_parquet(RunLayout(cfg.run_dir).manifest)["image_id"]) == ["a", "b"]


def test_one_stage_cli_commands_use_the_stage_records(tmp_path, fake, capsys):
    """`python -m meddap <stage>` skips a done stage, refuses changed settings naming the key and
    --force, and with --force redoes it."""
    from meddap.cli import main

    run_dir = tmp_path / "run"
    assert main(["prepare", f"run_dir={run_dir}"]) == 0
    assert main(["finetune", f"run_dir={run_dir}"]) == 0
    assert fake == ["prepare", "finetune"]
    assert main(["finetune", f"run_dir={run_dir}"]) == 0
    assert fake == ["prepare", "finetune"] and "finetune: done already" in capsys.readouterr().out
    assert main(["prepare", f"run_dir={run_dir}", "data.seed=5"]) == 2
    err = capsys.readouterr().err
    assert "data.seed: 0 -> 5" in err and "--force prepare" in err
    assert main(["prepare", "--force", f"run_dir={run_dir}", "data.seed=5"]) == 0
    assert fake[-1] == "prepare"
    # The adapters were made from the old manifest, with data.seed 0: refused either way.
    assert main(["finetune", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "input data/manifest.parquet" in err and "--force finetune" in err
    assert main(["finetune", f"run_dir={run_dir}", "data.seed=5"]) == 2
    err = capsys.readouterr().err
    assert "data.seed: 0 -> 5" in err and "--force finetune" in err
    assert fake[-1] == "prepare"
    assert main(["finetune", "--force", f"run_dir={run_dir}", "data.seed=5"]) == 0
    assert fake[-1] == "finetune"


def test_upstream_rerun_cascades_without_refusal(tmp_path, fake, monkeypatch):
    """A deleted key output makes its stage run again (resuming); when that changes its outputs, the
    stages reading them are redone (their old outputs removed), not refused."""
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, state.STAGES)
    fake.clear()
    lay = RunLayout(cfg.run_dir)
    storage.remove(lay.synthetic_manifest)
    stale = lay.summary("predictions")
    storage.write_parquet(pd.DataFrame({"x": [1]}), stale)

    def regenerate_differently(c):
        fake.append("generate")
        storage.write_parquet(pd.DataFrame({"adjective": ["", "bright", "dark"], "seed": [7, 8, 9]}),
                              lay.synthetic_manifest)

    real = pipeline.stage_function
    monkeypatch.setattr(pipeline, "stage_function", lambda s: regenerate_differently if s == "generate" else real(s))
    pipeline.run_stages(cfg, state.STAGES)
    assert fake == ["generate", "fid", "sweep", "report"]
    assert not storage.exists(stale)
    fake.clear()
    pipeline.run_stages(cfg, state.STAGES)
    assert fake == []


def test_crashed_stage_with_other_settings_is_refused(tmp_path, fake):
    cfg = _cfg(tmp_path)
    pipeline.run_stages(cfg, ("prepare",))
    state.write_started(cfg, "finetune")  # a finetune that died half-way with rank 4
    fake.clear()
    other = _cfg(tmp_path, "diffusion.lora.rank=2")
    assert state.check_stage(other, "finetune").state == "missing"  # it left nothing: nothing to mix
    storage.write_text(storage.join(RunLayout(cfg.run_dir).adapter_dir(0), "loss.parquet"), "partial")
    assert state.check_stage(cfg, "finetune").state == "missing"  # same settings: resume
    with pytest.raises(MeddapError, match="diffusion.lora.rank: 4 -> 2"):
        pipeline.run_stages(_cfg(tmp_path, "diffusion.lora.rank=2"), state.STAGES)
    assert fake == []


def test_choose_rank_never_invents_a_number():
    nan = float("nan")
    rows = [{"rank": 2, "fid": 3.0, "kid": 0.2, "status": "ok"},
            {"rank": 4, "fid": 1.5, "kid": 0.3, "status": "ok"},
            {"rank": 8, "fid": 2.0, "kid": 0.1, "status": "ok"}]
    assert pipeline.choose_rank(rows) == (1, "lowest FID")
    no_fid = [dict(r, fid=nan) for r in rows]
    assert pipeline.choose_rank(no_fid) == (2, "lowest KID")
    none = [dict(r, fid=nan, kid=None, status="missing_weights: pt_inception not found") for r in rows]
    i, why = pipeline.choose_rank(none)
    assert i == 0 and "no FID or KID" in why and "missing_weights" in why


def test_rank_selection_trains_each_rank_and_continues_with_the_lowest_fid(tmp_path, fake, monkeypatch, ray_session):
    fid_by_rank = {2: 3.0, 4: 1.25, 8: 2.0}
    plain = pipeline.stage_function

    def fid_stage(cfg):
        fake.append(f"fid@{cfg.diffusion.lora.rank}")
        r = cfg.diffusion.lora.rank
        storage.write_parquet(pd.DataFrame(
            {"fold": [-1, -1], "adjective": ["", ""], "class_name": ["all", "benign"], "fid": [fid_by_rank[r], 9.0],
             "kid": [0.1, 0.2], "dims": [2048, 2048], "n_real": [10, 4], "n_synthetic": [10, 4],
             "status": ["ok", "ok"]}), RunLayout(cfg.run_dir).summary("fid"))

    monkeypatch.setattr(pipeline, "stage_function", lambda s: fid_stage if s == "fid" else plain(s))
    cfg = _cfg(tmp_path, "diffusion.lora.rank=[2, 4, 8]")
    result = pipeline.run(cfg)
    assert result["rank"] == 4
    table = storage.read_parquet(RunLayout(cfg.run_dir).summary("rank_selection"))
    assert table["rank"].tolist() == [2, 4, 8] and table["chosen"].tolist() == [False, True, False]
    assert table["fid"].tolist() == [3.0, 1.25, 2.0] and set(table["fold"]) == {-1}
    for r in (2, 4, 8):  # each rank: one shared adapter in its own sub-run, no-adjective set, ratio 1
        sub = RunLayout(storage.join(cfg.run_dir, "rank-selection", f"rank-{r}"))
        assert json.loads(storage.read_text(storage.join(sub.adapter_dir(-1), "adapter.json")))["rank"] == r
        assert storage.read_parquet(sub.synthetic_manifest)["adjective"].tolist() == [""]
    main = state.read_record(cfg, "finetune")
    assert main["config"]["diffusion.lora.rank"] == 4
    assert json.loads(storage.read_text(storage.join(RunLayout(cfg.run_dir).adapter_dir(0), "adapter.json")))["rank"] == 4
    fake.clear()
    assert pipeline.run(cfg)["rank"] == 4 and fake == [], "a rerun reuses the recorded selection"


# ---------------------------------------------------------------------------------------------
# The real demo run dir (submitted once as a Ray job by tests/_demo_run.py).
# ---------------------------------------------------------------------------------------------
def _demo_overrides() -> list[str]:
    from _demo_run import DEMO_TEST_OVERRIDES

    return list(DEMO_TEST_OVERRIDES)


@pytest.fixture(scope="module")
def demo_cfg():
    from _demo_run import DEMO_TEST_OVERRIDES, failure_text

    import _background

    job = _background.result("demo_job")  # started when the test run began
    assert job["returncode"] == 0, failure_text(job)
    return load_config("demo", [f"run_dir={job['run_dir']}", *DEMO_TEST_OVERRIDES])


@pytest.mark.slow
def test_rerun_of_the_demo_skips_every_stage(demo_cfg, ray_session):
    result = pipeline.run(demo_cfg)
    actions = {t["stage"]: t["action"] for t in result["timings"]}
    assert all(actions[s] == "skipped" for s in state.STAGES), actions
    assert result["report"].endswith("report.md")


@pytest.mark.slow
def test_force_report_redoes_only_the_report(demo_cfg, ray_session):
    lay = RunLayout(demo_cfg.run_dir)
    before = {s: state.read_record(demo_cfg, s) for s in state.STAGES}
    trials = storage.read_bytes(lay.summary("trials"))
    result = pipeline.run(demo_cfg, force=["report"])
    actions = {t["stage"]: t["action"] for t in result["timings"]}
    assert actions["report"] == "ran" and all(actions[s] == "skipped" for s in state.STAGES[:-1])
    assert state.read_record(demo_cfg, "report")["finished_at"] >= before["report"]["finished_at"]
    assert state.read_record(demo_cfg, "sweep") == before["sweep"]
    assert storage.read_bytes(lay.summary("trials")) == trials
    assert storage.exists(lay.path("report.md")) and storage.exists(lay.summary("table1"))


@pytest.mark.slow
def test_changed_settings_on_the_demo_are_refused(demo_cfg, ray_session):
    lay = RunLayout(demo_cfg.run_dir)
    adapter = storage.read_bytes(storage.join(lay.adapter_dir(0), "adapter.json"))
    rank = load_config("demo", [f"run_dir={demo_cfg.run_dir}", *_demo_overrides(), "diffusion.lora.rank=8"])
    with pytest.raises(MeddapError, match=r"diffusion\.lora\.rank: 4 -> 8[\s\S]*--force finetune"):
        pipeline.run(rank)
    adj = load_config("demo", [f"run_dir={demo_cfg.run_dir}", *_demo_overrides(), "generate.adjectives=['', bright]"])
    with pytest.raises(MeddapError, match=r"generate\.adjectives[\s\S]*--force generate"):
        pipeline.run(adj)
    seed = load_config("demo", [f"run_dir={demo_cfg.run_dir}", *_demo_overrides(), "data.seed=1"])
    with pytest.raises(MeddapError, match=r"data\.seed: 0 -> 1[\s\S]*--force prepare"):
        pipeline.run(seed)
    assert storage.read_bytes(storage.join(lay.adapter_dir(0), "adapter.json")) == adapter
    assert state.check_stage(demo_cfg, "finetune").state == "done"
