"""Quick start: one small model, a zeroth-order group and a first-order group, a checkpoint and a resume.

A two-layer classifier learns a synthetic task (labels from a fixed random teacher network; no download). Its
hidden layer is trained zeroth-order (forward passes only, MoZO's coordinate sign) and its output layer
first-order (backprop, AdamW), both by one ``HybridZOOptimizer``. Halfway, model and optimizer are saved with
``torch.save``; a fresh model and optimizer load the checkpoint and train the second half again. The script
checks that the loss has clearly fallen and that the resumed run repeats the uninterrupted one bit for bit
(the ZO directions are regenerated from the seed and step counters that ``state_dict`` saves). A few seconds on
one CPU core::

    python examples/quickstart.py                 # or: python -m examples.quickstart
    python examples/quickstart.py --steps 1000 --out runs/quickstart
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python examples/quickstart.py`: import hybridzo from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from hybridzo import HybridZOOptimizer

FEATURES, HIDDEN, CLASSES, BATCH = 16, 64, 4, 64


def make_batch(seed: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: inputs from a generator seeded by (seed, step), so a resumed run sees the same ones;
    labels from a fixed random teacher network."""
    teacher = torch.Generator().manual_seed(seed)
    w1 = torch.randn(FEATURES, 8, generator=teacher)
    w2 = torch.randn(8, CLASSES, generator=teacher)
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(seed * 1_000_003 + step + 1))
    return x, (torch.tanh(x @ w1) @ w2).argmax(dim=1)


def build(seed: int) -> Tuple[nn.Module, HybridZOOptimizer]:
    """The model (hidden layer ZO, output layer FO) and its optimizer."""
    torch.manual_seed(seed)  # the model's initial weights only; hybridzo draws from its own generators
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    opt = HybridZOOptimizer(
        [
            {"params": model[0].parameters(), "mode": "zo", "eps": 1e-3, "sign": "coordinate", "lr": 2e-3},
            {"params": model[2].parameters(), "mode": "fo", "rule": "adamw", "lr": 2e-2},
        ],
        conservative=True, seed=seed,
    )
    return model, opt


def train(model: nn.Module, opt: HybridZOOptimizer, steps: range, seed: int) -> List[float]:
    """One ``opt.step(closure)`` per step on that step's batch; the losses at the unperturbed parameters."""
    losses = []
    for step in steps:
        x, y = make_batch(seed, step)

        def closure() -> torch.Tensor:  # forward only: hybridzo runs backward for the FO group itself
            return nn.functional.cross_entropy(model(x), y)

        losses.append(float(opt.step(closure)))
    return losses


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python examples/quickstart.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps (the checkpoint is taken halfway)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and ZO directions")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                        help="folder for checkpoint.pt, relative to the current directory")
    args = parser.parse_args(argv)
    if args.steps < 20:
        parser.error(f"--steps must be at least 20, got {args.steps}")
    start = time.perf_counter()

    model, opt = build(args.seed)
    half = args.steps // 2
    first = train(model, opt, range(half), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": half}, checkpoint)
    second = train(model, opt, range(half, args.steps), args.seed)

    # Resume in a fresh model and optimizer (another seed, to show that the checkpoint overrides it).
    model, opt = build(args.seed + 1)
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    resumed = train(model, opt, range(state["step"], args.steps), args.seed)

    losses = first + second
    tail = sum(losses[-10:]) / 10
    print(f"loss: first step {losses[0]:.3f} (chance level: ln {CLASSES} = {math.log(CLASSES):.3f}), "
          f"mean of the last 10 steps {tail:.3f}")
    print(f"resumed from {checkpoint} at step {half}: {len(resumed)} steps, "
          f"{'the same losses bit for bit' if resumed == second else 'DIFFERENT losses'}")
    print(f"{time.perf_counter() - start:.1f} s")
    assert tail < 0.5 * losses[0], f"the loss did not fall clearly: {losses[0]:.3f} -> {tail:.3f}"
    assert resumed == second, "the resumed run left the uninterrupted trajectory"
    return {"losses": losses, "resumed": resumed, "checkpoint": str(checkpoint)}


if __name__ == "__main__":
    main()
