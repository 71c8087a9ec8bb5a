"""The core types every stage shares, and nothing else: errors, sparsity structures, the pattern records and
their ops, condensed formats and layers, example calls, the report, the runtime registry. Nothing here imports
another sub-package of sparsecc (`tests/test_layout.py`), so the stages above it (capture, passes, runtimes,
compiler, the public edge, tooling) can all depend on it without cycles."""
