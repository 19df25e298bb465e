"""Helpers shared by the benchmarks: load average, medians, matmul peak, tables, the closing JSON line."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence

import torch


def load_average() -> list[float] | None:
    """1/5/15-minute load average: other processes on the cores make every number here noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class OtherLoad:
    """Share of all CPU time used by *other* processes while the block ran (Linux; None elsewhere).

    The load average lags and counts this process too; this says directly how contended a measurement was.
    """

    share: float | None = None

    @staticmethod
    def _machine() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = ticks[3] + ticks[4]  # idle + iowait
        return (sum(ticks[:8]) - idle) / hz, sum(ticks[:8]) / hz  # busy, total seconds over all CPUs

    def __enter__(self) -> OtherLoad:
        self._start, self._own = self._machine(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        end = self._machine()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return
        own = sum(os.times()[:2]) - self._own
        other = end[0] - self._start[0] - own
        self.share = round(min(1.0, max(0.0, other / (end[1] - self._start[1]))), 3)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, reps: int = 3) -> float:
    """Best-of-`reps` GFLOP/s of an n x n x n torch.mm: the practical dense peak MFU is measured against."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # first call pays for allocation and kernel selection
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def emit(record: dict) -> None:
    """The machine-readable result: always the last line of stdout."""
    print(json.dumps(record), flush=True)
