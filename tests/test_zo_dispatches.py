"""A ZO step's own work is per direction chunk, not per tensor: dispatched aten operations per tensor stay small.

Each dispatched operation is a kernel launch on a GPU. Counted with a TorchDispatchMode that sees every
operation outside the closure (a ``torch._foreach_*`` operation counts once).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridzo import HybridZOOptimizer


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not self.paused
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", [{}, {"restore": "inplace"}, {"distribution": "rademacher"},
                                    {"conservative": True, "momentum": 0.9}, {"rule": "adamw", "candidates": 2},
                                    {"rule": "adamw", "restore": "inplace", "conservative": True}])
def test_at_most_four_dispatched_operations_per_tensor_per_step(config):
    tensors = 128
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(tensors)]
    counter = CountOps()

    def closure():
        counter.paused = True
        try:
            return torch.stack([(p * p).sum() for p in params]).sum()
        finally:
            counter.paused = False

    opt = HybridZOOptimizer(params, lr=1e-3, seed=0, **config)
    opt.step(closure)  # the first step builds the plan and the state
    with counter:
        opt.step(closure)
    assert counter.count / tensors <= 4, counter.count / tensors  # a per-tensor loop would be 8 or more
