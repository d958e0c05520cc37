"""examples/ and benchmarks/ use hybridzo as any user would: only what it exports.

Allowed: ``import hybridzo`` and the names of ``hybridzo.__all__`` (plus ``__version__``), and the integration
modules ``hybridzo.integrations.<framework>`` with the names of their ``__all__``. Anything else (``hybridzo.groups``,
``hybridzo.perturbation.DirectionGenerator``, ...) is an internal that may change without notice. The exported
names are read from the sources' ``__all__`` with ``ast``, so the check needs none of the frameworks installed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hybridzo"
CHECKED = sorted((REPO / "examples").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))


def exported(path: Path) -> Set[str]:
    """The literal ``__all__`` of a module's source."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no literal __all__")


def public_api() -> Dict[str, Set[str]]:
    """Importable module -> the names it exports, for ``hybridzo`` and each integration module."""
    api = {"hybridzo": exported(PACKAGE / "__init__.py") | {"__version__", "integrations"},
           "hybridzo.integrations": set()}
    for path in sorted((PACKAGE / "integrations").glob("*.py")):
        if not path.name.startswith("_"):
            api["hybridzo.integrations"].add(path.stem)
            api[f"hybridzo.integrations.{path.stem}"] = exported(path)
    return api


def private_uses(source: str, api: Dict[str, Set[str]]) -> List[str]:
    """Each use of hybridzo in ``source`` that goes past the public API, as ``line: what``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hybridzo" and alias.name not in api:
                    problems.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "hybridzo":
            names = api.get(node.module)
            if names is None:
                problems.append(f"{node.lineno}: from {node.module} import ...")
            else:
                problems += [f"{node.lineno}: from {node.module} import {alias.name}" for alias in node.names
                             if alias.name not in names]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hybridzo"
              and node.attr not in api["hybridzo"]):
            problems.append(f"{node.lineno}: hybridzo.{node.attr}")
    return problems


def test_the_api_holds_what_users_are_told_to_import():
    api = public_api()
    assert {"HybridZOOptimizer", "GroupRule", "build_param_groups", "describe_groups"} <= api["hybridzo"]
    assert api["hybridzo.integrations.lightning"] == {"HybridZOMixin"}
    assert len(CHECKED) >= 10


@pytest.mark.parametrize("path", CHECKED, ids=[str(path.relative_to(REPO)) for path in CHECKED])
def test_uses_only_the_public_api(path: Path):
    assert private_uses(path.read_text(), public_api()) == []


@pytest.mark.parametrize("path", CHECKED, ids=[str(path.relative_to(REPO)) for path in CHECKED])
def test_does_not_edit_sys_path(path: Path):
    # Modules run with -m from the repository root (python -m benchmarks.speed); an example run as a script
    # (python examples/clip_cl.py) may only put its checkout first on the path, in place of examples/ itself.
    text = path.read_text().replace(SCRIPT_BOOTSTRAP, "")
    assert "sys.path" not in text


SCRIPT_BOOTSTRAP = "    sys.path[0] = str(Path(__file__).resolve().parents[1])\n"
"""The one edit of sys.path allowed: in an example run as a script, under ``if __package__ in (None, ""):``."""


def test_examples_edit_sys_path_only_when_run_as_scripts():
    for path in CHECKED:
        text = path.read_text()
        if SCRIPT_BOOTSTRAP in text:
            assert text.count(SCRIPT_BOOTSTRAP) == 1
            before = text[:text.index(SCRIPT_BOOTSTRAP)].rstrip("\n").rsplit("\n", 1)[-1]
            assert before.startswith('if __package__ in (None, ""):'), path


def test_the_check_catches_internals():
    source = (
        "import hybridzo\nimport hybridzo.perturbation\nfrom hybridzo import HybridZOOptimizer, ParamsT\n"
        "from hybridzo.groups import GroupRule\nfrom hybridzo.perturbation import DirectionGenerator\n"
        "from hybridzo.integrations.lightning import HybridZOMixin\nfrom hybridzo.integrations import transformers\n"
        "from hybridzo.integrations.accelerate import AcceleratedOptimizer\nx = hybridzo.rules.sgd\n"
        "v = hybridzo.__version__\nfrom .adapters import LinearHead\n"
    )
    assert private_uses(source, public_api()) == [
        "2: import hybridzo.perturbation", "4: from hybridzo.groups import ...",
        "5: from hybridzo.perturbation import ...", "8: from hybridzo.integrations.accelerate import "
        "AcceleratedOptimizer", "9: hybridzo.rules",
    ]
