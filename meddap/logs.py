"""The console: meddap's own lines and progress on screen, Ray's internals in log files.

Quiet (the default of the stage commands): the console shows meddap's lines (`[stage] ...`) and, per
long loop, one progress line with an ETA (redrawn in place on a terminal; a few lines, at each
quarter, in a file or pipe). Everything else the process prints (Ray's Python loggers, C++ core-worker
lines, Tune's tables, Ray Data's progress, library warnings and download bars) goes to
`<log dir>/ray.log`; every line Ray forwards from its workers and actors (`(pid=...) ...`) goes to
`<log dir>/workers.log`, and those of them that are meddap's own (fine-tuning progress, say) are
shown too. `console.log` repeats what the console showed.

<log dir> is `<run_dir>/logs/<UTC time>-<command>/`. For an object-store run_dir (s3://, gs://) it is
the local folder `~/.cache/meddap/logs/<scheme>/<bucket>/<path>/<UTC time>-<command>/` (the
`MEDDAP_LOG_DIR` environment variable replaces `~/.cache/meddap/logs`). When the command started
Ray itself, `ray-session` links Ray's own session logs (raylet, GCS, each worker's stdout/stderr).

Verbose (`--verbose`, or MEDDAP_LOG=debug): nothing is redirected; Ray prints as it always does.

How: while a command runs, file descriptors 1 and 2 point at ray.log, so C++ code and every handler
that holds sys.stdout / sys.stderr writes there; meddap writes to duplicates of the original
descriptors; and Ray's handler that prints forwarded worker lines is swapped for one that files them
and shows only meddap's. Errors still reach the user: meddap's one-line messages name the cause,
and they point at the log dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional, TextIO

__all__ = ["say", "progress", "error", "console", "attach_ray", "verbose_requested", "log_root", "active_log_dir",
           "ray_log_dir", "ENV", "duration"]

ENV = "MEDDAP_LOG"
_VERBOSE_VALUES = ("debug", "verbose")
# A line meddap printed, in this process or a worker: "[stage] ...", "[finetune fold-0] 3/72 steps ...".
# Ray's C++ lines start "[2026-..." (a digit) and are not matched.
_MEDDAP_LINE = re.compile(r"^\[[A-Za-z][^\]]*\] ")
_PROGRESS_LINE = re.compile(r"^\[(?P<key>[A-Za-z][^\]]*)\] (?P<done>\d+)/(?P<total>\d+) ")
# Progress in a file or pipe: a line at each quarter of the loop at most every _MIN_GAP_S, and at least
# one every _HEARTBEAT_S (hours-long loops); always the last one. On a terminal: redrawn in place.
_MIN_GAP_S = 10.0
_HEARTBEAT_S = 300.0
_REDRAW_S = 0.2
# Before shutting down a Ray it started, a command waits for worker output still in flight: until
# none has come for _DRAIN_QUIET_S, at most _DRAIN_MAX_S.
_DRAIN_QUIET_S = 1.0
_DRAIN_MAX_S = 5.0
_BAR = 20


def verbose_requested(flag: bool = False) -> bool:
    """--verbose, or MEDDAP_LOG=debug in the environment."""
    return flag or os.environ.get(ENV, "").strip().lower() in _VERBOSE_VALUES


def log_root(run_dir: str) -> Path:
    """Where a run's log folders go: <run_dir>/logs, or a local folder for an object-store run_dir."""
    from meddap import storage

    if not storage.is_uri(run_dir):
        return Path(storage.local_path(run_dir)).expanduser().absolute() / "logs"
    scheme, rest = run_dir.split("://", 1)
    base = Path(os.environ.get("MEDDAP_LOG_DIR") or Path.home() / ".cache" / "meddap" / "logs")
    parts = [p for p in rest.split("/") if p and p not in (".", "..")]
    return base.joinpath(scheme, *parts)


