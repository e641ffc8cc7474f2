"""CSV import of members, orders, coupons, devices and consents (``membercare import KIND FILE``).

How an import runs (the layouts themselves are documented in ``docs/import-formats.md``):

1. The file is checked as a whole before anything is written: the header (present, UTF-8, the layout's
   columns) and the encoding (one pass of the UTF-8 decoder, see :func:`check_encoding`). Whatever can be
   wrong after that is wrong with a row, and costs that row only.
2. The file is streamed: a :mod:`csv` reader over numbered physical lines (:class:`_Lines`), never the
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
   device token, consent statement), so re-running a file, including after a kill, changes nothing
   that is already there and completes whatever is missing.

Rejected rows never stop the import. They are reported with their line number (the physical line where
the CSV record starts, header = line 1) and a reason that names the column but never repeats a value
that could be personal data (:func:`membercare.validation.quoted`), and written to a rejects CSV (the
original columns plus ``line`` and ``reason``, each cell made safe for spreadsheets by
:func:`spreadsheet_cell`). The rule is *reject rather than guess*.

Memory does not grow with the file: the keys already seen (to reject duplicates within the file) are
kept in a temporary SQLite scratch file, not in a dict.

Extension point: a new kind is a :class:`_Handler` subclass registered in :data:`HANDLERS`, with its
column lists (and its ``free_text`` columns), a database-free :meth:`_Handler.parse` and a batched
:meth:`_Handler.write`.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import sqlite3
import tempfile
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare import validation as v
from membercare.config import Settings
from membercare.consent import ConsentStatement, record_consents
from membercare.db import insert_for
from membercare.errors import InputError, MembercareError, UnknownNameError
from membercare.models import (
    LINE_USER_ID_PATTERN,
    Channel,
    ConsentEvent,
    ConsentSource,
    Coupon,
    CouponKind,
    Device,
    ImportRun,
    Member,
    Order,
    OrderLine,
    OrderStatus,
    Platform,
    Product,
    Purpose,
    Tier,
)
from membercare.timeutil import utcnow

DEFAULT_BATCH_SIZE = 2_000
INSERTED, UPDATED, UNCHANGED = "inserted", "updated", "unchanged"
MAX_INT32 = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------------
# Public results


@dataclass(frozen=True)
class Reject:
    line: int
    reason: str


@dataclass
class BatchResult:
    """What one committed batch did (passed to ``on_batch_committed``)."""

    number: int
    rows: int
    inserted: int
    updated: int
    unchanged: int
    rejected: int
    bytes_read: int


@dataclass
class ImportReport:
    run_id: int
    kind: str
    source: str
    rows_total: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    batches: int = 0
    rejects_path: Path | None = None
    # The first rejects, for the terminal; the complete list is in the rejects file.
    sample_rejects: list[Reject] = field(default_factory=list)
    superseded_runs: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rejected == 0


SAMPLE_REJECTS = 20


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Row:
    line: int
    values: dict[str, str]  # layout column -> trimmed text, for the columns the header has
    raw: list[str]  # the fields as read, for the rejects file
    error: str | None = None  # a problem found while reading: fields, quoting, characters, encoding


@dataclass
class _Unit:
    """What is accepted or rejected as a whole: one row, or all lines of one order."""

    rows: list[_Row]
    parsed: Any = None
    outcome: str | None = None
    rejects: dict[int, str] = field(default_factory=dict)

    @property
    def first_line(self) -> int:
        return self.rows[0].line

    def reject_all(self, reason: str) -> None:
        for row in self.rows:
            self.rejects.setdefault(row.line, reason)


def canonical_column(name: str) -> str:
    """``"Member ID"`` -> ``"member_id"``: spreadsheet headers are matched loosely, values strictly."""
    return "_".join(name.strip().lower().replace("-", " ").split())


# A record (one row, with any line breaks inside quoted cells) may hold at most this many characters. The
# longest column takes 512; the bound keeps memory flat when a quote is never closed or a file has no
# line breaks at all, and it stays below the csv module's own field limit (131,072).
MAX_RECORD_CHARS = 65_536
_READ_LIMIT = MAX_RECORD_CHARS + 3  # a physical line is read in pieces of at most this many characters


class _RecordTooLong(Exception):
    """Raised by :class:`_Lines` into the csv reader when a record outgrows :data:`MAX_RECORD_CHARS`."""


class _Lines:
    """The numbered physical lines of a text file, fed to :func:`csv.reader`, remembering the current record's.

    ``csv.reader`` pulls one line at a time and never reads ahead, so the lines pulled during one
    ``next(reader)`` are exactly the physical lines of that record. Keeping them lets a broken record (a
    quote that never closes, a record that outgrows the limit) be undone: its first line is rejected and
    the lines after it are handed to the reader again (:meth:`read_again`). A line is read with a size
    limit, so a file without line breaks never sits in memory whole; an over-long line is skipped to its
    end and stands in the record as ``None``.
    """

    def __init__(self, text: io.TextIOBase):
        self._text = text
        self._again: deque[tuple[int, str | None]] = deque()
        self._carry: str | None = None
        self.number = 0  # physical lines read from the file so far (a "\r\n", "\n" or "\r" ends a line)
        self.record: list[tuple[int, str | None]] = []
        self._chars = 0

    def __iter__(self) -> _Lines:
        return self

    def start_record(self) -> None:
        self.record = []
        self._chars = 0

    def read_again(self, lines: Sequence[tuple[int, str | None]]) -> None:
        self._again.extendleft(reversed(lines))

    def __next__(self) -> str:
        if self._again:
            number, text = self._again.popleft()
        else:
            text = self.physical()
            number = self.number
        self.record.append((number, text))
        if text is None:
            raise _RecordTooLong
        self._chars += len(text)
        if self._chars > MAX_RECORD_CHARS:
            raise _RecordTooLong
        return text

    def physical(self) -> str | None:
        """The next physical line with its line break, or ``None`` when it is longer than the limit.

        Raises StopIteration at the end of the file.
        """
        piece = self._piece()
        if not piece:
            raise StopIteration
        self.number += 1
        if len(piece) < _READ_LIMIT or piece.endswith("\n"):
            return piece
        while len(piece) == _READ_LIMIT and not piece.endswith(("\n", "\r")):
            piece = self._piece()  # the rest of an over-long line, dropped
        if len(piece) == _READ_LIMIT and piece.endswith("\r"):
            # A size-limited readline can stop between the "\r" and the "\n" of one line break: the
            # "\n" is not a line of its own.
            nxt = self._piece()
            if nxt != "\n":
                self._carry = nxt or None
        return None

    def _piece(self) -> str:
        if self._carry is not None:
            piece, self._carry = self._carry, None
            return piece
        return self._text.readline(_READ_LIMIT)


def _quote_trouble(text: str) -> tuple[str, int]:
    """Where the csv module's strict parser gives up on ``text`` (the lines of one record).

    ``("open", i)``: the quoted cell that starts in field ``i`` is still open at the end;
    ``("after", i)``: field ``i`` has text after its closing quote; ``("", -1)``: neither.
    Used only to name the column in a reject reason.
    """
    field_no, state = 0, "start"
    for ch in text:
        if state == "start":
            if ch == '"':
                state = "quoted"
            elif ch == ",":
                field_no += 1
            elif ch in "\r\n":
                return "", -1
            else:
                state = "plain"
        elif state == "plain":
            if ch == ",":
                field_no, state = field_no + 1, "start"
            elif ch in "\r\n":
                return "", -1
        elif state == "quoted":
            if ch == '"':
                state = "closing"
        elif ch == '"':  # closing: a doubled quote inside the cell
            state = "quoted"
        elif ch == ",":
            field_no, state = field_no + 1, "start"
        elif ch in "\r\n":
            return "", -1
        else:
            return "after", field_no
    return ("open", field_no) if state == "quoted" else ("", -1)


def _lenient_fields(text: str | None) -> list[str]:
    """The fields of one physical line on its own, for the rejects file of a record that could not be read."""
    if text is None:
        return []
    try:
        return next(csv.reader([text.rstrip("\r\n")]), [])
    except csv.Error:
        return [text.rstrip("\r\n")]


class _CsvSource:
    """A streaming CSV reader that knows the physical lines of each record and how many bytes it has consumed.

    Failures of the file as a whole (no header, wrong columns, the header not UTF-8) raise
    :class:`~membercare.errors.InputError` here, before anything is written. Everything after the header
    fails one row at a time: a row is yielded with ``error`` set and the reader carries on.
    """

    def __init__(self, path: Path, handler: _Handler, *, allow_extra_columns: bool):
        self.path = path
        self.size = path.stat().st_size
        self._binary = open(path, "rb")  # closed in close()
        # utf-8-sig: spreadsheet programs write a byte-order mark; newline="" as the csv module requires.
        # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its own cell, so it costs
        # that row only and is reported on its own line (a file in another encoding is refused as a
        # whole beforehand, see check_encoding).
        self._text = io.TextIOWrapper(self._binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        self._lines = _Lines(self._text)
        # strict: a quote still open at the end of the file raises instead of becoming one huge last cell.
        self._reader = csv.reader(self._lines, strict=True)
        self.free_text = frozenset(handler.free_text)
        try:
            self.header = self._read_header()
            self.columns = [canonical_column(h) for h in self.header]
            self._check_header(handler, allow_extra_columns)
        except BaseException:
            self.close()
            raise
        self.present = frozenset(c for c in self.columns if c in handler.all_columns)

    def _read_header(self) -> list[str]:
        name = self.path.name
        self._lines.start_record()
        try:
            header = next(self._reader, None)
        except _RecordTooLong:
            raise InputError(f"{name}: the header row is longer than {MAX_RECORD_CHARS:,} characters; "
                             "is this a CSV file?") from None
        except csv.Error as exc:
            raise InputError(f"{name}: cannot read the header row ({exc}); is this a CSV file?") from None
        if not header or not any(h.strip() for h in header):
            raise InputError(f"{name}: the file is empty (a header row is required)")
        if any(_SURROGATE.search(h) for h in header):
            raise InputError(f"{name}: not UTF-8 text; save the file as UTF-8 CSV")
        for h in header:
            try:
                # Tabs and line breaks in a column name are harmless: canonical_column folds them.
                v.check_cell_characters(h, field="the header row", free_text=True)
            except v.ValidationError as exc:
                raise InputError(f"{name}: {exc}; is this a CSV text file?") from None
        return header

    def _check_header(self, handler: _Handler, allow_extra: bool) -> None:
        seen = set(self.columns)
        # Missing columns first: a file without a header has a data row there, and only this message
        # never repeats what the row holds.
        missing = [c for c in handler.required if c not in seen]
        if missing:
            raise InputError(
                f"{self.path.name}: missing required column(s) {', '.join(missing)} for a {handler.kind} import "
                f"(required: {', '.join(handler.required)}; see docs/import-formats.md)"
            )
        seen = set()
        for c in self.columns:
            if c in seen:
                raise InputError(f"{self.path.name}: column {c!r} appears twice in the header")
            seen.add(c)
        extra = [h for h, c in zip(self.header, self.columns, strict=True) if c not in handler.all_columns]
        if extra and not allow_extra:
            raise InputError(
                f"{self.path.name}: unknown column(s) {', '.join(map(repr, extra))} for a {handler.kind} import "
                f"(known: {', '.join(handler.all_columns)}); pass --allow-extra-columns to ignore them"
            )

    @property
    def bytes_read(self) -> int:
        # The position of the byte stream under the text wrapper: exact to within one read-ahead chunk.
        return self._binary.tell()

    def _label(self, index: int) -> str:
        return self.columns[index] if 0 <= index < len(self.columns) and self.columns[index] else f"column {index + 1}"

    def rows(self) -> Iterator[_Row]:
        n = len(self.columns)
        lines = self._lines
        while True:
            lines.start_record()
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except _RecordTooLong:
                yield self._broken_record(self._too_long())
                continue
            except csv.Error as exc:
                yield self._broken_record(self._malformed(exc))
                continue
            if not fields or not any(f.strip() for f in fields):
                continue  # blank lines and spreadsheet filler rows (",,,,")
            start, end = lines.record[0][0], lines.record[-1][0]
            values = {c: fields[i].strip() for i, c in enumerate(self.columns) if i < len(fields)}
            if len(fields) != n:
                if end > start:
                    yield self._broken_record(f"expected {n} fields, found {len(fields)}: "
                                              f"{self._spanning_cell(fields)} spans lines {start}-{end}")
                    continue
                yield _Row(start, values, fields, f"expected {n} fields, found {len(fields)}")
                continue
            if end > start:
                looks_like_a_row = self._row_inside_a_cell(fields, n, start)
                if looks_like_a_row is not None:
                    yield self._broken_record(
                        f"{self._spanning_cell(fields)} spans lines {start}-{end}, and line {looks_like_a_row} "
                        f"holds a whole row of {n} fields (an unbalanced quote?)")
                    continue
            error = None
            if v.has_suspect_characters("".join(fields)):
                broken = self._line_break_outside_free_text(values)
                if broken is not None:
                    yield self._broken_record(f"{broken} contains a line break: the quoted cell spans lines "
                                              f"{start}-{end}")
                    continue
                error = self._cell_problem(values)
            yield _Row(start, values, fields, error)

    def _cell_problem(self, values: dict[str, str]) -> str | None:
        for c in self.columns:
            if c in self.present:
                try:
                    v.check_cell_characters(values.get(c, ""), field=c, free_text=c in self.free_text)
                except v.ValidationError as exc:
                    return str(exc)
        return None

    def _line_break_outside_free_text(self, values: dict[str, str]) -> str | None:
        """The first column, not of free text, whose cell spans physical lines."""
        for c in self.columns:
            if c in self.present and c not in self.free_text:
                text = values.get(c, "")
                if "\n" in text or "\r" in text:
                    return c
        return None

    @staticmethod
    def _row_inside_a_cell(fields: list[str], n: int, start: int) -> int | None:
        """The line of a row found inside a multi-line quoted cell, if there is one.

        A legitimate line break inside a quoted cell (an address, a note) leaves pieces that are not
        rows. A stray quote that a later stray quote happens to close leaves whole rows inside the "cell",
        and the record may even have the right number of fields. A piece is taken for a row when, with the
        fields on its side of the cell, it makes exactly ``n`` comma-separated fields (the first and the last
        piece must hold a comma themselves: "a note" at the end of a row is not a row).
        """
        line = start
        for k, text in enumerate(fields):
            pieces = _LINE_BREAK.split(text)
            last = len(pieces) - 1
            for j, piece in enumerate(pieces):
                commas = piece.count(",")
                if 0 < j < last:
                    whole = commas + 1 == n
                elif j == 0 and last > 0:
                    whole = commas > 0 and k + commas + 1 == n
                elif j == last and last > 0:
                    whole = commas > 0 and commas + 1 + (len(fields) - k - 1) == n
                else:
                    whole = False
                if whole:
                    return line + j
            line += last
        return None

    def _spanning_cell(self, fields: list[str]) -> str:
        for i, f in enumerate(fields):
            if "\n" in f or "\r" in f:
                return f"the quoted cell in {self._label(i)}"
        return "the record"

    def _record_text(self) -> str:
        return "".join(t for _, t in self._lines.record if t is not None)

    def _too_long(self) -> str:
        record = self._lines.record
        if len(record) == 1:
            return f"the line is longer than {MAX_RECORD_CHARS:,} characters"
        trouble, index = _quote_trouble(self._record_text())
        where = f" (the quote that opens {self._label(index)} never closes?)" if trouble == "open" else ""
        return f"the record is longer than {MAX_RECORD_CHARS:,} characters{where}"

    def _malformed(self, exc: csv.Error) -> str:
        trouble, index = _quote_trouble(self._record_text())
        if trouble == "open" and "end of data" in str(exc):
            return f"unterminated quote in {self._label(index)}: the quoted cell runs to the end of the file"
        if trouble == "after":
            return f"text after the closing quote in {self._label(index)} (a quote inside a cell must be doubled)"
        return f"malformed CSV ({exc})"

    def _broken_record(self, problem: str) -> _Row:
        """Reject the first line of a record that cannot be read and read the lines after it again as rows.

        A quote that never closes (or closes lines later, at another stray quote) makes the csv module read
        the rows after it as one cell. Those rows are not lost: each is read again on its own, and is
        imported or rejected by its own content.
        """
        record = self._lines.record
        (start, first), end = record[0], record[-1][0]
        if end > start:
            self._lines.read_again(record[1:])
            again = f"line {end}" if end == start + 1 else f"lines {start + 1}-{end}"
            problem += (f"; lines {start}-{end} were read as one record, so line {start} is rejected "
                        f"and {again} read again as rows")
        raw = _lenient_fields(first)
        values = {c: raw[i].strip() for i, c in enumerate(self.columns) if i < len(raw)}
        return _Row(start, values, raw, problem)

    def close(self) -> None:
        self._text.close()


def check_encoding(path: Path) -> None:
    """Refuse, before anything is written, a file that is not UTF-8 text as a whole.

    One pass of the C decoder settles the usual case. When some bytes are not UTF-8, the file is refused
    if at least half of its lines with non-ASCII characters are invalid: it was saved in another encoding
    (Big5 from an older spreadsheet export) and every such row would be rejected. Otherwise the bad bytes
    are damage to a few rows, which the import rejects one by one with their line numbers.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return
        except UnicodeDecodeError:
            pass
    bad = non_ascii = 0
    first_bad = 0
    with open(path, "rb") as f, io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape",
                                                newline="") as text:
        lines = _Lines(text)
        while True:
            try:
                line = lines.physical()
            except StopIteration:
                break
            if line is None or line.isascii():
                continue
            non_ascii += 1
            if _SURROGATE.search(line):
                bad += 1
                first_bad = first_bad or lines.number
    if bad and bad * 2 >= non_ascii:
        raise InputError(
            f"{path.name}: not UTF-8 text ({bad:,} of the {non_ascii:,} lines with non-ASCII characters are not "
            f"valid UTF-8, the first is line {first_bad}); save the file as UTF-8 CSV (Excel: \"CSV UTF-8\")"
        )


