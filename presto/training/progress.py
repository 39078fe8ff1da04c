"""Progress of long work as plain log lines (they survive Ray's log forwarding, unlike \\r bars)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from presto.errors import DivergenceError


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """`update(step, **numbers)` prints `desc step/total (pct) rate ETA numbers` at most every `every_s`."""

    def __init__(self, desc: str, total: int, start: int = 0, every_s: float = 10.0,
                 unit: str = "step", stream: TextIO | None = None):
        self.desc, self.total, self.start, self.every_s, self.unit = desc, total, start, every_s, unit
        self.stream = stream or sys.stdout
        self._t0 = time.monotonic()
        self._last = -math.inf

    def rate(self, step: int) -> float:
        elapsed = time.monotonic() - self._t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self, step: int, numbers: dict[str, float]) -> str:
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        pct = 100.0 * step / self.total if self.total else 100.0
        shown = " ".join(f"{k}={v:.4g}" for k, v in numbers.items())
        return (f"{self.desc}: {self.unit} {step}/{self.total} ({pct:.0f}%) {rate:.2f} {self.unit}/s "
                f"ETA {format_duration(eta)} {shown}").rstrip()

    def update(self, step: int, **numbers: float) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s or step >= self.total:
            self._last = now
            print(self.line(step, numbers), file=self.stream, flush=True)


def check_finite(step: int, where: str = "", **values: float) -> None:
    """Stop on NaN/Inf with a message that says which value, at which step."""
    bad = {k: v for k, v in values.items() if not math.isfinite(float(v))}
    if bad:
        named = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise DivergenceError(f"{where}step {step}: {named}; training stopped, the last good checkpoint is kept")
