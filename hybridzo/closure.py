"""Calling the user's closure several times within one step.

* Common random numbers: every call in a step starts from the RNG state the step
  started with (CPU and the CUDA devices in use), so dropout masks and noisy
  routing are identical in all probes and a difference of two losses measures the
  perturbation alone. Afterwards the RNG is left where a single call would have
  left it, as if the closure had run once.
* Backward inside the closure: a closure written in the usual torch style calls
  ``loss.backward()`` itself. During the first-order pass that call is observed (so
  the optimizer does not run backward twice); during forward-only probes it is
  made a no-op, since the probes run without autograd. Both apply to the thread
  running the step only: a backward in another thread runs as usual.
* Losses: each call's loss becomes a Python float (fp64), averaged over data-parallel
  ranks; a NaN or inf abandons the step.
* Failures: a call that raises (or returns something that is not a loss) on one rank
  still takes part in that call's all-reduce, flagged, and then re-raises; the other
  ranks raise :class:`~hybridzo.distributed.ClosureFailedOnAnotherRank` there, so every
  rank abandons the same step (see :mod:`hybridzo.distributed` for what that needs).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .distributed import RankAgreement

__all__ = [
    "CommonRandomNumbers",
    "BackwardCalls",
    "observe_backward",
    "skip_backward",
    "loss_value",
    "NonFiniteLoss",
    "ClosureRunner",
    "ConstantLossWatch",
]


class CommonRandomNumbers:
    """Replays the step's starting RNG state before every closure call.

    Args:
        devices: devices whose RNG the closure may draw from; the CPU generator is
            always included, CUDA generators only when CUDA is initialised.
    """

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._cpu_state = torch.get_rng_state()
        self._cuda_indices: List[int] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_indices = sorted(
                {d.index if d.index is not None else torch.cuda.current_device()
                 for d in devices if d.type == "cuda"}
            )
        self._cuda_states = [torch.cuda.get_rng_state(i) for i in self._cuda_indices]
        self._after_first: Optional[Tuple[Tensor, List[Tensor]]] = None
        self.calls = 0

    def _set(self, cpu_state: Tensor, cuda_states: List[Tensor]) -> None:
        torch.set_rng_state(cpu_state)
        for index, state in zip(self._cuda_indices, cuda_states):
            torch.cuda.set_rng_state(state, index)

    def before_call(self) -> None:
        if self.calls > 0:
            self._set(self._cpu_state, self._cuda_states)

    def after_call(self) -> None:
        if self.calls == 0:
            self._after_first = (
                torch.get_rng_state(),
                [torch.cuda.get_rng_state(i) for i in self._cuda_indices],
            )
        self.calls += 1

    def finish(self) -> None:
        """Leave the RNG as one closure call would have left it."""
        if self._after_first is not None:
            self._set(*self._after_first)


class BackwardCalls:
    """Counts the backward calls made while :func:`observe_backward` is active."""

    def __init__(self) -> None:
        self.count = 0


# torch.autograd.backward is replaced by a dispatcher while any thread is inside a step;
# what it does depends on the calling thread's mode, so other threads' backward is untouched.
_thread = threading.local()
_lock = threading.Lock()
_users = 0
_original_backward: Optional[Callable[..., Any]] = None


def _dispatching_backward(*args: Any, **kwargs: Any) -> Any:
    mode = getattr(_thread, "mode", None)
    if mode == "skip":
        return None
    if mode is not None:
        mode.count += 1
    assert _original_backward is not None
    return _original_backward(*args, **kwargs)


@contextlib.contextmanager
def _backward_mode(mode: Any) -> Iterator[None]:
    global _users, _original_backward
    with _lock:
        if _users == 0:
            # Tensor.backward looks up torch.autograd.backward at call time, so replacing the
            # module attribute covers loss.backward() and torch.autograd.backward(loss).
            _original_backward = torch.autograd.backward
            torch.autograd.backward = _dispatching_backward
        _users += 1
    previous = getattr(_thread, "mode", None)
    _thread.mode = mode
    try:
        yield
    finally:
        _thread.mode = previous
        with _lock:
            _users -= 1
            if _users == 0:
                if torch.autograd.backward is _dispatching_backward:
                    torch.autograd.backward = _original_backward
                _original_backward = None


@contextlib.contextmanager
def observe_backward() -> Iterator[BackwardCalls]:
    """Run backward as usual in this thread, counting the calls."""
    calls = BackwardCalls()
    with _backward_mode(calls):
        yield calls


@contextlib.contextmanager
def skip_backward() -> Iterator[None]:
    """Make backward a no-op in this thread (forward-only probes keep no graph to go back through)."""
    with _backward_mode("skip"):
        yield


def loss_value(loss: Any) -> float:
    """The closure's loss as a Python float (fp64, so fp16/bf16/fp32 losses compare exactly).

    Raises:
        TypeError: the closure returned None or something that is not a number.
        ValueError: the closure returned a tensor with more than one element.
    """
    if loss is None:
        raise TypeError(
            "closure returned None; it must return the loss as a scalar tensor "
            "(for example `return criterion(model(x), y)`)"
        )
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"closure must return a scalar loss; got a tensor of shape {tuple(loss.shape)}"
            )
        if loss.is_complex():
            raise TypeError("closure returned a complex loss; it must be real")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"closure must return a scalar loss tensor; got {type(loss).__name__}")


class NonFiniteLoss(Exception):
    """A forward returned NaN or inf; the step is abandoned."""

    def __init__(self, value: float, phase: str) -> None:
        super().__init__(phase)
        self.value = value
        self.phase = phase


class ClosureRunner:
    """Calls one step's closure: with common random numbers, counted, losses agreed over ranks.

    Attributes:
        forwards: closure calls so far.
        losses: the rank-mean loss of each call so far.
        dtype, device: of the first loss the closure returned (float32 on CPU for Python numbers),
            which is what ``step`` returns its loss as.
    """

    def __init__(self, closure: Callable[[], Any], rng: CommonRandomNumbers, ranks: RankAgreement) -> None:
        self.closure = closure
        self.rng = rng
        self.ranks = ranks
        self.forwards = 0
        self.losses: List[float] = []
        self.dtype: torch.dtype = torch.float32
        self.device = torch.device("cpu")

    def _call(self) -> Any:
        self.rng.before_call()
        # Inside an autocast region around step(), autocast caches low-precision copies of the
        # weights until the region exits; the weights change in place, so drop the stale copies.
        torch.clear_autocast_cache()
        raw = self.closure()
        self.rng.after_call()
        if self.forwards == 0 and isinstance(raw, Tensor) and raw.is_floating_point():
            self.dtype, self.device = raw.dtype, raw.device
        self.forwards += 1
        return raw

    def _agreed_call(self, phase: str) -> Tuple[Any, float]:
        """One call and its rank-mean loss; a failure here is reported to the other ranks, then raised."""
        try:
            raw = self._call()
            value = loss_value(raw)
        except BaseException:
            self.ranks.report_failure()
            raise
        value = self.ranks.mean(value, phase)
        self.losses.append(value)
        return raw, value

    def with_grad(self) -> Tuple[Any, float, int]:
        """One call with autograd on; returns ``(raw loss, rank-mean value, backward calls inside)``.

        Raises:
            ClosureFailedOnAnotherRank: the closure raised on another rank in this call.
        """
        with torch.enable_grad(), observe_backward() as backward_calls:
            raw, value = self._agreed_call("the first-order pass")
        return raw, value, backward_calls.count

    def probe(self, phase: str) -> float:
        """One forward-only call (backward inside it does nothing); its rank-mean loss.

        Raises:
            NonFiniteLoss: the loss is NaN or inf (on any rank).
            ClosureFailedOnAnotherRank: the closure raised on another rank in this call.
        """
        with torch.no_grad(), skip_backward():
            _, value = self._agreed_call(phase)
        if not math.isfinite(value):
            raise NonFiniteLoss(value, phase)
        return value

    def as_tensor(self, value: float) -> Tensor:
        """``value`` as what ``step`` returns: a 0-dim tensor with the first loss's dtype and device."""
        return torch.tensor(value, dtype=self.dtype, device=self.device)


