"""Full-model zeroth-order fine-tuning of a small transformer language model sharded with FSDP2.

A character-level GPT-style model is first trained briefly with backprop (AdamW) on generated
statements ("the cat sees the river."), then every parameter is fine-tuned forward-only with
``HybridZOOptimizer`` (MeZO's step: no backward, no gradients, no optimizer state) on questions
("does the cat see the river? yes."). The model's blocks and the root are sharded with
``torch.distributed.fsdp.fully_shard`` over all processes: each holds 1/N of the weights and
evaluates 1/N of every batch, and ``hybridzo.prepare_fsdp`` makes the sharded model safe for the
in-place ZO writes. Checkpoints of the ZO phase go through ``torch.distributed.checkpoint`` (DCP), so
a run saved on N processes resumes on M. No download: the text is generated.

    torchrun --nproc_per_node 2 examples/fsdp_zo.py                  # CPU: gloo; GPUs: nccl
    torchrun --nproc_per_node 2 examples/fsdp_zo.py --steps 200 --save runs/fsdp_zo/checkpoint
    torchrun --nproc_per_node 1 examples/fsdp_zo.py --steps 400 --resume runs/fsdp_zo/checkpoint
    python examples/fsdp_zo.py --steps 50                            # one process, no sharding

Rank 0 shows progress bars and writes ``loss.png`` and ``losses.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

if __package__ in (None, ""):  # `python examples/fsdp_zo.py` or torchrun: import hybridzo from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from hybridzo import HybridZOOptimizer, prepare_fsdp

# ------------------------------------------------------------------------------------------ data


SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour"]
VERBS = ["see", "like", "follow", "find", "draw", "visit", "remember"]
OBJECTS = ["the river", "a red ball", "the garden", "an open window", "the tall tree", "a quiet street"]


def generate_text(characters: int, questions: bool, seed: int = 0) -> str:
    """Sentences from a small grammar: statements ("the cat sees the river.") or questions
    ("does the cat see the river? yes.")."""
    rng = random.Random(seed)
    sentences: List[str] = []
    length = 0
    while length < characters:
        subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        if questions:
            sentence = f"does {subject} {verb} {obj}? {rng.choice(['yes', 'no'])}. "
        else:
            sentence = f"{subject} {verb}s {obj}{rng.choice(['.', ' today.', ' again.', ' at night.'])} "
        sentences.append(sentence)
        length += len(sentence)
    return "".join(sentences)[:characters]


class CharData:
    """Random windows of a text, encoded as character indices; batch ``step`` is the same on every process."""

    def __init__(self, text: str, alphabet: List[str], context: int, seed: int) -> None:
        self.alphabet = alphabet
        self.data = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
        self.context, self.seed = context, seed

    def batch(self, step: int, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.data) - self.context - 1, (size,), generator=generator)
        return torch.stack([self.data[s:s + self.context + 1] for s in starts.tolist()])

    def decode(self, indices: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in indices)


# ----------------------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    """Token and position embeddings, ``depth`` blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every position, flattened to (batch * time, vocabulary)."""
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).flatten(0, 1))


# ------------------------------------------------------------------------------------ distributed


def setup_processes() -> Dict[str, object]:
    """The process group under torchrun (nccl on GPUs, else gloo), or a single process without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    launched = "RANK" in os.environ  # torchrun, even with one process: shard over a 1-process group
    if launched:
        dist.init_process_group("nccl" if cuda else "gloo")
    return {"world": world, "rank": rank, "device": device, "distributed": launched}


def save_checkpoint(model: nn.Module, opt: HybridZOOptimizer, path: Path, history: Dict[str, List[float]],
                    rank: int) -> None:
    """Model and optimizer (sharded or not) through DCP; the loss history as JSON next to them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(path))
    if rank == 0:
        (path / "losses.json").write_text(json.dumps(history))


def load_checkpoint(model: nn.Module, opt: HybridZOOptimizer, path: Path) -> Dict[str, List[float]]:
    """Fill the fresh model and optimizer from a DCP checkpoint saved on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    history = path / "losses.json"
    return json.loads(history.read_text()) if history.is_file() else {"pretrain": [], "zo": []}


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its help and default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=300,
                        help="ZO fine-tuning until the optimizer has taken this many steps")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="AdamW (backprop) steps on statements first; skipped with --resume")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="AdamW learning rate of the pretraining")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences), split over processes")
    parser.add_argument("--context", type=int, default=64, help="characters per training sequence")
    parser.add_argument("--width", type=int, default=128, help="model width (embedding size)")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks (each one FSDP2 unit)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the ZO fine-tuning")
    parser.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    parser.add_argument("--restore", choices=["exact", "inplace"], default="exact",
                        help="exact: from a copy of the local shard; inplace: no copy (MeZO)")
    parser.add_argument("--distribution", choices=["gaussian", "rademacher"], default="gaussian",
                        help="ZO directions: Gaussian N(0, I) (MeZO) or Rademacher +-1 entries (cheaper to draw)")
    parser.add_argument("--conservative", action="store_true",
                        help="ZO-SGD-Cons: keep the best of theta, theta+-delta")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text, the initial weights and ZO directions")
    parser.add_argument("--text-chars", type=int, default=200_000, help="characters of generated training text")
    parser.add_argument("--save", type=Path, default=None,
                        help="DCP checkpoint folder, relative to the current directory, written every --save-every "
                             "steps and at the end (default: no checkpoint)")
    parser.add_argument("--save-every", type=int, default=100, help="ZO steps between checkpoints with --save")
    parser.add_argument("--resume", type=Path, default=None,
                        help="DCP checkpoint folder to continue from (saved on any number of processes); the "
                             "optimizer's settings (lr, eps, restore, distribution, ...) come from the checkpoint")
    parser.add_argument("--sample", type=int, default=60, help="characters to generate greedily at the end (0: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp_zo"),
                        help="folder for loss.png and losses.json, relative to the current directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def train(opt: HybridZOOptimizer, model: nn.Module, data: CharData, steps: range, batch: int, world: int,
          rank: int, device: torch.device, description: str, quiet: bool, losses: List[float],
          after_step: Optional[Callable[[int], None]] = None) -> None:
    """Step ``opt`` once per step on that step's batch (this process's part of it); append the losses."""
    from tqdm import tqdm

    progress = tqdm(steps, disable=rank != 0 or quiet, desc=description)
    for step in progress:
        tokens = data.batch(step, batch).chunk(world)[rank].to(device)

        def closure() -> torch.Tensor:
            return F.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:].flatten())

        losses.append(float(opt.step(closure)))  # averaged over processes: the same on every one
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if after_step is not None:
            after_step(step)


