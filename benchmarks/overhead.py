"""Harness overhead: how much of a time-budget run's wall time is spent inside training steps.

    python -m benchmarks.overhead [--seconds 60] [--preset tiny] [--set KEY=VALUE ...]

Prepares the data cache first (untimed), then trains the preset on the CPU (or --device) for `--seconds`
of training-step time and reports the share train_time_s / wall_time_s (target >= 95%), the budget
overshoot in units of the median step (target: within one step), and where the rest of the wall time
went: the trainer's data loading, model build, run info, evaluation, checkpoints and end-of-run sample,
and the remainder (setup, logging). Prints a table, then one JSON line {"bench": "overhead", ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import OtherLoad, emit, load_average, median, table
from blueberry.config import load_config, preset_names
from blueberry.errors import BlueberryError, run_cli

# Functions the trainer module calls whose time is broken out of the wall time (those it has): setup
# before the first step, and the work between steps. `lr_multiplier` runs once per step: its first call
# marks the end of setup.
SETUP = ("prepare", "build_model", "run_info")
BETWEEN = ("evaluate", "save_checkpoint", "sample_text")
FIRST_STEP = "lr_multiplier"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="budget.time of the run (default %(default)s)")
    p.add_argument("--preset", default="tiny", help="the preset to train (default %(default)s)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
    )
    p.add_argument("--device", default="cpu", help="train.device (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="train.threads")
    args = p.parse_args(argv)
    if args.preset not in preset_names():
        raise BlueberryError(
            f"--preset: unknown preset {args.preset!r}; available: {', '.join(preset_names())}"
        )
    if args.seconds <= 0:
        raise BlueberryError("--seconds must be positive")
    return args


class Stopwatch:
    """Wraps functions of a module: seconds spent in each, call counts, time of the first call."""

    def __init__(self, module, names):
        self.module, self.seconds, self.calls, self.first, self.saved = module, {}, {}, {}, {}
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None:
                self.saved[name] = fn
                self.seconds[name], self.calls[name] = 0.0, 0
                setattr(module, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            self.first.setdefault(name, t0)
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def restore(self) -> None:
        for name, fn in self.saved.items():
            setattr(self.module, name, fn)


def step_times(metrics_path: Path) -> list[float]:
    """Mean step time of every logged window (tokens per step / window tokens_per_sec)."""
    windows, prev = [], None
    if not metrics_path.is_file():
        return windows
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "tokens_per_sec" not in rec:
            continue
        if prev is not None and rec["step"] > prev["step"] and rec["tokens_per_sec"] > 0:
            tokens_per_step = (rec["tokens_seen"] - prev["tokens_seen"]) / (rec["step"] - prev["step"])
            windows.append(tokens_per_step / rec["tokens_per_sec"])
        prev = rec
    return windows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from blueberry.data import prepare
    from blueberry.train import trainer

    overrides = [*args.set, f"budget.time={args.seconds}", f"train.device={args.device}"]  # the flags win
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    cfg = load_config(data={"preset": args.preset}, overrides=overrides)
    prepare(cfg, progress=False)  # build the data cache now, so the run only loads it

    load_before = load_average()
    watch = Stopwatch(trainer, SETUP + BETWEEN + (FIRST_STEP,))
    try:
        with OtherLoad() as contention, tempfile.TemporaryDirectory(prefix="blueberry-overhead-") as run_dir:
            start = time.perf_counter()
            result = trainer.train(cfg, run_dir=run_dir, progress=False)
            steps = step_times(Path(run_dir) / "metrics.jsonl")
    finally:
        watch.restore()
    load_after = load_average()

    budget = cfg.budget.time
    wall, train_s = result.wall_time_s, result.train_time_s
    step_s = median(steps) if steps else train_s / max(1, result.steps)
    overshoot = train_s - budget
    setup = watch.first[FIRST_STEP] - start if FIRST_STEP in watch.first else 0.0
    parts = {"setup": setup} | {name: watch.seconds[name] for name in BETWEEN if name in watch.seconds}
    other = wall - train_s - sum(parts.values())
    share = train_s / wall
    record = {
        "bench": "overhead",
        "preset": args.preset,
        "device": args.device,
        "status": result.status,
        "budget_s": budget,
        "wall_time_s": round(wall, 3),
        "train_time_s": round(train_s, 3),
        "train_share": round(share, 4),
        "steps": result.steps,
        "median_step_s": round(step_s, 5),
        "overshoot_s": round(overshoot, 4),
        "overshoot_steps": round(overshoot / step_s, 3),
        "outside_steps_s": {k: round(v, 3) for k, v in {**parts, "other": other}.items()},
        "setup_parts_s": {name: round(watch.seconds[name], 3) for name in SETUP if name in watch.seconds},
        "calls": dict(watch.calls),
        "meets_share_target": share >= 0.95,
        "meets_budget_target": abs(overshoot) <= step_s,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "other_cpu_share": contention.share,
    }
    rows = [
        ["budget (s)", f"{budget:.1f}"],
        ["wall time (s)", f"{wall:.2f}"],
        ["in training steps (s)", f"{train_s:.2f}"],
        ["share in steps", f"{100 * share:.1f}%  (target >= 95%)"],
        ["steps / median step (s)", f"{result.steps} / {step_s:.4f}"],
        ["budget overshoot", f"{overshoot:+.3f} s = {overshoot / step_s:+.2f} steps  (target: within 1)"],
    ]
    inside = ", ".join(f"{n} {watch.seconds[n]:.2f}" for n in SETUP if n in watch.seconds)
    rows.append(["  setup before the first step (s)", f"{setup:.2f}  ({inside})"])
    for name in BETWEEN:
        if name in watch.seconds:
            rows.append([f"  in {name} (s)", f"{watch.seconds[name]:.2f}  ({watch.calls[name]} calls)"])
    rows.append(["  other: between steps, logging, teardown (s)", f"{other:.2f}"])
    print(f"{args.preset} on {args.device}, {args.seconds:g} s budget: {result.status}")
    print(table(["", "value"], rows))
    share = "n/a" if contention.share is None else f"{100 * contention.share:.0f}%"
    print(f"load average before {load_before}, after {load_after}; other processes' CPU share {share}")
    emit(record)
    return 0


if __name__ == "__main__":
    run_cli(main)
