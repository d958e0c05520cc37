"""Every ```python and ```bash block of README.md and of the docs pages (docs/*.md) runs as written, with small
stand-ins for what it leaves undefined.

Blocks are found anew on every run, so a block added to a page is tested without touching this file. A block
that cannot run here is marked on the page with ``<!-- not run: <reason> -->`` on the line before it (see
``readme_blocks.py``) and reported as skipped with that reason. Bash blocks run with ``bash -euo pipefail`` from the
repository root, ``python`` being this interpreter. A python block
runs in a fresh namespace that holds only stand-ins for the names it reads before defining them (``loader``,
``model``, ``groups``, ``x``, ...; see :class:`StandIns`), never modules: a block that uses ``torch`` without
importing it fails, as it would for a reader. The stand-ins are CPU-sized: a 32-16-10 MLP with a few batches, a
CLIP-shaped module for the group builder, a randomly initialised 2-layer BERT built from a config (no download) for
the Hugging Face block, a regression loader for Lightning, and a one-process gloo group for the DDP and FSDP2
blocks. A section whose blocks need other stand-ins gets a subclass in :data:`SECTION_STAND_INS`. The blocks that train
through a framework's Trainer (:data:`SLOW_SECTIONS`) are marked ``slow``.

Documented substitutions (:data:`CPU_SUBSTITUTIONS`): on a machine without CUDA, the AMP block's
``torch.autocast("cuda", ...)`` runs as ``torch.autocast("cpu", ...)``, so that bf16 autocast is exercised rather
than disabled with a warning.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import os
import re
import subprocess
import sys
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import torch
from readme_blocks import README, Block, MarkerError, all_blocks, readme_blocks
from torch import nn

from hybridzo import HybridZOOptimizer

REPO = README.parent


BLOCKS = all_blocks()
README_BLOCKS = [block for block in BLOCKS if block.page == "README.md"]
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]
BASH_BLOCKS = [block for block in BLOCKS if block.language == "bash"]

CPU_SUBSTITUTIONS: Dict[str, List[Tuple[str, str]]] = {
    # bf16 autocast on the CPU instead of CUDA autocast, which torch disables (with a warning) without a GPU.
    "docs/integrations.md:AMP#0": [('torch.autocast("cuda"', 'torch.autocast("cpu"')],
}
"""Block id -> (old, new) text replacements applied when CUDA is not available."""

SLOW_SECTIONS = {"PyTorch Lightning", "Hugging Face Trainer"}
"""Sections whose blocks run a framework's training loop end to end (seconds each): marked ``slow``."""



def free_names(code: str) -> Set[str]:
    """Names that ``code`` reads before binding them (builtins excluded): the stand-ins it needs.

    Top-level statements are taken in order. An assignment reads its value before it binds its targets, so
    ``model, opt = accelerator.prepare(model, opt)`` needs ``model`` and ``opt``; inside any other statement (a
    loop, a ``def``, a ``with``) every name it binds counts as bound for the whole statement.
    """
    free: Set[str] = set()
    bound: Set[str] = set(dir(builtins))
    for statement in ast.parse(code).body:
        assignment = isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        targets = statement.targets if isinstance(statement, ast.Assign) else (
            [statement.target] if assignment else [])
        top_level_stores = {id(node) for target in targets for node in ast.walk(target)}
        reads: Set[str] = set()
        binds: Set[str] = set()
        for node in ast.walk(statement):
            if isinstance(node, ast.Name):
                top_level_target = id(node) in top_level_stores
                if isinstance(node.ctx, ast.Load) or (top_level_target and isinstance(statement, ast.AugAssign)):
                    reads.add(node.id)  # `total += x` reads total first
                if not isinstance(node.ctx, ast.Load) and not top_level_target:
                    binds.add(node.id)
            elif isinstance(node, ast.arg):
                binds.add(node.arg)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                binds.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                binds.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        free |= reads - bound - binds
        bound |= binds | {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}
    return free


# ------------------------------------------------------------------------------------------------ stand-ins

