"""LINE's account-link flow on the receiver's side, on SQLite and PostgreSQL, with the test clock.

* a nonce is spent exactly once: ``ok`` links the member, a replay, an unknown (forged) or an expired nonce
  is refused with nothing changed, ``failed`` spends it and links nothing; concurrent deliveries of one
  nonce link once;
* a LINE user id already on another member moves to the member who just linked; an earlier LINE refusal of
  the member is kept, and a blocked (suppressed) user id is not granted consent;
* ``POST /line/link`` (signed by the shop's backend) and ``GET /u/{token}/line`` (our member link) mint the
  nonce and send the browser to LINE's dialog; the ``accountLink`` webhook (signed ``X-Line-Signature``)
  spends it through the real receiver.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from channels.fcm.webhooks import sign_push_tracking
from channels.line.events import AccountLink, account_link, is_link_keyword, link_request
from channels.line.link import dialog_url, login_link, usable_link_token
from channels.line.sandbox import webhook_body, webhook_event
from channels.line.webhooks import line_signature
from fakes import seed_members
from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.delivery.models import Suppression, address_hash
from membercare.links import LinkScope, sign_member_token
from membercare.models import Member
from membercare.receiver import ReceiverConfig, create_app
from membercare.receiver.line_link import NONCES, LinkOutcome, consume_nonce, mint_nonce, nonce_hash

M = Member.__table__
SECRET = "0123456789abcdef0123456789abcdef"
LINK_SECRET = "line-link-test-secret-0123456789"
TRIGGER_SECRET = "line-link-trigger-secret"
DIALOG = "https://line.example/dialog/bot/accountLink"


def uid(n: int) -> str:
    return "U" + f"{n:032x}"


def line_id(engine, member_id: int) -> str | None:
    with engine.connect() as c:
        return c.execute(sa.select(M.c.line_user_id).where(M.c.id == member_id)).scalar()


def test_link_events_and_keywords_are_read_from_line_events():
    event = webhook_event("accountLink", uid(1), event_id="01JLINK", at=1.0, link={"result": "ok", "nonce": "n" * 20})
    assert account_link(event) == AccountLink(uid(1), "n" * 20, True)
    assert account_link({**event, "link": {"result": "failed", "nonce": "x" * 20}}).ok is False
    assert account_link({**event, "link": "garbage"}) == AccountLink(uid(1), None, False)
    assert account_link(webhook_event("follow", uid(1), event_id="01JF", at=1.0)) is None
    for text in ("綁定", " 綁定帳號！", "LINK", "Link account"):
        assert is_link_keyword(text)
    assert not is_link_keyword("我想綁定優惠")  # the whole message must be the keyword
    follow = webhook_event("follow", uid(2), event_id="01JF2", at=1.0)
    assert link_request(follow, linked=False).reason == "follow"
    assert link_request(follow, linked=True) is None
    assert link_request({**follow, "deliveryContext": {"isRedelivery": True}}, linked=False) is None
    asked = webhook_event("message", uid(2), event_id="01JM", at=1.0, text="綁定")
    assert link_request(asked, linked=True).reason == "keyword"
    assert link_request(asked, linked=True).reply_token == asked["replyToken"]
    assert usable_link_token("abc-DEF_123") == "abc-DEF_123"
    assert usable_link_token("a b") is None and usable_link_token("x" * 200) is None and usable_link_token("") is None
    url = dialog_url("tok", "non ce", DIALOG)
    assert parse_qs(urlsplit(url).query) == {"linkToken": ["tok"], "nonce": ["non ce"]}
    assert login_link("https://shop.example/login?next=/me&linkToken=old", "T1") == (
        "https://shop.example/login?next=%2Fme&linkToken=T1")


def test_a_nonce_links_once_and_replayed_unknown_expired_or_failed_ones_change_nothing(engine, clock):
    with engine.begin() as c:
        alice, bob, carol = seed_members(c, 3, push=False, now=clock())
        nonce = mint_nonce(c, alice, now=clock(), ttl_s=600)
        stale = mint_nonce(c, bob, now=clock(), ttl_s=600)
        refused = mint_nonce(c, carol, now=clock(), ttl_s=600)
        stored = c.execute(sa.select(NONCES.c.nonce_hash)).scalars().all()
    assert nonce not in stored and nonce_hash(nonce) in stored  # only the hash is kept
    assert len(nonce) >= 32

    with engine.begin() as c:
        result = consume_nonce(c, AccountLink(uid(1), nonce, True), now=clock() + timedelta(seconds=30))
    assert (result.outcome, result.member_id) == (LinkOutcome.LINKED, alice)
    assert line_id(engine, alice) == uid(1)
    with engine.connect() as c:
        assert current_consents(c, alice)[("line", "marketing")] is True

    # A replay, by the same user or another: refused, nothing changes.
    for user in (uid(1), uid(9)):
        with engine.begin() as c:
            assert consume_nonce(c, AccountLink(user, nonce, True), now=clock()).outcome is LinkOutcome.USED
    with engine.begin() as c:
        assert consume_nonce(c, AccountLink(uid(9), "forged-" + "x" * 30, True),
                             now=clock()).outcome is LinkOutcome.UNKNOWN
        assert consume_nonce(c, AccountLink(None, refused, True), now=clock()).outcome is LinkOutcome.INVALID
        assert consume_nonce(c, AccountLink(uid(9), None, True), now=clock()).outcome is LinkOutcome.INVALID
    # Expiry: the instant it expires, it is refused (and stays unspent).
    with engine.begin() as c:
        assert consume_nonce(c, AccountLink(uid(2), stale, True),
                             now=clock() + timedelta(seconds=600)).outcome is LinkOutcome.EXPIRED
    # LINE reports failure: the nonce is spent, nothing linked, and it cannot be used after.
    with engine.begin() as c:
        assert consume_nonce(c, AccountLink(uid(3), refused, False), now=clock()).outcome is LinkOutcome.FAILED
        assert consume_nonce(c, AccountLink(uid(3), refused, True), now=clock()).outcome is LinkOutcome.USED
    assert line_id(engine, bob) is None and line_id(engine, carol) is None
    with engine.connect() as c:
        rows = {r.member_id: r for r in c.execute(sa.select(NONCES))}
        assert ("line", "marketing") not in current_consents(c, bob)
    assert rows[alice].outcome == "linked" and rows[alice].line_user_id == uid(1)
    assert rows[bob].used_at is None and rows[carol].outcome == "failed" and rows[carol].line_user_id is None


def test_a_line_user_linked_to_another_member_moves_and_consent_respects_refusals_and_blocks(engine, clock):
    with engine.begin() as c:
        first, second, refuser, blocked = seed_members(c, 4, push=False, now=clock())
        c.execute(sa.update(M).where(M.c.id == first).values(line_user_id=uid(5)))
        c.execute(sa.update(M).where(M.c.id == second).values(line_user_id=uid(6)))
        record_consents(c, [ConsentStatement(refuser, "line", "marketing", False, "preference_center",
                                             clock() - timedelta(days=1))])
        c.execute(sa.insert(Suppression.__table__).values(
            channel="line", address_hash=address_hash("line", uid(8)), member_id=None, reason="unsubscribe",
            source="line:unsubscribed", created_at=clock()))
        moving = mint_nonce(c, second, now=clock())
        keep_refusal = mint_nonce(c, refuser, now=clock())
        block = mint_nonce(c, blocked, now=clock())

    with engine.begin() as c:
        result = consume_nonce(c, AccountLink(uid(5), moving, True), now=clock())
        consume_nonce(c, AccountLink(uid(7), keep_refusal, True), now=clock())
        consume_nonce(c, AccountLink(uid(8), block, True), now=clock())
    assert (result.outcome, result.member_id, result.moved_from) == (LinkOutcome.LINKED, second, first)
    assert line_id(engine, first) is None  # one LINE account is one member
    assert line_id(engine, second) == uid(5)  # its previous LINE id replaced
    assert line_id(engine, refuser) == uid(7) and line_id(engine, blocked) == uid(8)
    with engine.connect() as c:
        assert current_consents(c, refuser)[("line", "marketing")] is False  # the earlier refusal stands
        assert ("line", "marketing") not in current_consents(c, blocked)  # a blocked user id is not opted in


def test_concurrent_deliveries_of_one_nonce_link_once(engine, clock):
    with engine.begin() as c:
        (member,) = seed_members(c, 1, push=False, now=clock())
        nonce = mint_nonce(c, member, now=clock())
    outcomes: list[LinkOutcome] = []
    barrier = threading.Barrier(6)

    def deliver(n: int) -> None:
        from membercare.engagement.store import take_write_lock, writer_lock

        barrier.wait()
        with writer_lock(engine), engine.begin() as c:
            take_write_lock(c)
            outcomes.append(consume_nonce(c, AccountLink(uid(100 + n), nonce, True), now=clock()).outcome)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == sorted([LinkOutcome.LINKED] + [LinkOutcome.USED] * 5)
    assert line_id(engine, member) in {uid(100 + n) for n in range(6)}


@pytest.fixture
def receiver(engine, clock):
    config = ReceiverConfig(public_url="https://mc.example", secret_key=LINK_SECRET,
                            webhook_secrets=(("line", SECRET),), trigger_secret=TRIGGER_SECRET,
                            line_account_link_url=DIALOG, line_link_ttl_s=300)
    with TestClient(create_app(config, engine, clock=clock)) as client:
        yield client


def nonce_of(url: str) -> str:
    assert url.startswith(DIALOG + "?")
    query = parse_qs(urlsplit(url).query)
    return query["nonce"][0]


def post_line(client: TestClient, events: list[dict]):
    body = webhook_body("U" + "0" * 32, events)
    return client.post("/webhooks/line", content=body, headers={"X-Line-Signature": line_signature(SECRET, body)})


def link_event(user: str, nonce: str, n: int, result: str = "ok") -> dict:
    return webhook_event("accountLink", user, event_id=f"01JLINK{n:019d}", at=1.7e9,
                         link={"result": result, "nonce": nonce})


def test_the_shop_backend_and_the_member_link_start_the_link_and_the_webhook_spends_the_nonce(
        engine, clock, receiver):
    with engine.begin() as c:
        alice, bob = seed_members(c, 2, push=False, now=clock())
        external = c.execute(sa.select(M.c.external_id).where(M.c.id == alice)).scalar()

    def signed(payload: dict, secret: str = TRIGGER_SECRET) -> dict:
        body = json.dumps(payload).encode()
        return {"content": body, "headers": {"X-Membercare-Signature": sign_push_tracking(secret, body)}}

    request = {"member": external, "linkToken": "LT0123456789abcdefABCDEF01234567"}
    assert receiver.post("/line/link", content=json.dumps(request)).status_code == 401
    assert receiver.post("/line/link", **signed(request, "wrong")).status_code == 403
    assert receiver.post("/line/link", **signed({"member": external})).status_code == 400
    assert receiver.post("/line/link", **signed({**request, "linkToken": "bad token"})).status_code == 400
    assert receiver.post("/line/link", **signed({**request, "member": "M9999999"})).status_code == 404
    answer = receiver.post("/line/link", **signed(request))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    redirect = answer.json()["redirect"]
    assert parse_qs(urlsplit(redirect).query)["linkToken"] == [request["linkToken"]]
    assert answer.json()["expires_at"] == (clock() + timedelta(seconds=300)).isoformat()
    via_backend = nonce_of(redirect)

    # Our signed preference-centre link: 303 to LINE's dialog, the member link never sent on as a referrer.
    token = sign_member_token(bob, LINK_SECRET)
    r = receiver.get(f"/u/{token}/line", params={"linkToken": "LTbob"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["referrer-policy"] == "no-referrer"
    via_member_link = nonce_of(r.headers["location"])
    assert via_member_link != via_backend
    scoped = sign_member_token(bob, LINK_SECRET, LinkScope.EMAIL)
    assert receiver.get(f"/u/{scoped}/line", params={"linkToken": "LT"}, follow_redirects=False).status_code == 403
    assert receiver.get(f"/u/{token}/line", follow_redirects=False).status_code == 400
    assert receiver.get("/u/not-a-token/line", params={"linkToken": "LT"}, follow_redirects=False).status_code == 404
    forged_token = sign_member_token(bob, "another-secret-0123456789")
    assert receiver.get(f"/u/{forged_token}/line", params={"linkToken": "LT"},
                        follow_redirects=False).status_code == 404

    # LINE's accountLink events. A forged nonce, signed correctly by LINE: refused, nothing linked.
    r = post_line(receiver, [link_event(uid(1), "forged-nonce-0123456789", 1)])
    assert r.status_code == 200 and r.json()["account_link"] == {"unknown": 1}
    assert line_id(engine, alice) is None
    # A tampered body (the nonce swapped after signing) never reaches the linker.
    body = webhook_body("U" + "0" * 32, [link_event(uid(1), "forged-nonce-0123456789", 2)])
    tampered = body.replace(b"forged-nonce-0123456789", via_backend.encode())
    assert receiver.post("/webhooks/line", content=tampered,
                         headers={"X-Line-Signature": line_signature(SECRET, body)}).status_code == 403
    assert line_id(engine, alice) is None

    r = post_line(receiver, [link_event(uid(1), via_backend, 3)])
    assert r.json()["account_link"] == {"linked": 1} and r.json()["stored"] == 1
    assert line_id(engine, alice) == uid(1)
    # LINE redelivers the same event: stored once, the nonce already spent.
    r = post_line(receiver, [link_event(uid(1), via_backend, 3)])
    assert r.json()["duplicates"] == 1 and r.json()["account_link"] == {"used": 1}
    # A replay of the nonce by another LINE user: refused, alice keeps her LINE id.
    r = post_line(receiver, [link_event(uid(2), via_backend, 4)])
    assert r.json()["account_link"] == {"used": 1} and line_id(engine, alice) == uid(1)

    # Bob's nonce expires after five minutes: refused, and bob stays unlinked.
    clock.advance(seconds=301)
    r = post_line(receiver, [link_event(uid(2), via_member_link, 5)])
    assert r.json()["account_link"] == {"expired": 1}
    assert line_id(engine, bob) is None and line_id(engine, alice) == uid(1)


def test_the_preference_page_shows_line_and_switches_its_marketing_consent(engine, clock, receiver):
    from membercare.engagement.models import EngagementEventRow
    from membercare.models import ConsentEvent

    with engine.begin() as c:
        linked, unlinked = seed_members(c, 2, push=False, now=clock(),
                                        consent=(("email", "marketing"), ("line", "marketing")))
        c.execute(sa.update(M).where(M.c.id == linked).values(line_user_id=uid(11)))
    token = sign_member_token(linked, LINK_SECRET)
    page = receiver.get(f"/u/{token}").text
    assert 'name="consent.line.marketing"' in page and "LINE 帳號已綁定" in page
    assert 'aria-label="LINE 優惠與活動" checked' in page
    assert "尚未綁定" in receiver.get(f"/u/{sign_member_token(unlinked, LINK_SECRET)}").text

    r = receiver.post(f"/u/{token}", data={"action": "save", "consent.email.marketing": "on"})
    assert r.status_code == 200 and 'aria-label="LINE 優惠與活動" checked' not in r.text
    with engine.connect() as c:
        assert current_consents(c, linked)[("line", "marketing")] is False
        assert current_consents(c, linked)[("email", "marketing")] is True
        ev = ConsentEvent.__table__
        assert c.execute(sa.select(ev.c.source).where(ev.c.member_id == linked, ev.c.channel == "line")
                         .order_by(ev.c.id.desc())).scalar() == "preference_center"
        e = EngagementEventRow.__table__
        assert c.execute(sa.select(e.c.kind, e.c.channel)).all() == [("unsubscribed", "line")]
    receiver.post(f"/u/{token}", data={"action": "save", "consent.line.marketing": "on"})
    with engine.connect() as c:
        assert current_consents(c, linked)[("line", "marketing")] is True
    # "Unsubscribe from all offers" includes LINE.
    receiver.post(f"/u/{token}", data={"action": "unsubscribe"})
    with engine.connect() as c:
        assert current_consents(c, linked)[("line", "marketing")] is False


def test_old_nonces_are_pruned_when_new_ones_are_minted(engine, clock):
    with engine.begin() as c:
        (member,) = seed_members(c, 1, push=False, now=clock())
        old = mint_nonce(c, member, now=clock())
    clock.advance(days=7, seconds=601)
    with engine.begin() as c:
        fresh = mint_nonce(c, member, now=clock())
        hashes = set(c.execute(sa.select(NONCES.c.nonce_hash)).scalars())
        assert hashes == {nonce_hash(fresh)}
        assert consume_nonce(c, AccountLink(uid(1), old, True), now=clock()).outcome is LinkOutcome.UNKNOWN


def test_the_receiver_reads_the_line_link_settings_and_refuses_bad_ones():
    from membercare.errors import ConfigurationError

    env = {"MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN": "line-access-token-xyz", "MEMBERCARE_LINE_LOGIN_URL": "https://shop.example/login",
           "MEMBERCARE_LINE_ACCOUNT_LINK_URL": "http://127.0.0.1:8025/dialog/bot/accountLink",
           "MEMBERCARE_LINE_LINK_TTL_S": "300", "MEMBERCARE_LINE_BASE_URL": "http://127.0.0.1:8025"}
    config = ReceiverConfig.from_env(env)
    assert (config.line_access_token, config.line_login_url, config.line_link_ttl_s, config.line_base_url) == (
        "line-access-token-xyz", "https://shop.example/login", 300.0, "http://127.0.0.1:8025")
    assert "line-access-token-xyz" not in repr(config)
    assert ReceiverConfig.from_env({}).line_account_link_url == "https://access.line.me/dialog/bot/accountLink"
    for name, value in (("MEMBERCARE_LINE_LINK_TTL_S", "0"), ("MEMBERCARE_LINE_LINK_TTL_S", "86400"),
                        ("MEMBERCARE_LINE_LOGIN_URL", "javascript:alert(1)")):
        with pytest.raises(ConfigurationError, match=name):
            ReceiverConfig.from_env({**env, name: value})