# ---------------------------------------------------------------------------------------------
# The console
# ---------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 90:
        return f"{s}s"
    if s < 90 * 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Console:
    """meddap's lines and progress lines, written to `out` (a terminal or not); thread-safe (worker
    lines arrive on Ray's log thread)."""

    def __init__(self, out: TextIO, err: TextIO, tty: bool, copy: Optional[TextIO] = None):
        self.out, self.err, self.tty, self.copy = out, err, tty, copy
        self._lock = threading.RLock()
        self._live = False          # a progress line is drawn in place (terminal) and not ended
        self._seen: dict[str, list] = {}  # progress key -> [time last shown, quarter last shown, last redraw]

    def _end_live(self) -> None:
        if self._live:
            self.out.write("\n")
            self._live = False

    def _copy(self, text: str) -> None:
        if self.copy is not None:
            self.copy.write(text + "\n")
            self.copy.flush()

    def say(self, text: str) -> None:
        with self._lock:
            self._end_live()
            self.out.write(text + "\n")
            self.out.flush()
            self._copy(text)

    def error(self, text: str) -> None:
        with self._lock:
            self._end_live()
            self.out.flush()
            self.err.write(text + "\n")
            self.err.flush()
            self._copy(text)

    def progress(self, key: str, text: str, done: int, total: int) -> None:
        final = done >= total
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key, [now, 0, 0.0])
            if self.tty:
                if not final and now - seen[2] < _REDRAW_S:
                    return
                seen[2] = now
                width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
                self.out.write("\r\x1b[K" + _with_bar(text, done, total)[:width])
                self._live = not final
                if final:
                    self.out.write("\n")
                self.out.flush()
            else:
                quarter = int(4 * done / total) if total > 0 else 4
                due = (quarter > seen[1] and now - seen[0] >= _MIN_GAP_S) or now - seen[0] >= _HEARTBEAT_S
                if final or due:
                    self.out.write(text + "\n")
                    self.out.flush()
                    seen[0], seen[1] = now, quarter
                    self._copy(text)
            if final:
                if self.tty:
                    self._copy(text)  # the line left on the terminal
                self._seen.pop(key, None)

    def worker_line(self, line: str) -> None:
        """A line a Ray worker printed: meddap's are shown (progress as progress), the rest only filed."""
        m = _PROGRESS_LINE.match(line)
        if m:
            self.progress(m["key"], line, int(m["done"]), int(m["total"]))
        elif _MEDDAP_LINE.match(line):
            self.say(line)


def _with_bar(text: str, done: int, total: int) -> str:
    """'[what] 3/10 ...' -> '[what] ██████░░░░░░ 3/10 ...' (terminal only)."""
    m = re.match(r"^(\[[^\]]*\] )(.*)$", text)
    if not m or total <= 0:
        return text
    filled = int(_BAR * min(done, total) / total)
    return f"{m[1]}{'█' * filled}{'░' * (_BAR - filled)} {m[2]}"


_active: Optional[_Console] = None
_state: dict = {}  # the active quiet session: log_dir, files, redirect, whether Ray was attached here


def say(text: str) -> None:
    """One of meddap's console lines (stdout when no console is active: library use, tests, workers)."""
    if _active is not None:
        _active.say(text)
        return
    # sys.stdout.write, not print: Ray Train patches print in its workers and would show lines twice.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def error(text: str) -> None:
    """An error line for the user (stderr)."""
    if _active is not None:
        _active.error(text)
        return
    sys.stdout.flush()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def progress(key: str, text: str, done: int, total: int, stream: Optional[TextIO] = None) -> None:
    """A progress line of loop `key` (see meddap.progress.Progress)."""
    if _active is not None and stream is None:
        _active.progress(key, text, done, total)
        return
    out = stream or sys.stdout
    out.write(text + "\n")
    out.flush()


def active_log_dir() -> Optional[str]:
    """The log folder of the quiet command running now (or that last ran in this process), else None."""
    return _state.get("log_dir")


