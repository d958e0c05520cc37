"""Benchmarks of hybridzo: memory, speed and continual-learning accuracy, side by side with the papers.

Not part of the installed package and not tests: run them from the repository root with
``python -m benchmarks --preset cpu`` (all) or one script at a time (``python -m benchmarks.memory --help``).
See ``benchmarks/README.md``.
"""
