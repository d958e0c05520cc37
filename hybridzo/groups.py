"""Build optimizer parameter groups from parameter names by rules.

This module is model-agnostic: it only looks at the ``(name, parameter)`` pairs
of ``model.named_parameters()`` and needs nothing but the standard library and
torch. Each :class:`GroupRule` picks parameters by a *branch* regex on the name
and by a *layer pattern* on the transformer-block index found in the name, and
carries the options (``mode``, ``eps``, ``lr``, ...) copied into its group::

    from hybridzo.groups import GroupRule, build_param_groups

    groups = build_param_groups(
        model.named_parameters(),
        rules=[
            GroupRule(branch=r"^visual\\.", layers="hop-odd",
                      options={"mode": "zo", "eps": 5e-4, "sign": "coordinate"},
                      name="vision-zo"),
            GroupRule(branch=r"^transformer\\.", layers="hop-odd",
                      options={"mode": "zo", "eps": 1e-3}, name="language-zo"),
        ],
        default={"mode": "fo"},
    )
    # [{"params": [...], "name": "vision-zo", "mode": "zo", "eps": 5e-4, "sign": "coordinate"},
    #  {"params": [...], "name": "language-zo", "mode": "zo", "eps": 1e-3},
    #  {"params": [...], "name": "default", "mode": "fo"}]

Semantics
---------
* **Branch**: ``GroupRule.branch`` is a regex searched (``re.search``) in the
  parameter name; ``""`` matches every parameter.
* **Layer index**: read from the name with :data:`DEFAULT_LAYER_PATTERN` (or
  ``layer_pattern=``), which finds the first layer-container token:
  open_clip ``resblocks.N``, timm ``blocks.N``, Hugging Face ``layer.N`` /
  ``layers.N``, GPT-2 ``h.N``. Indices in names are 0-based; layers are
  numbered from 1, as in the paper, so ``resblocks.0`` is layer 1.
* **Layer count** of a rule's branch: ``max(index) + 1`` over every parameter
  passed in whose name matches the branch, frozen ones included; override it
  with ``num_layers=``.
* **Layer patterns** (``GroupRule.layers``): ``"all"`` (every parameter of the
  branch, also those without a layer index), ``"hop-odd"`` (layers 1, 3, 5,
  ...), ``"hop-even"`` (layers 2, 4, 6, ...), ``"prefix:K"`` (layers 1..K),
  ``"suffix:K"`` (layers L-K+1..L); K is a positive integer. A parameter
  without a layer index is selected only by ``"all"``.
* **Assignment**: parameters with ``requires_grad=False`` are left out of
  every group. Rules are tried in order and the first rule that selects a
  parameter takes it; the rest go to a group named ``"default"`` carrying the
  ``default`` options, which is omitted when empty. Groups are returned in
  rule order, the default group last, and keep the order of the parameters as
  passed in. A tensor passed under several names (tied weights) appears once:
  the first rule that selects it under any of its names takes it.
* **Errors**: a rule that would end up with no parameter raises
  ``ValueError`` naming the rule (name and index) and the offending key, as do
  invalid rule fields, ``num_layers`` values and layer patterns that ask for
  more layers than the branch has.
"""

import re
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch

__all__ = ["GroupRule", "build_param_groups", "describe_groups", "DEFAULT_LAYER_PATTERN", "layer_index"]

#: Matches the first layer-container token and captures its 0-based index:
#: ``resblocks.N`` (open_clip), ``blocks.N`` (timm), ``layer.N`` / ``layers.N``
#: (Hugging Face), ``h.N`` (GPT-2). The token must be a whole dot-separated
#: component followed by a whole-number component, so ``experts.1``,
#: ``lora_A.0``, ``fc1`` or ``resblocks.0a`` are not mistaken for layers.
#: Layouts that restart numbering per stage (e.g. ``stages.1.blocks.0``) need
#: their own ``layer_pattern``.
DEFAULT_LAYER_PATTERN: "re.Pattern[str]" = re.compile(r"(?<![^.])(?:resblocks|blocks|layers|layer|h)\.(\d+)(?![^.])")

_LAYER_PATTERN_FORMS = ("all", "hop-odd", "hop-even", "prefix:K", "suffix:K")
_COUNTED_LAYERS = re.compile(r"(prefix|suffix):([0-9]+)")
# Keys that build_param_groups sets itself; rule options may not override them.
_RESERVED_OPTION_KEYS = ("params", "name")

LayerPattern = Union[str, "re.Pattern[str]"]
NamedParameters = Iterable[Tuple[str, torch.Tensor]]


