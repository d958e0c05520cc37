"""Benchmarks of hybridzo: memory, speed and continual-learning accuracy, side by side with the papers.

Not part of the installed package and not tests: run them with ``python -m benchmarks --preset cpu`` (all)
or one script at a time (``python benchmarks/memory.py --help``). See ``benchmarks/README.md``.
"""
