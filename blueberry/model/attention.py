"""Causal grouped-query self-attention, written so a KV cache plugs in without a second code path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from blueberry.model.layers import apply_rotary


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, per layer, for the KV heads only (GQA-aware).

    `pos` is the absolute position of the next token. Tensors are preallocated to `max_len` positions.
    """

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    pos: int = 0

    @classmethod
    def empty(cls, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype) -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, D] at positions pos..pos+T; return all keys/values up to pos+T."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer: int, make_norm):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = make_norm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.gate = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias) if cfg.attn_gate else None

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None = None):
        """x [B, T, d]; rope: the (cos, sin) tables of the positions of x, or None without rotary."""
        B, T, _ = x.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm before the rotary, over head_dim
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        start = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        mask = None
        if start > 0 and T > 1:  # new queries see the whole cached prefix, and each other causally
            q_pos = torch.arange(start, start + T, device=x.device)
            mask = q_pos[:, None] >= torch.arange(k.size(2), device=x.device)[None, :]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=start == 0 and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.out(y)
