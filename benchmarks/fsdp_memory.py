"""Per-process memory of full-model ZO on FSDP2: 2 processes against one, on a model whose weights dominate.

The model is a character-level transformer language model (fp32, every parameter in one ZO group, plain
ZO-SGD with the central estimator: MeZO's step) with a small batch, so its weights are most of what a step
holds; ``--shapes`` lists the depths and widths to measure. Each runs once in a single process on the
unsharded model, and once on ``--world`` gloo processes with every block and the root sharded by
``fully_shard`` (``hybridzo.prepare_fsdp``), each process holding ``1/world`` of the global batch. Every
process is a fresh interpreter started with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors leave the
resident set) and one torch thread.

In each process, three phases, each in a steady state: the operation runs once to warm up, freed heap is
handed back, the peak RSS is reset (``/proc/self/clear_refs``), the operation runs again and the peak is
read. The figure reported is that peak minus the RSS of the bare runtime, i.e. weights included, as
``torch.cuda.max_memory_allocated`` would count on a GPU. The bare runtime is measured after imports, the
process group (world > 1) and one run of every phase on a tiny model of the same kind, so that library code
paged in on first use is not counted as the phases' memory:

* ``forward``: one ``torch.no_grad()`` forward (the floor of any forward-only method);
* ``exact``: one ``HybridZOOptimizer.step`` with ``restore="exact"`` (a copy of the local ZO parameters);
* ``inplace``: the same step with ``restore="inplace"`` (no copy).

    python -m benchmarks.fsdp_memory [--world 2] [--shapes 28x512,48x384] [--out benchmarks/results/fsdp_memory.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import _measure
from benchmarks._measure import MIB

PHASES = ("forward", "exact", "inplace")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}


def build_model(vocab: int, width: int, depth: int, heads: int, context: int) -> Any:
    """``examples/fsdp_zo.py``'s character language model (embeddings, ``depth`` pre-norm blocks, a linear head),
    initialised from seed 0."""
    import torch

    from examples.fsdp_zo import CharLM

    torch.manual_seed(0)  # a fresh process per measurement: the global generator is its own
    return CharLM(vocab, width, depth, heads, context)


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    """Run in a rank process: phases' peak RSS above the bare runtime, in MiB."""
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F

    from hybridzo import HybridZOOptimizer, prepare_fsdp

    torch.set_num_threads(1)
    sharded = args.world > 1
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                                world_size=args.world)
        dist.barrier()
    tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens.chunk(args.world)[args.rank]

    def setup(width: int, depth: int) -> Tuple[Any, Dict[str, Callable[[], Any]]]:
        model = build_model(args.vocab, width, depth, args.heads, args.context)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            prepare_fsdp(model)

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:].flatten())

        def forward() -> None:
            with torch.no_grad():
                loss()

        optimizers = {restore: HybridZOOptimizer(model.parameters(), lr=1e-7, eps=1e-3, restore=restore, seed=0)
                      for restore in ("exact", "inplace")}
        return model, {"forward": forward, "exact": lambda: optimizers["exact"].step(loss),
                       "inplace": lambda: optimizers["inplace"].step(loss)}

    # The bare runtime: every code path of the measured phases run once on a tiny model of the same kind,
    # so that library code paged in on first use counts as runtime, not as the phases' memory.
    _, warmup = setup(args.heads * 8, 1)
    for operation in warmup.values():
        operation()
    del _, warmup, operation
    gc.collect()
    meter = _measure.PeakMemory("cpu")
    _measure.release_free_heap()
    runtime = meter.current()
    model, operations = setup(args.width, args.depth)
    total_params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    local_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    after_model = meter.current()
    peaks = {}
    for phase in PHASES:
        operations[phase]()  # warm up: allocator, kernels, lazy initialisation
        if sharded:
            dist.barrier()
        meter.reset_peak()
        operations[phase]()
        peaks[phase] = (meter.peak() - runtime) / MIB
        if sharded:
            dist.barrier()
    if sharded:
        dist.destroy_process_group()
    return {"world": args.world, "rank": args.rank, "peak_mib": peaks, "runtime_mib": runtime / MIB,
            "after_model_mib": (after_model - runtime) / MIB, "local_weights_mib": local_bytes / MIB,
            "params": total_params, "block_params": block_params}


