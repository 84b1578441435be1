"""One live progress line on a terminal; plain periodic lines elsewhere (CI, notebooks, pipes)."""
from __future__ import annotations

import sys
import time


def _fmt_duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total_steps: int, *, enabled: bool = True, stream=None, plain_every_s: float = 10.0):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self._start: float | None = None
        self._start_step = 0
        self._units = 0

    def update(self, step: int, loss: float, *, tokens: int, samples: int, ended: float) -> None:
        """Called once per completed step (all ranks reported), with the step's totals
        and when its slowest rank finished it (unix time: reports arrive in batches,
        so rates use the workers' clocks). Throughput is in tokens for token models,
        in samples otherwise."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._start is None:  # from the first step's end: excludes start-up
            self._start, self._start_step = ended, step
        else:
            self._units += tokens or samples
        elapsed = ended - self._start
        done = step - self._start_step
        rate = self._units / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else float("nan")
        eta_s = _fmt_duration(eta) if eta == eta else "?"
        unit = "tok/s" if tokens else "samples/s"
        line = f"step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} {unit}  ETA {eta_s}"
        if self.live:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif now - self._last_plain >= self.plain_every_s or step == self.total:
            self._last_plain = now
            print(line, file=self.stream, flush=True)

    def note(self, msg: str) -> None:
        if self.enabled:
            if self.live:
                self.stream.write("\r\033[K")
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