_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile("\r\n|\r|\n")
_FORMULA_START = frozenset("=+-@\t\r")
_PLAIN_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


def spreadsheet_cell(text: str) -> str:
    """A cell as written to a CSV that people open in a spreadsheet program.

    A cell beginning with ``= + - @``, a tab or a carriage return is a formula to Excel, LibreOffice and
    Google Sheets (``=HYPERLINK(...)`` in an imported name would run when the rejects report is opened):
    it gets a leading ``'`` as OWASP's CSV-injection guidance says. Plain numbers (``-5``, ``+886912345678``)
    are left alone, they are not formulas. Bytes that were not UTF-8 are written as U+FFFD so that the
    report itself is UTF-8.
    """
    if _SURROGATE.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if text and text[0] in _FORMULA_START and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


class _RejectsWriter:
    """Streams rejects to ``PATH.part`` and moves it into place at the end (absent when nothing was rejected).

    Every cell goes through :func:`spreadsheet_cell`: the report is meant to be opened in a spreadsheet.
    """

    def __init__(self, path: Path, header: Sequence[str]):
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.count = 0
        self._header = list(header)
        names = {canonical_column(h) for h in header}
        self._line_col = "line" if "line" not in names else "rejected_line"
        self._reason_col = "reason" if "reason" not in names else "rejected_reason"
        self._file = None
        self._writer = None

    def write(self, row: _Row, reason: str) -> None:
        if self._writer is None:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.part, "w", encoding="utf-8", newline="")  # closed in close()
            self._writer = csv.writer(self._file)
            self._writer.writerow([spreadsheet_cell(h) for h in (*self._header, self._line_col, self._reason_col)])
        n = len(self._header)
        fields = (list(row.raw) + [""] * n)[:n]
        self._writer.writerow([*(spreadsheet_cell(f) for f in fields), row.line, spreadsheet_cell(reason)])
        self.count += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def finish(self) -> Path | None:
        if self._file is None:
            # A rejects file from an earlier run of this input would now be stale.
            self.path.unlink(missing_ok=True)
            return None
        self._file.close()
        os.replace(self.part, self.path)
        return self.path

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.part.unlink(missing_ok=True)


