"""Examples of hybridzo: class-incremental learning of CLIP with zeroth-/first-order hybrids.

Not part of the installed package. Run them as modules from the repository root (after
``pip install -e ".[examples]"``), e.g. ``python -m examples.clip_cl --preset smoke``; see README.md.
This file imports nothing, so ``--help`` stays fast.
"""
