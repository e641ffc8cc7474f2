"""The end-to-end benchmark behind ``membercare bench`` (see docs/benchmark.md).

:mod:`bench.e2e.harness` builds generated shops, runs one campaign through the real Prefect flows, the
provider sandbox and the webhook receiver, and measures every stage; :mod:`bench.e2e.report` turns the
measurements into ``results.json``, ``results.md`` and the scaling chart. Benchmark scaffolding: it lives
outside the ``membercare`` package (it drives Prefect and the flows) and runs from a source checkout.
"""
