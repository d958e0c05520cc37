"""Run-to-run reproducibility of the continual-learning example.

A run of ``clip_cl.py`` is a deterministic function of its flags, the checkpoint, the library versions and the
numerics of the machine it runs on. This module pins what can be pinned in-process and records the rest:

* **Seeds.** :func:`seed_global_generators` seeds Python's ``random``, NumPy's legacy generator and torch's
  global generator. In the example only the MoE routing noise draws from torch's global generator (hybridzo
  replays it for every closure call of a step); data order has its own ``torch.Generator`` per task, ZO
  directions hybridzo's private generators, and augmentation a seed per image (``data.augmentation_seed``), so
  no stream shifts when another one draws more or less (another adapter, more experts, ``--num-workers``).
* **Threads and kernels.** :func:`pinned_numerics` fixes torch's intra-op thread count for the duration of a run
  and asks torch for deterministic algorithms (CPU kernels used here are already deterministic for a fixed
  thread count; the flag makes a future nondeterministic kernel raise instead of drifting silently). On CUDA it
  also turns cuDNN autotuning off and sets ``CUBLAS_WORKSPACE_CONFIG`` when unset.
* **What cannot be pinned from inside the process**: the kernels' instruction-set paths. ATen's vectorised
  kernels, oneDNN and MKL pick code paths for the CPU they run on, and different paths round differently,
  so the same command can part from its recorded losses on another CPU model. :func:`numerics_fingerprint`
  records thread count, ATen CPU capability, CPU model and the environment variables that change these choices,
  so two results can be compared only when their fingerprints agree (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR`` and
  ``ONEDNN_MAX_CPU_ISA`` set before the process starts force a common path across machines).

The measured size of each effect is in benchmarks/README.md ("Reproducibility"). Run as a script, it prints this
machine's fingerprint, or compares it with the one a run recorded::

    python examples/reproducibility.py --threads 1                            # or: python -m examples.reproducibility
    python examples/reproducibility.py --threads 1 --compare runs/cpu-fo/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

NUMERICS_ENV_VARS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_DYNAMIC",
    "OMP_DYNAMIC",
    "CUBLAS_WORKSPACE_CONFIG",
)
"""Environment variables that change which kernels run or how many threads they use."""

CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` that makes cuBLAS deterministic (needed by deterministic algorithms on CUDA)."""


def seed_global_generators(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's global CPU/CUDA generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def pinned_numerics(threads: int | None, device: str, deterministic: bool = True) -> Iterator[None]:
    """Fix the thread count and ask for deterministic kernels while the block runs; restore both afterwards.

    Deterministic mode's filling of uninitialised memory is turned off for the block: it changes no result here and
    costs a pass over every new tensor.

    Args:
        threads: torch intra-op threads for the run; ``None`` keeps torch's choice (which depends on the
            machine's core count, so results then depend on the machine).
        device: The run's device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        deterministic: Call ``torch.use_deterministic_algorithms(True)`` (warn-only on CUDA, where some
            kernels have no deterministic version); default ``True``.
    """
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    cudnn_before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        on_cuda = device.startswith("cuda")
        if on_cuda:
            # Must be set before cuBLAS initialises; the example has done no CUDA work at this point.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=on_cuda)
        # Deterministic mode would also fill every new tensor with NaN (a guard against reading uninitialised
        # memory, which the example does not do), which costs a pass over memory on each allocation.
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn_before


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics_fingerprint() -> dict[str, Any]:
    """What besides flags, checkpoint and versions decides a run's rounding: call inside :func:`pinned_numerics`.

    Returns:
        ``torch_threads``, ``deterministic_algorithms``, ``cpu_capability`` (ATen's kernel path: ``"AVX512"``,
        ``"AVX2"``, ``"DEFAULT"``), ``cpu_model``, ``mkldnn`` (oneDNN available) and the values of
        :data:`NUMERICS_ENV_VARS` that are set.
    """
    return {
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "env": {name: os.environ[name] for name in NUMERICS_ENV_VARS if name in os.environ},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Print :func:`numerics_fingerprint` under ``--threads``; with ``--compare``, the keys that differ from a run's."""
    parser = argparse.ArgumentParser(prog="python examples/reproducibility.py",
                                     description="Print this machine's numerics fingerprint (what decides a run's "
                                                 "rounding besides its flags, checkpoint and versions).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads to fingerprint with (the run's --threads; default: torch's choice)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a run's results.json, relative to the current directory: print where its recorded "
                             "numerics differ from this machine's")
    args = parser.parse_args(argv)
    with pinned_numerics(args.threads, "cpu"):
        fingerprint = numerics_fingerprint()
    print(json.dumps(fingerprint, indent=1))
    if args.compare is not None:
        recorded = json.loads(args.compare.read_text())["numerics"]
        differences = {key: (recorded.get(key), fingerprint.get(key)) for key in sorted({*recorded, *fingerprint})
                       if recorded.get(key) != fingerprint.get(key)}
        for key, (then, now) in differences.items():
            print(f"differs: {key}: recorded {then!r}, here {now!r}")
        print("same numerics: the run's losses can be compared bit for bit" if not differences else
              "different numerics: expect the run's losses to part after a few steps")
    return fingerprint


if __name__ == "__main__":
    main()