def _compile_layer_pattern(pattern: LayerPattern) -> "re.Pattern[str]":
    """Compile ``pattern`` and check that it has exactly one capture group."""
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"Invalid layer_pattern: {pattern!r} is not a regex ({error})") from None
    if compiled.groups != 1:
        raise ValueError(
            f"Invalid layer_pattern: {compiled.pattern!r} has {compiled.groups} capture groups; "
            "it needs exactly one, capturing the 0-based layer index"
        )
    return compiled


def layer_index(name: str, pattern: LayerPattern = DEFAULT_LAYER_PATTERN) -> Optional[int]:
    """Return the 0-based layer index found in a parameter name, or ``None``.

    Args:
        name: A parameter name as given by ``named_parameters()``, e.g.
            ``"visual.transformer.resblocks.3.attn.in_proj_weight"`` (-> 3).
        pattern: Regex (string or compiled) with one capture group giving the
            0-based index; the first match in ``name`` is used. Default
            :data:`DEFAULT_LAYER_PATTERN`.

    Returns:
        The captured index as an ``int``, or ``None`` if ``pattern`` does not
        match ``name``.

    Raises:
        ValueError: If ``pattern`` is not a regex with exactly one capture
            group, or captures something that is not a non-negative integer.
    """
    compiled = _compile_layer_pattern(pattern)
    match = compiled.search(name)
    if match is None:
        return None
    captured = match.group(1)
    if captured is None or not re.fullmatch(r"[0-9]+", captured):
        raise ValueError(
            f"Invalid layer_pattern: {compiled.pattern!r} captured {captured!r} in {name!r}, "
            "not a non-negative integer"
        )
    return int(captured)


@dataclass(frozen=True)
class GroupRule:
    """One rule of :func:`build_param_groups`: which parameters, and with what options.

    Args:
        branch: Regex searched (``re.search``) in each parameter name; the
            rule only considers names it matches. Default ``""`` (every name).
        layers: Which layers of the branch to take, numbered from 1:
            ``"all"`` (every parameter of the branch, including those without
            a layer index), ``"hop-odd"`` (layers 1, 3, 5, ...),
            ``"hop-even"`` (2, 4, 6, ...), ``"prefix:K"`` (first K layers) or
            ``"suffix:K"`` (last K layers), K a positive integer.
            Default ``"all"``.
        options: Optimizer options copied into the group dict, e.g.
            ``{"mode": "zo", "eps": 1e-3}``; may not contain ``"params"`` or
            ``"name"``. Stored as a read-only copy. Default empty.
        name: Group label, stored under the group's ``"name"`` key. Default
            ``None``, meaning ``f"rule{i}"`` with ``i`` the rule's position in
            the ``rules`` list.

    Raises:
        ValueError: If ``branch`` is not a valid regex, ``layers`` is not one
            of the five forms, ``options`` holds a reserved key, or ``name``
            is empty; the message names the rule and the key.
    """

    branch: str = ""
    layers: str = "all"
    options: Mapping[str, Any] = field(default_factory=dict)
    name: Optional[str] = None
    _branch_regex: "re.Pattern[str]" = field(init=False, repr=False, compare=False)
    # ("all" | "hop-odd" | "hop-even" | "prefix" | "suffix", K or 0)
    _layer_selector: Tuple[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = f"rule {self.name!r}" if self.name is not None else "unnamed rule"
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"Invalid name: {self.name!r} in {label}; expected a non-empty string or None")
        if not isinstance(self.branch, str):
            raise ValueError(f"Invalid branch: {self.branch!r} in {label}; expected a regex string")
        try:
            branch_regex = re.compile(self.branch)
        except re.error as error:
            raise ValueError(f"Invalid branch: {self.branch!r} in {label} is not a regex ({error})") from None
        if not isinstance(self.options, Mapping):
            raise ValueError(f"Invalid options: {self.options!r} in {label}; expected a mapping")
        reserved = [key for key in _RESERVED_OPTION_KEYS if key in self.options]
        if reserved:
            raise ValueError(
                f"Invalid options: key {reserved[0]!r} in {label} is set by build_param_groups "
                "(use GroupRule.name for the group label)"
            )
        object.__setattr__(self, "_branch_regex", branch_regex)
        object.__setattr__(self, "_layer_selector", self._parse_layers(label))
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    def _parse_layers(self, label: str) -> Tuple[str, int]:
        if self.layers in ("all", "hop-odd", "hop-even"):
            return self.layers, 0
        counted = _COUNTED_LAYERS.fullmatch(self.layers) if isinstance(self.layers, str) else None
        if counted is None or int(counted.group(2)) < 1:
            raise ValueError(
                f"Invalid layers: {self.layers!r} in {label}; expected one of "
                f"{', '.join(map(repr, _LAYER_PATTERN_FORMS))} with K a positive integer"
            )
        return counted.group(1), int(counted.group(2))

    def _selects(self, index: Optional[int], num_layers: int) -> bool:
        """Whether this rule's layer pattern takes a parameter with 0-based layer ``index``."""
        kind, count = self._layer_selector
        if kind == "all":
            return True
        if index is None:
            return False
        number = index + 1  # layers are numbered from 1
        if kind == "hop-odd":
            return number % 2 == 1
        if kind == "hop-even":
            return number % 2 == 0
        if kind == "prefix":
            return number <= count
        return number > num_layers - count  # suffix


