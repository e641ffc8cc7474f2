"""Bounds on hostile or mistaken input: template renders are bounded in memory and time with a clear
error (and ``templates check`` reports it); member link tokens with an id no member can have are
refused when signed and when presented, with a clear page and never a 500 (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from clock import FROZEN_NOW
from membercare.config import Settings
from membercare.consent import ConsentStatement, current_consents, record_consents
from membercare.links import MAX_MEMBER_ID, InvalidTokenError, LinkSigner, sign_member_token, verify_member_token
from membercare.models import Channel, Member
from membercare.receiver import ReceiverConfig, create_app
from membercare.rendering import CampaignRenderer, RenderError, TemplateStore
from membercare.rendering.check import TemplateCheckError, check_campaign, ensure_campaign_ready
from membercare.rendering.engine import HTML_ENV, TEXT_ENV
from membercare.rendering.limits import RenderLimits, TemplateLimitError
from membercare.rendering.samples import sample_context

PROJECT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SIGNER = LinkSigner("test-secret", "https://mc.example.org")
PERSONAL = {"name": "Ann Secretname", "email": "ann.secret@example.com", "phone": "+886912345678"}


# -- rendering ---------------------------------------------------------------------------------------------------------


def _mini(tmp_path: Path, files: dict[str, str], limits: RenderLimits | None = None) -> CampaignRenderer:
    """A campaign ``mini`` (English email, SMS and push) with the shared layouts and the given files."""
    root = tmp_path / "tpl"
    shutil.copytree(PROJECT_TEMPLATES / "_layout", root / "_layout")
    (root / "mini").mkdir(parents=True)
    (root / "mini" / "campaign.yaml").write_text(
        "description: test\npurpose: marketing\nsegment: {name: vip}\nchannels: [email, sms, push]\n"
        "locales: [en]\ndefault_locale: en\n", encoding="utf-8")
    base = {"email_subject.en.txt": "Hi {{ member.name }}", "email.en.html": "<p>Hello {{ member.name }}</p>",
            "sms.en.txt": "Hi {{ member.name }}", "push_title.en.txt": "T", "push_body.en.txt": "B"}
    for name, text in {**base, **files}.items():
        (root / "mini" / name).write_text(text, encoding="utf-8")
    kwargs = {"limits": limits} if limits is not None else {}
    return CampaignRenderer("mini", Settings(templates_dir=root), signer=SIGNER, store=TemplateStore(root), **kwargs)


def _ctx(r: CampaignRenderer) -> dict:
    ctx = sample_context(r.builder, "en", "typical")
    ctx["member"].update(PERSONAL)
    return ctx


def _render_error(r: CampaignRenderer, channel: Channel = Channel.SMS) -> RenderError:
    with pytest.raises(RenderError) as err:
        r.render(channel, _ctx(r))
    message = str(err.value)
    for value in PERSONAL.values():  # sizes and limits only, never the member's data
        assert value not in message and value[:6] not in message, message
    return err.value


def test_a_gigabyte_string_is_refused_before_it_is_allocated(tmp_path):
    r = _mini(tmp_path, {"sms.en.txt": "Hi {{ member.name }}\n{{ member.name * 10**9 }}"})
    tracemalloc.start()
    try:
        err = _render_error(r)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    assert (err.code, err.line) == ("limit", 2) and err.file.endswith("mini/sms.en.txt")
    assert "over a template limit" in err.detail and "1,000,000" in err.detail and "(max_value)" in err.detail


@pytest.mark.parametrize("src, limit", [
    ("{{ [1] * 10**9 }}", "max_value"),
    ("{{ 'ab' + 'c' * 999999 }}", "max_value"),
    ("{{ 9 ** 999999 }}", "max_int_bits"),
    ("{{ 'x'.ljust(10**9) }}", "max_value"),
    ("{{ 'x'.zfill(10**9) }}", "max_value"),
    ("{{ ('x' | safe).ljust(10**9) }}", "max_value"),
    ("{{ ('xx' | safe).replace('x', 'y' * 600000) }}", "max_value"),
    ("{{ ('{:>1000000000}' | safe).format(1) }}", "max_value"),
    ("{{ 'x' | center(1000000000) }}", "max_value"),
    ("{{ 'x' | indent(10**9) }}", "max_value"),
    ("{{ '%*d' % (10**9, 1) }}", "max_value"),
    ("{{ '%*d' | format(10**9, 1) }}", "max_value"),
    ("{{ '{:>1000000000}'.format(1) }}", "max_value"),
    ("{{ ('a' * 600000).replace('a', 'aa') }}", "max_value"),
    ("{{ ['a' * 600000, 'b' * 600000] | join }}", "max_value"),
    ("{{ '-'.join(['a' * 600000, 'b' * 600000]) }}", "max_value"),
    ("{{ [1] | batch(10**9, 0) | list }}", "max_value"),
    ("{{ range(10**9) | list }}", "max_range"),
    ("{{ lipsum(10**6) }}", "max_value"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "max_value"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s | urlencode | replace('a', 'aa') %}"
     "{% endfor %}", "max_value"),
    ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "max_steps"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "max_steps"),
    ("{% for i in range(2000) %}{{ 'x' * 1000 }}{% endfor %}", "max_output"),
    ("{% macro m() %}{% for i in range(2000) %}{{ 'x' * 1000 }}{% endfor %}{% endmacro %}{{ m() | length }}",
     "max_output"),
    ("{% set x %}{% for i in range(2000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}{{ x | length }}", "max_output"),
])
@pytest.mark.parametrize("env", [TEXT_ENV, HTML_ENV], ids=["text", "html"])
def test_each_way_to_grow_or_spin_is_bounded(env, src, limit, monkeypatch):
    """Engine level (Jinja's own ``render``, which also has ``range``, ``namespace`` and ``lipsum``)."""
    # Each case is about one limit; on a loaded machine the 1 s wall-time limit could trip first.
    monkeypatch.setattr(env, "limits", dataclasses.replace(env.limits, max_seconds=120.0))
    with pytest.raises(TemplateLimitError, match=rf"\({limit}\)"):
        env.from_string(src).render()


BIG = "{% set b = 'x' * 900000 %}"


@pytest.mark.parametrize("src", [
    BIG + "{{ b ~ b ~ b ~ b ~ b ~ b ~ b ~ b }}",
    BIG + "{{ '%s%s%s%s%s%s%s%s' % (b, b, b, b, b, b, b, b) }}",
    BIG + "{{ '%s%s%s%s%s%s%s%s' | format(b, b, b, b, b, b, b, b) }}",
    BIG + "{{ '{0}{0}{0}{0}{0}{0}{0}{0}'.format(b) }}",
    BIG + "{{ '{x}{x}{x}{x}{x}{x}{x}{x}'.format_map({'x': b}) }}",
    BIG + "{{ [b, b, b, b, b, b, b, b] | join }}",
])
@pytest.mark.parametrize("env", [TEXT_ENV, HTML_ENV], ids=["text", "html"])
def test_one_large_value_used_many_times_is_refused_before_the_result_is_built(env, src):
    template = env.from_string(src)
    tracemalloc.start()
    try:
        with pytest.raises(TemplateLimitError, match=r"of 7,200,\d{3} characters or items is over the limit of "
                                                       r"1,000,000 \(max_value\)"):
            template.render()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MiB"  # the 0.9 MB value (x4 bytes at most), not 7.2 MB


def test_ordinary_template_features_still_work():
    src = ("{% for i in range(3) %}{{ loop.index }}{{ loop.cycle('a', 'b') }}{% else %}none{% endfor %}|"
           "{% for x in [3, 1, 2] if x > 1 %}{{ x }}{% endfor %}|{{ '%05.1f' % 3.14159 }}|{{ 7 % 3 }}|"
           "{{ 'ab' ~ 'cd' }}|{{ [1] + [2] }}|{{ 'x' * 3 }}|{{ 2 ** 10 }}|{{ ['a', 'b'] | join('-') }}|"
           "{{ 'a b' | replace(' ', '_') | upper }}|{{ '{:>4}'.format(7) }}|{{ 'x' | center(5) }}|"
           "{% for k, v in {'k': 1} | dictsort %}{{ k }}={{ v }}{% endfor %}|"
           "{% for item in [{'c': [{'c': []}]}] recursive %}[{{ loop(item.c) }}]{% endfor %}")
    assert TEXT_ENV.from_string(src).render() == \
        "1a2b3a|32|003.1|1|abcd|[1, 2]|xxx|1024|a-b|A_B|   7|  x  |k=1|[[]]"


def test_output_over_the_limit_names_the_file_through_the_layout(tmp_path):
    r = _mini(tmp_path, {"email.en.html": "<p>a</p>\n{% for c in 'x' * 5000 %}<p>{{ 'y' * 1000 }}</p>{% endfor %}\n"})
    err = _render_error(r, Channel.EMAIL)
    assert err.code == "limit" and err.file.endswith("mini/email.en.html") and "(max_output)" in err.detail


def test_loops_and_calls_are_bounded_in_steps(tmp_path):
    r = _mini(tmp_path, {"sms.en.txt": "{% for a in 'x' * 1000 %}{% for b in 'x' * 1000 %}{% endfor %}{% endfor %}"})
    err = _render_error(r)
    assert err.code == "limit" and err.line == 1 and "more than 100,000 loop iterations and calls" in err.detail


def test_render_time_is_bounded_on_an_injected_clock(tmp_path):
    """Every reading of the clock advances it by 10 ms: the render is stopped after 1 s of that clock."""
    readings = []

    def clock() -> float:
        readings.append(None)
        return len(readings) * 0.01

    limits = RenderLimits(max_seconds=1.0, clock=clock)
    r = _mini(tmp_path, {"sms.en.txt": "{% for a in 'x' * 200 %}{% for b in 'x' * 200 %}{% endfor %}{% endfor %}"},
              limits=limits)
    err = _render_error(r)
    assert err.code == "limit" and "longer than 1 s" in err.detail and "(max_seconds)" in err.detail
    assert 100 <= len(readings) <= 250  # ~16 steps per reading: stopped after ~1,600 of the 40,200 steps
    # The same template within the default limits is fine: it is the clock that stopped it.
    assert _mini(tmp_path / "ok", {"sms.en.txt": "ok{% for a in 'x' * 200 %}{% for b in 'x' * 200 %}{% endfor %}"
                                                  "{% endfor %}"}).render(Channel.SMS, _ctx(r)).body.startswith("ok")


def test_a_renderer_can_be_given_its_own_limits(tmp_path):
    r = _mini(tmp_path, {"sms.en.txt": "{{ member.name * 20 }}"}, limits=RenderLimits(max_value=100, max_output=50))
    err = _render_error(r)
    assert err.code == "limit" and "over the limit of 100 (max_value)" in err.detail
    r = _mini(tmp_path / "out", {"sms.en.txt": "{{ member.name * 5 }}"}, limits=RenderLimits(max_output=50))
    assert "over the limit of 50 (max_output)" in _render_error(r).detail


def test_runaway_macro_recursion_is_a_limit_error(tmp_path):
    r = _mini(tmp_path, {"sms.en.txt": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"})
    err = _render_error(r)
    assert err.code == "limit" and "too deeply" in err.detail


def test_push_data_values_are_bounded_too(tmp_path):
    r = _mini(tmp_path, {"push_data.en.json": '{"deep_link": "{{ \'a\' * 10**9 }}"}'})
    err = _render_error(r, Channel.PUSH)
    assert err.code == "limit" and err.file.endswith("mini/push_data.en.json") and "(max_value)" in err.detail


@pytest.fixture
def tpl(tmp_path) -> Path:
    dst = tmp_path / "templates"
    shutil.copytree(PROJECT_TEMPLATES, dst)
    return dst


def test_templates_check_reports_the_limit_with_file_and_line(tpl):
    (tpl / "birthday" / "sms.en.txt").write_text("Happy birthday!\n{{ member.name * 10**9 }}\n", encoding="utf-8")
    problems = check_campaign("birthday", Settings(templates_dir=tpl))
    limits = [p for p in problems if p.code == "limit"]
    assert limits and all(p.severity == "error" for p in limits)
    assert {(p.file, p.line) for p in limits} == {("templates/birthday/sms.en.txt", 2)}
    assert "over a template limit" in limits[0].message and "(max_value)" in limits[0].message
    with pytest.raises(TemplateCheckError, match=r"\[limit\]"):
        ensure_campaign_ready("birthday", Settings(templates_dir=tpl))


# -- link tokens -------------------------------------------------------------------------------------------------------

SECRET = "link-secret-for-tests-0123456789"


def _signed_with_secret(member_id: int, secret: str = SECRET, scope_code: int = 0) -> str:
    """A token in the documented format (see membercare/links.py), for any 64-bit id, signed with ``secret``:
    what a leaked secret or an older signer could have produced."""
    payload = struct.pack(">BQB", 1, member_id, scope_code)
    mac = hmac.new(secret.encode(), b"membercare.link" + payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()


@pytest.mark.parametrize("member_id", [0, -1, 2**63, 2**64 - 1, 2**64, True, "5", 5.0, None])
def test_signing_refuses_an_id_no_member_can_have(member_id):
    with pytest.raises(ValueError, match="member id must be an integer from 1 to 9223372036854775807"):
        sign_member_token(member_id, SECRET)


def test_the_largest_member_id_round_trips():
    assert _signed_with_secret(MAX_MEMBER_ID) == sign_member_token(MAX_MEMBER_ID, SECRET)
    assert verify_member_token(sign_member_token(MAX_MEMBER_ID, SECRET), SECRET).member_id == MAX_MEMBER_ID
    assert verify_member_token(sign_member_token(1, SECRET), SECRET).member_id == 1


@pytest.mark.parametrize("token", [_signed_with_secret(0), _signed_with_secret(2**63), _signed_with_secret(2**64 - 1),
                                   "A" * 10_000, "é" * 35, "", None, 12345])
def test_verifying_refuses_tokens_naming_no_valid_member(token):
    with pytest.raises(InvalidTokenError):
        verify_member_token(token, SECRET)


@pytest.fixture
def receiver(engine):
    with engine.begin() as conn:
        mid = conn.execute(Member.__table__.insert().values(
            external_id="M1", name=PERSONAL["name"], email=PERSONAL["email"], locale="en", joined_at=FROZEN_NOW,
        ).returning(Member.__table__.c.id)).scalar_one()
        record_consents(conn, [ConsentStatement(mid, "email", "marketing", True, "signup_form", FROZEN_NOW)])
    config = ReceiverConfig(public_url="https://hooks.shop.example/mc", secret_key=SECRET, shop_name="Good Days")
    return TestClient(create_app(config, engine), raise_server_exceptions=False), engine, mid


ONE_CLICK = {"content": "List-Unsubscribe=One-Click", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


@pytest.mark.parametrize("member_id", [0, 2**63, 2**64 - 1])
def test_presented_token_with_an_out_of_range_id_gets_the_invalid_link_page(receiver, member_id):
    client, engine, real = receiver
    token = _signed_with_secret(member_id)
    for path in (f"/u/{token}", f"/u/{token}/preferences"):
        page = client.get(path)
        assert page.status_code == 403 and "這個連結無效或已失效" in page.text, (page.status_code, page.text[:200])
        assert client.post(path, **ONE_CLICK).status_code == 403
        assert client.post(path, data={"action": "unsubscribe"}).status_code == 403
    with engine.connect() as conn:
        assert current_consents(conn, real)[("email", "marketing")] is True  # nothing valid was touched


def test_presented_token_for_the_largest_id_that_no_member_has_is_not_found(receiver):
    client, _, _ = receiver
    token = sign_member_token(MAX_MEMBER_ID, SECRET)
    page = client.get(f"/u/{token}")
    assert page.status_code == 404 and "找不到這個會員" in page.text
    assert client.post(f"/u/{token}", **ONE_CLICK).status_code == 404
    assert client.post(f"/u/{token}", data={"action": "unsubscribe"}).status_code == 404
