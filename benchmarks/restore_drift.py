"""How far ``restore="inplace"`` drifts: 1,000 ZO steps at lr=0 in fp32, fp16 and bf16.

With ``lr=0`` a step must leave the parameters where they were. ``restore="exact"`` writes
every probe from a copy and ends each step bit for bit at theta; ``restore="inplace"``
undoes each probe (and trial move) by subtraction, which rounds. The figure is the relative
drift ``||theta_end - theta_0|| / ||theta_0||`` over all parameters after the steps, for ZO-SGD
(central, q=1) with Gaussian and Rademacher directions, on a small MLP (16-64-64-1, eps 1e-3).
(Trial moves of candidates/conservative selection are no moves at lr=0, so they add nothing here.)

    python -m benchmarks.restore_drift [--steps 1000] [--out benchmarks/results/restore_drift.md]
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from benchmarks import _measure
from hybridzo import HybridZOOptimizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def relative_drift(dtype: torch.dtype, restore: str, distribution: str, steps: int) -> float:
    """``||theta_end - theta_0|| / ||theta_0||`` after ``steps`` lr=0 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)
    before = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=generator).to(dtype), torch.randn(32, 1, generator=generator)
    opt = HybridZOOptimizer(model.parameters(), lr=0.0, eps=1e-3, restore=restore, distribution=distribution,
                            seed=0)
    for _ in range(steps):
        opt.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    after = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return float((after - before).norm() / before.norm())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = _measure.script_parser("restore_drift", __doc__, out="restore_drift.md")
    parser.add_argument("--steps", type=int, default=1000, help="lr=0 steps per measurement")
    args = parser.parse_args(argv)
    info = _measure.environment()
    rows: List[Dict[str, Any]] = []
    for distribution in ("gaussian", "rademacher"):
        for dtype_name, dtype in DTYPES.items():
            row = {"distribution": distribution, "dtype": dtype_name}
            for restore in ("exact", "inplace"):
                row[restore] = relative_drift(dtype, restore, distribution, args.steps)
            rows.append(row)
            print(row, flush=True)
    command = _measure.command_line("benchmarks.restore_drift", argv)
    table = _measure.markdown_table(
        ["directions", "dtype", "`restore=\"exact\"`", "`restore=\"inplace\"`"],
        [[r["distribution"], r["dtype"], f"{r['exact']:.1e}", f"{r['inplace']:.1e}"] for r in rows],
        align="llrr",
    )
    text = "\n".join([
        "# Drift of in-place restore",
        "",
        _measure.environment_markdown(info, command),
        f"- Method: {args.steps} steps with lr=0 on a 16-64-64-1 MLP (eps 1e-3, batch 32, loss in fp32); "
        "relative drift ||theta_end - theta_0|| / ||theta_0|| over all parameters; ZO-SGD, central, q=1.",
        "",
        table,
        "",
    ])
    _measure.write_text(args.out, text)
    _measure.write_text(args.out.with_suffix(".json"),
                        json.dumps({"environment": info, "command": command, "steps": args.steps, "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
