"""Parameter-efficient adapters for open_clip CLIP models: MoE adapters, LoRA and the ZO-FC parallel adapter.

All adapters are attached *inside* the residual blocks of the towers, so their parameter names keep the
layer index, e.g. ``visual.transformer.resblocks.3.moe_adapter.experts.0.down.weight`` or
``transformer.resblocks.3.lora_qkv.A``. That is what hybridzo's group builder reads (``resblocks.N`` for
the layer, ``^visual\\.`` / ``^transformer\\.`` for the vision / language branch).

open_clip is not edited. Adapting a block switches its class to :class:`AdaptedResidualAttentionBlock`, a
subclass of ``open_clip.transformer.ResidualAttentionBlock`` whose ``forward`` also runs whatever adapters
the block holds; the backbone's own parameter names and state-dict keys stay the same. Every adapter starts
with a zero output projection, so a freshly adapted model computes exactly what the original computed.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

TOWERS = ("vision", "language")
LORA_TARGETS = ("qkv", "out", "fc", "proj")


class BottleneckAdapter(nn.Module):
    """AdaptFormer bottleneck ``scale * up(relu(down(x)))`` with a zero-initialised up projection.

    Args:
        width: Input and output feature size ``d``.
        bottleneck: Hidden size of the bottleneck.
        scale: Fixed output scale; default 0.1 as in AdaptFormer and MoE-Adapters4CL.
    """

    def __init__(self, width: int, bottleneck: int, scale: float = 0.1) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be positive, got {bottleneck}")
        self.scale = scale
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        # Zero up projection: the adapter adds exactly nothing until it is trained.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.relu(self.down(x)))


class MoEAdapter(nn.Module):
    """Mixture of bottleneck experts with a noisy top-k router (MoE-Adapters4CL, Yu et al., CVPR 2024).

    The router reads the first token of each sample (CLS for the vision tower, start-of-text for the
    language tower) and picks ``top_k`` experts per sample; their outputs are mixed with a softmax over
    the selected logits. In training, the logits get Gaussian noise of std ``softplus(x0 @ w_noise)``
    (Shazeer et al., 2017).

    Args:
        width: Feature size ``d`` of the block.
        num_experts: Number of experts.
        top_k: Experts used per sample (at most ``num_experts``).
        bottleneck: Hidden size of each expert.
        noisy_gating: Whether to add the learned routing noise in training mode.
        batch_first: Whether the block's activations are ``(N, L, D)`` (else ``(L, N, D)``).
    """

    noise_epsilon = 1e-2
    """Floor of the routing-noise std, as in the reference implementation."""

    def __init__(
        self,
        width: int,
        num_experts: int,
        top_k: int,
        bottleneck: int,
        noisy_gating: bool,
        batch_first: bool,
    ) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"need num_experts >= 1 and 1 <= top_k <= num_experts, got {num_experts}, {top_k}")
        self.top_k = top_k
        self.noisy_gating = noisy_gating
        self.batch_first = batch_first
        self.experts = nn.ModuleList(BottleneckAdapter(width, bottleneck) for _ in range(num_experts))
        # Zero router weights as in MoE-Adapters4CL: all experts start equally likely.
        self.w_gate = nn.Parameter(torch.zeros(width, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(width, num_experts)) if noisy_gating else None

    def gates(self, first_token: torch.Tensor) -> torch.Tensor:
        """Return the ``(N, num_experts)`` mixing weights: softmax over the top-k logits, zero elsewhere."""
        logits = first_token @ self.w_gate
        if self.noisy_gating and self.training:
            noise_std = F.softplus(first_token @ self.w_noise) + self.noise_epsilon
            logits = logits + torch.randn_like(logits) * noise_std
        top_logits, top_indices = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top_indices, top_logits.softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x if self.batch_first else x.transpose(0, 1)  # (N, L, D)
        gates = self.gates(tokens[:, 0])
        output = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            weight = gates[:, index]
            selected = weight > 0
            # Run each expert only on the samples routed to it.
            if selected.any():
                contribution = weight[selected, None, None] * expert(tokens[selected])
                output = output.index_add(0, selected.nonzero().squeeze(1), contribution)
        return output if self.batch_first else output.transpose(0, 1)


class LoRA(nn.Module):
    """Low-rank update ``scale * x @ A.T @ B.T`` of a linear map (Hu et al., 2022).

    Args:
        in_features: Input size of the adapted linear map.
        out_features: Output size of the adapted linear map.
        rank: Rank ``r`` of the update.
        alpha: Scaling numerator; the update is scaled by ``alpha / rank``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero B: no change at initialisation
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(x, self.A), self.B)


