"""The workload the memory and speed benchmarks measure: one training step of CLIP with adapters.

The model is an open_clip CLIP with random weights (no download; memory and time do not depend on the
values) and the adapters of ``examples/adapters.py`` in every block of both towers, backbone frozen, as in
the papers (MoE-Adapters4CL with ZO on a branch or on layers). The loss is the one the continual-learning
example trains with: CLIP logits of a batch of images against the text prompts of the current task's
classes, re-encoded at every step (so the language tower's adapters are trained, and perturbed by ZO
probes), and cross-entropy over those classes.

Token ids are random: a text tower processes its full context length whatever the tokens, so memory and
time are those of real prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.adapters import add_lora, add_moe_adapters, freeze_backbone
from examples.branches import BRANCH_PATTERNS, BRANCH_TOWERS
from hybridzo import GroupRule, HybridZOOptimizer, build_param_groups

MICRO_CLIP_CONFIG: Dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 4},
}
"""``--model micro``: a 4-block CLIP for seconds-long smoke runs of the benchmarks."""

MODEL_CHOICES_HELP = ("open_clip model name built with random weights (e.g. ViT-B-16), 'tiny' (the examples' "
                      "8-block CPU CLIP) or 'micro' (4 blocks, for smoke tests)")


def build_clip(name: str) -> nn.Module:
    """A CLIP with random weights: an open_clip model name, ``"tiny"`` or ``"micro"``."""
    import open_clip

    if name == "tiny":
        from examples.tiny_clip import build_tiny_clip

        return build_tiny_clip()
    if name == "micro":
        config = MICRO_CLIP_CONFIG
        return open_clip.CLIP(embed_dim=config["embed_dim"],
                              vision_cfg=open_clip.CLIPVisionCfg(**config["vision_cfg"]),
                              text_cfg=open_clip.CLIPTextCfg(**config["text_cfg"]))
    return open_clip.create_model(name, pretrained=None)


def tower_depth(model: nn.Module) -> int:
    """Number of residual blocks of the vision tower (both towers of the models used here agree)."""
    return len(model.visual.transformer.resblocks)


@dataclass
class Workload:
    """A CLIP with adapters, a fixed batch and the loss closure of the continual-learning example.

    Attributes:
        model: The CLIP, in training mode, with only the adapters trainable.
        images: ``(batch, 3, H, W)`` images.
        tokens: ``(prompts, context_length)`` token ids, one prompt per class of the task.
        labels: ``(batch,)`` targets among the prompts.
    """

    model: nn.Module
    images: Tensor
    tokens: Tensor
    labels: Tensor

    def loss(self) -> Tensor:
        """Cross-entropy of the CLIP logits of the images over the prompts (encoded afresh)."""
        model = self.model
        image_features = model.encode_image(self.images, normalize=True)
        text_features = model.encode_text(self.tokens, normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        return F.cross_entropy(logits, self.labels)

    def adapter_parameters(self) -> List[Tensor]:
        """The trainable (adapter) parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.adapter_parameters())


def build_workload(model_name: str, adapter: str, batch: int, prompts: int, device: str, seed: int = 0) -> Workload:
    """Build the model with ``adapter`` ("moe" or "lora") units, a random batch and labels.

    MoE: 2 experts, top-2, bottleneck 64 (MoE-Adapters4CL, the examples' default); LoRA: rank 8 on the
    attention in- and out-projections of every block.
    """
    torch.manual_seed(seed)
    model = build_clip(model_name)
    if adapter == "moe":
        names = add_moe_adapters(model, num_experts=2, top_k=2, bottleneck=64)
    elif adapter == "lora":
        names = add_lora(model, rank=8)
    else:
        raise ValueError(f"adapter must be 'moe' or 'lora', got {adapter!r}")
    freeze_backbone(model, names)
    model.to(device).train()
    image_size = model.visual.image_size
    height, width = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    tokens = torch.randint(1, model.vocab_size, (prompts, model.context_length), generator=generator).to(device)
    labels = torch.randint(0, prompts, (batch,), generator=generator).to(device)
    return Workload(model, images, tokens, labels)


# ------------------------------------------------------------------------------------------- placements


@dataclass(frozen=True)
class ZOSettings:
    """How ZO groups estimate and select (step-wide settings of :class:`HybridZOOptimizer`)."""

    estimator: str = "central"
    conservative: bool = True
    sign: Optional[str] = None
    queries: int = 1
    eps: float = 1e-3
    restore: str = "exact"
    distribution: str = "gaussian"