class _SeenKeys:
    """The file keys seen so far (for duplicate detection), kept in a private temporary SQLite file.

    A dict would grow by 100-200 bytes per key (a gigabyte for a ten-million-member export); an indexed
    scratch table on disk keeps memory flat at the cost of one indexed lookup and insert per batch.
    """

    _CHUNK = 900  # stays under SQLite's bound-parameter limit on every version

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="membercare-import-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "seen.db"), isolation_level=None)
        # Scratch data: no journal, no fsync; it is worthless after this process ends.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (k TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")

    @staticmethod
    def text(key: Hashable) -> str:
        parts = key if isinstance(key, tuple) else (key,)
        return "\x1f".join(p.isoformat() if isinstance(p, datetime) else str(p) for p in parts)

    def first_lines(self, keys: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(keys), self._CHUNK):
            chunk = keys[i : i + self._CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT k, line FROM seen WHERE k IN ({marks})", chunk).fetchall())
        return found

    def add(self, items: Iterable[tuple[str, int]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR IGNORE INTO seen (k, line) VALUES (?, ?)", items)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


# ---------------------------------------------------------------------------------------------------------------------
# Kinds


@dataclass
class _Context:
    settings: Settings
    present: frozenset[str]
    tiers: dict[str, int]
    entry_tier: str
    now: datetime


class _Handler:
    """One import kind. Subclasses declare their columns and implement ``parse`` and ``write``."""

    kind: str = ""
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    key_column: str = ""
    groups_lines = False
    # Columns of free text that may hold tabs and line breaks (as a spreadsheet cell can); in every other
    # column a tab, a line break or any other control character rejects the row.
    free_text: tuple[str, ...] = ()

    @property
    def all_columns(self) -> tuple[str, ...]:
        return self.required + self.optional

    def file_key(self, row: _Row) -> Hashable | None:
        """The key that must be unique within the file, from the raw row (``None`` when missing)."""
        return row.values.get(self.key_column) or None

    def describe_duplicate(self, key: Hashable, first_line: int) -> str:
        return (f"duplicate {self.key_column} {v.quoted(str(key))} in this file "
                f"(first on line {first_line}, which is kept)")

    def parse(self, unit: _Unit, ctx: _Context) -> Any:
        """Database-free validation. Return the parsed unit or raise :class:`~membercare.validation.ValidationError`."""
        raise NotImplementedError

    def write(self, conn: Connection, units: list[_Unit], ctx: _Context) -> None:
        """Apply valid units in the caller's transaction; set ``unit.outcome`` or reject the unit."""
        raise NotImplementedError


def _members_by_external_id(conn: Connection, external_ids: Iterable[str]) -> dict[str, tuple[int, str]]:
    m = Member.__table__
    keys = sorted(set(external_ids))
    if not keys:
        return {}
    rows = conn.execute(sa.select(m.c.external_id, m.c.id, m.c.timezone).where(m.c.external_id.in_(keys)))
    return {r.external_id: (r.id, r.timezone) for r in rows}


def _attach_members(conn: Connection, units: list[_Unit]) -> list[_Unit]:
    """Resolve ``parsed["member_ext"]`` to ``member_id`` and ``tz``; reject units of unknown members."""
    found = _members_by_external_id(conn, (u.parsed["member_ext"] for u in units))
    kept = []
    for u in units:
        hit = found.get(u.parsed["member_ext"])
        if hit is None:
            u.reject_all(f"unknown member_id {v.quoted(u.parsed['member_ext'])} (import members first)")
            continue
        u.parsed["member_id"], u.parsed["tz"] = hit
        kept.append(u)
    return kept


def _classify(record: dict, existing: dict | None, compared: Sequence[str], defaults: dict) -> tuple[str, dict]:
    """Merge a parsed record (only the columns the file has) with the stored row or the defaults.

    A column the file does not have keeps its stored value on update; an empty cell in a column the file
    has means "no value" (NULL, or the column's default).
    """
    if existing is None:
        return INSERTED, {**defaults, **record}
    merged = {c: existing[c] for c in compared} | record
    same = all(merged[c] == existing[c] for c in compared)
    return (UNCHANGED if same else UPDATED), merged


def _opt(values: dict[str, str], column: str) -> str | None:
    text = values.get(column, "")
    return text or None


def _line_user_id(values: dict[str, str], present) -> dict[str, str | None]:
    """The ``line_user_id`` column when the file has it; one used by another member is refused by the database."""
    if "line_user_id" not in present:
        return {}
    value = _opt(values, "line_user_id")
    if value is not None and not LINE_USER_ID.match(value):
        raise v.ValidationError("line_user_id must be a LINE user id: U and 32 hexadecimal digits")
    return {"line_user_id": value}


class MembersHandler(_Handler):
    kind = "members"
    required = ("member_id", "name", "joined_at")
    optional = ("email", "phone", "country", "locale", "timezone", "birthday", "tier", "points_balance",
                "region", "city", "age_group", "preferred_channels", "line_user_id")
    key_column = "member_id"
    free_text = ("name",)
    compared = ("name", "email", "phone", "country", "locale", "timezone", "birthday", "joined_at", "tier",
                "points_balance", "region", "city", "age_group", "preferred_channels", "line_user_id")

    def parse(self, unit: _Unit, ctx: _Context) -> dict:
        vals, present, s = unit.rows[0].values, ctx.present, ctx.settings
        rec: dict[str, Any] = {
            "external_id": v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            "name": v.bounded_text(vals["name"], field="name", max_length=200, required=True),
        }
        if "email" in present:
            rec["email"] = v.normalise_email(vals["email"]) if vals.get("email") else None
        country = v.normalise_country(vals["country"]) if vals.get("country") else s.shop_country
        if "country" in present:
            rec["country"] = country
        if "phone" in present:
            rec["phone"] = v.normalise_phone(vals["phone"], country) if vals.get("phone") else None
        if "locale" in present:
            rec["locale"] = v.normalise_locale(vals["locale"]) if vals.get("locale") else s.shop_locale
        tz = v.normalise_timezone(vals["timezone"]) if vals.get("timezone") else s.shop_timezone
        if "timezone" in present:
            rec["timezone"] = tz
        if "birthday" in present:
            rec["birthday"] = v.parse_birthday(vals["birthday"], today=ctx.now.date()) if vals.get("birthday") else None
        if not vals["joined_at"]:
            raise v.ValidationError("joined_at is required")
        rec["joined_at"] = v.not_in_future(v.parse_datetime_utc(vals["joined_at"], tz, field="joined_at"),
                                           field="joined_at", now=ctx.now)
        if "tier" in present:
            tier = vals.get("tier", "").lower() or ctx.entry_tier
            if tier not in ctx.tiers:
                raise v.ValidationError(f"unknown tier {v.quoted(vals['tier'])} (tiers: {', '.join(ctx.tiers)})")
            rec["tier"] = tier
        if "points_balance" in present:
            rec["points_balance"] = (v.parse_int(vals["points_balance"], field="points_balance", min_value=0,
                                                 max_value=MAX_INT32) if vals.get("points_balance") else 0)
        for col, max_length in (("region", 64), ("city", 64), ("age_group", 16)):
            if col in present:
                rec[col] = v.bounded_text(vals.get(col, ""), field=col, max_length=max_length)
        if "preferred_channels" in present:
            rec["preferred_channels"] = (v.parse_channel_order(vals["preferred_channels"])
                                         if vals.get("preferred_channels") else _DEFAULT_CHANNELS)
        rec.update(_line_user_id(vals, present))
        return rec

    def write(self, conn: Connection, units: list[_Unit], ctx: _Context) -> None:
        m = Member.__table__
        keys = [u.parsed["external_id"] for u in units]
        existing = {
            r["external_id"]: r
            for r in conn.execute(sa.select(m).where(m.c.external_id.in_(keys))).mappings()
        }
        s = ctx.settings
        defaults = dict(email=None, phone=None, country=s.shop_country, locale=s.shop_locale, timezone=s.shop_timezone,
                        birthday=None, tier=ctx.entry_tier, points_balance=0, region=None, city=None, age_group=None,
                        preferred_channels=_DEFAULT_CHANNELS, line_user_id=None)
        writes = []
        for u in units:
            u.outcome, row = _classify(u.parsed, existing.get(u.parsed["external_id"]), self.compared, defaults)
            if u.outcome != UNCHANGED:
                writes.append({**row, "created_at": ctx.now, "updated_at": ctx.now})
        if writes:
            ins = insert_for(conn, m)
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=["external_id"],
                    set_={c: ins.excluded[c] for c in (*self.compared, "updated_at")},
                ),
                writes,
            )


_DEFAULT_CHANNELS = str(Member.__table__.c.preferred_channels.default.arg)
LINE_USER_ID = re.compile(LINE_USER_ID_PATTERN)


class OrdersHandler(_Handler):
    """One row per order line; all lines of an order are consecutive and accepted or rejected together."""

    kind = "orders"
    required = ("order_id", "member_id", "placed_at", "status", "line_no", "sku", "product_name", "category",
                "quantity", "line_amount")
    optional = ("currency", "unit_price", "delivered_at")
    key_column = "order_id"
    groups_lines = True
    free_text = ("product_name",)
    order_columns = ("member_id", "placed_at", "status", "currency", "delivered_at")

    def parse(self, unit: _Unit, ctx: _Context) -> dict:
        first = unit.rows[0]
        order_ext = first.values.get("order_id", "")
        errors: dict[int, str] = {}
        lines: list[dict] = []
        seen_line_no: dict[int, int] = {}
        head: dict[str, Any] | None = None
        for row in unit.rows:
            try:
                if row.error:
                    raise v.ValidationError(row.error)
                vals = row.values
                if row is not first:
                    for c in self.order_columns:
                        if vals.get(c, "") != first.values.get(c, ""):
                            raise v.ValidationError(
                                f"{c} {v.quoted(vals.get(c, ''))} differs from line {first.line} "
                                f"of order {v.quoted(order_ext)}")
                if head is None:
                    head = self._parse_head(vals, ctx)
                line_no = v.parse_int(vals["line_no"], field="line_no", min_value=1, max_value=MAX_INT32)
                if line_no in seen_line_no:
                    raise v.ValidationError(
                        f"duplicate line_no {line_no} in order {v.quoted(order_ext)} "
                        f"(first on line {seen_line_no[line_no]})")
                seen_line_no[line_no] = row.line
                quantity = v.parse_int(vals["quantity"], field="quantity", min_value=1, max_value=MAX_INT32)
                amount = v.parse_amount_minor(vals["line_amount"], field="line_amount")
                unit_price = (v.parse_amount_minor(vals["unit_price"], field="unit_price")
                              if vals.get("unit_price") else None)
                lines.append(dict(
                    line_no=line_no,
                    sku=v.bounded_text(vals["sku"], field="sku", max_length=64, required=True),
                    product_name=v.bounded_text(vals["product_name"], field="product_name", max_length=200,
                                                required=True),
                    category=v.bounded_text(vals["category"], field="category", max_length=64, required=True),
                    quantity=quantity, amount_minor=amount, unit_price_minor=unit_price,
                ))
            except v.ValidationError as exc:
                errors[row.line] = str(exc)
        if errors:
            # An order with a bad line cannot be imported partially: its total would be wrong.
            bad = min(errors)
            for row in unit.rows:
                errors.setdefault(row.line, f"order {v.quoted(order_ext)} rejected because of line {bad}")
            unit.rejects.update(errors)
            return None
        assert head is not None
        head["lines"] = lines
        return head

    def _parse_head(self, vals: dict[str, str], ctx: _Context) -> dict:
        return dict(
            external_id=v.bounded_text(vals["order_id"], field="order_id", max_length=64, required=True),
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            placed_at=v.parse_datetime(_required(vals, "placed_at"), field="placed_at"),
            status=v.parse_enum(_required(vals, "status"), OrderStatus, field="status"),
            currency=v.normalise_currency(vals["currency"]) if vals.get("currency") else ctx.settings.shop_currency,
            delivered_at=(v.parse_datetime(vals["delivered_at"], field="delivered_at")
                          if vals.get("delivered_at") else None),
        )

    def write(self, conn: Connection, units: list[_Unit], ctx: _Context) -> None:
        units = _attach_members(conn, units)
        kept = []
        for u in units:
            p = u.parsed
            try:
                p["placed_at"] = v.not_in_future(v.localise(p["placed_at"], p["tz"], field="placed_at"),
                                                 field="placed_at", now=ctx.now)
                if p["delivered_at"] is not None:
                    p["delivered_at"] = v.not_in_future(v.localise(p["delivered_at"], p["tz"], field="delivered_at"),
                                                        field="delivered_at", now=ctx.now)
                    if p["delivered_at"] < p["placed_at"]:
                        raise v.ValidationError("delivered_at is before placed_at")
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            p["total_minor"] = sum(ln["amount_minor"] for ln in p["lines"])
            kept.append(u)
        if not kept:
            return
        product_ids = self._upsert_products(conn, kept)

        o, ol = Order.__table__, OrderLine.__table__
        keys = [u.parsed["external_id"] for u in kept]
        existing = {r["external_id"]: r for r in conn.execute(sa.select(o).where(o.c.external_id.in_(keys))).mappings()}
        existing_lines: dict[int, set[tuple]] = {}
        if existing:
            ids = [r["id"] for r in existing.values()]
            for r in conn.execute(sa.select(ol).where(ol.c.order_id.in_(ids))).mappings():
                existing_lines.setdefault(r["order_id"], set()).add(self._line_tuple(r))

        compared = ("member_id", "placed_at", "status", "total_minor", "currency", "delivered_at")
        writes, changed = [], []
        for u in kept:
            p = u.parsed
            for ln in p["lines"]:
                ln["product_id"] = product_ids[ln["sku"]]
                ln["currency"] = p["currency"]
            record = {c: p[c] for c in compared}
            old = existing.get(p["external_id"])
            u.outcome, _ = _classify(record, old, compared, {})
            if u.outcome == UNCHANGED and existing_lines.get(old["id"], set()) != {
                self._line_tuple(ln) for ln in p["lines"]
            }:
                u.outcome = UPDATED
            if u.outcome != UNCHANGED:
                writes.append({"external_id": p["external_id"], **record, "updated_at": ctx.now})
                changed.append(u)
        if not writes:
            return
        ins = insert_for(conn, o)
        stmt = ins.on_conflict_do_update(
            index_elements=["external_id"], set_={c: ins.excluded[c] for c in (*compared, "updated_at")}
        ).returning(o.c.id, o.c.external_id)
        order_ids = {r.external_id: r.id for r in conn.execute(stmt, writes)}
        # Lines of a changed order are replaced as a set; nothing references order_lines rows by id.
        updated_ids = [order_ids[u.parsed["external_id"]] for u in changed if u.outcome == UPDATED]
        if updated_ids:
            conn.execute(ol.delete().where(ol.c.order_id.in_(updated_ids)))
        conn.execute(
            ol.insert(),
            [
                dict(order_id=order_ids[u.parsed["external_id"]], line_no=ln["line_no"], product_id=ln["product_id"],
                     sku=ln["sku"], category=ln["category"], quantity=ln["quantity"], amount_minor=ln["amount_minor"],
                     currency=ln["currency"])
                for u in changed
                for ln in u.parsed["lines"]
            ],
        )

    @staticmethod
    def _line_tuple(r) -> tuple:
        return (r["line_no"], r["product_id"], r["sku"], r["category"], r["quantity"], r["amount_minor"], r["currency"])

    @staticmethod
    def _upsert_products(conn: Connection, units: list[_Unit]) -> dict[str, int]:
        """Upsert the catalogue by SKU (the batch's last mention of a SKU wins) and return ``{sku: id}``."""
        products: dict[str, dict] = {}
        for u in units:
            for ln in u.parsed["lines"]:
                price = ln["unit_price_minor"]
                if price is None:
                    # A reference price for the catalogue only; order amounts themselves are never rounded.
                    price = int((Decimal(ln["amount_minor"]) / ln["quantity"]).quantize(Decimal(1), ROUND_HALF_UP))
                products[ln["sku"]] = dict(sku=ln["sku"], name=ln["product_name"], category=ln["category"],
                                           price_minor=price, currency=u.parsed["currency"])
        p = Product.__table__
        ins = insert_for(conn, p)
        cols = ("name", "category", "price_minor", "currency")
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["sku"],
                set_={c: ins.excluded[c] for c in cols},
                # Skip the write (and its WAL/MVCC cost) when nothing changed.
                where=sa.or_(*(p.c[c] != ins.excluded[c] for c in cols)),
            ),
            sorted(products.values(), key=lambda r: r["sku"]),  # a stable lock order for concurrent imports
        )
        rows = conn.execute(sa.select(p.c.sku, p.c.id).where(p.c.sku.in_(list(products))))
        return {r.sku: r.id for r in rows}


