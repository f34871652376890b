"""Per-phase wall time of the step without host synchronisation in the step.

On CUDA each phase records a pair of events; `read()` (called at the logging interval only)
synchronises once and sums the elapsed times. On CPU the work is synchronous, so
perf_counter is exact. `enabled=False` makes every phase a no-op.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self._pending: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._pending.append((name, t0, time.perf_counter()))

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (summed over repeated phases)."""
        if self.cuda and self._pending:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, a, b in self._pending:
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        self._pending.clear()
        return out
