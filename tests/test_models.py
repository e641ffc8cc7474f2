"""Model constraints and the consent history/current-state invariant, on SQLite and PostgreSQL."""

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import Session, select

from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.models import Consent, ConsentEvent, Coupon, Member, Order, Tier

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


def _member(session: Session, ext: str = "M1", **kw) -> Member:
    m = Member(external_id=ext, name="Test", joined_at=T0, **kw)
    session.add(m)
    session.commit()
    session.refresh(m)
    return m


def test_default_tiers_are_seeded_by_migration(engine):
    with Session(engine) as s:
        tiers = s.exec(select(Tier).order_by(Tier.rank)).all()
    assert [t.code for t in tiers] == ["silver", "gold", "platinum"]
    assert tiers[2].upgrade_spend_minor > tiers[1].upgrade_spend_minor > 0
    assert all(t.renewal_spend_minor <= t.upgrade_spend_minor for t in tiers)


def test_timestamps_round_trip_as_aware_utc(engine):
    taipei = timezone(timedelta(hours=8))
    with Session(engine) as s:
        m = Member(external_id="tz", name="T", joined_at=datetime(2026, 3, 1, 8, 30, tzinfo=taipei),
                   birthday=date(2000, 2, 29))
        s.add(m)
        s.commit()
        mid = m.id
    with Session(engine) as s:
        got = s.get(Member, mid)
        assert got.joined_at == datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
        assert got.joined_at.utcoffset() == timedelta(0)
        assert got.birthday == date(2000, 2, 29)


def test_naive_datetimes_are_refused(engine):
    with Session(engine) as s:
        s.add(Member(external_id="naive", name="N", joined_at=datetime(2026, 1, 1)))
        with pytest.raises(StatementError, match="naive datetime"):
            s.commit()


def test_external_id_is_unique(engine):
    with Session(engine) as s:
        _member(s, "dup")
        s.add(Member(external_id="dup", name="Again", joined_at=T0))
        with pytest.raises(IntegrityError):
            s.commit()


@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="amount", amount_minor=0),
        dict(kind="percent", percent_off=150),
        dict(kind="percent", percent_off=10, amount_minor=100),
        dict(kind="bogus", amount_minor=100),
    ],
)
def test_coupon_value_constraints(engine, kw):
    with Session(engine) as s:
        m = _member(s)
        s.add(Coupon(code="C1", member_id=m.id, issued_at=T0, expires_at=T0 + timedelta(days=3), **kw))
        with pytest.raises(IntegrityError):
            s.commit()


def test_coupon_must_expire_after_issue(engine):
    with Session(engine) as s:
        m = _member(s)
        s.add(Coupon(code="C1", member_id=m.id, kind="amount", amount_minor=100, issued_at=T0, expires_at=T0))
        with pytest.raises(IntegrityError):
            s.commit()


def test_order_status_and_amount_constraints(engine):
    with Session(engine) as s:
        m = _member(s)
        s.add(Order(external_id="O1", member_id=m.id, placed_at=T0, status="lost", total_minor=100))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        s.add(Order(external_id="O2", member_id=m.id, placed_at=T0, status="paid", total_minor=-1))
        with pytest.raises(IntegrityError):
            s.commit()


def test_phone_must_be_e164(engine):
    with Session(engine) as s:
        s.add(Member(external_id="p", name="P", joined_at=T0, phone="0912345678"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_consent_history_is_append_only_and_current_state_follows_latest(engine):
    with Session(engine) as s:
        mid = _member(s).id
    grant = ConsentStatement(mid, "sms", "marketing", True, "signup_form", T0)
    stop = ConsentStatement(mid, "sms", "marketing", False, "sms_stop", T0 + timedelta(days=10))
    with engine.begin() as conn:
        assert record_consents(conn, [grant]) == 1
    with engine.begin() as conn:
        assert record_consents(conn, [stop]) == 1
    # A late-arriving older statement (or a replay) is kept in history but cannot win.
    with engine.begin() as conn:
        assert record_consents(conn, [grant]) == 0  # exact replay: stored once
        late = ConsentStatement(mid, "sms", "marketing", True, "import", T0 + timedelta(days=5))
        assert record_consents(conn, [late]) == 1
    with engine.connect() as conn:
        assert current_consents(conn, mid) == {("sms", "marketing"): False}
        n = conn.execute(sa.select(sa.func.count()).select_from(ConsentEvent.__table__)).scalar()
        assert n == 3
        cur = conn.execute(sa.select(Consent.__table__.c.source)).scalar()
        assert cur == "sms_stop"


def test_consent_rejects_unknown_channel():
    with pytest.raises(ValueError):
        ConsentStatement(1, "fax", "marketing", True, "import", T0)
