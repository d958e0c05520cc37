"""Seeded perturbation directions, regenerated on demand, and restore (exact or in place).

A zeroth-order step needs the same Gaussian direction ``z`` several times: to
perturb the parameters before each probe and again to build the update. Storing
``z`` would cost one extra copy of every ZO parameter, so instead every tensor's
direction is drawn from a private :class:`torch.Generator` seeded with an integer
derived from ``(group seed, group index, step, candidate, query, tensor index)``.
Regenerating with the same seed gives the same bits on the same device, for any
shape and dtype, and never touches the user's global RNG streams.

Probes write ``anchor + scale * z`` into the parameter, where ``anchor`` is a copy
of the parameter taken once at the start of the step. Restoring copies the anchor
back, so the parameters after a step differ from before only by the chosen update,
bit for bit, in every dtype. The naive MeZO round trip ``+eps, -2 eps, +eps`` rounds
three times per probe and drifts in fp16/bf16. The price is one copy of the ZO
parameters for the duration of the step (not of the whole model).

Groups with ``restore="inplace"`` take MeZO's way instead: no copy, and each move
is undone by regenerating its direction and subtracting it (:func:`shift_`), so
moving from ``+eps z`` to ``-eps z`` is one ``add_(z, alpha=-2 eps)``. Each undo
rounds, so the parameters drift from where exact restore would leave them by a
few ulps per probe: negligible in fp32, visible over many steps in bf16/fp16.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["mix_seed", "DirectionGenerator", "snapshot", "perturb_", "shift_", "Offset"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*words: int) -> int:
    """Hash non-negative integers into one 63-bit seed (SplitMix64 over each word).

    Deterministic across platforms and Python versions (unlike ``hash``), and
    sensitive to the order of the words.
    """
    state = 0
    for word in words:
        state = _splitmix64(state ^ (int(word) & _MASK64))
    return state >> 1


class DirectionGenerator:
    """Draws ``z ~ N(0, I)`` shaped like a tensor from an integer seed.

    One private generator per device is created lazily and reseeded before every
    draw, so a draw depends only on ``(seed, shape, dtype, device)``. The
    generators are a cache, not state: they are rebuilt after pickling.
    """

    def __init__(self) -> None:
        self._generators: Dict[torch.device, torch.Generator] = {}

    def sample(self, like: Tensor, seed: int) -> Tensor:
        """Return a fresh tensor with the shape, dtype and device of ``like``."""
        device = like.device
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            self._generators[device] = generator
        generator.manual_seed(seed)
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)


def snapshot(params: Sequence[Tensor]) -> List[Tensor]:
    """Copy each parameter's values (the anchor that probes and restores start from)."""
    return [p.detach().clone(memory_format=torch.preserve_format) for p in params]


def perturb_(
    param: Tensor, anchor: Tensor, seed: int, scale: float, directions: DirectionGenerator
) -> None:
    """Set ``param = anchor + scale * z(seed)``."""
    torch.add(anchor, directions.sample(param, seed), alpha=scale, out=param)


#: Where an in-place tensor stands relative to its pre-step value: ``(seed, scale)``
#: for ``theta + scale * z(seed)``, or None for ``theta`` itself.
Offset = Optional[Tuple[int, float]]


def shift_(param: Tensor, current: Offset, target: Offset, directions: DirectionGenerator) -> None:
    """Move ``param`` in place from ``theta + current`` to ``theta + target``, without a copy of theta.

    Regenerates the directions involved; a change of scale along the same direction
    costs one draw (MeZO's ``-2 eps``). Exact only up to rounding.
    """
    if current is not None and target is not None and current[0] == target[0]:
        if target[1] != current[1]:
            param.add_(directions.sample(param, target[0]), alpha=target[1] - current[1])
        return
    if current is not None:
        param.add_(directions.sample(param, current[0]), alpha=-current[1])
    if target is not None:
        param.add_(directions.sample(param, target[0]), alpha=target[1])
