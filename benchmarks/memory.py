"""Peak memory of one training step of CLIP with adapters, per ZO/FO placement, against the papers.

Configurations (MoE adapters unless marked LoRA; ZO groups use the branch/layer paper's default ZO,
ZO-SGD-Cons, and plain SGD; FO groups use AdamW, as MoE-Adapters4CL):

* ``inference``: one ``torch.no_grad()`` forward of the same loss on the same batch (the floor);
* ``fo-torch``: the FO baseline as a plain ``torch.optim.AdamW`` loop (zero_grad, backward, step);
* ``fo``: the FO baseline through ``HybridZOOptimizer`` (every group FO);
* ``dual`` / ``vision`` / ``language``: ZO on that branch's adapters, FO elsewhere (Table 5);
* ``dual-naive``: pure ZO with ZO* / ZO-SGD (central, q=1, no candidate check), MeZO's step;
* ``dual-inplace``: Dual w/ ZO with ``restore="inplace"`` (no copy of the ZO parameters);
* ``<branch>-<hop-odd|hop-even|prefix|suffix>``: ZO on those layers of the branch (Table 2's placements;
  prefix/suffix cover half the blocks, "six" on ViT-B/16);
* ``lora-fo`` / ``lora-dual`` / ``lora-vision`` / ``lora-language``: the same with LoRA (Table 5's dagger);
* ``<placement>-limit`` for each of these placements: the same FO step with the placement's ZO part frozen
  (``requires_grad=False``) and nothing else changed (the same optimizer class over the remaining FO groups,
  the same batch). No ZO placement can need less: each placement's peak is reported against its limit, with
  the paper's reductions as a reference. Where nothing is left FO (Dual) the limit is the loss's forward;
* ``mezo-pkg`` / ``torchzero``: the optional peers' MeZO step (PyPI ``mezo.update``; torchzero's MeZO module,
  Gaussian, plain SGD, see ``_peers.py``) on every adapter, left out with a note where not installed.

Method. Each configuration runs in a fresh Python process. On CPU: RSS is read after the imports
(``runtime``) and after the model, adapters, batch and optimizer are built (``model``); the step runs
``--warmup-steps`` times (so optimizer state exists and lazy initialisations are done), freed heap is handed
back (``malloc_trim``), the peak-RSS counter is reset (``/proc/self/clear_refs``) and one more step runs. The
child gets a fixed glibc mmap threshold so RSS follows live tensor bytes. Reported: the peak minus the RSS
after construction ("step peak above model": activations, gradients, optimizer state, ZO anchors) and the
peak minus the runtime's RSS ("training peak incl. weights", the CPU analogue of the GPU numbers in
Table 5). On CUDA the same two figures come from ``torch.cuda.max_memory_allocated``.

Also written: a pure-ZO step's peak against the no-grad forward's (with and without the weights), and
optimizer state bytes per trainable parameter for every rule and mode against ``torch.optim.SGD`` and
``AdamW``.

    python -m benchmarks.memory [--model ViT-B-16] [--batch 8] [--prompts 10] [--device cpu]

``--configs limits`` stands for every ``-limit`` configuration.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import _measure
from benchmarks._measure import MIB
from benchmarks._peers import PEERS, TorchzeroMeZO, leave_out_missing, mezo_package_step

if TYPE_CHECKING:  # imported lazily: it loads torch and open_clip
    from benchmarks._workload import Workload

PAPER_TABLE5_GB = {
    # MoE4Adapter column, then the LoRA (dagger) column of Table 5 (CLIP ViT-B/16, GPU).
    "fo": 19.96, "dual": 2.17, "vision": 6.93, "language": 12.39,
    "lora-fo": 15.11, "lora-dual": 1.73, "lora-vision": 5.71, "lora-language": 11.09,
}
LAYER_PATTERNS = {"hop-odd": "hop-odd", "hop-even": "hop-even", "prefix": "prefix:half", "suffix": "suffix:half"}
BRANCH_LABELS = {"dual": "Dual", "vision": "Vision", "language": "Language"}


@dataclass(frozen=True)
class MemoryConfig:
    """One measured configuration.

    Attributes:
        label: Row label in the tables.
        operation: ``"inference"``, ``"torch-adamw"``, ``"hybridzo"``, ``"limit"`` (the placement's step with
            its ZO part frozen) or a peer's MeZO step, ``"mezo-pkg"`` or ``"torchzero"``.
        adapter: ``"moe"`` or ``"lora"``.
        branch: ZO branch of the hybridzo placement (``"none"``: all FO).
        layers: hybridzo layer pattern of the ZO groups.
        conservative: ZO-SGD-Cons (True) or ZO* / ZO-SGD (False).
        restore: the ZO groups' ``restore`` (``"exact"`` or ``"inplace"``).
    """

    label: str
    operation: str
    adapter: str = "moe"
    branch: str = "none"
    layers: str = "all"
    conservative: bool = True
    restore: str = "exact"


def _configurations() -> Dict[str, MemoryConfig]:
    configs = {
        "inference": MemoryConfig("No-grad forward (inference)", "inference"),
        "fo-torch": MemoryConfig("FO baseline, torch.optim.AdamW loop", "torch-adamw"),
        "fo": MemoryConfig("FO baseline (hybridzo, all FO)", "hybridzo"),
    }
    for branch, name in BRANCH_LABELS.items():
        configs[branch] = MemoryConfig(f"{name} w/ ZO", "hybridzo", branch=branch)
    configs["dual-naive"] = MemoryConfig("Dual w/ ZO* (ZO-SGD, MeZO step)", "hybridzo", branch="dual",
                                         conservative=False)
    configs["dual-inplace"] = MemoryConfig("Dual w/ ZO, restore='inplace'", "hybridzo", branch="dual",
                                           restore="inplace")
    for branch, name in BRANCH_LABELS.items():
        for key, layers in LAYER_PATTERNS.items():
            shown = layers.replace("half", "K/2")
            configs[f"{branch}-{key}"] = MemoryConfig(f"{name} w/ ZO, {shown}", "hybridzo", branch=branch,
                                                      layers=layers)
    configs["lora-fo"] = MemoryConfig("LoRA: FO baseline (hybridzo)", "hybridzo", adapter="lora")
    for branch, name in BRANCH_LABELS.items():
        configs[f"lora-{branch}"] = MemoryConfig(f"LoRA: {name} w/ ZO", "hybridzo", adapter="lora", branch=branch)
    configs["mezo-pkg"] = MemoryConfig("Dual w/ ZO*, PyPI mezo.update", "mezo-pkg", branch="dual",
                                       conservative=False)
    configs["torchzero"] = MemoryConfig("Dual w/ ZO*, torchzero MeZO (gaussian)", "torchzero", branch="dual",
                                        conservative=False)
    for name in PLACEMENTS:
        config = configs[name]
        configs[f"{name}-limit"] = replace(config, label=f"{config.label}: limit (ZO part frozen)",
                                           operation="limit")
    return configs


LAYERWISE = [f"{b}-{k}" for b in BRANCH_LABELS for k in LAYER_PATTERNS]
PLACEMENTS = [*BRANCH_LABELS, *LAYERWISE, *(f"lora-{b}" for b in BRANCH_LABELS)]
"""Configurations with a ``-limit`` counterpart: one per placement of ZO (settings such as restore share it)."""
CONFIGS = _configurations()
LIMITS = [f"{name}-limit" for name in PLACEMENTS]
PEER_OF = {"mezo-pkg": "mezo", "torchzero": "torchzero"}
"""Configurations that need an optional peer (``_peers.PEERS``): left out, with a note, where it is missing."""
SWEEP_CONFIGS = ["fo", "dual", "vision", "language"]


def limit_of(name: str) -> Optional[str]:
    """The ``-limit`` configuration of the placement ``name`` measures (same adapter, branch and layers)."""
    config = CONFIGS[name]
    for limit in LIMITS:
        other = CONFIGS[limit]
        if (other.adapter, other.branch, other.layers) == (config.adapter, config.branch, config.layers):
            return limit
    return None


def config_names(value: str) -> List[str]:
    """``--configs``: comma-separated names; ``limits`` stands for every ``-limit`` configuration."""
    names: List[str] = []
    for name in _measure.split_list(value):
        names += LIMITS if name == "limits" else [name]
    return names


# ------------------------------------------------------------------------------------------------ child


def _operation(config: MemoryConfig, workload: Workload) -> Tuple[Callable[[], Any], Dict[str, int]]:
    """The step to measure and its (ZO, FO) trainable scalar counts."""
    import torch

    from benchmarks._workload import (CONSERVATIVE, NAIVE, Placement, group_sizes, limit_optimizer,
                                      make_optimizer, torch_step)

    if config.operation == "inference":
        def forward() -> None:
            with torch.no_grad():
                workload.loss()
        return forward, {"zo": 0, "fo": 0}
    if config.operation == "torch-adamw":
        optimizer = torch.optim.AdamW(workload.adapter_parameters(), lr=1e-5)
        return (lambda: torch_step(optimizer, workload.loss)), {"zo": 0, "fo": workload.trainable_count()}
    zo_lr, eps = 1e-6, 1e-3  # those of param_groups' ZO groups
    if config.operation == "mezo-pkg":
        step = mezo_package_step(workload.model, workload.adapter_parameters(), zo_lr, eps)
        return (lambda: step(workload.loss)), {"zo": workload.trainable_count(), "fo": 0}
    if config.operation == "torchzero":
        # Its estimate stays in .grad between steps, as in a torchzero training loop: the warm-up step leaves it.
        peer = TorchzeroMeZO(workload.adapter_parameters(), zo_lr, eps, "gaussian")
        return (lambda: peer.step(workload.loss)), {"zo": workload.trainable_count(), "fo": 0}
    settings = replace(CONSERVATIVE if config.conservative else NAIVE, restore=config.restore)
    placement = Placement(config.branch, config.layers, settings)
    if config.operation == "limit":
        limited = limit_optimizer(workload, placement)
        if limited is None:  # nothing FO: the loss's forward, which autograd does not record
            return workload.loss, {"zo": 0, "fo": 0}
        return (lambda: limited.step(workload.loss)), {"zo": 0, "fo": group_sizes(limited)[1]}
    optimizer = make_optimizer(workload, placement)
    zo, fo = group_sizes(optimizer)
    return (lambda: optimizer.step(workload.loss)), {"zo": zo, "fo": fo}


def measure(name: str, model: str, batch: int, prompts: int, device: str, warmup_steps: int,
            threads: Optional[int]) -> Dict[str, Any]:
    """Run in the child process: build, warm up, reset the peak, run one step; bytes in MiB."""
    import torch

    from benchmarks._workload import build_workload

    if threads is not None:
        torch.set_num_threads(threads)
    config = CONFIGS[name]
    if name in PEER_OF:  # the runtime includes the peer's code, as it includes torch's
        PEERS[PEER_OF[name]].load()
    meter = _measure.PeakMemory(device)
    runtime = meter.current()
    workload = build_workload(model, config.adapter, batch, prompts, device)
    trainable = workload.trainable_count()  # before a limit freezes its ZO part
    step, sizes = _operation(config, workload)
    after_model = meter.current()
    for _ in range(max(warmup_steps, 1)):
        step()
    meter.reset_peak()
    start = meter.current()
    step()
    peak = meter.peak()
    weights = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    return {
        "name": name, "above_model_mib": (peak - after_model) / MIB, "total_mib": (peak - runtime) / MIB,
        "above_start_mib": (peak - start) / MIB, "runtime_mib": runtime / MIB, "weights_mib": weights / MIB,
        "zo_params": sizes["zo"], "fo_params": sizes["fo"], "trainable_params": trainable,
        "meter": meter.kind,
    }


# ------------------------------------------------------------------------------------ optimizer state


def optimizer_state_bytes(model_name: str, steps: int = 2) -> List[Dict[str, Any]]:
    """Persistent optimizer state bytes per trainable parameter after ``steps`` steps, per rule and mode.

    Counts every tensor the optimizer keeps in ``state`` (moments, momentum buffers, step tensors).
    hybridzo's exact restore also holds one copy of the ZO parameters *during* a step; that transient
    is part of the step peaks above, not of the persistent state.
    """
    import torch

    from benchmarks._workload import build_workload
    from hybridzo import HybridZOOptimizer

    workload = build_workload(model_name, "moe", batch=2, prompts=4, device="cpu")
    params = workload.adapter_parameters()
    count = workload.trainable_count()
    snapshot = [p.detach().clone() for p in params]

    def hybrid(mode: str, rule: str, momentum: float = 0.0, conservative: bool = False) -> Callable:
        return lambda: HybridZOOptimizer(params, lr=1e-6, mode=mode, rule=rule, momentum=momentum,
                                         conservative=conservative, seed=0)

    cases: List[Tuple[str, Callable[[], torch.optim.Optimizer], bool]] = [
        ("torch.optim.SGD", lambda: torch.optim.SGD(params, lr=1e-6), False),
        ("torch.optim.SGD, momentum 0.9", lambda: torch.optim.SGD(params, lr=1e-6, momentum=0.9), False),
        ("torch.optim.AdamW", lambda: torch.optim.AdamW(params, lr=1e-6), False),
        ("hybridzo FO, sgd", hybrid("fo", "sgd"), True),
        ("hybridzo FO, sgd, momentum 0.9", hybrid("fo", "sgd", 0.9), True),
        ("hybridzo FO, adamw", hybrid("fo", "adamw"), True),
        ("hybridzo ZO, sgd (ZO-SGD / MeZO)", hybrid("zo", "sgd"), True),
        ("hybridzo ZO, sgd, conservative (ZO-SGD-Cons)", hybrid("zo", "sgd", conservative=True), True),
        ("hybridzo ZO, sgd, momentum 0.9", hybrid("zo", "sgd", 0.9), True),
        ("hybridzo ZO, adamw", hybrid("zo", "adamw"), True),
    ]
    rows = []
    for label, factory, is_hybrid in cases:
        with torch.no_grad():
            for p, value in zip(params, snapshot):
                p.copy_(value)
        optimizer = factory()
        for _ in range(steps):
            if is_hybrid:
                optimizer.step(workload.loss)
            else:
                optimizer.zero_grad(set_to_none=True)
                workload.loss().backward()
                optimizer.step()
        state_bytes = sum(value.numel() * value.element_size()
                          for state in optimizer.state.values() for value in state.values()
                          if isinstance(value, torch.Tensor))
        rows.append({"optimizer": label, "state_bytes": state_bytes, "bytes_per_param": state_bytes / count,
                     "trainable_params": count})
        for p in params:
            p.grad = None
    return rows


# ------------------------------------------------------------------------------------------------ report


def _change(value: float, baseline: float) -> str:
    """Relative change against the baseline, signed: ``-91.6%`` is a 91.6% reduction."""
    return f"{100 * (value / baseline - 1):+.1f}%"


def _paper(name: str) -> Tuple[str, str]:
    """Paper memory (GB) and its reduction against the paper's FO baseline of the same adapter."""
    if name not in PAPER_TABLE5_GB:
        return "", ""
    baseline = PAPER_TABLE5_GB["lora-fo" if name.startswith("lora") else "fo"]
    gb = PAPER_TABLE5_GB[name]
    return f"{gb:.2f}", ("" if name.endswith("fo") else _change(gb, baseline))


