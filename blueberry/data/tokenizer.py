"""Tokenizers: a byte-level BPE trained on the training split, a saved tokenizer.json, or a hub tokenizer.

Also the exact UTF-8 byte length of every token, which turns a sum of token losses into bits per byte
(the one metric comparable across tokenizers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from blueberry.config import TokenizerConfig
from blueberry.data.sources import quiet_hub
from blueberry.errors import BlueberryError, ConfigError

EOT = "<|endoftext|>"

# Bump when the training recipe below changes, so cached tokenizers of the old recipe are not reused.
BPE_RECIPE = 1


def train_bpe(docs: Sequence[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """GPT-2 style byte-level BPE: every byte is in the alphabet, so any text round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer, length=len(docs))
    got = tok.get_vocab_size()
    if got != vocab_size:
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size}: the training split ({len(docs)} documents, {n_bytes:,} bytes) "
            f"supports only {got} tokens at tokenizer.min_frequency={min_frequency}; set tokenizer.vocab_size "
            f"to at most {got}, lower min_frequency, or use more data"
        )
    return tok


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A saved tokenizer.json (tokenizer.path), with one-line errors for missing or broken files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer.path: file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a malformed file
        raise ConfigError(
            f"tokenizer.path: {path} is not a valid tokenizer.json ({str(e).splitlines()[0]})"
        ) from None


def load_pretrained(name: str) -> Tokenizer:
    """Tokenizer.from_pretrained(name); needs the hub (or its local cache)."""
    try:
        with quiet_hub():
            return Tokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - offline, missing repo and auth errors all end here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BlueberryError(
            f"tokenizer.hf={name}: could not download the tokenizer from the Hugging Face hub ({reason}); "
            "offline, set tokenizer.path to a local tokenizer.json or leave both unset to train a BPE"
        ) from None


def tokenizer_spec(cfg: TokenizerConfig) -> dict[str, Any]:
    """What identifies the tokenizer before it exists, for cache keys (a file is identified by its content)."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"tokenizer.path: file not found: {path}")
        return {"kind": "file", "sha256": file_sha256(path)}
    if cfg.hf:
        return {"kind": "hf", "name": cfg.hf}
    return {
        "kind": "bpe",
        "vocab_size": cfg.vocab_size,
        "min_frequency": cfg.min_frequency,
        "recipe": BPE_RECIPE,
    }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def eot_id(tok: Tokenizer, where: str) -> int:
    """Documents are separated by <|endoftext|>; a tokenizer without it cannot be used."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise ConfigError(f"{where}: the tokenizer has no {EOT} token, which separates documents; add it")
    return i


@cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: each printable stand-in character -> the byte it encodes."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id decodes to (0 for special tokens), as int64 [vocab_size].

    Byte-level tokenizers are exact: each character of a vocabulary token stands for one byte. Others get
    an approximation: "<0xNN>" byte-fallback tokens count 1, SentencePiece's "▁" counts as a space and a
    WordPiece "##" prefix is dropped; the rest is the UTF-8 length of the token string.
    """
    spec = json.loads(tok.to_str())
    byte_level = _has_byte_level(spec.get("decoder")) or _has_byte_level(spec.get("pre_tokenizer"))
    table = _byte_decoder()
    added = tok.get_added_tokens_decoder()
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for i in range(len(out)):
        if i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            continue
        s = tok.id_to_token(i)
        if s is None:
            continue
        if byte_level and all(c in table for c in s):
            out[i] = len(s)
        elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(s.removeprefix("##").replace("\u2581", " ").encode("utf-8"))
    return out
