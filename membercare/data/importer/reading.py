"""Reading a CSV file: the header, the UTF-8 check, and rows streamed over numbered physical lines.

``csv.reader`` runs over :class:`_Lines`, which knows the physical lines of the record being read, so a
record that cannot be read (a quote that never closes, an over-long record) rejects its first line only
and the lines after it are read again as rows. Failures of the file as a whole raise
:class:`~membercare.errors.InputError` before anything is written; after the header, a problem costs one
row (:class:`Row` with ``error`` set).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from membercare import validation as v
from membercare.errors import InputError

if TYPE_CHECKING:
    from membercare.data.importer.handler import Handler


@dataclass
class Row:
    line: int
    values: dict[str, str]  # layout column -> trimmed text, for the columns the header has
    raw: list[str]  # the fields as read, for the rejects file
    error: str | None = None  # a problem found while reading: fields, quoting, characters, encoding


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


class CsvSource:
    """A streaming CSV reader that knows the physical lines of each record and how many bytes it has consumed.

    Failures of the file as a whole (no header, wrong columns, the header not UTF-8) raise
    :class:`~membercare.errors.InputError` here, before anything is written. Everything after the header
    fails one row at a time: a row is yielded with ``error`` set and the reader carries on.
    """

    def __init__(self, path: Path, handler: Handler, *, allow_extra_columns: bool):
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
        if any(SURROGATE.search(h) for h in header):
            raise InputError(f"{name}: not UTF-8 text; save the file as UTF-8 CSV")
        for h in header:
            try:
                # Tabs and line breaks in a column name are harmless: canonical_column folds them.
                v.check_cell_characters(h, field="the header row", free_text=True)
            except v.ValidationError as exc:
                raise InputError(f"{name}: {exc}; is this a CSV text file?") from None
        return header

    def _check_header(self, handler: Handler, allow_extra: bool) -> None:
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

    def rows(self) -> Iterator[Row]:
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
                yield Row(start, values, fields, f"expected {n} fields, found {len(fields)}")
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
            yield Row(start, values, fields, error)

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

    def _broken_record(self, problem: str) -> Row:
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
        return Row(start, values, raw, problem)

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
            if SURROGATE.search(line):
                bad += 1
                first_bad = first_bad or lines.number
    if bad and bad * 2 >= non_ascii:
        raise InputError(
            f"{path.name}: not UTF-8 text ({bad:,} of the {non_ascii:,} lines with non-ASCII characters are not "
            f"valid UTF-8, the first is line {first_bad}); save the file as UTF-8 CSV (Excel: \"CSV UTF-8\")"
        )


SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile("\r\n|\r|\n")
