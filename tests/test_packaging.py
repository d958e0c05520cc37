"""The built artifacts: the sdist and the wheel hold the package, its license and metadata, and nothing else.

Builds with ``python -m build --no-isolation`` (the ``test`` extra installs ``build`` and ``setuptools``), so no
network is needed; the wheel is built from the sdist, which shows the sdist is complete. The wheel is then
installed into an empty folder and the README's quick start runs against it in a fresh interpreter, from outside
the checkout. ``.ci/check_artifacts.sh`` does the same in a clean virtual environment and adds ``twine check``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Dict

import pytest
from readme_blocks import QUICK_START_LOADER, readme_blocks

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_THE_PACKAGE = ("tests/", "examples/", "benchmarks/", "docs/", ".ci/")

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    pytest.importorskip("build", reason="needs the build package (in the test extra)")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = out.glob("hybridzo-*.tar.gz")
    (wheel,) = out.glob("hybridzo-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.mark.slow
def test_sdist_holds_the_package_license_and_metadata_only(artifacts):
    with tarfile.open(artifacts["sdist"]) as sdist:
        names = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
        pkg_info = sdist.extractfile(next(n for n in sdist.getnames() if n.count("/") == 1
                                          and n.endswith("/PKG-INFO"))).read().decode()
    assert {"LICENSE", "README.md", "pyproject.toml", "hybridzo/__init__.py", "hybridzo/optimizer.py",
            "hybridzo/integrations/transformers.py"} <= set(names)
    assert [name for name in names if name.startswith(OUTSIDE_THE_PACKAGE)] == []
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info


@pytest.mark.slow
def test_wheel_holds_the_package_and_the_license(artifacts):
    with zipfile.ZipFile(artifacts["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {name.split("/")[0] for name in names} == {"hybridzo", artifacts["wheel"].name.split("-py3")[0]
                                                      + ".dist-info"}
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "License-Expression: MIT" in metadata
    assert "Copyright (c)" in (REPO / "LICENSE").read_text() and "hybridzo contributors" in (REPO / "LICENSE").read_text()
    # The long description is the README, whose links must work on a package index page.
    assert "## Quick start" in metadata and "](docs/" not in metadata and "](benchmarks/" not in metadata


@pytest.mark.slow
def test_readme_quick_start_runs_from_the_wheel(artifacts, tmp_path: Path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                           "--target", str(site), str(artifacts["wheel"])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    quick_start = next(block for block in readme_blocks() if block.section == "Quick start"
                       and block.language == "python")
    script = tmp_path / "quick_start.py"
    script.write_text(QUICK_START_LOADER + quick_start.code
                      + "import hybridzo\nprint(hybridzo.__file__)\nprint(float(loss))\n")
    # torch and numpy come from this environment; hybridzo only from the installed wheel (not the checkout).
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    module_file, loss = run.stdout.strip().splitlines()[-2:]
    assert Path(module_file).is_relative_to(site)
    assert float(loss) > 0


@pytest.mark.peers
def test_long_description_renders_on_a_package_index():
    reason = "needs twine's markdown renderer, readme_renderer[md] (pinned in .ci/run, not an extra)"
    renderer = pytest.importorskip("readme_renderer.markdown", reason=reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # readme_renderer warns when it has no markdown engine
        if renderer.render("# title") is None:
            pytest.skip(reason)
    html = renderer.render((REPO / "README.md").read_text())
    assert ">Quick start<" in html and "<table>" in html
