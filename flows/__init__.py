"""The Prefect layer: thin flows over the core (the only package that imports ``prefect``).

Importing it makes this process forward the core's signals as Prefect events (see flows/signals.py).
"""

from flows.signals import forward_to_prefect

forward_to_prefect()
