"""The Blueberry Transformer: a decoder-only LM whose every architecture choice comes from a registry.

Registry lookups happen once, in __init__; forward is straight-line code.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from blueberry.config import ModelConfig
from blueberry.model.attention import CausalSelfAttention, KVCache
from blueberry.model.init import zero_init_outputs
from blueberry.model.layers import softcap
from blueberry.registry import INITS, MLPS, NORM_PLACEMENTS, NORMS, POSITIONS


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm_cls, placement = NORMS.get(cfg.norm), NORM_PLACEMENTS.get(cfg.norm_placement)
        make_norm = partial(norm_cls, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer, make_norm)
        self.mlp = MLPS.get(cfg.mlp)(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.attn_res = placement(partial(make_norm, cfg.d_model))
        self.mlp_res = placement(partial(make_norm, cfg.d_model))

    def forward(self, x, rope, cache=None):
        x = self.attn_res(x, lambda h: self.attn(h, rope, cache))
        return self.mlp_res(x, self.mlp)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (it normally follows the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = POSITIONS.get(cfg.position)(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        placement = NORM_PLACEMENTS.get(cfg.norm_placement)
        self.final_norm = (
            NORMS.get(cfg.norm)(cfg.d_model, eps=cfg.norm_eps) if placement.final_norm else nn.Identity()
        )
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.embed_mult = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        INITS.get(self.cfg.init)(self, self.cfg)
        if self.cfg.zero_init_outputs:
            zero_init_outputs(self, self.cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx [B, T] -> logits [B, T, V]; with targets, (logits, mean cross-entropy).

        With a KV cache, idx holds the tokens after the `cache.pos` already cached ones.
        """
        T = idx.size(1)
        start = 0 if cache is None else cache.pos
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.embed(idx) * self.embed_mult
        pos_emb = self.position.embed(pos)
        if pos_emb is not None:
            x = x + pos_emb
        rope = self.position.rotary(pos)  # one (cos, sin) table for every layer, or None
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        logits = self.head(self.final_norm(x))
        if self.cfg.logit_softcap is not None:
            logits = softcap(logits, self.cfg.logit_softcap)
        if targets is None:
            return logits
        return logits, cross_entropy(logits, targets)

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        c = self.cfg
        ref = self.head.weight
        return KVCache.empty(
            c.n_layers, batch, c.n_kv_heads, max_len or c.seq_len, c.head_dim, ref.device, dtype or ref.dtype
        )


CPU_LOSS_CHUNK = 2**22  # logits per cross-entropy slab on the CPU: 16 MB in float32


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CPU_LOSS_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...], computed in float32.

    Eager on the CPU it runs a slab of `chunk` logits at a time, so the float32 copy, the log-softmax and
    their gradients never exist at full [B*T, V] size (0.4 GB each at the seed's size): a few slab-sized
    buffers are reused instead of fresh pages being mapped and zero-filled every step. GPUs and compiled
    graphs take one call: their allocator and fused kernels already avoid that (slabs measured slower).
    """
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = max(1, chunk // logits.size(-1))
    if logits.device.type != "cpu" or torch.compiler.is_compiling() or logits.size(0) <= rows:
        return F.cross_entropy(logits.float(), targets)
    total = sum(
        F.cross_entropy(part.float(), t, reduction="sum")
        for part, t in zip(logits.split(rows), targets.split(rows))
    )
    return total / (targets != -100).sum()  # the mean over targets F.cross_entropy does not ignore


def build_model(cfg: ModelConfig) -> Transformer:
    """Build the model on the CPU with the current torch RNG (seed it first for reproducible weights)."""
    return Transformer(cfg)


# ---- sizes and FLOPs ------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> dict[str, int]:
    """total (tied storage counted once) and non_embedding (without token/position embedding tables)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.embed.weight.numel()
    if isinstance(getattr(model.position, "weight", None), torch.Tensor):
        emb += model.position.weight.numel()
    non_emb = total - emb
    if model.cfg.tie_embeddings:  # the tied table is also the head, a real matmul: count it as non-embedding
        non_emb += model.head.weight.numel()
    return {"total": total, "non_embedding": non_emb}


def analytic_param_count(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (tested against the built model)."""
    d, hd, L, V, f = cfg.d_model, cfg.head_dim, cfg.n_layers, cfg.vocab_size, cfg.ffn_dim
    kv = cfg.n_kv_heads * hd
    norm_p = 2 * d if cfg.norm == "layernorm" else d
    per_norm_count = 2 if cfg.norm_placement == "sandwich" else 1
    gated = cfg.mlp in ("swiglu", "geglu")
    bias = cfg.bias
    attn = d * (d + 2 * kv) + d * d + (d + 2 * kv + d if bias else 0)
    if cfg.qk_norm:
        attn += 2 * (2 * hd if cfg.norm == "layernorm" else hd)
    if cfg.attn_gate:
        attn += d * d + (d if bias else 0)
    mlp = d * f * (2 if gated else 1) + f * d + ((2 * f if gated else f) + d if bias else 0)
    block = attn + mlp + 2 * per_norm_count * norm_p
    final = norm_p if cfg.norm_placement != "post" else 0
    emb = V * d + (cfg.seq_len * d if cfg.position == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * d
    return emb + L * block + final + head


def flops_per_token(cfg: ModelConfig, n_matmul_params: int) -> int:
    """Training FLOPs per token: 6 N (N = parameters used in matmuls, head included) + 12 L T d (attention)."""
    return 6 * n_matmul_params + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: everything except embedding tables (the head counts)."""
    return count_params(model)["non_embedding"]
