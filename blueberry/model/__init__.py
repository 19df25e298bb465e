"""The model: components register themselves on import."""

from blueberry.model import init as _init  # noqa: F401  (registers init schemes)
from blueberry.model import layers as _layers  # noqa: F401  (registers norms, MLPs, positions)
from blueberry.model.attention import KVCache
from blueberry.model.transformer import (
    Transformer,
    analytic_param_count,
    build_model,
    count_params,
    flops_per_token,
    matmul_params,
)

__all__ = [
    "KVCache",
    "Transformer",
    "analytic_param_count",
    "build_model",
    "count_params",
    "flops_per_token",
    "matmul_params",
]
