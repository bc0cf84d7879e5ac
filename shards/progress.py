"""A small progress bar with rate and ETA (stderr). On a terminal it redraws in place; in a log
file it prints one line every `log_every` seconds, so long jobs stay readable in both."""
from __future__ import annotations

import sys
import time


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """A count and its noun as a message prints them: "1 sequence", "2 sequences" (`nouns` where not noun + s)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{n:.4g}"
        n /= 1000
    return f"{n:.3g}P"


def duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: float | None, desc: str, unit: str = "it", stream=None,
                 enabled: bool = True, log_every: float = 10.0, initial: float = 0):
        """initial: work done before this process (a resumed run's steps): counted in n/total, not in the rate."""
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else log_every
        self.n = self.initial = float(initial)
        self._drawn = None  # (n, extra) of the last line drawn
        self.extra = ""
        self.start = self._last = time.perf_counter()

    def update(self, n: float = 1, extra: str | None = None) -> None:
        self.n += n
        if extra is not None:
            self.extra = extra
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        el = now - self.start
        rate = (self.n - self.initial) / el if el > 0 else 0.0
        parts = [self.desc]
        if self.total:
            parts.append(f"{100 * self.n / self.total:5.1f}% {human(self.n)}/{human(self.total)} {self.unit}")
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            parts.append(f"{human(rate)} {self.unit}/s elapsed {duration(el)} ETA "
                         f"{duration(eta) if eta == eta else '?'}")
        else:
            parts.append(f"{human(self.n)} {self.unit} {human(rate)} {self.unit}/s elapsed {duration(el)}")
        if self.extra:
            parts.append(self.extra)
        return " | ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        self._drawn = (self.n, self.extra)
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self.tty or self._drawn != (self.n, self.extra):  # a log file does not get the last line twice
                self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
