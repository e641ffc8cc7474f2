"""CSV import: upserts, rejects with line numbers, idempotence, crash safety, streaming, CLI.

Database tests run on SQLite and PostgreSQL (the ``engine`` fixture).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from membercare.config import Settings
from membercare.consent import current_consents
from membercare.data.importer import default_rejects_path, import_csv
from membercare.db import make_engine
from membercare.errors import InputError
from membercare.models import (
    ConsentEvent,
    Coupon,
    Device,
    ImportRun,
    Member,
    Order,
    OrderLine,
    Product,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "import"
SETTINGS = Settings(shop_timezone="Asia/Taipei", shop_locale="zh-TW", shop_currency="TWD", shop_country="TW")

MEMBER_HEADER = ["member_id", "name", "email", "phone", "country", "locale", "timezone", "birthday", "joined_at",
                 "tier", "points_balance", "region", "city", "age_group", "preferred_channels"]
ORDER_HEADER = ["order_id", "member_id", "placed_at", "status", "currency", "line_no", "sku", "product_name",
                "category", "quantity", "line_amount"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def member_row(i: int, **over) -> list[str]:
    row = dict(member_id=f"M{i:06d}", name=f"Member {i}", email=f"m{i}@example.com", phone=f"0912{i % 1_000_000:06d}",
               country="TW", locale="zh-TW", timezone="Asia/Taipei", birthday="1990-01-15",
               joined_at=f"2024-01-{1 + i % 28:02d} 10:{i % 60:02d}:00", tier=("silver", "gold", "platinum")[i % 3],
               points_balance=str(i % 500), region="North", city="Taipei", age_group="30-39",
               preferred_channels="push>email>sms")
    row.update(over)
    return [row[c] for c in MEMBER_HEADER]


def imp(engine, kind: str, path: Path, **kw):
    return import_csv(engine, kind, path, settings=SETTINGS, **kw)


def snapshot(engine, *tables, skip=("created_at", "updated_at", "recorded_at")) -> dict[str, list[tuple]]:
    """Table contents in key order, without the bookkeeping timestamps (they record when, not what)."""
    out = {}
    with engine.connect() as conn:
        for model in tables:
            t = model.__table__
            cols = [c for c in t.c if c.name not in skip]
            out[t.name] = [tuple(r) for r in conn.execute(sa.select(*cols).order_by(*t.primary_key.columns))]
    return out


ALL_TABLES = (Member, Order, OrderLine, Product, Coupon, Device, ConsentEvent)


def read_rejects(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def fixtures(tmp_path) -> Path:
    """The documented example files, copied so that rejects files land in a temp folder."""
    dst = tmp_path / "in"
    shutil.copytree(FIXTURES, dst)
    return dst


def import_all_fixtures(engine, folder: Path) -> dict:
    return {k: imp(engine, k, folder / f"{k}.csv") for k in ("members", "orders", "coupons", "devices", "consents")}


# ---------------------------------------------------------------------------------------------------------------------


def test_example_files_import_with_canonical_values(engine, fixtures):
    reports = import_all_fixtures(engine, fixtures)
    assert {k: (r.inserted, r.rejected) for k, r in reports.items()} == {
        "members": (4, 0), "orders": (4, 0), "coupons": (3, 0), "devices": (3, 0), "consents": (6, 0)}
    with engine.connect() as conn:
        m = {r.external_id: r for r in conn.execute(sa.select(Member.__table__))}
        assert m["M0001"].phone == "+886912345678"
        assert m["M0001"].joined_at == datetime(2023, 1, 5, 2, 15, tzinfo=UTC)  # 10:15 Taipei
        assert m["M0001"].preferred_channels == "push,email,sms"
        assert m["M0002"].birthday == date(2000, 2, 29)
        assert m["M0003"].phone == "+819012345678"  # parsed in the member's own region (JP)
        assert m["M0003"].joined_at == datetime(2023, 2, 28, 15, tzinfo=UTC)  # midnight Tokyo
        assert m["M0003"].points_balance == 5400
        # Empty cells take the defaults: shop country/timezone, entry tier, zero points.
        assert (m["M0004"].country, m["M0004"].timezone, m["M0004"].tier, m["M0004"].points_balance) == (
            "TW", "Asia/Taipei", "silver", 0)
        assert m["M0004"].phone is None and m["M0004"].birthday is None

        o = {r.external_id: r for r in conn.execute(sa.select(Order.__table__))}
        assert o["SO-1001"].total_minor == 90000 + 120050
        assert o["SO-1001"].placed_at == datetime(2024, 3, 1, 6, 5, tzinfo=UTC)
        assert o["SO-1003"].placed_at == datetime(2024, 3, 5, 10, 30, tzinfo=UTC)
        lines = conn.execute(sa.select(OrderLine.__table__).where(OrderLine.order_id == o["SO-1001"].id)
                             .order_by(OrderLine.line_no)).all()
        assert [(ln.sku, ln.quantity, ln.amount_minor) for ln in lines] == [
            ("SKU-TEA-01", 2, 90000), ("SKU-CUP-02", 1, 120050)]
        products = {r.sku: r for r in conn.execute(sa.select(Product.__table__))}
        assert set(products) == {"SKU-TEA-01", "SKU-CUP-02", "SKU-SET-03"}
        assert products["SKU-CUP-02"].price_minor == 120000  # the unit_price column
        assert products["SKU-SET-03"].price_minor == 298000  # derived from line_amount / quantity
        assert all(ln.product_id == products[ln.sku].id for ln in lines)

        c = {r.code: r for r in conn.execute(sa.select(Coupon.__table__))}
        assert c["WELCOME-M0001"].redeemed_order_id == o["SO-1001"].id
        bday = c["BDAY-M0002"]
        assert (bday.kind, bday.percent_off, bday.amount_minor) == ("percent", 15, None)
        assert c["VIP-M0003"].min_spend_minor == 500000
        d = conn.execute(sa.select(Device.__table__).where(Device.token.like("fcm-token-b%"))).one()
        assert d.invalidated_at == datetime(2024, 2, 1, tzinfo=UTC) and d.invalid_reason == "unregistered"
        # Consents went through record_consents: the later revocation is the current state.
        assert current_consents(conn, m["M0002"].id)[("email", "marketing")] is False
        assert current_consents(conn, m["M0001"].id)[("push", "marketing")] is True
        runs = conn.execute(sa.select(ImportRun.__table__).order_by(ImportRun.id)).all()
        assert [(r.kind, r.status, r.rows_total, r.rows_inserted) for r in runs] == [
            ("members", "completed", 4, 4), ("orders", "completed", 4, 4), ("coupons", "completed", 3, 3),
            ("devices", "completed", 3, 3), ("consents", "completed", 6, 6)]
    assert not any(fixtures.glob("*.rejects.csv"))


def test_reimport_changes_nothing(engine, fixtures):
    import_all_fixtures(engine, fixtures)
    before = snapshot(engine, *ALL_TABLES, skip=())  # including updated_at: unchanged rows are not rewritten
    again = import_all_fixtures(engine, fixtures)
    for kind, r in again.items():
        assert (r.inserted, r.updated, r.rejected) == (0, 0, 0), kind
        assert r.unchanged == r.rows_total > 0
    assert snapshot(engine, *ALL_TABLES, skip=()) == before


def test_changed_rows_are_updated_and_absent_columns_keep_their_values(engine, tmp_path):
    f = write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(i) for i in range(5)])
    imp(engine, "members", f)
    rows = [member_row(i) for i in range(5)]
    rows[2][MEMBER_HEADER.index("tier")] = "gold"  # was platinum
    rows[3][MEMBER_HEADER.index("email")] = ""  # an empty cell clears a nullable column
    r = imp(engine, "members", write_csv(tmp_path / "m2.csv", MEMBER_HEADER, rows))
    assert (r.inserted, r.updated, r.unchanged) == (0, 2, 3)
    # A file without the tier column leaves tiers alone.
    r = imp(engine, "members", write_csv(tmp_path / "m3.csv", ["member_id", "name", "joined_at"],
                                         [["M000002", "Renamed", "2024-01-03 10:02:00"]]))
    assert (r.updated, r.unchanged) == (1, 0)
    with engine.connect() as conn:
        m = {x.external_id: x for x in conn.execute(sa.select(Member.__table__))}
    assert (m["M000002"].name, m["M000002"].tier, m["M000002"].email) == ("Renamed", "gold", "m2@example.com")
    assert m["M000003"].email is None


def test_bad_member_rows_are_rejected_with_line_and_reason_and_good_rows_imported(engine, tmp_path):
    rows = [
        member_row(1),                                        # line 2 ok
        member_row(2, email="not-an-email"),                  # 3
        member_row(3, phone="12345"),                         # 4 invalid for TW
        member_row(4, tier="diamond"),                        # 5 not in the tiers table
        member_row(5, birthday="1990-02-29"),                 # 6 not a leap year
        member_row(6, timezone="Asia/Taipie"),                # 7
        member_row(7, locale="xx-YY"),                        # 8
        member_row(8, points_balance="-5"),                   # 9
        member_row(1, name="Second M000001"),                 # 10 duplicate key: first kept
        member_row(9, joined_at="2024-13-01"),                # 11
        member_row(10, name="Multi\nline name"),              # 12-13: a quoted field spanning two lines
        member_row(11, preferred_channels="push>fax"),        # 14
        member_row(12, phone="0912-345-678", country="JP"),   # 15 a TW mobile is no JP number
        member_row(13, joined_at="2999-01-01"),               # 16 future
        member_row(14, birthday="2000-02-29"),                # 17 ok (leap day)
    ]
    f = write_csv(tmp_path / "members.csv", MEMBER_HEADER, rows)
    with open(f, "a", encoding="utf-8") as fh:
        fh.write("M000015,Too few fields\n")                  # 18
    r = imp(engine, "members", f, batch_size=4)
    expected = {
        3: "invalid email", 4: "phone is not a valid number for region TW", 5: "unknown tier 'diamond'",
        6: "birthday '1990-02-29' is not a calendar date", 7: "unknown timezone", 8: "unknown locale",
        9: "points_balance -5 is below 0", 10: "duplicate member_id 'M000001' in this file (first on line 2",
        11: "joined_at '2024-13-01' is not a valid date", 14: "unknown channel 'fax'",
        15: "phone is not a valid number for region JP", 16: "in the future", 18: "expected 15 fields, found 2",
    }
    assert r.rejected == len(expected) and r.rows_total == 16 and r.inserted == 3
    assert r.rejects_path == default_rejects_path(f) == tmp_path / "members.rejects.csv"
    got = read_rejects(r.rejects_path)
    assert [int(x["line"]) for x in got] == sorted(expected)
    for x in got:
        assert expected[int(x["line"])] in x["reason"], x
    # Original columns are kept verbatim so the file can be fixed and re-imported.
    assert list(got[0])[: len(MEMBER_HEADER)] == MEMBER_HEADER and list(got[0])[-2:] == ["line", "reason"]
    assert got[0]["email"] == "not-an-email"
    with engine.connect() as conn:
        names = dict(conn.execute(sa.select(Member.external_id, Member.name)).all())
    assert names == {"M000001": "Member 1", "M000010": "Multi\nline name", "M000014": "Member 14"}
    assert [(x.line, x.reason) for x in r.sample_rejects][:1] == [(3, got[0]["reason"])]

    # After fixing nothing, a re-run rejects exactly the same rows and rewrites the rejects file.
    r2 = imp(engine, "members", f, batch_size=4)
    assert (r2.rejected, r2.unchanged, r2.inserted) == (r.rejected, 3, 0)
    assert read_rejects(r2.rejects_path) == got


def test_orders_unknown_members_bad_lines_and_duplicates(engine, tmp_path):
    imp(engine, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(1), member_row(2)]))

    def line(order, member, no, sku="SKU-1", qty="1", amount="100", status="paid", placed="2024-05-01 12:00"):
        return [order, member, placed, status, "TWD", str(no), sku, f"Product {sku}", "cat", qty, amount]

    rows = [
        line("O1", "M000001", 1), line("O1", "M000001", 2, "SKU-2", "2", "1,250.50"),  # 2-3 ok
        line("O2", "M999999", 1),                                                        # 4 unknown member
        line("O3", "M000002", 1), line("O3", "M000002", 2, amount="-5"),                 # 5-6 bad line -> whole order
        line("O4", "M000002", 1, status="lost"),                                         # 7
        line("O5", "M000002", 1, amount="1,20"),                                         # 8 ambiguous amount
        line("O1", "M000001", 3),                                                        # 9 O1 again, not consecutive
        line("O6", "M000002", 1), line("O6", "M000002", 1, "SKU-9"),                     # 10-11 duplicate line_no
        line("O7", "M000002", 1), line("O7", "M000001", 2),                              # 12-13 member differs
        line("O8", "M000002", 1, placed="2024-02-30"),                                   # 14
        line("O9", "M000002", 1, qty="0"),                                               # 15
        line("O10", "M000002", 1, sku="SKU-3", amount="0"),                              # 16 ok (free gift)
    ]
    r = imp(engine, "orders", write_csv(tmp_path / "orders.csv", ORDER_HEADER, rows), batch_size=3)
    got = {int(x["line"]): x["reason"] for x in read_rejects(r.rejects_path)}
    assert "unknown member_id 'M999999'" in got[4]
    assert "line_amount '-5' is negative" in got[6] and "rejected because of line 6" in got[5]
    assert "unknown status 'lost'" in got[7]
    assert "line_amount '1,20' is not an amount" in got[8]
    assert "duplicate order_id 'O1' in this file (first on line 2" in got[9]
    assert "duplicate line_no 1" in got[11] and "rejected because of line 11" in got[10]
    assert "member_id 'M000001' differs from line 12" in got[13] and 12 in got
    assert "placed_at" in got[14] and "quantity 0 is below 1" in got[15]
    assert set(got) == {4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
    assert (r.inserted, r.rejected, r.rows_total) == (3, 12, 15)
    with engine.connect() as conn:
        totals = dict(conn.execute(sa.select(Order.external_id, Order.total_minor)).all())
        assert totals == {"O1": 10000 + 125050, "O10": 0}
        assert conn.execute(sa.select(sa.func.count()).select_from(OrderLine.__table__)).scalar() == 3


def test_orders_spanning_batch_boundaries_keep_all_their_lines(engine, tmp_path):
    imp(engine, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(1)]))
    rows = []
    for o in range(10):  # 10 orders of 1..4 lines; batch size 3 would split most of them
        for n in range(1, 2 + o % 4):
            rows.append([f"O{o}", "M000001", "2024-05-01 12:00", "paid", "TWD", str(n), f"SKU-{n}", f"P{n}", "c",
                         "1", f"{10 * n}"])
    seen_batches = []
    r = imp(engine, "orders", write_csv(tmp_path / "o.csv", ORDER_HEADER, rows), batch_size=3,
            on_batch_committed=seen_batches.append)
    assert (r.inserted, r.rejected) == (len(rows), 0)
    assert all(b.rows >= 3 for b in seen_batches[:-1]) and sum(b.rows for b in seen_batches) == len(rows)
    with engine.connect() as conn:
        totals = dict(conn.execute(sa.select(Order.external_id, Order.total_minor)).all())
    assert totals == {f"O{o}": sum(1000 * n for n in range(1, 2 + o % 4)) for o in range(10)}

    # Changing one line of one order updates exactly that order (all of its rows count as updated).
    assert rows[1][:2] == ["O1", "M000001"] and rows[1][5] == "1"
    rows[1][-1] = "25"
    r = imp(engine, "orders", write_csv(tmp_path / "o2.csv", ORDER_HEADER, rows), batch_size=3)
    assert (r.updated, r.unchanged) == (2, len(rows) - 2)
    with engine.connect() as conn:
        assert conn.execute(sa.select(Order.total_minor).where(Order.external_id == "O1")).scalar() == 2500 + 2000


def _crash_after(k: int):
    def hook(batch):
        if batch.number == k:
            raise RuntimeError(f"simulated crash after batch {k}")
    return hook


def test_crash_after_a_batch_leaves_whole_batches_and_a_rerun_completes(engine, tmp_path, sqlite_template):
    rows = [member_row(i) for i in range(50)] + [member_row(1000, email="bad")]
    f = write_csv(tmp_path / "members.csv", MEMBER_HEADER, rows)
    with pytest.raises(RuntimeError, match="simulated crash"):
        imp(engine, "members", f, batch_size=7, on_batch_committed=_crash_after(3))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Member.__table__)).scalar() == 21
        run = conn.execute(sa.select(ImportRun.__table__)).one()
    assert (run.status, run.rows_total, run.rows_inserted) == ("failed", 21, 21)
    assert not (tmp_path / "members.rejects.csv.part").exists()

    r = imp(engine, "members", f, batch_size=7)
    assert (r.inserted, r.unchanged, r.rejected) == (29, 21, 1)

    # The result is exactly that of an uninterrupted import into a fresh database.
    ref_path = tmp_path / "ref.db"
    shutil.copyfile(sqlite_template, ref_path)
    ref = make_engine(f"sqlite:///{ref_path}")
    try:
        imp(ref, "members", f, batch_size=7, rejects_path=tmp_path / "ref-rejects.csv")
        assert snapshot(engine, Member) == snapshot(ref, Member)
    finally:
        ref.dispose()


def test_orders_crash_and_rerun(engine, tmp_path):
    imp(engine, "members", write_csv(tmp_path / "m.csv", MEMBER_HEADER, [member_row(i) for i in range(3)]))
    rows = [[f"O{o}", f"M{o % 3:06d}", "2024-05-01 12:00", "paid", "TWD", str(n), f"S{n}", "p", "c", "1", "10"]
            for o in range(20) for n in (1, 2, 3)]
    f = write_csv(tmp_path / "o.csv", ORDER_HEADER, rows)
    with pytest.raises(RuntimeError):
        imp(engine, "orders", f, batch_size=5, on_batch_committed=_crash_after(2))
    with engine.connect() as conn:
        n_orders = conn.execute(sa.select(sa.func.count()).select_from(Order.__table__)).scalar()
        n_lines = conn.execute(sa.select(sa.func.count()).select_from(OrderLine.__table__)).scalar()
    assert (n_orders, n_lines) == (4, 12)  # two batches of two whole orders
    r = imp(engine, "orders", f, batch_size=5)
    assert (r.inserted, r.unchanged) == (48, 12)
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(Order.total_minor)).scalars()) == {3000}


def test_coupons_devices_consents_rejects(engine, fixtures, tmp_path):
    import_all_fixtures(engine, fixtures)
    coupons = write_csv(tmp_path / "c.csv", ["code", "member_id", "kind", "value", "issued_at", "expires_at",
                                             "redeemed_at", "redeemed_order_id"], [
        ["C-OK", "M0001", "percent", "10%", "2024-01-01", "2024-02-01", "", ""],
        ["C-EXP", "M0001", "amount", "100", "2024-02-01", "2024-01-01", "", ""],
        ["C-PCT", "M0001", "percent", "150", "2024-01-01", "2024-02-01", "", ""],
        ["C-ORD", "M0002", "amount", "50", "2024-01-01", "2024-12-01", "2024-03-05", "SO-1001"],  # M0001's order
        ["C-NOORD", "M0002", "amount", "50", "2024-01-01", "2024-12-01", "2024-03-05", "SO-404"],
        ["C-KIND", "M0002", "bogus", "50", "2024-01-01", "2024-12-01", "", ""],
        ["C-ZERO", "M0002", "amount", "0", "2024-01-01", "2024-12-01", "", ""],
        ["C-OK", "M0002", "amount", "10", "2024-01-01", "2024-12-01", "", ""],
    ])
    r = imp(engine, "coupons", coupons)
    got = {int(x["line"]): x["reason"] for x in read_rejects(r.rejects_path)}
    assert r.inserted == 1 and set(got) == {3, 4, 5, 6, 7, 8, 9}
    assert "expires_at is not after issued_at" in got[3] and "150 is above 100" in got[4]
    assert "belongs to another member" in got[5] and "unknown redeemed_order_id 'SO-404'" in got[6]
    assert "duplicate code 'C-OK'" in got[9]

    devices = write_csv(tmp_path / "d.csv", ["member_id", "token", "platform", "app_id", "last_seen_at"], [
        ["M0001", "tok-secret-1", "blackberry", "app", "2024-01-01"],
        ["M0404", "tok-secret-2", "ios", "app", "2024-01-01"],
        ["M0002", "tok-secret-3", "ios", "app", "2024-01-01"],
        ["M0003", "tok-secret-3", "ios", "app", "2024-01-01"],
    ])
    r = imp(engine, "devices", devices)
    got = {int(x["line"]): x["reason"] for x in read_rejects(r.rejects_path)}
    assert "unknown platform" in got[2] and "unknown member_id 'M0404'" in got[3]
    assert "duplicate token" in got[5] and "tok-secret" not in got[5]  # tokens are never echoed in reasons

    consents = write_csv(tmp_path / "k.csv", ["member_id", "channel", "purpose", "granted", "occurred_at"], [
        ["M0001", "email", "marketing", "no", "2023-01-05 10:15:00"],   # contradicts the fixture's statement
        ["M0001", "fax", "marketing", "yes", "2024-01-01"],
        ["M0001", "sms", "marketing", "perhaps", "2024-01-01"],
        ["M0004", "email", "marketing", "yes", "2024-07-01 09:00"],
        ["M0004", "email", "marketing", "no", "2024-07-01T01:00:00Z"],  # same instant as line 5
    ])
    r = imp(engine, "consents", consents)
    got = {int(x["line"]): x["reason"] for x in read_rejects(r.rejects_path)}
    assert set(got) == {2, 3, 4, 6} and r.inserted == 1
    assert "contradicts" in got[2] and "unknown channel 'fax'" in got[3] and "perhaps" in got[4]
    assert "duplicate statement" in got[6]


def test_file_level_problems_are_input_errors(engine, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        imp(engine, "members", tmp_path / "missing.csv")
    with pytest.raises(InputError, match="unknown import kind"):
        imp(engine, "customers", FIXTURES / "members.csv")
    with pytest.raises(InputError, match="missing required column"):
        imp(engine, "members", write_csv(tmp_path / "a.csv", ["member_id", "name"], [["M1", "x"]]))
    with pytest.raises(InputError, match="unknown column.*'emial'"):
        imp(engine, "members", write_csv(tmp_path / "b.csv", ["member_id", "name", "joined_at", "emial"], []))
    r = imp(engine, "members", write_csv(tmp_path / "c.csv", ["Member ID", "Name", "Joined At", "notes"],
                                         [["M1", "x", "2024-01-01", "vip"]]), allow_extra_columns=True)
    assert r.inserted == 1
    (tmp_path / "big5.csv").write_bytes(b"member_id,name,joined_at\nM2," + "陳".encode("big5") + b",2024-01-01\n")
    with pytest.raises(InputError, match="not UTF-8"):
        imp(engine, "members", tmp_path / "big5.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        imp(engine, "members", tmp_path / "empty.csv")
    # A byte-order mark (as spreadsheet programs write) is not part of the first column name.
    (tmp_path / "bom.csv").write_bytes("\ufeffmember_id,name,joined_at\r\nM3,y,2024-01-01\r\n".encode())
    assert imp(engine, "members", tmp_path / "bom.csv").inserted == 1


# ---------------------------------------------------------------------------------------------------------------------
# Large files


LEAN_HEADER = ["member_id", "name", "joined_at", "tier", "points_balance", "region", "city"]


def generate_members(path: Path, n: int) -> Path:
    """A large members file in a lean layout (no email/phone: their validators would dominate the run time)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(LEAN_HEADER)
        for i in range(n):
            w.writerow([f"M{i:07d}", f"Member {i}", f"2024-01-{1 + i % 28:02d} 10:{i % 60:02d}:00",
                        ("silver", "gold", "platinum")[i % 3], str(i % 500), "North", "Taipei"])
    return path