def _resolve_num_layers(
    num_layers: Optional[Union[int, Mapping[str, int]]], rule_names: Sequence[str]
) -> Dict[str, int]:
    """Turn the ``num_layers`` argument into a per-rule-name override mapping."""
    if num_layers is None:
        return {}
    if isinstance(num_layers, Mapping):
        unknown = [key for key in num_layers if key not in rule_names]
        if unknown:
            raise ValueError(
                f"Invalid num_layers: key {unknown[0]!r} names no rule; rule names are {list(rule_names)}"
            )
        overrides = dict(num_layers)
    else:
        overrides = {name: num_layers for name in rule_names}
    for name, count in overrides.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"Invalid num_layers: {count!r} for rule {name!r}; expected a positive int")
    return overrides


def build_param_groups(
    named_parameters: NamedParameters,
    rules: Sequence[GroupRule],
    default: Optional[Mapping[str, Any]] = None,
    *,
    layer_pattern: LayerPattern = DEFAULT_LAYER_PATTERN,
    num_layers: Optional[Union[int, Mapping[str, int]]] = None,
) -> List[Dict[str, Any]]:
    """Split parameters into optimizer param groups by ordered rules.

    Args:
        named_parameters: ``(name, tensor)`` pairs, typically
            ``model.named_parameters()``; any iterable (it is read once).
            Tensors with ``requires_grad=False`` join no group but count
            towards the layer count of the branches their names match.
        rules: :class:`GroupRule` objects, tried in order; the first rule that
            selects a parameter takes it. Group names (``rule.name`` or
            ``f"rule{i}"``) must be unique.
        default: Options of the group holding the parameters no rule takes,
            named ``"default"`` unless ``default`` has a ``"name"``; may not
            contain ``"params"``. Default ``None``, meaning ``{}``. The group
            is omitted when empty.
        layer_pattern: Regex (string or compiled) with one capture group
            giving a name's 0-based layer index; the first match is used.
            Default :data:`DEFAULT_LAYER_PATTERN`.
        num_layers: Layer count to use instead of counting from names: an int
            for every rule, or a mapping ``rule name -> count`` for some rules.
            Default ``None`` (count ``max(index) + 1`` over the branch).

    Returns:
        A list of dicts ``{"params": [tensors], "name": name, **options}``,
        one per rule in rule order, then the default group if non-empty.
        Parameters keep their input order, and each tensor appears once.

    Raises:
        ValueError: Naming the rule (name and index) and the offending key if
            a branch matches no parameter name; a layer pattern selects no
            trainable parameter of its branch; every parameter a rule selects
            was taken by an earlier rule; ``prefix:K``/``suffix:K`` asks for
            more layers than the branch has; ``hop-even`` is used on a 1-layer
            branch; rule names repeat; ``num_layers`` is not a positive int or
            names an unknown rule, or is smaller than an index found in the
            branch; or ``layer_pattern``/``default`` is invalid.
    """
    compiled_layer_pattern = _compile_layer_pattern(layer_pattern)
    default_options = dict(default) if default is not None else {}
    if "params" in default_options:
        raise ValueError("Invalid default: key 'params' is set by build_param_groups")
    rule_names = _rule_names(rules)
    layer_count_overrides = _resolve_num_layers(num_layers, rule_names)

    entries = [(name, tensor, layer_index(name, compiled_layer_pattern)) for name, tensor in named_parameters]
    taken_ids: Set[int] = set()
    groups: List[Dict[str, Any]] = []
    for rule_position, (rule, rule_name) in enumerate(zip(rules, rule_names)):
        where = f"rule {rule_name!r} (#{rule_position})"
        branch_entries = [entry for entry in entries if rule._branch_regex.search(entry[0])]
        if not branch_entries:
            raise ValueError(f"Invalid branch: {rule.branch!r} in {where} matches no parameter name")
        branch_layers, source = _branch_layer_count(rule, where, branch_entries, layer_count_overrides.get(rule_name))
        selected = [
            tensor for _, tensor, index in branch_entries if tensor.requires_grad and rule._selects(index, branch_layers)
        ]
        if not selected:
            raise ValueError(
                f"Invalid layers: {rule.layers!r} in {where} selects no trainable parameter of branch "
                f"{rule.branch!r} ({branch_layers} layers, {source})"
            )
        params = _take(selected, taken_ids)
        if not params:
            raise ValueError(
                f"Invalid branch/layers: {rule.branch!r}/{rule.layers!r} in {where} select only "
                "parameters already taken by earlier rules"
            )
        groups.append({"params": params, "name": rule_name, **rule.options})

    default_params = _take([tensor for _, tensor, _ in entries if tensor.requires_grad], taken_ids)
    if default_params:
        groups.append({"params": default_params, "name": "default", **default_options})
    return groups


