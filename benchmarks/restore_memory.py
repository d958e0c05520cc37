"""What exact restore costs: peak memory of one pure-ZO step against a no-grad forward.

Each measurement runs in a fresh Python process. After the model and batch are
built, the process's peak-RSS counter is reset (``/proc/self/clear_refs``), the
operation runs once, and the reported figure is the new peak (VmHWM) minus the RSS
before the operation. Three operations on the same model and batch:

* ``forward``: one ``torch.no_grad()`` forward (the floor for any forward-only method);
* ``hybridzo``: one ``HybridZOOptimizer.step`` (central estimator, q=1);
* ``mezo-inplace``: the MeZO loop (+eps, -2eps, +eps in place, then an update sweep),
  which needs no copy of the parameters but does not restore them exactly.

Two ZO placements: every parameter ZO ("full"), and only a small adapter ZO.

    python benchmarks/restore_memory.py [--width 2048] [--depth 8] [--out benchmarks/results/restore_memory.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(operation: str, placement: str, width: int, depth: int, batch: int) -> dict:
    """Run in the child process: build, reset the peak, run once, report bytes above the start."""
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hybridzo import HybridZOOptimizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers)
    adapter = nn.Linear(width, 8)  # a small side branch, standing in for an adapter
    x = torch.randn(batch, width)
    for p in model.parameters():
        p.requires_grad_(placement == "full")

    def closure():
        h = model(x)
        return (h.pow(2).mean() + adapter(h).pow(2).mean())

    zo_params = list(model.parameters()) + list(adapter.parameters()) if placement == "full" else list(adapter.parameters())
    opt = HybridZOOptimizer(zo_params, lr=1e-6, eps=1e-3, seed=0)
    with torch.no_grad():
        closure()  # warm up allocator and kernels outside the measured window
    Path("/proc/self/clear_refs").write_text("5")
    start_kib = _status_kib("VmRSS")
    if operation == "forward":
        with torch.no_grad():
            closure()
    elif operation == "hybridzo":
        opt.step(closure)
    else:
        with torch.no_grad():
            seed = 1234
            for scale in (1e-3, -2e-3, 1e-3):
                torch.manual_seed(seed)
                for p in zo_params:
                    p.add_(torch.randn_like(p), alpha=scale)
                if scale != 1e-3 or True:
                    closure()
            torch.manual_seed(seed)
            for p in zo_params:
                p.add_(torch.randn_like(p), alpha=-1e-6)
    peak_kib = _status_kib("VmHWM")
    zo_bytes = sum(p.numel() * p.element_size() for p in zo_params)
    largest = max(p.numel() * p.element_size() for p in zo_params)
    return {"operation": operation, "placement": placement, "above_start_mib": (peak_kib - start_kib) / 1024,
            "zo_param_mib": zo_bytes / MIB, "largest_zo_tensor_mib": largest / MIB}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "restore_memory.md")
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "PLACEMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.width, args.depth, args.batch)))
        return
    rows = []
    for placement in ("full", "adapter"):
        for operation in ("forward", "hybridzo", "mezo-inplace"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", operation, placement, "--width", str(args.width),
                 "--depth", str(args.depth), "--batch", str(args.batch)],
                check=True, capture_output=True, text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1])
    import torch

    lines = [
        "# Memory of exact restore",
        "",
        f"Model: {args.depth} x Linear({args.width}, {args.width}) + GELU, fp32, batch {args.batch}; "
        f"CPU, {platform.processor() or platform.machine()}, torch {torch.__version__}. "
        "Peak RSS above the RSS before the operation, fresh process per row "
        "(`python benchmarks/restore_memory.py`).",
        "",
        "| ZO placement | ZO params (MiB) | largest ZO tensor (MiB) | no-grad forward (MiB) | hybridzo step (MiB) | MeZO in-place step (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for placement in ("full", "adapter"):
        r = {row["operation"]: row for row in rows if row["placement"] == placement}
        lines.append(
            f"| {placement} | {r['forward']['zo_param_mib']:.1f} | {r['forward']['largest_zo_tensor_mib']:.1f} | "
            f"{r['forward']['above_start_mib']:.1f} | {r['hybridzo']['above_start_mib']:.1f} | "
            f"{r['mezo-inplace']['above_start_mib']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
