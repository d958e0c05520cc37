"""accelerate: step a HybridZOOptimizer prepared by ``Accelerator.prepare``.

``accelerator.prepare(optimizer)`` wraps the optimizer in an ``AcceleratedOptimizer`` whose
``step(closure)`` forwards the closure, so ``optimizer.step(closure)`` works as is, except that
it returns None instead of the loss, and that two settings cannot work: with gradient
accumulation accelerate divides every loss passed to ``accelerator.backward`` by the number of
steps and, inside ``accelerator.accumulate``, skips the step (and so the closure) on all but the
last micro-batch of each window; with fp16 mixed precision it hands the step to a gradient
scaler, which steps without a closure. :func:`accelerated_step` returns the loss and refuses
those two settings with an error that says what to do instead. accelerate's FSDP plugin is
refused too: accelerate applies FSDP on GPUs only, so that path is untested here; shard the model
with ``fully_shard`` and :func:`hybridzo.prepare_fsdp` instead (see ``docs/distributed.md``).
"""

from __future__ import annotations

from typing import Any, Callable

from ..optimizer import HybridZOOptimizer
from . import _missing_framework

try:
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType
except ModuleNotFoundError as error:  # the integrations extra is not installed
    raise _missing_framework(__name__, (error.name or "accelerate").split(".")[0]) from error

__all__ = ["accelerated_step"]


def accelerated_step(optimizer: AcceleratedOptimizer, closure: Callable[[], Any]) -> float:
    """Take one step of a prepared HybridZOOptimizer and return the loss.

    Args:
        optimizer: the ``AcceleratedOptimizer`` that ``accelerator.prepare`` returned for a
            :class:`~hybridzo.HybridZOOptimizer`.
        closure: runs the forward pass on the current batch and returns the loss, as for
            :meth:`HybridZOOptimizer.step <hybridzo.HybridZOOptimizer.step>`; it may call
            ``accelerator.backward(loss)`` itself.

    Returns:
        The loss at the unperturbed parameters (``last_step_info["loss"]``), a Python float.

    Raises:
        TypeError: ``optimizer`` does not wrap a HybridZOOptimizer.
        ValueError: fp16 mixed precision (a gradient scaler) or gradient accumulation is
            enabled.
        NotImplementedError: accelerate's FSDP plugin is enabled.
    """
    if not isinstance(optimizer, AcceleratedOptimizer) or not isinstance(
        optimizer.optimizer, HybridZOOptimizer
    ):
        raise TypeError(
            "accelerated_step needs the AcceleratedOptimizer that accelerator.prepare returned "
            f"for a HybridZOOptimizer, got {type(optimizer).__name__}"
        )
    if optimizer.accelerator_state.distributed_type == DistributedType.FSDP:
        raise NotImplementedError(
            "accelerated_step does not support accelerate's FSDP plugin (accelerate applies FSDP on "
            "GPUs only, so hybridzo cannot test that path). Shard the model with "
            "torch.distributed.fsdp.fully_shard, call hybridzo.prepare_fsdp(model) and step "
            "HybridZOOptimizer in a plain loop (examples/fsdp_zo.py), or use Lightning's "
            "ModelParallelStrategy with HybridZOMixin; see docs/distributed.md."
        )
    if optimizer.scaler is not None:
        raise ValueError(
            "HybridZOOptimizer cannot run under accelerate's fp16 gradient scaler: it steps the "
            "optimizer without a closure, and ZO groups need one. Use "
            "Accelerator(mixed_precision='bf16'), which needs no scaler."
        )
    if optimizer.gradient_state.num_steps != 1 or not optimizer.gradient_state.sync_gradients:
        raise ValueError(
            "HybridZOOptimizer needs Accelerator(gradient_accumulation_steps=1): accelerate's "
            "accumulation skips the step, and so the closure, on all but the last micro-batch "
            "and scales the FO loss. Accumulate inside the closure instead, over the "
            "micro-batches of one batch (see docs/distributed.md)."
        )
    optimizer.step(closure)
    return optimizer.optimizer.last_step_info["loss"]
