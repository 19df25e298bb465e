"""Checkpoints: a folder with safetensors weights, a JSON manifest, optimizer/RNG state and the tokenizer.

    <dir>/model.safetensors   weights (no pickle)
    <dir>/optimizer.pt        optimizer + RNG state, loaded with torch.load(weights_only=True)
    <dir>/tokenizer.json      the tokenizer the model was trained with (when known)
    <dir>/meta.json           resolved config, config_hash, step, tokens, train time, loader state, and the
                              sha256 of every other file; written last, so its presence means "complete"

A checkpoint is written into a temporary sibling folder and renamed into place; the previous one is kept
as `<dir>.prev` until the new one is in place, so a crash at any point leaves at least one good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blueberry.config import RunConfig, build_config
from blueberry.errors import BlueberryError

MODEL_FILE, OPTIM_FILE, TOKENIZER_FILE, META_FILE = "model.safetensors", "optimizer.pt", "tokenizer.json", "meta.json"


class CheckpointError(BlueberryError):
    """A checkpoint is missing, incomplete or corrupt."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def config(self) -> RunConfig:
        """The run's config; its `plugins` are imported first, so plugin components resolve."""
        return build_config(self.meta["config"], where=f"{self.path / META_FILE}")

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / MODEL_FILE)

    def optimizer_state(self) -> dict[str, Any]:
        """Tensors and plain containers only (weights_only): a pickled object is refused, never run."""
        try:
            return torch.load(self.path / OPTIM_FILE, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            lines = [s.strip() for s in str(e).splitlines() if "global" in s.lower()] or ["unpickling failed"]
            reason = lines[0][:200]
            raise CheckpointError(
                f"{self.path / OPTIM_FILE}: refused: it holds objects other than tensors and plain containers ({reason})"
            ) from None

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (id(t),)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    cfg: RunConfig,
    meta: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    tokenizer_path: Path | None = None,
) -> Path:
    """Write a complete checkpoint to `path` atomically; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    prev = path.with_name(path.name + ".prev")
    _sweep_stale_tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(unique_state_dict(model), tmp / MODEL_FILE)
        files = [MODEL_FILE]
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIM_FILE)
            files.append(OPTIM_FILE)
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            files.append(TOKENIZER_FILE)
        full = dict(meta)
        full["config"] = cfg.to_dict()
        full["config_hash"] = cfg.config_hash
        full["files"] = {f: _sha256(tmp / f) for f in files}
        with open(tmp / META_FILE, "w") as f:
            json.dump(full, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(path, prev)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(prev, ignore_errors=True)
    except OSError as e:  # e.g. a full disk: the previous checkpoint is still in place
        shutil.rmtree(tmp, ignore_errors=True)
        kept = next((str(p) for p in (path, prev) if (p / META_FILE).is_file()), None)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {e.strerror or e}"
            + (f"; the previous checkpoint {kept} is intact" if kept else "")
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _sweep_stale_tmp(path: Path) -> None:
    """Delete temporary folders of `path` left by writers that were killed (their pid is gone)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def verify_checkpoint(path: Path) -> Checkpoint:
    """Open a checkpoint, checking that every file is present and matches its recorded sha256."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        meta["config"]  # noqa: B018 - must exist
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {META_FILE}: {e}") from None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: corrupt {META_FILE}: no file list")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")
    return Checkpoint(path, meta)


def find_checkpoint(path: Path) -> Checkpoint | None:
    """The newest good checkpoint at `path` or, if that is missing/corrupt, its `.prev` sibling.

    A fall-back is never silent: one warning line on stderr says what was wrong and what is used instead.
    """
    path = Path(path)
    prev = path.with_name(path.name + ".prev")
    problem = None
    if path.exists():
        try:
            return verify_checkpoint(path)
        except CheckpointError as e:
            problem = str(e)
    elif prev.exists():
        problem = f"{path}: missing (a save was interrupted)"
    if prev.exists():
        try:
            ckpt = verify_checkpoint(prev)
        except CheckpointError as e:
            problem = f"{problem}; {e}"
        else:
            _warn(f"{problem}; falling back to the previous checkpoint {prev}")
            return ckpt
    if problem:
        _warn(f"{problem}; no usable checkpoint left, so the run starts over from step 0")
    return None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def load_model(path: Path, device: str | torch.device = "cpu"):
    """(model, RunConfig, tokenizer or None, meta) from a checkpoint folder, for inference."""
    from blueberry.model import build_model

    ckpt = verify_checkpoint(path)
    cfg = ckpt.config
    model = build_model(cfg.model)
    state = ckpt.model_state()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    tokenizer = None
    if ckpt.tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_path))
    return model.to(device).eval(), cfg, tokenizer, ckpt.meta