def _required(vals: dict[str, str], column: str) -> str:
    text = vals.get(column, "")
    if not text:
        raise v.ValidationError(f"{column} is required")
    return text


class CouponsHandler(_Handler):
    kind = "coupons"
    required = ("code", "member_id", "kind", "value", "issued_at", "expires_at")
    optional = ("currency", "min_spend", "redeemed_at", "redeemed_order_id", "campaign")
    key_column = "code"
    compared = ("member_id", "kind", "amount_minor", "percent_off", "currency", "min_spend_minor", "issued_at",
                "expires_at", "redeemed_at", "redeemed_order_id", "campaign")

    def parse(self, unit: _Unit, ctx: _Context) -> dict:
        vals, present = unit.rows[0].values, ctx.present
        kind = v.parse_enum(_required(vals, "kind"), CouponKind, field="kind")
        value = _required(vals, "value")
        p: dict[str, Any] = dict(
            code=v.bounded_text(vals["code"], field="code", max_length=64, required=True),
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            kind=kind,
            amount_minor=None,
            percent_off=None,
            issued_at=v.parse_datetime(_required(vals, "issued_at"), field="issued_at"),
            expires_at=v.parse_datetime(_required(vals, "expires_at"), field="expires_at"),
        )
        if kind == CouponKind.AMOUNT:
            p["amount_minor"] = v.parse_amount_minor(value, field="value")
            if p["amount_minor"] <= 0:
                raise v.ValidationError("value of an amount coupon must be above 0")
        else:
            p["percent_off"] = v.parse_int(value.removesuffix("%"), field="value", min_value=1, max_value=100)
        if "currency" in present:
            p["currency"] = (v.normalise_currency(vals["currency"]) if vals.get("currency")
                             else ctx.settings.shop_currency)
        if "min_spend" in present:
            p["min_spend_minor"] = (v.parse_amount_minor(vals["min_spend"], field="min_spend")
                                    if vals.get("min_spend") else 0)
        if "redeemed_at" in present:
            p["redeemed_at"] = (v.parse_datetime(vals["redeemed_at"], field="redeemed_at")
                                if vals.get("redeemed_at") else None)
        if "redeemed_order_id" in present:
            p["redeemed_order_ext"] = _opt(vals, "redeemed_order_id")
            if p["redeemed_order_ext"] and not p.get("redeemed_at"):
                raise v.ValidationError("redeemed_order_id is given but redeemed_at is empty")
        if "campaign" in present:
            p["campaign"] = v.bounded_text(vals.get("campaign", ""), field="campaign", max_length=64)
        return p

    def write(self, conn: Connection, units: list[_Unit], ctx: _Context) -> None:
        units = _attach_members(conn, units)
        o = Order.__table__
        order_exts = sorted({u.parsed["redeemed_order_ext"] for u in units if u.parsed.get("redeemed_order_ext")})
        orders = ({r.external_id: (r.id, r.member_id)
                   for r in conn.execute(sa.select(o.c.external_id, o.c.id, o.c.member_id)
                                         .where(o.c.external_id.in_(order_exts)))}
                  if order_exts else {})
        kept = []
        for u in units:
            p = u.parsed
            try:
                for col in ("issued_at", "expires_at", "redeemed_at"):
                    if p.get(col) is not None:
                        p[col] = v.localise(p[col], p["tz"], field=col)
                if p["expires_at"] <= p["issued_at"]:
                    raise v.ValidationError("expires_at is not after issued_at")
                if p.get("redeemed_at") is not None:
                    v.not_in_future(p["redeemed_at"], field="redeemed_at", now=ctx.now)
                    if p["redeemed_at"] < p["issued_at"]:
                        raise v.ValidationError("redeemed_at is before issued_at")
                if "redeemed_order_ext" in p:
                    p["redeemed_order_id"] = None
                    if p["redeemed_order_ext"]:
                        hit = orders.get(p["redeemed_order_ext"])
                        if hit is None:
                            raise v.ValidationError(
                                f"unknown redeemed_order_id {v.quoted(p['redeemed_order_ext'])} (import orders first)")
                        if hit[1] != p["member_id"]:
                            raise v.ValidationError(
                                f"redeemed_order_id {v.quoted(p['redeemed_order_ext'])} belongs to another member")
                        p["redeemed_order_id"] = hit[0]
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            kept.append(u)
        c = Coupon.__table__
        defaults = dict(currency=ctx.settings.shop_currency, min_spend_minor=0, redeemed_at=None,
                        redeemed_order_id=None, campaign=None)
        _upsert_simple(conn, c, "code", kept, self.compared, defaults, ctx)


