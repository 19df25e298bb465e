"""The data pipeline: text source -> document split -> tokenizer -> cached token shards -> batches.

`prepare(cfg)` is the one entry point; it returns a `PreparedData` whose streams are memory-mapped from a
cache entry, so a second run with the same data and tokenizer starts in well under a second.
"""

from blueberry.data.batching import TokenBatcher, bits_per_byte, val_windows
from blueberry.data.cache import DataWarning, PreparedData, cache_root, prepare, split_documents
from blueberry.data.sources import strip_stage_notes
from blueberry.data.tokenizer import EOT, token_byte_lengths

__all__ = [
    "EOT",
    "DataWarning",
    "PreparedData",
    "TokenBatcher",
    "bits_per_byte",
    "cache_root",
    "prepare",
    "split_documents",
    "strip_stage_notes",
    "token_byte_lengths",
    "val_windows",
]
