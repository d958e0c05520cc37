"""Counting the aten operations a step dispatches: the proxy for GPU kernel launches.

Every aten operation that reaches the Python dispatcher is one kernel launch on a GPU (a ``torch._foreach_*``
or fused operation is one launch, or a few, for a whole list of tensors). :class:`DispatchCounter` is a
``TorchDispatchMode`` that counts each operation it sees, except those run inside :meth:`DispatchCounter.uncounted`
(the benchmarks' forwards, so that a step's count is the optimizer's own work).

    >>> counter = DispatchCounter()
    >>> with counter:
    ...     optimizer.step(closure)  # the closure runs its forward inside counter.uncounted()
    >>> counter.total, counter.counts.most_common(3)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Dict, Iterator, Optional

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by operation.

    Operations dispatched inside :meth:`uncounted` blocks are run but not counted. Views, in-place and
    out-of-place operations count alike; metadata queries that do not reach the dispatcher (``.shape``,
    ``.numel()``) and generator calls (``manual_seed``) do not count.

    Attributes:
        counts: Operation name (e.g. ``"aten.add_.Tensor"``) -> times dispatched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self._uncounted = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        if not self._uncounted:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Operations counted so far."""
        return sum(self.counts.values())

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Run the block's operations without counting them (nests)."""
        self._uncounted += 1
        try:
            yield
        finally:
            self._uncounted -= 1
