"""The CLIP towers ("branches") that ZO can be placed on, by parameter name; shared with benchmarks/.

Pure Python (no torch), so the command-line parsers that offer these choices stay fast to start.
"""

from __future__ import annotations

BRANCH_PATTERNS = {"vision": r"^visual\.", "language": r"^transformer\."}
"""Parameter-name regex of each CLIP tower in open_clip (adapter names keep these prefixes)."""

BRANCH_TOWERS = {"none": (), "dual": ("vision", "language"), "vision": ("vision",), "language": ("language",)}
"""The towers each ``--zo-branch`` value optimises zeroth-order: none (the FO baseline), both, or one."""

ZO_BRANCHES = tuple(BRANCH_TOWERS)
"""Values of ``--zo-branch`` / :attr:`examples.protocol.OptimConfig.zo_branch`: none, dual, vision, language."""
