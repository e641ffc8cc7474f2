"""What an import reports: the counters (:class:`ImportReport`, :class:`BatchResult`) and the rejects file.

The rejects file holds the original columns of each rejected row plus ``line`` and ``reason``; every cell
goes through :func:`spreadsheet_cell`, since the report is meant to be opened in a spreadsheet program.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from membercare.data.importer.reading import SURROGATE, Row, canonical_column

if TYPE_CHECKING:
    from _csv import Writer


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
    if SURROGATE.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if text and text[0] in _FORMULA_START and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


class RejectsWriter:
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
        self._file: TextIO | None = None
        self._writer: Writer | None = None

    def write(self, row: Row, reason: str) -> None:
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
