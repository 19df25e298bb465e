"""Weight-initialisation schemes (registry axis `model.init`).

Every scheme draws from the global torch RNG once per tensor, in module order, so each layer gets its
own draw (the seed reseeded per module and started every layer identical). Norm gains start at 1 and
biases at 0. `zero_init_outputs` then zeroes the residual output projections and an untied head.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from blueberry.registry import INITS


def _matrices(model):
    """(layer index or None, module name, Linear/Embedding/param) for every weight matrix."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        layer = None
        if name.startswith("blocks."):
            layer = int(name.split(".")[1])
        yield layer, name, p


def _is_residual_output(name: str) -> bool:
    return name.endswith("attn.out.weight") or name.endswith("mlp.w_out.weight")


def _reset_vectors(model):
    for name, p in model.named_parameters():
        if p.dim() == 1:
            with torch.no_grad():
                p.fill_(0.0 if name.endswith("bias") else 1.0)


@INITS.register("standard")
def init_standard(model, cfg):
    """Every matrix N(0, init_std)."""
    _reset_vectors(model)
    for _, _, p in _matrices(model):
        nn.init.normal_(p, 0.0, cfg.init_std)


@INITS.register("gpt2_scaled")
def init_gpt2_scaled(model, cfg):
    """GPT-2: N(0, init_std), residual output projections N(0, init_std / sqrt(2 * n_layers))."""
    _reset_vectors(model)
    for _, name, p in _matrices(model):
        std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if _is_residual_output(name) else cfg.init_std
        nn.init.normal_(p, 0.0, std)


def depth_aware_std(init_std: float, layer: int) -> float:
    """std_l = init_std / sqrt(2 (l + 1)) for 0-based layer l: shrinks with depth, never reaches zero."""
    return init_std / math.sqrt(2 * (layer + 1))


@INITS.register("depth_aware")
def init_depth_aware(model, cfg):
    """Block matrices of layer l drawn with depth_aware_std(init_std, l); embeddings and head N(0, init_std).

    The intent of the seed's depth-aware init (deeper layers start smaller) without its bug: its std fell
    linearly to exactly zero at the last layer, leaving that MLP dead forever.
    """
    _reset_vectors(model)
    for layer, _, p in _matrices(model):
        std = cfg.init_std if layer is None else depth_aware_std(cfg.init_std, layer)
        nn.init.normal_(p, 0.0, std)


def zero_init_outputs(model, cfg):
    """Zero the attention out-projection, the MLP down-projection and an untied head: each block starts as
    the identity and the first loss is exactly ln(vocab)."""
    with torch.no_grad():
        for _, name, p in _matrices(model):
            if _is_residual_output(name):
                p.zero_()
        if not cfg.tie_embeddings:
            model.head.weight.zero_()
