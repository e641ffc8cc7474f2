"""The import kinds by name: ``membercare import KIND FILE`` looks its handler up here."""

from __future__ import annotations

from membercare.data.importer.handler import Handler
from membercare.data.importer.members import ConsentsHandler, DevicesHandler, MembersHandler
from membercare.data.importer.orders import CouponsHandler, OrdersHandler
from membercare.data.importer.products import ProductsHandler
from membercare.errors import UnknownNameError

HANDLERS: dict[str, type[Handler]] = {
    h.kind: h for h in (MembersHandler, OrdersHandler, CouponsHandler, DevicesHandler, ConsentsHandler,
                         ProductsHandler)
}
KINDS: tuple[str, ...] = tuple(HANDLERS)


def columns_for(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(required, optional)`` columns of a kind's layout."""
    h = handler_for(kind)
    return h.required, h.optional


def handler_for(kind: str) -> Handler:
    try:
        return HANDLERS[kind]()
    except KeyError:
        raise UnknownNameError("import kind", kind, KINDS) from None
