"""Time per training step: in forward-equivalents on a full model, and the optimizer's own work over many tensors.

Two sets, each a section of ``speed.md`` (``--set`` runs one and keeps the other's section as it was):

* **full-model**: open_clip with MoE adapters, below; a ViT-B-16 forward takes seconds on a CPU, so the
  optimizer's own work hides behind it.
* **many-tensors**: hundreds of LoRA-shaped tensors with a forward of three dispatched operations, so a step
  is the optimizer's own work. ZO-SGD (hybridzo with exact and in-place restore and Rademacher directions, PyPI
  ``mezo``, torchzero's MeZO, a plain MeZO loop) on 448 tensors of 2,048 and of 32,768 entries; FO AdamW and
  SGD with momentum from ``.grad`` (hybridzo, and torch.optim's for-loop, foreach and fused implementations)
  on 448 x (8x256) and 64 x (1024x1024). Rows step the same tensors in round-robin rounds; besides times it
  counts the aten operations each step dispatches per tensor (``_dispatch.py``: on a GPU, kernel launches) and
  sets the ratios against issue 19's targets.

In the full-model set, every configuration's step time is divided by the time of one ``torch.no_grad()``
forward of the same loss on the same model and batch, timed right before it in the same process.
Configurations are interleaved (the order rotates every repeat) and the median of the repeats is reported,
so a machine that is shared with other jobs slows numerator and denominator alike.

Configurations (CLIP with MoE adapters, see ``_workload.py``):

* hybridzo pure ZO on the adapters of both towers: central q=1 (ZO* / ZO-SGD, theory 2 forwards), forward
  estimator (1 + 1), conservative (ZO-SGD-Cons, 5);
* hybridzo hybrids: ZO on one branch, FO (AdamW) on the other (one forward with autograd + backward,
  then 4 no-grad forwards);
* FO baselines: hybridzo with every group FO, and a plain ``torch.optim.AdamW`` loop;
* MeZO-style reference loop (``torch.manual_seed``, ``torch.normal`` per parameter, +eps / -2eps / +eps
  in place, then a separate update sweep regenerating z; Malladi et al.'s ``zo_step`` / ``zo_update``)
  and the optional peers (``_peers.py``): PyPI ``mezo`` (``mezo.update``) and torchzero's MeZO module set
  up as the same ZO-SGD (central, q=1, same eps and lr, plain SGD), on the adapters and on the full model;
  torchzero also with Rademacher directions, its default. A peer that is not installed is left out, with a
  note in the report;
* hybridzo central q=1 on the full model (every weight ZO): Gaussian and Rademacher directions, each with
  ``restore="exact"`` and ``restore="inplace"``.

For each configuration the step time is split into the closure calls (the forwards, timed by wrapping the
closure) and the rest: the optimizer's own overhead (drawing directions, writing perturbations, restores and
updates) plus, for FO groups, the backward pass. hybridzo rows also report how many full passes of direction
generation over the ZO parameters the step made, from the optimizer's public ``last_step_info``.

    python -m benchmarks.speed [--set all|full-model|many-tensors] [--model ViT-B-16] [--batch 4] [--repeats 5]
                               [--rounds 9] [--steps 3] [--smoke] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import _measure
from benchmarks._dispatch import DispatchCounter
from benchmarks._peers import TorchzeroMeZO, leave_out_missing, mezo_package_step
from benchmarks._workload import (
    CONSERVATIVE,
    FORWARD_ESTIMATOR,
    MODEL_CHOICES_HELP,
    NAIVE,
    Placement,
    ZOSettings,
    Workload,
    build_workload,
    full_model_zo_optimizer,
    make_optimizer,
    torch_step,
)
from hybridzo import HybridZOOptimizer

INPLACE = ZOSettings(conservative=False, restore="inplace")
"""ZO-SGD with MeZO's in-place round trip instead of the exact-restore copy."""
RADEMACHER = ZOSettings(conservative=False, distribution="rademacher")
"""ZO-SGD with +/-1 directions (SPSA's, torchzero's default)."""
RADEMACHER_INPLACE = ZOSettings(conservative=False, restore="inplace", distribution="rademacher")

ZEROFLOW_EPOCH_S = {"zo-sgd": 32.4, "zo-sgd-cons": 70.1, "fo-sgd": 59.3}
"""ZeroFlow's CIFAR-100 epoch times (s): the published ratios the speed table is set against."""


@dataclass
class Timers:
    """What one timed step spent in closure calls, and what the optimizer reported about it.

    Attributes:
        closure_s: Seconds inside closure calls (the forwards, and the backward where the closure runs it).
        closure_calls: Number of closure calls.
        direction_sweeps: ``last_step_info["direction_sweeps"]`` of a hybridzo step: full passes of direction
            generation over the ZO parameters; ``None`` for other rows or a hybridzo that does not report it.
    """

    closure_s: float = 0.0
    closure_calls: int = 0
    direction_sweeps: Optional[float] = None


@dataclass
class SpeedConfig:
    """A timed configuration.

    Attributes:
        label: Row label.
        theory: Theoretical cost in words, e.g. ``"2"`` or ``"1 + bwd + 4"``.
        theory_forwards: Theoretical forward-equivalents when every pass is a no-grad forward, else None.
        zo_scope: ``"adapters"``, ``"full model"`` or ``""`` (no ZO).
        step: Runs one training step, calling the closure it is given.
        optimizer: The :class:`HybridZOOptimizer` that ``step`` steps, whose ``last_step_info`` is read after
            every timed step; ``None`` for the reference loops and peers.
        known_sweeps: Direction sweeps per step of a reference loop or peer, counted from its source.
        step_times: Measured step seconds per repeat.
        forward_times: Paired no-grad forward seconds per repeat.
        timers: Split of each repeat's step time.
    """

    label: str
    theory: str
    theory_forwards: Optional[float]
    zo_scope: str
    step: Callable[[Callable[[], torch.Tensor]], Any]
    optimizer: Optional[HybridZOOptimizer] = None
    known_sweeps: Optional[int] = None
    step_times: List[float] = field(default_factory=list)
    forward_times: List[float] = field(default_factory=list)
    timers: List[Timers] = field(default_factory=list)

    def forward_equivalents(self) -> float:
        """Median over repeats of step time / paired forward time."""
        return _measure.median([s / f for s, f in zip(self.step_times, self.forward_times)])

    def closure_share(self) -> float:
        """Median over repeats of the share of the step spent inside closure calls."""
        return _measure.median([t.closure_s / s for t, s in zip(self.timers, self.step_times)])

    def outside_closures_s(self) -> float:
        """Median over repeats of the seconds the step spent outside closure calls."""
        return _measure.median([s - t.closure_s for t, s in zip(self.timers, self.step_times)])

    def direction_sweeps(self) -> Optional[float]:
        """Direction sweeps per step reported by hybridzo (the median over repeats), or ``None``."""
        reported = [t.direction_sweeps for t in self.timers if t.direction_sweeps is not None]
        return _measure.median(reported) if reported else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- MeZO-style steps