def _linear(x: torch.Tensor, layer: nn.Linear, lora: LoRA | None) -> torch.Tensor:
    output = layer(x)
    return output if lora is None else output + lora(x)


class AdaptedResidualAttentionBlock(ResidualAttentionBlock):
    """An open_clip residual block that also runs the adapters it holds.

    Blocks become this class through :func:`_adapt_block`, never by construction. Optional submodules:
    ``lora_qkv``, ``lora_out``, ``lora_fc``, ``lora_proj`` (:class:`LoRA` on the fused attention
    in-projection, the attention out-projection, ``mlp.c_fc`` and ``mlp.c_proj``), ``moe_adapter``
    (:class:`MoEAdapter`) and ``parallel_adapter`` (:class:`BottleneckAdapter`). Both of the latter run
    parallel to the MLP on the post-attention activations ``x``::

        x = x + ls_1(attn(ln_1(x)))
        x = x + ls_2(mlp(ln_2(x))) + moe_adapter(x) + parallel_adapter(x)
    """

    def _lora(self, target: str) -> LoRA | None:
        return getattr(self, f"lora_{target}", None)

    def _attention_with_lora(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Multi-head self-attention as in ``nn.MultiheadAttention``, with LoRA on in_proj / out_proj."""
        attn = self.attn
        tokens = x if attn.batch_first else x.transpose(0, 1)  # (N, L, D)
        batch, length, width = tokens.shape
        qkv = F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias)
        if self._lora("qkv") is not None:
            qkv = qkv + self.lora_qkv(tokens)
        heads = qkv.view(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                # nn.MultiheadAttention masks out True entries; SDPA would keep them.
                attn_mask = torch.zeros_like(attn_mask, dtype=x.dtype).masked_fill(attn_mask, float("-inf"))
            attn_mask = attn_mask.to(x.dtype)
            if attn_mask.dim() == 3:  # (N * heads, L, L) as accepted by nn.MultiheadAttention
                attn_mask = attn_mask.view(batch, attn.num_heads, length, length)
        context = F.scaled_dot_product_attention(
            heads[0], heads[1], heads[2], attn_mask=attn_mask, dropout_p=attn.dropout if self.training else 0.0
        )
        context = context.transpose(1, 2).reshape(batch, length, width)
        output = _linear(context, attn.out_proj, self._lora("out"))
        return output if attn.batch_first else output.transpose(0, 1)

    def _mlp_with_lora(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp.gelu(_linear(x, self.mlp.c_fc, self._lora("fc")))
        return _linear(hidden, self.mlp.c_proj, self._lora("proj"))

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise NotImplementedError("adapted blocks support self-attention only")
        if self._lora("qkv") is not None or self._lora("out") is not None:
            attention = self._attention_with_lora(self.ln_1(q_x), attn_mask)
        else:
            attention = self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask)
        x = q_x + self.ls_1(attention)

        if self._lora("fc") is not None or self._lora("proj") is not None:
            mlp_output = self._mlp_with_lora(self.ln_2(x))
        else:
            mlp_output = self.mlp(self.ln_2(x))
        output = x + self.ls_2(mlp_output)
        if hasattr(self, "moe_adapter"):
            output = output + self.moe_adapter(x)
        if hasattr(self, "parallel_adapter"):
            output = output + self.parallel_adapter(x)
        return output


def _tower_blocks(model: nn.Module, tower: str) -> tuple[str, nn.ModuleList]:
    """Return the parameter-name prefix and the residual blocks of ``tower`` ("vision" or "language")."""
    if tower == "vision":
        prefix, transformer = "visual.transformer.resblocks", getattr(model.visual, "transformer", None)
    elif tower == "language":
        prefix, transformer = "transformer.resblocks", getattr(model, "transformer", None)
    else:
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise ValueError(f"the model has no open_clip transformer in its {tower} tower")
    return prefix, transformer.resblocks


def _adapt_block(block: nn.Module) -> AdaptedResidualAttentionBlock:
    if isinstance(block, AdaptedResidualAttentionBlock):
        return block
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        raise TypeError(f"only open_clip's default self-attention ResidualAttentionBlock is supported, got "
                        f"{type(block).__name__}")
    # Same attributes, same state-dict keys; only forward changes.
    block.__class__ = AdaptedResidualAttentionBlock
    return block


def _attach(block: nn.Module, name: str, module: nn.Module, prefix: str) -> list[str]:
    """Register ``module`` as ``block.<name>`` and return its parameters' full names."""
    if hasattr(block, name):
        raise ValueError(f"{prefix} already has an adapter named {name!r}")
    reference = next(block.parameters())
    block.add_module(name, module.to(device=reference.device, dtype=reference.dtype))
    return [f"{prefix}.{name}.{param_name}" for param_name, _ in module.named_parameters()]


def _check_towers(towers: Sequence[str]) -> None:
    if isinstance(towers, str) or not towers or any(t not in TOWERS for t in towers):
        raise ValueError(f"towers must be a non-empty sequence drawn from {TOWERS}, got {towers!r}")


def add_moe_adapters(
    model: nn.Module,
    num_experts: int = 2,
    top_k: int = 2,
    bottleneck: int = 64,
    noisy_gating: bool = True,
    towers: Sequence[str] = TOWERS,
) -> list[str]:
    """Add an MoE adapter, parallel to the MLP, to every residual block of the chosen towers.

    Args:
        model: An ``open_clip.model.CLIP``; modified in place.
        num_experts: Experts per block; default 2 (the MoE-Adapters4CL class-incremental setting).
        top_k: Experts used per sample; default 2.
        bottleneck: Hidden size of each expert; default 64.
        noisy_gating: Whether the router adds learned noise in training mode; default ``True``.
        towers: Towers to adapt, from ``("vision", "language")``; default both.

    Returns:
        Full names of the new trainable parameters, e.g.
        ``visual.transformer.resblocks.3.moe_adapter.experts.0.down.weight``.
    """
    _check_towers(towers)
    names = []
    for tower in towers:
        prefix, blocks = _tower_blocks(model, tower)
        for index, block in enumerate(blocks):
            block = _adapt_block(block)
            adapter = MoEAdapter(block.attn.embed_dim, num_experts, top_k, bottleneck, noisy_gating,
                                 batch_first=block.attn.batch_first)
            names += _attach(block, "moe_adapter", adapter, f"{prefix}.{index}")
    return names


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = ("qkv", "out"),
    towers: Sequence[str] = TOWERS,
) -> list[str]:
    """Add LoRA to the chosen linear maps of every residual block of the chosen towers.

    Args:
        model: An ``open_clip.model.CLIP``; modified in place.
        rank: LoRA rank; default 8.
        alpha: Scaling numerator (update scaled by ``alpha / rank``); default ``None`` means ``rank``.
        targets: Maps to adapt, from ``"qkv"`` (fused attention in-projection), ``"out"`` (attention
            out-projection), ``"fc"`` (``mlp.c_fc``) and ``"proj"`` (``mlp.c_proj``); default
            ``("qkv", "out")``.
        towers: Towers to adapt, from ``("vision", "language")``; default both.

    Returns:
        Full names of the new trainable parameters, e.g. ``transformer.resblocks.3.lora_qkv.A``.
    """
    _check_towers(towers)
    if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise ValueError(f"targets must be a non-empty sequence drawn from {LORA_TARGETS}, got {targets!r}")
    alpha = float(rank) if alpha is None else alpha
    names = []
    for tower in towers:
        prefix, blocks = _tower_blocks(model, tower)
        for index, block in enumerate(blocks):
            block = _adapt_block(block)
            width = block.attn.embed_dim
            layers = {
                "qkv": (width, 3 * width),
                "out": (width, width),
                "fc": (block.mlp.c_fc.in_features, block.mlp.c_fc.out_features),
                "proj": (block.mlp.c_proj.in_features, block.mlp.c_proj.out_features),
            }
            for target in dict.fromkeys(targets):  # drop duplicates, keep order
                in_features, out_features = layers[target]
                lora = LoRA(in_features, out_features, rank, alpha)
                names += _attach(block, f"lora_{target}", lora, f"{prefix}.{index}")
    return names