FEATURES, CLASSES, BATCH = 32, 10, 8


def clip_shaped() -> nn.Module:
    """Parameters named like open_clip's: ``visual.transformer.resblocks.N.*``, ``transformer.resblocks.N.*``."""

    def blocks() -> nn.Module:
        holder = nn.Module()
        holder.resblocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
        return holder

    model = nn.Module()
    model.visual = nn.Module()
    model.visual.transformer = blocks()
    model.transformer = blocks()
    model.logit_scale = nn.Parameter(torch.zeros(()))
    return model


class StandIns:
    """What the README's blocks use without defining it, each built on first use (so only what a block needs)."""

    @cached_property
    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    @cached_property
    def batches(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        return [(torch.randn(BATCH, FEATURES, generator=generator),
                 torch.randint(0, CLASSES, (BATCH,), generator=generator)) for _ in range(3)]

    @cached_property
    def loader(self) -> torch.utils.data.DataLoader:
        x = torch.cat([x for x, _ in self.batches])
        y = torch.cat([y for _, y in self.batches])
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)

    @cached_property
    def x(self) -> torch.Tensor:
        return self.batches[0][0]

    @cached_property
    def y(self) -> torch.Tensor:
        return self.batches[0][1]

    @cached_property
    def x_shard(self) -> torch.Tensor:  # this rank's part of the batch; the only rank here
        return self.x

    @cached_property
    def y_shard(self) -> torch.Tensor:
        return self.y

    @cached_property
    def micro_batches(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.x.chunk(2), self.y.chunk(2)))

    @cached_property
    def criterion(self):
        return nn.functional.cross_entropy

    @cached_property
    def groups(self) -> List[dict]:
        return [{"params": list(self.model[0].parameters()), "mode": "zo", "eps": 1e-3},
                {"params": list(self.model[2].parameters()), "mode": "fo", "rule": "adamw"}]

    @cached_property
    def opt(self) -> HybridZOOptimizer:
        return HybridZOOptimizer(self.groups, lr=1e-3, seed=0)

    @cached_property
    def ddp(self) -> nn.Module:
        """The model under DistributedDataParallel (in the section's process group), ZO parameters frozen."""
        for group in self.opt.param_groups:
            if group["mode"] == "zo":
                for p in group["params"]:
                    p.requires_grad_(False)
        return nn.parallel.DistributedDataParallel(self.model)


class ClipShapedStandIns(StandIns):
    """The group builder selects by open_clip parameter names."""

    @cached_property
    def model(self) -> nn.Module:
        return clip_shaped()


class DistributedStandIns(StandIns):
    """The DDP blocks run in a one-process gloo group (world size 1: the same calls, nothing to agree with)."""

    def __init__(self) -> None:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)


class Blocks(nn.Module):
    """A model with ``blocks`` to shard one by one, as the FSDP2 block expects."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class FSDPStandIns(DistributedStandIns):
    """The FSDP2 blocks shard a two-block model over a one-process gloo group; the part of the batch is all of it."""

    @cached_property
    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return Blocks()

    @cached_property
    def opt(self) -> HybridZOOptimizer:
        return HybridZOOptimizer(self.model.parameters(), lr=1e-6, seed=0)

    @cached_property
    def x_part(self) -> torch.Tensor:
        return self.x

    @cached_property
    def y_part(self) -> torch.Tensor:
        return self.y


class LightningStandIns(StandIns):
    """The Lightning block's regressor maps 16 features to one output."""

    @cached_property
    def loader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4 * BATCH, 16, generator=generator)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()),
                                           batch_size=BATCH)


