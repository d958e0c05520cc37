"""Class-incremental protocol for CLIP continual learning with hybrid ZO/FO optimisation.

Three parts:

* **Metrics** over an accuracy matrix (pure numpy functions): Last, Avg (MoE-Adapters4CL) and average
  forgetting.
* **Optimizer placement**: which trainable parameters are optimised zeroth-order (ZO) and which first-order
  (FO), built with :func:`hybridzo.build_param_groups` from a :class:`OptimConfig` ("ZO on the vision/language/both
  branches, on these layers, with these eps").
* **The training loop** :func:`run_class_incremental`: for every task, train on its classes, then evaluate on
  the test images of every class seen so far (no task identity at test time).

Protocol choices (after MoE-Adapters4CL, Yu et al., CVPR 2024, which both papers build on):

* The training loss is cross-entropy over the *current* task's classes only; evaluation scores every seen
  class. This holds for ZO-FC's linear head too (:class:`LinearHeadClassifier`): without replay, a loss
  over all seen rows would only push the old classes' rows down, so the old rows get no gradient and are
  kept as learnt, the usual choice in adapter-based class-incremental learning.
* Prompt features are re-encoded through the current adapters at every evaluation (MoE-Adapters4CL), unless
  :class:`TextPromptClassifier` is built with ``freeze_seen_prompts``: then each class's text feature is taken
  at the end of its task and kept, as the linear head keeps its old rows (the CPU presets do this, because the
  tiny CLIP's prompt features of new classes are learnt, not known in advance).
* A fresh optimizer and a fresh warm-up + cosine learning-rate schedule are built for every task (the
  schedule restarts per task, as in MoE-Adapters4CL, whose AdamW optimizer is also rebuilt per task). This
  also lets the ZO-FC linear head grow by new rows between tasks.
* The per-task seed of the optimizer (its ZO directions) and of the data order is ``seed + task index``; each
  training image's augmentation is seeded by ``(seed, task, epoch, image)`` (``data.augmentation_seed``), and
  torch's global generator is left to the MoE routing noise.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from hybridzo import GroupRule, HybridZOOptimizer, build_param_groups, describe_groups

from .adapters import LinearHead
from .branches import BRANCH_PATTERNS, BRANCH_TOWERS, ZO_BRANCHES
from .data import ImageDataset, indices_of_classes
from .resume import CheckpointError, TaskCheckpoint, restore

PROMPT_TEMPLATE = "a bad photo of a {}."
"""Text prompt of every class, as in MoE-Adapters4CL."""


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def _as_vector(seen_acc: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(seen_acc, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"seen_acc must be a non-empty 1-D sequence, got shape {values.shape}")
    return values


def last_accuracy(seen_acc: Sequence[float] | np.ndarray) -> float:
    """Accuracy on all seen classes after the last task ("Last").

    Args:
        seen_acc: ``seen_acc[t]`` = accuracy (%) on the test images of every class seen up to task ``t``,
            measured after training task ``t``.
    """
    return float(_as_vector(seen_acc)[-1])


def average_accuracy(seen_acc: Sequence[float] | np.ndarray) -> float:
    """Mean over tasks of the accuracy on all classes seen so far ("Avg" in MoE-Adapters4CL).

    Args:
        seen_acc: ``seen_acc[t]`` = accuracy (%) on every class seen up to task ``t``, after task ``t``.
    """
    return float(_as_vector(seen_acc).mean())


def forgetting(acc: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Average forgetting: how far each old task's accuracy ends below its best earlier value.

    ``mean over j < T-1 of (max_{t in [j, T-2]} acc[t][j] - acc[T-1][j])``, in accuracy points. Entries
    above the diagonal (tasks not yet seen; NaN by convention) are never read.

    Args:
        acc: ``(T, T)`` matrix; ``acc[t][j]`` = accuracy (%) on task ``j``'s test classes after training
            task ``t`` (``j <= t``).

    Returns:
        The average forgetting; 0.0 for a single task.
    """
    matrix = np.asarray(acc, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"acc must be a non-empty square matrix, got shape {matrix.shape}")
    num_tasks = matrix.shape[0]
    if num_tasks == 1:
        return 0.0
    drops = [matrix[j : num_tasks - 1, j].max() - matrix[num_tasks - 1, j] for j in range(num_tasks - 1)]
    return float(np.mean(drops))


