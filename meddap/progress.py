"""Progress lines for long work: done/total, rate, time left.

A Progress emits a line at most every `every_s` seconds and at the end. Under the CLI's console
(meddap.logs) a terminal shows one line redrawn in place with a bar, and a file or pipe a line per
quarter of the loop; elsewhere (library use, Ray workers) the lines are written as they come.
"""

from __future__ import annotations

import time

from meddap import logs

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, what: str, unit: str = "items", every_s: float = 2.0, stream=None,
                 initial: int = 0, note: str = ""):
        """`initial`: items already done before this loop (a resumed stage); the rate counts only new ones.
        `note`: text after the figures when an update gives none."""
        self.total, self.what, self.unit, self.every_s, self.note = total, what, unit, every_s, note
        self.initial = self.done = initial
        self.start = time.perf_counter()
        self._last = self.start
        self.stream = stream

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            logs.progress(self.what, self.line(extra), self.done, self.total, stream=self.stream)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f", ~{logs.duration(left)} left" if self.done < self.total and rate > 0 else ""
        extra = extra or self.note
        tail = f" | {extra}" if extra else ""
        return f"[{self.what}] {self.done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s{eta}){tail}"
