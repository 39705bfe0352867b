"""`Linear`: `nn.Linear` whose forward takes our CPU kernel for a few rows (`ops.small_linear`): the
projections of a decode step. Same parameters, state dict and results (to float32 rounding) as `nn.Linear`.

Being a subclass, it is not matched by code that looks for `nn.Linear` by exact type: torch.ao's dynamic
quantization (`quantize_dynamic(model, {nn.Linear})`) leaves these layers in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.small_linear import linear


class Linear(nn.Linear):
    def forward(self, x):
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)
