"""The demo shop generator: reproducibility, realism (as distributions), consistency, refusal, backends."""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta

import phonenumbers
import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from membercare.consent import ConsentStatement, record_consents
from membercare.data.generator import SHOP_TABLES, clear_shop, default_as_of, generate_shop
from membercare.data.generator import reference as D
from membercare.db import make_engine
from membercare.errors import InputError
from membercare.models import PURCHASE_STATUSES, Consent, ConsentEvent, Member

AS_OF = datetime(2026, 3, 10, 16, 0, tzinfo=UTC)  # 2026-03-11 00:00 in Taipei
TODAY = date(2026, 3, 11)
N = 5000


def _fresh(template, directory) -> str:
    path = directory / "shop.db"
    shutil.copyfile(template, path)
    return str(path)


def _dump(path: str) -> dict[str, list[tuple]]:
    """Every shop table exactly as stored (raw sqlite3, no type processing)."""
    with sqlite3.connect(path) as c:
        return {t: c.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in SHOP_TABLES}


def _ts(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def shop(sqlite_template, tmp_path_factory):
    """One generated shop of N members, read through raw sqlite3 by the realism tests."""
    path = _fresh(sqlite_template, tmp_path_factory.mktemp("shop"))
    eng = make_engine(f"sqlite:///{path}")
    summary = generate_shop(eng, members=N, seed=11, as_of=AS_OF)
    eng.dispose()
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    yield conn, summary
    conn.close()


def _q(shop, sql, *args):
    return shop[0].execute(sql, args).fetchall()


# --- Reproducibility ---------------------------------------------------------------------------------


def test_same_inputs_give_byte_identical_tables_whatever_the_batch_size(sqlite_template, tmp_path):
    dumps = []
    for i, (seed, batch) in enumerate([(5, 5000), (5, 700), (6, 5000)]):
        d = tmp_path / str(i)
        d.mkdir()
        path = _fresh(sqlite_template, d)
        eng = make_engine(f"sqlite:///{path}")
        generate_shop(eng, members=1500, seed=seed, as_of=AS_OF, batch_size=batch)
        eng.dispose()
        dumps.append(_dump(path))
    same, other_batch, other_seed = dumps
    assert all(same[t] for t in SHOP_TABLES)
    assert same == other_batch
    assert other_seed["members"] != same["members"]
    assert other_seed["orders"] != same["orders"]


def test_default_as_of_is_start_of_the_shop_day_in_utc():
    assert default_as_of(today=date(2026, 3, 11)) == AS_OF
    assert default_as_of().tzinfo is not None


# --- Members -------------------------------------------------------------------------------------------


def test_locales_names_and_geography(shop):
    rows = _q(shop, "SELECT name, locale, country, timezone, region, city FROM members")
    locales = Counter(r["locale"] for r in rows)
    assert 0.70 < locales["zh-TW"] / len(rows) < 0.80
    assert set(locales) == {"zh-TW", "en"}
    surnames = {s for s, _, _ in D.TW_SURNAMES}
    for r in rows:
        if r["locale"] == "zh-TW":
            assert r["name"][0] in surnames and 2 <= len(r["name"]) <= 4
        else:
            assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", r["name"])
    tz_of = {"TW": {"Asia/Taipei"}, "HK": {"Asia/Hong_Kong"}, "SG": {"Asia/Singapore"}, "JP": {"Asia/Tokyo"},
             "US": {a[1] for a in D.US_AREAS}}
    assert all(r["timezone"] in tz_of[r["country"]] for r in rows)
    countries = Counter(r["country"] for r in rows)
    assert countries["TW"] / len(rows) > 0.8 and len(countries) == 5
    tw_cities = {c for _, c, _ in D.TW_CITIES}
    assert {r["city"] for r in rows if r["country"] == "TW"} <= tw_cities
    big = Counter(r["city"] for r in rows if r["country"] == "TW")
    assert {"Taipei", "New Taipei", "Taichung", "Kaohsiung"} <= {c for c, _ in big.most_common(6)}


def test_phones_are_valid_mobiles_of_the_member_country(shop):
    rows = _q(shop, "SELECT phone, country FROM members WHERE phone IS NOT NULL ORDER BY id")
    assert len(rows) / N > 0.9
    assert len({r["phone"] for r in rows}) == len(rows), "phone numbers are unique"
    mobile = {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}
    by_country = defaultdict(list)
    for r in rows:
        by_country[r["country"]].append(r["phone"])
    assert set(by_country) == {"TW", "HK", "SG", "JP", "US"}
    for country, phones in by_country.items():
        for phone in phones[:150]:
            num = phonenumbers.parse(phone, None)
            assert phonenumbers.is_valid_number(num), phone
            assert phonenumbers.region_code_for_number(num) == country, phone
            assert phonenumbers.number_type(num) in mobile, phone
    assert all(re.fullmatch(r"\+8869\d{8}", p) for p in by_country["TW"])


def test_emails_use_reserved_domains_only_and_some_contacts_are_missing(shop):
    rows = _q(shop, "SELECT email, phone FROM members")
    emails = [r["email"] for r in rows if r["email"]]
    reserved = re.compile(r"^[a-z0-9.\-]+@(example\.(com|net|org)|[a-z0-9\-]+\.example)$")
    assert all(reserved.match(e) for e in emails)
    assert len(set(emails)) == len(emails)
    no_email = sum(r["email"] is None for r in rows)
    no_phone = sum(r["phone"] is None for r in rows)
    assert 0.01 * N < no_email < 0.08 * N
    assert 0.01 * N < no_phone < 0.10 * N


def test_birthdays_feb29_missing_today_and_age_groups(shop):
    rows = _q(shop, "SELECT birthday, age_group FROM members")
    missing = sum(r["birthday"] is None for r in rows)
    assert 0.12 < missing / N < 0.18
    bdays = [date.fromisoformat(r["birthday"]) for r in rows if r["birthday"]]  # Feb 29 only in leap years
    feb29 = sum((b.month, b.day) == (2, 29) for b in bdays)
    assert 2 <= feb29 <= 12  # about 1 in 1461, guaranteed a few at N >= 5,000
    assert sum((b.month, b.day) == (TODAY.month, TODAY.day) for b in bdays) >= 5
    groups = {g for g, *_ in D.AGE_GROUPS}
    for r in rows:
        if r["birthday"] is None:
            assert r["age_group"] is None
            continue
        b = date.fromisoformat(r["birthday"])
        age = TODAY.year - b.year - ((b.month, b.day) > (TODAY.month, TODAY.day))
        assert r["age_group"] in groups and age >= 18
        lo, hi = next((a1, a2) for g, a1, a2, _ in D.AGE_GROUPS if g == r["age_group"])
        assert lo <= age <= hi or (r["age_group"] == "65+" and age >= 65)


def test_joined_over_three_years_with_a_fresh_cohort(shop):
    joined = [_ts(r[0]) for r in _q(shop, "SELECT joined_at FROM members")]
    assert max(joined) < AS_OF
    assert min(joined) > AS_OF - timedelta(days=3 * 365 + 10)
    assert min(joined) < AS_OF - timedelta(days=2 * 365)
    last_week = sum(j > AS_OF - timedelta(days=7) for j in joined)
    assert 0.01 * N < last_week < 0.05 * N


# --- Purchases ----------------------------------------------------------------------------------------


def _purchases(shop) -> dict[int, list[datetime]]:
    out = defaultdict(list)
    statuses = ",".join(f"'{s}'" for s in PURCHASE_STATUSES)
    for r in _q(shop, f"SELECT member_id, placed_at FROM orders WHERE status IN ({statuses}) "
                      "ORDER BY member_id, placed_at"):
        out[r[0]].append(_ts(r[1]))
    return out


def test_buy_till_you_die_mix_of_one_timers_repeaters_and_churned(shop):
    n_orders = _q(shop, "SELECT COUNT(*) FROM orders")[0][0]
    assert 4.0 < n_orders / N < 6.0  # the benchmarks expect about five orders per member
    p = _purchases(shop)
    counts = Counter(len(v) for v in p.values())
    buyers = len(p)
    assert 0.75 * N < buyers < 0.95 * N  # some members never bought
    assert 0.2 < counts[1] / buyers < 0.5  # many one-time buyers
    loyal = sum(c for k, c in counts.items() if k >= 15)
    assert loyal / buyers > 0.03  # and a tail of loyal repeaters
    # Churned: repeat buyers silent for more than three of their usual gaps and at least 90 days.
    churned = active = 0
    for times in p.values():
        if len(times) < 3:
            continue
        gap = (times[-1] - times[0]) / (len(times) - 1)
        recency = AS_OF - times[-1]
        if recency > max(3 * gap, timedelta(days=90)):
            churned += 1
        elif recency < timedelta(days=30):
            active += 1
    repeaters = sum(c for k, c in counts.items() if k >= 3)
    assert churned / repeaters > 0.15
    assert active / repeaters > 0.15


def test_orders_statuses_delivery_and_totals(shop):
    rows = _q(shop, "SELECT id, member_id, placed_at, status, total_minor, currency, delivered_at, updated_at "
                    "FROM orders")
    status = Counter(r["status"] for r in rows)
    bad = (status["cancelled"] + status["refunded"]) / len(rows)
    assert 0.02 < bad < 0.08 and status["cancelled"] and status["refunded"]
    assert status["delivered"] / len(rows) > 0.8
    for r in rows:
        placed, delivered = _ts(r["placed_at"]), _ts(r["delivered_at"])
        assert placed < AS_OF and _ts(r["updated_at"]) <= AS_OF and r["currency"] == "TWD"
        if r["status"] in ("delivered", "refunded"):
            assert placed < delivered < AS_OF
        else:
            assert delivered is None
    joined = dict(_q(shop, "SELECT id, joined_at FROM members"))
    assert all(_ts(r["placed_at"]) > _ts(joined[r["member_id"]]) for r in rows)
    line_sum = dict(_q(shop, "SELECT order_id, SUM(amount_minor) FROM order_lines GROUP BY order_id"))
    assert all(line_sum[r["id"]] == r["total_minor"] for r in rows)
    avg = sum(r["total_minor"] for r in rows) / len(rows) / 100
    assert 600 < avg < 3000  # NT$ per order


def test_catalogue_and_co_purchase_structure(shop):
    products = _q(shop, "SELECT sku, category, price_minor, currency FROM products")
    assert 180 <= len(products) <= 220
    assert len({p["category"] for p in products}) == 12
    assert all(p["price_minor"] % 100 == 0 and 5_000 <= p["price_minor"] <= 1_000_000 for p in products)
    lines = _q(shop, "SELECT l.order_id, l.category, l.sku, p.category AS pcat FROM order_lines l "
                     "JOIN products p ON p.id = l.product_id")
    assert all(r["category"] == r["pcat"] for r in lines)
    baskets = defaultdict(set)
    for r in lines:
        baskets[r["order_id"]].add(r["category"])
    multi = [b for b in baskets.values() if len(b) > 1]
    share = Counter(c for b in baskets.values() for c in b)
    together = Counter(frozenset(p) for b in multi for p in _pairs(b))
    total = len(baskets)

    def lift(a, b):
        return (together[frozenset((a, b))] / total) / ((share[a] / total) * (share[b] / total))

    # Complementary pairs are bought together more often than independence predicts; a random pair is not.
    assert lift("skincare", "makeup") > 1.5
    assert lift("coffee", "snacks") > 1.2  # one-directional pair (snacks pair with tea)
    assert lift("pet", "apparel") < lift("pet", "home")


def _pairs(items):
    items = sorted(items)
    return [(a, b) for i, a in enumerate(items) for b in items[i + 1:]]


# --- Coupons, devices, consent, preferences ---------------------------------------------------------


def test_coupons_expiring_soon_redeemed_and_expired(shop):
    rows = _q(shop, "SELECT c.*, o.member_id AS o_member, o.placed_at AS o_placed, o.status AS o_status "
                    "FROM coupons c LEFT JOIN orders o ON o.id = c.redeemed_order_id")
    soon = [r for r in rows if r["redeemed_at"] is None and AS_OF < _ts(r["expires_at"]) <= AS_OF + timedelta(days=3)]
    assert len(soon) > 0.03 * N
    assert {(_ts(r["expires_at"]) - AS_OF).days for r in soon} == {0, 1, 2}  # in 1, 2 and 3 days
    redeemed = [r for r in rows if r["redeemed_at"] is not None]
    expired = [r for r in rows if r["redeemed_at"] is None and _ts(r["expires_at"]) <= AS_OF]
    assert len(redeemed) > 0.1 * len(rows) and len(expired) > 0.1 * len(rows)
    for r in redeemed:
        assert r["o_member"] == r["member_id"]
        assert r["redeemed_at"] == r["o_placed"]
        assert _ts(r["issued_at"]) <= _ts(r["redeemed_at"]) < _ts(r["expires_at"])
        assert r["o_status"] in PURCHASE_STATUSES
    assert len({r["redeemed_order_id"] for r in redeemed}) == len(redeemed)  # one coupon per order
    assert len({r["code"] for r in rows}) == len(rows)
    assert {r["kind"] for r in rows} == {"amount", "percent"}


def test_devices_live_stale_and_invalidated(shop):
    rows = _q(shop, "SELECT * FROM devices")
    with_app = len({r["member_id"] for r in rows})
    assert 0.35 * N < with_app < 0.75 * N
    assert {r["platform"] for r in rows} == {"ios", "android"}
    invalid = [r for r in rows if r["invalidated_at"]]
    stale = [r for r in rows if not r["invalidated_at"] and _ts(r["last_seen_at"]) < AS_OF - timedelta(days=90)]
    live = [r for r in rows if not r["invalidated_at"] and _ts(r["last_seen_at"]) > AS_OF - timedelta(days=30)]
    assert 0.05 < len(invalid) / len(rows) < 0.25 and all(r["invalid_reason"] for r in invalid)
    assert len(stale) / len(rows) > 0.1 and len(live) / len(rows) > 0.4
    for r in rows:
        assert _ts(r["created_at"]) <= _ts(r["last_seen_at"]) < AS_OF
        if r["invalidated_at"]:
            assert _ts(r["last_seen_at"]) <= _ts(r["invalidated_at"]) < AS_OF
    assert len({r["token"] for r in rows}) == len(rows)


def test_consent_history_and_current_state_agree(shop):
    events = _q(shop, "SELECT * FROM consent_events ORDER BY member_id, channel, purpose, occurred_at")
    current = {(r["member_id"], r["channel"], r["purpose"]): r for r in _q(shop, "SELECT * FROM consents")}
    assert len(current) == 6 * N
    latest = {}
    for e in events:
        latest[(e["member_id"], e["channel"], e["purpose"])] = e
    assert latest.keys() == current.keys()
    for key, e in latest.items():
        c = current[key]
        assert (c["granted"], c["source"], c["changed_at"]) == (e["granted"], e["source"], e["occurred_at"])
    assert all(c["granted"] for k, c in current.items() if k[2] == "transactional")
    history = Counter(k for k in ((e["member_id"], e["channel"], e["purpose"]) for e in events))
    assert max(history.values()) == 2 and sum(v == 2 for v in history.values()) > 0.05 * N
    revoked = Counter(e["source"] for e in events if not e["granted"] and e["source"] != "signup_form")
    assert {"unsubscribe_link", "sms_stop", "preference_center"} <= set(revoked)


def test_marketing_opt_out_rates_differ_per_channel(shop):
    rates = {r[0]: r[1] for r in _q(shop, "SELECT channel, AVG(granted) FROM consents WHERE purpose = 'marketing' "
                                          "GROUP BY channel")}
    assert all(0.4 < rates[c] < 0.9 for c in ("email", "sms", "push"))
    assert rates["email"] > rates["push"] > rates["sms"]


def test_channel_preference_differs_by_age_group(shop):
    rows = _q(shop, "SELECT age_group, preferred_channels FROM members WHERE age_group IS NOT NULL")
    first = defaultdict(Counter)
    for r in rows:
        assert sorted(r["preferred_channels"].split(",")) == ["email", "push", "sms"]
        first[r["age_group"]][r["preferred_channels"].split(",")[0]] += 1

    def share(groups, channel):
        tot = sum(sum(first[g].values()) for g in groups)
        return sum(first[g][channel] for g in groups) / tot

    young, old = ["18-24", "25-34"], ["55-64", "65+"]
    assert share(young, "push") > 0.45 and share(old, "email") > 0.45
    assert share(young, "push") > 2 * share(old, "push")
    assert share(old, "email") > 2 * share(young, "email")
    assert len({r["preferred_channels"] for r in rows if r["age_group"] == "18-24"}) == 6  # noise


# --- Tiers and points -----------------------------------------------------------------------------------


def test_tier_matches_trailing_year_purchases_and_history(shop):
    tiers = [dict(r) for r in _q(shop, "SELECT * FROM tiers ORDER BY rank")]
    statuses = ",".join(f"'{s}'" for s in PURCHASE_STATUSES)
    since = (AS_OF - timedelta(days=365)).strftime("%Y-%m-%d %H:%M:%S.%f")
    agg = {r[0]: (r[1], r[2]) for r in _q(
        shop, f"SELECT member_id, SUM(total_minor), COUNT(*) FROM orders WHERE status IN ({statuses}) "
              f"AND placed_at > ? GROUP BY member_id", since)}
    members = _q(shop, "SELECT id, tier FROM members")
    seen = Counter()
    for m in members:
        spend, count = agg.get(m["id"], (0, 0))
        expected = tiers[0]["code"]
        for t in tiers[1:]:
            if spend >= t["upgrade_spend_minor"] or count >= t["upgrade_orders"]:
                expected = t["code"]
        assert m["tier"] == expected, (m["id"], spend, count)
        seen[m["tier"]] += 1
    assert all(seen[t["code"]] for t in tiers)
    assert seen["silver"] > seen["gold"] > seen["platinum"]
    hist = _q(shop, "SELECT h.member_id, h.tier, h.valid_from, h.valid_to, h.reason, m.tier AS mtier, m.joined_at "
                    "FROM tier_history h JOIN members m ON m.id = h.member_id")
    assert len(hist) == N and len({h["member_id"] for h in hist}) == N
    for h in hist:
        assert h["tier"] == h["mtier"] and h["valid_to"] is None and h["reason"] == "initial"
        assert _ts(h["joined_at"]) <= _ts(h["valid_from"]) < AS_OF


def test_points_balance_is_the_ledger_sum_and_never_negative(shop):
    ledger = _q(shop, "SELECT member_id, kind, points, occurred_at, order_id FROM points_ledger ORDER BY member_id, id")
    balance = dict(_q(shop, "SELECT id, points_balance FROM members"))
    sums, running, low = Counter(), Counter(), {}
    for e in sorted(ledger, key=lambda e: (e["member_id"], e["occurred_at"])):
        running[e["member_id"]] += e["points"]
        low[e["member_id"]] = min(low.get(e["member_id"], 0), running[e["member_id"]])
        sums[e["member_id"]] += e["points"]
    assert all(balance[m] == sums.get(m, 0) for m in balance)
    assert all(v >= 0 for v in low.values())
    kinds = Counter(e["kind"] for e in ledger)
    assert kinds["earned"] and kinds["spent"] and kinds["expired"]
    assert all(_ts(e["occurred_at"]) <= AS_OF for e in ledger)
    earned_orders = {e["order_id"] for e in ledger if e["kind"] == "earned"}
    statuses = dict(_q(shop, "SELECT id, status FROM orders"))
    assert all(statuses[o] in ("paid", "shipped", "delivered") for o in earned_orders)


# --- Behaviour of the API ------------------------------------------------------------------------------


def test_refuses_a_database_with_members_unless_replace(sqlite_engine, sqlite_url):
    first = generate_shop(sqlite_engine, members=300, seed=3, as_of=AS_OF)
    before = _dump(sa.engine.make_url(sqlite_url).database)
    with pytest.raises(InputError, match="--replace"):
        generate_shop(sqlite_engine, members=300, seed=4, as_of=AS_OF)
    assert _dump(sa.engine.make_url(sqlite_url).database) == before
    again = generate_shop(sqlite_engine, members=300, seed=3, as_of=AS_OF, replace=True)
    assert again.counts == first.counts
    assert _dump(sa.engine.make_url(sqlite_url).database) == before  # replace = fresh shop, same ids


def test_failure_midway_leaves_no_half_shop(sqlite_engine):
    calls = []

    def progress(done, total):
        calls.append(done)
        if done:
            raise RuntimeError("interrupted by the test")

    with pytest.raises(RuntimeError, match="interrupted"):
        generate_shop(sqlite_engine, members=1500, seed=1, as_of=AS_OF, batch_size=1000, progress=progress)
    with sqlite_engine.connect() as c:
        assert all(c.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one() == 0 for t in SHOP_TABLES)
        assert c.execute(sa.text("SELECT COUNT(*) FROM tiers")).scalar_one() == 3


@pytest.mark.parametrize("kwargs", [dict(members=0, seed=1), dict(members=5, seed=-1),
                                    dict(members=5, seed=1, as_of=datetime(2026, 1, 1))])
def test_invalid_arguments_are_input_errors(sqlite_engine, kwargs):
    with pytest.raises(InputError):
        generate_shop(sqlite_engine, **kwargs)


def test_consent_rows_equal_what_record_consents_produces(sqlite_engine, tmp_path, sqlite_template):
    generate_shop(sqlite_engine, members=120, seed=9, as_of=AS_OF)
    ev, cur, m = ConsentEvent.__table__, Consent.__table__, Member.__table__
    with sqlite_engine.connect() as c:
        members = [dict(r) for r in c.execute(sa.select(m)).mappings()]
        events = c.execute(sa.select(ev).order_by(ev.c.id)).mappings().all()
        got = {tuple(r[k] for k in ("member_id", "channel", "purpose", "granted", "source", "changed_at"))
               for r in c.execute(sa.select(cur)).mappings()}
    other = make_engine(f"sqlite:///{_fresh(sqlite_template, tmp_path)}")
    with other.begin() as c:
        c.execute(m.insert(), members)
        new = record_consents(c, [ConsentStatement(e["member_id"], e["channel"], e["purpose"], e["granted"],
                                                   e["source"], e["occurred_at"], e["detail"]) for e in events])
        assert new == len(events)
        want = {tuple(r[k] for k in ("member_id", "channel", "purpose", "granted", "source", "changed_at"))
                for r in c.execute(sa.select(cur)).mappings()}
    other.dispose()
    assert got == want


def test_generates_on_each_backend_with_the_same_data(engine, sqlite_template, tmp_path):
    summary = generate_shop(engine, members=400, seed=21, as_of=AS_OF, batch_size=150)
    assert summary.members == 400 and summary.orders > 1000 and summary.seconds > 0
    reference = make_engine(f"sqlite:///{_fresh(sqlite_template, tmp_path)}")
    generate_shop(reference, members=400, seed=21, as_of=AS_OF)
    # Read back through the models' types: the same values on PostgreSQL as on SQLite.
    for name in ("members", "orders", "order_lines", "coupons", "consents", "devices", "points_ledger"):
        table = SQLModel.metadata.tables[name]
        with engine.connect() as c:
            rows = c.execute(sa.select(table).order_by(table.c.id)).all()
        with reference.connect() as c:
            ref = c.execute(sa.select(table).order_by(table.c.id)).all()
        assert rows == ref, name
    reference.dispose()
    # Explicit ids were inserted: the identity sequences must have moved past them.
    with engine.begin() as c:
        new_id = c.execute(Member.__table__.insert().values(external_id="after", name="X", joined_at=AS_OF,
                                                            created_at=AS_OF, updated_at=AS_OF)
                           .returning(Member.__table__.c.id)).scalar_one()
    assert new_id == 401


def test_cli_generate_shop_prints_a_summary(sqlite_url, monkeypatch, capsys):
    import membercare.cli as cli
    import membercare.cli.generate  # noqa: F401  (registers the command until the lead wires it in)
    from membercare.cli.common import state

    monkeypatch.setenv("MEMBERCARE_DATABASE_URL", sqlite_url)
    monkeypatch.setattr(state, "_settings", None)
    state.__dict__.pop("engine", None)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["generate-shop", "--members", "60", "--seed", "2", "--as-of", "2026-03-11"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "members" in out and "60" in out and "order_lines" in out
        with pytest.raises(SystemExit) as exit_:
            cli.main(["generate-shop", "--members", "60"])
        assert exit_.value.code == 1
        assert "--replace" in capsys.readouterr().err
    finally:
        state.__dict__.pop("engine", None)
        monkeypatch.setattr(state, "_settings", None)
    eng = make_engine(sqlite_url)
    with eng.connect() as c:
        joined = c.execute(sa.select(sa.func.max(Member.__table__.c.joined_at))).scalar_one()
    eng.dispose()
    assert joined < AS_OF  # --as-of 2026-03-11 is midnight in Taipei


def test_clear_shop_empties_shop_tables_and_keeps_tiers(sqlite_engine):
    generate_shop(sqlite_engine, members=50, seed=1, as_of=AS_OF)
    clear_shop(sqlite_engine)
    with sqlite_engine.connect() as c:
        assert all(c.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one() == 0 for t in SHOP_TABLES)
        assert c.execute(sa.text("SELECT COUNT(*) FROM tiers")).scalar_one() == 3
