"""Benchmarks of membercare, and the scaffolding they need; not part of the installed package.

Scripts (``python bench/<name>.py``) measure one part each; :mod:`bench.e2e` is the end-to-end benchmark
behind ``membercare bench``, and :mod:`bench.per_message_baseline` the plain one-task-per-message Prefect flow
it compares against. See docs/benchmark.md.
"""
