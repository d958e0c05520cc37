"""Hugging Face Trainer: :class:`HybridZOTrainer` supplies the closure for each batch.

``transformers.Trainer`` runs forward and backward in ``training_step`` and later calls
``optimizer.step()`` without a closure, but ZO groups need a closure that re-evaluates the loss of
the current batch. :class:`HybridZOTrainer` therefore takes the whole optimizer step inside
``training_step``, with a closure over the batch (or over all micro-batches of a gradient
accumulation window), and turns the Trainer's own ``optimizer.step()`` call for that step into a
no-op.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..optimizer import HybridZOOptimizer, ParamsT
from . import _missing_framework

try:
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import Trainer, TrainerCallback
except ModuleNotFoundError as error:  # the integrations extra is not installed
    raise _missing_framework(__name__, (error.name or "transformers").split(".")[0]) from error

__all__ = ["HybridZOTrainer"]


class HybridZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with :class:`~hybridzo.HybridZOOptimizer`.

    Give the param groups (each with its ``mode`` and other keys) and the optimizer's keyword
    arguments; everything else is the Trainer's::

        trainer = HybridZOTrainer(
            model=model, args=TrainingArguments(...), train_dataset=dataset,
            param_groups=[{"params": model.bert.parameters(), "mode": "zo", "eps": 1e-3},
                          {"params": model.classifier.parameters(), "mode": "fo", "rule": "adamw"}],
            optimizer_options={"conservative": True},
        )
        trainer.train()

    Alternatively pass a ready optimizer as ``optimizers=(HybridZOOptimizer(...), None)``.

    Each optimizer step runs inside ``training_step`` of the accumulation window's last
    micro-batch: the closure runs the Trainer's own ``training_step`` (forward, loss
    normalisation, ``accelerator.backward``) on every micro-batch of the window and returns their
    summed, normalised losses, so with ``gradient_accumulation_steps=N`` both the FO gradients
    and the ZO losses are those of the whole window (under DDP, all but the last micro-batch run
    under ``no_sync``). During ZO probes the backward inside it does nothing. The loss reported
    for the step is the loss at the unperturbed parameters; earlier micro-batches of a window
    report 0, so the logged loss, a sum over micro-batches, is unchanged.

    Differences from the stock Trainer:

    * ``args.learning_rate`` and ``args.weight_decay`` are the optimizer's defaults
      (``optimizer_options`` and group keys override them); weight decay applies to every group
      that does not set its own, biases and norm weights included. ``args.optim`` is not used;
      choose the update rule with the ``rule`` key.
    * ``args.max_grad_norm`` clips the FO gradients inside the closure, before the optimizer
      applies them; the ``grad_norm`` the Trainer logs is therefore the clipped norm. ZO
      estimates are not clipped.
    * fp16 mixed precision (a gradient scaler), DeepSpeed and FSDP are refused with an error;
      use ``bf16=True`` for mixed precision.

    Args:
        *args: positional arguments of ``transformers.Trainer``.
        param_groups: param groups for the HybridZOOptimizer the trainer creates (default None:
            the optimizer must be passed as ``optimizers=(optimizer, scheduler)``).
        optimizer_options: keyword arguments of :class:`~hybridzo.HybridZOOptimizer`, such as
            ``conservative`` or ``seed`` (default None: only ``lr`` and ``weight_decay`` from
            ``args``).
        **kwargs: keyword arguments of ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        param_groups: Optional[ParamsT] = None,
        optimizer_options: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if param_groups is not None and self.optimizer is not None:
            raise ValueError("give either param_groups or optimizers=(HybridZOOptimizer(...), ...), not both")
        self.hybridzo_param_groups = param_groups
        self.hybridzo_optimizer_options: Dict[str, Any] = dict(optimizer_options or {})
        self._micro_batches: List[Dict[str, Any]] = []
        self.add_callback(_SkipTrainerOptimizerStep(self))

    @property
    def hybridzo_optimizer(self) -> HybridZOOptimizer:
        """The HybridZOOptimizer, unwrapped from accelerate's optimizer wrapper."""
        optimizer = self.optimizer
        if isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, HybridZOOptimizer):
            raise TypeError(
                f"HybridZOTrainer needs a HybridZOOptimizer, got {type(optimizer).__name__}"
            )
        return optimizer

    def create_optimizer(self, model: Optional[nn.Module] = None) -> HybridZOOptimizer:
        """Build the HybridZOOptimizer from ``param_groups`` unless one was given; check the setup.

        Args:
            model: unused: the param groups already name the parameters (default None).

        Raises:
            ValueError: neither ``param_groups`` nor an optimizer was given, or fp16 mixed
                precision with a gradient scaler is enabled.
            NotImplementedError: DeepSpeed or FSDP is enabled.
        """
        if self.optimizer is None:
            if self.hybridzo_param_groups is None:
                raise ValueError(
                    "HybridZOTrainer needs param_groups=[...] or optimizers=(HybridZOOptimizer(...), None)"
                )
            options = {
                "lr": self.args.learning_rate,
                "weight_decay": self.args.weight_decay,
                **self.hybridzo_optimizer_options,
            }
            self.optimizer = HybridZOOptimizer(self.hybridzo_param_groups, **options)
        self._check_setup()
        return self.hybridzo_optimizer

    def _check_setup(self) -> None:
        if self.accelerator.scaler is not None:
            raise ValueError(
                "HybridZOTrainer cannot use fp16 mixed precision: its gradient scaler steps the "
                "optimizer without a closure, and ZO groups need one. Use bf16=True instead."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "HybridZOTrainer supports one device and DistributedDataParallel; DeepSpeed and "
                "FSDP are not supported. For a sharded model, apply torch.distributed.fsdp.fully_shard, "
                "call hybridzo.prepare_fsdp(model) and step HybridZOOptimizer in your own loop "
                "(examples/fsdp_zo.py), or use Lightning's ModelParallelStrategy with HybridZOMixin "
                "(docs/distributed.md)"
            )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, starting without micro-batches left from an interrupted window.

        Args:
            *args: positional arguments of ``transformers.Trainer.train``.
            **kwargs: keyword arguments of ``transformers.Trainer.train``.
        """
        self._micro_batches = []
        return super().train(*args, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        num_items_in_batch: Optional[Any] = None,
    ) -> Tensor:
        """Take the optimizer step on the accumulation window ending with this micro-batch.

        Args:
            model: the model to train (possibly wrapped, e.g. in DistributedDataParallel).
            inputs: this micro-batch, as the data collator produced it.
            num_items_in_batch: number of target items in the whole accumulation window, used
                by the Trainer to normalise the loss (default None).

        Returns:
            The loss at the unperturbed parameters, summed over the window's normalised
            micro-batch losses, on ``args.device``; zero for the window's earlier micro-batches.
        """
        self._micro_batches.append(inputs)
        if not self.accelerator.sync_gradients:
            # Not the window's last micro-batch: it is evaluated within the step's closure.
            return torch.zeros((), device=self.args.device)
        micro_batches, self._micro_batches = self._micro_batches, []
        micro_batch_step = super().training_step

        def closure() -> Tensor:
            total = torch.zeros((), device=self.args.device)
            for index, batch in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                # Gradients are all-reduced once per window, with the last micro-batch's backward.
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync:
                    total = total + micro_batch_step(model, batch, num_items_in_batch)
            if torch.is_grad_enabled() and self.args.max_grad_norm > 0:
                # The FO pass: clip before the optimizer applies the FO gradients.
                self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
            return total

        return self.hybridzo_optimizer.step(closure)  # on the closure's device, as the Trainer expects


class _SkipTrainerOptimizerStep(TrainerCallback):
    """Makes the Trainer's own ``optimizer.step()`` a no-op: the step ran in ``training_step``.

    ``AcceleratedOptimizer.step`` does nothing while accelerate's ``sync_gradients`` is False
    (how accelerate skips steps during gradient accumulation), so it is cleared just before that
    call and set again right after.

    Args:
        trainer: the HybridZOTrainer whose optimizer steps are skipped.
    """

    def __init__(self, trainer: HybridZOTrainer) -> None:
        self._trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer.accelerator.gradient_state._set_sync_gradients(False)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer.accelerator.gradient_state._set_sync_gradients(True)
