import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


def tiny_model_config(**over):
    from blueberry.config import ModelConfig

    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=97, seq_len=16, ffn_mult=2)
    base.update(over)
    return ModelConfig(**base)
