"""Resuming an interrupted class-incremental run from its last finished task.

A run of :func:`~examples.protocol.run_class_incremental` builds a fresh optimizer, data order and schedule for
every task from the run's seed and the task's index, so the state carried from one task to the next is small:
the trainable parameters (adapters, a linear head), the classifier's own state (head rows, frozen prompt
features), the record so far, and the global random generators (the MoE router's noise and the head's
initialisation draw from them). :class:`TaskCheckpoint` writes that state after every task and reads it back, so
a resumed run continues with exactly the numbers an uninterrupted run would have used: its losses and accuracy
matrix match bit for bit (same flags, versions, thread count and kernel path, as for any repeat of a run).

The file is written to a temporary name and renamed over the previous one, so an interrupt while writing leaves
the previous checkpoint as it was.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that this run cannot continue from (another run's, another format, other parameters)."""


def _capture_generators() -> dict[str, Any]:
    generators = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        generators["cuda"] = torch.cuda.get_rng_state_all()
    return generators


def _restore_generators(generators: Mapping[str, Any]) -> None:
    torch.set_rng_state(generators["torch"])
    np.random.set_state(generators["numpy"])
    random.setstate(generators["python"])
    if "cuda" in generators:
        torch.cuda.set_rng_state_all(generators["cuda"])


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path`` and rename it to ``path``: ``path`` holds the old
    content or the new, never part of it, whatever interrupts the write (the temporary file is removed)."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{key}={saved.get(key)!r} (this run: {current.get(key)!r})" for key in keys
            if saved.get(key) != current.get(key)]


class TaskCheckpoint:
    """The state of a class-incremental run after its last finished task, in one file.

    Args:
        path: The checkpoint file (``examples/clip_cl.py`` writes ``<out>/checkpoint.pt``).
        identity: What makes two runs the same run (flags that change what is computed, the weights'
            checksum); a checkpoint written under another identity is refused on :meth:`load`.
        numerics: What decides the rounding besides the identity (versions, thread count, kernel path);
            a checkpoint written under others is resumed with a warning, since the run will then not repeat
            an uninterrupted one bit for bit; default ``{}``.
    """

    def __init__(self, path: Path | str, identity: Mapping[str, Any], numerics: Mapping[str, Any] | None = None
                 ) -> None:
        self.path = Path(path)
        self.identity = dict(identity)
        self.numerics = dict(numerics or {})

    def save(self, tasks_done: int, model: nn.Module, classifier: Any, record: Mapping[str, Any]) -> None:
        """Write the state after ``tasks_done`` tasks, replacing the previous checkpoint only once complete.

        Args:
            tasks_done: Number of tasks finished (training and evaluation).
            model: The model; its parameters that require grad are saved.
            classifier: A classifier of :mod:`examples.protocol` (its ``state_dict()`` is saved).
            record: The run's record so far (a :class:`~examples.protocol.ContinualRecord` as a dict).
        """
        state = {
            "format": FORMAT_VERSION,
            "identity": self.identity,
            "numerics": self.numerics,
            "tasks_done": tasks_done,
            "trainable": {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad},
            "classifier": classifier.state_dict(),
            "record": dict(record),
            "generators": _capture_generators(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, lambda partial: torch.save(state, partial))

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` if there is no checkpoint.

        Raises:
            CheckpointError: The checkpoint cannot be read, was written by another format or by a run with
                another identity.
        """
        if not self.path.is_file():
            return None
        try:
            # Generator states hold NumPy arrays and Python tuples: not loadable with weights_only.
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"Invalid checkpoint {self.path}: cannot be read ({error}); delete it to start "
                                  "over") from error
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"Invalid checkpoint {self.path}: not a format-{FORMAT_VERSION} task checkpoint")
        differences = _differences(state["identity"], self.identity)
        if differences:
            raise CheckpointError(f"Invalid checkpoint {self.path}: it was written by a run with "
                                  f"{', '.join(differences)}; pass the same flags, or delete it to start over")
        other_numerics = _differences(state.get("numerics", {}), self.numerics)
        if other_numerics:
            warnings.warn(f"{self.path} was written under other numerics: {', '.join(other_numerics)}; the run "
                          "goes on, but will not repeat an uninterrupted run bit for bit", stacklevel=2)
        return state

    def discard(self) -> None:
        """Delete the checkpoint (the run finished)."""
        self.path.unlink(missing_ok=True)


def restore(state: Mapping[str, Any], model: nn.Module, classifier: Any) -> None:
    """Put ``state``'s trainable parameters into ``model``, its classifier state into ``classifier``, and its
    generator states into the global generators.

    Raises:
        CheckpointError: The model's trainable parameters are not those the checkpoint holds (names or shapes).
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(trainable) != set(saved):
        missing, unexpected = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        raise CheckpointError(f"Invalid checkpoint: trainable parameters differ (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for name, parameter in trainable.items():
        if parameter.shape != saved[name].shape:
            raise CheckpointError(f"Invalid checkpoint: {name} has shape {tuple(saved[name].shape)}, "
                                  f"the model's is {tuple(parameter.shape)}")
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(saved[name])
    classifier.load_state_dict(state["classifier"])
    _restore_generators(state["generators"])
