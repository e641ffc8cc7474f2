"""Routing: preference order, consent per purpose, reachability, suppression, campaign channels."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from fakes import seed_members
from membercare.delivery.models import Decision, OutboxState, Suppression, address_hash
from membercare.delivery.routing import MemberContext, candidate_order, load_contexts, route
from membercare.models import Device, Member

M, T = "marketing", "transactional"
ALL = {(c, p): True for c in ("email", "sms", "push") for p in (M, T)}


def ctx(preferred="email,sms,push", consents=None, email="a@shop.tw", phone="+886912345678", token="tok-1",
        suppressed=None):
    return MemberContext(1, tuple(preferred.split(",")), email=email, phone=phone, push_token=token,
                         consents=ALL if consents is None else consents, suppressed=suppressed or {})


def only(*pairs):
    return {p: True for p in pairs}


@pytest.mark.parametrize(
    "member, allowed, purpose, exp_chain, exp_code",
    [
        (ctx(), ("email", "sms", "push"), M, ("email", "sms", "push"), Decision.ROUTED),
        (ctx("push,email"), ("email", "sms", "push"), M, ("push", "email"), Decision.ROUTED),  # unlisted sms unused
        (ctx("push,email,sms"), ("email", "sms"), M, ("email", "sms"), Decision.ROUTED),  # campaign has no push
        (ctx(consents=only(("sms", M))), ("email", "sms", "push"), M, ("sms",), Decision.ROUTED),
        # Consent is per purpose: transactional consent does not allow marketing, and vice versa.
        (ctx(consents=only(("email", T))), ("email",), M, (), Decision.NO_CONSENT),
        (ctx(consents=only(("email", M))), ("email",), T, (), Decision.NO_CONSENT),
        (ctx(consents=only(("email", T))), ("email",), T, ("email",), Decision.ROUTED),
        (ctx(email=None), ("email", "sms"), M, ("sms",), Decision.ROUTED),
        (ctx(email="not-an-email"), ("email",), M, (), Decision.NO_REACHABLE_CHANNEL),
        (ctx(phone="0912345678"), ("sms",), M, (), Decision.NO_REACHABLE_CHANNEL),  # not E.164
        (ctx("push,email", token=None), ("push", "email"), M, ("email",), Decision.ROUTED),
        (ctx(suppressed={"email": "hard_bounce"}), ("email",), M, (), Decision.SUPPRESSED),
        (ctx(suppressed={"any": "manual"}), ("email", "sms"), M, (), Decision.SUPPRESSED),
        (ctx(suppressed={"email": "complaint"}), ("email", "sms"), M, ("sms",), Decision.ROUTED),
        # Suppressed on one channel, unreachable on the other: unreachable wins the summary.
        (ctx(suppressed={"email": "hard_bounce"}, phone=None), ("email", "sms"), M, (), Decision.NO_REACHABLE_CHANNEL),
        (ctx("push"), ("email",), M, (), Decision.NO_ALLOWED_CHANNEL),
    ],
)
def test_route(member, allowed, purpose, exp_chain, exp_code):
    order, pre = candidate_order(member.preferred, allowed)
    rt = route(member, order, purpose, pre)
    assert rt.chain == exp_chain
    assert rt.code == exp_code
    assert rt.state == (OutboxState.PLANNED if exp_chain else
                        OutboxState.SUPPRESSED if exp_code == Decision.SUPPRESSED else OutboxState.SKIPPED)
    assert rt.reason  # every decision has a reason


def test_reasons_name_each_rejected_channel():
    rt = route(ctx("push,sms,email", consents=only(("email", M)), token=None), ["push", "sms", "email"], M)
    assert rt.chain == ("email",)
    assert rt.reason.startswith("via email (preference #3")
    assert "push: no marketing consent" in rt.reason and "sms: no marketing consent" in rt.reason
    skipped = route(ctx(consents={}), ["email", "sms"], M)
    assert skipped.reason == "no channel: email: no marketing consent; sms: no marketing consent"


def test_load_contexts_reads_consent_devices_and_suppressions_set_based(engine):
    now = datetime(2026, 11, 23, tzinfo=UTC)
    with engine.begin() as conn:
        a, b, c = seed_members(conn, 3, now=now, push=False)
        d = Device.__table__
        dev = lambda **kw: {"invalidated_at": None, "invalid_reason": None, **kw}  # noqa: E731 (same keys per row)
        conn.execute(sa.insert(d), [dev(**x) for x in [
            dict(member_id=a, token="old-live", platform="ios", app_id="x", created_at=now,
                 last_seen_at=now - timedelta(days=5)),
            dict(member_id=a, token="new-live", platform="ios", app_id="x", created_at=now,
                 last_seen_at=now - timedelta(days=1)),
            dict(member_id=a, token="dead", platform="ios", app_id="x", created_at=now, last_seen_at=now,
                 invalidated_at=now, invalid_reason="unregistered"),
            dict(member_id=b, token="stale", platform="ios", app_id="x", created_at=now,
                 last_seen_at=now - timedelta(days=400)),
            dict(member_id=c, token="blocked", platform="ios", app_id="x", created_at=now, last_seen_at=now),
        ]])
        email_b = conn.execute(sa.select(Member.__table__.c.email).where(Member.__table__.c.id == b)).scalar()
        s = Suppression.__table__
        conn.execute(sa.insert(s), [
            # Hash of a differently-cased address still matches (case-folded email).
            dict(channel="email", address_hash=address_hash("email", email_b.upper()), member_id=None,
                 reason="hard_bounce", source="test", created_at=now),
            dict(channel="push", address_hash=address_hash("push", "blocked"), member_id=None, reason="manual",
                 source="test", created_at=now),
            dict(channel="sms", address_hash=None, member_id=c, reason="manual", source="test", created_at=now),
        ])
    with engine.connect() as conn:
        got = load_contexts(conn, [a, b, c, a], "marketing", now, timedelta(days=90))
    assert got[a].push_token == "new-live" and not got[a].suppressed
    assert got[b].push_token is None  # last seen 400 days ago is not live
    assert got[b].suppressed == {"email": "hard_bounce"}
    assert got[c].suppressed == {"push": "token suppressed", "sms": "manual"}
    assert got[a].consents[("email", "marketing")] is True
    assert route(got[c], ["push", "sms", "email"], "marketing").chain == ("email",)
