"""A worked plugin (the README's example): a new MLP type registered from user code."""

import torch.nn as nn
import torch.nn.functional as F

from blueberry import MLPS


@MLPS.register("squared_silu")
class SquaredSiLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.w_in = nn.Linear(d_model, d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        return self.w_out(F.silu(self.w_in(x)).square())