def add_parallel_adapter(model: nn.Module, rank: int = 5, blocks: int = 5, tower: str = "vision") -> list[str]:
    """Add the ZO-FC adapter: a rank-``rank`` bottleneck parallel to the MLP in the first ``blocks`` blocks.

    Args:
        model: An ``open_clip.model.CLIP``; modified in place.
        rank: Bottleneck size; default 5 (ZO-FC).
        blocks: Number of leading residual blocks to adapt; default 5 (ZO-FC).
        tower: ``"vision"`` or ``"language"``; default ``"vision"``.

    Returns:
        Full names of the new trainable parameters, e.g.
        ``visual.transformer.resblocks.0.parallel_adapter.down.weight``.
    """
    prefix, tower_blocks = _tower_blocks(model, tower)
    if not 1 <= blocks <= len(tower_blocks):
        raise ValueError(f"blocks must be in [1, {len(tower_blocks)}], got {blocks}")
    names = []
    for index in range(blocks):
        block = _adapt_block(tower_blocks[index])
        names += _attach(block, "parallel_adapter", BottleneckAdapter(block.attn.embed_dim, rank),
                         f"{prefix}.{index}")
    return names


def freeze_backbone(model: nn.Module, trainable_names: Iterable[str]) -> None:
    """Make exactly the named parameters trainable and freeze all others.

    Args:
        model: The model to modify in place.
        trainable_names: Full parameter names (as in ``model.named_parameters()``) to keep trainable.

    Raises:
        ValueError: If a name is not a parameter of ``model``.
    """
    trainable = set(trainable_names)
    parameters = dict(model.named_parameters())
    unknown = trainable - parameters.keys()
    if unknown:
        raise ValueError(f"not parameters of the model: {sorted(unknown)[:5]}")
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in trainable)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Return the names of the parameters of ``model`` that require gradients."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