class MeZOReference:
    """MeZO's ``zo_step`` + ``zo_update`` (Malladi et al., 2023, ``large_models/trainer.py``), as published.

    The global RNG is seeded before every sweep and each parameter's z is drawn with ``torch.normal``;
    parameters are replaced out of place (``param.data = param.data + ...``) as in the original.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, eps: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.eps = eps
        self.seed = 0

    def _perturb(self, scaling_factor: float) -> None:
        torch.manual_seed(self.seed)
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        """+eps, loss, -2eps, loss, +eps, then the update sweep."""
        self.seed += 1
        self._perturb(1)
        loss_plus = closure()
        self._perturb(-2)
        loss_minus = closure()
        projected_grad = ((loss_plus - loss_minus) / (2 * self.eps)).item()
        self._perturb(1)
        torch.manual_seed(self.seed)
        for param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data - self.lr * projected_grad * z
        return float(loss_plus)


# --------------------------------------------------------------------------------------------- configs


def build_configs(workload: Workload, names: Sequence[str]) -> Dict[str, SpeedConfig]:
    """The selected configurations, each with its own optimizer on the shared model."""
    adapters = workload.adapter_parameters()
    everything = list(workload.model.parameters())
    zo_lr, eps = 1e-9, 1e-3  # tiny steps: the weights barely move while being timed

    def hybrid(label: str, zo_scope: str, optimizer: HybridZOOptimizer, theory: str = "2",
               theory_forwards: Optional[float] = 2) -> SpeedConfig:
        return SpeedConfig(label, theory, theory_forwards, zo_scope, optimizer.step, optimizer)

    def mezo_like(label: str, zo_scope: str, step: Callable[[Callable[[], torch.Tensor]], Any]) -> SpeedConfig:
        # MeZO's loop, PyPI mezo and torchzero each draw z 4 times per step (+eps, -2eps, +eps, update).
        return SpeedConfig(label, "2", 2, zo_scope, step, known_sweeps=4)

    def torchzero(params: Sequence[torch.Tensor], distribution: str) -> Callable[[Callable[[], torch.Tensor]], Any]:
        peer = TorchzeroMeZO(params, zo_lr, eps, distribution)

        def step(closure: Callable[[], torch.Tensor]) -> Any:
            loss = peer.step(closure)
            peer.zero_grad()  # its estimate stays in .grad until the next step replaces it: freed within the step
            return loss
        return step

    full = "full model"
    factories: Dict[str, Callable[[], SpeedConfig]] = {
        "zo-central": lambda: hybrid("hybridzo ZO*/ZO-SGD, central q=1", "adapters",
                                     make_optimizer(workload, Placement("dual", settings=NAIVE))),
        "zo-forward": lambda: hybrid("hybridzo ZO, forward estimator q=1", "adapters",
                                     make_optimizer(workload, Placement("dual", settings=FORWARD_ESTIMATOR)),
                                     "1 + 1"),
        "zo-conservative": lambda: hybrid("hybridzo ZO-SGD-Cons", "adapters",
                                          make_optimizer(workload, Placement("dual", settings=CONSERVATIVE)), "5", 5),
        "vision-zo": lambda: hybrid("hybridzo Vision w/ ZO (Cons), language FO", "vision adapters",
                                    make_optimizer(workload, Placement("vision")), "1 + bwd(lang) + 4", None),
        "language-zo": lambda: hybrid("hybridzo Language w/ ZO (Cons), vision FO", "language adapters",
                                      make_optimizer(workload, Placement("language")), "1 + bwd(vis) + 4", None),
        "fo": lambda: hybrid("hybridzo FO baseline (AdamW)", "", make_optimizer(workload, Placement("none")),
                             "1 + bwd", None),
        "fo-torch": lambda: SpeedConfig("torch.optim.AdamW loop", "1 + bwd", None, "", _torch_step(workload)),
        "mezo-ref": lambda: mezo_like("MeZO reference loop", "adapters", MeZOReference(adapters, zo_lr, eps).step),
        "mezo-pkg": lambda: mezo_like("PyPI mezo.update", "adapters",
                                      mezo_package_step(workload.model, adapters, zo_lr, eps)),
        "tz-mezo": lambda: mezo_like("torchzero MeZO, gaussian", "adapters", torchzero(adapters, "gaussian")),
        "full-zo-central": lambda: hybrid("hybridzo ZO-SGD, central q=1, gaussian", full,
                                          full_model_zo_optimizer(workload)),
        "full-zo-inplace": lambda: hybrid("hybridzo ZO-SGD, central q=1, gaussian, restore='inplace'", full,
                                          full_model_zo_optimizer(workload, INPLACE)),
        "full-zo-rademacher": lambda: hybrid("hybridzo ZO-SGD, central q=1, rademacher", full,
                                             full_model_zo_optimizer(workload, RADEMACHER)),
        "full-zo-rademacher-inplace": lambda: hybrid("hybridzo ZO-SGD, central q=1, rademacher, restore='inplace'",
                                                     full, full_model_zo_optimizer(workload, RADEMACHER_INPLACE)),
        "full-mezo-ref": lambda: mezo_like("MeZO reference loop", full, MeZOReference(everything, zo_lr, eps).step),
        "full-mezo-pkg": lambda: mezo_like("PyPI mezo.update", full,
                                           mezo_package_step(workload.model, everything, zo_lr, eps)),
        "full-tz-mezo": lambda: mezo_like("torchzero MeZO, gaussian", full, torchzero(everything, "gaussian")),
        "full-tz-mezo-rademacher": lambda: mezo_like("torchzero MeZO, rademacher (its default)", full,
                                                     torchzero(everything, "rademacher")),
    }
    unknown = set(names) - factories.keys()
    if unknown:
        raise ValueError(f"unknown configurations {sorted(unknown)}; choose from {', '.join(factories)}")
    return {name: factories[name]() for name in names}


def _torch_step(workload: Workload) -> Callable[[Callable[[], torch.Tensor]], Any]:
    optimizer = torch.optim.AdamW(workload.adapter_parameters(), lr=1e-9)
    return lambda closure: torch_step(optimizer, closure)


ALL_CONFIGS = ["zo-central", "zo-forward", "zo-conservative", "vision-zo", "language-zo", "fo", "fo-torch",
               "mezo-ref", "mezo-pkg", "tz-mezo", "full-zo-central", "full-zo-inplace", "full-zo-rademacher",
               "full-zo-rademacher-inplace", "full-mezo-ref", "full-mezo-pkg", "full-tz-mezo",
               "full-tz-mezo-rademacher"]
PEER_OF = {"mezo-pkg": "mezo", "full-mezo-pkg": "mezo", "tz-mezo": "torchzero", "full-tz-mezo": "torchzero",
           "full-tz-mezo-rademacher": "torchzero"}
"""Configurations that need an optional peer (``_peers.PEERS``): left out, with a note, where it is missing."""


# ------------------------------------------------------------------------------------------------- run


def run(workload: Workload, configs: Dict[str, SpeedConfig], repeats: int, log: Callable[[str], None]) -> None:
    """Warm every configuration up once, then time ``repeats`` interleaved rounds (order rotating)."""
    def forward() -> None:
        with torch.no_grad():
            workload.loss()

    device = workload.images.device
    names = list(configs)
    for name in names:
        configs[name].step(workload.loss)
    forward()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            config = configs[name]
            timers = Timers()

            def closure() -> torch.Tensor:
                _synchronize(device)
                start = time.perf_counter()
                loss = workload.loss()
                _synchronize(device)
                timers.closure_s += time.perf_counter() - start
                timers.closure_calls += 1
                return loss

            forward_s = _measure.time_call(forward, device)
            step_s = _measure.time_call(lambda: config.step(closure), device)
            if config.optimizer is not None:
                timers.direction_sweeps = config.optimizer.last_step_info.get("direction_sweeps")
            config.forward_times.append(forward_s)
            config.step_times.append(step_s)
            config.timers.append(timers)
            log(f"repeat {r + 1}/{repeats} {name:>16}: step {step_s:6.2f} s, forward {forward_s:5.2f} s, "
                f"{step_s / forward_s:5.2f} fwd-eq, {timers.closure_calls} closure calls")


def _ratio(configs: Dict[str, SpeedConfig], numerator: str, denominator: str) -> str:
    if numerator in configs and denominator in configs:
        return f"{configs[numerator].forward_equivalents() / configs[denominator].forward_equivalents():.2f}"
    return "not measured"


RATIOS = [
    # (what, numerator, denominator); ZeroFlow's published ratio, where it has one, is added in write_report.
    ("hybridzo / MeZO reference loop, adapters", "zo-central", "mezo-ref"),
    ("hybridzo / PyPI mezo, adapters", "zo-central", "mezo-pkg"),
    ("hybridzo / torchzero MeZO, adapters", "zo-central", "tz-mezo"),
    ("hybridzo / MeZO reference loop, full model", "full-zo-central", "full-mezo-ref"),
    ("hybridzo / PyPI mezo, full model", "full-zo-central", "full-mezo-pkg"),
    ("hybridzo / torchzero MeZO (gaussian), full model", "full-zo-central", "full-tz-mezo"),
    ("hybridzo restore='inplace' / MeZO reference loop, full model", "full-zo-inplace", "full-mezo-ref"),
    ("hybridzo restore='inplace' / PyPI mezo, full model", "full-zo-inplace", "full-mezo-pkg"),
    ("hybridzo restore='inplace' / torchzero MeZO (gaussian), full model", "full-zo-inplace", "full-tz-mezo"),
    ("hybridzo restore='inplace' / 'exact', full model", "full-zo-inplace", "full-zo-central"),
    ("hybridzo rademacher / gaussian, full model", "full-zo-rademacher", "full-zo-central"),
    ("hybridzo rademacher / PyPI mezo, full model", "full-zo-rademacher", "full-mezo-pkg"),
    ("hybridzo rademacher / torchzero MeZO (rademacher), full model", "full-zo-rademacher",
     "full-tz-mezo-rademacher"),
    ("hybridzo rademacher, restore='inplace' / 'exact', full model", "full-zo-rademacher-inplace",
     "full-zo-rademacher"),
    ("torchzero MeZO rademacher / gaussian, full model", "full-tz-mezo-rademacher", "full-tz-mezo"),
    ("ZO-SGD-Cons / ZO-SGD", "zo-conservative", "zo-central"),
    ("FO (AdamW here, SGD in ZeroFlow) / ZO-SGD", "fo", "zo-central"),
    ("hybridzo FO / torch.optim.AdamW loop", "fo", "fo-torch"),
]
"""The ratios table of ``speed.md``: measured forward-equivalents of one configuration over another's."""


