"""The quiet console (meddap.logs): meddap's lines on screen, Ray's chatter in <run_dir>/logs/.

The two subprocess probes start Ray (about 15 s and 8 s on the 2-core box, 20 s each on a busy one); the
rest are instant.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meddap import logs

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "_console_probe.py"
# What the issue saw on the demo's console; each comes from another part of Ray.
RAY_CHATTER = ["(pid=", "pid=", "Checkpoint successfully created", "Configuration for experiment",
               "Started a local Ray instance", "View detailed results",
               "core_worker.cc", "plain worker chatter"]


def _probe(run_dir: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    environ.pop(logs.ENV, None)  # the quiet default, whatever the calling shell has set
    environ.update(env or {})
    return subprocess.run([sys.executable, str(PROBE), str(run_dir), *flags], capture_output=True, text=True,
                          env=environ, timeout=300)


@functools.cache
def run_probes() -> dict:
    """Both probes, once per test run, each in a run dir of its own: {name: (CompletedProcess, run_dir)}."""
    import tempfile

    out = {}
    for name, flags, env in (("quiet", ("--fail",), None), ("debug", ("--light",), {logs.ENV: "debug"})):
        run_dir = Path(tempfile.mkdtemp(prefix=f"meddap-console-{name}-")) / "run"
        out[name] = (_probe(run_dir, *flags, env=env), run_dir)
    return out


def test_quiet_console_shows_meddap_only_and_files_ray():
    res, run_dir = run_probes()["quiet"]
    out = res.stdout.splitlines()
    # meddap's lines, in order, and nothing else on stdout
    assert out == ["[probe] start", "[probe] a line from a worker", out[2], "[probe] end"], res.stdout
    assert out[2].startswith("[probe loop] 3/3 steps")
    for chatter in RAY_CHATTER:
        assert chatter not in res.stdout, chatter
    # the worker's error reaches the user with its cause, and says where Ray's account is
    assert res.returncode != 0
    assert "ValueError: boom in a worker" in res.stderr
    for chatter in ("Checkpoint successfully created", "Configuration for experiment", "Started a local Ray"):
        assert chatter not in res.stderr, chatter
    # ... and Ray's messages are kept in files under <run_dir>/logs/<time>-probe/
    (log_dir,) = list((run_dir / "logs").iterdir())
    assert log_dir.name.endswith("-probe")
    workers = (log_dir / "workers.log").read_text()
    assert "plain worker chatter" in workers and "Checkpoint successfully created" in workers
    assert "(work pid=" in workers
    ray_log = (log_dir / "ray.log").read_text()
    assert "Configuration for experiment" in ray_log and "Started a local Ray instance" in ray_log
    assert (log_dir / "console.log").read_text().splitlines()[-1] == "[probe] end"
    assert (log_dir / "ray-session").is_symlink()


def test_meddap_log_debug_brings_ray_back():
    res, run_dir = run_probes()["debug"]
    assert res.returncode == 0, res.stderr[-2000:]
    both = res.stdout + res.stderr
    assert "(work pid=" in both and "plain worker chatter" in both
    assert "Started a local Ray instance" in both
    assert "[probe] end" in res.stdout
    assert not (run_dir / "logs").exists()  # verbose redirects nothing


def test_verbose_flag_on_stage_commands():
    from meddap.cli import _parser

    assert _parser().parse_args(["demo", "--verbose"]).verbose
    assert not _parser().parse_args(["prepare"]).verbose
    assert logs.verbose_requested(True)


# ---------------------------------------------------------------------------------------------
# Progress rendering (no Ray)
# ---------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _console(monkeypatch, tty: bool):
    """(clock, output, console) with the console's clock under the test's control."""
    clock = _Clock()
    monkeypatch.setattr(logs.time, "monotonic", clock)
    out = io.StringIO()
    return clock, out, logs._Console(out, out, tty=tty)


def test_progress_in_a_file_prints_quarters_and_the_end(monkeypatch):
    clock, out, con = _console(monkeypatch, tty=False)
    for done in range(1, 101):
        clock.t += 1.0  # a 100 s loop, reported every second
        con.progress("loop", f"[loop] {done}/100 items", done, 100)
    lines = out.getvalue().splitlines()
    assert lines == ["[loop] 25/100 items", "[loop] 50/100 items", "[loop] 75/100 items", "[loop] 100/100 items"]


def test_progress_in_a_file_short_loop_prints_only_the_end(monkeypatch):
    clock, out, con = _console(monkeypatch, tty=False)
    for done in range(1, 11):
        clock.t += 0.1
        con.progress("loop", f"[loop] {done}/10 items", done, 10)
    assert out.getvalue().splitlines() == ["[loop] 10/10 items"]


def test_progress_on_a_terminal_redraws_one_line_with_a_bar(monkeypatch):
    clock, out, con = _console(monkeypatch, tty=True)
    for done in range(1, 5):
        clock.t += 1.0
        con.progress("loop", f"[loop] {done}/4 items", done, 4)
    con.say("[stage] next")
    text = out.getvalue()
    assert text.count("\n") == 2  # the finished bar, then the next line
    assert "\r\x1b[K[loop] █████" in text and text.endswith("[loop] ████████████████████ 4/4 items\n[stage] next\n")


def test_worker_lines_meddap_shown_rest_filed():
    out = io.StringIO()
    con = logs._Console(out, out, tty=False)
    con.worker_line("[finetune] fold-0: epoch 1/2 done")
    con.worker_line("[2026-12-01 00:20:10,735 E 12896 12983] core_worker.cc:2465: Actor ...")
    con.worker_line("Checkpoint successfully created at: Checkpoint(...)")
    con.worker_line("[finetune fold-0] 72/72 steps (44 steps/s)")
    assert out.getvalue().splitlines() == ["[finetune] fold-0: epoch 1/2 done", "[finetune fold-0] 72/72 steps (44 steps/s)"]


@pytest.mark.parametrize("run_dir,tail", [("runs/demo", "runs/demo/logs"), ("s3://bucket/runs/a", "s3/bucket/runs/a")])
def test_log_root(run_dir, tail, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDDAP_LOG_DIR", str(tmp_path))
    root = logs.log_root(run_dir)
    assert root.is_absolute() and root.as_posix().endswith(tail)
    if "://" in run_dir:
        assert str(root).startswith(str(tmp_path))
