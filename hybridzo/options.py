"""Param-group keys of :class:`~hybridzo.HybridZOOptimizer` and their validation.

Every hyperparameter is a per-group key with an optimizer-wide default, as in
``torch.optim``. Values are validated, numbers normalised to Python ``int`` /
``float`` (numpy scalars, ``Fraction`` ...) and strings to Python ``str`` (numpy
strings), so that a state dict holds only what ``torch.load(weights_only=True)``
accepts, wherever they enter: the constructor,
``add_param_group``, ``load_state_dict``, and at the start of every step (a scheduler
may have written them). Errors name the group and the key.
"""

from __future__ import annotations

import math
import numbers
import secrets
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

from .directions import DISTRIBUTIONS
from .rules import RULES, theta_slope

__all__ = [
    "HYPERPARAMETERS",
    "SHARED_ZO_KEYS",
    "COUNTER_KEYS",
    "PASSTHROUGH_KEYS",
    "INPLACE_UNDO_RANGE",
    "fresh_seed",
    "normalize_options",
    "normalize_counters",
    "check_unknown_keys",
    "check_shared_zo_keys",
    "check_inplace_undo",
    "ParamGroup",
]

#: The keyword arguments of the constructor, which are also the group keys.
HYPERPARAMETERS = (
    "lr", "mode", "eps", "sign", "queries", "estimator", "candidates", "conservative",
    "rule", "momentum", "betas", "adam_eps", "weight_decay", "restore", "distribution", "seed",
    "foreach", "fused",
)

#: Keys added after 0.1.0, with the value a group saved before they existed behaves as.
NEWER_KEYS = {"restore": "exact", "distribution": "gaussian", "foreach": None, "fused": None}

#: All ZO groups are probed together along one direction per query, so these
#: keys describe the whole step and must agree across ZO groups.
SHARED_ZO_KEYS = ("estimator", "queries", "candidates", "conservative")

#: Bookkeeping the optimizer keeps in each group, so that state_dict carries it:
#: ``steps`` drives the perturbation seeds, ``nonfinite_steps`` counts skipped steps.
COUNTER_KEYS = ("steps", "nonfinite_steps")

#: Keys that other torch code puts in groups: LR schedulers (OneCycleLR, CyclicLR, SWALR),
#: named parameters.
PASSTHROUGH_KEYS = (
    "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr", "name", "param_names",
)

#: ``restore="inplace"`` undoes trial moves by dividing by ``1 - lr * weight_decay``; with
#: ``lr * weight_decay`` inside this open interval the division would amplify rounding more
#: than tenfold (and at 1 it is impossible), so such groups are refused.
INPLACE_UNDO_RANGE = (0.9, 1.1)

_MODES = ("zo", "fo")
_SIGNS = (None, "coordinate", "scalar")
_ESTIMATORS = ("central", "forward")
_RESTORES = ("exact", "inplace")
_IMPLEMENTATION_CHOICES = (None, True, False)
_SEED_LIMIT = 1 << 63
_RULE_NAMES = tuple(RULES)
_DISTRIBUTION_NAMES = tuple(DISTRIBUTIONS)


def fresh_seed() -> int:
    """A random 63-bit seed from the OS, leaving every user-visible RNG untouched."""
    return secrets.randbits(63)


def _fail(key: str, value: Any, where: str, expected: str) -> ValueError:
    return ValueError(f"Invalid {key} in {where}: {value!r} ({expected})")


def _real(options: Mapping[str, Any], key: str, where: str, low: float, high: float = math.inf,
          low_open: bool = False, high_open: bool = True) -> float:
    """A finite real number in the given range, as a Python float."""
    value = options[key]
    # Checked every step (a scheduler may have written the value): the common case costs little.
    if type(value) is not float and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
        number = math.nan
    else:
        number = float(value)
    if (
        not math.isfinite(number)
        or (number <= low if low_open else number < low)
        or (number >= high if high_open else number > high)
    ):
        raise _fail(key, value, where, f"expected a finite number in {'(' if low_open else '['}{low:g}, "
                                       f"{high:g}{')' if high_open else ']'}")
    return number


def _integer(value: Any, key: str, where: str, low: int, high: int, expected: str) -> int:
    if type(value) is int and low <= value < high:  # the common case, every step
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= int(value) < high:
        raise _fail(key, value, where, expected)
    return int(value)


def _choice(options: Mapping[str, Any], key: str, where: str, choices: Sequence[Any]) -> Any:
    """One of ``choices``; a string (``str`` or a subclass such as ``numpy.str_``) as a plain ``str``."""
    value = options[key]
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise _fail(key, value, where, "expected " + ", ".join(map(repr, choices)))
    return str(value) if isinstance(value, str) else value