def _rows(results: Dict[str, Dict[str, Any]], names: Sequence[str], baseline: str,
          with_paper: bool) -> List[List[str]]:
    base = results.get(baseline)
    rows = []
    for name in names:
        if name not in results:
            continue
        r = results[name]
        compare = base is not None and name != baseline
        cells = [CONFIGS[name].label, f"{r['zo_params']:,} / {r['fo_params']:,}", f"{r['above_model_mib']:.0f}",
                 _change(r["above_model_mib"], base["above_model_mib"]) if compare else "",
                 f"{r['total_mib']:.0f}", _change(r["total_mib"], base["total_mib"]) if compare else ""]
        if with_paper:
            cells += list(_paper(name))
        rows.append(cells)
    return rows


LIMIT_TABLE = ["dual", "dual-naive", "dual-inplace", "vision", "language", *LAYERWISE, "lora-dual", "lora-vision",
               "lora-language"]
"""Rows of the table that sets each placement against its limit."""


def _saving(row: Optional[Dict[str, Any]], fo: Optional[Dict[str, Any]]) -> str:
    """Change against the FO baseline above model, and incl. weights in brackets."""
    if row is None or fo is None:
        return ""
    above, total = (_change(row[key], fo[key]) for key in ("above_model_mib", "total_mib"))
    return f"{above} ({total})"


