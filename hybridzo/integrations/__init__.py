"""Adapters for training frameworks. Import the submodule for the framework you use:

* :mod:`hybridzo.integrations.lightning`: :class:`~hybridzo.integrations.lightning.HybridZOMixin`
  for a ``LightningModule`` under automatic optimization.
* :mod:`hybridzo.integrations.transformers`:
  :class:`~hybridzo.integrations.transformers.HybridZOTrainer`, a Hugging Face ``Trainer``
  that supplies the closure for each batch.
* :mod:`hybridzo.integrations.accelerate`:
  :func:`~hybridzo.integrations.accelerate.accelerated_step` for an optimizer prepared by
  ``accelerate``.

This package imports none of those frameworks; each submodule imports its own (if any).
"""