def complete(model: nn.Module, data: CharData, prompt: str, characters: int, device: torch.device) -> str:
    """Greedy continuation of ``prompt``; every process runs it (each forward gathers the shards)."""
    context = torch.tensor([[data.alphabet.index(c) for c in prompt]], device=device)
    with torch.no_grad():
        for _ in range(characters):
            logits = model(context[:, -data.context:]).view(1, -1, len(data.alphabet))[:, -1]
            context = torch.cat([context, logits.argmax(-1, keepdim=True)], dim=1)
    return data.decode(context[0, len(prompt):].tolist())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    processes = setup_processes()
    world, rank, device = processes["world"], processes["rank"], processes["device"]
    assert isinstance(world, int) and isinstance(rank, int) and isinstance(device, torch.device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {world} processes")
    statements = generate_text(args.text_chars, questions=False, seed=args.seed)
    questions = generate_text(args.text_chars, questions=True, seed=args.seed + 1)
    alphabet = sorted(set(statements) | set(questions))
    pretraining = CharData(statements, alphabet, args.context, args.seed)
    fine_tuning = CharData(questions, alphabet, args.context, args.seed + 1)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = CharLM(len(alphabet), args.width, args.depth, args.heads, args.context).to(device)
    if processes["distributed"]:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)  # parameters become DTensors sharded on dim 0
        fully_shard(model)  # the root: embeddings, final norm and head
        prepare_fsdp(model)  # reshard after every forward, so ZO writes into the shards reach the next one
    parameters = sum(p.numel() for p in model.parameters())
    opt = HybridZOOptimizer(model.parameters(), lr=args.lr, eps=args.eps, restore=args.restore,
                            distribution=args.distribution, conservative=args.conservative, seed=args.seed)
    history = load_checkpoint(model, opt, args.resume) if args.resume else {"pretrain": [], "zo": []}
    start = opt.param_groups[0]["steps"]  # a resumed run continues its data order and its directions
    if rank == 0:
        print(f"{parameters / 1e6:.2f}M parameters; {world} process(es) on {device.type}"
              f"{', sharded with FSDP2' if processes['distributed'] else ''}", flush=True)
    began = time.perf_counter()
    if not args.resume and args.pretrain_steps > 0:  # backprop on statements: the model to fine-tune
        adamw = HybridZOOptimizer(model.parameters(), mode="fo", rule="adamw", lr=args.pretrain_lr)
        train(adamw, model, pretraining, range(args.pretrain_steps), args.batch, world, rank, device,
              "AdamW pretraining", args.no_progress, history["pretrain"])
        adamw.zero_grad(set_to_none=True)
        del adamw

    def checkpoint(step: int) -> None:
        if args.save is not None and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_checkpoint(model, opt, args.save, history, rank)

    train(opt, model, fine_tuning, range(start, args.steps), args.batch, world, rank, device, "ZO fine-tuning",
          args.no_progress, history["zo"], after_step=checkpoint)
    elapsed = time.perf_counter() - began
    prompt = "does the cat "
    sample = complete(model, fine_tuning, prompt, args.sample, device) if args.sample > 0 else ""
    result = {"losses": history, "steps": args.steps, "world": world, "parameters": parameters,
              "seconds": elapsed, "sample": prompt + sample, "config": {k: str(v) for k, v in vars(args).items()}}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(json.dumps(result, indent=1))
        plot_losses(history, args.out / "loss.png", f"{world} process(es), restore={args.restore}")
        zo = history["zo"]
        print(f"ZO fine-tuning loss {zo[0] if zo else math.nan:.3f} -> {zo[-1] if zo else math.nan:.3f}; "
              f"{elapsed:.1f} s; sample: {prompt + sample!r}", flush=True)
        print(f"wrote {args.out / 'loss.png'} and {args.out / 'losses.json'}", flush=True)
    if processes["distributed"]:
        dist.barrier()
        dist.destroy_process_group()
    return result


def plot_losses(history: Dict[str, List[float]], path: Path, title: str) -> None:
    """Pretraining and ZO fine-tuning losses side by side, each with a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, (name, label) in zip(axes, [("pretrain", "AdamW pretraining (statements)"),
                                        ("zo", "full-model ZO fine-tuning (questions)")]):
        losses = history[name]
        ax.plot(range(len(losses)), losses, linewidth=0.8, alpha=0.5, label="loss per step")
        window = max(1, len(losses) // 20)
        if len(losses) > window > 1:
            smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
            ax.plot(range(window - 1, len(losses)), smooth, label=f"mean of {window}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_ylabel("cross-entropy (nats/char)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
