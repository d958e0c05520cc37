"""hybridzo: zeroth-order and first-order updates per param group, in one torch optimizer.

    >>> from hybridzo import HybridZOOptimizer
    >>> opt = HybridZOOptimizer([{"params": adapter.parameters(), "mode": "zo", "eps": 1e-3},
    ...                          {"params": head.parameters(), "mode": "fo", "rule": "adamw"}],
    ...                         lr=1e-3)
    >>> loss = opt.step(lambda: criterion(model(x), y))
"""

from .groups import GroupRule, build_param_groups, describe_groups
from .optimizer import HybridZOOptimizer, ParamsT
from .sharding import prepare_fsdp

__all__ = ["HybridZOOptimizer", "ParamsT", "GroupRule", "build_param_groups", "describe_groups", "prepare_fsdp"]
__version__ = "0.1.0"
"""The package version; pyproject.toml reads it from here (``[tool.setuptools.dynamic]``)."""
