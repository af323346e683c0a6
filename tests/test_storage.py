"""run_dir on s3:// against a real S3-compatible server on loopback (moto's server), not a pyarrow mock.

The server speaks the S3 REST protocol on 127.0.0.1; pyarrow's S3 filesystem reaches it through
AWS_ENDPOINT_URL, exactly as it would reach MinIO or AWS. Stages that start Ray run in a subprocess
so that Ray's workers inherit the endpoint and credentials from their environment, as on a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from meddap import storage
from meddap.config import load_config
from meddap.layout import RunLayout

from _demo_run import TINY_SD

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "meddap-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and the AWS_* variables pointing at it; yields the env dict."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


def test_round_trips(s3_env):
    base = f"s3://{BUCKET}/roundtrip"
    assert storage.is_uri(base) and not storage.exists(base)
    storage.write_bytes(storage.join(base, "a", "blob.bin"), b"\x00\x01meddap")
    assert storage.read_bytes(f"{base}/a/blob.bin") == b"\x00\x01meddap"
    storage.write_text(f"{base}/a/note.txt", "héllo")
    assert storage.read_text(f"{base}/a/note.txt") == "héllo"
    df = pd.DataFrame({"image_id": ["x", "y"], "label": [0, 2], "fold": [-1, 1]})
    storage.write_parquet(df, f"{base}/summary/t.parquet")
    pd.testing.assert_frame_equal(storage.read_parquet(f"{base}/summary/t.parquet"), df)
    with storage.open_output(f"{base}/b/streamed.bin") as f:
        f.write(b"part1")
        f.write(b"part2")
    assert storage.read_bytes(f"{base}/b/streamed.bin") == b"part1part2"
    # A failed write leaves nothing behind.
    with pytest.raises(RuntimeError):
        with storage.open_output(f"{base}/b/broken.bin") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not storage.exists(f"{base}/b/broken.bin")
    assert storage.listdir(base, recursive=True) == sorted(
        f"{base}/{p}" for p in ("a/blob.bin", "a/note.txt", "summary/t.parquet", "b/streamed.bin"))
    assert storage.listdir(f"{base}/a") == [f"{base}/a/blob.bin", f"{base}/a/note.txt"]
    local = storage.local_path(f"{base}/a/blob.bin")
    assert Path(local).read_bytes() == b"\x00\x01meddap"
    assert storage.local_path(f"{base}/a/blob.bin") == local          # cached: not downloaded again
    # An object rewritten at the same URI (a retrained adapter) is fetched again, never served stale.
    time.sleep(1.1)  # S3's modification time has a one-second resolution
    storage.write_bytes(f"{base}/a/blob.bin", b"\x00\x02meddap")
    assert Path(storage.local_path(f"{base}/a/blob.bin")).read_bytes() == b"\x00\x02meddap"
    storage.remove(f"{base}/a")
    assert not storage.exists(f"{base}/a/blob.bin") and storage.exists(f"{base}/b/streamed.bin")


def test_stage_records_on_s3(s3_env):
    """Change detection works the same when the run dir is a bucket."""
    from meddap.stages import state

    cfg = load_config("demo", [f"run_dir=s3://{BUCKET}/records"])
    lay = RunLayout(cfg.run_dir)
    storage.write_parquet(pd.DataFrame({"image_id": ["a"]}), lay.manifest)
    state.write_record(cfg, "prepare", 1.0)
    state.write_record(cfg, "finetune", 2.0)
    storage.write_text(storage.join(lay.adapter_dir(0), "adapter.json"), "{}")
    storage.write_text(storage.join(lay.adapter_dir(1), "adapter.json"), "{}")
    assert json.loads(storage.read_text(lay.stage_record("finetune")))["inputs"]["data/manifest.parquet"] != "absent"
    assert state.check_stage(cfg, "prepare").state == "done"
    assert state.check_stage(cfg, "finetune").state == "done"
    changed = load_config("demo", [f"run_dir=s3://{BUCKET}/records", "diffusion.lora.rank=8"])
    st = state.check_stage(changed, "finetune")
    assert st.state == "invalidated" and st.changed == ["diffusion.lora.rank: 4 -> 8"]
    assert state.check_stage(changed, "prepare").state == "done"
    removed = state.clear_stage(cfg, "finetune")
    assert lay.stage_record("finetune") in removed and not storage.exists(lay.adapter_dir(0))


def _meddap(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env, PYTHONUNBUFFERED="1")
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "meddap", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_prepare_stage_with_s3_run_dir(s3_env):
    run_dir = f"s3://{BUCKET}/prepare-run"
    res = _meddap(["prepare", "--config", "demo", f"run_dir={run_dir}"], s3_env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lay = RunLayout(run_dir)
    manifest = storage.read_parquet(lay.manifest)
    assert {"image_id", "path", "dataset", "class_name", "label", "split", "fold"} <= set(manifest.columns)
    cfg = load_config("demo")
    assert set(manifest["class_name"]) == set(cfg.data.classes)
    assert set(manifest["split"]) == {"train", "test", "external"}
    assert storage.exists(lay.audit)
    # Every image the manifest lists can be read on this node.
    assert all(Path(p).is_file() for p in manifest["path"])


def test_sweep_decodes_synthetic_images_from_an_s3_run_dir(s3_env):
    """With run_dir on S3, generate writes synthetic PNGs (and their manifest paths) as s3:// URIs;
    the sweep must decode them from there."""
    import io

    import numpy as np
    from PIL import Image

    from meddap.classify.data import decode_images

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(buf, format="PNG")
    uri = f"s3://{BUCKET}/decode/synthetic/fold-0/none/benign/00000.png"
    storage.write_bytes(uri, buf.getvalue())
    out = decode_images([uri], 8)  # (1, 1, 8, 8) uint8
    assert out.shape == (1, 1, 8, 8) and int(out[0, 0, 0, 0]) == 200


PIPELINE_RUN_DIR = f"s3://{BUCKET}/pipeline-run"
PIPELINE_OVERRIDES = [f"run_dir={PIPELINE_RUN_DIR}", "data.phantom.per_class=8", "data.external.phantom.per_class=4",
                      "diffusion.lora.per_fold=false", "diffusion.train.epochs=1", "generate.adjectives=['']",
                      "generate.ratios=[0.5]", "generate.steps=2", "classify.models=[squeezenet1_1]",
                      "classify.epochs=1", "classify.per_model={}", "classify.checkpoint_seconds=0", "report.gradcam_images=1",
                      "classify.controls=[]", *TINY_SD]


def run_s3_pipeline() -> dict:
    """The whole pipeline with run_dir in a bucket, then again, against a moto server of its own (started
    here, stopped at exit). Returns the server's AWS_* variables and both finished processes (the second is
    None if the first failed)."""
    import atexit

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    atexit.register(server.stop)
    s3 = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}", "AWS_ACCESS_KEY_ID": "testing",
          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    script = ("import sys; from meddap.config import load_config; from meddap.stages.pipeline import run; "
              "r = run(load_config('demo', sys.argv[1:])); "
              "print('ACTIONS', sorted((t['stage'], t['action']) for t in r['timings']))")
    env = dict(os.environ, **s3, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-c", script, *PIPELINE_OVERRIDES]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    again = (subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
             if first.returncode == 0 else None)
    return {"env": s3, "first": first, "again": again}


@pytest.mark.slow
def test_whole_pipeline_with_s3_run_dir(monkeypatch):
    """Every stage with run_dir in the bucket: Ray Train and Tune checkpoints, adapter, synthetic PNGs
    (manifest paths are s3:// URIs the sweep decodes from there), FID rows, trials, tables, figures,
    report and stage records; a second run skips every stage from the records read back from there.
    Started in the background when the test run begins (tests/_background.py)."""
    import _background

    res = _background.result("s3_pipeline")
    for k, v in res["env"].items():
        monkeypatch.setenv(k, v)
    first, again, run_dir = res["first"], res["again"], PIPELINE_RUN_DIR
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[:2000] + " ... " + first.stderr[-1000:]
    lay = RunLayout(run_dir)
    assert storage.exists(storage.join(lay.adapter_dir(-1), "pytorch_lora_weights.safetensors"))
    assert any("/checkpoint_" in p for p in storage.listdir(storage.join(lay.ray_storage, "finetune"), recursive=True))
    assert storage.listdir(storage.join(lay.ray_storage, "sweep"), recursive=True), "Tune state in the bucket"
    synth = storage.read_parquet(lay.synthetic_manifest)
    assert len(synth) > 0 and all(p.startswith(f"s3://{BUCKET}/") and storage.exists(p) for p in synth["path"])
    assert set(storage.read_parquet(lay.summary("fid"))["adjective"]) == {""}
    trials = storage.read_parquet(lay.summary("trials"))
    assert trials["trial_id"].nunique() == 2 * 2  # squeezenet x 2 folds x (1 setting + real-only)
    assert storage.exists(lay.path("report.md")) and storage.exists(lay.summary("table2"))
    assert storage.listdir(lay.figures)
    assert f"report: {run_dir}/report.md" in first.stdout
    assert again.returncode == 0, again.stderr[-3000:]
    actions = again.stdout.split("ACTIONS", 1)[1]
    assert all(f"('{s}', 'skipped')" in actions for s in ("prepare", "finetune", "generate", "fid", "sweep", "report"))


def test_run_dir_lock_on_s3(s3_env, tmp_path, capsys):
    """One writer per s3:// run dir: a live owner refuses, a dead one (same host) is taken over with a
    note, and two processes racing for the lock end with one owner (write, settle, read back)."""
    from meddap.errors import MeddapError
    from meddap.runlock import LOCK_FILE, _me, _pid_start, read_owner, run_lock

    run_dir = f"s3://{BUCKET}/locked-run"
    cfg = load_config("demo", [f"run_dir={run_dir}"])
    lock = f"{run_dir}/{LOCK_FILE}"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        storage.write_text(lock, json.dumps({**_me("python -m meddap run"), "pid": live.pid,
                                             "pid_start": _pid_start(live.pid)}))
        with pytest.raises(MeddapError, match=f"pid {live.pid} on host .*lock {lock}"):
            with run_lock(cfg, "test"):
                pass
    finally:
        live.kill()
        live.wait()
    with run_lock(cfg, "test"):  # its owner is gone now
        assert read_owner(lock)["pid"] == os.getpid()
        assert f"took over the lock {lock}: its owner (pid {live.pid} on this host) is not running" in capsys.readouterr().out
    assert not storage.exists(lock)

    racer = ("import sys, time; from meddap.config import load_config; from meddap.errors import MeddapError; "
             "from meddap.runlock import run_lock; cfg = load_config('demo', ['run_dir=' + sys.argv[1]]); "
             "[time.sleep(0.001) for _ in iter(lambda: time.time() < float(sys.argv[2]), False)]\n"
             "try:\n  with run_lock(cfg, 'racer'): print('OWNER', flush=True); time.sleep(3)\n"
             "except MeddapError as e: print('REFUSED', e, flush=True)")
    env = dict(os.environ, **s3_env, PYTHONPATH=str(ROOT))
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", racer, f"s3://{BUCKET}/raced-run", str(start)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["OWNER", "REFUSED"], outs


def test_damaged_output_on_s3_is_found_by_its_size(s3_env):
    from meddap.stages import state

    cfg = load_config("demo", [f"run_dir=s3://{BUCKET}/damaged"])
    lay = RunLayout(cfg.run_dir)
    storage.write_parquet(pd.DataFrame({"image_id": [f"x{i}" for i in range(50)]}), lay.manifest)
    rec = state.write_record(cfg, "prepare", 0.1)
    assert rec["outputs"]["data/manifest.parquet"][1] is None  # no sha256: it would download every file
    assert state.check_stage(cfg, "prepare").state == "done"
    storage.write_bytes(lay.manifest, storage.read_bytes(lay.manifest)[:64])  # cut short by an outside copy
    st = state.check_stage(cfg, "prepare")
    assert st.state == "damaged" and st.damaged[0].startswith("data/manifest.parquet: 64 bytes")
    assert state.remove_damaged(cfg, st) == ["data/manifest.parquet"] and not storage.exists(lay.manifest)


def test_damaged_parquet_is_a_clear_error_and_still_a_value_error(tmp_path):
    """A cut-short table names its path and the fix (no bare ArrowInvalid); code that reads an unreadable
    partial output as "not finished" (`except (OSError, ValueError)`) still does; a missing file stays
    FileNotFoundError."""
    import pandas as pd

    from meddap import storage
    from meddap.errors import DamagedFileError, MeddapError

    path = str(tmp_path / "trials.parquet")
    storage.write_parquet(pd.DataFrame({"a": range(100)}), path)
    data = (tmp_path / "trials.parquet").read_bytes()
    (tmp_path / "trials.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError) as info:
        storage.read_parquet(path)
    assert isinstance(info.value, MeddapError) and isinstance(info.value, ValueError)
    assert path in str(info.value) and "--force STAGE" in str(info.value)
    with pytest.raises(FileNotFoundError):
        storage.read_parquet(str(tmp_path / "absent.parquet"))
