"""`python -m blueberry.data prepare [CONFIG.yaml] [--set KEY=VALUE ...]`: build or find the token cache.

Preparing ahead of training keeps tokenizer training out of a timed run and shows what the data is.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from rich.console import Console
from rich.table import Table

from blueberry.config import load_config
from blueberry.data.cache import PreparedData, prepare
from blueberry.errors import run_cli


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one `warning: ...` line, like errors, instead of Python's two-line file:line format."""
    print(f"warning: {message}", file=sys.stderr)


def summary(data: PreparedData, seconds: float) -> Table:
    """One screen: what was read, how it split, how well the tokenizer compresses it, where it lives."""
    m = data.manifest
    docs, tokens, nbytes = m["documents"], m["tokens"], m["bytes"]
    val_bytes = int(data.token_bytes[data.val_tokens].sum())
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("source", m["source"]["spec"]),
        ("documents", f"{docs['train']:,} train / {docs['val']:,} val"),
        ("tokens", f"{tokens['train']:,} train / {tokens['val']:,} val"),
        ("text bytes", f"{nbytes['train']:,} train / {nbytes['val']:,} val"),
        (
            "bytes per token",
            f"{nbytes['train'] / max(tokens['train'], 1):.3f} (train, <|endoftext|> included)",
        ),
        ("validation slice", f"{len(data.val_tokens):,} tokens = {val_bytes:,} bytes"),
        ("tokenizer", f"{m['tokenizer']['kind']}, vocab {data.vocab_size:,}, <|endoftext|> = {data.eot_id}"),
        ("dtype", m["dtype"]),
        ("cache", str(data.cache_dir)),
        ("time", f"{seconds:.2f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blueberry.data", description="Blueberry data pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build (or find) the tokenizer and token shards for a config")
    p.add_argument("config", nargs="?", help="a run config YAML (default: RunConfig defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    args = parser.parse_args(argv)

    warnings.showwarning = _show_warning
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    data = prepare(cfg, progress=not args.no_progress)
    Console().print(summary(data, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    run_cli(main)