def run_world(args: argparse.Namespace, world: int) -> List[Dict[str, Any]]:
    """Start ``world`` fresh rank processes and collect their JSON lines."""
    env = {**os.environ, **MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_measure.REPO_ROOT), env.get("PYTHONPATH", "")]))
    sizes = ["--vocab", str(args.vocab), "--width", str(args.width), "--depth", str(args.depth),
             "--heads", str(args.heads), "--context", str(args.context), "--batch", str(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        init_file = Path(folder) / "init"
        processes = [
            subprocess.Popen([sys.executable, "-m", "benchmarks.fsdp_memory", "--child", "--world", str(world),
                              "--rank", str(rank), "--init-file", str(init_file), *sizes],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=_measure.REPO_ROOT)
            for rank in range(world)
        ]
        outputs = [process.communicate() for process in processes]
    rows = []
    for rank, (process, (out, err)) in enumerate(zip(processes, outputs)):
        if process.returncode != 0:
            raise RuntimeError(f"rank {rank} of {world} failed ({process.returncode}):\n{err[-4000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def report(args: argparse.Namespace, runs: List[Dict[str, Any]], info: Dict[str, Any], command: str,
           load_after: str) -> str:
    table, models = [], []
    for run in runs:
        single, sharded = run["rows"]["1"][0], run["rows"][str(args.world)]
        name = f"{run['depth']} x {run['width']}"
        block_mib = single["block_params"] * 4 / MIB
        models.append(f"`{name}` ({run['depth']} blocks of width {run['width']}): {single['params'] / 1e6:.1f}M "
                      f"parameters, {single['local_weights_mib']:.1f} MiB; one block {block_mib:.1f} MiB; "
                      f"{args.world} processes hold "
                      + " / ".join(f"{r['local_weights_mib']:.1f}" for r in sharded) + " MiB of weights each")
        for phase in PHASES:
            one = single["peak_mib"][phase]
            worst = max(sharded, key=lambda r: r["peak_mib"][phase])
            per_rank = worst["peak_mib"][phase]
            held = worst["local_weights_mib"] * (2 if phase == "exact" else 1)  # the shard (and its anchor copy)
            beyond = per_rank - held
            table.append([name, phase, f"{one:.1f}", f"{per_rank:.1f}",
                          f"{beyond:.1f} ({beyond / block_mib:.1f} blocks)", f"{per_rank / one:.3f}"])
    lines = [
        "# Memory of full-model ZO on FSDP2",
        "",
        _measure.environment_markdown(info, command, load_after),
        f"- Model: character-level transformer LM (pre-norm blocks: attention with {args.heads} heads, MLP 4x), "
        f"vocabulary {args.vocab}, context {args.context}, fp32. Global batch {args.batch} sequences of "
        f"{args.context} tokens, split over the processes. Every parameter ZO: ZO-SGD, central estimator, q=1.",
        *[f"  - {model}." for model in models],
        f"- Sharded run: {args.world} gloo processes, every block and the root `fully_shard`ed, "
        "`hybridzo.prepare_fsdp(model)`.",
        "- Peak RSS of each process minus its bare runtime (imports, process group, and the code paths of every "
        "phase run once on a tiny model of the same kind), weights included; fresh processes with "
        "`MALLOC_MMAP_THRESHOLD_=65536`, one torch thread; each phase warmed up once, then measured after "
        "resetting the peak (`/proc/self/clear_refs`).",
        "",
        _measure.markdown_table(
            ["model", "phase", "1 process (MiB)", f"{args.world} processes, max per process (MiB)",
             "per process beyond its shard (MiB)", "ratio"], table, align="llrrrr"),
        "",
        "`forward`: a no-grad forward; `exact`: `HybridZOOptimizer.step` with `restore=\"exact\"` (a copy of the "
        "local parameters during the step); `inplace`: with `restore=\"inplace\"` (no copy). *Beyond its shard*: "
        "what a process holds at the peak besides its weight shard (and, for `exact`, the step's copy of it), in "
        "MiB and in blocks of the model: mostly FSDP2's gathered copies of the block being evaluated (all-gather "
        "buffers and unsharded parameters), then activations and one direction chunk.",
    ]
    return "\n".join(lines) + "\n"


def parse_shapes(value: str) -> List[List[int]]:
    """``"28x512,48x384"`` -> ``[[28, 512], [48, 384]]`` (depth x width)."""
    return [[int(n) for n in item.split("x")] for item in _measure.split_list(value)]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = _measure.script_parser("fsdp_memory", __doc__, out="fsdp_memory.md")
    parser.add_argument("--world", type=int, default=2, help="processes of the sharded run")
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("28x512,48x384"),
                        help="comma-separated DEPTHxWIDTH models to measure")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="global batch (sequences), split over processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=28, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--init-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return []
    if args.batch % args.world:
        parser.error(f"--batch {args.batch} is not divisible by --world {args.world}")
    info = _measure.environment()
    command = _measure.command_line("benchmarks.fsdp_memory", argv)
    runs = []
    for depth, width in args.shapes:
        args.depth, args.width = depth, width
        rows = {str(world): run_world(args, world) for world in (1, args.world)}
        runs.append({"depth": depth, "width": width, "rows": rows})
        print(json.dumps(runs[-1]), flush=True)
    load_after = _measure.load_average()
    text = report(args, runs, info, command, load_after)
    _measure.write_text(args.out, text)
    settings = {key: getattr(args, key) for key in ("world", "shapes", "vocab", "heads", "context", "batch")}
    record = {"environment": info, "command": command, "settings": settings, "load_after": load_after,
              "runs": runs}
    _measure.write_text(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(text)
    return runs


if __name__ == "__main__":
    main()
