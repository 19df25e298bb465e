"""The fixed budget every variant gets, and progress through it.

Progress p in [0, 1] is the largest used fraction over the limits that are set (whichever ends first).
Only training steps count against `time`: the trainer pauses the clock for evaluation, checkpoints
and logging, and synchronises CUDA around it.
"""

from __future__ import annotations

from dataclasses import dataclass

from blueberry.config import BudgetConfig


@dataclass
class Usage:
    """What a run has spent so far (part of every checkpoint)."""

    steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0

    def flops(self, flops_per_token: int) -> float:
        return float(self.tokens) * flops_per_token


@dataclass(frozen=True)
class Budget:
    cfg: BudgetConfig
    tokens_per_step: int
    flops_per_token: int

    def progress(self, used: Usage, extra_time: float = 0.0, extra_steps: int = 0) -> float:
        """Fraction used; `extra_*` asks "after one more step" (for the LR of the step about to run)."""
        c = self.cfg
        steps = used.steps + extra_steps
        tokens = used.tokens + extra_steps * self.tokens_per_step
        fractions = []
        if c.time is not None:
            fractions.append((used.train_time_s + extra_time) / c.time)
        if c.tokens is not None:
            fractions.append(tokens / c.tokens)
        if c.steps is not None:
            fractions.append(steps / c.steps)
        if c.flops is not None:
            fractions.append(tokens * self.flops_per_token / c.flops)
        return min(1.0, max(fractions))

    def exhausted(self, used: Usage) -> bool:
        return self.progress(used) >= 1.0

    def describe(self) -> str:
        c = self.cfg
        parts = []
        if c.time is not None:
            parts.append(f"time {c.time:g}s")
        if c.tokens is not None:
            parts.append(f"tokens {c.tokens:,}")
        if c.steps is not None:
            parts.append(f"steps {c.steps:,}")
        if c.flops is not None:
            parts.append(f"flops {c.flops:.3g}")
        return ", ".join(parts) + " (whichever ends first)" * (len(parts) > 1)
