"""Time per training step in forward-equivalents, against the theoretical count and MeZO-style code.

Every configuration's step time is divided by the time of one ``torch.no_grad()`` forward of the same
loss on the same model and batch, timed right before it in the same process. Configurations are
interleaved (the order rotates every repeat) and the median of the repeats is reported, so a machine
that is shared with other jobs slows numerator and denominator alike.

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

    python -m benchmarks.speed [--model ViT-B-16] [--batch 4] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks import _measure
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


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Time the selected configurations and write the markdown report (and a JSON of the raw times)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help=MODEL_CHOICES_HELP)
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--prompts", type=int, default=10, help="text prompts encoded per step (classes per task)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads make timings erratic)")
    parser.add_argument("--configs", type=_measure.split_list, default=ALL_CONFIGS,
                        help=f"comma-separated subset of: {', '.join(ALL_CONFIGS)} (default: all; the rows of "
                             "a peer that is not installed are left out, with a note)")
    parser.add_argument("--out", type=Path, default=_measure.RESULTS_DIR / "speed.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = _measure.environment(args.device)
    workload = build_workload(args.model, "moe", args.batch, args.prompts, args.device)
    names, notes = leave_out_missing(args.configs, PEER_OF)
    for note in notes:
        print(note, flush=True)
    configs = build_configs(workload, names)
    run(workload, configs, args.repeats, lambda line: print(line, flush=True))
    report = write_report(configs, args, workload, info, _measure.load_average(), argv, notes)
    _measure.write_text(args.out, report)
    raw = {name: {"step_s": c.step_times, "forward_s": c.forward_times,
                  "closure_s": [t.closure_s for t in c.timers], "closure_calls": [t.closure_calls for t in c.timers],
                  "direction_sweeps": [t.direction_sweeps for t in c.timers]} for name, c in configs.items()}
    _measure.write_text(args.out.with_suffix(".json"), json.dumps({"environment": info, "raw": raw}, indent=1) + "\n")
    print(report)
    return raw


if __name__ == "__main__":
    main()