# --------------------------------------------------------------------------------------------------------------
# ZO / FO placement
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """Which parameters are optimised how, and the hyperparameters of both kinds of group.

    Attributes:
        lr: Learning rate of the FO groups; default 1e-3 (MoE-Adapters4CL).
        fo_rule: Update rule of the FO groups, ``"adamw"`` (default) or ``"sgd"``.
        weight_decay: Decoupled weight decay of every group; default 0.0.
        zo_branch: Towers whose trainable parameters are optimised ZO: ``"none"`` (all FO, the baseline;
            default), ``"dual"``, ``"vision"`` or ``"language"``.
        zo_layers: Layers of those towers that are ZO (numbered from 1): ``"all"`` (default),
            ``"hop-odd"``, ``"hop-even"``, ``"prefix:K"`` or ``"suffix:K"``; the other layers stay FO.
        zo_lr: Learning rate of the ZO groups; default ``None`` means ``lr``.
        zo_rule: Update rule applied to the ZO gradient estimate, ``"sgd"`` (default) or ``"adamw"``.
        eps_vision: ZO perturbation scale of the vision tower; default 1e-3.
        eps_language: ZO perturbation scale of the language tower; default 1e-3.
        sign: Sign normalisation of the ZO estimate: ``None`` (default), ``"coordinate"`` (MoZO's
            element-wise sign) or ``"scalar"``.
        queries: Random directions averaged per ZO step; default 1.
        estimator: ``"central"`` (default; two probes per direction) or ``"forward"`` finite differences.
        candidates: Candidate directions tried per step by the conservative update; default 1.
        conservative: Keep the lowest-loss point among the current parameters and the candidate updates
            (the conservative ZO of ZeroFlow, the branch/layer paper's default); default ``False``.
        zo_restore: How ZO groups return to their values after probes: ``"exact"`` (default; from a
            copy of the ZO parameters) or ``"inplace"`` (no copy, up to rounding).
    """

    lr: float = 1e-3
    fo_rule: str = "adamw"
    weight_decay: float = 0.0
    zo_branch: str = "none"
    zo_layers: str = "all"
    zo_lr: float | None = None
    zo_rule: str = "sgd"
    eps_vision: float = 1e-3
    eps_language: float = 1e-3
    sign: str | None = None
    queries: int = 1
    estimator: str = "central"
    candidates: int = 1
    conservative: bool = False
    zo_restore: str = "exact"

    def __post_init__(self) -> None:
        if self.zo_branch not in ZO_BRANCHES:
            raise ValueError(f"zo_branch must be one of {ZO_BRANCHES}, got {self.zo_branch!r}")

    @property
    def zo_towers(self) -> tuple[str, ...]:
        """The towers (``"vision"``, ``"language"``) that hold ZO groups."""
        return BRANCH_TOWERS[self.zo_branch]


def placement_rules(config: OptimConfig) -> list[GroupRule]:
    """Return one ZO :class:`~hybridzo.GroupRule` per ZO tower of ``config`` (none for ``"none"``).

    Each rule selects the trainable parameters of its tower (``^visual\\.`` or ``^transformer\\.``) in
    ``config.zo_layers``, with that tower's eps and the shared ZO learning rate, rule and sign.

    Args:
        config: The placement and hyperparameters.
    """
    eps_of = {"vision": config.eps_vision, "language": config.eps_language}
    zo_lr = config.lr if config.zo_lr is None else config.zo_lr
    return [
        GroupRule(
            branch=BRANCH_PATTERNS[tower],
            layers=config.zo_layers,
            options={"mode": "zo", "lr": zo_lr, "rule": config.zo_rule, "eps": eps_of[tower], "sign": config.sign,
                     "restore": config.zo_restore},
            name=f"{tower}-zo",
        )
        for tower in config.zo_towers
    ]