class ConstantLossWatch:
    """Warns once when the closure's loss does not change under any probe for several consecutive steps.

    A closure that returns a loss computed outside it (so the ZO parameters never reach the
    forward) makes every projected difference exactly 0, and ZO groups then train nothing,
    silently. One flat step is no sign of that (a loss can be flat, or round to one value, for
    a step), so the warning waits for :attr:`STEPS` consecutive ZO steps in which every forward
    returned the same loss. A diagnostic, not optimizer state: it is not saved or loaded.
    """

    #: Consecutive steps with one loss value at every probe before the warning.
    STEPS = 3

    def __init__(self) -> None:
        self.constant_steps = 0
        self.warned = False

    def observe(self, losses: List[float]) -> None:
        """Count a completed ZO step with the rank-mean losses of its forwards."""
        constant = len(losses) > 1 and all(value == losses[0] for value in losses)
        self.constant_steps = self.constant_steps + 1 if constant else 0
        if self.constant_steps >= self.STEPS and not self.warned:
            self.warned = True
            warnings.warn(
                f"HybridZOOptimizer: the closure's loss was {losses[0]!r} at every probe of the last "
                f"{self.constant_steps} steps, so ZO param groups received no update. Most likely the "
                "closure's loss does not depend on the ZO parameters: compute the forward inside the closure "
                "(not a loss computed before step() and returned by it), and check that the ZO parameters "
                "are the ones the model uses and that eps is large enough to change the loss at its precision",
                UserWarning, stacklevel=5,  # past torch.no_grad and torch.optim's step wrappers
            )
