"""Rendering: engine rules, helpers, locale fallback, channel content, signed links, batch contexts."""

from __future__ import annotations

import shutil
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from membercare.config import Settings
from membercare.delivery.contract import EmailContent, PushContent, SmsContent
from membercare.errors import ConfigurationError
from membercare.links import (
    InvalidTokenError,
    LinkScope,
    LinkSigner,
    add_utm,
    sign_member_token,
    verify_member_token,
)
from membercare.models import Channel, Coupon, Member, Order, OrderLine, Product
from membercare.rendering import CampaignRenderer, ContentLimitError, RenderError, TemplateStore, htmltext
from membercare.rendering.context import CoPurchaseModel, with_coupon, with_order
from membercare.rendering.engine import Part
from membercare.rendering.locales import Formatter, fallback_chain, normalise_locale
from membercare.rendering.samples import sample_context
from membercare.timeutil import UTC

PROJECT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SIGNER = LinkSigner("test-secret", "https://mc.example.org")


@pytest.fixture
def tpl_dir(tmp_path) -> Path:
    """A private copy of the project templates that a test may edit."""
    dst = tmp_path / "templates"
    shutil.copytree(PROJECT_TEMPLATES, dst)
    return dst


def renderer(name: str, templates: Path = PROJECT_TEMPLATES) -> CampaignRenderer:
    settings = Settings(templates_dir=templates)
    return CampaignRenderer(name, settings, signer=SIGNER, store=TemplateStore(templates))


def ctx_for(r: CampaignRenderer, sample_locale: str = "zh-TW", variant: str = "typical", **member) -> dict:
    ctx = sample_context(r.builder, sample_locale, variant)
    ctx["member"].update(member)
    return ctx


# -- links ----------------------------------------------------------------------------------------


def test_member_token_roundtrip_and_tamper():
    token = sign_member_token(42, "s3cret", LinkScope.EMAIL)
    assert len(token) == 35 and "42" not in token[:0]
    claims = verify_member_token(token, "s3cret")
    assert (claims.member_id, claims.scope) == (42, LinkScope.EMAIL)
    # Deterministic: retries render identical links.
    assert sign_member_token(42, "s3cret", LinkScope.EMAIL) == token
    with pytest.raises(InvalidTokenError):
        verify_member_token(token, "other")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(InvalidTokenError):
        verify_member_token(flipped, "s3cret")
    other_member = sign_member_token(43, "s3cret", LinkScope.EMAIL)
    with pytest.raises(InvalidTokenError):  # splice member 43's payload with member 42's signature
        verify_member_token(other_member[:14] + token[14:], "s3cret")
    with pytest.raises(InvalidTokenError):
        verify_member_token("not a token!", "s3cret")
    # Rotation: old links still verify while the old secret is listed.
    assert verify_member_token(token, ["new", "s3cret"]).member_id == 42


def test_signer_urls_and_config():
    assert SIGNER.unsubscribe_url(7).startswith("https://mc.example.org/u/")
    assert SIGNER.preferences_url(7).endswith("/preferences")
    assert SIGNER.verify(SIGNER.unsubscribe_url(7).rsplit("/", 1)[1]).member_id == 7
    with pytest.raises(ConfigurationError):
        LinkSigner.from_settings(Settings(), env={})
    preview = LinkSigner.from_settings(Settings(), env={}, allow_preview=True)
    assert preview.is_preview and preview.public_url == "http://127.0.0.1:8080"
    live = LinkSigner.from_settings(None, env={"MEMBERCARE_SECRET_KEY": "k", "MEMBERCARE_PUBLIC_URL": "https://x.io/"})
    assert live.public_url == "https://x.io" and not live.is_preview
    explicit = LinkSigner.from_settings(Settings(secret_key="k2", public_url="https://y.io"), env={})
    assert explicit.public_url == "https://y.io" and not explicit.is_preview


