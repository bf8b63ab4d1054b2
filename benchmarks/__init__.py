"""Benchmarks of grpo-fast against the eager reference and its peers (run from the repo root:
`python -m benchmarks.loss`, `python -m benchmarks.report`). Shared machinery: benchmarks.common."""
