"""HybridZOOptimizer: zeroth-order and first-order param groups in one torch optimizer."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from itertools import chain
from operator import is_, itemgetter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .closure import ClosureRunner, CommonRandomNumbers, ConstantLossWatch, NonFiniteLoss
from .directions import DirectionGenerator
from .distributed import RankAgreement
from .first_order import FirstOrderChecks, FirstOrderStep, check_implementation, initial_fo_state
from .interrupts import deferred_interrupts
from .options import (
    COUNTER_KEYS,
    HYPERPARAMETERS,
    NEWER_KEYS,
    check_inplace_undo,
    check_shared_zo_keys,
    check_unknown_keys,
    ParamGroup,
    fresh_seed,
    normalize_counters,
    normalize_options,
)
from .plan import StepPlan, plan_key
from .rules import RULES, check_state, initial_state
from .sharding import any_sharded, is_prepared, is_sharded, local_data, local_slice
from .zo_step import ZOStep

from torch.optim.optimizer import ParamsT

__all__ = ["HybridZOOptimizer", "ParamsT"]

Closure = Callable[[], Any]
Group = Dict[str, Any]


class HybridZOOptimizer(Optimizer):
    r"""Zeroth-order (forward-only) and first-order (backprop) updates per param group.

    Each param group has a ``mode``: ``"fo"`` groups are updated from backprop
    gradients, ``"zo"`` groups from SPSA/MeZO-style estimates that need only forward
    passes. One call of :meth:`step` does, in order:

    1. **FO pass** (if there are FO groups): run the closure once with autograd on,
       ZO parameters temporarily excluded from the graph, and backpropagate the
       loss into the FO parameters only. This also gives the loss at
       :math:`\theta`, which is needed anyway by the forward estimator and by
       conservative selection (without FO groups it is then a no-grad forward).
    2. **ZO probes**: for each candidate :math:`k` and query :math:`i`, draw a
       direction :math:`z_{ki}` from a seed (never stored; Gaussian, or Rademacher
       with ``distribution="rademacher"``), perturb every ZO group :math:`g` to
       :math:`\theta_g \pm \epsilon_g z_{ki,g}` and evaluate the loss without
       autograd. The projected difference is
       :math:`d_{ki} = (f(\theta+\epsilon z) - f(\theta-\epsilon z))/2` (``"central"``)
       or :math:`f(\theta+\epsilon z) - f(\theta)` (``"forward"``), and group
       :math:`g`'s estimate is

       .. math:: \hat g_{k,g} = \frac{1}{q}\sum_i \frac{d_{ki}}{\epsilon_g} z_{ki,g},

       unbiased for each group's gradient (the other groups' directions are
       independent, and :math:`E[zz^T] = I` for both distributions).
       ``sign="scalar"`` replaces :math:`d/\epsilon` by :math:`\operatorname{sign}(d)`;
       ``sign="coordinate"`` (MoZO) takes the element-wise sign of :math:`\hat g`.
    3. **Candidates**: with ``candidates=K > 1`` each of the K estimates gives a
       candidate move :math:`\Delta_k` through the group's rule, computed without
       touching optimizer state, and the candidate with the lowest loss is kept.
       With ``conservative=True`` the mirrored move (the rule applied to
       :math:`-\hat g_k`, i.e. :math:`\theta + \Delta_k` for plain SGD) and
       :math:`\theta` itself are candidates too; for ``K=1`` this is exactly the
       ZO-SGD-Cons rule of ZO-Bench and ZeroFlow (lowest of :math:`f(\theta)`,
       :math:`f(\theta-\Delta)`, :math:`f(\theta+\Delta)`, ties going to
       :math:`\theta+\Delta`, then :math:`\theta-\Delta`).
       With one query and a signed estimate the mirror pairs are
       :math:`\pm` a function of :math:`z` alone, so conservative selection makes the
       step independent of :math:`\epsilon` up to rounding (a difference of exactly 0,
       exact ties): tune ``lr``, not ``eps``, there.
    4. **Commit**: ZO parameters are set to the chosen candidate and only its
       optimizer state is written; FO groups take their rule's step with torch.optim's
       own implementation (the per-tensor loop, ``foreach`` or ``fused``, as the group's
       keys choose), bit for bit ``torch.optim.SGD``/``AdamW``'s with the same choice.

    With ``restore="exact"`` every probe is written from a copy of the ZO parameters
    taken at the start of the step, so the parameters end the step changed by exactly
    the chosen update, bit for bit, in every dtype (the price is that one copy, for the
    step's duration). ``restore="inplace"`` keeps no copy: probes move the parameters in
    place (MeZO's :math:`+\epsilon, -2\epsilon`) and trial moves are undone by
    recomputing them, which rounds (a few ulps per probe).
    All closure calls of a step replay the same RNG state (common random numbers:
    identical dropout masks), and the RNG is then left as one call would leave it.
    A NaN or inf loss anywhere abandons the step: parameters and optimizer state
    stay as they were, a ``RuntimeWarning`` is issued and the group counter
    ``nonfinite_steps`` is incremented. Any exception raised before the commit (in a
    closure call, or by a check of a value, gradient or state entry) leaves parameters,
    gradients, optimizer state and counters as they were before the step. Everything the
    commit needs is checked, and every state entry it creates allocated, before its first
    write, and a Ctrl-C (SIGINT) that arrives during the commit is raised when the commit
    and the counters are done: the step is then complete, as an uninterrupted one. Like
    ``torch.optim``, FO groups keep no copy to undo a commit that runs out of memory for
    the kernels' temporaries.

    Args:
        params: iterable of parameters or of dicts defining param groups; every
            keyword below is also a per-group key.
        closure: default closure used when :meth:`step` is called without one
            (default None). A closure runs the forward pass on the current batch and
            returns the scalar loss; it need not call backward (see :meth:`step`).
        lr: learning rate (default 1e-3); the key LR schedulers change.
        mode: ``"zo"`` or ``"fo"`` (default ``"zo"``).
        eps: ZO perturbation scale :math:`\epsilon` (default 1e-3).
        sign: ``None``, ``"coordinate"`` or ``"scalar"`` (default None).
        queries: random directions averaged per estimate, :math:`q` (default 1).
        estimator: ``"central"`` (2 forwards per query) or ``"forward"`` (1 forward
            per query, reusing :math:`f(\theta)`) (default ``"central"``).
        candidates: independent estimates competing by loss, :math:`K` (default 1).
        conservative: also consider mirrored moves and not moving (default False).
        rule: ``"sgd"`` or ``"adamw"`` (default ``"sgd"``), for both modes.
        momentum: SGD momentum (default 0).
        betas: AdamW :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        adam_eps: AdamW denominator epsilon (default 1e-8).
        weight_decay: L2 decay for SGD, decoupled decay for AdamW (default 0).
        restore: how ZO groups return to :math:`\theta` after probes and trial moves:
            ``"exact"`` (from a copy, bit for bit) or ``"inplace"`` (no copy, up to
            rounding) (default ``"exact"``).
        distribution: ZO directions, ``"gaussian"`` (:math:`N(0, I)`, MeZO) or
            ``"rademacher"`` (:math:`\pm 1` entries, SPSA; cheaper to draw) (default
            ``"gaussian"``).
        seed: base seed of the perturbation stream (default None: drawn from the OS).
            Per-step seeds derive from it, the group index and the group's step
            count, so a run, and a run resumed from ``state_dict``, is reproducible.
        foreach: FO groups: step with torch's ``torch._foreach_*`` implementation
            (True), its per-tensor loop (False), or torch's default for the device
            (None: foreach on CUDA, the loop on CPU) (default None). As ``torch.optim``'s
            ``foreach``; the result is bit for bit ``torch.optim.SGD``/``AdamW``'s with
            the same choice. ZO groups ignore it.
        fused: FO groups: step with torch's fused kernels (``torch._fused_sgd_``,
            ``torch._fused_adamw_``; real floating-point parameters on CPU, CUDA and the
            other devices torch has them for), usually the fastest (default None: not
            fused). Cannot be True together with ``foreach``. ZO groups ignore it.

    ``estimator``, ``queries``, ``candidates`` and ``conservative`` describe the whole
    step (all ZO groups are probed together), so all ZO groups must agree on them.
    """

    def __init__(
        self,
        params: ParamsT,
        closure: Optional[Closure] = None,
        *,
        lr: float = 1e-3,
        mode: str = "zo",
        eps: float = 1e-3,
        sign: Optional[str] = None,
        queries: int = 1,
        estimator: str = "central",
        candidates: int = 1,
        conservative: bool = False,
        rule: str = "sgd",
        momentum: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        restore: str = "exact",
        distribution: str = "gaussian",
        seed: Optional[int] = None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        if closure is not None and not callable(closure):
            raise TypeError(f"Invalid closure: {closure!r} (expected a callable or None)")
        defaults = normalize_options(dict(
            lr=lr, mode=mode, eps=eps, sign=sign, queries=queries, estimator=estimator,
            candidates=candidates, conservative=conservative, rule=rule, momentum=momentum,
            betas=betas, adam_eps=adam_eps, weight_decay=weight_decay, restore=restore,
            distribution=distribution, seed=fresh_seed() if seed is None else seed,
            foreach=foreach, fused=fused,
        ), "defaults")
        self._closure = closure
        self._directions = DirectionGenerator()
        self._ranks: Optional[RankAgreement] = None
        self._agreed_groups: List[Group] = []
        self._constant_loss = ConstantLossWatch()
        self._fo_checked = FirstOrderChecks()
        self._zo_plan: Optional[StepPlan] = None
        # (each group's hyperparameter objects, its validated options) as the last step left them: a cache.
        self._validated: Optional[Tuple[List[Tuple[Any, ...]], List[Group]]] = None
        self.last_step_info: Dict[str, Any] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups = [g if isinstance(g, ParamGroup) else ParamGroup(g) for g in self.param_groups]
        # Groups saved before a key existed take the value they behaved as.
        for key, value in NEWER_KEYS.items():
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)
        # Not state (pickling drops them; load_state_dict keeps them): the closure belongs to
        # the caller's model, the generators are a cache, seeds are agreed again.
        self.__dict__.setdefault("_closure", None)
        self.__dict__.setdefault("_directions", DirectionGenerator())
        self.__dict__.setdefault("_ranks", None)
        self.__dict__.setdefault("last_step_info", {})
        self.__dict__.setdefault("_constant_loss", ConstantLossWatch())
        self.__dict__.setdefault("_fo_checked", FirstOrderChecks())
        self._agreed_groups = []
        self._zo_plan = None
        self._validated = None

    # ---------------------------------------------------------------- entry points

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group after validating it like the constructor's arguments.

        Raises:
            ValueError: an unknown key, an invalid value, or a ZO group whose
                step-wide ZO settings differ from the existing ZO groups'.
            TypeError: a ZO group holding non-floating-point tensors.

        An AdamW group whose ``adam_eps`` underflows to 0 in its parameters' dtype (1e-8 in
        fp16) is refused too: AdamW would divide 0 by 0 where a gradient stays 0.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        where = f"param group {len(self.param_groups)}"
        check_unknown_keys(param_group, where)
        group = dict(param_group)
        if "seed" in group and group["seed"] is None:
            group["seed"] = fresh_seed()
        options = normalize_options({**self.defaults, **group}, where)
        group.update({key: options[key] for key in HYPERPARAMETERS if key in group})
        group.update(normalize_counters({**dict.fromkeys(COUNTER_KEYS, 0), **group}, where))
        check_shared_zo_keys(options, where, self._named_groups())
        check_inplace_undo(options, where)
        self._check_tensors(group, options, where)
        super().add_param_group(ParamGroup(group))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict after validating its groups like :meth:`add_param_group` does.

        State tensors are placed as ``torch.optim`` places them (the parameter's device, and its
        dtype if floating point), and the rule's buffers (``momentum_buffer``, ``exp_avg``,
        ``exp_avg_sq``) take the parameter's memory layout as well: the update kernels walk
        parameter and buffers in memory order, so a buffer saved with other strides (e.g. built
        with ``.t()``) is copied into the parameter's layout, keeping its values by index.

        Raises:
            ValueError, TypeError: a loaded group with an invalid value, counter or state
                entry (the message names the group and key), an incomplete state entry (one
                of the rule's keys missing while others are there), or a state tensor that
                cannot be placed with its parameter (e.g. on the ``meta`` device); nothing is
                loaded then.
        """
        saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved, list) and len(saved) == len(self.param_groups) and all(
            isinstance(s, dict) and len(s.get("params", ())) == len(g["params"])
            for s, g in zip(saved, self.param_groups)
        ):
            groups, state = self._validated_groups(saved, state_dict)
            state_dict = {**state_dict, "param_groups": groups, "state": state}
        super().load_state_dict(state_dict)  # torch reports mismatched group sizes itself

    def _validated_groups(self, saved: List[Group], state_dict: Dict[str, Any]) -> Tuple[List[Group], Dict[Any, Any]]:
        """The loaded groups, validated and normalised, and the state with its tensors placed."""
        groups: List[Group] = []
        param_of: Dict[Any, Tuple[Tensor, Group, str]] = {}
        for i, (loaded, current) in enumerate(zip(saved, self.param_groups)):
            where = f"param group {i}"
            values = {**NEWER_KEYS, **loaded}
            missing = [key for key in (*HYPERPARAMETERS, *COUNTER_KEYS) if key not in values]
            if missing:
                raise ValueError(f"Invalid state_dict: {where} lacks the keys {missing}")
            if values["seed"] is None:
                raise ValueError(f"Invalid seed in {where}: None (a saved group keeps its seed)")
            options = normalize_options(values, where)
            group = {**values, **options, **normalize_counters(values, where)}
            check_shared_zo_keys(group, where, [(f"param group {j}", g) for j, g in enumerate(groups)])
            check_inplace_undo(group, where)
            self._check_tensors({"params": current["params"]}, group, where)
            groups.append(group)
            for position, (key, param) in enumerate(zip(loaded["params"], current["params"])):
                param_of[key] = (param, group, f"{where}, parameter {position}")
        state = dict(state_dict.get("state", {}))
        for key, entry in state.items():
            if key in param_of and isinstance(entry, dict):
                param, group, where = param_of[key]
                problem = check_state(entry, param, group)
                if problem is not None:
                    raise ValueError(f"Invalid state in {where}: {problem}")
                state[key] = _placed_state(entry, param, group, where)
        return groups, state

    def _named_groups(self) -> List[Tuple[str, Group]]:
        return [(f"param group {i}", g) for i, g in enumerate(self.param_groups)]

    @staticmethod
    def _check_tensors(group: Group, options: Group, where: str) -> None:
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, (set, list, tuple)):
            params = list(params)  # a generator: materialise it once, for this check and torch
            group["params"] = params
        check_implementation(options, [item[1] if isinstance(item, tuple) else item for item in params], where)
        for position, item in enumerate(params):
            tensor = item[1] if isinstance(item, tuple) else item
            if not isinstance(tensor, Tensor):
                continue  # torch's add_param_group reports it
            if options["mode"] == "zo":
                if not tensor.is_floating_point() or tensor.is_complex():
                    raise TypeError(
                        f"Invalid params in {where}: ZO groups need real floating-point tensors, "
                        f"got dtype {tensor.dtype}"
                    )
                try:
                    local_slice(tensor)
                except ValueError as error:
                    raise ValueError(f"Invalid params in {where}, parameter {position}: {error}") from None
            adam_eps = options["adam_eps"]
            if (
                options["rule"] == "adamw"
                and adam_eps > 0
                and tensor.is_floating_point()
                and torch.tensor(adam_eps, dtype=tensor.dtype).item() == 0
            ):
                # AdamW would then divide 0 by 0 wherever a coordinate's gradient was always 0.
                raise ValueError(
                    f"Invalid adam_eps in {where}: {adam_eps!r} (it underflows to 0 in "
                    f"{tensor.dtype} parameters; use a value that {tensor.dtype} represents, such as "
                    f"{torch.finfo(tensor.dtype).tiny:.1e}, or keep AdamW weights in bf16/fp32)"
                )

    # ------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Optional[Tensor]:  # type: ignore[override]
        """Take one optimisation step.

        Args:
            closure: runs the forward pass on the current batch and returns the scalar
                loss (default None: the closure given to the constructor). It is called
                several times per step with the same RNG state. It need not call
                backward: the optimizer backpropagates for FO groups. A torch-style
                closure that calls ``zero_grad()`` and ``backward()`` itself works too;
                during the forward-only probes its backward does nothing (in the thread
                running the step only). Without a closure, a step with FO groups only
                uses the gradients already in ``.grad``, as ``torch.optim`` does; with ZO
                groups, no state yet and every ``lr`` 0 (how ``torch.distributed.checkpoint``
                initialises optimizer state) it only creates the state entries a first step
                reads (buffers as zeros, AdamW's step count 0) and advances nothing.

        Returns:
            The loss at the unperturbed parameters, averaged over data-parallel ranks,
            as a detached 0-dim tensor with the dtype and device of the closure's loss.
            For the pure-ZO central estimator without candidate selection (``candidates=1``,
            not ``conservative``) no forward at :math:`\\theta` is needed, and the mean of
            the probe losses, equal to it up to :math:`O(\\epsilon^2)`, is returned instead
            of spending a forward. None without a closure.

        Raises:
            ValueError: an invalid group value (e.g. written by a scheduler), checked before
                anything is written.
            ValueError: under FSDP2, a DTensor parameter of a model not passed to
                :func:`~hybridzo.prepare_fsdp`, or a plain tensor that requires grad in an FO
                group of a multi-process run (nothing would average its gradient over processes).
            ValueError: ``torch.amp.GradScaler.step`` with a closure or with ZO groups (an
                FO-only optimizer steps from the scaler's unscaled gradients as torch.optim does).
            ValueError: an FO gradient or state entry whose dtype (or, for state, shape or
                device) differs from its parameter's, or AdamW state holding only some of
                ``exp_avg``, ``exp_avg_sq`` and ``step``; checked before anything is written.
            RuntimeError: sparse gradients in an FO group.
        """
        closure = self._closure if closure is None else closure
        if closure is not None and not callable(closure):
            raise TypeError(f"Invalid closure: {closure!r} (expected a callable)")
        self._refuse_grad_scaler(closure)
        if closure is None and self._is_state_initialization():
            return self._initialize_state()
        if closure is None:
            return self._step_from_grads()
        zo_groups, fo_groups = self._prepare_step(has_closure=True)
        runner = ClosureRunner(closure, CommonRandomNumbers(p.device for g in self.param_groups
                                                            for p in g["params"]), self._agree_across_ranks())
        grads_before = [(p, p.grad) for g in self.param_groups for p in g["params"]]
        zo = ZOStep(zo_groups, runner, self.state, self._directions, self._plan(zo_groups)) if zo_groups else None
        loss: Optional[float] = None
        chosen: Optional[str] = None
        skipped = committed = False
        # FO groups whose parameters are all frozen (or empty) have nothing to backpropagate into:
        # as torch.optim, skip them rather than ask the closure's loss for a gradient.
        fo_trains = any(p.requires_grad for g in fo_groups for p in g["params"])
        try:
            if fo_trains:
                loss = self._first_order_pass(runner, fo_groups, zo_groups)
            elif zo is None:
                loss = runner.probe("the loss at theta")
            if zo is not None:
                with _parked_grads([p for g in fo_groups for p in g["params"]]):
                    loss, choice = zo.search(loss)
                chosen = zo.chosen_name(choice)
            first_order = FirstOrderStep(self._named_fo_groups() if fo_trains else [], self.state,
                                         self._fo_checked)  # checks, allocates; writes nothing
            # The writes of the commit are not split by a Ctrl-C; one that arrives during them
            # is raised when they (and the counters) are done, and undoes nothing.
            with deferred_interrupts():
                if zo is not None:
                    zo.commit(choice)
                first_order.commit()
                self._advance_counters(skipped=False)
                committed = True
        except NonFiniteLoss as bad:
            if zo is not None:
                zo.back_to_theta()
            skipped, loss = True, bad.value if loss is None else loss
            warnings.warn(f"HybridZOOptimizer: non-finite loss ({bad.value}) in {bad.phase}; step skipped, "
                          "parameters and optimizer state left unchanged", RuntimeWarning, stacklevel=3)
            self._advance_counters(skipped=True)
        except BaseException:
            if not committed:
                for p, grad in grads_before:  # first: an interrupt held by back_to_theta ends it
                    p.grad = grad
                if zo is not None:
                    zo.back_to_theta()
            raise
        finally:
            runner.rng.finish()
            if zo is not None:
                zo.end()
        if zo is not None and not skipped:
            self._constant_loss.observe(runner.losses)
        self.last_step_info = {
            "forwards": runner.forwards, "backwards": int(fo_trains), "chosen": chosen,
            "skipped": skipped, "loss": loss, "scalars_reduced": runner.ranks.scalars_reduced,
            "direction_sweeps": zo.direction_sweeps if zo is not None else 0.0,
        }
        return runner.as_tensor(loss)  # type: ignore[arg-type]

    def _prepare_step(self, has_closure: bool) -> Tuple[List[Tuple[int, Group]], List[Group]]:
        """Validate every group (a scheduler may have written it) and what the step will read.

        Nothing is written unless everything is valid; then the groups take their
        normalised values. Returns the ZO groups (with indices) and the FO groups.
        """
        normalized: List[Group] = []
        sharded = any_sharded(chain.from_iterable(g["params"] for g in self.param_groups))
        world_size = _sharded_world_size(self.param_groups) if sharded else 1
        validated = self._still_validated()
        for i, group in enumerate(self.param_groups):
            where = f"param group {i}"
            if validated is not None:
                options = dict(validated[i])
            else:
                options = normalize_options(group, where)
                if options["seed"] is None:
                    raise ValueError(f"Invalid seed in {where}: None (groups keep the seed they were given)")
                check_inplace_undo(options, where)
                if options["fused"] and options["foreach"]:  # written between steps, in any group
                    check_implementation(options, [], where)
                check_shared_zo_keys(options, where, [(f"param group {j}", o) for j, o in enumerate(normalized)])
            options.update(normalize_counters(group, where))
            # FO gradients and state are checked by FirstOrderStep, which reads them anyway.
            for position, p in enumerate(group["params"] if options["mode"] == "zo" or sharded else ()):
                if not is_prepared(p):
                    raise ValueError(
                        f"Invalid params in {where}, parameter {position}: an FSDP2 (DTensor) parameter of a "
                        "model not passed to hybridzo.prepare_fsdp(model); call it after fully_shard, or ZO "
                        "writes into the shards would not reach the forwards"
                    )
                if world_size > 1 and options["mode"] == "fo" and p.requires_grad and not is_sharded(p):
                    raise ValueError(
                        f"Invalid params in {where}, parameter {position}: a plain tensor in an FO group of a "
                        f"{world_size}-process FSDP2 run (the optimizer's other parameters are DTensors). Each "
                        "process would step it from the gradient of its own part of the batch, which nothing "
                        "averages over processes, and its copies would drift apart; shard the module that holds "
                        "it with fully_shard (e.g. fully_shard(model) on the root as well), or put it in a ZO "
                        "group (ZO steps agree across processes)"
                    )
                if options["mode"] == "fo":
                    continue
                problem = check_state(self.state[p], p, options) if p in self.state else None
                if problem is not None:
                    raise ValueError(f"Invalid state in {where}, parameter {position}: {problem}")
            normalized.append(options)
        zo_indices = [i for i, options in enumerate(normalized) if options["mode"] == "zo"]
        if not has_closure and zo_indices:
            raise ValueError(
                f"Invalid closure: None (param groups {zo_indices} are ZO groups, which need a "
                "closure that returns the loss; pass it to step() or to the constructor)"
            )
        for group, options in zip(self.param_groups, normalized):
            group.update(options)
        self._validated = ([_HYPERPARAMETERS_OF(g) for g in self.param_groups], normalized)
        zo_groups = [(i, self.param_groups[i]) for i in zo_indices]
        return zo_groups, [g for g in self.param_groups if g["mode"] == "fo"]

    def _still_validated(self) -> Optional[List[Group]]:
        """The last step's validated options if every group still holds the very objects it validated.

        Validation is a function of the hyperparameters alone, and once normalised they are immutable
        (floats, ints, strings, tuples), so the same objects need no second look; a scheduler's write
        is a new object and is validated again. Costs one pass over the keys instead of the checks.
        """
        if self._validated is None:
            return None
        values, options = self._validated
        if len(values) != len(self.param_groups):
            return None
        for group, before in zip(self.param_groups, values):
            if not all(map(is_, _HYPERPARAMETERS_OF(group), before)):
                return None
        return options

    def _plan(self, zo_groups: List[Tuple[int, Group]]) -> StepPlan:
        """The chunks of the ZO groups: the last step's, unless the groups or their tensors changed."""
        key = plan_key(zo_groups)
        if self._zo_plan is None or self._zo_plan.key != key:
            self._zo_plan = StepPlan(zo_groups, key)
        return self._zo_plan

    def _refuse_grad_scaler(self, closure: Optional[Closure]) -> None:
        """Refuse ``torch.amp.GradScaler.step`` wherever it cannot work exactly.

        The scaler unscales and checks the gradients in ``.grad`` before calling ``step``.
        That is exact for FO groups stepping from those gradients (no closure), but the FO
        pass of a closure computes new, scaled gradients after the check, and ZO groups need
        a closure. The scaler is recognised among the callers: torch's protocol for optimizers
        that unscale themselves (``_step_supports_amp_scaling``) would also make Lightning
        refuse gradient clipping under bf16, where no scaler runs.

        Raises:
            ValueError: called by a GradScaler with a closure or with ZO groups.
        """
        if not _called_by_grad_scaler():
            return
        if closure is None and all(g["mode"] == "fo" for g in self.param_groups):
            return
        raise ValueError(
            "torch.amp.GradScaler cannot drive HybridZOOptimizer "
            + ("with a closure" if closure is not None else "with ZO groups")
            + ": the scaler unscales and checks the gradients before step(), but the step computes "
            "its own (and ZO groups need a closure). Use bf16 autocast, which needs no scaler; an "
            "optimizer with FO groups only works with scaler.step(optimizer) without a closure."
        )

    def _agree_across_ranks(self) -> RankAgreement:
        """The rank agreement of this step: groups used for the first time get rank 0's seeds."""
        if self._ranks is None:
            self._ranks = RankAgreement()
        new = [g for g in self.param_groups if not any(g is a for a in self._agreed_groups)]
        if new:
            # Seeds drawn independently per rank (seed=None) must agree before the group's first step.
            self._ranks.agree_on_seeds(new)
            self._agreed_groups += new
        self._ranks.scalars_reduced = 0
        return self._ranks

    def _first_order_pass(self, runner: ClosureRunner, fo_groups: List[Group],
                          zo_groups: List[Tuple[int, Group]]) -> float:
        """Run the closure with autograd for FO parameters only, then backward; the loss at theta."""
        for g in fo_groups:
            for p in g["params"]:
                p.grad = None
        # Excluding ZO parameters from autograd keeps backward (and the activations it
        # saves) to what the FO parameters need.
        # Each switch is deferred as a whole: a Ctrl-C never leaves some parameters switched.
        excluded = [p for _, g in zo_groups for p in g["params"] if p.requires_grad]
        switched: List[Tensor] = []
        try:
            with deferred_interrupts():
                for p in excluded:
                    p.requires_grad_(False)
                switched = excluded
            raw, value, backward_calls = runner.with_grad()
        finally:
            with deferred_interrupts():
                for p in switched:
                    p.requires_grad_(True)
        if not math.isfinite(value):
            raise NonFiniteLoss(value, "the loss at theta")
        if backward_calls == 0:
            if not isinstance(raw, Tensor):
                raise TypeError(
                    f"FO param groups need the loss's gradient, but the closure returned a "
                    f"{type(raw).__name__} ({raw!r}), which has none: return the loss tensor "
                    "(e.g. `return loss`, not `return loss.item()`)"
                )
            if not raw.requires_grad:
                raise ValueError(
                    "FO param groups need the loss's gradient, but the closure's loss does not "
                    "require grad (is the forward pass under torch.no_grad(), or is the loss computed "
                    "outside the closure?)"
                )
            with torch.enable_grad():
                raw.backward()
        for i, group in enumerate(self.param_groups):
            if group["mode"] == "fo":
                _check_dense_grads(group, f"param group {i}")
        return value

    def _named_fo_groups(self) -> List[Tuple[str, Group]]:
        return [(name, g) for name, g in self._named_groups() if g["mode"] == "fo"]

    def _step_from_grads(self) -> None:
        """A closure-less step: FO groups from the gradients already in ``.grad``."""
        _, fo_groups = self._prepare_step(has_closure=False)
        first_order = FirstOrderStep(self._named_fo_groups(), self.state, self._fo_checked)  # checks, allocates; writes nothing
        with deferred_interrupts():
            first_order.commit()
            self._advance_counters(skipped=False)
        self.last_step_info = {"forwards": 0, "backwards": 0, "chosen": None, "skipped": False,
                               "loss": None, "scalars_reduced": 0, "direction_sweeps": 0.0}
        return None

    def _is_state_initialization(self) -> bool:
        """A closure-less step with ZO groups, no state yet and every lr 0: how
        ``torch.distributed.checkpoint`` creates optimizer state to load into."""
        return (
            not self.state
            and any(g["mode"] == "zo" for g in self.param_groups)
            and all(isinstance(g["lr"], (int, float, Tensor)) and float(g["lr"]) == 0 for g in self.param_groups)
        )

    def _initialize_state(self) -> None:
        """Create every state entry a first step would read (zeros), and take no step."""
        self._prepare_step(has_closure=True)  # validated as a step with a closure would be
        for group in self.param_groups:
            if group["mode"] == "fo":
                initial_fo_state(self.state, group)
            elif RULES[group["rule"]].buffer_names(group):
                for p in group["params"]:
                    initial_state(self.state[p], p, group)
        self.last_step_info = {"forwards": 0, "backwards": 0, "chosen": None, "skipped": True,
                               "loss": None, "scalars_reduced": 0, "direction_sweeps": 0.0}
        return None

    def _advance_counters(self, skipped: bool) -> None:
        for group in self.param_groups:
            group["steps"] += 1
            if skipped:
                group["nonfinite_steps"] += 1