def test_add_utm_keeps_existing_params_and_skips_non_http():
    url = add_utm("https://s.example.com/p?a=1&utm_source=keep", source="mc", medium="email", campaign="bd",
                  content="cta")
    assert "a=1" in url and "utm_source=keep" in url and "utm_medium=email" in url and "utm_content=cta" in url
    assert add_utm("gooddays://coupons", source="mc", medium="push", campaign="x") == "gooddays://coupons"


# -- locales and helpers ----------------------------------------------------------------------------


def test_locale_normalisation_and_fallback_chain():
    assert normalise_locale("zh_tw") == "zh-TW" and normalise_locale("zh-hant-tw") == "zh-Hant-TW"
    assert fallback_chain("en-US", "zh-TW") == ["en-US", "en", "zh-TW", "zh"]
    assert fallback_chain("garbage!!", "zh-TW") == ["zh-TW", "zh"]


def test_formatter_money_dates_and_coupons():
    zh, en = Formatter("zh-TW", currency_symbols={"TWD": "NT$"}), Formatter("en", currency_symbols={"TWD": "NT$"})
    assert zh.money(120000) == "NT$1,200" and en.money(120000) == "NT$1,200"
    assert en.money(123456) == "NT$1,234.56"
    assert zh.date(date(2026, 11, 23)) == "2026年11月23日" and en.date(date(2026, 11, 23)) == "November 23, 2026"
    assert zh.date(date(2026, 11, 23), "month_day") == "11月23日"
    # A timestamp is shown on the member's calendar day: 20:00 UTC is the next day in Taipei.
    assert zh.date(datetime(2026, 11, 22, 20, 0, tzinfo=UTC)) == "2026年11月23日"
    assert zh.discount(kind="percent", percent_off=15) == "85折"
    assert zh.discount(kind="percent", percent_off=10) == "9折"
    assert en.discount(kind="percent", percent_off=15) == "15% off"
    assert zh.discount(kind="amount", amount_minor=20000, style="voucher") == "NT$200 折價券"
    assert zh.min_spend(100000) == "滿NT$1,000可用" and en.min_spend(0) == "no minimum spend"


# -- engine rules ---------------------------------------------------------------------------------------


def _mini(tmp_path: Path, files: dict[str, str], yaml_extra: str = "", purpose: str = "marketing") -> CampaignRenderer:
    root = tmp_path / "tpl"
    shutil.copytree(PROJECT_TEMPLATES / "_layout", root / "_layout")
    (root / "mini").mkdir(parents=True)
    (root / "mini" / "campaign.yaml").write_text(
        f"description: test\npurpose: {purpose}\nsegment: {{name: vip}}\nchannels: [email, sms, push]\n"
        f"locales: [zh-TW, en]\n{yaml_extra}", encoding="utf-8")
    for name, text in files.items():
        (root / "mini" / name).write_text(text, encoding="utf-8")
    return renderer("mini", root)


BASIC = {
    "email_subject.en.txt": "Hi {{ member.name }} & co",
    "email.en.html": "<p class='x'>Hello {{ member.name }}</p>",
    "sms.en.txt": "Hi {{ member.name }} & co <3",
    "push_title.en.txt": "T {{ member.name }}",
    "push_body.en.txt": "B",
}


def test_autoescape_only_for_html(tmp_path):
    r = _mini(tmp_path, BASIC)
    ctx = ctx_for(r, "en", name="Tom <b>&</b>")
    email = r.render(Channel.EMAIL, ctx)
    assert "Hello Tom &lt;b&gt;&amp;&lt;/b&gt;" in email.html and "<b>&</b>" not in email.html
    assert email.subject == "Hi Tom <b>&</b> & co"  # subject is text: never HTML-escaped
    sms = r.render(Channel.SMS, ctx)
    assert sms.body.startswith("Hi Tom <b>&</b> & co <3") and "&amp;" not in sms.body


def test_subject_newlines_cannot_inject_headers(tmp_path):
    r = _mini(tmp_path, BASIC)
    email = r.render(Channel.EMAIL, ctx_for(r, "en", name="Eve\r\nBcc: x@evil.example"))
    assert "\n" not in email.subject and "\r" not in email.subject


