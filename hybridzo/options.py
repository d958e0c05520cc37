"""Param-group keys of :class:`~hybridzo.HybridZOOptimizer` and their validation.

Every hyperparameter is a per-group key with an optimizer-wide default, as in
``torch.optim``. Validation runs on the defaults and on every group added, and
names the group and the key in its message.
"""

from __future__ import annotations

import math
import numbers
import secrets
from typing import Any, Iterable, Mapping

__all__ = [
    "HYPERPARAMETERS",
    "SHARED_ZO_KEYS",
    "COUNTER_KEYS",
    "PASSTHROUGH_KEYS",
    "fresh_seed",
    "validate_options",
    "check_unknown_keys",
    "check_shared_zo_keys",
]

#: The keyword arguments of the constructor, which are also the group keys.
HYPERPARAMETERS = (
    "lr", "mode", "eps", "sign", "queries", "estimator", "candidates", "conservative",
    "rule", "momentum", "betas", "adam_eps", "weight_decay", "restore", "seed",
)

#: All ZO groups are probed together along one direction per query, so these
#: keys describe the whole step and must agree across ZO groups.
SHARED_ZO_KEYS = ("estimator", "queries", "candidates", "conservative")

#: Bookkeeping the optimizer keeps in each group, so that state_dict carries it:
#: ``steps`` drives the perturbation seeds, ``nonfinite_steps`` counts skipped steps.
COUNTER_KEYS = ("steps", "nonfinite_steps")

#: Keys that other torch code puts in groups (LR schedulers, named parameters).
PASSTHROUGH_KEYS = ("initial_lr", "name", "param_names")

_MODES = ("zo", "fo")
_SIGNS = (None, "coordinate", "scalar")
_ESTIMATORS = ("central", "forward")
_RULES = ("sgd", "adamw")
_RESTORES = ("exact", "inplace")
_SEED_LIMIT = 1 << 63


def fresh_seed() -> int:
    """A random 63-bit seed from the OS, leaving every user-visible RNG untouched."""
    return secrets.randbits(63)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fail(key: str, value: Any, where: str, expected: str) -> ValueError:
    return ValueError(f"Invalid {key} in {where}: {value!r} ({expected})")


def validate_options(options: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the key for the first invalid value."""
    lr = options["lr"]
    if not _is_real(lr) or not lr >= 0 or not math.isfinite(lr):
        raise _fail("lr", lr, where, "expected a finite number >= 0")
    if options["mode"] not in _MODES:
        raise _fail("mode", options["mode"], where, "expected 'zo' or 'fo'")
    eps = options["eps"]
    if not _is_real(eps) or not eps > 0 or not math.isfinite(eps):
        raise _fail("eps", eps, where, "expected a finite number > 0")
    if options["sign"] not in _SIGNS:
        raise _fail("sign", options["sign"], where, "expected None, 'coordinate' or 'scalar'")
    for key in ("queries", "candidates"):
        if not _is_int(options[key]) or options[key] < 1:
            raise _fail(key, options[key], where, "expected an int >= 1")
    if options["estimator"] not in _ESTIMATORS:
        raise _fail("estimator", options["estimator"], where, "expected 'central' or 'forward'")
    if not isinstance(options["conservative"], bool):
        raise _fail("conservative", options["conservative"], where, "expected True or False")
    if options["rule"] not in _RULES:
        raise _fail("rule", options["rule"], where, "expected 'sgd' or 'adamw'")
    momentum = options["momentum"]
    if not _is_real(momentum) or not 0 <= momentum < 1:
        raise _fail("momentum", momentum, where, "expected a number in [0, 1)")
    betas = options["betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_real(b) and 0 <= b < 1 for b in betas)
    ):
        raise _fail("betas", betas, where, "expected two numbers in [0, 1)")
    adam_eps = options["adam_eps"]
    if not _is_real(adam_eps) or not adam_eps >= 0:
        raise _fail("adam_eps", adam_eps, where, "expected a number >= 0")
    weight_decay = options["weight_decay"]
    if not _is_real(weight_decay) or not weight_decay >= 0:
        raise _fail("weight_decay", weight_decay, where, "expected a number >= 0")
    if options["restore"] not in _RESTORES:
        raise _fail("restore", options["restore"], where, "expected 'exact' or 'inplace'")
    seed = options["seed"]
    if seed is not None and (not _is_int(seed) or not 0 <= seed < _SEED_LIMIT):
        raise _fail("seed", seed, where, "expected None or an int in [0, 2**63)")


def check_unknown_keys(group: Mapping[str, Any], where: str) -> None:
    """Reject keys that are neither hyperparameters nor known bookkeeping."""
    known = {"params", *HYPERPARAMETERS, *COUNTER_KEYS, *PASSTHROUGH_KEYS}
    unknown = sorted(str(k) for k in group if k not in known)
    if unknown:
        raise ValueError(
            f"Invalid key(s) in {where}: {unknown}; known keys are {sorted(known - {'params'})}"
        )


def check_shared_zo_keys(
    new_group: Mapping[str, Any], where: str, groups: Iterable[Mapping[str, Any]]
) -> None:
    """A new ZO group must use the same step-wide ZO settings as the existing ZO groups."""
    if new_group["mode"] != "zo":
        return
    for index, group in enumerate(groups):
        if group["mode"] != "zo":
            continue
        for key in SHARED_ZO_KEYS:
            if group[key] != new_group[key]:
                raise ValueError(
                    f"Invalid {key} in {where}: {new_group[key]!r} (ZO groups share one set of "
                    f"probes per step, so every ZO group must use the same {key}; param group "
                    f"{index} uses {group[key]!r})"
                )
        return
