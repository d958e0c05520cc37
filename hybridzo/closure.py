"""Calling the user's closure several times within one step.

* Common random numbers: every call in a step starts from the RNG state the step
  started with (CPU and the CUDA devices in use), so dropout masks and noisy
  routing are identical in all probes and a difference of two losses measures the
  perturbation alone. Afterwards the RNG is left where a single call would have
  left it, as if the closure had run once.
* Backward inside the closure: a closure written in the usual torch style calls
  ``loss.backward()`` itself. During the first-order pass that call is observed (so
  the optimizer does not run backward twice); during forward-only probes it is
  made a no-op, since the probes run without autograd.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CommonRandomNumbers", "BackwardCalls", "observe_backward", "skip_backward", "loss_value"]


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


@contextlib.contextmanager
def _replace_autograd_backward(replacement: Callable[..., Any]) -> Iterator[None]:
    # Tensor.backward looks up torch.autograd.backward at call time, so replacing the
    # module attribute covers both loss.backward() and torch.autograd.backward(loss).
    original = torch.autograd.backward
    torch.autograd.backward = replacement
    try:
        yield
    finally:
        torch.autograd.backward = original


@contextlib.contextmanager
def observe_backward() -> Iterator[BackwardCalls]:
    """Run backward as usual, counting the calls."""
    calls = BackwardCalls()
    original = torch.autograd.backward

    def counting_backward(*args: Any, **kwargs: Any) -> Any:
        calls.count += 1
        return original(*args, **kwargs)

    with _replace_autograd_backward(counting_backward):
        yield calls


@contextlib.contextmanager
def skip_backward() -> Iterator[None]:
    """Make backward a no-op (forward-only probes keep no graph to go back through)."""

    def no_backward(*args: Any, **kwargs: Any) -> None:
        return None

    with _replace_autograd_backward(no_backward):
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