def _upsert_simple(conn: Connection, table: sa.Table, key: str, units: list[_Unit], compared: Sequence[str],
                   defaults: dict, ctx: _Context, *, stamp: dict | None = None) -> None:
    """The common path: fetch existing rows by key, classify, upsert the changed ones in one statement."""
    if not units:
        return
    keys = [u.parsed[key] for u in units]
    existing = {r[key]: r for r in conn.execute(sa.select(table).where(table.c[key].in_(keys))).mappings()}
    writes = []
    for u in units:
        record = {c: u.parsed[c] for c in compared if c in u.parsed}
        u.outcome, row = _classify(record, existing.get(u.parsed[key]), compared, defaults)
        if u.outcome != UNCHANGED:
            writes.append({key: u.parsed[key], **row, **(stamp or {})})
    if writes:
        ins = insert_for(conn, table)
        conn.execute(
            ins.on_conflict_do_update(index_elements=[key], set_={c: ins.excluded[c] for c in compared}), writes
        )


class DevicesHandler(_Handler):
    kind = "devices"
    required = ("member_id", "token", "platform", "app_id", "last_seen_at")
    optional = ("invalidated_at", "invalid_reason")
    key_column = "token"
    compared = ("member_id", "platform", "app_id", "last_seen_at", "invalidated_at", "invalid_reason")

    def describe_duplicate(self, key: Hashable, first_line: int) -> str:
        return f"duplicate token in this file (first on line {first_line}, which is kept)"  # tokens are secrets

    def parse(self, unit: _Unit, ctx: _Context) -> dict:
        vals, present = unit.rows[0].values, ctx.present
        p: dict[str, Any] = dict(
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            token=v.bounded_text(vals["token"], field="token", max_length=512, required=True),
            platform=v.parse_enum(_required(vals, "platform"), Platform, field="platform"),
            app_id=v.bounded_text(vals["app_id"], field="app_id", max_length=128, required=True),
            last_seen_at=v.parse_datetime(_required(vals, "last_seen_at"), field="last_seen_at"),
        )
        if any(ch.isspace() for ch in p["token"]):
            raise v.ValidationError("token contains whitespace")
        if "invalidated_at" in present:
            p["invalidated_at"] = (v.parse_datetime(vals["invalidated_at"], field="invalidated_at")
                                   if vals.get("invalidated_at") else None)
        if "invalid_reason" in present:
            p["invalid_reason"] = v.bounded_text(vals.get("invalid_reason", ""), field="invalid_reason", max_length=64)
        return p

    def write(self, conn: Connection, units: list[_Unit], ctx: _Context) -> None:
        kept = []
        for u in _attach_members(conn, units):
            p = u.parsed
            try:
                for col in ("last_seen_at", "invalidated_at"):
                    if p.get(col) is not None:
                        p[col] = v.not_in_future(v.localise(p[col], p["tz"], field=col), field=col, now=ctx.now)
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            kept.append(u)
        _upsert_simple(conn, Device.__table__, "token", kept, self.compared,
                       dict(invalidated_at=None, invalid_reason=None), ctx, stamp={"created_at": ctx.now})


