"""A seconds-long stand-in for the trainer, for tests that run `run_ablation.py` as separate processes.

Listing this module under a spec's `plugins:` makes Blueberry import it while validating the config, and
importing it with $BLUEBERRY_FAKE_TRAIN_LOG set replaces `blueberry.ablation.train_fn`: the plugin
mechanism is the way into a worker process that needs no test-only switch in the product code. (The
pytest process, which also loads these specs, never sets the variable, so it keeps the real trainer.)

It behaves like the trainer where the runners can tell: metrics through the tracker (the objective with
`progress` at eval points, so sweeps can prune), `checkpoints/last` every other step and resume from it.
Each call appends `start`/`end` records to `$BLUEBERRY_FAKE_TRAIN_LOG/<pid>.jsonl`, so a test can count
who trained what; `$BLUEBERRY_FAKE_STEP_S` is the time one step takes (default 0.2 s).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blueberry import ablation
from blueberry.checkpoint import find_checkpoint, save_checkpoint
from blueberry.track import flatten_params

STEPS = 6


@dataclass
class FakeResult:
    status: str
    metrics: dict
    run_dir: Path
    checkpoint: Path | None
    steps: int
    tokens_seen: int
    train_time_s: float
    wall_time_s: float


def _log(record: dict) -> None:
    folder = os.environ.get("BLUEBERRY_FAKE_TRAIN_LOG")
    if folder:
        with open(Path(folder) / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "time": time.time(), **record}) + "\n")


def objective(cfg) -> float:
    """A smooth function of the learning rate with its minimum at 0.02, plus a little per seed."""
    return 1.0 + math.log(cfg.optim.lr / 0.02) ** 2 + 0.01 * cfg.train.seed


def fake_train(cfg, tracker=None, run_dir=None, progress=True):
    run_dir = Path(run_dir)
    step_s = float(os.environ.get("BLUEBERRY_FAKE_STEP_S", "0.2"))
    last = find_checkpoint(run_dir / "checkpoints" / "last")
    start = last.meta["step"] if last else 0
    key = f"{cfg.config_hash}/{cfg.train.seed}"
    _log({"event": "start", "key": key, "start_step": start, "run_dir": str(run_dir)})
    if start == 0:
        tracker.log_params({**flatten_params(cfg.to_dict()), "params": 1234})
    model = torch.nn.Linear(2, 2)
    final = objective(cfg)
    for step in range(start + 1, STEPS + 1):
        time.sleep(step_s)
        tracker.log_metrics(
            {"train_loss": final + 1 / step, "tokens_seen": step * 1000, "train_time_s": step * step_s}, step
        )
        if step % 2 == 0:
            val = final + 1 / step
            tracker.log_metrics(
                {"val_loss": val, "val_bpb": val, "val_ppl": math.exp(val), "val_acc": 0.3, "progress": step / STEPS,
                 "tokens_seen": step * 1000, "train_time_s": step * step_s},
                step,
            )  # fmt: skip
            save_checkpoint(run_dir / "checkpoints" / "last", model, cfg, {"step": step})
    _log({"event": "end", "key": key})
    metrics = {
        "val_loss": final,
        "val_bpb": final,
        "val_ppl": math.exp(final),
        "val_acc": 0.3,
        "steps": STEPS,
    }
    return FakeResult("finished", metrics, run_dir, None, STEPS, STEPS * 1000, STEPS * step_s, STEPS * step_s)


if os.environ.get("BLUEBERRY_FAKE_TRAIN_LOG"):  # set only for worker processes, never for pytest itself
    ablation.train_fn = fake_train
