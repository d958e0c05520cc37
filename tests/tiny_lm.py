"""A small transformer language model and the helpers the FSDP2 tests share (float64, CPU).

Every block is sharded on its own, the head too, and the root (``shard``); ``closure_for`` is the loss of a
batch of token sequences, ``train`` steps an optimizer on one batch and returns the losses.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from hybridzo import HybridZOOptimizer, prepare_fsdp

VOCAB, WIDTH, HEADS, CONTEXT, BLOCKS, BATCH, SEED = 17, 16, 2, 8, 2, 8, 5


def fsdp2_available() -> bool:
    """Whether torch has FSDP2, DTensor and torch.distributed.checkpoint's state-dict helpers."""
    if not dist.is_available():
        return False
    try:
        import torch.distributed.checkpoint  # noqa: F401
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError:
        return False
    return True


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc, self.out = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.1 * torch.randn(CONTEXT, WIDTH))
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)  # 17 rows: uneven shards

    def forward(self, tokens):
        """Logits of every position, flattened to (batch * time, vocabulary)."""
        h = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).flatten(0, 1))


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().double()


def shard(model: TinyLM, layout: str = "all") -> TinyLM:
    """``all``: every block, the head and the root; ``blocks``: the blocks only (the root's parameters stay plain)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    if layout == "all":
        fully_shard(model.head)
        fully_shard(model)
    prepare_fsdp(model)
    return model.to("cpu")  # as Lightning does after sharding: the parameters stay prepared


DATA = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(1))


def batch_of(rank: int, world: int) -> torch.Tensor:
    """This process's part of the global batch (the whole batch for one process)."""
    return DATA.chunk(world)[rank]


def closure_for(model: nn.Module, tokens: torch.Tensor, nan: bool = False):
    def closure():
        loss = F.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:].flatten())
        return loss * float("nan") if nan else loss
    return closure


def full_model_optimizer(model: nn.Module, options: dict, seed: int = SEED) -> HybridZOOptimizer:
    return HybridZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=seed, **options)


def mixed_optimizer(model: TinyLM, seed: int = SEED) -> HybridZOOptimizer:
    """ZO blocks, embeddings and final norm (momentum), FO AdamW head, conservative."""
    zo = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    return HybridZOOptimizer(
        [{"params": zo, "mode": "zo", "momentum": 0.9},
         {"params": model.head.parameters(), "mode": "fo", "rule": "adamw", "lr": 3e-3}],
        lr=1e-2, eps=1e-3, conservative=True, seed=seed,
    )


def full_params(model: nn.Module) -> dict:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def counters(opt: HybridZOOptimizer) -> list:
    return [[g["seed"], g["steps"], g["nonfinite_steps"]] for g in opt.param_groups]


def train(model, opt, tokens, steps, first_step=0, after_step=None, nan_step=None) -> list:
    losses = []
    for step in range(first_step, first_step + steps):
        nan = step == nan_step
        with pytest.warns(RuntimeWarning, match="non-finite") if nan else contextlib.nullcontext():
            losses.append(float(opt.step(closure_for(model, tokens, nan))))
        if after_step is not None:
            after_step()
    return losses


def state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def save_checkpoint(model, opt, path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dicts(model, opt), checkpoint_id=str(path))


def load_checkpoint(model, opt, path) -> None:
    """What a user does: state dicts of the fresh model and optimizer, filled by dcp.load, then set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    loaded = state_dicts(model, opt)
    dcp.load(loaded, checkpoint_id=str(path))
    set_model_state_dict(model, loaded["model"])
    set_optimizer_state_dict(model, opt, loaded["optim"])


def assert_params_close(got: dict, expected: nn.Module, rtol: float) -> None:
    initial = make_model().state_dict()
    for name, p in expected.named_parameters():
        error = (got[name] - p.detach()).norm() / p.detach().norm()
        assert error <= rtol, f"{name}: relative difference {error:.2e}"
    assert any(not torch.equal(got[name], initial[name]) for name in got)  # and it trained
