"""The optional peers the benchmarks set hybridzo against: PyPI ``mezo`` and torchzero's MeZO module.

Neither is a dependency or an extra (``.ci/run`` installs them, pinned, for the run with peers). A script
that is asked for a peer's rows while the peer is missing leaves those rows out and says so in its report
(:func:`leave_out_missing`); the tests that need a peer are marked ``peers`` and skip, saying why.

Both peers run MeZO's ZO-SGD here: central differences, one query, in-place perturbation (+eps z, -2eps z,
+eps z, so parameters come back up to rounding, not bit for bit) and a plain SGD update along the same z.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from benchmarks import _measure

if TYPE_CHECKING:  # imported by the peers' steps only: memory.py's parent process does not load torch
    import torch


@dataclass(frozen=True)
class Peer:
    """An optional reference package.

    Attributes:
        name: How reports name it.
        modules: What must import for it to run (torchzero imports scipy without declaring it).
        install: The pinned install command of ``.ci/run``.
    """

    name: str
    modules: Tuple[str, ...]
    install: str

    def installed(self, is_installed: Optional[Callable[[str], bool]] = None) -> bool:
        """Whether every module of the peer can be imported (``is_installed``: default :func:`_measure.installed`)."""
        is_installed = is_installed or _measure.installed
        return all(is_installed(module) for module in self.modules)

    def load(self) -> None:
        """Import the peer's modules now (so that a memory baseline read afterwards includes their code)."""
        import importlib

        for module in self.modules:
            importlib.import_module(module)


PEERS: Dict[str, Peer] = {
    "mezo": Peer("PyPI `mezo`", ("mezo",), "pip install --no-deps mezo==0.0.1"),
    "torchzero": Peer("torchzero", ("torchzero", "scipy"), "pip install torchzero==0.4.4 scipy==1.17.1"),
}
"""The peers by key; benchmark scripts map each configuration that needs one to its key."""


def leave_out_missing(names: Sequence[str], peer_of: Mapping[str, str],
                      is_installed: Optional[Callable[[str], bool]] = None) -> Tuple[List[str], List[str]]:
    """``names`` without the configurations whose peer is missing, and one note per missing peer.

    Args:
        names: Configurations asked for, in order.
        peer_of: Configuration -> key of :data:`PEERS` for the configurations that need a peer.
        is_installed: Whether a module imports (default :func:`_measure.installed`; tests pass a stand-in).
    """
    missing = {key for key, peer in PEERS.items() if not peer.installed(is_installed)}
    kept = [name for name in names if peer_of.get(name) not in missing]
    notes = []
    for key in sorted(missing):
        left = [name for name in names if peer_of.get(name) == key]
        if left:
            peer = PEERS[key]
            notes.append(f"{', '.join(f'`{name}`' for name in left)} left out: {peer.name} is not installed "
                         f"(`{peer.install}`)")
    return kept, notes


def versions() -> Dict[str, str]:
    """Installed versions of the peers, for report headers."""
    import importlib.metadata

    found = {}
    for key in PEERS:
        try:
            found[key] = importlib.metadata.version(key)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# -------------------------------------------------------------------------------------------- PyPI mezo


def mezo_package_step(model: torch.nn.Module, params: Sequence[torch.Tensor], lr: float,
                      eps: float) -> Callable[[Callable[[], torch.Tensor]], Any]:
    """One ``mezo.update`` (PyPI ``mezo``) per call, on ``params``, with a fresh seed each time.

    ``mezo.update`` perturbs each parameter in place with ``param.data.add_(eps * randn)`` (one direction
    tensor and its scaled copy at a time) and regenerates z for the update, four sweeps in all.
    """
    import mezo

    seeds = iter(range(1, 1 << 30))
    selected = list(params)
    return lambda closure: mezo.update(model, None, lambda _model, _inputs: closure(), epsilon=eps,
                                       learning_rate=lr, random_seed=next(seeds),
                                       learnable_parameters=lambda _model: iter(selected))


# -------------------------------------------------------------------------------------------- torchzero


@contextlib.contextmanager
def _trainable(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """``requires_grad=True`` on every parameter inside the block, the flags as they were afterwards.

    torchzero optimises only parameters that require grad; the benchmarks' full-model rows ZO-train a
    backbone that is frozen for the other rows of the same process.
    """
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class TorchzeroMeZO:
    """torchzero's MeZO module set up as MeZO's ZO-SGD: central differences, q=1, plain SGD.

    ``tz.Optimizer(params, tz.m.MeZO(h=eps, n_samples=1, formula="central2", distribution=distribution,
    return_approx_loss=True), tz.m.LR(lr))``. A step perturbs in place by +h z, -2h z, +h z (two forwards
    with ``backward=False``, restored by subtraction), then subtracts ``lr * (f+ - f-) / (2 h) * z``:
    MeZO's update with the same eps and lr as the other rows. What it does its own way, kept as it is:

    * ``distribution`` defaults to ``"rademacher"`` in torchzero; the Gaussian rows pass ``"gaussian"``
      (MeZO's). Directions come from a fresh ``torch.Generator`` seeded with the step number, regenerated
      4 times per step, each time for *all* parameters at once (a list of tensors as large as the
      parameters), and Rademacher entries are drawn as Bernoulli samples.
    * The estimate is stored in ``p.grad`` (one more copy of the parameters, kept after the step) and
      cloned into the update; :meth:`zero_grad` drops it.
    * ``return_approx_loss=True`` makes ``step`` return f(theta + h z); torchzero's default spends a third
      forward at theta for the returned loss, which the other rows do not.
    * Only parameters with ``requires_grad=True`` are optimised, so frozen ones are unfrozen for the step.

    Args:
        params: Parameters to ZO-train (frozen ones included).
        lr: Learning rate.
        eps: Perturbation scale (torchzero's ``h``).
        distribution: ``"gaussian"`` or ``"rademacher"``.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, eps: float,
                 distribution: str = "gaussian") -> None:
        import torchzero as tz

        self.params = list(params)
        with _trainable(self.params):
            self.optimizer = tz.Optimizer(
                self.params,
                tz.m.MeZO(h=eps, n_samples=1, formula="central2", distribution=distribution,
                          return_approx_loss=True),
                tz.m.LR(lr),
            )

    def step(self, closure: Callable[[], torch.Tensor]) -> Any:
        """One torchzero step; its closure convention (``closure(backward=True)``) wraps ``closure``.

        MeZO evaluates the closure with ``backward=False`` only, so the wrapper never runs a backward.
        """
        def torchzero_closure(backward: bool = True) -> torch.Tensor:
            return closure()

        with _trainable(self.params):
            return self.optimizer.step(torchzero_closure)

    def zero_grad(self) -> None:
        """Drop the estimate torchzero leaves in ``p.grad``."""
        for p in self.params:
            p.grad = None