class ConsentsHandler(_Handler):
    """Consent statements, appended to the history through :func:`membercare.consent.record_consents`."""

    kind = "consents"
    required = ("member_id", "channel", "purpose", "granted", "occurred_at")
    optional = ("source", "detail")
    free_text = ("detail",)

    def file_key(self, row: _Row) -> Hashable | None:
        vals = row.values
        if not vals.get("member_id"):
            return None
        try:
            when: Any = v.parse_datetime(vals.get("occurred_at", ""))
        except v.ValidationError:
            when = vals.get("occurred_at", "")
        return (vals["member_id"], vals.get("channel", "").lower(), vals.get("purpose", "").lower(), when)

    def describe_duplicate(self, key: Hashable, first_line: int) -> str:
        member, channel, purpose = key[0], key[1], key[2]  # type: ignore[index]
        return (f"duplicate statement for member_id {v.quoted(member)}, {v.quoted(channel)}/{v.quoted(purpose)} "
                f"at the same time (first on line {first_line}, which is kept)")

    def parse(self, unit: _Unit, ctx: _Context) -> dict:
        vals = unit.rows[0].values
        return dict(
            member_ext=v.bounded_text(vals["member_id"], field="member_id", max_length=64, required=True),
            channel=v.parse_enum(_required(vals, "channel"), Channel, field="channel"),
            purpose=v.parse_enum(_required(vals, "purpose"), Purpose, field="purpose"),
            granted=v.parse_bool(_required(vals, "granted"), field="granted"),
            occurred_at=v.parse_datetime(_required(vals, "occurred_at"), field="occurred_at"),
            source=(v.parse_enum(vals["source"], ConsentSource, field="source") if vals.get("source")
                    else ConsentSource.IMPORT.value),
            detail=v.bounded_text(vals.get("detail", ""), field="detail", max_length=500),
        )

    def write(self, conn: Connection, units: list[_Unit], ctx: _Context) -> None:
        kept = []
        for u in _attach_members(conn, units):
            p = u.parsed
            try:
                p["occurred_at"] = v.not_in_future(v.localise(p["occurred_at"], p["tz"], field="occurred_at"),
                                                   field="occurred_at", now=ctx.now)
            except v.ValidationError as exc:
                u.reject_all(str(exc))
                continue
            kept.append(u)
        if not kept:
            return
        ev = ConsentEvent.__table__
        key_cols = (ev.c.member_id, ev.c.channel, ev.c.purpose, ev.c.occurred_at)
        keys = [(u.parsed["member_id"], u.parsed["channel"], u.parsed["purpose"], u.parsed["occurred_at"])
                for u in kept]
        recorded: dict[tuple, set[bool]] = {}
        for r in conn.execute(sa.select(*key_cols, ev.c.granted).where(sa.tuple_(*key_cols).in_(keys))):
            recorded.setdefault((r.member_id, r.channel, r.purpose, r.occurred_at), set()).add(bool(r.granted))
        new = []
        in_batch: dict[tuple, int] = {}
        for u, key in zip(kept, keys, strict=True):
            stored = recorded.get(key)
            if key in in_batch:
                # The same instant written differently (naive local time vs. UTC offset) escapes the raw file key.
                p = u.parsed
                u.reject_all(f"duplicate statement for member_id {v.quoted(p['member_ext'])}, "
                             f"{p['channel']}/{p['purpose']} "
                             f"at the same instant (first on line {in_batch[key]}, which is kept)")
                continue
            in_batch[key] = u.first_line
            if not stored:
                u.outcome = INSERTED
                p = u.parsed
                new.append(ConsentStatement(member_id=p["member_id"], channel=p["channel"], purpose=p["purpose"],
                                            granted=p["granted"], source=p["source"], occurred_at=p["occurred_at"],
                                            detail=p["detail"]))
            elif stored == {u.parsed["granted"]}:
                u.outcome = UNCHANGED
            else:
                u.reject_all("contradicts the statement already recorded for this member, channel, purpose and time")
        record_consents(conn, new)