def _rule_names(rules: Sequence[GroupRule]) -> List[str]:
    """Each rule's group name (``rule.name`` or ``f"rule{i}"``), checked to be unique."""
    for position, rule in enumerate(rules):
        if not isinstance(rule, GroupRule):
            raise TypeError(f"rules[{position}] is a {type(rule).__name__}, not a GroupRule")
    rule_names = [rule.name if rule.name is not None else f"rule{i}" for i, rule in enumerate(rules)]
    first_position: Dict[str, int] = {}
    for position, name in enumerate(rule_names):
        if name in first_position:
            raise ValueError(
                f"Invalid name: {name!r} of rule #{position} repeats the name of rule #{first_position[name]}"
            )
        first_position[name] = position
    return rule_names


def _branch_layer_count(
    rule: GroupRule, where: str, branch_entries: Sequence[Tuple[str, torch.Tensor, Optional[int]]],
    override: Optional[int],
) -> Tuple[int, str]:
    """The layer count of ``rule``'s branch and where it comes from, checked against the layer pattern."""
    indices = [index for _, _, index in branch_entries if index is not None]
    counted_layers = max(indices) + 1 if indices else 0
    branch_layers = counted_layers if override is None else override
    if branch_layers < counted_layers:
        raise ValueError(
            f"Invalid num_layers: {branch_layers} for {where}, but branch {rule.branch!r} "
            f"has a parameter with 0-based layer index {counted_layers - 1}"
        )
    kind, count = rule._layer_selector
    source = "counted from parameter names" if override is None else "num_layers"
    if kind in ("prefix", "suffix") and count > branch_layers:
        raise ValueError(
            f"Invalid layers: {rule.layers!r} in {where} asks for {count} layers, but branch "
            f"{rule.branch!r} has {branch_layers} ({source})"
        )
    if kind == "hop-even" and branch_layers == 1:
        raise ValueError(
            f"Invalid layers: 'hop-even' in {where} selects nothing, branch {rule.branch!r} has 1 layer ({source})"
        )
    return branch_layers, source


def _take(tensors: Sequence[torch.Tensor], taken_ids: Set[int]) -> List[torch.Tensor]:
    """The tensors no earlier group took (each once, tied weights included), now marked as taken."""
    params: List[torch.Tensor] = []
    for tensor in tensors:
        if id(tensor) not in taken_ids:
            taken_ids.add(id(tensor))
            params.append(tensor)
    return params


def describe_groups(groups: Sequence[Mapping[str, Any]]) -> str:
    """Return a small text table of param groups: name, mode, #tensors, #elements.

    Args:
        groups: Param group dicts, e.g. the output of
            :func:`build_param_groups` or ``optimizer.param_groups``. A missing
            ``"name"`` shows as ``group{i}``, a missing ``"mode"`` as ``-``.

    Returns:
        The table as one string (no trailing newline), with a total row.
    """
    names = [str(group.get("name", f"group{i}")) for i, group in enumerate(groups)]
    modes = [str(group.get("mode", "-")) for group in groups]
    param_lists = [list(group["params"]) for group in groups]
    tensor_counts = [len(params) for params in param_lists]
    element_counts = [sum(p.numel() for p in params) for params in param_lists]
    rows = [("group", "mode", "tensors", "elements")]
    rows += [
        (name, mode, str(tensors), f"{elements:,}")
        for name, mode, tensors, elements in zip(names, modes, tensor_counts, element_counts)
    ]
    rows.append(("total", "", str(sum(tensor_counts)), f"{sum(element_counts):,}"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    # Text columns left-aligned, number columns right-aligned.
    lines = [
        "  ".join(
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
