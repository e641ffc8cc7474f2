"""Tracked short links: signed tokens, shortened SMS and LINE links (segments counted on the short text), and
``GET /r/{token}`` redirecting to the original URL while recording the click of that message, on SQLite
and PostgreSQL; unsigned, tampered or unknown tokens are refused with no redirect."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from fakes import seed_members
from membercare.config import Settings
from membercare.delivery.contract import LineContent, SmsContent
from membercare.delivery.planner import PlanSpec, plan_run
from membercare.delivery.policies import PolicySettings
from membercare.engagement.attribution import compute_attributions
from membercare.engagement.attribution_models import Attribution
from membercare.engagement.models import EngagementEventRow
from membercare.errors import InputError
from membercare.links import LinkSigner, sign_click_token, verify_click_token
from membercare.models import Channel, Member, Order, Purpose
from membercare.receiver import ReceiverConfig, create_app
from membercare.rendering import sms as smslen
from membercare.rendering.renderer import CampaignRenderer
from membercare.rendering.samples import SAMPLE_AS_OF, sample_context
from membercare.rendering.shortlinks import Shortener

SECRET = "short-link-test-secret-0123456789abcdef"
PUBLIC = "https://gd.example"
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MID = "0123456789abcdef0123456789abcdef"


def test_tokens_are_short_signed_and_name_a_message_and_a_link():
    token = sign_click_token(MID, 3, SECRET)
    assert len(token) == 32
    claims = verify_click_token(token, [SECRET])
    assert (claims.message_id, claims.index) == (MID, 3)
    assert verify_click_token(token, ["new-secret", SECRET]).index == 3  # rotation
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    for bad in (tampered, sign_click_token(MID, 3, "another secret"), "x" * 32, "", "a" * 500):
        with pytest.raises(InputError):
            verify_click_token(bad, [SECRET])


def test_shortener_keeps_punctuation_and_numbers_each_original_once():
    s = Shortener(LinkSigner(secret=SECRET, public_url=PUBLIC), MID)
    text = s.text("看這裡：https://shop.example.com/new?utm_source=x。再看 https://shop.example.com/b, 和 "
                  "https://shop.example.com/new?utm_source=x")
    assert s.links == ["https://shop.example.com/new?utm_source=x", "https://shop.example.com/b"]
    assert text.count(f"{PUBLIC}/r/") == 3 and "。再看" in text and ", 和" in text
    flex = s.flex({"action": {"type": "uri", "uri": "https://shop.example.com/b"}, "x": [{"uri": "gooddays://vip"}]})
    assert flex["action"]["uri"].startswith(f"{PUBLIC}/r/") and flex["x"][0]["uri"] == "gooddays://vip"


def test_the_zh_tw_winback_sms_needs_fewer_segments_with_a_short_link(tmp_path):
    tpl = tmp_path / "templates"
    shutil.copytree(TEMPLATES, tpl)
    settings = Settings(templates_dir=tpl, public_url=PUBLIC, secret_key=SECRET)
    signer = LinkSigner(secret=SECRET, public_url=PUBLIC)

    def render(short: bool) -> SmsContent:
        import re

        from membercare.campaigns.definition import load_campaign

        path = tpl / "churn_winback" / "campaign.yaml"
        path.write_text(re.sub(r"short_links: \w+", f"short_links: {str(short).lower()}",
                               path.read_text(encoding="utf-8")), encoding="utf-8")
        campaign = load_campaign("churn_winback", settings)
        assert campaign.short_links is short
        renderer = CampaignRenderer(campaign, settings, signer=signer)
        content = renderer.render(Channel.SMS, sample_context(renderer.builder, "zh-TW"), message_id=MID,
                                  as_of=SAMPLE_AS_OF)
        assert isinstance(content, SmsContent)
        return content

    full, short = render(False), render(True)
    assert "utm_campaign" in full.body and "utm_campaign" not in short.body and f"{PUBLIC}/r/" in short.body
    assert short.links and "utm_medium=sms" in short.links[0]
    assert short.segments < full.segments and short.segments == smslen.measure(short.body).segments
    assert full.encoding == short.encoding == "UCS-2"


def _render(request):
    """An SMS and a LINE message with one tracked link each (as the renderer makes them)."""
    s = Shortener(LinkSigner(secret=SECRET, public_url=PUBLIC), request.message_id)
    if request.channel == Channel.SMS:
        body = s.text("回來看看 https://shop.example.com/new?utm_medium=sms")
        return SmsContent(body=body, encoding="UCS-2", segments=1, links=tuple(s.links))
    text = s.text("回來看看 https://shop.example.com/line?utm_medium=line")
    flex = json.dumps(s.flex({"type": "bubble", "footer": {"type": "box", "layout": "vertical", "contents": [
        {"type": "button", "action": {"type": "uri", "label": "go", "uri": "https://shop.example.com/flex"}}]}}))
    return LineContent(text=text, flex_json=flex, alt_text="go", links=tuple(s.links))


def test_a_click_is_recorded_for_its_message_redirected_and_attributed(engine):
    now = datetime.now(UTC)
    with engine.begin() as c:
        sms_member, line_member = seed_members(c, 2, preferred="sms,line", push=False, now=now,
                                               consent=(("sms", "marketing"), ("line", "marketing")))
        c.execute(sa.update(Member.__table__).where(Member.__table__.c.id == line_member)
                  .values(line_user_id="U" + "b" * 32, preferred_channels="line,sms"))
    as_of = now - timedelta(minutes=5)
    spec = PlanSpec("winback_links", as_of.date().isoformat(), Purpose.MARKETING, (Channel.SMS, Channel.LINE))
    run = plan_run(engine, spec, [[sms_member, line_member]], as_of, _render,
                   policy=PolicySettings(marketing_cap=None, quiet_hours=None)).run_id
    from membercare.delivery.models import OutboxMessage, decode_contents

    o = OutboxMessage.__table__
    with engine.connect() as c:
        rows = {r.member_id: r for r in c.execute(sa.select(o).where(o.c.run_id == run))}
    assert (rows[sms_member].channel, rows[line_member].channel) == ("sms", "line")
    sms = decode_contents(rows[sms_member].content)["sms"]
    line = decode_contents(rows[line_member].content)["line"]
    sms_link = sms.body.split()[-1]
    flex_link = json.loads(line.flex_json)["footer"]["contents"][0]["action"]["uri"]

    client = TestClient(create_app(ReceiverConfig(public_url=PUBLIC, secret_key=SECRET), engine))
    path = lambda url: url.removeprefix(PUBLIC)  # noqa: E731 - the receiver serves the path
    r = client.get(path(sms_link), follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "https://shop.example.com/new?utm_medium=sms"
    assert client.get(path(sms_link), follow_redirects=False).status_code == 302  # again: one click stored
    r = client.get(path(flex_link), follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "https://shop.example.com/flex"
    # Refused with no redirect: a tampered token, one signed with another secret, an index the message lacks.
    token = path(sms_link).removeprefix("/r/")
    forged = [token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
              sign_click_token(rows[sms_member].message_id, 0, "not our secret"),
              sign_click_token(rows[sms_member].message_id, 7, SECRET), sign_click_token(MID, 0, SECRET)]
    for bad in forged:
        r = client.get(f"/r/{bad}", follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers

    e = EngagementEventRow.__table__
    with engine.connect() as c:
        clicks = c.execute(sa.select(e.c.message_id, e.c.member_id, e.c.channel, e.c.url)
                           .where(e.c.kind == "clicked").order_by(e.c.channel)).all()
    assert [tuple(x) for x in clicks] == [
        (rows[line_member].message_id, line_member, "line", "https://shop.example.com/flex"),
        (rows[sms_member].message_id, sms_member, "sms", "https://shop.example.com/new?utm_medium=sms")]

    # An order after the LINE click is credited to that message (LINE's touch is the click).
    ordered = datetime.now(UTC)
    with engine.begin() as c:
        c.execute(sa.insert(Order.__table__), [dict(external_id="SL-1", member_id=line_member, placed_at=ordered,
                                                    status="paid", total_minor=50_000, currency="TWD",
                                                    updated_at=ordered)])
    compute_attributions(engine, now - timedelta(days=1), datetime.now(UTC) + timedelta(minutes=1))
    a = Attribution.__table__
    with engine.connect() as c:
        credited = c.execute(sa.select(a.c.message_id, a.c.channel).where(a.c.message_id.is_not(None))).all()
    assert [tuple(x) for x in credited] == [(rows[line_member].message_id, "line")]
