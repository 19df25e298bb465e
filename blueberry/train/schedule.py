"""LR schedules (registry axis `schedule.name`): pure functions of budget progress p in [0, 1].

p is the fraction of the budget used (time-based for a time budget), so the decay ends exactly when the
budget does: the seed counted milestones in micro-batches and stepped once per optimizer step, so its LR
never decayed. Each function returns a multiplier of the base LR; warmup ramps linearly from ~0.
"""

from __future__ import annotations

import math

from blueberry.config import ScheduleConfig
from blueberry.registry import SCHEDULES


def _warmup(p: float, warmup: float) -> float | None:
    if warmup > 0 and p < warmup:
        return max(p, 1e-3 * warmup) / warmup
    return None


def _after_warmup(p: float, warmup: float) -> float:
    """Progress through the post-warmup part, in [0, 1]."""
    return min(1.0, max(0.0, (p - warmup) / (1.0 - warmup)))


@SCHEDULES.register("constant")
def constant(p: float, cfg: ScheduleConfig) -> float:
    w = _warmup(p, cfg.warmup)
    return 1.0 if w is None else w


@SCHEDULES.register("cosine")
def cosine(p: float, cfg: ScheduleConfig) -> float:
    w = _warmup(p, cfg.warmup)
    if w is not None:
        return w
    q = _after_warmup(p, cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q))


@SCHEDULES.register("linear")
def linear(p: float, cfg: ScheduleConfig) -> float:
    w = _warmup(p, cfg.warmup)
    if w is not None:
        return w
    return 1.0 - (1.0 - cfg.min_lr_ratio) * _after_warmup(p, cfg.warmup)


@SCHEDULES.register("wsd")
def wsd(p: float, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay: constant, then linear decay to min_lr_ratio over the last decay_frac."""
    w = _warmup(p, cfg.warmup)
    if w is not None:
        return w
    start = 1.0 - cfg.decay_frac
    if p <= start:
        return 1.0
    q = min(1.0, (p - start) / cfg.decay_frac)
    return 1.0 - (1.0 - cfg.min_lr_ratio) * q


@SCHEDULES.register("step")
def step(p: float, cfg: ScheduleConfig) -> float:
    """The seed's intent: 1 until 80%, x0.316 until 90%, then x0.1 (milestones and gammas configurable)."""
    w = _warmup(p, cfg.warmup)
    if w is not None:
        return w
    mult = 1.0
    for m, g in zip(cfg.milestones, cfg.gammas):
        if p >= m:
            mult = g
    return mult


def lr_multiplier(p: float, cfg: ScheduleConfig) -> float:
    return SCHEDULES.get(cfg.name)(min(1.0, max(0.0, p)), cfg)


def end_value(cfg: ScheduleConfig) -> float:
    """What each schedule must reach at p = 1 (tested)."""
    return {"constant": 1.0, "step": cfg.gammas[-1] if cfg.gammas else 1.0}.get(cfg.name, cfg.min_lr_ratio)
