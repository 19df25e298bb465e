"""KV-cached vs full-recompute decoding speed of a randomly initialised preset model.

    python -m benchmarks.inference [--preset blueberry-seed] [--new-tokens 256] [--threads 2]

Prints a human-readable summary, then one JSON line {"bench": "inference", ...} (the same record as
`python inference.py --benchmark --preset NAME`).
"""

from __future__ import annotations

import argparse
import json

from blueberry.errors import BlueberryError, run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="blueberry-seed")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1:
        raise BlueberryError("--new-tokens must be >= 2 and --prompt-tokens >= 1")

    import torch

    from blueberry.config import preset_names
    from blueberry.generate import (
        cast_for_inference,
        format_benchmark,
        inference_benchmark,
        pick_device,
        pick_dtype,
        random_preset_model,
    )

    if args.preset not in preset_names():
        raise BlueberryError(
            f"--preset: unknown preset {args.preset!r}; available: {', '.join(preset_names())}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype] if args.dtype != "auto" else pick_dtype(device)
    model = cast_for_inference(random_preset_model(args.preset), device, dtype)
    record = inference_benchmark(model, f"preset:{args.preset}", args.new_tokens, args.prompt_tokens)
    print("\n".join(format_benchmark(record)))
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
