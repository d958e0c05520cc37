"""Data-parallel and sharded ZO steps: identical directions and mean losses on every rank.

Under ``torch.distributed`` each rank sees its own shard of the batch. For all
replicas to apply the same ZO update they must (1) draw the same directions, so
each group's seed and counters are broadcast from rank 0 before the group's first
step, and (2) use the same projected differences and candidate losses, so every
loss the optimizer compares is replaced by its mean over ranks: one all-reduce of two
float64 numbers per forward pass, whatever the model size. FO groups rely on the
data-parallel wrapper's own gradient all-reduce (DistributedDataParallel) or
reduce-scatter (FSDP2), as with any optimizer.

The second number is a failure flag. A rank whose closure raised still enters that
forward's all-reduce (with the flag set) before it re-raises, and the other ranks then
raise :class:`ClosureFailedOnAnotherRank`: every rank abandons the same step, and its
collectives stay paired. That needs the failing rank to have made the collectives the
others make before they reach the all-reduce, so it holds for a closure that raises

* after the model's forward (e.g. in the loss), under any wrapper, or
* before the forward when the forward makes no collective of its own: plain replicated
  parameters, or DDP (whose forward communicates only to broadcast buffers, with
  ``broadcast_buffers=True``, and once, in its second iteration, to rebuild its buckets).

A closure that raises before or inside an FSDP2 forward skips all-gathers the other
ranks make, and one that calls ``backward()`` itself under DDP or FSDP2 and raises
before it skips their gradient reductions: nothing can pair those, and every rank fails
with the process group's timeout error (no rank steps), after which the process group
is unusable.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["RankAgreement", "ClosureFailedOnAnotherRank"]


class ClosureFailedOnAnotherRank(RuntimeError):
    """The closure raised on another rank in this forward; this rank abandons the step as well."""


def _initialized_world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


class RankAgreement:
    """Averages scalars over the default process group; a no-op in a single process.

    Attributes:
        scalars_reduced: number of losses all-reduced since the optimizer last reset it
            (at the start of every step); each travels with its failure flag.
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

    def mean(self, value: float, phase: str = "a forward") -> float:
        """The mean of ``value`` over ranks (NaN on any rank gives NaN on all).

        Raises:
            ClosureFailedOnAnotherRank: another rank reported its closure failed (:meth:`report_failure`).
        """
        if not self.active:
            return value
        loss, failed = self._all_reduce(value, failed=False)
        if failed:
            raise ClosureFailedOnAnotherRank(
                f"the closure raised on {failed} other rank(s) in {phase}; this rank abandons the step too "
                "(parameters, gradients and optimizer state are as they were before it). See that rank's "
                "exception for the cause; skip the batch on every rank, then carry on"
            )
        return loss / self.world_size

    def report_failure(self) -> None:
        """Enter the forward's all-reduce with the failure flag set (the closure raised on this rank)."""
        if self.active:
            self._all_reduce(math.nan, failed=True)

    def _all_reduce(self, value: float, failed: bool) -> Tuple[float, int]:
        """The sums over ranks of ``value`` and of the failure flags."""
        tensor = torch.tensor([value, float(failed)], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        self.scalars_reduced += 1
        loss, failures = tensor.tolist()
        return loss, int(failures)

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
