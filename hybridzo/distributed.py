"""Data-parallel and sharded ZO steps: identical directions and mean losses on every rank.

Under ``torch.distributed`` each rank sees its own shard of the batch. For all
replicas to apply the same ZO update they must (1) draw the same directions, so
each group's seed and counters are broadcast from rank 0 before the group's first
step, and (2) use the same projected differences and candidate losses, so every
loss the optimizer compares is replaced by its mean over ranks: one float64 scalar
all-reduced per forward pass, whatever the model size. FO groups rely on the
data-parallel wrapper's own gradient all-reduce (DistributedDataParallel) or
reduce-scatter (FSDP2), as with any optimizer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

__all__ = ["RankAgreement"]


def _initialized_world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


class RankAgreement:
    """Averages scalars over the default process group; a no-op in a single process.

    Attributes:
        scalars_reduced: number of scalars all-reduced since the optimizer last reset it
            (at the start of every step).
    """

    def __init__(self) -> None:
        self.world_size = _initialized_world_size()
        self.scalars_reduced = 0
        self._device: Optional[torch.device] = None
        if self.active:
            # NCCL reduces CUDA tensors only; gloo and others take CPU tensors.
            if torch.distributed.get_backend() == "nccl":
                self._device = torch.device("cuda", torch.cuda.current_device())
            else:
                self._device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (NaN on any rank gives NaN on all)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        self.scalars_reduced += 1
        return float(tensor.item()) / self.world_size

    def agree_on_seeds(self, param_groups: List[Dict[str, Any]]) -> None:
        """Copy rank 0's seed and counters of each of ``param_groups`` to every rank."""
        if not self.active:
            return
        keys = ("seed", "steps", "nonfinite_steps")
        values = [int(g[key]) for g in param_groups for key in keys]
        tensor = torch.tensor(values, dtype=torch.int64, device=self._device)
        torch.distributed.broadcast(tensor, src=0)
        for i, group in enumerate(param_groups):
            for j, key in enumerate(keys):
                group[key] = int(tensor[len(keys) * i + j])
