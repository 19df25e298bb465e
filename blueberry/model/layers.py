"""Norms, MLPs, residual placements and position schemes: each a registered, swappable component."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from blueberry.registry import MLPS, NORM_PLACEMENTS, NORMS, POSITIONS

# ---- norms -------------------------------------------------------------------------------------------


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm with a gain and a bias (GPT-2)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)


# ---- residual placements: how a sublayer f and its norms wrap the residual stream --------------------


@NORM_PLACEMENTS.register("pre")
class PreNorm(nn.Module):
    """x + f(N(x)): GPT-2/Llama. Needs a final norm before the head."""

    final_norm = True

    def __init__(self, make_norm):
        super().__init__()
        self.norm = make_norm()

    def forward(self, x, f):
        return x + f(self.norm(x))


@NORM_PLACEMENTS.register("post")
class PostNorm(nn.Module):
    """N(x + f(x)): the original Transformer. The stream is already normalised, so no final norm."""

    final_norm = False

    def __init__(self, make_norm):
        super().__init__()
        self.norm = make_norm()

    def forward(self, x, f):
        return self.norm(x + f(x))


@NORM_PLACEMENTS.register("sandwich")
class SandwichNorm(nn.Module):
    """x + N2(f(N1(x))): the seed's pre- and post-sublayer RMSNorm."""

    final_norm = True

    def __init__(self, make_norm):
        super().__init__()
        self.pre = make_norm()
        self.post = make_norm()

    def forward(self, x, f):
        return x + self.post(f(self.pre(x)))


# ---- MLPs: `w_in` maps d -> (2x if gated) d_ff, `w_out` maps d_ff -> d ------------------------------


class GatedMLP(nn.Module):
    """w_out(act(gate) * up) with gate and up computed by one fused matmul."""

    act = staticmethod(F.silu)

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(self.act(gate) * up)


class PlainMLP(nn.Module):
    """w_out(act(w_in x))."""

    act = staticmethod(F.gelu)

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.w_in = nn.Linear(d_model, d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        return self.w_out(self.act(self.w_in(x)))


@MLPS.register("swiglu")
class SwiGLU(GatedMLP):
    act = staticmethod(F.silu)


@MLPS.register("geglu")
class GeGLU(GatedMLP):
    act = staticmethod(F.gelu)


@MLPS.register("gelu")
class GeluMLP(PlainMLP):
    act = staticmethod(F.gelu)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


@MLPS.register("relu2")
class ReLU2MLP(PlainMLP):
    """ReLU(x)^2 (modded-nanogpt, Primer)."""

    act = staticmethod(relu_squared)


# ---- position schemes ----------------------------------------------------------------------------------
# A position module has `embed(pos) -> [T, d] | None` (added to token embeddings) and
# `rotary(pos) -> (cos, sin) | None` (tables for `apply_rotary`, computed once per forward and applied to
# q and k in every layer); `pos` is a LongTensor of absolute positions.


@POSITIONS.register("none")
class NoPosition(nn.Module):
    """NoPE: the causal mask is the only source of order."""

    def __init__(self, cfg):
        super().__init__()

    def embed(self, pos):
        return None

    def rotary(self, pos):
        return None

    def rotate(self, q, k, pos):
        """q and k as attention sees them at positions `pos` (a convenience; the model uses `rotary`)."""
        table = self.rotary(pos)
        if table is None:
            return q, k
        return apply_rotary(q, *table), apply_rotary(k, *table)


@POSITIONS.register("learned")
class LearnedPosition(NoPosition):
    """GPT-2 absolute position embeddings, one row per position up to seq_len."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seq_len = cfg.seq_len
        self.weight = nn.Parameter(torch.empty(cfg.seq_len, cfg.d_model))

    def embed(self, pos):
        return F.embedding(pos, self.weight)


@POSITIONS.register("rope")
class RotaryPosition(NoPosition):
    """Rotary embeddings over the *sequence* axis of [B, H, T, D] tensors (the seed rotated the head axis).

    With rope_fraction < 1 only the first share of frequency pairs rotate; the rest get frequency 0
    (identity), as in modded-nanogpt's half-truncated RoPE.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        half = cfg.head_dim // 2
        n_rot = max(1, round(half * cfg.rope_fraction))
        inv = cfg.rope_theta ** (-torch.arange(n_rot, dtype=torch.float64) / n_rot)
        inv = torch.cat([inv, torch.zeros(half - n_rot, dtype=torch.float64)])
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, D] tables (cos, cos) and (-sin, sin) over the two halves of head_dim, in float32."""
        angles = pos.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of x [B, H, T, D] by its angle, in x's dtype.

    x * (cos, cos) + (x2, x1) * (-sin, sin) = (x1 cos - x2 sin, x2 cos + x1 sin); tables from `rotary`.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap)


def rms(x: torch.Tensor) -> float:
    return math.sqrt(float(x.float().square().mean()))