_HYPERPARAMETERS_OF = itemgetter(*HYPERPARAMETERS)


def _placed_state(entry: Dict[str, Any], param: Tensor, group: Group, where: str) -> Dict[str, Any]:
    """A loaded state entry with its tensors placed as torch.optim places them, buffers in ``param``'s layout.

    Raises:
        ValueError: a tensor that cannot be moved to the parameter's device or dtype (e.g. ``meta``).
    """
    buffers = RULES[group["rule"]].buffer_names(group)
    placed = dict(entry)
    for key, value in entry.items():
        if not isinstance(value, Tensor) or key == "step":
            continue  # torch.optim keeps a tensor step where it is (on the CPU)
        try:
            value = value.to(dtype=param.dtype, device=param.device) if param.is_floating_point() \
                else value.to(device=param.device)
            if key in buffers and local_data(value).stride() != local_data(param).stride():
                with torch.no_grad():
                    value = torch.empty_like(param, dtype=value.dtype).copy_(value)
        except Exception as error:
            raise ValueError(
                f"Invalid state in {where}: state {key!r} ({value.dtype} on {value.device}) cannot be placed "
                f"with the parameter ({param.dtype} on {param.device}): {type(error).__name__}: {error}"
            ) from None
        placed[key] = value
    return placed


def _sharded_world_size(param_groups: List[Group]) -> int:
    """The number of processes of an FSDP2 run (some parameters are DTensors), else 1."""
    if not any(is_sharded(p) for g in param_groups for p in g["params"]):
        return 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _check_dense_grads(group: Group, where: str) -> None:
    """Refuse sparse FO gradients (before anything is written)."""
    for position, p in enumerate(group["params"]):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise RuntimeError(
                f"Invalid gradient in {where}, parameter {position}: HybridZOOptimizer does not support "
                f"sparse gradients ({p.grad.layout}; e.g. use nn.Embedding(sparse=False))"
            )


_GRAD_SCALER_MODULES = ("torch.amp.grad_scaler", "torch.cuda.amp.grad_scaler", "torch.cpu.amp.grad_scaler")


def _called_by_grad_scaler(depth: int = 8) -> bool:
    """Whether a GradScaler method is among the callers of ``step`` (through torch's wrappers)."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        if frame.f_globals.get("__name__") in _GRAD_SCALER_MODULES:
            return True
    return False


@contextlib.contextmanager
def _parked_grads(params: List[Tensor]) -> Iterator[None]:
    """Keep FO gradients out of reach while the closure runs as a probe (it may zero_grad())."""
    parked = [(p, p.grad) for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in parked:
            p.grad = grad
