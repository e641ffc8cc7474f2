"""membercare: the Prefect-free domain core (models, storage, import, segments support, rendering,
routing, delivery and engagement). Nothing under this package imports Prefect."""

__version__ = "0.1.0"
