"""A small MLP on a fixed synthetic task: all-FO, all-ZO and mixed groups all learn."""

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer


def task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    teacher = torch.randn(8, 1, generator=g)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(256, 1, generator=g)
    return x, y


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


CONFIGS = {
    "all-fo": lambda m: [{"params": m.parameters(), "mode": "fo", "rule": "adamw", "lr": 1e-2}],
    "all-zo": lambda m: [{"params": m.parameters(), "mode": "zo", "lr": 2e-2}],
    "all-zo-sign-conservative": lambda m: [{"params": m.parameters(), "mode": "zo", "lr": 3e-3, "sign": "coordinate", "conservative": True}],
    "mixed": lambda m: [{"params": m[0].parameters(), "mode": "zo", "lr": 2e-2}, {"params": m[2].parameters(), "mode": "fo", "rule": "adamw", "lr": 1e-2}],
    "mixed-adamw-zo": lambda m: [{"params": m[0].parameters(), "mode": "zo", "rule": "adamw", "lr": 3e-3}, {"params": m[2].parameters(), "mode": "fo", "lr": 5e-2}],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_falls(name):
    x, y = task()
    model = mlp()
    opt = HybridZOOptimizer(CONFIGS[name](model), seed=0)
    closure = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    with torch.no_grad():
        initial = closure().item()
    for _ in range(400):
        opt.step(closure)
    with torch.no_grad():
        final = closure().item()
    assert final < 0.5 * initial, (name, initial, final)