def test_undefined_variable_is_an_error_with_file_and_line(tmp_path):
    r = _mini(tmp_path, {**BASIC, "sms.en.txt": "line one\n{{ member.nickname }}"})
    with pytest.raises(RenderError) as err:
        r.render(Channel.SMS, ctx_for(r, "en"))
    assert err.value.code == "undefined" and err.value.line == 2 and err.value.file.endswith("mini/sms.en.txt")


def test_undefined_in_email_body_maps_through_the_layout(tmp_path):
    r = _mini(tmp_path, {**BASIC, "email.en.html": "<p>a</p>\n<p>b</p>\n<p>{{ nope }}</p>\n"})
    with pytest.raises(RenderError) as err:
        r.render(Channel.EMAIL, ctx_for(r, "en"))
    assert err.value.file.endswith("mini/email.en.html") and err.value.line == 3


def test_sandbox_blocks_internals_and_mutation(tmp_path):
    r = _mini(tmp_path, {**BASIC, "sms.en.txt": "{{ member.__class__.__mro__ }}"})
    with pytest.raises(RenderError):
        r.render(Channel.SMS, ctx_for(r, "en"))
    r = _mini(tmp_path / "b", {**BASIC, "sms.en.txt": "{{ coupons.append(1) }}"})
    ctx = ctx_for(r, "en")
    with pytest.raises(RenderError):
        r.render(Channel.SMS, ctx)
    assert len(ctx["coupons"]) == 1


def test_locale_fallback_language_then_default(tmp_path):
    r = _mini(tmp_path, {**BASIC, "sms.zh-TW.txt": "中文", "push_title.zh-TW.txt": "t", "push_body.zh-TW.txt": "b",
                         "email_subject.zh-TW.txt": "s", "email.zh-TW.html": "<p>x</p>"})
    assert r.template_locale(Channel.SMS, "en-GB") == "en"
    assert r.template_locale(Channel.SMS, "fr-FR") == "zh-TW"
    assert r.template_locale(Channel.SMS, None) == "zh-TW"
    sms = r.render(Channel.SMS, ctx_for(r, "en", locale="fr"))
    assert sms.body.startswith("中文") and sms.body.endswith("回覆STOP取消")


def test_marketing_sms_gets_opt_out_in_member_language_transactional_does_not(tmp_path):
    r = _mini(tmp_path, BASIC)
    assert r.render(Channel.SMS, ctx_for(r, "en")).body.endswith("Reply STOP to opt out")
    t = _mini(tmp_path / "t", BASIC, purpose="transactional")
    assert "STOP" not in t.render(Channel.SMS, ctx_for(t, "en")).body


def test_sms_over_max_segments_is_an_error_never_truncated(tmp_path):
    r = _mini(tmp_path, {**BASIC, "sms.en.txt": "x" * 300})
    with pytest.raises(ContentLimitError) as err:
        r.render(Channel.SMS, ctx_for(r, "en"))
    assert err.value.code == "sms-too-long" and "3 segments" in str(err.value)
    r = _mini(tmp_path / "ok", {**BASIC, "sms.en.txt": "x" * 300}, yaml_extra="sms: {max_segments: 3}\n")
    sms = r.render(Channel.SMS, ctx_for(r, "en"))
    assert sms.segments == 3 and sms.body.startswith("x" * 300)


def test_push_limits_and_fcm_payload(tmp_path):
    r = _mini(tmp_path, {**BASIC, "push_title.en.txt": "T" * 51})
    with pytest.raises(ContentLimitError, match="push title"):
        r.render(Channel.PUSH, ctx_for(r, "en"))
    r = _mini(tmp_path / "d", {**BASIC, "push_data.json": '{"blob": "' + "x" * 4100 + '"}'})
    with pytest.raises(ContentLimitError) as err:
        r.render(Channel.PUSH, ctx_for(r, "en"))
    assert err.value.code == "push-payload"


