"""Blueberry: an architecture-ablation harness for small GPT-style language models."""

__version__ = "0.1.0"

from blueberry.config import ModelConfig, RunConfig, load_config
from blueberry.errors import BlueberryError, ConfigError
from blueberry.model import build_model, count_params
from blueberry.registry import INITS, MLPS, NORM_PLACEMENTS, NORMS, OPTIMIZERS, POSITIONS, SCHEDULES, Registry

__all__ = [
    "INITS",
    "MLPS",
    "NORMS",
    "NORM_PLACEMENTS",
    "OPTIMIZERS",
    "POSITIONS",
    "SCHEDULES",
    "BlueberryError",
    "ConfigError",
    "ModelConfig",
    "Registry",
    "RunConfig",
    "build_model",
    "count_params",
    "load_config",
]


def __getattr__(name):  # `from blueberry import train` without importing the trainer at package import
    if name == "train":
        from blueberry.train.trainer import train

        return train
    raise AttributeError(name)
