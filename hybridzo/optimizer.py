"""HybridZOOptimizer: zeroth-order and first-order param groups in one torch optimizer."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, MutableMapping, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import RankAgreement
from .closure import CommonRandomNumbers, loss_value, observe_backward, skip_backward
from .options import (
    COUNTER_KEYS,
    HYPERPARAMETERS,
    check_shared_zo_keys,
    check_unknown_keys,
    fresh_seed,
    validate_options,
)
from .perturbation import DirectionGenerator, Offset, mix_seed, perturb_, shift_, snapshot
from .rules import apply_rule, keeps_state, theta_slope, undo_rule_

try:
    from torch.optim.optimizer import ParamsT
except ImportError:  # torch < 2.2
    ParamsT = Union[Iterable[Tensor], Iterable[Dict[str, Any]]]  # type: ignore[misc]

__all__ = ["HybridZOOptimizer", "ParamsT"]

Closure = Callable[[], Any]


@dataclass
class _ZOTensor:
    """A ZO parameter, what its direction seeds derive from, and how it gets back to theta.

    ``anchor`` is the copy of theta for ``restore="exact"`` groups. In-place tensors have
    none and instead record where they stand: ``offset`` (a probe's ``scale * z(seed)``)
    or ``trial`` (a candidate move ``(k, differences, direction)`` not yet committed).
    """

    param: Tensor
    anchor: Optional[Tensor]
    group: Dict[str, Any]
    group_index: int
    tensor_index: int
    offset: Offset = None
    trial: Optional[Tuple[int, List[float], int]] = None


class _NonFiniteLoss(Exception):
    """Internal: a probe returned NaN or inf; the step is abandoned."""

    def __init__(self, value: float, phase: str) -> None:
        super().__init__(phase)
        self.value = value
        self.phase = phase


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
       Gaussian direction :math:`z_{ki}` from a seed (never stored), perturb every
       ZO group :math:`g` to :math:`\theta_g \pm \epsilon_g z_{ki,g}` and evaluate
       the loss without autograd. The projected difference is
       :math:`d_{ki} = (f(\theta+\epsilon z) - f(\theta-\epsilon z))/2` (``"central"``)
       or :math:`f(\theta+\epsilon z) - f(\theta)` (``"forward"``), and group
       :math:`g`'s estimate is

       .. math:: \hat g_{k,g} = \frac{1}{q}\sum_i \frac{d_{ki}}{\epsilon_g} z_{ki,g},

       unbiased for each group's gradient (the other groups' directions are
       independent). ``sign="scalar"`` replaces :math:`d/\epsilon` by
       :math:`\operatorname{sign}(d)`; ``sign="coordinate"`` (MoZO) takes the
       element-wise sign of :math:`\hat g`.
    3. **Candidates**: with ``candidates=K > 1`` each of the K estimates gives a
       candidate move :math:`\Delta_k` through the group's rule, computed without
       touching optimizer state, and the candidate with the lowest loss is kept.
       With ``conservative=True`` the mirrored move (the rule applied to
       :math:`-\hat g_k`, i.e. :math:`\theta + \Delta_k` for plain SGD) and
       :math:`\theta` itself are candidates too; for ``K=1`` this is exactly the
       ZO-SGD-Cons rule of ZO-Bench and ZeroFlow (lowest of :math:`f(\theta)`,
       :math:`f(\theta-\Delta)`, :math:`f(\theta+\Delta)`, ties going to
       :math:`\theta+\Delta`, then :math:`\theta-\Delta`).
    4. **Commit**: ZO parameters are set to the chosen candidate and only its
       optimizer state is written; FO groups take their rule's step.

    With ``restore="exact"`` every probe starts from a copy of the ZO parameters taken
    at the start of the step, so the parameters end the step changed by exactly the
    chosen update, bit for bit, in every dtype (the price is that one copy, for the
    step's duration). ``restore="inplace"`` keeps no copy: probes move the parameters
    in place (MeZO's :math:`+\epsilon, -2\epsilon, +\epsilon`) and trial moves are
    undone by recomputing them, which rounds (a few ulps per probe).
    All closure calls of a step replay the same RNG state (common random numbers:
    identical dropout masks), and the RNG is then left as one call would leave it.
    A NaN or inf loss anywhere abandons the step: parameters and optimizer state
    stay as they were, a ``RuntimeWarning`` is issued and the group counter
    ``nonfinite_steps`` is incremented.

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
        seed: base seed of the perturbation stream (default None: drawn from the OS).
            Per-step seeds derive from it, the group index and the group's step
            count, so a run, and a run resumed from ``state_dict``, is reproducible.

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
        seed: Optional[int] = None,
    ) -> None:
        if closure is not None and not callable(closure):
            raise TypeError(f"Invalid closure: {closure!r} (expected a callable or None)")
        defaults = dict(
            lr=lr, mode=mode, eps=eps, sign=sign, queries=queries, estimator=estimator,
            candidates=candidates, conservative=conservative, rule=rule, momentum=momentum,
            betas=tuple(betas) if isinstance(betas, list) else betas, adam_eps=adam_eps,
            weight_decay=weight_decay, restore=restore,
            seed=fresh_seed() if seed is None else seed,
        )
        validate_options(defaults, "defaults")
        self._closure = closure
        self._directions = DirectionGenerator()
        self._ranks: Optional[RankAgreement] = None
        self.last_step_info: Dict[str, Any] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups saved before a key existed take the default it was added with.
        self.defaults.setdefault("restore", "exact")
        for group in self.param_groups:
            group.setdefault("restore", "exact")
        # Not state: the closure belongs to the caller's model, the generators are a cache.
        self._closure = None
        self._directions = DirectionGenerator()
        self._ranks = None
        self.last_step_info = {}

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
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        options = {**self.defaults, **{k: group[k] for k in HYPERPARAMETERS if k in group}}
        validate_options(options, where)
        check_shared_zo_keys(options, where, self.param_groups)
        self._check_tensors(group, options, where)
        for key in COUNTER_KEYS:
            group.setdefault(key, 0)
        super().add_param_group(group)

    @staticmethod
    def _check_tensors(group: Dict[str, Any], options: Dict[str, Any], where: str) -> None:
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, (set, list, tuple)):
            params = list(params)  # a generator: materialise it once, for this check and torch
            group["params"] = params
        for item in params:
            tensor = item[1] if isinstance(item, tuple) else item
            if not isinstance(tensor, Tensor):
                continue  # torch's add_param_group reports it
            if options["mode"] == "zo" and (not tensor.is_floating_point() or tensor.is_complex()):
                raise TypeError(
                    f"Invalid params in {where}: ZO groups need real floating-point tensors, "
                    f"got dtype {tensor.dtype}"
                )
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

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Optional[Tensor]:  # type: ignore[override]
        """Take one optimisation step.

        Args:
            closure: runs the forward pass on the current batch and returns the scalar
                loss (default None: the closure given to the constructor). It is called
                several times per step with the same RNG state. It need not call
                backward: the optimizer backpropagates for FO groups. A torch-style
                closure that calls ``zero_grad()`` and ``backward()`` itself works too;
                during the forward-only probes its backward does nothing. Without a
                closure, a step with FO groups only uses the gradients already in
                ``.grad``, as ``torch.optim`` does.

        Returns:
            The loss at the unperturbed parameters, detached. For the pure-ZO central
            estimator without candidate selection no forward at :math:`\\theta` is
            needed, and the mean of the probe losses, equal to it up to
            :math:`O(\\epsilon^2)`, is returned instead of spending a forward.
        """
        closure = closure if closure is not None else self._closure
        zo_groups = [(i, g) for i, g in enumerate(self.param_groups) if g["mode"] == "zo"]
        fo_groups = [g for g in self.param_groups if g["mode"] == "fo"]
        if closure is None:
            if zo_groups:
                raise ValueError(
                    f"Invalid closure: None (param groups {[i for i, _ in zo_groups]} are ZO "
                    "groups, which need a closure that returns the loss; pass it to step() "
                    "or to the constructor. torch.amp.GradScaler.step(optimizer) calls step() "
                    "without a closure and cannot drive ZO groups; use bf16 autocast, which "
                    "needs no scaler)"
                )
            self._commit_first_order(fo_groups)
            self._advance_counters(skipped=False)
            self.last_step_info = {"forwards": 0, "backwards": 0, "chosen": None, "skipped": False}
            return None
        if not callable(closure):
            raise TypeError(f"Invalid closure: {closure!r} (expected a callable)")
        for i, group in zo_groups:
            check_shared_zo_keys(group, f"param group {i}", (g for _, g in zo_groups))
            if (
                group["restore"] == "inplace"
                and (group["candidates"] > 1 or group["conservative"])
                and theta_slope(group) == 0
            ):
                raise ValueError(
                    f"Invalid weight_decay in param group {i}: {group['weight_decay']!r} (with lr "
                    f"{group['lr']!r}, lr * weight_decay = 1 maps every parameter to the same value, "
                    "so restore='inplace' cannot undo trial moves; use restore='exact')"
                )

        if self._ranks is None:
            # Seeds drawn independently per rank (seed=None) must agree before the first step.
            self._ranks = RankAgreement()
            self._ranks.agree_on_seeds(self.param_groups)
        self._ranks.scalars_reduced = 0
        settings = zo_groups[0][1] if zo_groups else None
        fo_params = [p for g in fo_groups for p in g["params"]]
        zo_tensors: List[_ZOTensor] = []
        rng = CommonRandomNumbers(p.device for g in self.param_groups for p in g["params"])
        self._forwards = 0
        stashed_grads: List[Tuple[Tensor, Optional[Tensor]]] = []
        info: Dict[str, Any] = {"chosen": None, "skipped": False}
        try:
            # 1. FO pass: loss and FO gradients at theta; 2-4. ZO probes, candidates, commit.
            loss: Optional[Tensor] = None
            loss_at_theta: Optional[float] = None
            needs_loss = settings is not None and (
                settings["estimator"] == "forward" or settings["conservative"]
            )
            if fo_groups:
                loss, loss_at_theta = self._first_order_pass(closure, rng, fo_params, zo_groups)
            elif needs_loss:
                loss_at_theta = self._probe_loss(closure, rng, "the loss at theta")
            if loss_at_theta is not None and not math.isfinite(loss_at_theta):
                raise _NonFiniteLoss(loss_at_theta, "the loss at theta")
            if zo_groups:
                # The closure may zero_grad() or backward() during probes; park FO grads.
                stashed_grads = [(p, p.grad) for p in fo_params]
                for p in fo_params:
                    p.grad = None
                zo_tensors = self._zo_tensors(zo_groups)
                loss_at_theta, info["chosen"] = self._zo_step(
                    closure, rng, zo_tensors, settings, loss_at_theta
                )
            self._restore_grads(stashed_grads)
            stashed_grads = []
            self._commit_first_order(fo_groups)
        except _NonFiniteLoss as bad:
            self._abandon(zo_tensors, bad)
            info["skipped"] = True
            loss_at_theta = bad.value if loss_at_theta is None else loss_at_theta
        except BaseException:
            if zo_tensors:
                self._return_to_theta(zo_tensors)
            raise
        finally:
            self._restore_grads(stashed_grads)
            rng.finish()

        self._advance_counters(skipped=info["skipped"])
        info.update(forwards=self._forwards, backwards=int(bool(fo_groups)), loss=loss_at_theta,
                    scalars_reduced=self._ranks.scalars_reduced)
        self.last_step_info = info
        if loss is not None:
            return loss
        return torch.tensor(loss_at_theta) if loss_at_theta is not None else None

    # ------------------------------------------------------------- FO pass

    def _first_order_pass(
        self,
        closure: Closure,
        rng: CommonRandomNumbers,
        fo_params: List[Tensor],
        zo_groups: List[Tuple[int, Dict[str, Any]]],
    ) -> Tuple[Tensor, float]:
        """Run the closure with autograd for FO parameters only, then backward."""
        for p in fo_params:
            p.grad = None
        # Excluding ZO parameters from autograd keeps backward (and the activations it
        # saves) to what the FO parameters need.
        excluded = [p for _, g in zo_groups for p in g["params"] if p.requires_grad]
        for p in excluded:
            p.requires_grad_(False)
        try:
            rng.before_call()
            torch.clear_autocast_cache()  # see _probe_loss
            with torch.enable_grad(), observe_backward() as backward_calls:
                raw = closure()
            rng.after_call()
        finally:
            for p in excluded:
                p.requires_grad_(True)
        self._forwards += 1
        value = self._ranks.mean(loss_value(raw))  # type: ignore[union-attr]
        loss = raw.detach() if isinstance(raw, Tensor) else torch.tensor(value)
        if backward_calls.count == 0 and math.isfinite(value):
            if not (isinstance(raw, Tensor) and raw.requires_grad):
                raise ValueError(
                    "FO param groups need the loss's gradient, but the closure's loss does not "
                    "require grad (is the forward pass under torch.no_grad(), or are all FO "
                    "parameters frozen?)"
                )
            with torch.enable_grad():
                raw.backward()
        return loss, value

    # ------------------------------------------------------------- ZO step

    def _zo_step(
        self,
        closure: Closure,
        rng: CommonRandomNumbers,
        zo_tensors: List[_ZOTensor],
        settings: Dict[str, Any],
        loss_at_theta: Optional[float],
    ) -> Tuple[float, Optional[str]]:
        """Probe, select and commit the ZO move; returns the loss at theta and the choice."""
        # 2. ZO probes: projected differences d[k][i].
        differences, probe_mean = self._probe_differences(
            closure, rng, zo_tensors, settings, loss_at_theta
        )
        if loss_at_theta is None:
            loss_at_theta = probe_mean

        # 3. Candidates.
        chosen: Optional[Tuple[int, int]] = (0, 1)
        description = None
        if settings["candidates"] > 1 or settings["conservative"]:
            chosen = self._select_candidate(
                closure, rng, zo_tensors, differences, settings, loss_at_theta
            )
            description = _describe(chosen)

        # 4. Commit the chosen ZO move (or none), writing only its state.
        if chosen is None:
            self._return_to_theta(zo_tensors)
        else:
            k, direction = chosen
            self._write_zo_move(zo_tensors, k, differences[k], direction, commit=True)
        return loss_at_theta, description  # type: ignore[return-value]

    def _zo_tensors(self, zo_groups: List[Tuple[int, Dict[str, Any]]]) -> List[_ZOTensor]:
        """The step's ZO tensors, with anchors copied for ``restore="exact"`` groups only."""
        exact = [p for _, g in zo_groups if g["restore"] == "exact" for p in g["params"]]
        anchors = iter(snapshot(exact))
        return [
            _ZOTensor(p, next(anchors) if g["restore"] == "exact" else None, g, gi, ti)
            for gi, g in zo_groups
            for ti, p in enumerate(g["params"])
        ]

    def _seed(self, t: _ZOTensor, candidate: int, query: int) -> int:
        g = t.group
        return mix_seed(g["seed"], t.group_index, g["steps"], candidate, query, t.tensor_index)

    def _perturb(self, zo_tensors: List[_ZOTensor], candidate: int, query: int, sign: float) -> None:
        """Set each ZO tensor to ``theta + sign * eps * z``, one ``z`` alive at a time."""
        for t in zo_tensors:
            offset = (self._seed(t, candidate, query), sign * t.group["eps"])
            if t.anchor is not None:
                perturb_(t.param, t.anchor, *offset, self._directions)
            else:
                shift_(t.param, t.offset, offset, self._directions)
                t.offset = offset

    def _return_to_theta(self, zo_tensors: List[_ZOTensor]) -> None:
        """Undo every probe and trial move: copy the anchor back, or reverse in place."""
        for t in zo_tensors:
            if t.anchor is not None:
                t.param.copy_(t.anchor)
                continue
            if t.offset is not None:
                shift_(t.param, t.offset, None, self._directions)
                t.offset = None
            if t.trial is not None:
                grad = self._zo_gradient(t, *t.trial)
                undo_rule_(t.param, grad, self._param_state(t.param, t.group, False), t.group)
                t.trial = None

    def _probe_loss(self, closure: Closure, rng: CommonRandomNumbers, phase: str) -> float:
        """One forward-only closure call; backward inside it does nothing."""
        rng.before_call()
        # Inside an autocast region around step(), autocast caches low-precision copies of the
        # weights until the region exits; the weights changed in place, so drop the stale copies.
        torch.clear_autocast_cache()
        with torch.no_grad(), skip_backward():
            raw = closure()
        rng.after_call()
        self._forwards += 1
        value = self._ranks.mean(loss_value(raw))  # type: ignore[union-attr]
        if not math.isfinite(value):
            raise _NonFiniteLoss(value, phase)
        return value

    def _probe_differences(
        self,
        closure: Closure,
        rng: CommonRandomNumbers,
        zo_tensors: List[_ZOTensor],
        settings: Dict[str, Any],
        loss_at_theta: Optional[float],
    ) -> Tuple[List[List[float]], Optional[float]]:
        """Projected differences ``d[k][i]`` and, for central probes, the mean probe loss."""
        central = settings["estimator"] == "central"
        differences: List[List[float]] = []
        probe_losses: List[float] = []
        for k in range(settings["candidates"]):
            row = []
            for i in range(settings["queries"]):
                self._perturb(zo_tensors, k, i, +1.0)
                plus = self._probe_loss(closure, rng, f"probe +eps (candidate {k}, query {i})")
                if central:
                    self._perturb(zo_tensors, k, i, -1.0)
                    minus = self._probe_loss(closure, rng, f"probe -eps (candidate {k}, query {i})")
                    row.append((plus - minus) / 2)
                    probe_losses += [plus, minus]
                else:
                    row.append(plus - loss_at_theta)  # type: ignore[operator]
            differences.append(row)
        self._return_to_theta(zo_tensors)
        mean = sum(probe_losses) / len(probe_losses) if probe_losses else None
        return differences, mean

    def _zo_gradient(
        self, t: _ZOTensor, candidate: int, differences: List[float], direction: int = 1
    ) -> Tensor:
        """Regenerate the directions and build the group's estimate for one tensor.

        ``direction=-1`` negates it: the gradient of a conservative candidate's mirrored move.
        """
        group = t.group
        estimate: Optional[Tensor] = None
        for query, d in enumerate(differences):
            if group["sign"] == "scalar":
                coefficient = float((d > 0) - (d < 0))
            else:
                coefficient = d / group["eps"]
            coefficient /= len(differences)
            z = self._directions.sample(t.param, self._seed(t, candidate, query))
            if estimate is None:
                estimate = z.mul_(coefficient)
            else:
                estimate.add_(z, alpha=coefficient)
        assert estimate is not None  # queries >= 1 is validated
        if group["sign"] == "coordinate":
            estimate.sign_()
        if direction < 0:
            estimate.neg_()
        return estimate

    def _write_zo_move(
        self,
        zo_tensors: List[_ZOTensor],
        candidate: int,
        differences: List[float],
        direction: int,
        commit: bool,
    ) -> None:
        """Set each ZO tensor to its rule's step from theta along ``direction * estimate``.

        With ``commit=False`` optimizer state is only read, so the move can be discarded.
        """
        self._return_to_theta(zo_tensors)
        for t in zo_tensors:
            grad = self._zo_gradient(t, candidate, differences, direction)
            apply_rule(t.param, grad, self._param_state(t.param, t.group, commit), t.group, commit)
            if not commit and t.anchor is None:
                t.trial = (candidate, differences, direction)

    # ---------------------------------------------------------- candidates

    def _select_candidate(
        self,
        closure: Closure,
        rng: CommonRandomNumbers,
        zo_tensors: List[_ZOTensor],
        differences: List[List[float]],
        settings: Dict[str, Any],
        loss_at_theta: Optional[float],
    ) -> Optional[Tuple[int, int]]:
        """Evaluate candidate moves and return ``(k, direction)`` of the best, None for theta.

        Ties go to the earliest entry of the preference order, which for one
        conservative candidate is ZO-Bench's: theta + Delta, theta - Delta, theta.
        """
        conservative = settings["conservative"]
        directions = (1, -1) if conservative else (1,)
        losses: Dict[Optional[Tuple[int, int]], float] = {}
        for k, row in enumerate(differences):
            for direction in directions:
                self._write_zo_move(zo_tensors, k, row, direction, commit=False)
                losses[(k, direction)] = self._probe_loss(
                    closure, rng, f"candidate {_describe((k, direction))}"
                )
        self._return_to_theta(zo_tensors)
        preference: List[Optional[Tuple[int, int]]] = []
        for k in range(len(differences)):
            preference += [(k, d) for d in sorted(directions)]
        if conservative:
            losses[None] = loss_at_theta  # type: ignore[assignment]
            preference.append(None)
        best = preference[0]
        for option in preference[1:]:
            if losses[option] < losses[best]:
                best = option
        return best

    # -------------------------------------------------------------- commit

    def _param_state(self, p: Tensor, group: Dict[str, Any], commit: bool) -> MutableMapping[str, Any]:
        # Plain SGD keeps no per-parameter buffers, so do not create state entries for it.
        if p in self.state:
            return self.state[p]
        if commit and keeps_state(group):
            return self.state[p]
        return {}

    def _commit_first_order(self, fo_groups: List[Dict[str, Any]]) -> None:
        for group in fo_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HybridZOOptimizer does not support sparse gradients")
                apply_rule(p, p.grad, self._param_state(p, group, True), group, commit=True)

    @staticmethod
    def _restore_grads(stashed: List[Tuple[Tensor, Optional[Tensor]]]) -> None:
        for p, grad in stashed:
            p.grad = grad

    def _abandon(self, zo_tensors: List[_ZOTensor], bad: _NonFiniteLoss) -> None:
        if zo_tensors:
            self._return_to_theta(zo_tensors)
        warnings.warn(
            f"HybridZOOptimizer: non-finite loss ({bad.value}) in {bad.phase}; step skipped, "
            "parameters and optimizer state left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )

    def _advance_counters(self, skipped: bool) -> None:
        for group in self.param_groups:
            group["steps"] += 1
            if skipped:
                group["nonfinite_steps"] += 1


def _describe(choice: Optional[Tuple[int, int]]) -> str:
    if choice is None:
        return "theta"
    k, direction = choice
    return f"theta{'-' if direction > 0 else '+'}delta[{k}]"