def ray_log_dir() -> Optional[str]:
    """That folder when Ray ran in the quiet command (its messages are there), else None."""
    return _state.get("log_dir") if _state.get("ray_attached") else None


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------
def attach_ray() -> None:
    """Called right after this process's ray.init (meddap.raytools.ensure_ray): in a quiet command,
    file the lines Ray forwards from workers instead of printing them, and link Ray's session logs."""
    if _active is None or not _state.get("quiet"):
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: keep its own printing (verbose) rather than lose worker errors
        return
    workers_log = _state["files"]["workers"]
    console = _active
    try:  # Ray's own filter: of the autoscaler's status dump every few seconds, only its events
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        filter_autoscaler_events = list

    def handle(data: dict) -> None:
        try:
            _file_and_show(data)
        except Exception:  # runs on Ray's log thread: an error here would stop every later line
            pass

    def _file_and_show(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')}) "
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":
            lines = list(filter_autoscaler_events(lines))
        _state["last_worker_line"] = time.monotonic()
        for line in lines:
            workers_log.write(prefix + line + "\n")
            if data.get("pid") == "autoscaler" and ("Error:" in line or "Warning:" in line):
                console.say(f"[ray] {line.strip()}")  # e.g. a request no node can satisfy: a run would wait forever
            else:
                console.worker_line(line)
        workers_log.flush()

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("meddap", handle)
    _state["dispatcher"] = dispatcher
    _state["ray_attached"] = True
    try:
        import ray

        session_logs = ray._private.worker.global_worker.node.get_logs_dir_path()
        link = Path(_state["log_dir"]) / "ray-session"
        if not link.exists():
            link.symlink_to(session_logs, target_is_directory=True)
    except Exception:  # joined a remote cluster (no local node), or no symlinks here: the link is a nicety
        pass


# ---------------------------------------------------------------------------------------------
# The context a command runs in
# ---------------------------------------------------------------------------------------------
def _open_log_dir(run_dir: str, command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{stamp}-{command}"
    for root in (log_root(run_dir), Path(os.environ.get("TMPDIR", "/tmp")) / "meddap-logs"):
        try:
            d = root / name
            n = 1
            while d.exists():  # two commands in the same second
                n += 1
                d = root / f"{name}-{n}"
            d.mkdir(parents=True)
            return d
        except OSError:
            continue  # run_dir unusable: the command itself will say so; log to /tmp meanwhile
    raise OSError(f"cannot create a log folder under {log_root(run_dir)} or $TMPDIR/meddap-logs")


def _real_std_streams() -> bool:
    """True when sys.stdout/sys.stderr write to descriptors 1/2 (not a test's capture object)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def console(run_dir: str, command: str, verbose: bool = False):
    """Run a command's body with the quiet console (or, verbose, with plain printing).

    Quiet: descriptors 1 and 2 go to `<log dir>/ray.log` until the block ends; meddap's lines go to
    the terminal through say()/progress()/error(). A Ray this block started is shut down before the
    descriptors are restored, so its exit messages are filed too.
    """
    global _active
    if _active is not None:  # nested (a command calling another): the outer console stays
        yield
        return
    verbose = verbose_requested(verbose)
    real = _real_std_streams()
    tty = real and os.isatty(1)
    if verbose:
        _state.clear()
        _active = _Console(sys.stdout, sys.stderr, tty=tty)
        try:
            yield
        finally:
            _active = None
        return

    log_dir = _open_log_dir(run_dir, command)
    files = {name: open(log_dir / f"{name}.log", "a", buffering=1, encoding="utf-8", errors="replace")
             for name in ("console", "workers")}
    saved: tuple[int, int] | None = None
    out, err = sys.stdout, sys.stderr
    if real:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                        errors="replace")
        err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                        errors="replace")
        ray_log = os.open(log_dir / "ray.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(ray_log, 1)
        os.dup2(ray_log, 2)
        os.close(ray_log)
    else:
        (log_dir / "ray.log").touch()
    _state.clear()
    _state.update(quiet=True, log_dir=str(log_dir), files=files)
    _active = _Console(out, err, tty=tty, copy=files["console"])
    try:
        yield
    finally:
        try:
            _detach_ray()
        finally:
            _active._end_live()
            _active = None
            if saved is not None:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                out.close()
                err.close()
            for f in files.values():
                f.close()
            _state.pop("files", None)


def _detach_ray() -> None:
    """Shut down a Ray this quiet command connected (its goodbye lines land in ray.log), and put
    Ray's own worker-line printer back."""
    dispatcher = _state.pop("dispatcher", None)
    if dispatcher is None:
        return
    import ray

    # Worker output reaches the driver a moment after it is printed (Ray's log monitor tails the
    # workers' files): wait until it has been quiet for a while, so the last lines are not lost.
    t0 = time.monotonic()
    while time.monotonic() - t0 < _DRAIN_MAX_S:
        if time.monotonic() - max(_state.get("last_worker_line", 0.0), t0) >= _DRAIN_QUIET_S:
            break
        time.sleep(0.1)
    if ray.is_initialized():
        ray.shutdown()
    dispatcher.remove_handler("meddap")
