"""Shop data coming in: the CSV import (:mod:`membercare.data.importer`) and the demo shop generator
(:mod:`membercare.data.generator`).

Each subpackage states its public API in its ``__init__`` (``__all__``); the modules inside are its
implementation. Nothing is re-exported here, so that ``membercare import`` does not load numpy for the
generator and ``membercare generate`` does not load the importer.
"""

__all__: list[str] = []
