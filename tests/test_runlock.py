"""One writer per run_dir (issue 13 part 4): refused at once naming the owner; a dead owner's lock is
taken over with a note; two processes racing for one run_dir end with exactly one owner.
(The same on an s3:// run dir: tests/test_storage.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.runlock import LOCK_FILE, read_owner, run_lock

ROOT = Path(__file__).resolve().parents[1]


def _cfg(run_dir, *more):
    return load_config("demo", [f"run_dir={run_dir}", *more])


def _owner_record(pid: int, **over) -> dict:
    from meddap import runlock

    rec = runlock._me("python -m meddap run --config demo")
    rec.update({"pid": pid, "pid_start": runlock._pid_start(pid), **over})
    return rec


@pytest.fixture
def live_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def test_held_lock_refuses_a_second_writer_naming_its_owner(tmp_path, live_process):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps(_owner_record(live_process.pid)))
    with pytest.raises(MeddapError) as e:
        with run_lock(_cfg(run_dir), "test"):
            pass
    msg = str(e.value)
    assert f"pid {live_process.pid} on host {socket.gethostname()}" in msg and "started 20" in msg
    assert "python -m meddap run --config demo" in msg and str(run_dir / LOCK_FILE) in msg
    assert read_owner(str(run_dir / LOCK_FILE))["pid"] == live_process.pid  # left alone


def test_cli_stage_command_is_refused_while_another_process_writes(tmp_path, live_process, capsys):
    from meddap.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps(_owner_record(live_process.pid)))
    t0 = time.perf_counter()
    assert main(["report", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"being written by another meddap process: pid {live_process.pid}" in err
    assert time.perf_counter() - t0 < 5, "refused at once"
    assert not (run_dir / "stages").exists()


def test_dead_owner_on_this_host_is_taken_over_with_a_note(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps(_owner_record(gone.pid)))
    with run_lock(_cfg(run_dir), "test") as path:
        assert read_owner(path)["pid"] == os.getpid()
        out = capsys.readouterr().out
        assert f"took over the lock {path}: its owner (pid {gone.pid} on this host) is not running" in out
        with run_lock(_cfg(run_dir), "nested"):  # reentrant: the pipeline's run holds it around run_stages
            assert read_owner(path)["pid"] == os.getpid()
        assert os.path.exists(path)
    assert not os.path.exists(path), "released at the end"
    assert sorted(os.listdir(run_dir)) == [], "no temp or stale files left"


def test_reused_pid_is_not_taken_for_the_owner(tmp_path):
    """A live pid that started at another time than the recorded owner is another process."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps(_owner_record(os.getppid(), pid_start="1")))
    with run_lock(_cfg(run_dir), "test") as path:
        assert read_owner(path)["pid"] == os.getpid()


def test_other_host_owner_is_stale_only_after_lock_stale_s(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK_FILE
    lock.write_text(json.dumps(_owner_record(12345, host="spot-node-7", boot_id="other")))
    with pytest.raises(MeddapError, match="pid 12345 on host spot-node-7"):
        with run_lock(_cfg(run_dir, "lock_stale_s=60"), "test"):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))  # the owner stopped refreshing it two minutes ago (node preempted)
    with run_lock(_cfg(run_dir, "lock_stale_s=60"), "test"):
        assert "has not refreshed it for 12" in capsys.readouterr().out


_RACER = """
import os, sys, time
from meddap.config import load_config
from meddap.errors import MeddapError
from meddap.runlock import run_lock
cfg = load_config("demo", ["run_dir=" + sys.argv[1]])
print("READY", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    with run_lock(cfg, "racer"):
        print("OWNER", flush=True)
        time.sleep(2)
except MeddapError as e:
    print("REFUSED", e, flush=True)
"""


def test_two_processes_racing_for_one_run_dir_get_one_owner(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(run_dir), str(go)], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    # all three have imported and wait for the go file, however slow the box: then they go at once
    assert [p.stdout.readline().strip() for p in procs] == ["READY"] * 3
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum(o.startswith("OWNER") for o in outs) == 1, outs
    assert sum(o.startswith("REFUSED") for o in outs) == 2, outs
