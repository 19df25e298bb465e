"""The data pipeline: sources, document split, tokenizer, cached shards, batches, bits per byte, CLI."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import blueberry.data.cache as cache_mod
from blueberry.config import load_config
from blueberry.data import (
    EOT,
    DataWarning,
    TokenBatcher,
    bits_per_byte,
    prepare,
    split_documents,
    strip_stage_notes,
    token_byte_lengths,
    val_windows,
)
from blueberry.errors import BlueberryError, ConfigError

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the union state nation people congress law peace war trade money year great free public service "
    "country government world power report policy budget tax work family school health future history "
    "café naïve 日本 — über señor"
).split()
N_DOCS = 14


def make_docs(n: int = N_DOCS, seed: int = 0) -> list[str]:
    """Pseudo-English documents, each with a unique marker so its tokens can be traced to a split."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(12)]
        docs.append(f"DOCMARK{i:03d} begins.\n" + "\n".join(lines) + "\n")
    return docs


def write_txt_folder(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8")
    return folder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_txt_folder(tmp_path / "corpus", make_docs())


def cfg_for(source: Path | str, cache: Path, *extra: str):
    sets = [
        f"data.source={source}",
        f"data.cache_dir={cache}",
        "tokenizer.vocab_size=300",
        "eval.val_tokens=64",
        "data.val_fraction=0.25",
        *extra,
    ]
    return load_config(None, sets)


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def split_stream(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    return np.split(np.asarray(tokens), ends + 1)[:-1]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_text(corpus, tmp_path):
    data = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    tok = data.load_tokenizer()
    text = "The nation — café, naïve 日本!\n  Tabs\tand ✓ emoji 🫐 survive.\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert data.vocab_size == tok.get_vocab_size() == 300
    assert tok.id_to_token(data.eot_id) == EOT


def test_token_bytes_are_exact_utf8_lengths(corpus, tmp_path):
    data = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    tok = data.load_tokenizer()
    for text in ["café — naïve 日本", "plain ascii words", "🫐🫐 über\n\n señor"]:
        ids = tok.encode(text).ids
        assert int(data.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert data.token_bytes[data.eot_id] == 0
    assert data.token_bytes.dtype == np.int64 and len(data.token_bytes) == data.vocab_size
    # The whole validation stream: document bytes, <|endoftext|> counting zero.
    val_stream = np.fromfile(data.cache_dir / "val.bin", dtype=data.manifest["dtype"])
    assert int(data.token_bytes[val_stream].sum()) == data.manifest["bytes"]["val"]


def test_token_bytes_approximates_non_byte_level_tokenizers():
    vocab = {EOT: 0, "[UNK]": 1, "hello": 2, "▁wor": 3, "##ld": 4, "<0x41>": 5, "日本": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens([EOT])
    assert token_byte_lengths(tok).tolist() == [0, 5, 5, 4, 2, 1, 6]


def test_bits_per_byte_hand_checked():
    # 3 tokens at probability 1/4 each: 3 * ln 4 nats = 6 bits, over 3 bytes -> 2 bits per byte.
    assert bits_per_byte(3 * math.log(4), 3) == pytest.approx(2.0)
    # A uniform model over 256 symbols, one byte per token, costs exactly 8 bits per byte.
    assert bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_bits_per_byte_over_val_windows_uses_target_bytes(corpus, tmp_path):
    data = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    _, y = val_windows(data.val_tokens, 16)
    n_bytes = int(data.token_bytes[y.numpy()].sum())
    uniform = y.numel() * math.log(data.vocab_size)  # a model that knows nothing
    assert bits_per_byte(uniform, n_bytes) == pytest.approx(y.numel() * math.log2(data.vocab_size) / n_bytes)


# ---------------------------------------------------------------------------------------------------------
# Split and validation slice


def test_split_by_document_is_disjoint(corpus, tmp_path):
    data = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    tok = data.load_tokenizer()
    val_stream = np.fromfile(data.cache_dir / "val.bin", dtype=data.manifest["dtype"])

    def markers(tokens):
        found = [
            re.findall(r"DOCMARK\d{3}", tok.decode(doc.tolist())) for doc in split_stream(tokens, data.eot_id)
        ]
        assert all(len(m) == 1 for m in found)  # every document is whole, with its single marker
        return {m[0] for m in found}

    train, val = markers(data.train_tokens), markers(val_stream)
    assert train and val and not train & val
    assert train | val == {f"DOCMARK{i:03d}" for i in range(N_DOCS)}
    assert data.manifest["documents"] == {"train": len(train), "val": len(val)}


def test_split_keeps_one_document_on_each_side():
    for n in (2, 3, 50):
        for frac in (1e-6, 0.5, 0.999999):
            is_val = split_documents(n, frac)
            assert any(is_val) and not all(is_val)
    assert split_documents(100, 0.1) == split_documents(100, 0.1)
    assert split_documents(100, 0.1)[:50] == split_documents(50, 0.1)  # stable under appending documents


def test_validation_slice_is_fixed_across_prepares_and_caches(corpus, tmp_path):
    a = prepare(cfg_for(corpus, tmp_path / "c1"), progress=False)
    b = prepare(cfg_for(corpus, tmp_path / "c2"), progress=False)
    c = prepare(cfg_for(corpus, tmp_path / "c1"), progress=False)
    assert len(a.val_tokens) == 65
    assert np.array_equal(a.val_tokens, b.val_tokens) and np.array_equal(a.val_tokens, c.val_tokens)
    assert np.array_equal(a.train_tokens, b.train_tokens)
    val_stream = np.fromfile(a.cache_dir / "val.bin", dtype=a.manifest["dtype"])
    assert np.array_equal(a.val_tokens, val_stream[:65])


def test_short_validation_split_warns_and_uses_all_of_it(corpus, tmp_path):
    with pytest.warns(DataWarning, match="eval.val_tokens"):
        data = prepare(cfg_for(corpus, tmp_path / "cache", "eval.val_tokens=10M"), progress=False)
    assert len(data.val_tokens) == data.manifest["tokens"]["val"]


def test_max_docs_and_max_bytes_limit_the_corpus(corpus, tmp_path):
    data = prepare(cfg_for(corpus, tmp_path / "cache", "data.max_docs=5"), progress=False)
    assert sum(data.manifest["documents"].values()) == 5
    docs = make_docs()
    limit = len(docs[0].encode()) * 3 + 100
    data = prepare(cfg_for(corpus, tmp_path / "cache", f"data.max_bytes={limit}"), progress=False)
    assert sum(data.manifest["documents"].values()) == 4
    assert sum(data.manifest["bytes"].values()) <= limit


# ---------------------------------------------------------------------------------------------------------
# Cache


def test_cached_prepare_does_not_reread_or_retrain(corpus, tmp_path, monkeypatch):
    first = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cache_mod, "train_bpe", boom)
    monkeypatch.setattr(cache_mod, "load_documents", boom)
    second = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    assert second.cache_dir == first.cache_dir
    assert isinstance(second.train_tokens, np.memmap)
    assert np.array_equal(first.train_tokens, second.train_tokens)


def test_cache_is_invalidated_when_corpus_or_vocab_changes(corpus, tmp_path):
    cache = tmp_path / "cache"
    base = prepare(cfg_for(corpus, cache), progress=False)
    bigger = prepare(cfg_for(corpus, cache, "tokenizer.vocab_size=320"), progress=False)
    assert bigger.cache_dir != base.cache_dir and bigger.vocab_size == 320
    with open(corpus / "doc_000.txt", "a", encoding="utf-8") as f:
        f.write("An amendment to the first document.\n")
    edited = prepare(cfg_for(corpus, cache), progress=False)
    assert edited.cache_dir != base.cache_dir
    assert edited.manifest["bytes"] != base.manifest["bytes"]


@pytest.mark.parametrize("damage", ["truncate_train", "delete_manifest", "edit_tokenizer"])
def test_corrupt_cache_entry_is_rebuilt(corpus, tmp_path, monkeypatch, damage):
    cfg = cfg_for(corpus, tmp_path / "cache")
    good = prepare(cfg, progress=False)
    expected = np.array(good.train_tokens)
    entry = good.cache_dir
    if damage == "truncate_train":
        with open(entry / "train.bin", "r+b") as f:
            f.truncate(10)
    elif damage == "delete_manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "tokenizer.json").write_text(
            (entry / "tokenizer.json").read_text().replace("endoftext", "endoftexT")
        )
    # The tokenizer is cached on its own, so a shard rebuild does not retrain it.
    monkeypatch.setattr(cache_mod, "train_bpe", lambda *a, **k: pytest.fail("retrained the tokenizer"))
    with pytest.warns(DataWarning, match="rebuilding"):
        rebuilt = prepare(cfg, progress=False)
    assert rebuilt.cache_dir == entry
    assert np.array_equal(rebuilt.train_tokens, expected)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_publish_keeps_an_existing_valid_entry(corpus, tmp_path):
    good = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    other = tmp_path / "cache" / "shards" / ".tmp-other"
    other.mkdir()
    (other / "train.bin").write_bytes(b"not ours")
    cache_mod._publish(other, good.cache_dir, good.manifest["key"])
    assert (good.cache_dir / "manifest.json").is_file()
    assert (good.cache_dir / "train.bin").stat().st_size == good.manifest["files"]["train.bin"]["bytes"]


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_txt_folder_jsonl_and_parquet_read_identically(tmp_path):
    import pandas as pd

    docs = make_docs()
    rows = [{"id": i, "body": d} for i, d in enumerate(docs)]
    txt = write_txt_folder(tmp_path / "txt", docs)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    cache = tmp_path / "cache"
    results = [
        prepare(cfg_for(txt, cache), progress=False),
        prepare(cfg_for(jsonl, cache, "data.text_field=body"), progress=False),
        prepare(cfg_for(parquet, cache, "data.text_field=body"), progress=False),
        prepare(cfg_for(str(txt / "doc_*.txt"), cache), progress=False),
    ]
    assert len({r.cache_dir for r in results}) == 4
    for r in results[1:]:
        assert np.array_equal(r.train_tokens, results[0].train_tokens)
        assert np.array_equal(r.val_tokens, results[0].val_tokens)


def test_default_corpus_stage_notes_are_stripped():
    text = (
        "Thank you. [Applause] We will [laughter] go on.\n[At this point, the audience stood.]\n"
        "The [the] act of [1817-03-04] and [we're; White House correction] done."
    )
    assert (
        strip_stage_notes(text)
        == "Thank you. We will go on.\n\nThe [the] act of [1817-03-04] and we're done."
    )


def test_hf_source_offline_is_one_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BlueberryError) as e:
        prepare(cfg_for("hf:someone/corpus:en", tmp_path / "cache"), progress=False)
    msg = one_line_error(e)
    assert "could not download dataset hf:someone/corpus:en" in msg and "data.source" in msg
    assert not (tmp_path / "cache" / "shards").exists() or not any((tmp_path / "cache" / "shards").iterdir())


def test_hf_tokenizer_offline_is_one_clear_error(corpus, tmp_path, monkeypatch):
    def offline(name):
        raise RuntimeError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(Tokenizer, "from_pretrained", offline)
    with pytest.raises(BlueberryError) as e:
        prepare(cfg_for(corpus, tmp_path / "cache", "tokenizer.hf=gpt2"), progress=False)
    assert "tokenizer.hf=gpt2" in one_line_error(e) and "tokenizer.path" in str(e.value)


def test_saved_tokenizer_path_is_used_and_checked(corpus, tmp_path):
    trained = prepare(cfg_for(corpus, tmp_path / "cache"), progress=False)
    saved = tmp_path / "tok.json"
    trained.load_tokenizer().save(str(saved))
    data = prepare(cfg_for(corpus, tmp_path / "cache", f"tokenizer.path={saved}"), progress=False)
    assert data.vocab_size == 300 and np.array_equal(data.train_tokens, trained.train_tokens)
    with pytest.raises(ConfigError) as e:
        prepare(
            cfg_for(corpus, tmp_path / "cache", f"tokenizer.path={saved}", "model.vocab_size=512"),
            progress=False,
        )
    assert "model.vocab_size=512" in one_line_error(e)

    no_eot = Tokenizer(models.BPE())
    no_eot.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    no_eot.train_from_iterator(make_docs(), trainers.BpeTrainer(vocab_size=270, show_progress=False))
    no_eot.save(str(tmp_path / "no_eot.json"))
    with pytest.raises(ConfigError) as e:
        prepare(
            cfg_for(corpus, tmp_path / "cache", f"tokenizer.path={tmp_path / 'no_eot.json'}"), progress=False
        )
    assert EOT in one_line_error(e) and "no_eot.json" in str(e.value)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra --set items, expected message fragment)."""
    (tmp / "empty").mkdir()
    (tmp / "empty" / "a.txt").write_text("  \n")
    (tmp / "empty" / "b.txt").write_text("")
    (tmp / "binary").mkdir()
    write_txt_folder(tmp / "binary", make_docs(3))
    (tmp / "binary" / "zz.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    (tmp / "broken.parquet").write_bytes(b"PAR1 garbage")
    (tmp / "rows.jsonl").write_text('{"id": 1, "body": "x y"}\n{"id": 2, "body": "z"}\n')
    (tmp / "table.csv").write_text("text\nhello\n")
    write_txt_folder(tmp / "single", make_docs(1))
    (tmp / "a_file").write_text("not a folder")
    return {
        "missing": ([f"data.source={tmp / 'nowhere'}"], "no such file or folder"),
        "empty": ([f"data.source={tmp / 'empty'}"], "corpus is empty"),
        "not_utf8": ([f"data.source={tmp / 'binary'}"], "zz.txt"),
        "bad_parquet": ([f"data.source={tmp / 'broken.parquet'}"], "broken.parquet"),
        "text_field": ([f"data.source={tmp / 'rows.jsonl'}", "data.text_field=txt"], "available: id, body"),
        "csv": ([f"data.source={tmp / 'table.csv'}"], "unsupported file type"),
        "one_doc": ([f"data.source={tmp / 'single'}"], "at least 2"),
        "vocab": (["tokenizer.vocab_size=20000"], "supports only"),
        "tok_missing": ([f"tokenizer.path={tmp / 'nope.json'}"], "tokenizer.path: file not found"),
        "max_docs": (["data.max_docs=0"], "data.max_docs"),
        "cache_unwritable": ([f"data.cache_dir={tmp / 'a_file'}"], "cannot write the data cache"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "not_utf8",
        "bad_parquet",
        "text_field",
        "csv",
        "one_doc",
        "vocab",
        "tok_missing",
        "max_docs",
        "cache_unwritable",
    ],
)
def test_bad_input_is_one_line_error_and_leaves_no_cache(corpus, tmp_path, case):
    sets, fragment = _bad_inputs(tmp_path)[case]
    cache = tmp_path / "cache"
    with pytest.raises(BlueberryError) as e:
        prepare(cfg_for(corpus, cache, *sets), progress=False)
    assert fragment in one_line_error(e)
    shards = cache / "shards"
    assert not shards.exists() or not any(shards.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Batches


def test_token_batcher_is_deterministic_per_seed_and_rank():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = TokenBatcher(tokens, seq_len=16, batch_size=4, seed=7)
    b = TokenBatcher(tokens, seq_len=16, batch_size=4, seed=7)
    r1 = TokenBatcher(tokens, seq_len=16, batch_size=4, seed=7, rank=1)
    for _ in range(3):
        (xa, ya), (xb, yb), (xr, _) = a.next(), b.next(), r1.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xr)
        assert xa.dtype == ya.dtype == torch.int64 and xa.shape == ya.shape == (4, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        assert torch.equal(ya, xa + 1)  # the stream is arange: each window is contiguous


def test_token_batcher_resumes_exactly_from_state_dict():
    tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    a = TokenBatcher(tokens, seq_len=8, batch_size=3, seed=1)
    for _ in range(5):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next() for _ in range(4)]
    b = TokenBatcher(tokens, seq_len=8, batch_size=3, seed=99)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, (b.next() for _ in range(4))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    with pytest.raises(BlueberryError, match="seq_len"):
        TokenBatcher(tokens, seq_len=16, batch_size=3, seed=1).load_state_dict(state)


def test_token_batcher_rejects_a_stream_shorter_than_a_window():
    with pytest.raises(BlueberryError, match="model.seq_len"):
        TokenBatcher(np.arange(8, dtype=np.uint16), seq_len=8, batch_size=1, seed=0)
    TokenBatcher(np.arange(9, dtype=np.uint16), seq_len=8, batch_size=1, seed=0).next()


def test_val_windows_are_non_overlapping_and_shifted():
    val = np.arange(2 * 16 + 5, dtype=np.uint16)
    x, y = val_windows(val, 16)
    assert x.shape == y.shape == (2, 16) and x.dtype == y.dtype == torch.int64
    assert x[1, 0] == 16 and torch.equal(y, x + 1)
    x, _ = val_windows(np.arange(33, dtype=np.uint16), 16)
    assert x.shape == (2, 16)
    with pytest.raises(BlueberryError, match="eval.val_tokens"):
        val_windows(np.arange(16, dtype=np.uint16), 16)


# ---------------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "blueberry.data", "prepare", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_prepares_concurrently_without_corrupting_the_cache(corpus, tmp_path):
    cache = tmp_path / "cache"
    sets = [
        "--set",
        f"data.source={corpus}",
        "--set",
        "tokenizer.vocab_size=300",
        "--set",
        f"data.cache_dir={cache}",
        "--set",
        "data.val_fraction=0.25",
    ]
    procs = [_cli(*sets), _cli(*sets)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "documents" in out and "cache" in out
    entries = list((cache / "shards").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    data = prepare(cfg_for(corpus, cache), progress=False)
    assert data.cache_dir == entries[0]


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    p = _cli(
        "--set",
        "data.source=hf:nobody/nothing",
        "--set",
        f"data.cache_dir={tmp_path}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.source=hf:nobody/nothing: could not download")


# ---------------------------------------------------------------------------------------------------------
# The real corpus


@pytest.mark.slow
def test_default_corpus_reaches_full_vocab(tmp_path):
    cfg = load_config(None, [f"data.cache_dir={tmp_path}"])
    data = prepare(cfg, progress=False)
    assert data.vocab_size == 24576 == cfg.tokenizer.vocab_size
    assert sum(data.manifest["documents"].values()) == 249
    assert data.manifest["documents"]["val"] >= 1 and data.train_tokens.dtype == np.uint16
    assert len(data.val_tokens) == cfg.eval.val_tokens + 1
    text = data.load_tokenizer().decode(np.asarray(data.train_tokens).tolist())
    assert "[Applause]" not in text and "[Laughter]" not in text and "Fellow-Citizens" in text