class LinearHead(nn.Module):
    """A linear classifier that grows by a block of rows per task, as used by ZO-FC.

    Args:
        in_features: Feature size.
        num_classes: Initial number of classes; default 0 (grow with :meth:`expand`).
        bias: Whether the head has a bias; default ``True``.
    """

    def __init__(self, in_features: int, num_classes: int = 0, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 0:
            raise ValueError(f"need in_features >= 1 and num_classes >= 0, got {in_features}, {num_classes}")
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0)) if bias else None
        if num_classes:
            self.expand(num_classes)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def expand(self, num_new_classes: int) -> None:
        """Append ``num_new_classes`` freshly initialised rows, keeping the old ones.

        The parameters are replaced by new (larger) tensors, so an optimizer holding the old ones must be
        rebuilt after calling this.

        Args:
            num_new_classes: Number of classes to add (positive).
        """
        if num_new_classes < 1:
            raise ValueError(f"num_new_classes must be positive, got {num_new_classes}")
        new_weight = torch.empty(num_new_classes, self.in_features, device=self.weight.device,
                                 dtype=self.weight.dtype)
        # Same initialisation as nn.Linear.
        nn.init.kaiming_uniform_(new_weight, a=math.sqrt(5))
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_weight]))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            new_bias = torch.empty(num_new_classes, device=self.bias.device, dtype=self.bias.dtype).uniform_(
                -bound, bound)
            self.bias = nn.Parameter(torch.cat([self.bias.detach(), new_bias]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)