@pytest.mark.slow
def test_streaming_a_large_file_keeps_memory_bounded(sqlite_engine, tmp_path):
    # Memory must not grow with the file: the peak for a file 4x larger stays about the same.
    # (tracemalloc slows the import about 5x, so the files are kept modest.)
    small = generate_members(tmp_path / "small.csv", 10_000)
    big = generate_members(tmp_path / "big.csv", 40_000)
    size = big.stat().st_size
    imp(sqlite_engine, "members", FIXTURES / "members.csv", rejects_path=tmp_path / "r.csv")  # warm imports/caches

    def traced(path, **kw):
        tracemalloc.start()
        try:
            result = imp(sqlite_engine, "members", path, **kw)
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, peak_small = traced(small)
    sqlite_engine.dispose()
    with sqlite_engine.begin() as conn:  # same ids in both files: start the big run from empty
        conn.execute(sa.text("DELETE FROM members"))
    progress = []
    r, peak_big = traced(big, progress=lambda done, total: progress.append((done, total)))
    assert r.inserted == 40_000
    assert peak_big < 1.5 * peak_small + 2**20, f"peak grew from {peak_small / 2**20:.1f} to {peak_big / 2**20:.1f} MiB"
    assert peak_big < 24 * 2**20
    assert progress[-1] == (size, size) and progress == sorted(progress) and len(progress) >= 20


