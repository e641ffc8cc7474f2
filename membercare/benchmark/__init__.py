"""The end-to-end benchmark behind ``membercare bench`` (see docs/benchmark.md).

:mod:`membercare.benchmark.e2e` builds generated shops, runs one campaign through the real Prefect flows,
the provider sandbox and the webhook receiver, and measures every stage; :mod:`membercare.benchmark.report`
turns the measurements into ``results.json``, ``results.md`` and the scaling chart. Prefect is imported
lazily, inside the functions that run flows, so importing this package stays Prefect-free.
"""