def normalize_options(options: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Validate every hyperparameter of ``options`` and return them normalised.

    Numbers become Python ``float``/``int``, ``betas`` a tuple of two floats, strings ``str``.

    Raises:
        ValueError: naming ``where`` and the key of the first invalid value.
    """
    betas = options["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise _fail("betas", betas, where, "expected two finite numbers in [0, 1)")
    seed = options["seed"]
    return {
        "lr": _real(options, "lr", where, 0),
        "mode": _choice(options, "mode", where, _MODES),
        "eps": _real(options, "eps", where, 0, low_open=True),
        "sign": _choice(options, "sign", where, _SIGNS),
        "queries": _integer(options["queries"], "queries", where, 1, _SEED_LIMIT, "expected an int >= 1"),
        "estimator": _choice(options, "estimator", where, _ESTIMATORS),
        "candidates": _integer(options["candidates"], "candidates", where, 1, _SEED_LIMIT,
                               "expected an int >= 1"),
        "conservative": _choice(options, "conservative", where, (True, False)),
        "rule": _choice(options, "rule", where, _RULE_NAMES),
        "momentum": _real(options, "momentum", where, 0, 1),
        "betas": tuple(_real({"betas": b}, "betas", where, 0, 1) for b in betas),
        "adam_eps": _real(options, "adam_eps", where, 0),
        "weight_decay": _real(options, "weight_decay", where, 0),
        "restore": _choice(options, "restore", where, _RESTORES),
        "distribution": _choice(options, "distribution", where, _DISTRIBUTION_NAMES),
        "seed": None if seed is None else _integer(seed, "seed", where, 0, _SEED_LIMIT,
                                                   "expected None or an int in [0, 2**63)"),
        "foreach": _choice(options, "foreach", where, _IMPLEMENTATION_CHOICES),
        "fused": _choice(options, "fused", where, _IMPLEMENTATION_CHOICES),
    }


def normalize_counters(group: Mapping[str, Any], where: str) -> Dict[str, int]:
    """The group's counters as non-negative Python ints.

    Raises:
        ValueError: a counter that is not a non-negative integer.
    """
    return {
        key: _integer(group[key], key, where, 0, _SEED_LIMIT, "expected a non-negative int")
        for key in COUNTER_KEYS
    }


class ParamGroup(dict):
    """A param group: a dict whose SGD-rule momentum follows momentum-cycling schedulers.

    OneCycleLR and CyclicLR (``cycle_momentum=True``) cycle ``betas[0]`` of every group when the
    optimizer's defaults have ``betas``, as this optimizer's do, and mark each group with
    ``max_momentum``. For an SGD-rule group so marked, that value is its ``momentum``, as it is
    under ``torch.optim.SGD``: writing ``betas`` (or the mark) sets ``momentum`` too.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key in ("betas", "max_momentum") and self.get("rule") == "sgd" and "max_momentum" in self:
            betas = self.get("betas")
            if isinstance(betas, (tuple, list)) and betas:
                super().__setitem__("momentum", betas[0])


def check_unknown_keys(group: Mapping[str, Any], where: str) -> None:
    """Reject keys that are neither hyperparameters nor known bookkeeping."""
    known = {"params", *HYPERPARAMETERS, *COUNTER_KEYS, *PASSTHROUGH_KEYS}
    unknown = sorted(str(k) for k in group if k not in known)
    if unknown:
        raise ValueError(
            f"Invalid key(s) in {where}: {unknown}; known keys are {sorted(known - {'params'})}"
        )


def check_shared_zo_keys(
    new_group: Mapping[str, Any], where: str, groups: Iterable[Tuple[str, Mapping[str, Any]]]
) -> None:
    """A ZO group must use the same step-wide ZO settings as the other ZO groups.

    Args:
        new_group: the group to check.
        where: its name in messages.
        groups: ``(name, group)`` pairs of the groups to compare with.
    """
    if new_group["mode"] != "zo":
        return
    for name, group in groups:
        if group["mode"] != "zo":
            continue
        for key in SHARED_ZO_KEYS:
            if group[key] != new_group[key]:
                raise ValueError(
                    f"Invalid {key} in {where}: {new_group[key]!r} (ZO groups share one set of "
                    f"probes per step, so every ZO group must use the same {key}; {name} uses "
                    f"{group[key]!r})"
                )
        return


def check_inplace_undo(group: Mapping[str, Any], where: str) -> None:
    """Refuse an in-place ZO group whose trial moves could not be undone accurately.

    Raises:
        ValueError: ``restore="inplace"`` with candidates or conservative selection and
            ``lr * weight_decay`` in :data:`INPLACE_UNDO_RANGE`.
    """
    if group["mode"] != "zo" or group["restore"] != "inplace":
        return
    if group["candidates"] == 1 and not group["conservative"]:
        return
    low, high = INPLACE_UNDO_RANGE
    if low < group["lr"] * group["weight_decay"] < high:
        raise ValueError(
            f"Invalid weight_decay in {where}: {group['weight_decay']!r} (with lr {group['lr']!r}, "
            f"lr * weight_decay lies in ({low}, {high}): restore='inplace' undoes trial moves by "
            f"dividing by 1 - lr * weight_decay = {theta_slope(group):.3g}, which loses the parameter's "
            "value; use restore='exact')"
        )