def _cli(*args: str, db: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update({"MEMBERCARE_DATABASE_URL": db, "COLUMNS": "200"}, **(env_extra or {}))
    cmd = [sys.executable, "-c",
           "import sys, membercare.cli as c, membercare.cli.imports; c.main(sys.argv[1:])", "import", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kw)


@pytest.mark.slow
def test_sigkill_mid_file_leaves_whole_batches_and_rerun_completes(sqlite_url, tmp_path, sqlite_template):
    n, batch = 30_000, 1_000
    f = generate_members(tmp_path / "members.csv", n)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env["MEMBERCARE_DATABASE_URL"] = sqlite_url
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, membercare.cli as c, membercare.cli.imports; c.main(sys.argv[1:])",
         "import", "members", str(f), "--batch-size", str(batch)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    engine = make_engine(sqlite_url)
    try:
        deadline = time.monotonic() + 120
        committed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            with engine.connect() as conn:
                committed = conn.execute(sa.select(sa.func.coalesce(sa.func.max(ImportRun.rows_total), 0))).scalar()
            if committed >= 3 * batch:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the import finished before it could be killed; raise n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with engine.connect() as conn:
            members = conn.execute(sa.select(sa.func.count()).select_from(Member.__table__)).scalar()
            run = conn.execute(sa.select(ImportRun.__table__)).one()
        assert run.status == "running"
        assert members == run.rows_total == run.rows_inserted and members % batch == 0 and 0 < members < n

        r = imp(engine, "members", f, batch_size=batch)
        assert (r.inserted, r.unchanged, r.superseded_runs) == (n - members, members, [run.id])
        with engine.connect() as conn:
            assert conn.execute(sa.select(ImportRun.status).where(ImportRun.id == run.id)).scalar() == "superseded"

        ref_path = tmp_path / "ref.db"
        shutil.copyfile(sqlite_template, ref_path)
        ref = make_engine(f"sqlite:///{ref_path}")
        try:
            imp(ref, "members", f, batch_size=batch)
            assert snapshot(engine, Member) == snapshot(ref, Member)
        finally:
            ref.dispose()
    finally:
        if proc.poll() is None:
            proc.kill()
        engine.dispose()


@pytest.mark.slow  # several CLI processes, each importing the application
def test_cli_exit_codes_and_summary(sqlite_url, tmp_path):
    good = tmp_path / "members.csv"
    shutil.copyfile(FIXTURES / "members.csv", good)
    out = _cli("members", str(good), db=sqlite_url)
    assert out.returncode == 0, out.stderr
    assert "import members: members.csv" in out.stdout and "inserted" in out.stdout
    assert "│    4 │        4 │" in out.stdout

    bad = write_csv(tmp_path / "bad.csv", MEMBER_HEADER, [member_row(1), member_row(2, email="nope")])
    out = _cli("members", str(bad), "--rejects", str(tmp_path / "out" / "rej.csv"), db=sqlite_url)
    assert out.returncode == 3, out.stderr
    assert "invalid email" in out.stdout and "rej.csv" in out.stdout
    assert [x["line"] for x in read_rejects(tmp_path / "out" / "rej.csv")] == ["3"]

    out = _cli("orders", str(good), db=sqlite_url)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error:") and "missing required column" in out.stderr
