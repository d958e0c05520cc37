"""The ZO state a step's commit overwrites, kept until the step is over so that a failure can be undone.

The ZO commit writes optimizer state one tensor at a time; an exception half-way would
leave some entries updated and the rest not. Before an entry is first written, the journal
keeps a copy of it (or notes that it did not exist yet); :meth:`Journal.rollback` puts
everything back bit for bit. ZO parameters need no entry: their restore strategy already
knows the way back to theta. FO groups keep no journal: their commit
(:class:`~hybridzo.first_order.FirstOrderStep`) checks and allocates everything before its
first write, and interrupts wait for its end.

The copies cost, until the step ends, one copy of each ZO state buffer the step writes.
"""

from __future__ import annotations

from typing import Any, Dict, MutableMapping, Optional

from torch import Tensor

__all__ = ["Journal"]


class Journal:
    """Copies of ZO state entries before a commit writes them.

    Args:
        state: the optimizer's ``state`` mapping (parameter -> dict of state entries).
    """

    def __init__(self, state: MutableMapping[Tensor, Dict[str, Any]]) -> None:
        self._state = state
        self._entries: Dict[Tensor, Optional[Dict[str, Any]]] = {}

    def keep_state(self, param: Tensor) -> None:
        """Copy the state entry of ``param`` (or note its absence) before it is first written."""
        if param in self._entries:
            return
        if param not in self._state:
            self._entries[param] = None
            return
        self._entries[param] = {
            key: value.clone() if isinstance(value, Tensor) else value
            for key, value in self._state[param].items()
        }

    def rollback(self) -> None:
        """Put every kept entry back; state entries and buffers created since are removed."""
        for param, saved_entry in self._entries.items():
            if saved_entry is None:
                self._state.pop(param, None)
                continue
            entry = self._state[param]
            for key in [k for k in entry if k not in saved_entry]:
                del entry[key]
            for key, value in saved_entry.items():
                current = entry.get(key)
                if isinstance(value, Tensor) and isinstance(current, Tensor) and current.shape == value.shape:
                    current.copy_(value)  # in place: whoever holds the buffer sees it restored
                else:
                    entry[key] = value
        self.discard()

    def discard(self) -> None:
        """Forget the copies (the commit succeeded)."""
        self._entries.clear()
