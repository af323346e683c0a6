"""One writer per run_dir: `run_dir/meddap.lock` names the process that writes it.

    with run_lock(cfg, "python -m meddap run ..."):
        ...   # this process alone writes cfg.run_dir

The lock file is JSON: pid, host, boot_id, pid_start (the process's start tick, so a reused pid is
not taken for the owner), started_at, command, and a random token. A second meddap process on the
same run_dir is refused at once with a message naming the owner. A lock is taken over, with a note,
when its owner is provably gone:
  - same host (hostname and boot id equal) and the pid is not running, or runs another process;
  - another host, and the owner has not refreshed the lock (it does so every quarter of
    `lock_stale_s`, from a daemon thread) for `lock_stale_s` seconds: a driver on a preempted node.
Local run dirs create the lock atomically (a hard link of a finished file: it appears whole or not at
all, and only one process can create it). Object stores have no create-if-absent in pyarrow, so the
lock is written, then read back after a short settle: of two processes racing, the later write wins
and the earlier one sees another token and stands down.

Reentrant within a process: the pipeline holds the lock for a whole `run` while run_stages inside it
asks again.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from meddap import storage
from meddap.errors import MeddapError

__all__ = ["run_lock", "LOCK_FILE", "read_owner"]

LOCK_FILE = "meddap.lock"
_SETTLE_S = 1.0  # object stores: time for a racing writer's PUT to land before the read-back
_held: dict[str, list] = {}  # lock path -> [depth, token, stop event] of locks this process holds
_held_guard = threading.Lock()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid_start": _pid_start(os.getpid()),
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "token": uuid.uuid4().hex}


def read_owner(path: str) -> Optional[dict]:
    """The lock's content, {} when unreadable (cut short), None when there is no lock."""
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return {} if storage.exists(path) else None


def _same_host(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and owner.get("boot_id", "") == _boot_id()


def _alive_here(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    start = _pid_start(pid)
    return owner.get("pid_start") is None or start is None or start == owner.get("pid_start")


def _age_s(path: str) -> float:
    fs, p = storage.filesystem(path)
    mtime = fs.get_file_info(p).mtime
    if mtime is None:
        return 0.0
    return max(0.0, time.time() - mtime.timestamp())


def _why_stale(path: str, owner: dict, stale_s: float) -> Optional[str]:
    """Why the owner is gone, or None when it may still be writing."""
    if not owner:
        age = _age_s(path)
        return f"an unreadable lock last written {age:.0f} s ago" if age > stale_s else None
    if _same_host(owner):
        return None if _alive_here(owner) else f"its owner (pid {owner.get('pid')} on this host) is not running"
    age = _age_s(path)
    if age > stale_s:
        return (f"its owner (pid {owner.get('pid')} on host {owner.get('host')}) has not refreshed it for "
                f"{age:.0f} s (lock_stale_s={stale_s:g})")
    return None


def _describe(owner: dict) -> str:
    if not owner:
        return "an unreadable lock (a process may be writing it right now)"
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started_at')}, running "
            f"`{owner.get('command')}`")


def _create_local(path: str, me: dict) -> bool:
    """Atomically create the lock with its content; False when it exists."""
    folder = os.path.dirname(path)
    if os.path.exists(folder) and not os.path.isdir(folder):  # run_dir names a file: say so plainly
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{me['token']}-{LOCK_FILE}")
    with open(tmp, "w") as f:
        json.dump(me, f)
    try:
        os.link(tmp, path)  # fails if the lock exists; never leaves a half-written lock
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _create_object(path: str, me: dict) -> bool:
    if storage.exists(path):
        return False
    storage.write_text(path, json.dumps(me))
    time.sleep(_SETTLE_S)
    return (read_owner(path) or {}).get("token") == me["token"]


def _take_over(path: str, owner: dict) -> None:
    """Remove a stale lock, unless someone else replaced it meanwhile."""
    if storage.is_uri(path):
        if (read_owner(path) or {}).get("token") == owner.get("token"):
            storage.remove(path)
        return
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)  # one of several takers wins; the others find the lock gone
    except FileNotFoundError:
        return
    moved = read_owner(aside) or {}
    os.unlink(aside)
    if moved.get("token") != owner.get("token"):  # a new owner's lock moved by mistake: put it back
        with open(aside, "w") as f:
            json.dump(moved, f)
        try:
            os.link(aside, path)
        finally:
            os.unlink(aside)


def _heartbeat(path: str, me: dict, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            if (read_owner(path) or {}).get("token") != me["token"]:
                print(f"[meddap] warning: the lock {path} was taken over by another process; this one keeps "
                      f"running but no longer owns the run_dir", flush=True)
                return
            if storage.is_uri(path):
                storage.write_text(path, json.dumps(me))
            else:
                os.utime(path)
        except OSError:
            continue  # a network blip: try again next period


def _release(path: str, token: str) -> None:
    try:
        if (read_owner(path) or {}).get("token") == token:
            storage.remove(path)
    except OSError:
        pass  # a lock left behind is detected as stale by the next run


@contextmanager
def run_lock(cfg, command: str) -> Iterator[str]:
    """Hold `cfg.run_dir`'s lock for the block; MeddapError naming the owner when another process
    holds it. Yields the lock's path."""
    path = storage.join(cfg.run_dir, LOCK_FILE)
    key = storage.local_path(path) if not storage.is_uri(path) else path
    with _held_guard:
        if key in _held:
            _held[key][0] += 1
            entry = None
        else:
            entry = [1, None, None]
    if entry is None:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key][0] -= 1
        return

    me = _me(command)
    create = _create_object if storage.is_uri(path) else _create_local
    for _ in range(3):
        if create(path, me):
            break
        owner = read_owner(path)
        if owner is None:
            continue  # released meanwhile: try again
        why = _why_stale(path, owner, cfg.lock_stale_s)
        if why is None:
            raise MeddapError(f"run_dir {cfg.run_dir} is being written by another meddap process: {_describe(owner)} "
                              f"(lock {path}). Wait for it to finish or stop it, or use another run_dir. If that "
                              f"process is gone for good, delete the lock file.")
        print(f"[meddap] note: took over the lock {path}: {why}; it was {_describe(owner)}", flush=True)
        _take_over(path, owner)
    else:
        raise MeddapError(f"could not take the lock {path} after 3 tries (other processes keep taking it); "
                          f"see {path} for the owner.")
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(path, me, cfg.lock_stale_s / 4, stop), daemon=True,
                     name="meddap-lock-heartbeat").start()
    with _held_guard:
        _held[key] = [1, me["token"], stop]
    try:
        yield path
    finally:
        stop.set()
        with _held_guard:
            _held.pop(key, None)
        _release(path, me["token"])
