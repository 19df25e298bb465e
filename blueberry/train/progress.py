"""The per-run progress display: a rich bar on a terminal, plain lines (at evaluations) otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from blueberry.train.budget import Budget, Usage


class ProgressView:
    def __init__(self, budget: Budget, enabled: bool = True):
        self.budget = budget
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.progress = None
        self.last = ""
        if self.tty:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}% of {task.fields[budget]}"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=1000, budget=budget.describe(), stats="")
            self.progress.start()

    def update(self, used: Usage, loss: float, lr: float, tokens_per_sec: float) -> None:
        if not self.enabled:
            return
        self.last = (
            f"step {used.steps}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_sec:,.0f} tok/s  "
            f"{used.train_time_s:.1f}s trained"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=1000 * self.budget.progress(used), stats=self.last)

    def note_eval(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = (
            f"eval @ {100 * metrics['progress']:.0f}%: val_loss {metrics['val_loss']:.4f}  "
            f"val_bpb {metrics['val_bpb']:.4f}  val_acc {metrics['val_acc']:.3f}"
        )
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            print(f"{self.last}  |  {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
