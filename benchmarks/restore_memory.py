"""What restore costs: peak memory of one pure-ZO step against a no-grad forward.

Each measurement runs in a fresh Python process. After the model and batch are
built and one forward has warmed up the allocator and kernels, the peak-memory
counter is reset (``/proc/self/clear_refs`` on CPU, see ``_measure.PeakMemory``),
the operation runs once, and the reported figure is the new peak minus the memory
before the operation. Three operations on the same model and batch:

* ``forward``: one ``torch.no_grad()`` forward (the floor for any forward-only method);
* ``hybridzo``: one ``HybridZOOptimizer.step`` (central estimator, q=1, ``restore="exact"``);
* ``hybridzo-inplace``: the same step with ``restore="inplace"`` (no copy of the ZO parameters);
* ``mezo-inplace``: the MeZO loop (+eps, -2eps, +eps in place, a forward after each of the
  first two, then an update sweep), which needs no copy of the parameters but does not
  restore them exactly.

Two ZO placements: every parameter ZO ("full"), and only a small adapter ZO.

    python -m benchmarks.restore_memory [--width 2048] [--depth 8] [--out benchmarks/results/restore_memory.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import _measure
from benchmarks._measure import MIB

OPERATIONS = ("forward", "hybridzo", "hybridzo-inplace", "mezo-inplace")
PLACEMENTS = ("full", "adapter")


def measure(operation: str, placement: str, width: int, depth: int, batch: int) -> Dict[str, Any]:
    """Run in the child process: build, reset the peak, run once, report MiB above the start."""
    import torch
    from torch import nn

    from hybridzo import HybridZOOptimizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers)
    adapter = nn.Linear(width, 8)  # a small side branch, standing in for an adapter
    x = torch.randn(batch, width)
    for p in model.parameters():
        p.requires_grad_(placement == "full")

    def closure() -> torch.Tensor:
        h = model(x)
        return h.pow(2).mean() + adapter(h).pow(2).mean()

    zo_params = list(adapter.parameters())
    if placement == "full":
        zo_params = list(model.parameters()) + zo_params
    restore = "inplace" if operation == "hybridzo-inplace" else "exact"
    opt = HybridZOOptimizer(zo_params, lr=1e-6, eps=1e-3, restore=restore, seed=0)
    with torch.no_grad():
        closure()  # warm up allocator and kernels outside the measured window
    meter = _measure.PeakMemory("cpu")
    meter.reset_peak()
    start = meter.current()
    if operation == "forward":
        with torch.no_grad():
            closure()
    elif operation in ("hybridzo", "hybridzo-inplace"):
        opt.step(closure)
    else:
        with torch.no_grad():
            seed, eps, lr = 1234, 1e-3, 1e-6
            for scale in (eps, -2 * eps):
                torch.manual_seed(seed)
                for p in zo_params:
                    p.add_(torch.randn_like(p), alpha=scale)
                closure()
            torch.manual_seed(seed)
            for p in zo_params:
                p.add_(torch.randn_like(p), alpha=eps)
            torch.manual_seed(seed)
            for p in zo_params:
                p.add_(torch.randn_like(p), alpha=-lr)
    peak = meter.peak()
    zo_bytes = sum(p.numel() * p.element_size() for p in zo_params)
    largest = max(p.numel() * p.element_size() for p in zo_params)
    return {"operation": operation, "placement": placement, "above_start_mib": (peak - start) / MIB,
            "zo_param_mib": zo_bytes / MIB, "largest_zo_tensor_mib": largest / MIB}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Measure every (placement, operation) in a fresh process and write the markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restore_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--placements", type=_measure.split_list, default=list(PLACEMENTS),
                        help="comma-separated subset of: full, adapter")
    parser.add_argument("--out", type=Path, default=_measure.RESULTS_DIR / "restore_memory.md")
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "PLACEMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.width, args.depth, args.batch)))
        return []
    info = _measure.environment()
    sizes = ["--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch)]
    rows = []
    for placement in args.placements:
        for operation in OPERATIONS:
            rows.append(_measure.run_child("benchmarks.restore_memory", ["--child", operation, placement, *sizes]))
            print(rows[-1], flush=True)
    table = []
    for placement in args.placements:
        r = {row["operation"]: row for row in rows if row["placement"] == placement}
        table.append([placement, f"{r['forward']['zo_param_mib']:.1f}", f"{r['forward']['largest_zo_tensor_mib']:.1f}",
                      f"{r['forward']['above_start_mib']:.1f}", f"{r['hybridzo']['above_start_mib']:.1f}",
                      f"{r['hybridzo-inplace']['above_start_mib']:.1f}", f"{r['mezo-inplace']['above_start_mib']:.1f}"])
    lines = [
        "# Memory of exact and in-place restore",
        "",
        _measure.environment_markdown(info, _measure.command_line("benchmarks.restore_memory", argv),
                                      _measure.load_average()),
        f"- Model: {args.depth} x Linear({args.width}, {args.width}) + GELU, fp32, batch {args.batch}, one torch "
        "thread. Peak RSS above the RSS before the operation, fresh process per row.",
        "",
        _measure.markdown_table(["ZO placement", "ZO params (MiB)", "largest ZO tensor (MiB)",
                                 "no-grad forward (MiB)", "hybridzo step, exact (MiB)",
                                 "hybridzo step, inplace (MiB)", "MeZO in-place step (MiB)"], table),
    ]
    report = "\n".join(lines) + "\n"
    _measure.write_text(args.out, report)
    print(report)
    return rows


if __name__ == "__main__":
    main()
