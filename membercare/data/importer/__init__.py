"""CSV import of members, orders, coupons, devices, consents and products (``membercare import KIND FILE``).

How an import runs (the layouts themselves are documented in ``docs/import-formats.md``):

1. The file is checked as a whole before anything is written: the header (present, UTF-8, the layout's
   columns) and the encoding (one pass of the UTF-8 decoder, see :func:`check_encoding`). Whatever can be
   wrong after that is wrong with a row, and costs that row only.
2. The file is streamed: a :mod:`csv` reader over numbered physical lines (:mod:`.reading`), never the
   whole file and never more than :data:`MAX_RECORD_CHARS` of one record in memory. A record that cannot
   be read (a quote that never closes, an over-long record) rejects its first line and the lines after
   it are read again as rows, so a stray quote does not swallow the rows that follow it.
   Rows are grouped into *units* (one row, or for orders all consecutive lines of one order) and units
   into batches of about ``batch_size`` rows; an order's lines never straddle two batches.
3. Each unit is checked without the database first (characters, syntax, enumerations, amounts, dates,
   duplicate keys within the file), then the batch is applied in **one transaction**: one
   ``SELECT ... WHERE key IN (...)`` per batch fetches the existing rows, every unit is classified
   inserted / updated / unchanged (or rejected, e.g. an order of an unknown member), changed rows are
   written with batched dialect ``INSERT ... ON CONFLICT`` and the :class:`~membercare.models.ImportRun`
   counters are advanced, all in the same commit. A process killed mid-import therefore leaves whole batches only.
   Should the database still refuse a value (a gap in validation), the batch is applied again one unit
   at a time and only the refused units are rejected.
4. Importing is idempotent: rows are upserted by the shop's key (member id, order id, coupon code,
   device token, consent statement, SKU), so re-running a file, including after a kill, changes nothing
   that is already there and completes whatever is missing.

Rejected rows never stop the import. They are reported with their line number (the physical line where
the CSV record starts, header = line 1) and a reason that names the column but never repeats a value
that could be personal data (:func:`membercare.validation.quoted`), and written to a rejects CSV (the
original columns plus ``line`` and ``reason``, each cell made safe for spreadsheets by
:func:`spreadsheet_cell`). The rule is *reject rather than guess*.

Memory does not grow with the file: the keys already seen (to reject duplicates within the file) are
kept in a temporary SQLite scratch file, not in a dict.

Extension point: a new kind is a :class:`~membercare.data.importer.handler.Handler` subclass registered
in :data:`~membercare.data.importer.kinds.HANDLERS`, with its column lists (and its ``free_text``
columns), a database-free :meth:`~membercare.data.importer.handler.Handler.parse` and a batched
:meth:`~membercare.data.importer.handler.Handler.write`.

The modules, in the order an import runs through them:

* :mod:`.reading`: the header, the UTF-8 check, rows streamed over numbered physical lines;
* :mod:`.handler`: the base of a kind and the helpers the kinds share (merge with the stored row, upsert);
* :mod:`.members` (members, devices, consents), :mod:`.orders` (orders, coupons) and :mod:`.products`
  (the catalogue: arrival dates, stock): the kinds;
* :mod:`.kinds`: the kinds by name;
* :mod:`.report`: the counters and the rejects file;
* :mod:`.run`: :func:`import_csv`, batches, transactions, the ``import_runs`` row.
"""

from __future__ import annotations

from membercare.data.importer.kinds import HANDLERS, KINDS, columns_for
from membercare.data.importer.reading import MAX_RECORD_CHARS, canonical_column, check_encoding
from membercare.data.importer.report import BatchResult, ImportReport, Reject, spreadsheet_cell
from membercare.data.importer.run import (
    DEFAULT_BATCH_SIZE,
    ImportDatabaseError,
    default_rejects_path,
    describe_db_error,
    import_csv,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "HANDLERS",
    "KINDS",
    "MAX_RECORD_CHARS",
    "BatchResult",
    "ImportDatabaseError",
    "ImportReport",
    "Reject",
    "canonical_column",
    "check_encoding",
    "columns_for",
    "default_rejects_path",
    "describe_db_error",
    "import_csv",
    "spreadsheet_cell",
]