def test_email_text_is_derived_from_html_when_absent(tmp_path):
    html = ("<h1>Title</h1><p>Hello {{ member.name }}</p><ul><li>one</li><li>two</li></ul>"
            "<p><a href=\"{{ link('https://shop.example.com/x') }}\">Go</a></p>"
            "<table><tbody>{% for p in recommendations %}"
            "<tr><td>{{ p.name }}</td><td>{{ p.price_minor | money }}</td></tr>"
            "{% endfor %}</tbody></table>")
    r = _mini(tmp_path, {**BASIC, "email.en.html": html})
    text = r.render(Channel.EMAIL, ctx_for(r, "en")).text
    assert "Title\n\nHello Emily Chen" in text
    assert "- one\n- two" in text
    assert "Go: https://shop.example.com/x?utm_source=membercare&utm_medium=email&utm_campaign=mini" in text
    assert "Handmade Ceramic Mug — NT$680" in text
    assert "Unsubscribe: https://mc.example.org/u/" in text and "<" not in text


# -- ready-made campaigns -----------------------------------------------------------------------------


@pytest.mark.parametrize("locale", ["zh-TW", "en"])
def test_birthday_email_is_complete(locale):
    r = renderer("birthday")
    ctx = ctx_for(r, locale)
    email = r.render(Channel.EMAIL, ctx, message_id="m-1")
    assert isinstance(email, EmailContent)
    assert ctx["coupon"]["code"] in email.html and email.preheader
    assert email.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"<{ctx['email_unsubscribe_url']}>" in email.headers["List-Unsubscribe"]
    assert ctx["email_unsubscribe_url"] in email.html and ctx["preferences_url"] in email.html
    # CSS is inlined into the compiled template (mail clients drop <style>), @media kept for phones.
    assert 'style="' in email.html and "@media" in email.html and ".coupon-value" not in email.html.split("@media")[0]
    assert "NT$200" in email.subject
    if locale == "zh-TW":
        assert "2026年11月23日" in email.html and 'lang="zh-Hant-TW"' in email.html
    else:
        assert "November 23, 2026" in email.html


def test_transactional_email_has_no_list_unsubscribe():
    r = renderer("service_recovery")
    email = r.render(Channel.EMAIL, ctx_for(r, "en"))
    assert "List-Unsubscribe" not in email.headers and "Unsubscribe" not in email.text


def test_push_content_has_deep_link_and_message_id():
    r = renderer("coupon_expiry")
    ctx = ctx_for(r, "zh-TW")
    push = r.render(Channel.PUSH, ctx, message_id="msg-123")
    assert isinstance(push, PushContent)
    assert push.data["message_id"] == "msg-123" and push.data["campaign"] == "coupon_expiry"
    assert push.data["deep_link"] == f"gooddays://member/coupons?code={ctx['coupon']['code']}"
    assert all(isinstance(v, str) for v in push.data.values())


def test_zh_tw_sms_is_ucs2_with_segments():
    r = renderer("coupon_expiry")
    sms = r.render(Channel.SMS, ctx_for(r, "zh-TW"))
    assert isinstance(sms, SmsContent) and sms.encoding == "UCS-2" and sms.segments >= 2
    assert sms.body.endswith("回覆STOP取消") and r.sms_cost_minor(sms) == 150 * sms.segments


def test_with_coupon_picks_the_coupon_of_the_message():
    r = renderer("coupon_expiry")
    ctx = sample_context(r.builder, "en", "worst")
    assert ctx["coupon"]["code"] == "BDAY-7Q4M-2KXA"  # soonest expiry by default
    other = with_coupon(ctx, "VIP15-ZZ9W")
    assert "VIP15-ZZ9W" in r.render(Channel.SMS, other).body
    with pytest.raises(KeyError):
        with_coupon(ctx, "NOPE")


def test_templates_compile_once_and_css_is_inlined_once(monkeypatch):
    calls = []
    real = htmltext.inline_css
    monkeypatch.setattr("membercare.rendering.engine.inline_css", lambda s: calls.append(1) or real(s))
    store = TemplateStore(PROJECT_TEMPLATES)
    r = CampaignRenderer("birthday", Settings(), signer=SIGNER, store=store)
    for locale in ("zh-TW", "en", "zh-TW", "en"):
        for variant in ("typical", "worst"):
            r.render(Channel.EMAIL, ctx_for(r, locale, variant))
    assert len(calls) == 2  # one per locale, not per message
    assert store.get("birthday", Part.SMS, "en") is store.get("birthday", Part.SMS, "en")


