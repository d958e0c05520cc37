"""The fenced code blocks of README.md and of the docs pages (docs/*.md), by page and section; standard library only.

Used by ``tests/test_readme.py`` (runs every python and bash block) and by CI, which runs README commands verbatim::

    python3 tests/readme_blocks.py Tests bash                          # the README's Tests section, first bash block
    python3 tests/readme_blocks.py "Quick start" python                # the README's quick start
    python3 tests/readme_blocks.py "Checkpoints" python --page docs/failures.md

A block that cannot run in the tests is marked by an HTML comment on the line right before its opening fence
(rendered pages do not show it); the reason is required::

    <!-- not run: needs torchrun and GPUs (NCCL) -->
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
"""The marker of a block that the tests do not run, with its reason."""

CODE_LANGUAGES = ("python", "bash")
"""Languages of blocks that are code and run in the tests; other blocks (``text``, ``bibtex``) are shown as is."""

QUICK_START_LOADER = (
    "import torch as _torch\n"
    "_generator = _torch.Generator().manual_seed(0)\n"
    "loader = [(_torch.randn(8, 32, generator=_generator), _torch.randint(0, 10, (8,), generator=_generator))\n"
    "          for _ in range(3)]\n"
)
"""Code defining a ``loader`` of 3 batches of 8 (the README's quick start now defines its own; kept for callers)."""


@dataclass(frozen=True)
class Block:
    """A fenced code block: its page, the ``## `` section it is in, its number there (from 0, per language), the
    line of its opening fence, its language, its code, and why it is not run (``None``: it runs)."""

    section: str
    index: int
    line: int
    language: str
    code: str
    page: str = "README.md"
    not_run: Optional[str] = None

    @property
    def id(self) -> str:
        prefix = "" if self.page == "README.md" else f"{self.page}:"
        return f"{prefix}{self.section}#{self.index}"


class MarkerError(ValueError):
    """A ``not run`` marker that does not stand right before an opening fence, or has no reason."""


def readme_blocks(text: Optional[str] = None, page: str = "README.md") -> List[Block]:
    """Every fenced block of ``text`` (default: the file ``page``, relative to the repository root) in order.

    Fences may be indented (a block inside a list item); their indentation is removed from the code.
    """
    text = (REPO / page).read_text() if text is None else text
    blocks: List[Block] = []
    section, language, start, lines, indent = "(top)", None, 0, [], ""
    not_run: Optional[str] = None
    pending_marker: Optional[int] = None
    counts: Dict[tuple, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if language is None:
            if pending_marker is not None and not stripped.startswith("```"):
                raise MarkerError(f"{page}:{pending_marker}: a 'not run' marker must stand right before a code block")
            if line.startswith("## "):
                section = line[3:].strip()
            elif stripped.startswith("```"):
                language, start, lines = stripped[3:].strip(), number, []
                indent = line[: len(line) - len(line.lstrip())]
                pending_marker = None
            elif stripped.startswith("<!-- not run"):
                match = NOT_RUN.match(stripped)
                if match is None:
                    raise MarkerError(f"{page}:{number}: write the marker as '<!-- not run: <reason> -->'")
                not_run, pending_marker = match.group("reason"), number
        elif stripped.startswith("```"):
            index = counts.get((section, language), 0)
            counts[(section, language)] = index + 1
            blocks.append(Block(section, index, start, language, "\n".join(lines) + "\n", page, not_run))
            language, not_run = None, None
        else:
            lines.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
    if pending_marker is not None:
        raise MarkerError(f"{page}:{pending_marker}: a 'not run' marker must stand right before a code block")
    return blocks


def doc_pages() -> List[str]:
    """README.md and every docs page, as paths relative to the repository root."""
    return ["README.md", *sorted(str(path.relative_to(REPO)) for path in DOCS.glob("*.md"))]


def all_blocks() -> List[Block]:
    """Every fenced block of README.md and of docs/*.md."""
    return [block for page in doc_pages() for block in readme_blocks(page=page)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Print one fenced code block of README.md or of a docs page.")
    parser.add_argument("section", help="the ## heading the block is under")
    parser.add_argument("language", help="the block's language tag, e.g. bash or python")
    parser.add_argument("--index", type=int, default=0, help="which block of that language in the section")
    parser.add_argument("--page", default="README.md", help="the page, relative to the repository root")
    parser.add_argument("--with-loader", action="store_true",
                        help="define a `loader` first (3 random batches of 8)")
    args = parser.parse_args()
    for block in readme_blocks(page=args.page):
        if (block.section, block.language, block.index) == (args.section, args.language, args.index):
            print((QUICK_START_LOADER if args.with_loader else "") + block.code, end="")
            return
    raise SystemExit(f"{args.page} has no {args.language} block #{args.index} under '## {args.section}'")


if __name__ == "__main__":
    main()