CONSERVATIVE = ZOSettings()
"""The branch/layer paper's default ZO: ZO-SGD-Cons (central, q=1; keep the best of theta, theta -/+ Delta)."""
NAIVE = ZOSettings(conservative=False)
"""ZO* / ZO-SGD / MeZO: central, q=1, update without checking the loss."""
FORWARD_ESTIMATOR = ZOSettings(estimator="forward", conservative=False)
"""One-sided differences reusing the loss at theta."""


@dataclass(frozen=True)
class Placement:
    """Which trainable parameters are ZO: the adapters of ``branch`` in ``layers`` (the rest FO).

    ``layers`` is a hybridzo layer pattern; ``"prefix:half"`` / ``"suffix:half"`` stand for half the
    tower's blocks (the paper's "Prefix (six)" / "Suffix (six)" on 12-block ViT-B/16).
    """

    branch: str
    layers: str = "all"
    settings: ZOSettings = field(default=CONSERVATIVE)

    def resolved_layers(self, depth: int) -> str:
        """``layers`` with ``half`` replaced by ``depth // 2``."""
        return self.layers.replace("half", str(depth // 2))


def param_groups(workload: Workload, placement: Placement, fo_rule: str = "adamw", fo_lr: float = 1e-5,
                 zo_lr: float = 1e-6) -> List[Dict[str, Any]]:
    """ZO groups for the placement's towers and layers (SGD rule) and one FO group for the rest."""
    layers = placement.resolved_layers(tower_depth(workload.model))
    zo_options = {"mode": "zo", "lr": zo_lr, "rule": "sgd", "eps": placement.settings.eps,
                  "sign": placement.settings.sign, "restore": placement.settings.restore,
                  "distribution": placement.settings.distribution}
    rules = [GroupRule(branch=BRANCH_PATTERNS[tower], layers=layers, options=zo_options, name=f"{tower}-zo")
             for tower in BRANCH_TOWERS[placement.branch]]
    return build_param_groups(workload.model.named_parameters(), rules,
                              default={"name": "fo", "mode": "fo", "lr": fo_lr, "rule": fo_rule})


def make_optimizer(workload: Workload, placement: Placement, seed: int = 0) -> HybridZOOptimizer:
    """The hybrid optimizer of a placement (AdamW for FO groups, as MoE-Adapters4CL)."""
    return _optimizer(param_groups(workload, placement), placement.settings, seed)


def _optimizer(groups: List[Dict[str, Any]], settings: ZOSettings, seed: int) -> HybridZOOptimizer:
    return HybridZOOptimizer(groups, estimator=settings.estimator, conservative=settings.conservative,
                             queries=settings.queries, seed=seed)


def limit_optimizer(workload: Workload, placement: Placement, seed: int = 0) -> Optional[HybridZOOptimizer]:
    """The placement's step with its ZO part frozen: what no ZO placement there can undercut in memory.

    Sets ``requires_grad=False`` on the parameters of the placement's ZO groups and returns
    :func:`make_optimizer`'s optimizer over the remaining (FO) groups, unchanged; ``None`` when the
    placement has no FO group (then the step is a forward that autograd does not record).
    """
    groups = param_groups(workload, placement)
    for group in groups:
        if group["mode"] == "zo":
            for p in group["params"]:
                p.requires_grad_(False)
    fo_groups = [group for group in groups if group["mode"] == "fo"]
    if not fo_groups:
        return None
    return _optimizer(fo_groups, placement.settings, seed)


def full_model_zo_optimizer(workload: Workload, settings: ZOSettings = NAIVE, seed: int = 0) -> HybridZOOptimizer:
    """Every parameter of the model, backbone included, in one ZO group (MeZO's full fine-tuning)."""
    return HybridZOOptimizer(list(workload.model.parameters()), lr=1e-9, eps=settings.eps,
                             estimator=settings.estimator, conservative=settings.conservative,
                             restore=settings.restore, distribution=settings.distribution, seed=seed)


def group_sizes(optimizer: torch.optim.Optimizer) -> Tuple[int, int]:
    """(ZO scalars, FO scalars) held by a :class:`HybridZOOptimizer`."""
    counts = {"zo": 0, "fo": 0}
    for group in optimizer.param_groups:
        counts[group["mode"]] += sum(p.numel() for p in group["params"])
    return counts["zo"], counts["fo"]


def torch_step(optimizer: torch.optim.Optimizer, closure: Callable[[], Tensor]) -> Tensor:
    """A plain ``torch.optim`` training step: zero_grad, forward, backward, step."""
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    optimizer.step()
    return loss.detach()
