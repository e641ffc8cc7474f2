"""The template gallery: structure, and a real render in headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from membercare.campaigns import list_campaigns
from membercare.config import Settings
from membercare.rendering.gallery import build_gallery, write_gallery

PROJECT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery")
    return write_gallery(out, Settings(templates_dir=PROJECT_TEMPLATES))


def test_gallery_has_every_campaign_channel_and_locale(gallery):
    page = gallery.read_text(encoding="utf-8")
    campaigns = list_campaigns(Settings(templates_dir=PROJECT_TEMPLATES))
    for c in campaigns:
        assert f"id='{c.name}'" in page
    # One row per locale and template variant.
    expected = {ch: sum(len(c.locales) * (len(c.optimise.variants.names) if c.optimise.variants else 1)
                        for c in campaigns if ch in [x.value for x in c.channels])
                for ch in ("email", "sms", "push", "line")}
    assert page.count("<iframe") == expected["email"]
    assert page.count("class='bubble'") == expected["sms"]
    assert page.count("class='push'") == expected["push"]
    assert page.count("class='bubble line'") == expected["line"] >= 4  # win-back and VIP, zh-TW and en
    assert "all templates pass the check" in page
    assert "UCS-2 · 3 segments" in page and "GSM-7 · 2 segments" in page  # encoding and segment count shown
    # The email is embedded escaped in srcdoc, so its own CSS and markup cannot break the page.
    first = re.search(r'srcdoc="([^"]*)"', page).group(1)
    assert html.unescape(first).startswith("<!DOCTYPE html>")


def test_gallery_shows_problems_in_place(tmp_path):
    tpl = tmp_path / "templates"
    shutil.copytree(PROJECT_TEMPLATES, tpl)
    (tpl / "birthday" / "sms.en.txt").write_text("{{ oops }}")
    page = build_gallery(Settings(templates_dir=tpl), campaigns=["birthday"])
    assert "1 template error(s)" in page or "template error(s)" in page
    assert "undefined variable" in page and "sms.en.txt:1" in page


def _png_stats(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct row fingerprints of a PNG (no imaging library needed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = len(raw) // height
    rows = {raw[i * stride + 1:(i + 1) * stride] for i in range(0, height, 7)}
    return width, height, len(rows)


@pytest.mark.slow  # starts a headless browser
@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (apt-get install chromium) - gallery not rendered")
def test_gallery_renders_in_headless_chromium(gallery, tmp_path):
    shot = tmp_path / "gallery.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000", "--hide-scrollbars",
           "--virtual-time-budget=10000",
           f"--screenshot={shot}", gallery.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    width, height, distinct_rows = _png_stats(shot)
    assert (width, height) == (1400, 2000)
    assert distinct_rows > 50  # a rendered page, not a blank or error screen
    dom = subprocess.run([*cmd[:-2], "--dump-dom", gallery.as_uri()], capture_output=True, timeout=120, text=True)
    assert "Template gallery" in dom.stdout and dom.stdout.count("<iframe") >= 11