def build_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], config: OptimConfig) -> list[dict]:
    """Split trainable parameters into ZO groups (per :func:`placement_rules`) and one FO group.

    Args:
        named_parameters: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()`` plus a head's
            parameters; frozen tensors are left out (but still count towards a tower's layer count).
        config: The placement and hyperparameters.

    Returns:
        Param-group dicts for :class:`~hybridzo.HybridZOOptimizer`: ``"vision-zo"`` and/or
        ``"language-zo"`` as selected, then ``"fo"`` holding every other trainable parameter (omitted
        when empty).

    Raises:
        ValueError: If a ZO rule selects no trainable parameter (e.g. ``zo_branch="language"`` with an
            adapter on the vision tower only).
    """
    fo_options = {"name": "fo", "mode": "fo", "lr": config.lr, "rule": config.fo_rule}
    return build_param_groups(named_parameters, placement_rules(config), default=fo_options)


def make_optimizer(groups: list[dict], config: OptimConfig, seed: int) -> HybridZOOptimizer:
    """Build the hybrid optimizer; the step-wide ZO settings are optimizer defaults shared by all groups.

    Args:
        groups: Param groups from :func:`build_groups`.
        config: The hyperparameters.
        seed: Seed of the ZO perturbation directions.
    """
    return HybridZOOptimizer(
        groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
        queries=config.queries,
        estimator=config.estimator,
        candidates=config.candidates,
        conservative=config.conservative,
        seed=seed,
    )


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier of MoE-Adapters4CL's ``cosine_lr``: linear warm-up, then cosine decay to 0.

    Args:
        warmup_steps: Steps of linear warm-up (``(step + 1) / warmup_steps``).
        total_steps: Steps in the whole schedule (one task here).

    Returns:
        A function ``step -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``.
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))

    return multiplier


# --------------------------------------------------------------------------------------------------------------
# Classifiers: CLIP text prompts, or the ZO-FC linear head
# --------------------------------------------------------------------------------------------------------------


