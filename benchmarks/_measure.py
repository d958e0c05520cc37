"""Measurement and reporting helpers shared by the benchmark scripts.

* Peak memory: on CPU, the process's resident set size read from ``/proc/self/status``, with the
  high-water mark (VmHWM) reset through ``/proc/self/clear_refs``; on CUDA,
  ``torch.cuda.max_memory_allocated``. :class:`PeakMemory` hides the difference.
* Fresh processes: :func:`run_child` runs a script's ``--child`` mode in a new interpreter
  (``python -m benchmarks.<script>`` from the repository root) and parses the JSON line it prints, so one
  measurement cannot inherit another's allocations.
* Reports: :func:`environment` (machine, versions, date, git commit, load) and :func:`markdown_table`.

Linux only for the CPU peak (``/proc``); the CUDA path works anywhere torch does.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import textwrap
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

MIB = 2**20
GIB = 2**30
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

CHILD_MALLOC_ENV = {
    # A fixed mmap threshold disables glibc's dynamic threshold, so every large tensor is mmapped and
    # unmapped when freed: RSS then follows the bytes torch holds, as max_memory_allocated does on CUDA,
    # instead of the heap's history.
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_ARENA_MAX": "2",
}
"""Environment of measurement subprocesses (see :func:`run_child`)."""


# ----------------------------------------------------------------------------------------------- memory


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def release_free_heap() -> None:
    """Hand memory that glibc's allocator keeps after ``free`` back to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Current and peak memory in bytes of this process (CPU) or of torch's CUDA allocator.

    Args:
        device: ``"cpu"`` for resident set size, or a CUDA device for allocated tensor bytes.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "cpu peak RSS"

    def current(self) -> int:
        """Bytes in use now: RSS on CPU, allocated tensor bytes on CUDA."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        """Start a new measurement window: the peak becomes the current value."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_heap()
            reset_peak_rss()

    def peak(self) -> int:
        """Highest value of :meth:`current` since the last :meth:`reset_peak`."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return status_kib("VmHWM") * 1024


def run_child(module: str, args: Sequence[str], timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """Run ``python -m module *args`` in a fresh interpreter and return the JSON object on its last line.

    The child runs in the repository root (so ``benchmarks`` and ``examples`` import as packages) with
    :data:`CHILD_MALLOC_ENV` on top of this process's environment.

    Raises:
        RuntimeError: the child failed; its stderr is included.
    """
    env = {**os.environ, **CHILD_MALLOC_ENV}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it): optional peers such as PyPI ``mezo``."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------------- time


def time_call(function: Callable[[], Any], device: Any = "cpu") -> float:
    """Wall-clock seconds of one call on ``device`` (CUDA work included: synchronised before and after)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


# ------------------------------------------------------------------------------------------ environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _git(*args: str, cwd: Path = REPO_ROOT) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_commit(checkout: Path) -> str:
    """The short commit of a checkout ('' where git cannot tell)."""
    return _git("rev-parse", "--short=12", "HEAD", cwd=checkout)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def environment(device: str = "cpu") -> Dict[str, Any]:
    """Machine, library versions, date, git commit and load, for the header of a results file."""
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:  # from the installed metadata: importing open_clip costs seconds
        versions["open_clip"] = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    import hybridzo

    from benchmarks._peers import versions as peer_versions  # here: _peers imports this module

    versions["hybridzo"] = hybridzo.__version__
    versions.update(peer_versions())
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    if torch.device(device).type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        memory = _memory_gib()
        machine = (f"CPU {_cpu_model()}, {os.cpu_count()} cores"
                   + (f", {memory:.0f} GiB RAM" if memory else "")
                   + f", torch threads {torch.get_num_threads()}")
    return {
        "machine": machine,
        "platform": platform.platform(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit,
        "load_average": load_average(),
    }


def environment_markdown(info: Mapping[str, Any], command: str, load_after: Optional[str] = None) -> str:
    """The standard header lines of a results file."""
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    load = f"load average {info['load_average']} at start"
    if load_after is not None:
        load += f", {load_after} at end"
    return "\n".join([
        f"- Command: `{command}`",
        f"- Machine: {info['machine']}; {info['platform']}",
        f"- Versions: {versions}",
        f"- Date: {info['date']}; git commit {info['git_commit']}",
        f"- Load (1/5/15 min, `uptime`): {load}",
    ])


def command_line(module: str, argv: Optional[Sequence[str]]) -> str:
    """How a script was invoked (``python -m <module> ...``, from the repository root), for the results header."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *arguments])


# ---------------------------------------------------------------------------------------------- figures


def figure(ncols: int = 1, size: Tuple[float, float] = (8.5, 4.5)) -> Tuple[Any, List[Any]]:
    """A matplotlib figure with ``ncols`` axes side by side, drawn off screen (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawing = Figure(figsize=size)
    FigureCanvasAgg(drawing)
    return drawing, [drawing.add_subplot(1, ncols, index + 1) for index in range(ncols)]


def palette(count: int) -> List[Tuple[float, ...]]:
    """``count`` distinguishable colours: matplotlib's tab10, or tab20 beyond ten."""
    from matplotlib import colormaps

    return list(colormaps["tab10" if count <= 10 else "tab20"].colors)[:count]


def title(drawing: Any, text: str, fontsize: float) -> None:
    """Set ``drawing``'s title, wrapped to the figure's width: a title naming many rows is wider than the figure."""
    # A character of matplotlib's default sans-serif is about 0.576 em wide on average.
    drawing.suptitle(textwrap.fill(text, int(drawing.get_figwidth() * 72 / (0.576 * fontsize))), fontsize=fontsize)


def save_figure(drawing: Any, path: Path) -> Path:
    """Write ``drawing`` as a PNG at 110 dpi, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    drawing.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- tables


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub markdown table; ``align`` has one ``l`` or ``r`` per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(numerator: float, denominator: float, digits: int = 2) -> str:
    """``numerator / denominator`` for a table cell, or ``n/a`` when the denominator is not positive."""
    return f"{numerator / denominator:.{digits}f}" if denominator > 0 else "n/a"


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def split_list(value: str) -> List[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]`` (for comma-separated command-line options)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def int_list(value: str) -> List[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    return [int(item) for item in split_list(value)]


def script_parser(module: str, doc: str, out: Optional[str] = None, **kwargs: Any) -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.<module>``: the first paragraph of ``doc`` as description and,
    given ``out``, ``--out`` (the markdown report; JSON and plots go beside it), default ``benchmarks/results/<out>``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}".rstrip("."),
                                     description=doc.split("\n\n")[0], **kwargs)
    if out is not None:
        parser.add_argument("--out", type=Path, default=RESULTS_DIR / out,
                            help=f"markdown report, with its JSON beside it (default: benchmarks/results/{out})")
    return parser