class HuggingFaceStandIns(StandIns):
    """A randomly initialised 2-layer BERT classifier built from a config (no download) and token-id examples."""

    @cached_property
    def model(self) -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=2)
        return BertForSequenceClassification(config)

    @cached_property
    def train_dataset(self) -> List[dict]:
        generator = torch.Generator().manual_seed(0)
        return [{"input_ids": torch.randint(1, 64, (8,), generator=generator),
                 "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2} for i in range(32)]


SECTION_STAND_INS = {
    "Groups from parameter names": ClipShapedStandIns,
    "Data parallel (DDP)": DistributedStandIns,
    "Gradient accumulation": DistributedStandIns,
    "Sharded parameters (FSDP2)": FSDPStandIns,
    "PyTorch Lightning": LightningStandIns,
    "Hugging Face Trainer": HuggingFaceStandIns,
}
"""Section (of any page) -> the stand-ins its blocks run with (default: :class:`StandIns`)."""


# -------------------------------------------------------------------------------------------------- tests


def runnable_code(block: Block) -> str:
    code = block.code
    if not torch.cuda.is_available():
        for old, new in CPU_SUBSTITUTIONS.get(block.id, []):
            assert old in code, f"substitution {old!r} no longer matches README block {block.id}"
            code = code.replace(old, new)
    return code


@pytest.fixture
def clean_frameworks():
    """Blocks may set up process-wide state (a process group, accelerate's singletons): drop it afterwards."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if sys.modules.get("accelerate") is not None:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_the_pages_have_their_code_blocks():
    sections = {block.section for block in PYTHON_BLOCKS if block.not_run is None}
    assert len(PYTHON_BLOCKS) >= 12
    assert {"Quick start", "Groups from parameter names", "Data parallel (DDP)", "Gradient accumulation",
            "Sharded parameters (FSDP2)", "PyTorch Lightning", "Hugging Face Trainer", "accelerate", "AMP",
            "Checkpoints"} <= sections
    assert any(block.section == "Quick start" and block.language == "python" for block in README_BLOCKS)
    assert set(CPU_SUBSTITUTIONS) <= {block.id for block in PYTHON_BLOCKS}
    # Every block that does not run says why, and only python and bash blocks are code.
    assert all(block.not_run.strip() for block in BLOCKS if block.not_run is not None)
    assert {block.language for block in BLOCKS} <= {"python", "bash", "text", "bibtex"}


def block_param(block: Block):
    marks = [pytest.mark.slow] if block.section in SLOW_SECTIONS or block.language == "bash" else []
    if block.not_run is not None:
        marks.append(pytest.mark.skip(reason=f"{block.page}:{block.line} is marked 'not run: {block.not_run}'"))
    return pytest.param(block, id=f"{block.id}({block.line})", marks=marks)


FRAMEWORKS = {"lightning": "integrations", "transformers": "integrations", "accelerate": "integrations"}
"""Packages a block may import -> the extra that installs them; a block importing a missing one skips."""


def missing_frameworks(code: str) -> List[str]:
    """The packages of :data:`FRAMEWORKS` that ``code`` imports (also through ``hybridzo.integrations.X``) and that
    are not installed."""
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    needed = {name.split(".")[0] for name in imported} | {
        name.split(".")[2] for name in imported if name.startswith("hybridzo.integrations.")}
    return sorted(package for package in needed & set(FRAMEWORKS) if importlib.util.find_spec(package) is None)


@pytest.mark.parametrize("block", [block_param(block) for block in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_frameworks):
    code = runnable_code(block)
    missing = missing_frameworks(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install -e \".[{FRAMEWORKS[missing[0]]}]\"")
    stand_ins = SECTION_STAND_INS.get(block.section, StandIns)()
    namespace = {name: getattr(stand_ins, name) for name in sorted(free_names(code)) if hasattr(stand_ins, name)}
    namespace["__name__"] = "readme"
    monkeypatch.chdir(tmp_path)  # blocks may write (Lightning logs, the Trainer's output_dir, checkpoints)
    exec(compile(code, f"{block.page}:{block.line}", "exec"), namespace)  # noqa: S102 - the page's own code


@pytest.mark.parametrize("block", [block_param(block) for block in BASH_BLOCKS])
def test_bash_block_runs(block: Block):
    """From the repository root, with ``python`` this interpreter (as after the README's install commands)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{block.page}:{block.line}\n" + done.stdout[-2000:] + done.stderr[-3000:]


def test_blocks_needing_a_missing_framework_are_found(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightning" else real(name, *a))
    code = "import torch\nfrom hybridzo.integrations.lightning import HybridZOMixin\nimport lightning.pytorch as pl\n"
    assert missing_frameworks(code) == ["lightning"]
    assert missing_frameworks("import torch\n") == []


def test_not_run_markers_are_checked():
    text = "## S\n\n<!-- not run: needs a GPU -->\n```python\nx = 1\n```\n\n```bash\necho hi\n```\n"
    first, second = readme_blocks(text, page="page.md")
    assert (first.not_run, second.not_run) == ("needs a GPU", None)
    assert first.id == "page.md:S#0"
    for broken in ("<!-- not run: needs a GPU -->\nsome text\n```python\nx = 1\n```\n",  # not before a block
                   "<!-- not run -->\n```python\nx = 1\n```\n",                              # no reason
                   "```python\nx = 1\n```\n<!-- not run: at the end -->\n"):
        with pytest.raises(MarkerError):
            readme_blocks(broken, page="page.md")
    # A marker inside a block is text, and an indented block (in a list item) loses its indentation.
    (inside,) = readme_blocks("- item\n\n  ```text\n  <!-- not run: x -->\n  ```\n", page="page.md")
    assert inside.code == "<!-- not run: x -->\n" and inside.not_run is None


def test_a_broken_block_fails():
    """The runner reports what a reader would meet: a name used before it is defined, a failing call."""
    stand_ins = StandIns()
    for code, error in (("loss = model(x).sum()\nprint(torch.__version__)\n", NameError),
                        ("opt.step(lambda: criterion(model(x), y), 'extra')\n", TypeError)):
        namespace = {name: getattr(stand_ins, name) for name in free_names(code) if hasattr(stand_ins, name)}
        with pytest.raises(error):
            exec(compile(code, "broken", "exec"), namespace)  # noqa: S102


def test_readme_links_work_on_a_package_index():
    """The README is the package's long description: links into the repository or the page would break there."""
    links = re.findall(r"\]\(([^)]+)\)", README.read_text())
    assert [link for link in links if not link.startswith(("https://", "http://"))] == []


def test_ci_runs_the_readme_test_command():
    tests = [block for block in README_BLOCKS if block.section == "Tests" and block.language == "bash"]
    commands = [line.split("#")[0].strip() for line in tests[0].code.splitlines() if line.strip()]
    assert commands[0] == 'pip install -e ".[examples,test]"'
    assert commands[1] == "python -m pytest -q"
    assert len(commands) == 2
    ci = (REPO / ".ci" / "run").read_text()
    assert 'readme_commands=$(python3 tests/readme_blocks.py Tests bash)' in ci  # the block above, verbatim
    assert 'bash -euo pipefail -c "$readme_commands"' in ci


def test_readme_is_a_landing_page():
    """At most 160 lines; the sections CI and readers rely on; the quick start's first command is the example."""
    text = README.read_text()
    assert len(text.splitlines()) <= 160
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    for heading in ("Install", "Quick start", "Main group keys", "Which setting for which job", "Examples",
                    "Documentation", "Tests", "Layout"):
        assert heading in headings, heading
    first = next(block for block in README_BLOCKS if block.section == "Quick start")
    assert first.language == "bash" and first.code.strip() == "python examples/quickstart.py"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    assert "mkdocs serve" in text and "mkdocs build --strict" in text
    # Every measured row of the settings table cites its results file, and the file exists.
    table = text.split("## Which setting for which job", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"`(\w+\.md)`", table)
    assert len(cited) >= 5 and all((REPO / "benchmarks" / "results" / name).is_file() for name in cited)


def test_readme_layout_and_docs_paths_exist():
    text = README.read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in re.findall(r"`([\w/]+(?:\.\w+)?/?)`", layout):
        if "/" in path or "." in path:
            assert (REPO / path).exists() or (REPO / "hybridzo" / path).exists(), path
    for page in re.findall(r"\b(docs/[\w-]+\.md)\b", text):
        assert (REPO / page).is_file(), page
