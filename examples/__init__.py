"""Examples of hybridzo: a quick start, class-incremental learning of CLIP, full-model ZO with FSDP2.

Not part of the installed package. Each script runs as ``python examples/<script>.py`` (from any directory) or as
``python -m examples.<script>`` (from the repository root, or with it on ``PYTHONPATH``), e.g.
``python examples/quickstart.py`` or ``python -m examples.clip_cl --preset smoke``; see README.md.
This file imports nothing, so ``--help`` stays fast.
"""
