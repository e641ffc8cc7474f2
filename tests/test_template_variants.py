"""Template variants are reviewable: ``templates preview --variant`` renders that variant's parts (a usage error
for a variant the campaign does not declare), and the gallery shows every variant of a campaign."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from membercare.campaigns import list_campaigns
from membercare.config import Settings
from membercare.rendering.gallery import build_gallery

ROOT = Path(__file__).resolve().parent.parent
PROJECT_TEMPLATES = ROOT / "templates"


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    env.update({"COLUMNS": "1000", "MEMBERCARE_HOME": str(home)})
    code = "import sys, membercare.cli as c, membercare.cli.templates; c.main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_preview_renders_the_chosen_variant(tmp_path):
    b = _cli("templates", "preview", "churn_winback", "--sample", "zh-TW", "--channel", "push", "--variant", "b",
             home=tmp_path)
    assert b.returncode == 0, b.stdout + b.stderr
    assert "您的折價券即將到期" in b.stdout and "variant b" in b.stdout  # push_title@b.zh-TW.txt
    a = _cli("templates", "preview", "churn_winback", "--sample", "zh-TW", "--channel", "push", "--variant", "a",
             home=tmp_path)
    assert a.returncode == 0, a.stdout + a.stderr
    assert "好久不見" in a.stdout and "您的折價券即將到期" not in a.stdout  # the control is the plain copy
    email = _cli("templates", "preview", "churn_winback", "--sample", "en", "--channel", "email", "--variant", "b",
                 home=tmp_path)
    assert email.returncode == 0, email.stdout + email.stderr
    assert re.search(r"Subject:.*Emily, your NT\$200 voucher expires", email.stdout)


def test_preview_of_an_unknown_variant_is_a_usage_error(tmp_path):
    res = _cli("templates", "preview", "churn_winback", "--sample", "en", "--variant", "c", home=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no variant 'c'" in res.stderr and "a, b" in res.stderr
    assert "unexpected error" not in res.stderr and "Traceback" not in res.stderr
    res = _cli("templates", "preview", "birthday", "--sample", "en", "--variant", "b", home=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no variant test" in res.stderr and "unexpected error" not in res.stderr


def test_gallery_shows_every_variant_of_a_campaign():
    settings = Settings(templates_dir=PROJECT_TEMPLATES)
    page = build_gallery(settings, campaigns=["churn_winback"])
    assert page.count("data-variant='a'") == 2 and page.count("data-variant='b'") == 2  # per locale
    assert "variant a (control)" in page
    assert "您的折價券即將到期" in page and "好久不見" in page  # both push titles, zh-TW
    assert "Emily, your NT$200 voucher expires" in page and "We miss you, Emily" in page  # both subjects, en
    # Over all campaigns: one row per locale and variant.
    rows = sum(len(c.locales) * (len(c.optimise.variants.names) if c.optimise.variants else 1)
               for c in list_campaigns(settings))
    assert build_gallery(settings).count("<div class='locale'>") == rows
