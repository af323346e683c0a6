"""Progress lines for long work: done/total, rate, time left. Printed, throttled, flushed."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, what: str, unit: str = "items", every_s: float = 2.0, stream=None):
        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self.stream = stream or sys.stdout

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self.stream.write(self.line(extra) + "\n")
            self.stream.flush()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f", ~{left:.0f}s left" if self.done < self.total and rate > 0 else ""
        tail = f" | {extra}" if extra else ""
        return f"[{self.what}] {self.done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s{eta}){tail}"
