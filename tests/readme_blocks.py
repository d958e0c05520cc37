"""The fenced code blocks of README.md, by section; standard library only.

Used by ``tests/test_readme.py`` (runs every Python block) and by CI, which runs README commands verbatim::

    python3 tests/readme_blocks.py Tests bash                          # the Tests section's first bash block
    python3 tests/readme_blocks.py "Quick start" python --with-loader  # the quick start, ready to run
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

README = Path(__file__).resolve().parents[1] / "README.md"

QUICK_START_LOADER = (
    "import torch as _torch\n"
    "_generator = _torch.Generator().manual_seed(0)\n"
    "loader = [(_torch.randn(8, 32, generator=_generator), _torch.randint(0, 10, (8,), generator=_generator))\n"
    "          for _ in range(3)]\n"
)
"""Code defining the ``loader`` the quick start iterates over (it leaves it to the reader): 3 batches of 8."""


@dataclass(frozen=True)
class Block:
    """A fenced code block: the ``## `` section it is in, its number there (from 0, per language) and its code."""

    section: str
    index: int
    line: int
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.section}#{self.index}"


def readme_blocks(text: Optional[str] = None) -> List[Block]:
    """Every fenced block of ``text`` (default: README.md) in order."""
    text = README.read_text() if text is None else text
    blocks: List[Block] = []
    section, language, start, lines = "(top)", None, 0, []
    counts: Dict[tuple, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if language is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                language, start, lines = line[3:].strip(), number, []
        elif line.startswith("```"):
            index = counts.get((section, language), 0)
            counts[(section, language)] = index + 1
            blocks.append(Block(section, index, start, language, "\n".join(lines) + "\n"))
            language = None
        else:
            lines.append(line)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description="Print one fenced code block of README.md.")
    parser.add_argument("section", help="the ## heading the block is under")
    parser.add_argument("language", help="the block's language tag, e.g. bash or python")
    parser.add_argument("--index", type=int, default=0, help="which block of that language in the section")
    parser.add_argument("--with-loader", action="store_true",
                        help="define the quick start's `loader` first (3 random batches of 8)")
    args = parser.parse_args()
    for block in readme_blocks():
        if (block.section, block.language, block.index) == (args.section, args.language, args.index):
            print((QUICK_START_LOADER if args.with_loader else "") + block.code, end="")
            return
    raise SystemExit(f"README.md has no {args.language} block #{args.index} under '## {args.section}'")


if __name__ == "__main__":
    main()
