"""The pre-flight check: every error class is caught, with file and line, and the command exits non-zero."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from membercare.config import Settings
from membercare.models import Coupon, Member
from membercare.rendering.check import (
    TemplateCheckError,
    check_all,
    check_campaign,
    ensure_campaign_ready,
    link_problem,
)
from membercare.timeutil import utcnow

PROJECT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tpl(tmp_path) -> Path:
    dst = tmp_path / "templates"
    shutil.copytree(PROJECT_TEMPLATES, dst)
    return dst


def _settings(tpl: Path) -> Settings:
    return Settings(templates_dir=tpl)


def errors(problems):
    return [p for p in problems if p.severity == "error"]


def test_every_ready_made_campaign_passes():
    results = check_all(Settings(templates_dir=PROJECT_TEMPLATES))
    assert len(results) >= 11
    assert {n: [str(p) for p in ps] for n, ps in results.items() if ps} == {}


def _one(problems, code):
    found = [p for p in problems if p.code == code]
    assert found, [str(p) for p in problems]
    return found[0]


def test_syntax_error_has_file_and_line(tpl):
    f = tpl / "birthday" / "email.en.html"
    lines = f.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line == "{% endif %}")
    lines[n] = "{% endiff %}"
    f.write_text("\n".join(lines))
    p = _one(check_campaign("birthday", _settings(tpl)), "syntax")
    assert p.file == "templates/birthday/email.en.html" and p.line == n + 1


def test_undefined_variable_has_file_and_line(tpl):
    f = tpl / "coupon_expiry" / "sms.zh-TW.txt"
    f.write_text("【{{ shop.name }}】\n{{ coupon.nickname }}\n")
    p = _one(check_campaign("coupon_expiry", _settings(tpl)), "undefined")
    assert p.file == "templates/coupon_expiry/sms.zh-TW.txt" and p.line == 2 and "nickname" in p.message


def test_undefined_in_email_body_points_at_the_body_file(tpl):
    f = tpl / "vip_appreciation" / "email.zh-TW.html"
    lines = f.read_text().splitlines()
    lines.insert(3, "<p>{{ member.favourite_colour }}</p>")
    f.write_text("\n".join(lines))
    p = _one(check_campaign("vip_appreciation", _settings(tpl)), "undefined")
    assert p.file == "templates/vip_appreciation/email.zh-TW.html" and p.line == 4


def test_missing_locale_variant(tpl):
    (tpl / "tier_upgrade" / "push_body.en.txt").unlink()
    p = _one(check_campaign("tier_upgrade", _settings(tpl)), "missing-locale")
    assert p.file == "templates/tier_upgrade/push_body.en.txt" and "en" in p.message


def test_over_length_sms_only_for_the_worst_case_member(tpl):
    f = tpl / "coupon_expiry" / "sms.en.txt"
    # coupon_expiry allows 3 GSM-7 segments (459 septets): fits "Emily Chen", not the longest sample name.
    f.write_text("{{ member.name }} " + "x" * 420 + "\n")
    p = _one(check_campaign("coupon_expiry", _settings(tpl)), "sms-too-long")
    assert p.file == "templates/coupon_expiry/sms.en.txt" and "worst" in p.message


def test_over_length_push(tpl):
    (tpl / "welcome_day3" / "push_body.zh-TW.txt").write_text("很長的內容" * 40)
    p = _one(check_campaign("welcome_day3", _settings(tpl)), "push-too-long")
    assert p.file == "templates/welcome_day3/push_body.zh-TW.txt"


def test_malformed_links_have_line(tpl):
    f = tpl / "recommendations" / "email.en.html"
    f.write_text(f.read_text() + '<p><a href="htps//shop.example.com/oops">broken</a></p>\n')
    (tpl / "recommendations" / "push_data.json").write_text('{\n  "deep_link": "{{ shop.website }}/x y"\n}\n')
    problems = check_campaign("recommendations", _settings(tpl))
    bad = [p for p in problems if p.code == "bad-link"]
    files = {(p.file, p.line) for p in bad}
    n = len(f.read_text().splitlines())
    assert ("templates/recommendations/email.en.html", n) in files
    assert any(p.file.endswith("push_data.json") and p.line == 2 for p in bad)


def test_campaign_yaml_error_and_ucs2_warning(tpl):
    (tpl / "birthday" / "campaign.yaml").write_text("description: x\npurpose: sometimes\n")
    p = _one(check_campaign("birthday", _settings(tpl)), "campaign")
    assert p.file == "templates/birthday/campaign.yaml" and "purpose" in p.message
    (tpl / "welcome_day0" / "sms.en.txt").write_text("It’s a {{ shop.name }} welcome\n")
    w = _one(check_campaign("welcome_day0", _settings(tpl)), "ucs2-forced")
    assert w.severity == "warning" and "’" in w.message


def test_link_problem_rules():
    assert link_problem("https://shop.example.com/a?b=1", None) is None
    assert link_problem("gooddays://coupons", "gooddays") is None
    assert link_problem("mailto:care@shop.example.com", None) is None
    assert "host" in link_problem("https://nohost/", None)
    assert "absolute" in link_problem("/relative/path", None)
    assert "None" in link_problem("https://shop.example.com/None", None)
    assert "scheme" in link_problem("javascript:alert(1)", None)


def test_a_failing_campaign_refuses_to_start(tpl):
    (tpl / "birthday" / "sms.en.txt").write_text("{{ nope }}")
    with pytest.raises(TemplateCheckError) as err:
        ensure_campaign_ready("birthday", _settings(tpl))
    assert "sms.en.txt:1" in str(err.value)
    ensure_campaign_ready("welcome_day3", _settings(tpl))  # a healthy one passes


def test_check_against_real_members(engine, tpl):
    now = utcnow()
    with engine.begin() as conn:
        mid = conn.execute(Member.__table__.insert().values(
            external_id="R1", name="", locale="en", joined_at=now - timedelta(days=30)).returning(Member.__table__.c.id)
        ).scalar_one()
        conn.execute(Coupon.__table__.insert().values(
            code="R1-C", member_id=mid, kind="percent", percent_off=15, issued_at=now - timedelta(days=1),
            expires_at=now + timedelta(days=2)))
    # The samples all have names; a real member without one exposes a template that assumes it.
    (tpl / "coupon_expiry" / "sms.en.txt").write_text("{{ member.name[0] }}: {{ coupon.code }}\n")
    with engine.connect() as conn:
        problems = check_campaign("coupon_expiry", _settings(tpl), conn=conn)
    p = _one(problems, "undefined")
    assert "member R1" in p.message and p.file == "templates/coupon_expiry/sms.en.txt"
    with engine.connect() as conn:
        assert errors(check_campaign("coupon_expiry", Settings(templates_dir=PROJECT_TEMPLATES), conn=conn)) == []


def _cli(*args, env_extra=None):
    import os

    # A clean environment (no MEMBERCARE_* from the caller) and a wide terminal so lines are not wrapped.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update({"COLUMNS": "1000"}, **(env_extra or {}))
    code = "import sys, membercare.cli as c, membercare.cli.templates; c.main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_cli_check_exits_non_zero_with_file_and_line(tpl, tmp_path):
    (tpl / "birthday" / "push_title.en.txt").write_text("{{ member.nam }}\n")
    res = _cli("templates", "check", "--campaign", "birthday",
               env_extra={"MEMBERCARE_TEMPLATES_DIR": str(tpl), "MEMBERCARE_HOME": str(tmp_path / "home")})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "templates/birthday/push_title.en.txt:1" in res.stdout and "undefined" in res.stdout
    assert "template check failed" in res.stderr
    ok = _cli("templates", "check", "-c", "welcome_day3", "-c", "birthday",
              env_extra={"MEMBERCARE_HOME": str(tmp_path / "home")})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 error(s)" in ok.stdout


def test_cli_preview_sample(tmp_path):
    res = _cli("templates", "preview", "coupon_expiry", "--sample", "zh-TW", "--channel", "sms",
               env_extra={"MEMBERCARE_HOME": str(tmp_path / "home"), "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "回覆STOP取消" in res.stdout and "UCS-2" in res.stdout and "segment" in res.stdout


def test_every_variant_is_checked_with_file_and_line(tpl):
    f = tpl / "churn_winback" / "email_subject@b.en.txt"
    f.write_text("{{ member.first_name }}\n{{ coupon.nickname }}\n")
    p = _one(check_campaign("churn_winback", _settings(tpl)), "undefined")
    assert p.file == "templates/churn_winback/email_subject@b.en.txt" and p.line == 2 and "variant b" in p.message


def test_variant_file_of_an_undeclared_variant_is_an_error(tpl):
    (tpl / "churn_winback" / "push_title@c.en.txt").write_text("C\n")
    p = _one(check_campaign("churn_winback", _settings(tpl)), "variant")
    assert p.severity == "error" and p.file == "templates/churn_winback/push_title@c.en.txt" and "'c'" in p.message
    (tpl / "vip_appreciation" / "push_title@b.en.txt").write_text("B\n")
    p = _one(check_campaign("vip_appreciation", _settings(tpl)), "variant")
    assert "no variant test" in p.message
