"""The ZO step of this checkout against another checkout's, on a model's full parameter set, in one process.

A regression check for large tensors: both versions of hybridzo step the same parameters (lr 1e-12, so they
stay put), with a fast forward (the loss w . (||p_1||, ..., ||p_n||), three dispatched operations), so that a
step is the optimizer's own work: drawing directions, probes, restores and the update. The other checkout's
``hybridzo`` package is loaded under another name; each round steps every (setting, version) once, the order
reversed every other round, and the report gives per setting the median time of each version and the median over
rounds of new / old, so that load that changes between rounds cancels. In a full-model row of ``speed.md`` this
work is the *outside closures* share; the forwards around it are the same for both versions.

Example: ``git worktree add ../old <commit>`` then
``python -m benchmarks.compare_commits --other ../old --model ViT-B-16``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

import torch

import hybridzo
from benchmarks import _measure
from benchmarks._workload import MODEL_CHOICES_HELP, build_clip

SETTINGS: Dict[str, Dict[str, Any]] = {
    "exact": {},
    "inplace": {"restore": "inplace"},
    "rademacher": {"distribution": "rademacher"},
    "rademacher, inplace": {"distribution": "rademacher", "restore": "inplace"},
}
"""ZO-SGD (central, q=1) settings compared, as the full-model rows of ``speed.md`` run them."""


def load_other(checkout: Path) -> ModuleType:
    """``checkout``'s ``hybridzo`` package, imported as ``hybridzo_other``."""
    package = checkout.resolve() / "hybridzo"
    spec = importlib.util.spec_from_file_location("hybridzo_other", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    if spec is None or spec.loader is None or not (package / "__init__.py").is_file():
        raise SystemExit(f"no hybridzo package under {checkout}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybridzo_other"] = module
    spec.loader.exec_module(module)
    return module


def compare(params: Sequence[torch.Tensor], other: ModuleType, rounds: int,
            log: Any = print) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per step of each setting with this hybridzo (``new``) and the other one (``old``), per round."""
    weights = torch.randn(len(params), generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        return torch.stack(torch._foreach_norm(list(params))) @ weights

    optimizers = {(name, version): module.HybridZOOptimizer(list(params), lr=1e-12, eps=1e-3, seed=0, **settings)
                  for name, settings in SETTINGS.items() for version, module in (("old", other), ("new", hybridzo))}
    for optimizer in optimizers.values():
        optimizer.step(closure)  # warm-up: state, caches and plans as every later step finds them
    times: Dict[str, Dict[str, List[float]]] = {name: {"old": [], "new": []} for name in SETTINGS}
    for r in range(rounds):
        order = list(optimizers) if r % 2 == 0 else list(reversed(list(optimizers)))
        for name, version in order:
            start = time.perf_counter()
            optimizers[(name, version)].step(closure)
            times[name][version].append(time.perf_counter() - start)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v} {times[n][v][-1]:.2f} s" for n, v in order))
    return times


def report(times: Dict[str, Dict[str, List[float]]], info: Dict[str, Any], command: str, other_commit: str,
           model: str, count: int, entries: int) -> str:
    rows = []
    for name, by_version in times.items():
        ratios = [new / old for old, new in zip(by_version["old"], by_version["new"])]
        rows.append([name, f"{_measure.median(by_version['old']):.3f}", f"{_measure.median(by_version['new']):.3f}",
                     f"{_measure.median(ratios):.3f}", f"{min(ratios):.2f}-{max(ratios):.2f}"])
    return "\n\n".join([
        "# ZO step, this checkout against another, on a full parameter set",
        _measure.environment_markdown(info, command, _measure.load_average()),
        f"- Workload: every parameter of `{model}` ({count} tensors, {entries:,} entries, random weights) in one "
        f"ZO group, ZO-SGD central q=1, lr 1e-12, eps 1e-3; fast forward (w . per-tensor norms). *old*: "
        f"another checkout, at {other_commit or 'an unknown commit'}; *new*: this checkout.",
        "- Method: one warm-up step each, then rounds in which every (setting, version) steps once, the order "
        "reversed every other round; *new / old* is the median over rounds of the ratio within a round.",
        _measure.markdown_table(["setting", "old (s)", "new (s)", "new / old", "range over rounds"], rows, "lrrrr"),
    ]) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, List[float]]]:
    parser = _measure.script_parser("compare_commits", __doc__, out="compare_commits.md")
    parser.add_argument("--other", type=Path, required=True, help="another checkout of hybridzo (e.g. a worktree)")
    parser.add_argument("--model", default="ViT-B-16", help=MODEL_CHOICES_HELP)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    other = load_other(args.other)
    info = _measure.environment()
    params = list(build_clip(args.model).parameters())
    times = compare(params, other, args.rounds, log=lambda line: print(line, flush=True))
    other_commit = _measure.git_commit(args.other)
    # The command as run from the repository root, the other checkout named relative to it (no folder of this machine).
    arguments = list(sys.argv[1:] if argv is None else argv)
    for i in range(1, len(arguments)):
        if arguments[i - 1] == "--other":
            arguments[i] = os.path.relpath(args.other.resolve(), _measure.REPO_ROOT)
    text = report(times, info, _measure.command_line("benchmarks.compare_commits", arguments), other_commit, args.model,
                  len(params), sum(p.numel() for p in params))
    _measure.write_text(args.out, text)
    _measure.write_text(args.out.with_suffix(".json"), json.dumps({"environment": info, "times": times}, indent=1)
                        + "\n")
    print(text)
    return times


if __name__ == "__main__":
    main()
