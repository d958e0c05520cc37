"""Adapters for training frameworks. Import the submodule for the framework you use:

* :mod:`hybridzo.integrations.lightning`: :class:`~hybridzo.integrations.lightning.HybridZOMixin`
  for a ``LightningModule`` under automatic optimization.
* :mod:`hybridzo.integrations.transformers`:
  :class:`~hybridzo.integrations.transformers.HybridZOTrainer`, a Hugging Face ``Trainer``
  that supplies the closure for each batch.
* :mod:`hybridzo.integrations.accelerate`:
  :func:`~hybridzo.integrations.accelerate.accelerated_step` for an optimizer prepared by
  ``accelerate``.

This package imports none of those frameworks; each submodule imports its own (if any). Without them,
importing a submodule raises a ``ModuleNotFoundError`` that names the missing package and the extra that
installs them all: ``pip install "hybridzo[integrations]"``.
"""

from __future__ import annotations

import importlib.util

EXTRA = 'pip install "hybridzo[integrations]"'
"""The command that installs every framework these integrations support (lightning, transformers, accelerate)."""


def _missing_framework(module: str, package: str) -> ModuleNotFoundError:
    """The error an integration module raises when the framework ``package`` it needs is not installed."""
    return ModuleNotFoundError(
        f"{module} needs the package {package!r}, which is not installed; install the integrations extra: {EXTRA}",
        name=package,
    )


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it (which can take seconds)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # e.g. sys.modules[package] is None: imports of it are blocked
        return False
