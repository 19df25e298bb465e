"""Batches for training and evaluation, and the bits-per-byte conversion.

Training draws random contiguous windows from the token stream (no epochs to track, any resume point is
just an RNG state); evaluation uses every non-overlapping window of the fixed validation slice, so every
run is scored on exactly the same tokens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from blueberry.errors import BlueberryError


class TokenBatcher:
    """Random contiguous windows of seq_len+1 tokens from the train stream.

    Micro-batch number g of a run is drawn from its own RNG seeded by (seed, g). Rank r of W draws
    g = r, r + W, r + 2W, ...; so W DDP ranks with accumulation A see exactly the micro-batches that one
    process with accumulation A x W sees, and the whole loader state is one counter.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        device: str | torch.device = "cpu",
        world_size: int = 1,
    ):
        if seq_len <= 0 or batch_size <= 0:
            raise BlueberryError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if len(tokens) < seq_len + 1:
            raise BlueberryError(
                f"the training stream has {len(tokens):,} tokens, fewer than model.seq_len + 1 = {seq_len + 1}; "
                "use more data or a shorter model.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.draws = 0  # micro-batches this rank has drawn
        self.device = torch.device(device)
        self._offsets = np.arange(seq_len + 1)
        self._pin = self.device.type == "cuda"

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 [B, T] on the device; y[:, t] is the token after x[:, t] (y is x shifted by one)."""
        g = self.draws * self.world_size + self.rank  # the global micro-batch number
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, g])))
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.draws += 1
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        if self._pin:
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            windows = windows.to(self.device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the draw counter is all the position this sampler has."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_tokens": int(len(self.tokens)),
            "draws": self.draws,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved batcher stopped (on the same data and shapes)."""
        for k in ("seq_len", "batch_size", "n_tokens", "world_size"):
            mine = getattr(self, k) if k != "n_tokens" else len(self.tokens)
            if state.get(k) != mine:
                raise BlueberryError(
                    f"cannot resume the data loader: it was saved with {k}={state.get(k)}, this run has {mine}"
                )
        self.seed, self.rank, self.draws = state["seed"], state["rank"], state["draws"]


def val_windows(val_tokens: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows: x[i] = val[i*T:(i+1)*T], y[i] = val[i*T+1:(i+1)*T+1], int64 [N, T]."""
    n = (len(val_tokens) - 1) // seq_len
    if n <= 0:
        raise BlueberryError(
            f"the validation slice has {len(val_tokens):,} tokens, too few for one window of model.seq_len="
            f"{seq_len} plus its target; raise eval.val_tokens or data.val_fraction"
        )
    val = torch.from_numpy(np.asarray(val_tokens[: n * seq_len + 1]).astype(np.int64))
    return val[:-1].view(n, seq_len), val[1:].view(n, seq_len)


def bits_per_byte(nll_sum_nats: float, n_bytes: int) -> float:
    """Summed token NLL (nats) per byte of text, in bits: comparable across tokenizers, unlike per-token loss."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return float(nll_sum_nats) / (math.log(2) * n_bytes)
