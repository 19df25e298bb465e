"""Data pipeline benchmark: first prepare of the default corpus, a cached reload, and one training batch.

Run as `python -m benchmarks.data_prepare`. The first prepare trains the 24,576-token BPE and tokenizes the
corpus into a fresh temporary cache; the reload must come back from that cache in well under a second.
Ends with one JSON line for scripts.
"""

from __future__ import annotations

import json
import tempfile
import time

from rich.console import Console
from rich.table import Table

from blueberry.config import load_config
from blueberry.data import TokenBatcher, prepare


def time_batches(tokens, seq_len: int = 128, batch_size: int = 8, n: int = 2000) -> float:
    """Mean seconds per TokenBatcher.next() on CPU (windows of seq_len + 1 tokens)."""
    batcher = TokenBatcher(tokens, seq_len=seq_len, batch_size=batch_size, seed=0)
    for _ in range(50):
        batcher.next()
    t0 = time.perf_counter()
    for _ in range(n):
        batcher.next()
    return (time.perf_counter() - t0) / n


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="blueberry-bench-") as cache:
        cfg = load_config(None, [f"data.cache_dir={cache}"])
        t0 = time.perf_counter()
        first = prepare(cfg, progress=False)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = prepare(cfg, progress=False)
        cached_s = time.perf_counter() - t0
        assert cached.cache_dir == first.cache_dir
        next_s = time_batches(cached.train_tokens)
        m = cached.manifest

    result = {
        "bench": "data_prepare",
        "first_s": round(first_s, 3),
        "cached_s": round(cached_s, 3),
        "build_s": m["build_seconds"],
        "train_tokens": m["tokens"]["train"],
        "val_tokens": m["tokens"]["val"],
        "docs_train": m["documents"]["train"],
        "docs_val": m["documents"]["val"],
        "vocab": cached.vocab_size,
        "bytes_per_token": round(m["bytes"]["train"] / m["tokens"]["train"], 4),
        "batch_next_us": round(next_s * 1e6, 1),
    }
    table = Table(title="data_prepare (default corpus)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("first prepare (train BPE + tokenize)", f"{first_s:.2f} s", "<= 30 s")
    table.add_row("cached reload", f"{cached_s:.3f} s", "<= 1 s")
    table.add_row("TokenBatcher.next() 8 x 129", f"{next_s * 1e6:.0f} µs", "<< 1 ms")
    table.add_row("documents train / val", f"{m['documents']['train']} / {m['documents']['val']}", "")
    table.add_row("tokens train / val", f"{m['tokens']['train']:,} / {m['tokens']['val']:,}", "")
    table.add_row("bytes per token (train)", f"{result['bytes_per_token']:.3f}", "")
    Console().print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
