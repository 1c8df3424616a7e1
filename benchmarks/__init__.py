"""Benchmarks of lorapro_jax: update time, scaling, memory, end-to-end step.

Run ``python -m benchmarks.run --help``. See benchmarks/README.md.
"""