def _limit_rows(results: Dict[str, Dict[str, Any]]) -> List[List[str]]:
    """Per placement: peaks against the limit's (incl. weights and above model), savings against FO."""
    def mib(row: Optional[Dict[str, Any]], key: str) -> str:
        return "not measured" if row is None else f"{row[key]:.0f}"

    rows = []
    for name in LIMIT_TABLE:
        r, limit = results.get(name), results.get(limit_of(name) or "")
        if r is None and f"{name}-limit" not in results:
            continue
        fo = results.get("lora-fo" if name.startswith("lora") else "fo")
        cells = [CONFIGS[name].label]
        for key in ("total_mib", "above_model_mib"):
            both = r is not None and limit is not None
            cells += [f"{mib(r, key)} / {mib(limit, key)}", _measure.ratio(r[key], limit[key], 3) if both else ""]
        rows.append(cells + [_saving(r, fo), _saving(limit, fo), _paper(name)[1]])
    return rows


def write_plot(results: Dict[str, Dict[str, Any]], path: Path, title: str) -> Path:
    """Horizontal bars per configuration: step peak above the model, and the training peak incl. weights.

    A placement whose limit was measured gets a black tick on each bar at the limit's value.
    """
    names = [n for n in CONFIGS if n in results and CONFIGS[n].operation != "limit"]
    labels = [CONFIGS[n].label for n in names]
    figure, (axes,) = _measure.figure(size=(9, 0.32 * len(names) + 1.6))
    positions = list(range(len(names)))[::-1]
    axes.barh([p + 0.2 for p in positions], [results[n]["total_mib"] for n in names], height=0.4,
              color="#c6dbef", label="training peak incl. weights")
    axes.barh([p - 0.2 for p in positions], [results[n]["above_model_mib"] for n in names], height=0.4,
              color="#2171b5", label="step peak above model")
    limited = [(p, results[limit_of(n)]) for p, n in zip(positions, names) if limit_of(n) in results]
    if limited:
        axes.scatter([r["total_mib"] for _, r in limited] + [r["above_model_mib"] for _, r in limited],
                     [p + 0.2 for p, _ in limited] + [p - 0.2 for p, _ in limited], marker="|", s=120,
                     color="black", label="limit: the same step with the ZO part frozen")
    axes.set_yticks(positions)
    axes.set_yticklabels(labels, fontsize=8)
    axes.set_xlabel("MiB")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _measure.save_figure(figure, path)


