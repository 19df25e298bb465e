"""Optimizers (registry axis `optim.name`) and the routing table that sends each parameter to one.

`adamw`: torch.optim.AdamW for everything (fused on CUDA); no weight decay on gains, biases and embeddings.
`muon`: torch.optim.Muon for the hidden 2-D matrices (attention and MLP weights), AdamW for the embedding,
the head, norm gains and biases; `head_in_muon: true` reproduces the seed, which put the head in Muon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from blueberry.config import OptimConfig
from blueberry.registry import OPTIMIZERS


@dataclass(frozen=True)
class Route:
    name: str
    shape: tuple[int, ...]
    optimizer: str
    lr: float
    weight_decay: float


class MultiOptimizer:
    """Several optimizers stepped as one; exposes the union of their param_groups (for LR scheduling)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], routes: list[Route]):
        self.optimizers = optimizers
        self.routes = routes
        for g in self.param_groups:
            g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, mult: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * mult

    def set_momentum(self, momentum: float) -> None:
        for o in self.optimizers:
            if isinstance(o, torch.optim.Muon):
                for g in o.param_groups:
                    g["momentum"] = momentum

    def state_dict(self):
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states):
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)
        for g in self.param_groups:  # base_lr is ours, not torch's: keep it across a resume
            g.setdefault("base_lr", g["lr"])


def _unique_named_params(model: nn.Module):
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _is_embedding(name: str) -> bool:
    return name.startswith("embed.") or name.startswith("position.")


def _adamw(groups, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


@OPTIMIZERS.register("adamw")
def build_adamw(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> MultiOptimizer:
    decay, no_decay, routes = [], [], []
    for name, p in _unique_named_params(model):
        wd = cfg.weight_decay if (p.dim() >= 2 and (cfg.decay_embeddings or not _is_embedding(name))) else 0.0
        (decay if wd else no_decay).append(p)
        routes.append(Route(name, tuple(p.shape), "adamw", cfg.lr, wd))
    groups = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
    ]
    return MultiOptimizer([_adamw([g for g in groups if g["params"]], cfg, device_type)], routes)


@OPTIMIZERS.register("muon")
def build_muon(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> MultiOptimizer:
    muon, adam_decay, adam_plain, routes = [], [], [], []
    for name, p in _unique_named_params(model):
        is_head = name.startswith("head.")
        if p.dim() == 2 and not _is_embedding(name) and (not is_head or cfg.head_in_muon):
            muon.append(p)
            routes.append(Route(name, tuple(p.shape), "muon", cfg.lr, cfg.weight_decay))
        elif p.dim() >= 2 and (cfg.decay_embeddings or not _is_embedding(name)):
            adam_decay.append(p)
            routes.append(Route(name, tuple(p.shape), "adamw", cfg.adam_lr, cfg.weight_decay))
        else:
            adam_plain.append(p)
            routes.append(Route(name, tuple(p.shape), "adamw", cfg.adam_lr, 0.0))
    opts: list[torch.optim.Optimizer] = []
    if muon:
        opts.append(
            torch.optim.Muon(
                muon,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.momentum,
                nesterov=cfg.nesterov,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        )
    groups = [
        {"params": adam_decay, "lr": cfg.adam_lr, "weight_decay": cfg.weight_decay},
        {"params": adam_plain, "lr": cfg.adam_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if groups:
        opts.append(_adamw(groups, cfg, device_type))
    return MultiOptimizer(opts, routes)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> MultiOptimizer:
    return OPTIMIZERS.get(cfg.name)(model, cfg, device_type)


def routing_table(routes: list[Route]) -> str:
    """The parameter -> optimizer table, printed at start and logged as an artifact."""
    width = max(len(r.name) for r in routes)
    lines = [f"{'parameter':<{width}}  {'shape':<16} {'optimizer':<9} {'lr':>9} {'wd':>6}"]
    for r in routes:
        lines.append(
            f"{r.name:<{width}}  {str(list(r.shape)):<16} {r.optimizer:<9} {r.lr:>9.2e} {r.weight_decay:>6.3f}"
        )
    return "\n".join(lines)