def write_report(configs: Dict[str, SpeedConfig], args: argparse.Namespace, workload: Workload,
                 info: Dict[str, Any], load_after: str, argv: Optional[Sequence[str]],
                 notes: Sequence[str] = ()) -> str:
    """The markdown of ``speed.md``; ``notes`` say which rows were left out and why."""
    rows = []
    for name, c in configs.items():
        measured = c.forward_equivalents()
        against = f"{measured / c.theory_forwards:.2f}" if c.theory_forwards else ""
        sweeps = c.direction_sweeps()
        if c.known_sweeps is not None:
            sweeps_cell = f"{c.known_sweeps} (source)"
        elif c.optimizer is None or not c.zo_scope:
            sweeps_cell = "n/a"
        else:
            sweeps_cell = "not reported" if sweeps is None else f"{sweeps:g}"
        closure_share = c.closure_share()
        rows.append([f"`{name}`", c.label, c.zo_scope or "none", c.theory, f"{measured:.2f}", against,
                     f"{_measure.median(c.step_times):.2f}", f"{100 * closure_share:.1f}%",
                     f"{100 * (1 - closure_share):.1f}% ({c.outside_closures_s():.3f} s)", sweeps_cell])
    adapters = workload.trainable_count()
    total = sum(p.numel() for p in workload.model.parameters())
    forward_s = _measure.median([t for c in configs.values() for t in c.forward_times])
    zeroflow = ZEROFLOW_EPOCH_S
    published = {("zo-conservative", "zo-central"): zeroflow["zo-sgd-cons"] / zeroflow["zo-sgd"],
                 ("fo", "zo-central"): zeroflow["fo-sgd"] / zeroflow["zo-sgd"]}
    comparisons = [[what, _ratio(configs, numerator, denominator),
                    f"{published[numerator, denominator]:.2f}" if (numerator, denominator) in published else ""]
                   for what, numerator, denominator in RATIOS]
    lines = [
        "# Time per step in forward-equivalents",
        "",
        _measure.environment_markdown(info, _measure.command_line("benchmarks.speed", argv), load_after),
        f"- Workload: open_clip `{args.model}`, random weights ({total:,} parameters), MoE adapters in every block "
        f"of both towers ({adapters:,} trainable), backbone frozen; batch {args.batch} images, {args.prompts} "
        f"text prompts per step; training mode; {args.threads} torch thread(s). One no-grad forward: median "
        f"{forward_s:.2f} s.",
        f"- Method: {args.repeats} interleaved repeats after one warm-up step each; every step is timed right "
        "after a no-grad forward on the same batch, and *measured* is the median of step / forward. *vs theory* "
        "divides by the theoretical forward count where every pass is a no-grad forward. Shares are medians of "
        "the time inside closure calls (the forwards, timed by wrapping the closure) and outside them: the "
        "optimizer's own overhead (drawing directions, writing perturbations, restores and updates) plus, for FO "
        "groups, the backward. *Direction sweeps* are the full passes of direction generation over the ZO "
        "parameters per step, as hybridzo reports them in `last_step_info['direction_sweeps']`; for the MeZO "
        "loop and the peers they are counted from their source (+eps, -2eps, +eps, update). "
        "FO rows have no forward-only theory: one forward with autograd plus a backward that, through a frozen "
        "backbone, forms activation gradients only.",
        "- Peers: PyPI `mezo` (`mezo.update`) and torchzero (`tz.Optimizer(params, tz.m.MeZO(h=eps, n_samples=1, "
        "formula='central2', distribution=..., return_approx_loss=True), tz.m.LR(lr))`), both MeZO's ZO-SGD with "
        "the same eps and lr as hybridzo's rows; torchzero's own default distribution is Rademacher, and it draws "
        "each step's directions for all parameters at once and keeps its estimate in `.grad` (freed here at the "
        "end of each step, as the next step would). `return_approx_loss=True` spares the third forward at theta "
        "that torchzero otherwise spends on the returned loss.",
        *(f"- {note}." for note in notes),
        "",
        _measure.markdown_table(["config", "what", "ZO groups", "theory (fwd)", "measured (fwd-eq)", "vs theory",
                                 "median step (s)", "in closures", "outside closures", "direction sweeps"],
                                rows, "lllrrrrrrr"),
        "",
        "## Ratios",
        "",
        "Ratios of measured forward-equivalents; ZeroFlow's are its CIFAR-100 epoch times "
        f"(ZO-SGD {zeroflow['zo-sgd']} s, ZO-SGD-Cons {zeroflow['zo-sgd-cons']} s, FO-SGD {zeroflow['fo-sgd']} s; "
        "different model and hardware).",
        "",
        _measure.markdown_table(["ratio", "here", "ZeroFlow"], comparisons),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- many tensors, fast forward
#
# Hundreds of LoRA-shaped tensors and a forward that costs three dispatched operations whatever their number,
# so that a step is the optimizer's own work: what a GPU user with adapters sees, and what the full-model
# set above hides behind a 3.7 s forward.

SETS = ("full-model", "many-tensors")
"""The sets ``--set`` chooses from: the open_clip rows above, and the many-tensors rows below."""

MANY_TENSORS_HEADING = "## Many tensors, fast forward: the optimizer's own work"
"""Heading of the many-tensors section of ``speed.md``: everything above it is the full-model set's report."""

ZO_LR, ZO_EPS, FO_LR = 1e-9, 1e-3, 1e-6
"""Tiny steps: the tensors barely move while being timed."""
FO_SETTINGS = {"adamw": {"weight_decay": 0.01}, "sgd": {"momentum": 0.9}}
"""Per FO rule, the hyperparameters given to hybridzo and torch.optim alike (0.01: torch's AdamW default)."""
FO_RULE_LABELS = {"adamw": "AdamW", "sgd": "SGD, momentum 0.9"}
MANY_PEER_OF = {"mezo-pkg": "mezo", "tz-mezo": "torchzero"}
"""Many-tensors rows that need an optional peer (``_peers.PEERS``): left out, with a note, where it is missing."""


@dataclass(frozen=True)
class TensorSet:
    """``count`` tensors whose shapes cycle through ``shapes``, every shape with the same number of entries.

    Attributes:
        count: Number of tensors.
        shapes: Shapes, cycled: a LoRA pair is ``((rank, width), (width, rank))``.
    """

    count: int
    shapes: Tuple[Tuple[int, int], ...]

    @property
    def entries(self) -> int:
        """Entries per tensor."""
        return math.prod(self.shapes[0])

    def describe(self) -> str:
        """E.g. ``"448 x 2,048 (8x256, 256x8)"``."""
        return f"{self.count} x {self.entries:,} ({', '.join('x'.join(map(str, s)) for s in self.shapes)})"

    def build(self, device: torch.device, with_grads: bool) -> List[torch.nn.Parameter]:
        """The tensors, drawn from a private generator (the same values in every run), with a ``.grad`` if asked."""
        generator = torch.Generator().manual_seed(0)
        params = []
        for index in range(self.count):
            shape = self.shapes[index % len(self.shapes)]
            param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
            if with_grads:
                param.grad = torch.randn(shape, generator=generator).to(device)
            params.append(param)
        return params


MANY_TENSOR_SETS = {
    "zo": (TensorSet(448, ((8, 256), (256, 8))), TensorSet(448, ((16, 2048), (2048, 16)))),
    "fo": (TensorSet(448, ((8, 256),)), TensorSet(64, ((1024, 1024),))),
}
"""The ZO and FO tensor sets of issue 19: LoRA pairs of rank 8 on width 256 (and rank 16 on 2048), and large."""
SMOKE_TENSOR_SETS = {
    "zo": (TensorSet(16, ((8, 256), (256, 8))), TensorSet(16, ((16, 2048), (2048, 16)))),
    "fo": (TensorSet(16, ((8, 256),)), TensorSet(4, ((256, 256),))),
}
"""``--smoke``: the same shapes, fewer tensors (and smaller large ones)."""


class FastForward:
    """The many-tensors loss, :math:`w \\cdot (\\lVert p_1 \\rVert, \\dots, \\lVert p_n \\rVert)`, without autograd.

    Three dispatched operations (``torch._foreach_norm``, ``stack``, a dot) whatever the number of tensors, so a
    ZO step's time is the optimizer's own work. The forward times itself, and its operations are not counted by
    the :class:`~benchmarks._dispatch.DispatchCounter` in :attr:`counter`.

    Attributes:
        seconds: Seconds spent inside calls since the caller last reset it.
        counter: The dispatch counter active around the step being counted, or None.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.weights = torch.randn(len(self.params), generator=torch.Generator().manual_seed(1)).to(
            self.params[0].device)
        self.seconds = 0.0
        self.counter: Optional[DispatchCounter] = None

    def __call__(self) -> torch.Tensor:
        device = self.weights.device
        _synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), self.counter.uncounted() if self.counter is not None else contextlib.nullcontext():
            loss = torch.stack(torch._foreach_norm(self.params)) @ self.weights
        _synchronize(device)
        self.seconds += time.perf_counter() - start
        return loss


class MeZOLoop:
    """The plain MeZO loop: per tensor a seeded generator, ``randn_like`` and ``add_``; four sweeps a step.

    +eps z, forward, -2 eps z, forward, +eps z, then ``-lr * (f+ - f-) / (2 eps) * z``, z regenerated in each
    sweep from a seed per (step, tensor): 8 dispatched operations per tensor per step.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, eps: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.eps = eps
        self.generator = torch.Generator(self.params[0].device)
        self.steps = 0

    def _sweep(self, scale: float) -> None:
        for index, param in enumerate(self.params):
            self.generator.manual_seed(self.steps * len(self.params) + index)
            param.add_(torch.randn_like(param, generator=self.generator), alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One ZO-SGD step (central, q=1)."""
        self.steps += 1
        self._sweep(self.eps)
        loss_plus = closure()
        self._sweep(-2 * self.eps)
        loss_minus = closure()
        self._sweep(self.eps)
        self._sweep(-self.lr * float((loss_plus - loss_minus) / (2 * self.eps)))
        return loss_plus


@dataclass
class ManyRow:
    """One optimizer of a :class:`Comparison`.

    Attributes:
        label: Row label.
        step: Runs one step (None once timed, or when the row is not available).
        note: Why the row is not available (``"n/a"`` in the report), empty when it is.
        step_s: Seconds per step, one value per round.
        outside_s: Seconds per step outside the forwards, one value per round.
        ops: Operations dispatched in one step outside the forwards, by operation.
    """

    label: str
    step: Optional[Callable[[], Any]]
    note: str = ""
    step_s: List[float] = field(default_factory=list)
    outside_s: List[float] = field(default_factory=list)
    ops: Dict[str, int] = field(default_factory=dict)


@dataclass
class Comparison:
    """Rows that step the same tensors, timed round-robin against each other.

    Attributes:
        key: Name in the JSON, e.g. ``"zo 448 x 2,048"``.
        what: ``"ZO-SGD"`` or the FO rule's label.
        tensors: The tensor set.
        rows: Rows by key.
        steps: Steps each row ran per round (set when timed).
    """

    key: str
    what: str
    tensors: TensorSet
    rows: Dict[str, ManyRow] = field(default_factory=dict)
    steps: int = 0

    def ratio(self, numerator: str, denominator: str) -> Optional[float]:
        """Median over rounds of ``numerator``'s step time over ``denominator``'s in the same round (paired).

        None if either row did not run.
        """
        a, b = self.rows.get(numerator), self.rows.get(denominator)
        if a is None or b is None or not a.step_s or not b.step_s:
            return None
        return _measure.median([x / y for x, y in zip(a.step_s, b.step_s)])


def zo_rows(params: Sequence[torch.Tensor], forward: FastForward, names: Sequence[str]) -> Dict[str, ManyRow]:
    """The ZO-SGD rows among ``names`` (central, q=1, the same lr and eps), stepping ``params``."""
    def hybridzo(**settings: Any) -> Callable[[], Any]:
        optimizer = HybridZOOptimizer([{"params": params, "mode": "zo", **settings}], lr=ZO_LR, eps=ZO_EPS, seed=0)
        return lambda: optimizer.step(forward)

    def mezo_package() -> Callable[[], Any]:
        step = mezo_package_step(torch.nn.ParameterList(params), params, ZO_LR, ZO_EPS)
        return lambda: step(forward)

    def torchzero() -> Callable[[], Any]:
        peer = TorchzeroMeZO(params, ZO_LR, ZO_EPS, "gaussian")

        def step() -> None:
            peer.step(forward)
            peer.zero_grad()  # its estimate stays in .grad until the next step replaces it
        return step

    def loop() -> Callable[[], Any]:
        mezo_loop = MeZOLoop(params, ZO_LR, ZO_EPS)
        return lambda: mezo_loop.step(forward)

    factories = {
        "hybridzo-exact": ("hybridzo ZO-SGD, gaussian, restore='exact'", hybridzo),
        "hybridzo-inplace": ("hybridzo ZO-SGD, gaussian, restore='inplace'", lambda: hybridzo(restore="inplace")),
        "hybridzo-rademacher": ("hybridzo ZO-SGD, rademacher, restore='exact'",
                                lambda: hybridzo(distribution="rademacher")),
        "mezo-pkg": ("PyPI mezo.update", mezo_package),
        "tz-mezo": ("torchzero MeZO, gaussian", torchzero),
        "mezo-loop": ("MeZO loop (randn_like + add_)", loop),
    }
    return {name: ManyRow(label, factory()) for name, (label, factory) in factories.items() if name in names}


ZO_ROWS = ("hybridzo-exact", "hybridzo-inplace", "hybridzo-rademacher", "mezo-pkg", "tz-mezo", "mezo-loop")


def fo_rows(params: Sequence[torch.Tensor], rule: str) -> Dict[str, ManyRow]:
    """hybridzo's FO ``rule`` (default, ``foreach=True``, ``fused=True``) and torch.optim's three implementations.

    A hybridzo row whose group key is refused (a hybridzo without that key), or a torch.optim implementation the
    device lacks, is kept as not available, with the reason.
    """
    settings = FO_SETTINGS[rule]
    torch_class = torch.optim.AdamW if rule == "adamw" else torch.optim.SGD
    rows = {}

    def hybridzo(key: str, label: str, **implementation: Any) -> None:
        try:
            optimizer = HybridZOOptimizer([{"params": params, "mode": "fo", "rule": rule, **settings,
                                            **implementation}], lr=FO_LR)
        except ValueError as error:
            rows[key] = ManyRow(label, None, str(error).split(";")[0])
        else:
            rows[key] = ManyRow(label, optimizer.step)

    def torch_optim(key: str, label: str, **implementation: Any) -> None:
        try:
            optimizer = torch_class(params, lr=FO_LR, **settings, **implementation)
        except (RuntimeError, ValueError) as error:
            rows[key] = ManyRow(label, None, str(error).split("\n")[0])
        else:
            rows[key] = ManyRow(label, optimizer.step)

    hybridzo("hybridzo", "hybridzo FO group")
    hybridzo("hybridzo-foreach", "hybridzo FO group, foreach=True", foreach=True)
    hybridzo("hybridzo-fused", "hybridzo FO group, fused=True", fused=True)
    name = torch_class.__name__
    torch_optim("torch-loop", f"torch.optim.{name}(foreach=False)", foreach=False)
    torch_optim("torch-foreach", f"torch.optim.{name}(foreach=True)", foreach=True)
    torch_optim("torch-fused", f"torch.optim.{name}(fused=True)", fused=True)
    return rows


BLOCK_S = 0.2
"""Seconds the slowest row of a comparison should spend per round (in up to ``--steps`` steps)."""


def time_comparison(comparison: Comparison, forward: Optional[FastForward], rounds: int, max_steps: int,
                    device: torch.device, log: Callable[[str], None]) -> None:
    """Warm each row up, count one step's dispatched operations, then time ``rounds`` round-robin rounds.

    Each round runs every available row for the same number of steps in a row (the order rotating every
    round): as many as fill :data:`BLOCK_S` for the slowest row, 1 to ``max_steps``. It records the time per
    step, and the time per step outside the forward's calls.
    """
    rows = {name: row for name, row in comparison.rows.items() if row.step is not None}
    if not rows:
        return
    slowest = 0.0
    for row in rows.values():
        row.step()  # creates state; the second step runs as every later one
        slowest = max(slowest, _measure.time_call(row.step, device))
    comparison.steps = steps = max(1, min(max_steps, int(BLOCK_S / slowest)))
    for row in rows.values():
        counter = DispatchCounter()
        if forward is not None:
            forward.counter = counter
        with counter:
            row.step()
        if forward is not None:
            forward.counter = None
        row.ops = dict(counter.counts)
    names = list(rows)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            row = rows[name]
            if forward is not None:
                forward.seconds = 0.0
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                row.step()
            _synchronize(device)
            elapsed = time.perf_counter() - start
            row.step_s.append(elapsed / steps)
            row.outside_s.append((elapsed - (forward.seconds if forward is not None else 0.0)) / steps)
        log(f"{comparison.key}, round {r + 1}/{rounds}: "
            + ", ".join(f"{name} {1e3 * rows[name].step_s[-1]:.1f} ms" for name in names))
    for row in rows.values():
        row.step = None  # frees the optimizer and its state before the next comparison builds its own


def run_many_tensors(device: torch.device, rounds: int, max_steps: int, smoke: bool,
                     log: Callable[[str], None]) -> Tuple[List[Comparison], List[str]]:
    """Time every many-tensors comparison, one after the other; return them and the notes on left-out peers."""
    sets = SMOKE_TENSOR_SETS if smoke else MANY_TENSOR_SETS
    names, notes = leave_out_missing(ZO_ROWS, MANY_PEER_OF)
    comparisons = []
    for tensors in sets["zo"]:
        params = tensors.build(device, with_grads=False)
        forward = FastForward(params)
        comparison = Comparison(f"zo {tensors.count} x {tensors.entries:,}", "ZO-SGD", tensors,
                                zo_rows(params, forward, names))
        time_comparison(comparison, forward, rounds, max_steps, device, log)
        comparisons.append(comparison)
        del params, forward
    for rule in FO_SETTINGS:
        for tensors in sets["fo"]:
            params = tensors.build(device, with_grads=True)
            comparison = Comparison(f"{rule} {tensors.count} x {tensors.entries:,}", FO_RULE_LABELS[rule], tensors,
                                    fo_rows(params, rule))
            time_comparison(comparison, None, rounds, max_steps, device, log)
            comparisons.append(comparison)
            del params
    return comparisons, notes


def many_tensors_targets(comparisons: Sequence[Comparison]) -> List[Tuple[str, Optional[float], float]]:
    """Issue 19's "Done when" for this set: (what, measured, at most), measured None where it did not run."""
    zo = [c for c in comparisons if c.what == "ZO-SGD"][0]  # the 448 x 2,048 set (the smoke set's small one)
    per_tensor = {name: sum(row.ops.values()) / zo.tensors.count if row.ops else None
                  for name, row in zo.rows.items()}
    size = zo.tensors.describe()
    targets = [
        (f"hybridzo exact / PyPI mezo, {size}", zo.ratio("hybridzo-exact", "mezo-pkg"), 0.5),
        (f"hybridzo exact / MeZO loop, {size}", zo.ratio("hybridzo-exact", "mezo-loop"), 0.8),
        (f"hybridzo inplace / PyPI mezo, {size}", zo.ratio("hybridzo-inplace", "mezo-pkg"), 0.6),
        (f"hybridzo rademacher / PyPI mezo, {size}", zo.ratio("hybridzo-rademacher", "mezo-pkg"), 0.6),
    ]
    for name in ("hybridzo-exact", "hybridzo-inplace", "hybridzo-rademacher"):
        targets.append((f"{name}: dispatched ops / tensor / step, {size}", per_tensor.get(name), 4.0))
    for c in comparisons:
        if c.what != "ZO-SGD":
            size = c.tensors.describe()
            # Like against like: hybridzo's foreach path where it has one (its default follows torch's,
            # the per-tensor loop on CPU), and the defaults against each other.
            foreach = "hybridzo-foreach" if c.ratio("hybridzo-foreach", "torch-foreach") is not None else "hybridzo"
            targets.append((f"hybridzo {c.what}{', foreach=True' if foreach != 'hybridzo' else ''} / torch foreach, "
                            f"{size}", c.ratio(foreach, "torch-foreach"), 1.1))
            targets.append((f"hybridzo {c.what} / torch {c.what.split(',')[0]} (both default: the loop on CPU), "
                            f"{size}", c.ratio("hybridzo", "torch-loop"), 1.1))
            targets.append((f"hybridzo {c.what}, fused=True / torch fused, {size}",
                            c.ratio("hybridzo-fused", "torch-fused"), 1.1))
    return targets


def _cell(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def many_tensors_section(comparisons: Sequence[Comparison], info: Dict[str, Any], command: str, load_after: str,
                         rounds: int, max_steps: int, threads: int, notes: Sequence[str] = ()) -> str:
    """The many-tensors section of ``speed.md``, from its heading to the end."""
    zo_rows_table, fo_rows_table = [], []
    for c in comparisons:
        for name, row in c.rows.items():
            if not row.step_s:
                cells = ["n/a"] * 4
            else:
                ops = sum(row.ops.values()) / c.tensors.count
                cells = [f"{1e3 * _measure.median(row.step_s):.2f}",
                         f"{1e6 * _measure.median(row.outside_s) / c.tensors.count:.1f}", f"{ops:.2f}"]
            if c.what == "ZO-SGD":
                if row.step_s:
                    cells.append(f"{_cell(c.ratio(name, 'mezo-pkg'))} / {_cell(c.ratio(name, 'mezo-loop'))}")
                zo_rows_table.append([f"`{name}`", row.label, c.tensors.describe(), *cells])
            else:
                if row.step_s:
                    cells.append(f"{_cell(c.ratio(name, 'torch-foreach'))} / {_cell(c.ratio(name, 'torch-fused'))}")
                else:
                    cells[-1] = f"n/a: {row.note}"
                fo_rows_table.append([f"`{name}`", row.label, c.what, c.tensors.describe(), *cells])
    target_rows = [[what, f"<= {limit:g}", _cell(measured), "n/a" if measured is None else
                    ("yes" if measured <= limit else "**no**")]
                   for what, measured, limit in many_tensors_targets(comparisons)]
    zo_sizes = " and ".join(c.tensors.describe() for c in comparisons if c.what == "ZO-SGD")
    fo_sizes = " and ".join(dict.fromkeys(c.tensors.describe() for c in comparisons if c.what != "ZO-SGD"))
    lines = [
        MANY_TENSORS_HEADING,
        "",
        _measure.environment_markdown(info, command, load_after),
        f"- Workload: ZO on {zo_sizes} tensors (LoRA pairs), with a fast forward: the loss "
        "w . (||p_1||, ..., ||p_n||) without autograd, three dispatched operations whatever the number of "
        "tensors (`torch._foreach_norm`, `stack`, a dot), so a step is the optimizer's own work. ZO-SGD: central, "
        f"q=1, lr {ZO_LR:g}, eps {ZO_EPS:g}. FO on {fo_sizes} tensors, from a fixed random `.grad`, closure-less "
        f"`step()`: AdamW (lr {FO_LR:g}, weight decay 0.01, betas (0.9, 0.999), eps 1e-8) and SGD (lr {FO_LR:g}, "
        f"momentum 0.9). Every row of a comparison steps the same tensors, in one process, {threads} torch "
        "thread(s).",
        f"- Method: two warm-up steps per row; then {rounds} rounds in which every row, in turn (the order rotating "
        f"each round), runs the same number of steps timed together, as many as fill {BLOCK_S:g} s for the "
        f"comparison's slowest row, 1 to {max_steps} (`steps_per_round` in speed.json). *step* is the median over "
        "rounds of the time per step, "
        "*per tensor* the same outside the forward's calls, divided by the number of tensors. Ratios (*vs*) are "
        "medians over rounds of the row's step time over the other row's in the same round, so load that changes "
        "between rounds cancels. *ops / tensor / step*: aten operations dispatched in one step after the warm-up, "
        "counted by a `TorchDispatchMode` (`benchmarks/_dispatch.py`) with the forward's excluded, over the number "
        "of tensors; on a GPU each is a kernel launch, and a `torch._foreach_*` or fused operation is one launch "
        "for a whole list. torch.optim's two profiler markers per step count too.",
        "- Rows: PyPI `mezo` (`mezo.update`) and torchzero's MeZO module as in the set above; the MeZO loop "
        "(`MeZOLoop` in `speed.py`) draws each tensor's z with `randn_like` from a generator seeded per (step, "
        "tensor) and adds it with `add_`, in four sweeps (+eps, -2eps, +eps, update): 8 operations per tensor. "
        "hybridzo's `foreach=True` and `fused=True` rows are n/a where its FO groups have no such key.",
        *(f"- {note}." for note in notes),
        "",
        "### ZO-SGD over many tensors",
        "",
        _measure.markdown_table(["row", "what", "tensors", "step (ms)", "optimizer per tensor (us)",
                                 "ops / tensor / step", "vs PyPI mezo / MeZO loop"], zo_rows_table, "lllrrrr"),
        "",
        "### FO steps from `.grad`",
        "",
        _measure.markdown_table(["row", "what", "rule", "tensors", "step (ms)", "per tensor (us)",
                                 "ops / tensor / step", "vs torch foreach / fused"], fo_rows_table, "llllrrrr"),
        "",
        "### Against issue 19's targets",
        "",
        _measure.markdown_table(["target", "at most", "measured", "met?"], target_rows, "lrrl"),
    ]
    return "\n".join(lines) + "\n"


def many_tensors_json(comparisons: Sequence[Comparison], info: Dict[str, Any], command: str, rounds: int,
                      max_steps: int) -> Dict[str, Any]:
    """The raw times and counts of the many-tensors set, for ``speed.json``'s ``"many_tensors"``."""
    def rows(comparison: Comparison) -> Dict[str, Any]:
        return {name: {"label": row.label, "note": row.note, "step_s": row.step_s, "outside_forward_s": row.outside_s,
                       "ops": row.ops} for name, row in comparison.rows.items()}

    return {"environment": info, "command": command, "rounds": rounds, "max_steps_per_round": max_steps,
            "comparisons": {c.key: {"what": c.what, "tensors": c.tensors.describe(), "steps_per_round": c.steps,
                                    "rows": rows(c)} for c in comparisons},
            "targets": [{"what": what, "measured": measured, "at_most": limit}
                        for what, measured, limit in many_tensors_targets(comparisons)]}


def merge_report(existing: Optional[str], full_model: Optional[str], many_tensors: Optional[str]) -> str:
    """``speed.md`` with the sections given replaced and the others kept from ``existing`` as they were."""
    old_full, old_many = existing, None
    if existing is not None and f"\n{MANY_TENSORS_HEADING}\n" in existing:
        at = existing.index(f"\n{MANY_TENSORS_HEADING}\n")
        old_full, old_many = existing[:at].rstrip("\n") + "\n", existing[at + 1:]
    full = full_model if full_model is not None else old_full
    many = many_tensors if many_tensors is not None else old_many
    if full is None:
        full = ("# Time per step\n\nThe full-model set has not been run into this file "
                "(`python -m benchmarks.speed --set full-model`).\n")
    return full if many is None else f"{full}\n{many}"


def selected_sets(chosen: Optional[str], configs: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The sets to run for ``--set chosen``: ``"all"`` or no choice runs both, unless ``--configs`` picks rows."""
    if chosen is None:
        return ("full-model",) if configs is not None else SETS
    return SETS if chosen == "all" else (chosen,)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Time the selected sets and write them into the markdown report and its JSON, keeping the other set's.

    Returns:
        The full-model set's raw times by configuration (empty when that set did not run).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=[*SETS, "all"], default=None, dest="sets",
                        help="full-model: the open_clip rows (hours at ViT-B-16); many-tensors: hundreds of small "
                             "tensors with a fast forward (minutes); default: all, or full-model when --configs "
                             "is given")
    parser.add_argument("--model", default="ViT-B-16", help=MODEL_CHOICES_HELP)
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--prompts", type=int, default=10, help="text prompts encoded per step (classes per task)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds of the full-model set")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads make timings erratic)")
    parser.add_argument("--configs", type=_measure.split_list, default=None,
                        help=f"full-model set: comma-separated subset of: {', '.join(ALL_CONFIGS)} (default: all; "
                             "the rows of a peer that is not installed are left out, with a note)")
    parser.add_argument("--rounds", type=int, default=9, help="round-robin timing rounds of the many-tensors set")
    parser.add_argument("--steps", type=int, default=3,
                        help=f"many-tensors set: at most this many steps per row and round (as many as fill "
                             f"{BLOCK_S:g} s for a comparison's slowest row)")
    parser.add_argument("--smoke", action="store_true",
                        help="many-tensors set: 16 tensors per set (4 large ones), 2 rounds of 1 step")
    parser.add_argument("--out", type=Path, default=_measure.RESULTS_DIR / "speed.md")
    args = parser.parse_args(argv)
    sets = selected_sets(args.sets, args.configs)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    log = lambda line: print(line, flush=True)  # noqa: E731
    command = _measure.command_line("benchmarks.speed", argv)
    full_report = many_report = None
    raw: Dict[str, Any] = {}
    document: Dict[str, Any] = {}
    if "full-model" in sets:
        info = _measure.environment(args.device)
        workload = build_workload(args.model, "moe", args.batch, args.prompts, args.device)
        names, notes = leave_out_missing(args.configs or ALL_CONFIGS, PEER_OF)
        for note in notes:
            log(note)
        configs = build_configs(workload, names)
        run(workload, configs, args.repeats, log)
        full_report = write_report(configs, args, workload, info, _measure.load_average(), argv, notes)
        raw = {name: {"step_s": c.step_times, "forward_s": c.forward_times,
                      "closure_s": [t.closure_s for t in c.timers],
                      "closure_calls": [t.closure_calls for t in c.timers],
                      "direction_sweeps": [t.direction_sweeps for t in c.timers]} for name, c in configs.items()}
        document.update(environment=info, raw=raw)
    if "many-tensors" in sets:
        rounds, steps = (2, 1) if args.smoke else (args.rounds, args.steps)
        info = _measure.environment(args.device)
        comparisons, notes = run_many_tensors(device, rounds, steps, args.smoke, log)
        many_report = many_tensors_section(comparisons, info, command, _measure.load_average(), rounds, steps,
                                           args.threads, notes)
        document["many_tensors"] = many_tensors_json(comparisons, info, command, rounds, steps)
    existing = args.out.read_text() if args.out.is_file() else None
    _measure.write_text(args.out, merge_report(existing, full_report, many_report))
    json_path = args.out.with_suffix(".json")
    kept = json.loads(json_path.read_text()) if json_path.is_file() else {}
    _measure.write_text(json_path, json.dumps({**kept, **document}, indent=1) + "\n")
    for report in (full_report, many_report):
        if report is not None:
            print(report)
    return raw


if __name__ == "__main__":
    main()
