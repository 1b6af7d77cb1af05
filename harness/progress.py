"""Progress of a running case, on stderr only (never in the tables).

On a terminal: one live tqdm line per running case, `<case> 42%|████ | 1260/3000 [00:31<00:43, 40.1
arm-step/s]`: units done of the case's total (arm-steps: one update of one arm; arm-epochs for
epoch-unit cases), elapsed < remaining, rate. tqdm because it is the well-kept standard for this
(terminal width, redraw throttling, ETA smoothing) and costs about a microsecond a call.
Off a terminal (CI logs, pytest, a file): a plain line at most every `interval` seconds, and none for
a case that ends sooner: `progress <case>: 1260/3000 arm-steps (42%), 40.1/s, ETA 43s`.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

PLAIN_INTERVAL_S = 30.0


class NullProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


NULL = NullProgress()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class PlainProgress:
    """At most one line every `interval` seconds; the first once the case has run that long."""

    def __init__(self, label: str, total: int, unit: str, *, initial: int = 0, stream: TextIO | None = None,
                 interval: float = PLAIN_INTERVAL_S, clock=time.monotonic):
        self.label, self.total, self.unit, self.done = label, total, unit, initial
        self.stream, self.interval, self.clock = stream or sys.stderr, interval, clock
        self.start = self.last = clock()
        self.initial = initial

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = (self.done - self.initial) / max(now - self.start, 1e-9)
        left = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(f"progress {self.label}: {self.done}/{self.total} {self.unit}s{pct}, {rate:.3g}/s{left}",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """tqdm's live line; removed when the case ends (the CLI then prints the case's result line)."""

    def __init__(self, label: str, total: int, unit: str, *, initial: int = 0, stream: TextIO | None = None):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, file=stream or sys.stderr,
                        leave=False, dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def for_case(label: str, total: int, unit: str, *, initial: int = 0, stream: TextIO | None = None):
    """The right kind for where stderr goes."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    kind = BarProgress if (isatty and isatty()) else PlainProgress
    return kind(label, total, unit, initial=initial, stream=stream)
