"""Benchmarks of cskd_tf: cost ratios measured side by side (see bench/README.md).

Not part of the installed package: run them from the repository root, e.g.
`python bench/step_cost.py`.
"""
