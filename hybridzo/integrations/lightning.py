"""PyTorch Lightning: HybridZOOptimizer under automatic optimization.

Under automatic optimization Lightning hands the optimizer a closure that runs ``training_step``,
``zero_grad`` and ``backward`` (through the strategy and precision plugin, with their hooks), and
after the step reports that closure's last result as the step's output. HybridZOOptimizer calls
its closure once per forward pass, several times per step, so Lightning's closure used as it is
would, on every ZO probe, record an autograd graph (it runs under ``torch.enable_grad()``, which
overrides the probes' ``no_grad``), call the backward hooks and ``self.log``, and finally report a
perturbed loss. :class:`HybridZOMixin` gives the optimizer a closure that runs Lightning's closure
for the step's first forward only and ``training_step`` alone, without autograd, for the others.

The mixin does not import Lightning (it only checks that one of them is installed), so it works with
``lightning.pytorch`` and with the standalone ``pytorch_lightning`` package alike. It relies on one private attribute of Lightning's closure,
``_step_fn`` (``training_step`` through the strategy and precision plugin, without backward),
present since Lightning 1.5.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from . import _installed, _missing_framework

if not (_installed("lightning") or _installed("pytorch_lightning")):  # the integrations extra is not installed
    raise _missing_framework(__name__, "lightning")

__all__ = ["HybridZOMixin"]


class HybridZOMixin:
    """Makes a ``LightningModule`` train correctly with :class:`~hybridzo.HybridZOOptimizer`.

    List it before ``LightningModule`` in the bases and return a ``HybridZOOptimizer`` from
    ``configure_optimizers``; nothing else changes::

        class LitModel(HybridZOMixin, lightning.pytorch.LightningModule):
            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = torch.nn.functional.cross_entropy(self(x), y)
                self.log("train_loss", loss)
                return loss

            def configure_optimizers(self):
                return HybridZOOptimizer([...], lr=1e-3)

    Within one optimizer step:

    * The step's first forward runs Lightning's closure: ``training_step``, ``zero_grad``,
      ``backward`` and their hooks, once, as with any optimizer. With FO groups this is the FO
      pass and its loss is the loss at the unperturbed parameters; it is the result Lightning
      reports (``outputs`` of ``on_train_batch_end``, the progress bar) and the call whose
      ``self.log`` values are kept. (Without FO groups it is a forward-only call; for the pure-ZO
      central estimator without candidate selection it is the first probe, at
      :math:`\\theta + \\epsilon z`.)
    * Every later forward (ZO probes, candidates) runs ``training_step`` alone, under
      ``torch.no_grad()``: no autograd graph, no backward or ``zero_grad`` hooks, and
      ``self.log`` / ``self.log_dict`` calls are dropped, also from callbacks.
      :attr:`hybridzo_probing` is True from then until the step ends; check it to keep other
      side effects of ``training_step`` (metric updates, counters) to one call per step.

    Lightning's precision plugin still runs ``on_before_optimizer_step`` and gradient clipping
    after every closure call; clipping acts on the FO gradients after the first call and finds
    none afterwards (they are set aside during probes). ZO estimates are never clipped. A module
    that overrides ``optimizer_step`` itself must step through ``super().optimizer_step(...)``.

    Raises (at the first optimizer step):
        ValueError: the trainer uses a gradient scaler (``precision="16-mixed"``), or
            ``accumulate_grad_batches`` is not 1.
        TypeError: ``optimizer_step`` did not receive Lightning's automatic-optimization closure.
    """

    _hybridzo_probing: bool = False

    @property
    def hybridzo_probing(self) -> bool:
        """Whether the optimizer is evaluating perturbed or candidate parameters.

        True from the second forward pass of an optimizer step until the step returns.
        """
        return self._hybridzo_probing

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Optional[Callable[[], Any]] = None,
    ) -> None:
        """Lightning hook: step the optimizer with a closure whose probes are forward-only.

        Args:
            epoch: current epoch (unused, part of the hook's signature).
            batch_idx: index of the current batch (unused, part of the hook's signature).
            optimizer: the ``LightningOptimizer`` wrapping the HybridZOOptimizer.
            optimizer_closure: Lightning's automatic-optimization closure (default None, which
                Lightning never passes under automatic optimization; a TypeError).
        """
        _check_trainer(self.trainer)  # type: ignore[attr-defined]
        closure = _ForwardOnlyProbes(self, optimizer_closure)
        try:
            optimizer.step(closure=closure)
        finally:
            self._hybridzo_probing = False

    def log(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except that calls made during ZO probes are dropped.

        Args:
            *args: positional arguments of ``LightningModule.log``.
            **kwargs: keyword arguments of ``LightningModule.log``.
        """
        if self._hybridzo_probing:
            return
        super().log(*args, **kwargs)  # type: ignore[misc]


class _ForwardOnlyProbes:
    """The closure HybridZOOptimizer receives: Lightning's closure once, then bare ``training_step``.

    Args:
        module: the LightningModule using :class:`HybridZOMixin`.
        lightning_closure: Lightning's automatic-optimization closure for the current batch.
    """

    def __init__(self, module: HybridZOMixin, lightning_closure: Optional[Callable[[], Any]]) -> None:
        training_step = getattr(lightning_closure, "_step_fn", None)
        if lightning_closure is None or training_step is None:
            raise TypeError(
                "HybridZOMixin.optimizer_step expects Lightning's automatic-optimization closure "
                f"(lightning.pytorch.loops.optimization.automatic.Closure), got {lightning_closure!r}"
            )
        self._module = module
        self._lightning_closure = lightning_closure
        self._training_step: Callable[[], Any] = training_step
        self._calls = 0

    def __call__(self) -> Optional[Tensor]:
        self._calls += 1
        if self._calls == 1:
            if torch.is_grad_enabled():  # the FO pass
                return self._lightning_closure()
            # A forward-only first call (no FO groups). Lightning's closure re-enables grad, so
            # freeze the parameters to keep it from recording a graph; its backward is a no-op.
            with _frozen(self._module.parameters()):  # type: ignore[attr-defined]
                return self._lightning_closure()
        self._module._hybridzo_probing = True
        return self._training_step().closure_loss


@contextlib.contextmanager
def _frozen(parameters: Iterable[Tensor]) -> Iterator[None]:
    """Set ``requires_grad=False`` on the trainable ``parameters`` for the duration of the block."""
    trainable = [p for p in parameters if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _check_trainer(trainer: Any) -> None:
    """Raise a ValueError for trainer settings that cannot work with HybridZOOptimizer."""
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "HybridZOOptimizer cannot run under a gradient scaler (Trainer(precision='16-mixed')): "
            "GradScaler steps the optimizer without a closure, and ZO groups need one to "
            "evaluate the loss. Use precision='bf16-mixed', which needs no scaler, or '32-true'."
        )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            "HybridZOOptimizer needs Trainer(accumulate_grad_batches=1), got "
            f"{trainer.accumulate_grad_batches}: its ZO probes would see only the last "
            "micro-batch and its FO pass starts from fresh gradients. Use a larger batch, or "
            "manual optimization with a closure that loops over micro-batches "
            "(see docs/distributed.md)."
        )
