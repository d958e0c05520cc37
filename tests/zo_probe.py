"""Test helpers: closures that record what the optimizer evaluated.

Recording the parameter values seen by each closure call recovers the random
directions independently of the optimizer's seeding code: a ``+eps`` probe sees
``theta + eps * z``, so ``z = (seen - theta) / eps`` (exact up to rounding in fp64).
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor


class RecordingClosure:
    """Wraps ``loss_fn(params) -> Tensor`` and records each call's parameter values and loss."""

    def __init__(self, params: List[Tensor], loss_fn: Callable[[List[Tensor]], Tensor]) -> None:
        self.params = params
        self.loss_fn = loss_fn
        self.seen: List[List[Tensor]] = []
        self.losses: List[float] = []
        self.grad_enabled: List[bool] = []

    def __call__(self) -> Tensor:
        self.seen.append([p.detach().clone() for p in self.params])
        self.grad_enabled.append(torch.is_grad_enabled())
        loss = self.loss_fn(self.params)
        self.losses.append(float(loss))
        return loss

    def reset(self) -> None:
        self.seen.clear()
        self.losses.clear()
        self.grad_enabled.clear()


def quadratic(a: Tensor, b: Tensor) -> Callable[[List[Tensor]], Tensor]:
    """f(theta) = 1/2 theta^T A theta + b^T theta for a single flat parameter."""

    def loss_fn(params: List[Tensor]) -> Tensor:
        theta = params[0]
        return 0.5 * theta @ (a @ theta) + b @ theta

    return loss_fn


def random_spd(dim: int, generator: torch.Generator) -> Tensor:
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return m @ m.T / dim + torch.eye(dim, dtype=torch.float64)