class TextPromptClassifier:
    """CLIP's zero-shot classifier: logits = logit_scale * cos(image features, prompt features).

    The text features of the current task's classes are recomputed on every training call, because the
    language tower's adapters may be trained (and are perturbed by ZO probes).

    With ``freeze_seen_prompts``, the text feature of each class is computed once, at the end of its task,
    and kept: a class's prompt feature is its classifier row, and this keeps the rows of old classes as
    learnt, the choice the ZO-FC linear head makes (:class:`LinearHeadClassifier`). Without it (MoE-Adapters4CL's
    protocol), every evaluation re-encodes all prompts through the current adapters, so training a shared
    language adapter on a new task also moves every old class's row.

    Args:
        model: An open_clip CLIP.
        tokenizer: Maps a list of strings to a token tensor.
        classnames: Class names indexed by label.
        template: Prompt with one ``{}`` for the class name; default :data:`PROMPT_TEMPLATE`.
        freeze_seen_prompts: Keep each class's text feature from the end of its task; default ``False``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        classnames: Sequence[str],
        template: str = PROMPT_TEMPLATE,
        freeze_seen_prompts: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.classnames = list(classnames)
        self.template = template
        self.freeze_seen_prompts = freeze_seen_prompts
        self._frozen_features: dict[int, torch.Tensor] = {}

    def begin_task(self, task_classes: Sequence[int]) -> None:
        """Nothing to prepare: every class already has its prompt."""

    @torch.no_grad()
    def end_task(self, task_classes: Sequence[int]) -> None:
        """With ``freeze_seen_prompts``, encode the task's prompts once more (eval mode) and keep them."""
        if not self.freeze_seen_prompts:
            return
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        features = self._encode(list(task_classes), device)
        self.model.train(was_training)
        self._frozen_features.update(zip(task_classes, features))

    def state_dict(self) -> dict[str, Any]:
        """What the classifier carries between tasks besides the model: the frozen prompt features."""
        return {"frozen_features": {c: f.cpu() for c, f in self._frozen_features.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (features go to the model's device)."""
        device = next(self.model.parameters()).device
        self._frozen_features = {c: f.to(device) for c, f in state["frozen_features"].items()}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The classifier has no parameters besides the model's."""
        return iter(())

    def _encode(self, classes: Sequence[int], device: torch.device) -> torch.Tensor:
        prompts = [self.template.format(self.classnames[c]) for c in classes]
        return self.model.encode_text(self.tokenizer(prompts).to(device), normalize=True)

    def _text_features(self, classes: Sequence[int], device: torch.device) -> torch.Tensor:
        fresh = [c for c in classes if c not in self._frozen_features]
        if len(fresh) == len(classes):
            return self._encode(classes, device)
        feature_of = dict(self._frozen_features)
        if fresh:
            feature_of.update(zip(fresh, self._encode(fresh, device)))
        return torch.stack([feature_of[c].to(device) for c in classes])

    def _logits(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image_features = self.model.encode_image(images, normalize=True)
        return self.model.logit_scale.exp() * image_features @ text_features.T

    def train_logits(self, images: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        """Logits ``(N, len(classes))`` of ``images`` over ``classes``; prompts not frozen are encoded afresh."""
        return self._logits(images, self._text_features(classes, images.device))

    def scorer(self, classes: Sequence[int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """For evaluation: encode the prompts of ``classes`` once and return ``images -> logits``."""
        text_features = self._text_features(classes, device)
        return lambda images: self._logits(images, text_features)


class LinearHeadClassifier:
    """ZO-FC's classifier: a linear head on the image features, grown by one block of rows per task.

    logits = logit_scale * head(normalised image features). Row ``i`` of the head belongs to the ``i``-th
    class seen, so logits over any set of seen classes are a selection of rows.

    Args:
        model: An open_clip CLIP (only its image tower is used).
        feature_dim: Size of the image embedding (``model.visual.output_dim``).
    """

    def __init__(self, model: nn.Module, feature_dim: int) -> None:
        self.model = model
        self.head = LinearHead(feature_dim)
        self._row_of: dict[int, int] = {}

    def begin_task(self, task_classes: Sequence[int]) -> None:
        """Add a freshly initialised row for every new class of the task."""
        new_classes = [c for c in task_classes if c not in self._row_of]
        if new_classes:
            reference = next(self.model.parameters())
            self.head.to(reference.device)
            self.head.expand(len(new_classes))
            for c in new_classes:
                self._row_of[c] = len(self._row_of)

    def end_task(self, task_classes: Sequence[int]) -> None:
        """Nothing to do: the rows of past classes get no gradient from later tasks' losses."""

    def state_dict(self) -> dict[str, Any]:
        """What the classifier carries between tasks besides the model: the head and each class's row."""
        bias = self.head.bias
        return {"weight": self.head.weight.detach().cpu(), "bias": None if bias is None else bias.detach().cpu(),
                "row_of": dict(self._row_of)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the head goes to the model's device)."""
        device = next(self.model.parameters()).device
        if (state["bias"] is None) != (self.head.bias is None):
            raise CheckpointError("Invalid checkpoint: the head's bias is "
                                  f"{'absent' if state['bias'] is None else 'present'} in the checkpoint")
        self.head.weight = nn.Parameter(state["weight"].to(device))
        if state["bias"] is not None:
            self.head.bias = nn.Parameter(state["bias"].to(device))
        self._row_of = dict(state["row_of"])

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The head's parameters, named ``head.weight`` / ``head.bias`` (outside both CLIP towers)."""
        return self.head.named_parameters(prefix="head")

    def _logits(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images, normalize=True)
        # CLIP's (frozen) temperature puts the unit-norm features on the scale of its own logits, so that a
        # freshly initialised head learns within a single epoch.
        return self.model.logit_scale.exp() * self.head(features).index_select(1, rows)

    def _rows(self, classes: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([self._row_of[c] for c in classes], device=device)

    def train_logits(self, images: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        """Logits ``(N, len(classes))`` of ``images`` over ``classes`` (rows of the head)."""
        return self._logits(images, self._rows(classes, images.device))

    def scorer(self, classes: Sequence[int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """For evaluation: ``images -> logits`` over ``classes``."""
        rows = self._rows(classes, device)
        return lambda images: self._logits(images, rows)


Classifier = Union[TextPromptClassifier, LinearHeadClassifier]


# --------------------------------------------------------------------------------------------------------------
# The class-incremental loop
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How each task is trained and evaluated.

    Attributes:
        epochs: Passes over each task's training images; default 1 (MoE-Adapters4CL's class-incremental
            setting).
        batch_size: Training batch size; default 128.
        warmup: Linear warm-up steps of each task's cosine schedule; default 30.
        max_steps_per_task: Stop a task after this many steps (the schedule is sized to it); default
            ``None`` (train all ``epochs``).
        eval_batch_size: Evaluation batch size; default 256.
        num_workers: DataLoader worker processes; default 0 (load in the main process).
        device: Torch device to train on; default ``"cpu"``.
        seed: Base seed of the data order and the ZO directions (task ``t`` uses ``seed + t``); default 0.
        progress: Whether to show a tqdm bar per task; default ``True``.
    """

    epochs: int = 1
    batch_size: int = 128
    warmup: int = 30
    max_steps_per_task: int | None = None
    eval_batch_size: int = 256
    num_workers: int = 0
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass
class ContinualRecord:
    """What :func:`run_class_incremental` measured.

    Attributes:
        acc_matrix: ``(T, T)``; ``acc_matrix[t, j]`` = accuracy (%) on task ``j``'s test classes after task
            ``t``, NaN for ``j > t``.
        seen_acc: Accuracy (%) on every seen class's test images after each task.
        losses: Training loss of every step, all tasks in sequence.
        task_start_steps: Index into ``losses`` of each task's first step.
        steps: Optimizer steps taken.
        forward_passes: Closure calls (forward passes) made by the optimizer during training.
        backward_passes: Backward passes made by the optimizer (one per step with an FO group).
        zo_choices: With candidate selection (``conservative`` or ``candidates > 1``), how often each
            candidate was kept, e.g. ``{"theta": 3, "theta-delta[0]": 30, "theta+delta[0]": 7}``.
        wall_time_s: Wall-clock time of the whole run (training and evaluation), seconds.
        train_time_s: Wall-clock time spent in training steps, seconds.
        peak_memory_mib: Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else the
            process's peak resident set size (``getrusage``; includes the data held in memory).
        peak_memory_kind: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
        groups: :func:`hybridzo.describe_groups` table of the first task's param groups.
        resumed_at_task: Index of the task each resumption of the run started from (empty if it ran
            through); wall time is summed over the processes, peak memory is the largest of theirs.
    """

    acc_matrix: np.ndarray
    seen_acc: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    task_start_steps: list[int] = field(default_factory=list)
    steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    zo_choices: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    peak_memory_mib: float = 0.0
    peak_memory_kind: str = ""
    groups: str = ""
    resumed_at_task: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN entries of the accuracy matrix become ``None``."""
        out = asdict(self)
        out["acc_matrix"] = [[None if math.isnan(v) else float(v) for v in row] for row in self.acc_matrix]
        return out

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ContinualRecord:
        """The record :meth:`to_dict` wrote (``None`` entries of the accuracy matrix become NaN)."""
        matrix = np.array([[math.nan if v is None else v for v in row] for row in fields["acc_matrix"]], dtype=float)
        return cls(**{**fields, "acc_matrix": matrix})


def _peak_memory(device: torch.device) -> tuple[float, str]:
    """This process's peak memory in MiB so far and its kind (see :class:`ContinualRecord`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return (peak / 2**20 if sys.platform == "darwin" else peak / 2**10), "cpu_peak_rss"


@torch.no_grad()
def evaluate(
    classifier: Classifier,
    dataset: ImageDataset,
    classes: Sequence[int],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict every image of ``dataset`` among ``classes``.

    Args:
        classifier: The classifier to evaluate (its model is switched to eval mode).
        dataset: Test images, all labelled with members of ``classes``.
        classes: Candidate classes (class-incremental: every class seen so far).
        batch_size: Evaluation batch size.
        device: Device of the model.
        num_workers: DataLoader worker processes; default 0.

    Returns:
        ``(labels, predictions)``, two int arrays over the dataset.
    """
    classifier.model.eval()
    score = classifier.scorer(classes, device)
    class_tensor = torch.tensor(list(classes))
    labels, predictions = [], []
    for images, batch_labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        logits = score(images.to(device))
        predictions.append(class_tensor[logits.argmax(dim=1).cpu()])
        labels.append(batch_labels)
    return torch.cat(labels).numpy(), torch.cat(predictions).numpy()


def run_class_incremental(
    classifier: Classifier,
    tasks: Sequence[Sequence[int]],
    train_source: Any,
    test_source: Any,
    train_transform: Callable[[Any], torch.Tensor],
    eval_transform: Callable[[Any], torch.Tensor],
    optim_config: OptimConfig,
    train_config: TrainConfig,
    *,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    log: Callable[[str], None] = print,
    checkpoint: TaskCheckpoint | None = None,
    resume: bool = False,
) -> ContinualRecord:
    """Train ``classifier.model`` on ``tasks`` in sequence with :class:`~hybridzo.HybridZOOptimizer`.

    For task ``t``: build the param groups (ZO/FO per ``optim_config``) and a fresh optimizer and warm-up +
    cosine schedule; for each batch, call ``optimizer.step(closure)`` where the closure computes the
    cross-entropy over task ``t``'s classes (prompts re-encoded inside it) without calling backward; then
    evaluate on the test images of tasks ``0..t`` with logits over all their classes.

    Args:
        classifier: A :class:`TextPromptClassifier` or :class:`LinearHeadClassifier` around the model,
            already on ``train_config.device``, with exactly the parameters to train requiring grad.
        tasks: Class indices of each task.
        train_source: Training dataset (``LabeledImages`` / ``ImageFolderImages`` from ``data``).
        test_source: Test dataset, same kind.
        train_transform: PIL image -> tensor for training (augmentation included).
        eval_transform: PIL image -> tensor for evaluation.
        optim_config: ZO/FO placement and optimizer hyperparameters.
        train_config: Epochs, batch size, schedule, device, seed.
        max_train_per_class: Use at most this many training images per class; default ``None`` (all).
        max_test_per_class: Use at most this many test images per class; default ``None`` (all).
        log: Receives one line per task (group table, accuracies); default ``print``.
        checkpoint: Where to save the run's state after every task (see :mod:`examples.resume`); default
            ``None`` (not saved).
        resume: Continue from ``checkpoint``'s saved state, if it holds one, instead of starting at the
            first task; default ``False``. The resumed run's losses and accuracy matrix are those of an
            uninterrupted run.

    Returns:
        The accuracy matrix, per-step losses, pass counts, time and peak memory.
    """
    device = torch.device(train_config.device)
    model = classifier.model
    num_tasks = len(tasks)
    record = ContinualRecord(acc_matrix=np.full((num_tasks, num_tasks), np.nan))
    first_task = 0
    saved = checkpoint.load() if checkpoint is not None and resume else None
    if saved is not None:
        if saved["record"]["acc_matrix"] and len(saved["record"]["acc_matrix"]) != num_tasks:
            raise CheckpointError(f"Invalid checkpoint {checkpoint.path}: it has {len(saved['record']['acc_matrix'])} "
                                  f"tasks, this run {num_tasks}")
        restore(saved, model, classifier)
        record = ContinualRecord.from_dict(saved["record"])
        first_task = saved["tasks_done"]
        record.resumed_at_task.append(first_task)
        log(f"resumed from {checkpoint.path}: {first_task} of {num_tasks} tasks done")
    earlier_wall_time_s = record.wall_time_s
    num_labels = max(len(train_source.classnames), 1 + max(max(task) for task in tasks))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_start = time.perf_counter()

    def measure_time_and_memory() -> None:
        record.wall_time_s = earlier_wall_time_s + time.perf_counter() - run_start
        peak_mib, record.peak_memory_kind = _peak_memory(device)
        record.peak_memory_mib = max(record.peak_memory_mib, peak_mib)

    for t, task_classes in enumerate(tasks):
        if t < first_task:
            continue
        classifier.begin_task(task_classes)
        named = [*model.named_parameters(), *classifier.named_parameters()]
        groups = build_groups(named, optim_config)
        if t == 0:
            record.groups = describe_groups(groups)
            log(f"param groups:\n{record.groups}")
        optimizer = make_optimizer(groups, optim_config, seed=train_config.seed + t)

        train_indices = indices_of_classes(train_source.labels, task_classes, per_class=max_train_per_class)
        train_images = ImageDataset(train_source, train_indices, train_transform,
                                    augmentation_key=(train_config.seed, t))
        loader = DataLoader(
            train_images,
            batch_size=train_config.batch_size,
            shuffle=True,
            num_workers=train_config.num_workers,
            generator=torch.Generator().manual_seed(train_config.seed + t),
        )
        total_steps = train_config.epochs * len(loader)
        if train_config.max_steps_per_task is not None:
            total_steps = min(total_steps, train_config.max_steps_per_task)
        scheduler = LambdaLR(optimizer, warmup_cosine(train_config.warmup, total_steps))
        # Targets are positions within the current task: the loss covers its classes only.
        target_of_label = torch.full((num_labels,), -1, dtype=torch.long)
        target_of_label[torch.tensor(task_classes)] = torch.arange(len(task_classes))

        record.task_start_steps.append(record.steps)
        model.train()
        bar = tqdm(total=total_steps, desc=f"task {t + 1}/{num_tasks}", disable=not train_config.progress)
        task_steps = 0
        train_start = time.perf_counter()
        epoch = 0
        while task_steps < total_steps:
            train_images.epoch = epoch
            epoch += 1
            for images, labels in loader:
                images, targets = images.to(device), target_of_label[labels].to(device)

                def closure() -> torch.Tensor:
                    record.forward_passes += 1
                    return F.cross_entropy(classifier.train_logits(images, task_classes), targets)

                loss = float(optimizer.step(closure))
                scheduler.step()
                step_info = optimizer.last_step_info
                record.losses.append(loss)
                record.steps += 1
                record.backward_passes += step_info["backwards"]
                if step_info["chosen"] is not None:
                    record.zo_choices[step_info["chosen"]] = record.zo_choices.get(step_info["chosen"], 0) + 1
                task_steps += 1
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                if task_steps == total_steps:
                    break
        bar.close()
        record.train_time_s += time.perf_counter() - train_start
        classifier.end_task(task_classes)

        seen_classes = [c for task in tasks[: t + 1] for c in task]
        test_indices = indices_of_classes(test_source.labels, seen_classes, per_class=max_test_per_class)
        labels, predictions = evaluate(
            classifier,
            ImageDataset(test_source, test_indices, eval_transform),
            seen_classes,
            train_config.eval_batch_size,
            device,
            train_config.num_workers,
        )
        correct = labels == predictions
        for j, earlier_classes in enumerate(tasks[: t + 1]):
            record.acc_matrix[t, j] = 100.0 * correct[np.isin(labels, earlier_classes)].mean()
        record.seen_acc.append(100.0 * float(correct.mean()))
        task_losses = record.losses[record.task_start_steps[-1] :]
        log(
            f"task {t + 1}/{num_tasks}: mean loss {np.mean(task_losses):.4f}, "
            f"accuracy on {len(seen_classes)} seen classes {record.seen_acc[-1]:.2f}%"
        )
        if checkpoint is not None:
            measure_time_and_memory()
            checkpoint.save(t + 1, model, classifier, record.to_dict())

    measure_time_and_memory()
    return record