# -- contexts from the database ---------------------------------------------------------------------


AS_OF = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)


def _seed(conn) -> dict[str, int]:
    def ins(table, **values):
        return conn.execute(table.__table__.insert().values(**values).returning(table.__table__.c.id)).scalar_one()

    prods = {sku: ins(Product, sku=sku, name=name, category=cat, price_minor=price)
             for sku, name, cat, price in [("A", "Kettle", "coffee", 150000), ("B", "Filter papers", "coffee", 20000),
                                           ("C", "Beans", "coffee", 50000), ("D", "Towel", "home", 90000),
                                           ("E", "Mug", "kitchen", 40000)]}
    members = {}
    for ext, locale in [("M1", "zh-TW"), ("M2", "en"), ("M3", "en"), ("M4", "zh-TW")]:
        members[ext] = ins(Member, external_id=ext, name="王小明" if locale == "zh-TW" else "Ann Lee", locale=locale,
                           joined_at=AS_OF - timedelta(days=400), tier="silver", email=f"{ext}@example.com")
    n = 0

    def order(member, skus, days_ago, status="paid"):
        nonlocal n
        n += 1
        oid = ins(Order, external_id=f"O{n}", member_id=members[member], placed_at=AS_OF - timedelta(days=days_ago),
                  status=status, total_minor=sum(100 for _ in skus) * 1000)
        for i, sku in enumerate(skus, 1):
            conn.execute(OrderLine.__table__.insert().values(order_id=oid, line_no=i, product_id=prods[sku], sku=sku,
                                                             category="coffee" if sku in "ABC" else "home",
                                                             quantity=1, amount_minor=1000))
    # Kettle and filter papers are bought together again and again; M1 bought a kettle only.
    order("M2", ["A", "B"], 30)
    order("M3", ["A", "B", "C"], 20)
    order("M4", ["A", "B"], 10)
    order("M4", ["D"], 5)
    order("M1", ["A"], 3)
    order("M1", ["E"], 1, status="cancelled")  # not a purchase
    conn.execute(Coupon.__table__.insert().values(
        code="BD-1", member_id=members["M1"], kind="amount", amount_minor=20000, min_spend_minor=100000,
        issued_at=AS_OF - timedelta(days=1), expires_at=AS_OF + timedelta(days=10), campaign="birthday"))
    conn.execute(Coupon.__table__.insert().values(
        code="OLD-1", member_id=members["M1"], kind="percent", percent_off=10,
        issued_at=AS_OF - timedelta(days=60), expires_at=AS_OF - timedelta(days=1)))
    return members


def test_build_context_is_set_based_and_complete(engine):
    with engine.begin() as conn:
        ids = _seed(conn)
    r = renderer("birthday")
    statements = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda *a: statements.append(a[2]) if a[2].lstrip().upper().startswith("SELECT") else None)
    with engine.connect() as conn:
        contexts = r.build_context(conn, list(ids.values()) + [999999], AS_OF)
        first = len(statements)
        r.build_context(conn, [ids["M1"]], AS_OF)
    # A fixed handful for the whole batch: 5 per batch + 3 for the co-purchase model + 1 for tiers.
    assert first == 9, statements
    assert len(statements) - first == 5  # the co-purchase model and tiers are cached per run
    assert set(contexts) == set(ids.values())
    m1 = contexts[ids["M1"]]
    assert m1["member"]["external_id"] == "M1" and m1["stats"]["orders_total"] == 1
    assert [c["code"] for c in m1["coupons"]] == ["BD-1"] and m1["coupon"]["code"] == "BD-1"
    assert m1["last_order"]["lines"][0]["name"] == "Kettle"
    m4 = contexts[ids["M4"]]
    assert [o["external_id"] for o in m4["recent_orders"]] == ["O4", "O3"]
    assert with_order(m4, "O3")["last_order"]["lines"][1]["sku"] == "B"
    # Co-purchase: the kettle's strongest neighbour is filter papers.
    assert m1["recommendations"][0]["sku"] == "B"
    assert all(p["sku"] != "A" for p in m1["recommendations"])
    assert m1["tier_progress"]["next"] == "gold" and m1["offer"]["amount_minor"] == 20000
    assert SIGNER.verify(m1["unsubscribe_url"].rsplit("/", 1)[1]).member_id == ids["M1"]
    # And it renders on every channel.
    for ch in (Channel.EMAIL, Channel.SMS, Channel.PUSH):
        r.render(ch, m1, as_of=AS_OF)