def _sweep_table(results: Dict[str, Dict[str, Any]], sweep: Dict[int, Dict[str, Dict[str, Any]]],
                 batch: int) -> str:
    """Reductions of Dual/Vision/Language against FO per batch size, with the paper's for reference."""
    by_batch = dict(sweep)
    if all(name in results for name in SWEEP_CONFIGS):
        by_batch[batch] = {name: results[name] for name in SWEEP_CONFIGS}
    rows = []
    for size in sorted(by_batch):
        r = by_batch[size]
        fo = r["fo"]
        branches = ("dual", "vision", "language")
        reductions = [1 - r[b]["above_model_mib"] / fo["above_model_mib"] for b in branches]
        rows.append([str(size), f"{fo['above_model_mib']:.0f}"]
                    + [f"{_change(r[b]['above_model_mib'], fo['above_model_mib'])} "
                       f"({_change(r[b]['total_mib'], fo['total_mib'])})" for b in branches]
                    + [f"{100 * (reductions[1] + reductions[2]):.1f}%"])  # = 2 - (V + L) / F
    paper = {b: PAPER_TABLE5_GB[b] for b in ("dual", "vision", "language")}
    paper_sum = 2 - (paper["vision"] + paper["language"]) / PAPER_TABLE5_GB["fo"]
    rows.append(["paper (Table 5, GPU totals)", f"({PAPER_TABLE5_GB['fo']} GB in all)"]
                + [_change(gb, PAPER_TABLE5_GB["fo"]) for gb in paper.values()] + [f"{100 * paper_sum:.1f}%"])
    return _measure.markdown_table(["batch (images)", "FO step peak above model (MiB)", "Dual w/ ZO", "Vision w/ ZO",
                                    "Language w/ ZO", "Vision + Language reductions, 2 - (V + L)/F"], rows)


