"""The documentation site: the API reference covers the public names, the troubleshooting page quotes messages the
code still raises, ``mkdocs build --strict`` passes, and the built pages render in a real headless browser.

The build needs the ``docs`` extra and the browser test Debian's ``chromium``; without them those tests skip and say
why (CI installs both: ``.ci/run``). Set ``HYBRIDZO_DOCS_SCREENSHOTS=<folder>`` to keep screenshots of the pages.
"""

from __future__ import annotations

import ast
import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

import hybridzo

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
INTEGRATIONS = ("lightning", "transformers", "accelerate")


def documented_names() -> List[str]:
    """Objects the API page documents: its ``::: name`` directives and ``{ #name }`` anchors."""
    text = (DOCS / "api.md").read_text()
    return re.findall(r"^::: (\S+)", text, re.MULTILINE) + re.findall(r"\{ #(\S+) \}", text)


def integration_names() -> List[str]:
    """``hybridzo.integrations.<module>.<name>`` for every name in each integration module's ``__all__``, read from
    the source (importing the modules needs the frameworks)."""
    names = []
    for module in INTEGRATIONS:
        tree = ast.parse((REPO / "hybridzo" / "integrations" / f"{module}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names += [f"hybridzo.integrations.{module}.{value}" for value in ast.literal_eval(node.value)]
    return names


def test_api_reference_lists_every_public_name():
    documented = set(documented_names())
    expected = {f"hybridzo.{name}" for name in hybridzo.__all__} | set(integration_names())
    assert len(integration_names()) >= 3
    assert sorted(expected - documented) == []


def test_every_page_is_in_the_navigation():
    config = (REPO / "mkdocs.yml").read_text()
    assert sorted(path.name for path in DOCS.glob("*.md") if f": {path.name}" not in config) == []


# ---------------------------------------------------------------------------------------- troubleshooting


def code_messages() -> List[str]:
    """Every string literal of the package, f-strings with ``…`` for their fields (adjacent literals joined)."""
    messages = []
    for path in (REPO / "hybridzo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                messages.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                messages.append("".join(part.value if isinstance(part, ast.Constant) else "…"
                                        for part in node.values))
    return messages


def quoted_messages() -> List[str]:
    """The messages the troubleshooting page quotes: ``> `Error: message` `` lines, the error's name removed."""
    quotes = re.findall(r"^> `(.+)`$", (DOCS / "troubleshooting.md").read_text(), re.MULTILINE)
    return [re.sub(r"^[A-Za-z]+(Error|Warning): ", "", quote) for quote in quotes]


def test_troubleshooting_quotes_messages_the_code_raises():
    """Each quote, cut at its ``…`` placeholders, is found piece by piece in one literal of the package."""
    messages = code_messages()
    quotes = quoted_messages()
    assert len(quotes) >= 25
    unmatched = []
    for quote in quotes:
        pieces = [piece for piece in quote.split("…") if piece.strip(" ,.:;()")]
        if not any(all(piece in message for piece in pieces) for message in messages):
            # A message built by `+` from several literals (the GradScaler one): each piece in some literal.
            if not all(any(piece in message for message in messages) for piece in pieces):
                unmatched.append(quote)
    assert unmatched == []


def test_a_misquoted_message_is_caught():
    messages = code_messages()
    assert not any("closure returned nothing at all" in message for message in messages)
    assert any("closure returned None; it must return the loss as a scalar tensor" in message for message in messages)


# ------------------------------------------------------------------------------------------ the site


def test_version_is_single_sourced():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "hybridzo.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", hybridzo.__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version

        installed = version("hybridzo")
    except PackageNotFoundError:
        pytest.skip("hybridzo is not installed (pip install -e .), so there is no metadata to compare")
    assert installed == hybridzo.__version__


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict`` (warnings fail it) into a temporary folder."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip('needs the docs extra: pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


@pytest.mark.slow
def test_docs_build_strict(site: Path):
    api = (site / "api" / "index.html").read_text()
    for name in ("HybridZOOptimizer", "GroupRule", "build_param_groups", "describe_groups", "prepare_fsdp",
                 "ParamsT", "HybridZOMixin", "HybridZOTrainer", "accelerated_step"):
        assert f'id="hybridzo.' in api and name in api, name
    assert (site / "assets" / "hybrid_step.png").is_file()


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on a localhost HTTP server; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output to the test's own
        pass


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("needs Debian's chromium (apt-get install -y chromium); .ci/run installs it")


def browse(url: str, tmp_path: Path, *action: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile on ``url``; ``action`` is ``--dump-dom`` or ``--screenshot=...``."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *action, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def visible_text(dom: str) -> str:
    """The text of a DOM dump, tags and whitespace collapsed (enough to look for phrases)."""
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.DOTALL)
    return " ".join(re.sub(r"<[^>]+>", " ", text).replace("&nbsp;", " ").split())


@pytest.mark.slow
def test_landing_and_api_pages_render_in_chromium(served: str, tmp_path: Path):
    home = visible_text(browse(served, tmp_path, "--dump-dom").stdout)
    assert "hybridzo" in home
    assert "Zeroth-order and first-order updates, per parameter group" in home
    assert "Which setting for which job" in home and "Troubleshooting" in home

    dom = browse(served + "api/", tmp_path, "--dump-dom").stdout
    api = visible_text(dom)
    assert "API reference" in api
    assert 'id="hybridzo.HybridZOOptimizer"' in dom
    # The rendered signature and docstring of the optimizer, and the integrations.
    assert re.search(r"HybridZOOptimizer \( params : ParamsT", api), api[:2000]
    assert "Zeroth-order (forward-only) and first-order (backprop) updates per param group." in api
    assert "closure" in api and "restore" in api
    assert ":math:" not in api and ":class:" not in api and ".. math::" not in api  # reST roles as Markdown
    for name in ("HybridZOMixin", "HybridZOTrainer", "accelerated_step", "build_param_groups", "prepare_fsdp"):
        assert name in api, name

    screenshots = Path(os.environ.get("HYBRIDZO_DOCS_SCREENSHOTS", tmp_path / "screenshots"))
    screenshots.mkdir(parents=True, exist_ok=True)
    for page, url in (("home", served), ("api", served + "api/"), ("choosing", served + "choosing/")):
        shot = screenshots / f"{page}.png"
        browse(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
        assert shot.stat().st_size > 10_000, page  # a rendered page, not a blank one


def test_the_home_page_figure_is_drawn_by_its_script(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="needs the examples extra")
    spec = importlib.util.spec_from_file_location("diagram", DOCS / "diagram.py")
    diagram = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagram)
    drawn = diagram.draw(tmp_path / "figure.png")
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and drawn.stat().st_size > 20_000
    assert (DOCS / "assets" / "hybrid_step.png").is_file()
    assert "assets/hybrid_step.png" in (DOCS / "index.md").read_text()