HANDLERS: dict[str, type[_Handler]] = {
    h.kind: h for h in (MembersHandler, OrdersHandler, CouponsHandler, DevicesHandler, ConsentsHandler)
}
KINDS: tuple[str, ...] = tuple(HANDLERS)


def columns_for(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(required, optional)`` columns of a kind's layout."""
    h = _handler(kind)
    return h.required, h.optional


def _handler(kind: str) -> _Handler:
    try:
        return HANDLERS[kind]()
    except KeyError:
        raise UnknownNameError("import kind", kind, KINDS) from None


# ---------------------------------------------------------------------------------------------------------------------
# The driver


def default_rejects_path(path: Path) -> Path:
    """``orders.csv`` -> ``orders.rejects.csv`` next to the input."""
    return path.with_name(f"{path.stem}.rejects.csv")


def import_csv(
    engine: Engine,
    kind: str,
    path: str | os.PathLike[str],
    *,
    settings: Settings | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rejects_path: str | os.PathLike[str] | None = None,
    allow_extra_columns: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_batch_committed: Callable[[BatchResult], None] | None = None,
) -> ImportReport:
    """Import one CSV file of ``kind`` (members, orders, coupons, devices, consents) into ``engine``'s database.

    ``progress(bytes_read, bytes_total)`` is called after each committed batch; ``on_batch_committed``
    receives each :class:`BatchResult` right after its commit (an exception raised there stops the import
    with everything up to that batch committed, which is how tests simulate a crash).

    Raises :class:`~membercare.errors.InputError` for problems with the file as a whole (missing, empty,
    not UTF-8, missing or unknown columns), always before anything is written; bad rows (including
    broken quoting, control characters and bytes that are not UTF-8 in a row) are reported, not raised.
    A database failure raises :class:`ImportDatabaseError`, whose message never holds row values.
    """
    handler = _handler(kind)
    settings = settings or Settings.from_env()
    if batch_size < 1:
        raise InputError("batch size must be at least 1")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    started = time.monotonic()
    source = _CsvSource(path, handler, allow_extra_columns=allow_extra_columns)
    report: ImportReport | None = None
    try:
        check_encoding(path)
        rejects = _RejectsWriter(Path(rejects_path) if rejects_path else default_rejects_path(path), source.header)
        ctx = _Context(settings=settings, present=source.present, now=utcnow(), **_load_tiers(engine))
        report = _start_run(engine, handler.kind, _source_name(path))
        try:
            _run(engine, handler, source, ctx, report, rejects, batch_size, progress, on_batch_committed)
        except BaseException as exc:
            rejects.discard()
            _finish_run(engine, report.run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        report.rejects_path = rejects.finish()
        _finish_run(engine, report.run_id, "completed")
        report.elapsed_s = time.monotonic() - started
        return report
    except sa.exc.SQLAlchemyError as exc:
        # str(exc) carries the statement, its bound parameters and the server's detail text (which can
        # quote the row): none of it is repeated. `from None`: not in a --debug traceback either.
        raise ImportDatabaseError(_database_failure(path, report, exc)) from None
    finally:
        source.close()


class ImportDatabaseError(MembercareError):
    """The database failed during an import (not the file's fault). The message holds no row values."""


def describe_db_error(exc: BaseException) -> str:
    """``IntegrityError, SQLSTATE 23505, constraint uq_x``: what a database error was, without its text.

    The text of a database error quotes the statement's parameters and, on PostgreSQL, often the row
    (``DETAIL: Key (email)=(...)``, ``Failing row contains (...)``). Only the class, the SQLSTATE and
    the names of the table, column and constraint involved are kept.
    """
    orig = getattr(exc, "orig", None) or exc
    parts = [type(exc).__name__]  # SQLAlchemy's class (IntegrityError, DataError, ...) is the same on every database
    if type(orig).__name__ != parts[0]:
        parts.append(type(orig).__name__)  # the driver's: CheckViolation, StringDataRightTruncation, ...
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    if sqlstate:
        parts.append(f"SQLSTATE {sqlstate}")
    diag = getattr(orig, "diag", None)
    for label, attr in (("table", "table_name"), ("column", "column_name"), ("constraint", "constraint_name")):
        name = getattr(diag, attr, None) if diag is not None else None
        if name:
            parts.append(f"{label} {name}")
    errorname = getattr(orig, "sqlite_errorname", None)  # sqlite3: SQLITE_CONSTRAINT_UNIQUE, SQLITE_BUSY, ...
    if errorname:
        parts.append(errorname)
    return ", ".join(parts)


def _database_failure(path: Path, report: ImportReport | None, exc: BaseException) -> str:
    what = describe_db_error(exc)
    if report is None or not report.batches:
        return f"{path.name}: the database failed before any row was imported ({what})"
    return (f"{path.name}: the database failed during the import ({what}); {report.rows_total:,} rows up to "
            f"batch {report.batches} had been committed (import run #{report.run_id} is marked failed). "
            "Run the same command again to import the rest: rows already imported count as unchanged")


def _run(engine: Engine, handler: _Handler, source: _CsvSource, ctx: _Context, report: ImportReport,
         rejects: _RejectsWriter, batch_size: int, progress, on_batch_committed) -> None:
    seen = _SeenKeys()
    try:
        _run_batches(engine, handler, source, ctx, report, rejects, batch_size, progress, on_batch_committed, seen)
    finally:
        seen.close()


def _run_batches(engine: Engine, handler: _Handler, source: _CsvSource, ctx: _Context, report: ImportReport,
                 rejects: _RejectsWriter, batch_size: int, progress, on_batch_committed, seen: _SeenKeys) -> None:
    batch: list[_Unit] = []
    rows_in_batch = 0
    for unit in _units(source.rows(), handler):
        batch.append(unit)
        rows_in_batch += len(unit.rows)
        if rows_in_batch >= batch_size:
            _process_batch(engine, handler, batch, ctx, seen, report, rejects, source, on_batch_committed)
            batch, rows_in_batch = [], 0
            if progress:
                progress(source.bytes_read, source.size)
    if batch:
        _process_batch(engine, handler, batch, ctx, seen, report, rejects, source, on_batch_committed)
    if progress:
        progress(source.size, source.size)


def _units(rows: Iterator[_Row], handler: _Handler) -> Iterator[_Unit]:
    if not handler.groups_lines:
        for row in rows:
            yield _Unit([row])
        return
    group: list[_Row] = []
    for row in rows:
        if group and row.values.get(handler.key_column, "") != group[0].values.get(handler.key_column, ""):
            yield _Unit(group)
            group = []
        group.append(row)
    if group:
        yield _Unit(group)


def _clean_key(key: Hashable | None) -> Hashable | None:
    """``None`` for a key holding control characters or bytes that were not UTF-8.

    Its row is rejected for them anyway, and such a key is no key: it is not kept in the scratch file
    of keys seen (which, like any SQLite text, cannot hold bytes that are not UTF-8).
    """
    parts = key if isinstance(key, tuple) else (key,)
    if any(isinstance(p, str) and v.has_suspect_characters(p) for p in parts):
        return None
    return key


def _commit_batch(engine: Engine, handler: _Handler, units: list[_Unit], valid: list[_Unit], ctx: _Context,
                  report: ImportReport, *, one_by_one: bool) -> tuple[dict[str, int], int, int]:
    """Write a batch's valid units and advance the run's counters in one transaction.

    ``one_by_one`` writes each unit in its own savepoint and rejects the units the database refuses
    (the reason names the error class and SQLSTATE, never the values).
    """
    counts = {INSERTED: 0, UPDATED: 0, UNCHANGED: 0}
    with engine.begin() as conn:
        if one_by_one:
            for u in valid:
                if u.rejects:  # rejected by the first attempt for a reason of its own (e.g. an unknown member)
                    continue
                u.outcome = None
                try:
                    with conn.begin_nested():
                        handler.write(conn, [u], ctx)
                except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
                    u.outcome = None
                    u.reject_all(f"the database refused this row ({describe_db_error(exc)})")
        elif valid:
            handler.write(conn, valid, ctx)
        n_rows = sum(len(u.rows) for u in units)
        n_rejected = 0
        for u in units:
            if u.rejects:
                n_rejected += len(u.rows)
            else:
                counts[u.outcome] += len(u.rows)  # type: ignore[index]
        runs = ImportRun.__table__
        conn.execute(
            runs.update()
            .where(runs.c.id == report.run_id)
            .values(
                rows_total=runs.c.rows_total + n_rows,
                rows_inserted=runs.c.rows_inserted + counts[INSERTED],
                rows_updated=runs.c.rows_updated + counts[UPDATED],
                rows_unchanged=runs.c.rows_unchanged + counts[UNCHANGED],
                rows_rejected=runs.c.rows_rejected + n_rejected,
            )
        )
    return counts, n_rows, n_rejected


def _process_batch(engine: Engine, handler: _Handler, units: list[_Unit], ctx: _Context, seen: _SeenKeys,
                   report: ImportReport, rejects: _RejectsWriter, source: _CsvSource, on_batch_committed) -> None:
    keys = [_clean_key(handler.file_key(u.rows[0])) for u in units]
    texts = [None if k is None else seen.text(k) for k in keys]
    first_seen = seen.first_lines(sorted({t for t in texts if t is not None}))
    new_keys: dict[str, int] = {}
    valid: list[_Unit] = []
    for u, key, text in zip(units, keys, texts, strict=True):
        if text is not None:
            first = first_seen.get(text) or new_keys.get(text)
            if first is not None:
                u.reject_all(handler.describe_duplicate(key, first))
                continue
            new_keys[text] = u.first_line
        structural = next((r for r in u.rows if r.error), None)
        if structural is not None and not handler.groups_lines:
            u.reject_all(structural.error or "")
            continue
        try:
            u.parsed = handler.parse(u, ctx)
        except v.ValidationError as exc:
            u.reject_all(str(exc))
            continue
        if u.parsed is not None and not u.rejects:
            valid.append(u)

    seen.add(new_keys.items())

    try:
        counts, n_rows, n_rejected = _commit_batch(engine, handler, units, valid, ctx, report, one_by_one=False)
    except (sa.exc.DataError, sa.exc.IntegrityError):
        if not valid:
            raise
        # The database refused a value that validation let through. The batch was rolled back; apply it
        # again one unit at a time so that only the refused rows are rejected.
        counts, n_rows, n_rejected = _commit_batch(engine, handler, units, valid, ctx, report, one_by_one=True)
    # Committed: only now do the batch's rejects reach the report, so a crash never reports a batch twice.
    for u in units:
        for row in u.rows:
            reason = u.rejects.get(row.line)
            if reason is not None:
                rejects.write(row, reason)
                if len(report.sample_rejects) < SAMPLE_REJECTS:
                    report.sample_rejects.append(Reject(row.line, reason))
    rejects.flush()
    report.batches += 1
    report.rows_total += n_rows
    report.inserted += counts[INSERTED]
    report.updated += counts[UPDATED]
    report.unchanged += counts[UNCHANGED]
    report.rejected += n_rejected
    if on_batch_committed:
        on_batch_committed(BatchResult(report.batches, n_rows, counts[INSERTED], counts[UPDATED], counts[UNCHANGED],
                                       n_rejected, source.bytes_read))


def _load_tiers(engine: Engine) -> dict[str, Any]:
    t = Tier.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.code, t.c.rank).order_by(t.c.rank)).all()
    if not rows:
        raise InputError("the tiers table is empty; run `membercare db upgrade` (it seeds the default tiers)")
    return {"tiers": {r.code: r.rank for r in rows}, "entry_tier": rows[0].code}


