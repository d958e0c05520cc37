"""Seeded perturbation directions, regenerated on demand, and exact restore.

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
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["mix_seed", "DirectionGenerator", "snapshot", "restore_", "perturb_"]

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


def restore_(params: Sequence[Tensor], anchors: Sequence[Tensor]) -> None:
    """Write the anchors back into the parameters, bit for bit."""
    for p, anchor in zip(params, anchors):
        p.copy_(anchor)


def perturb_(
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    seeds: Sequence[int],
    scales: Sequence[float],
    directions: DirectionGenerator,
) -> None:
    """Set ``p = anchor + scale * z(seed)`` for each parameter, one ``z`` alive at a time."""
    for p, anchor, seed, scale in zip(params, anchors, seeds, scales):
        torch.add(anchor, directions.sample(p, seed), alpha=scale, out=p)
