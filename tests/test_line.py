"""LINE: the adapter on the real ``line-bot-sdk`` against the sandbox's Messaging API, the webhook parser and
signature, and the receiver's ``POST /webhooks/line`` on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from channels.base import Accepted, FailureReason, OutboundMessage, PermanentFailure, TransientFailure
from channels.line.adapter import ENV_ACCESS_TOKEN, LineChannel, LineConfig, retry_key
from channels.line.events import parse_body, parse_event
from channels.line.sandbox import webhook_event
from channels.line.webhooks import line_signature, verify_line_signature
from channels.registry import build_channels
from membercare.delivery.contract import LineContent
from membercare.engagement.events import EventKind, InboundCommand, MalformedPayload
from membercare.errors import ConfigurationError
from membercare.models import Channel, Purpose
from sandbox_fixtures import *  # noqa: F403 - the sandbox fixtures

LINE_TOKEN = "line-sandbox-channel-access-token"
LINE_SECRET = "0123456789abcdef0123456789abcdef"
USER = "U" + "a" * 32
FLEX = json.dumps({"type": "bubble", "body": {"type": "box", "layout": "vertical", "contents": [
    {"type": "text", "text": "VIP"},
    {"type": "button", "action": {"type": "postback", "label": "看看", "data": "mid=m-flex-1&action=open"}}]}})


@pytest.fixture
def line(sandbox):
    sandbox.configure(line_access_tokens=[LINE_TOKEN], capture_requests=20)
    adapter = LineChannel(LineConfig(channel_access_token=LINE_TOKEN, base_url=sandbox.url, timeout_s=2.0))
    yield adapter
    adapter.close()


def message(mid: str = "m1", to: str = USER, text: str = "您好", flex: str | None = None) -> OutboundMessage:
    return OutboundMessage(message_id=mid, idempotency_key=f"winback:2026-12-05:{mid}", channel=Channel.LINE,
                           purpose=Purpose.MARKETING, to=to, content=LineContent(text=text, flex_json=flex,
                                                                                 alt_text="VIP" if flex else None))


def test_config_reads_the_environment_and_keeps_the_token_out_of_repr():
    config = LineConfig.from_env({ENV_ACCESS_TOKEN: "secret-token", "MEMBERCARE_LINE_BASE_URL": "http://127.0.0.1:1/"})
    assert config.base_url == "http://127.0.0.1:1" and "secret-token" not in repr(config)
    with pytest.raises(ConfigurationError, match=ENV_ACCESS_TOKEN):
        LineConfig.from_env({})
    adapters = build_channels({ENV_ACCESS_TOKEN: "t", "MEMBERCARE_LINE_BASE_URL": "http://127.0.0.1:1"})
    assert set(adapters) == {Channel.LINE} and isinstance(adapters[Channel.LINE], LineChannel)
    adapters[Channel.LINE].close()


def test_push_sends_text_and_flex_with_the_retry_key_of_the_outbox_key(line, sandbox):
    result = line.send(message(flex=FLEX))
    assert isinstance(result, Accepted) and result.provider_message_id.isdigit()
    request = sandbox.captured()[-1]
    assert request["path"] == "/v2/bot/message/push"
    assert request["headers"]["X-Line-Retry-Key"] == retry_key("winback:2026-12-05:m1")
    body = json.loads(request["body"])
    assert body["to"] == USER and [m["type"] for m in body["messages"]] == ["text", "flex"]
    assert body["messages"][1]["altText"] == "VIP"
    assert "Authorization" not in request["headers"]  # the sandbox never keeps the token
    [record] = sandbox.messages("line")
    assert record["message_id"] == "m-flex-1"  # from the Flex postback data


def test_a_retried_key_is_already_accepted_and_sends_nothing_again(line, sandbox):
    first = line.send(message())
    again = line.send(message())
    assert isinstance(first, Accepted) and isinstance(again, Accepted) and again.status == 409
    assert again.provider_message_id  # the accepted request's id
    assert sandbox.stats()["accepted"]["line"] == 1
    assert isinstance(line.send(message("m2")), Accepted)
    assert sandbox.stats()["accepted"]["line"] == 2


def test_a_ghosted_push_retried_with_its_key_is_accepted_once(line, sandbox):
    sandbox.configure(line={"ghost_rate": 1.0})
    lost = line.send(message())
    assert isinstance(lost, TransientFailure) and lost.ambiguous
    sandbox.configure(line={"ghost_rate": 0.0})
    assert isinstance(line.send(message()), Accepted)
    assert sandbox.stats()["accepted"]["line"] == 1


def test_rate_limit_invalid_user_content_and_token_errors(line, sandbox):
    sandbox.configure(line={"rate_limit": 1.0, "burst": 1.0})
    assert isinstance(line.send(message("a")), Accepted)
    throttled = line.send(message("b"))
    assert isinstance(throttled, TransientFailure) and throttled.throttled and throttled.retry_after >= 1
    sandbox.configure(line={"rate_limit": None})
    bad = line.send(message("c", to="not-a-line-user"))
    assert isinstance(bad, PermanentFailure) and bad.reason is FailureReason.INVALID_RECIPIENT and bad.fallback
    long = line.send(message("d", text="長" * 5001))
    assert isinstance(long, PermanentFailure) and long.reason is FailureReason.REJECTED
    wrong = LineChannel(LineConfig(channel_access_token="wrong", base_url=sandbox.url, timeout_s=2.0))
    with pytest.raises(ConfigurationError, match=ENV_ACCESS_TOKEN) as info:
        wrong.send(message("e"))
    assert "wrong" not in str(info.value)
    wrong.close()


def test_quota_and_consumption_are_read_and_the_monthly_limit_throttles(line, sandbox):
    assert line.quota().limit is None
    sandbox.configure(line_quota=3)
    for mid in ("a", "b", "c"):
        assert isinstance(line.send(message(mid)), Accepted)
    quota = line.quota()
    assert (quota.limit, quota.used, quota.remaining) == (3, 3, 0)
    over = line.send(message("d"))
    assert isinstance(over, TransientFailure) and over.throttled and "monthly limit" in over.reason


def test_multicast_sends_one_content_to_many(line, sandbox):
    users = ["U" + c * 32 for c in "bcd"]
    result = line.multicast(users, LineContent(text="週末快閃"), "flash:2026-12-05")
    assert isinstance(result, Accepted) and result.provider_message_id == retry_key("flash:2026-12-05")
    assert sorted(m["to"] for m in sandbox.messages("line")) == sorted(f"{u[:4]}***(33)" for u in users)
    assert isinstance(line.multicast(users, LineContent(text="週末快閃"), "flash:2026-12-05"), Accepted)
    assert sandbox.stats()["accepted"]["line"] == 3


# -- webhook events -------------------------------------------------------------------------------------------


def _event(kind: str, **kw):
    return webhook_event(kind, USER, event_id=f"01J{kind.upper():0<23}"[:26], at=1_733_000_000.5, **kw)


def test_events_map_into_the_engagement_taxonomy():
    follow, unfollow = parse_event(_event("follow")), parse_event(_event("unfollow"))
    assert (follow.kind, follow.recipient, follow.channel) == (EventKind.RESUBSCRIBED, USER, Channel.LINE)
    assert unfollow.kind is EventKind.UNSUBSCRIBED and unfollow.suppress == "unsubscribe"
    stop = parse_event(_event("message", text=" 取消 "))
    assert stop.kind is EventKind.INBOUND and stop.command is InboundCommand.STOP
    assert parse_event(_event("message", text="ＳＴＯＰ")).command is InboundCommand.STOP  # full-width folds
    assert parse_event(_event("message", text="請不要取消我的訂單")).command is None
    click = parse_event(_event("postback", postback_data="mid=m42&action=open"))
    assert (click.kind, click.message_id) == (EventKind.CLICKED, "m42")
    link = parse_event({**_event("follow"), "type": "accountLink", "link": {"result": "ok", "nonce": "n"}})
    assert link.kind is EventKind.UNKNOWN and link.raw["link"]["nonce"] == "n" and "accountLink" in link.reason
    assert follow.dedupe_key == f"ev:{_event('follow')['webhookEventId']}"
    assert follow.occurred_at.timestamp() == pytest.approx(1_733_000_000.5)


def test_a_body_keeps_good_events_beside_refused_ones_and_refuses_other_shapes():
    events, rejected, positions = parse_body({"destination": "U0", "events": [_event("follow"), "junk"]})
    assert len(events) == 1 and [i for i, _ in rejected] == [1] and positions == [0]
    with pytest.raises(MalformedPayload):
        parse_body([_event("follow")])


def test_signature_is_hmac_sha256_base64_of_the_raw_body():
    body = json.dumps({"destination": "U0", "events": []}).encode()
    signature = line_signature(LINE_SECRET, body)
    assert verify_line_signature(LINE_SECRET, body, signature)
    assert not verify_line_signature(LINE_SECRET, body + b" ", signature)
    assert not verify_line_signature("f" * 32, body, signature)
    assert not verify_line_signature(LINE_SECRET, body, "not base64 at all")
    assert not verify_line_signature(LINE_SECRET, body, None)


def test_members_import_their_line_user_id_once(engine, tmp_path):
    import sqlalchemy as sa

    from membercare.data.importer import import_csv
    from membercare.models import Member

    rows = ["member_id,name,joined_at,preferred_channels,line_user_id",
            f"L1,陳怡君,2024-01-02 10:00:00,line>email,{USER}",
            "L2,林大明,2024-01-02 10:00:00,email,",
            "L3,王小美,2024-01-02 10:00:00,line,Uxyz",                      # not a LINE user id
            f"L4,張志豪,2024-01-02 10:00:00,line,{USER}"]                   # L1's id: the database refuses it
    path = tmp_path / "members.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = import_csv(engine, "members", path)
    assert (report.inserted, report.rejected) == (2, 2)
    with engine.connect() as c:
        got = dict(c.execute(sa.select(Member.__table__.c.external_id, Member.__table__.c.line_user_id)).tuples().all())
        prefs = c.execute(sa.select(Member.__table__.c.preferred_channels)
                          .where(Member.__table__.c.external_id == "L1")).scalar_one()
    assert got == {"L1": USER, "L2": None} and prefs == "line,email"


# -- templates ------------------------------------------------------------------------------------------------


@pytest.fixture
def tpl(tmp_path):
    import shutil
    from pathlib import Path

    dst = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parent.parent / "templates", dst)
    return dst


def test_templates_check_applies_lines_limits_and_locates_flex_errors(tpl):
    from membercare.config import Settings
    from membercare.rendering.check import check_campaign

    settings = Settings(templates_dir=tpl)
    assert [str(p) for p in check_campaign("vip_appreciation", settings) if p.severity == "error"] == []
    (tpl / "vip_appreciation" / "line.en.txt").write_text("{{ 'x' * 5001 }}\n", encoding="utf-8")
    problems = check_campaign("vip_appreciation", settings)
    assert {(p.code, p.file) for p in problems if p.severity == "error"} == {
        ("line-too-long", "templates/vip_appreciation/line.en.txt")}
    flex = tpl / "churn_winback" / "line_flex.json"
    flex.write_text(flex.read_text(encoding="utf-8").replace("{{ shop.name }}", "{{ shop.nickname }}"),
                    encoding="utf-8")
    undefined = [p for p in check_campaign("churn_winback", settings) if p.severity == "error"][0]
    assert undefined.code == "undefined" and undefined.file == "templates/churn_winback/line_flex.json"
    assert undefined.line == 9
    flex.write_text('{"altText": "x", "contents": []}', encoding="utf-8")
    assert {p.code for p in check_campaign("churn_winback", settings) if p.severity == "error"} == {"syntax"}


def test_the_rendered_line_content_carries_the_message_id_in_its_postback(tpl):
    from membercare.config import Settings
    from membercare.links import LinkSigner
    from membercare.rendering.renderer import CampaignRenderer
    from membercare.rendering.samples import SAMPLE_AS_OF, sample_context

    renderer = CampaignRenderer("vip_appreciation", Settings(templates_dir=tpl), signer=LinkSigner.preview())
    content = renderer.render(Channel.LINE, sample_context(renderer.builder, "zh-TW"), message_id="m-777",
                              as_of=SAMPLE_AS_OF)
    assert isinstance(content, LineContent) and "謝謝您這一年的支持" in content.text
    flex = json.loads(content.flex_json)
    assert flex["footer"]["contents"][1]["action"]["data"] == "mid=m-777&action=remind"
    assert content.alt_text


def test_migration_0010_adds_line_to_every_channel_check_and_moves_the_send_gate(engine, db_url):
    import sqlalchemy as sa
    from alembic import command

    from membercare.db import alembic_config, upgrade
    from membercare.models import Member

    m = Member.__table__
    with engine.begin() as c:
        from clock import FROZEN_NOW as NOW
        from fakes import seed_members

        [mid] = seed_members(c, 1, push=False, now=NOW, consent=(("line", "marketing"),))
        before = c.execute(sa.text("SELECT version FROM delivery_controls")).scalar_one()
        c.execute(sa.update(m).where(m.c.id == mid).values(line_user_id=USER))
        assert c.execute(sa.text("SELECT version FROM delivery_controls")).scalar_one() == before + 1
        c.execute(sa.text("INSERT INTO suppressions (channel, address_hash, reason, source, created_at) "
                          "VALUES ('line', 'h', 'unsubscribe', 't', :now)"), {"now": NOW})
    engine.dispose()
    command.downgrade(alembic_config(db_url), "0008_send_gate")  # LINE rows go, the old checks come back
    upgrade(db_url)
    with engine.connect() as c:
        linked = c.execute(sa.select(sa.func.count()).select_from(m).where(m.c.line_user_id.is_not(None)))
        assert linked.scalar_one() == 0


def test_routing_reaches_line_by_user_id_with_consent_and_no_suppression():
    from membercare.delivery.models import Decision
    from membercare.delivery.routing import MemberContext, candidate_order, route

    def ctx(**kw):
        base = dict(member_id=1, preferred=("line", "email"), email="a@example.test", line_user_id=USER,
                    consents={("line", "marketing"): True, ("email", "marketing"): True})
        return MemberContext(**{**base, **kw})

    order, _ = candidate_order(("line", "email"), ("email", "line"))
    assert route(ctx(), order, "marketing").chain == ("line", "email")
    no_id = route(ctx(line_user_id=None), order, "marketing")
    assert no_id.chain == ("email",) and no_id.rejected[0].code == Decision.NO_REACHABLE_CHANNEL
    assert route(ctx(line_user_id="Uxyz"), order, "marketing").chain == ("email",)
    assert route(ctx(consents={("email", "marketing"): True}), order, "marketing").chain == ("email",)
    blocked = route(ctx(suppressed={"line": "unsubscribe"}), order, "marketing")
    assert blocked.chain == ("email",) and blocked.rejected[0].code == Decision.SUPPRESSED


def test_the_estimate_warns_when_a_campaign_would_pass_the_monthly_line_quota(line, sandbox):
    from types import SimpleNamespace

    from membercare.cli.campaign import line_quota_note

    env = {ENV_ACCESS_TOKEN: LINE_TOKEN, "MEMBERCARE_LINE_BASE_URL": sandbox.url}
    est = SimpleNamespace(now={"line": 4, "email": 10}, later={"line": 1})
    assert line_quota_note(est, env) == "LINE quota: no monthly limit set (0 messages sent this month)"
    sandbox.configure(line_quota=100)
    assert line_quota_note(est, env) == "LINE quota: 5 of the 100 messages left this month"
    sandbox.configure(line_quota=3)
    assert "5 LINE messages wanted but only 3 of 3 left this month" in line_quota_note(est, env)
    assert line_quota_note(SimpleNamespace(now={"email": 3}, later={}), env) is None  # no LINE: no lookup
    assert line_quota_note(est, {}) == "LINE quota not checked (ConfigurationError)"