def test_co_purchase_model_scores_by_cosine(engine):
    with engine.begin() as conn:
        _seed(conn)
    with engine.connect() as conn:
        model = CoPurchaseModel.load(conn, AS_OF)
    a = next(pid for pid, p in model.products.items() if p["sku"] == "A")
    b = next(pid for pid, p in model.products.items() if p["sku"] == "B")
    top, sim = model.neighbours[a][0]
    assert top == b and sim == pytest.approx(3 / (4 * 3) ** 0.5)
    assert model.recommend([a], 2)[0] == b


# -- template variants ----------------------------------------------------------------------------------

VARIANTS_YAML = "optimise:\n  variants: {names: [a, b]}\n"


def test_variant_parts_override_and_fall_back_to_the_plain_parts(tmp_path):
    r = _mini(tmp_path, {**BASIC, "email_subject@b.en.txt": "B subject {{ member.name }}",
                         "push_title@b.en.txt": "B title", "email@b.en.html": "<p>B body {{ variant }}</p>"},
              VARIANTS_YAML)
    ctx = ctx_for(r, "en", name="Tom")
    plain, a, b = (r.render(Channel.EMAIL, ctx, variant=v) for v in (None, "a", "b"))
    assert plain.subject == a.subject == "Hi Tom & co" and "Hello Tom" in a.html
    assert b.subject == "B subject Tom" and "B body b" in b.html
    assert "B body b" in b.text and "Hello" not in b.text  # text derived from the variant's own HTML
    assert r.render(Channel.PUSH, ctx, variant="b").title == "B title"
    assert r.render(Channel.PUSH, ctx, variant="b").body == r.render(Channel.PUSH, ctx).body  # not overridden
    assert r.render(Channel.SMS, ctx, variant="b").body == r.render(Channel.SMS, ctx).body
    with pytest.raises(RenderError, match="no template variant 'c'"):
        r.render(Channel.EMAIL, ctx, variant="c")


def test_variant_is_refused_without_a_variant_test(tmp_path):
    r = _mini(tmp_path, BASIC)
    with pytest.raises(RenderError, match="has no template variant 'b'"):
        r.render(Channel.SMS, ctx_for(r, "en"), variant="b")


def test_variant_file_names_parse():
    from membercare.rendering.engine import parse_filename, parse_template_filename, part_filename

    assert parse_template_filename("email_subject@b.en.txt") == (Part.EMAIL_SUBJECT, "en", "b")
    assert parse_template_filename("push_data@v2.json") == (Part.PUSH_DATA, None, "v2")
    assert parse_template_filename("sms.zh-TW.txt") == (Part.SMS, "zh-TW", None)
    assert parse_template_filename("sms@B.en.txt") is None and parse_template_filename("sms@.en.txt") is None
    assert parse_filename("sms@b.en.txt") is None and parse_filename("sms.en.txt") == (Part.SMS, "en")
    assert part_filename(Part.EMAIL_HTML, "en", "b") == "email@b.en.html"


def test_churn_winback_variants_differ_in_subject_only_where_overridden():
    r = renderer("churn_winback")
    for loc in ("zh-TW", "en"):
        ctx = ctx_for(r, loc)
        a, b = (r.render(Channel.EMAIL, ctx, variant=v) for v in ("a", "b"))
        assert a.subject != b.subject and a.html.count("<table") == b.html.count("<table")
        assert r.render(Channel.PUSH, ctx, variant="a").title != r.render(Channel.PUSH, ctx, variant="b").title
