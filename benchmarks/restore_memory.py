"""What restore costs: peak memory of one pure-ZO step against a no-grad forward.

Each measurement runs in a fresh Python process. After the model and batch are
built and one forward has warmed up the allocator and kernels, the peak-memory
counter is reset (``/proc/self/clear_refs`` on CPU, see ``_measure.PeakMemory``),
the operation runs once, and the reported figure is the new peak minus the memory
before the operation; also reported is what is still allocated after it (state an
optimizer keeps between steps). Operations on the same model and batch:

* ``forward``: one ``torch.no_grad()`` forward (the floor for any forward-only method);
* ``hybridzo``: one ``HybridZOOptimizer.step`` (central estimator, q=1, ``restore="exact"``);
* ``hybridzo-inplace``: the same step with ``restore="inplace"`` (no copy of the ZO parameters);
* ``mezo-inplace``: the MeZO loop (+eps, -2eps, +eps in place, a forward after each of the
  first two, then an update sweep), which needs no copy of the parameters but does not
  restore them exactly;
* ``mezo-pkg`` and ``torchzero``: the optional peers' MeZO steps (PyPI ``mezo.update``;
  torchzero's MeZO module with Gaussian directions and plain SGD, see ``_peers.py``), left
  out with a note where the peer is not installed.

Each ZO step is set against the forward: the difference is what the step needs beyond
inference, and the ratio is the step's peak over the forward's, weights excluded.

Two ZO placements: every parameter ZO ("full"), and only a small adapter ZO.

    python -m benchmarks.restore_memory [--width 2048] [--depth 8] [--out benchmarks/results/restore_memory.md]
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import _measure
from benchmarks._measure import MIB
from benchmarks._peers import TorchzeroMeZO, leave_out_missing, mezo_package_step

OPERATIONS = ("forward", "hybridzo", "hybridzo-inplace", "mezo-inplace", "mezo-pkg", "torchzero")
PEER_OF = {"mezo-pkg": "mezo", "torchzero": "torchzero"}
PLACEMENTS = ("full", "adapter")
LABELS = {
    "forward": "no-grad forward",
    "hybridzo": "hybridzo step, restore='exact'",
    "hybridzo-inplace": "hybridzo step, restore='inplace'",
    "mezo-inplace": "MeZO in-place loop",
    "mezo-pkg": "PyPI mezo.update",
    "torchzero": "torchzero MeZO (gaussian)",
}


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
    lr, eps = 1e-6, 1e-3
    if operation in ("hybridzo", "hybridzo-inplace"):
        restore = "inplace" if operation == "hybridzo-inplace" else "exact"
        step = HybridZOOptimizer(zo_params, lr=lr, eps=eps, restore=restore, seed=0).step
    elif operation == "mezo-pkg":
        step = mezo_package_step(model, zo_params, lr, eps)
    elif operation == "torchzero":
        step = TorchzeroMeZO(zo_params, lr, eps, "gaussian").step
    with torch.no_grad():
        closure()  # warm up allocator and kernels outside the measured window
    meter = _measure.PeakMemory("cpu")
    meter.reset_peak()
    start = meter.current()
    if operation == "forward":
        with torch.no_grad():
            closure()
    elif operation != "mezo-inplace":
        step(closure)
    else:
        with torch.no_grad():
            seed = 1234
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
    _measure.release_free_heap()
    after = meter.current()
    zo_bytes = sum(p.numel() * p.element_size() for p in zo_params)
    largest = max(p.numel() * p.element_size() for p in zo_params)
    return {"operation": operation, "placement": placement, "above_start_mib": (peak - start) / MIB,
            "left_after_mib": (after - start) / MIB,
            "zo_param_mib": zo_bytes / MIB, "largest_zo_tensor_mib": largest / MIB}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Measure every (placement, operation) in a fresh process and write the markdown table."""
    parser = _measure.script_parser("restore_memory", __doc__, out="restore_memory.md")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--placements", type=_measure.split_list, default=list(PLACEMENTS),
                        help="comma-separated subset of: full, adapter")
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "PLACEMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.width, args.depth, args.batch)))
        return []
    info = _measure.environment()
    operations, notes = leave_out_missing(OPERATIONS, PEER_OF)
    sizes = ["--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch)]
    rows = []
    for placement in args.placements:
        for operation in operations:
            rows.append(_measure.run_child("benchmarks.restore_memory", ["--child", operation, placement, *sizes]))
            print(rows[-1], flush=True)
    table = []
    for placement in args.placements:
        r = {row["operation"]: row for row in rows if row["placement"] == placement}
        forward = r["forward"]["above_start_mib"]
        for operation in operations:
            peak = r[operation]["above_start_mib"]
            table.append([placement if operation == "forward" else "", LABELS[operation], f"{peak:.1f}",
                          "" if operation == "forward" else f"{peak - forward:+.1f}",
                          "" if operation == "forward" else _measure.ratio(peak, forward),
                          f"{r[operation]['left_after_mib']:.1f}"])
    sizes_row = {row["placement"]: row for row in rows if row["operation"] == "forward"}
    placements = "; ".join(f"{name}: {row['zo_param_mib']:.1f} MiB of ZO parameters, largest tensor "
                           f"{row['largest_zo_tensor_mib']:.1f} MiB" for name, row in sizes_row.items())
    lines = [
        "# Memory of exact and in-place restore",
        "",
        _measure.environment_markdown(info, _measure.command_line("benchmarks.restore_memory", argv),
                                      _measure.load_average()),
        f"- Model: {args.depth} x Linear({args.width}, {args.width}) + GELU, fp32, batch {args.batch}, one torch "
        "thread, and an 8-output linear side branch (the \"adapter\"). Peak RSS above the RSS before the "
        "operation, fresh process per row; *left after* is what the operation leaves allocated (after handing "
        "freed heap back). *Over the forward* and *step / forward* set each step's peak against the no-grad "
        "forward's, weights excluded; where the forward's activations are small next to one direction tensor, "
        "the ratio is large and the difference says more.",
        f"- ZO parameters per placement: {placements}.",
        *(f"- {note}." for note in notes),
        "",
        _measure.markdown_table(["ZO placement", "operation", "peak above start (MiB)", "over the forward (MiB)",
                                 "step / forward, excl. weights", "left after (MiB)"], table, "llrrrr"),
    ]
    report = "\n".join(lines) + "\n"
    _measure.write_text(args.out, report)
    print(report)
    return rows


if __name__ == "__main__":
    main()
