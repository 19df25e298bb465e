"""Entry point for one run under torchrun (DDP):

    torchrun --nproc-per-node N -m blueberry.train.launch --config resolved.yaml --run-dir DIR \
        [--tracking-uri URI --run-id ID]

Rank 0 logs to the given MLflow run and writes `DIR/result.json`, which the launching process reads.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from blueberry.checkpoint import atomic_write_text
from blueberry.config import load_config
from blueberry.errors import run_cli


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m blueberry.train.launch")
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--run-id")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    cfg = load_config(args.config)
    rank = int(os.environ.get("RANK", "0"))
    tracker = None
    if args.run_id and rank == 0:
        from blueberry.track import MLflowTracker

        tracker = MLflowTracker.attach(args.tracking_uri, args.run_id, run_dir=Path(args.run_dir))
    from blueberry.train.trainer import train

    result = train(cfg, tracker=tracker, run_dir=args.run_dir, progress=not args.no_progress)
    if tracker is not None and hasattr(tracker, "close"):
        tracker.close()
    out = asdict(result)
    out["run_dir"] = str(result.run_dir)
    out["checkpoint"] = str(result.checkpoint) if result.checkpoint else None
    name = "result.json" if rank == 0 else f"result.rank{rank}.json"
    atomic_write_text(Path(args.run_dir) / name, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