def write_report(results: Dict[str, Dict[str, Any]], sweep: Dict[int, Dict[str, Dict[str, Any]]],
                 state_rows: List[Dict[str, Any]], args: argparse.Namespace, info: Dict[str, Any], load_after: str,
                 argv: Optional[Sequence[str]], notes: Sequence[str] = ()) -> str:
    """The markdown of ``memory.md``; ``notes`` say which rows were left out and why."""
    any_result = next(iter(results.values()))
    headers = ["configuration", "ZO / FO trainable params", "step peak above model (MiB)", "vs FO",
               "training peak incl. weights (MiB)", "vs FO"]
    paper_headers = headers + ["paper Table 5 (GB)", "paper vs FO"]
    lines = [
        "# Peak memory of one training step",
        "",
        _measure.environment_markdown(info, _measure.command_line("benchmarks.memory", argv), load_after),
        f"- Workload: open_clip `{args.model}`, random weights ({any_result['weights_mib']:.0f} MiB fp32), "
        f"adapters in every block of both towers, backbone frozen; batch {args.batch} images, {args.prompts} "
        f"text prompts re-encoded per step (one per class of an Inc{args.prompts} task); training mode; "
        f"{args.threads or 'default'} torch thread(s).",
        f"- Method: {any_result['meter']}, fresh process per configuration, {args.warmup_steps} warm-up "
        "step(s), then one measured step. *Step peak above model* = peak minus the memory after building model, "
        "batch and optimizer; *training peak incl. weights* = peak minus the memory of the bare runtime "
        "(Python, torch), i.e. weights + step (what `torch.cuda.max_memory_allocated` reports on a GPU). "
        "ZO groups: ZO-SGD-Cons, plain SGD rule; FO groups: AdamW.",
    ]
    lines += [f"- {note}." for note in notes]
    lines += [
        "",
        "## Branches (Table 5, MoE adapters)",
        "",
        _measure.markdown_table(paper_headers, _rows(results, ["inference", "fo-torch", "fo", "dual", "vision",
                                                               "language", "dual-naive", "dual-inplace", "mezo-pkg",
                                                               "torchzero"], "fo", True)),
    ]
    if any(name in results for name in LIMITS):
        lines += ["", "## Each placement against its limit", "",
                  "The limit of a placement is the same step with the placement's ZO part frozen "
                  "(`requires_grad=False`) and nothing else changed: the same optimizer over the remaining FO "
                  "groups, the same batch (for Dual, where nothing is left FO, the loss's forward). No ZO method "
                  "can need less memory than that, so the limit, not the paper's percentage, is what a placement "
                  "is measured against: the savings it leaves are set by the model and the batch (which tower's "
                  "activations the remaining backward keeps), not by the optimizer. In particular the Vision and "
                  "Language savings sum to 2 - (V + L)/F (V, L: their peaks, F: the FO baseline's), so the "
                  "paper's -65.3% and -37.9% (a sum of 103.2%) are out of reach together wherever V + L > F. "
                  "Goal: placement / limit <= 1.02 for every placement. Savings against FO are above model "
                  "(incl. weights in brackets); the paper's are GPU totals, for reference.", "",
                  _measure.markdown_table(["placement", "peak incl. weights: placement / limit (MiB)", "ratio",
                                           "above model: placement / limit (MiB)", "ratio", "saving vs FO",
                                           "limit's saving vs FO", "paper vs FO"], _limit_rows(results))]
    if sweep:
        lines += ["", "## Reductions against batch size (MoE adapters)", "",
                  f"Step peak above model; in brackets, including weights. {args.prompts} prompts per step "
                  "throughout, "
                  "so the image batch sets how the activations split between the towers. ZO on one branch removes "
                  "that branch's share of the backward pass, so the Vision and Language reductions trade off "
                  "against each other: they can sum to more than 100% only if the two single-branch steps together "
                  "need less memory than the FO step (in Table 5, 6.93 + 12.39 = 19.32 GB < 19.96 GB).", "",
                  _sweep_table(results, sweep, args.batch)]
    if any(n in results for n in LAYERWISE):
        lines += ["", "## Layer-wise placements (Table 2's), MoE adapters", "",
                  "ZO on the branch's adapters in the listed layers, FO on all other adapters. "
                  "K/2 = half the blocks of a tower (6 of 12 on ViT-B-16). Backward has to reach the lowest FO "
                  "layer, so the activations of every block above it are kept whatever is ZO in between: only ZO "
                  "on a prefix (the lowest layers) saves much.", "",
                  _measure.markdown_table(headers, _rows(results, ["fo", *LAYERWISE], "fo", False))]
    if any(n.startswith("lora") for n in results):
        lines += ["", "## Branches with LoRA (Table 5, dagger column)", "",
                  _measure.markdown_table(paper_headers, _rows(results, ["lora-fo", "lora-dual", "lora-vision",
                                                                         "lora-language"], "lora-fo", True))]
    if "inference" in results:
        forward = results["inference"]
        rows = []
        for name in ("dual", "dual-naive", "dual-inplace", "mezo-pkg", "torchzero"):
            if name in results:
                r = results[name]
                rows.append([CONFIGS[name].label, f"{r['total_mib']:.0f} / {forward['total_mib']:.0f}",
                             _measure.ratio(r["total_mib"], forward["total_mib"], 3),
                             f"{r['above_model_mib']:.0f} / {forward['above_model_mib']:.0f}",
                             _measure.ratio(r["above_model_mib"], forward["above_model_mib"], 3)])
        lines += ["", "## Pure-ZO step against a no-grad forward (same model and batch)", "",
                  "Goals: the training peak incl. weights of a pure-ZO step <= 1.05 x the inference peak, and "
                  "excluding weights (above model) <= 1.01. With `restore='exact'` (the default) the step also "
                  "holds one copy of the ZO (adapter) parameters "
                  f"({any_result['trainable_params'] * 4 / MIB:.1f} MiB here in fp32); hybridzo regenerates "
                  "directions chunk by chunk (README, Memory). The peers: PyPI `mezo` draws one direction "
                  "tensor (and its scaled copy) at a time; torchzero draws the directions of all ZO parameters at "
                  "once and keeps its estimate in `.grad` between steps. The *above model* ratio shows these on "
                  "their own.", "",
                  _measure.markdown_table(["pure-ZO step", "peak incl. weights: step / forward (MiB)", "ratio",
                                           "excluding weights (above model): step / forward (MiB)", "ratio"],
                                          rows)]
    if state_rows:
        lines += ["", "## Optimizer state per trainable parameter", "",
                  f"Persistent state after 2 steps on `{args.state_model}` CLIP with MoE adapters "
                  f"({state_rows[0]['trainable_params']:,} fp32 trainable parameters, 4 bytes each). A ZO step "
                  "with `restore='exact'` additionally holds one copy of its ZO parameters (4 bytes/param in fp32) "
                  "until it ends; `restore='inplace'` does not.", "",
                  _measure.markdown_table(["optimizer", "state bytes", "bytes / trainable param"],
                                          [[r["optimizer"], f"{r['state_bytes']:,}", f"{r['bytes_per_param']:.3f}"]
                                           for r in state_rows])]
    if args.plot:
        lines += ["", f"![memory per configuration]({args.plot.name})"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Measure every selected configuration in a fresh process; write the markdown report and the plot."""
    from benchmarks._workload import MODEL_CHOICES_HELP

    parser = _measure.script_parser("memory", __doc__, out="memory.md")
    parser.add_argument("--model", default="ViT-B-16", help=MODEL_CHOICES_HELP)
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--prompts", type=int, default=10, help="text prompts encoded per step (classes per task)")
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (max_memory_allocated)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps before the measured one (at least 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each child")
    parser.add_argument("--configs", type=config_names, default=list(CONFIGS),
                        help=f"comma-separated subset of: {', '.join(CONFIGS)}; 'limits' stands for every "
                             "-limit configuration (default: all; the rows of a peer that is not installed are "
                             "left out, with a note)")
    parser.add_argument("--sweep-batches", type=_measure.int_list, default=[],
                        help="also measure the FO baseline and Dual/Vision/Language w/ ZO at these batch sizes, "
                             "e.g. 2,4,16 (how the reductions depend on images per prompt)")
    parser.add_argument("--state-model", default="tiny", help="model of the optimizer-state table ('' to skip)")
    parser.add_argument("--plot", type=Path, default=None, help="bar chart (default: --out with .png)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.configs) - CONFIGS.keys()
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.prompts, args.device, args.warmup_steps,
                                 args.threads)))
        return {}
    args.plot = args.plot or args.out.with_suffix(".png")
    settings = {"model": args.model, "batch": args.batch, "prompts": args.prompts, "device": args.device,
                "warmup_steps": args.warmup_steps, "threads": args.threads}
    args.configs, notes = leave_out_missing(args.configs, PEER_OF)
    for note in notes:
        print(note, flush=True)

    import torch

    torch.set_num_threads(args.threads)
    info = _measure.environment(args.device)
    child_args = ["--model", args.model, "--batch", str(args.batch), "--prompts", str(args.prompts),
                  "--device", args.device, "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads)]
    results: Dict[str, Dict[str, Any]] = {}
    for name in args.configs:
        results[name] = _measure.run_child("benchmarks.memory", ["--child", name, *child_args])
        r = results[name]
        print(f"{name:>18}: above model {r['above_model_mib']:8.1f} MiB, incl. weights {r['total_mib']:8.1f} MiB",
              flush=True)
    sweep: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for batch in args.sweep_batches:
        batch_args = [*child_args]
        batch_args[batch_args.index("--batch") + 1] = str(batch)
        sweep[batch] = {}
        for name in SWEEP_CONFIGS:
            sweep[batch][name] = _measure.run_child("benchmarks.memory", ["--child", name, *batch_args])
            print(f"batch {batch:>3} {name:>10}: above model {sweep[batch][name]['above_model_mib']:8.1f} MiB",
                  flush=True)
    state_rows = optimizer_state_bytes(args.state_model) if args.state_model else []
    load_after = _measure.load_average()
    title = f"{args.model}, batch {args.batch}, {args.prompts} prompts: peak memory of one step"
    write_plot(results, args.plot, title)
    report = write_report(results, sweep, state_rows, args, info, load_after, argv, notes)
    _measure.write_text(args.out, report)
    record = {"environment": info, "settings": settings, "results": results, "batch_sweep": sweep,
              "optimizer_state": state_rows}
    _measure.write_text(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(report)
    return {"results": results, "batch_sweep": sweep, "optimizer_state": state_rows}


if __name__ == "__main__":
    main()