def _source_name(path: Path) -> str:
    name = str(path.resolve())
    return name if len(name) <= 500 else "..." + name[-497:]


def _start_run(engine: Engine, kind: str, source_name: str) -> ImportReport:
    runs = ImportRun.__table__
    with engine.begin() as conn:
        # A run of the same file still marked "running" was killed (or is running right now, in which case
        # both finish correctly since every write is an idempotent upsert): this run supersedes it.
        stale = conn.execute(
            sa.select(runs.c.id).where(runs.c.kind == kind, runs.c.source_name == source_name,
                                       runs.c.status == "running")
        ).scalars().all()
        if stale:
            conn.execute(runs.update().where(runs.c.id.in_(stale)).values(status="superseded", finished_at=utcnow()))
        run_id = conn.execute(
            runs.insert().values(kind=kind, source_name=source_name, started_at=utcnow(), status="running")
            .returning(runs.c.id)
        ).scalar_one()
    return ImportReport(run_id=run_id, kind=kind, source=source_name, superseded_runs=list(stale))


def _finish_run(engine: Engine, run_id: int, status: str) -> None:
    runs = ImportRun.__table__
    try:
        with engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(status=status, finished_at=utcnow()))
    except Exception:
        if status == "completed":
            raise
        # Recording a failure must not mask the error that caused it.
