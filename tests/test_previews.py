"""Previews behind a signed link: ``GET /previews/{token}`` on the receiver serves a run's rendered preview for a
token signed with the project's key until it expires; unsigned, tampered, expired or path-like tokens get nothing."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from membercare.links import preview_url, sign_preview_token
from membercare.receiver import ReceiverConfig, create_app
from membercare.receiver.previews import mount_previews

SECRET = "s" * 40
OLD = "o" * 40
NOW = 1_800_000_000.0


@pytest.fixture
def previews(tmp_path):
    root = tmp_path / "home" / "previews"
    (root / "birthday").mkdir(parents=True)
    (root / "birthday" / "index.html").write_text("<h1>birthday preview</h1>", encoding="utf-8")
    (tmp_path / "secret.html").write_text("outside", encoding="utf-8")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "index.html").write_text("outside", encoding="utf-8")
    os.symlink(tmp_path / "outside", root / "escape")  # a link out of the folder: never served
    return root


def _client(previews, secrets=(SECRET,), now=NOW):
    from fastapi import FastAPI

    app = FastAPI()
    mount_previews(app, secrets, previews, clock=lambda: now)
    return TestClient(app)


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def test_a_signed_link_serves_the_preview_until_it_expires(previews):
    url = preview_url("https://shop.example/mc/", "birthday", SECRET, NOW, ttl_s=3600)
    assert url.startswith("https://shop.example/mc/previews/") and "birthday" not in url
    path = "/previews/" + url.rsplit("/", 1)[1]
    r = _client(previews).get(path)
    assert r.status_code == 200 and "birthday preview" in r.text
    assert r.headers["referrer-policy"] == "no-referrer" and "no-store" in r.headers["cache-control"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    # Signed with the previous key during a rotation: still served.
    rotated = "/previews/" + sign_preview_token("birthday", int(NOW) + 60, OLD)
    assert _client(previews, secrets=(SECRET, OLD)).get(rotated).status_code == 200
    assert _client(previews, now=NOW + 3601).get(path).status_code == 410


def test_unsigned_tampered_and_path_like_tokens_are_refused(previews):
    good = sign_preview_token("birthday", int(NOW) + 60, SECRET)
    client = _client(previews)
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    for bad in (sign_preview_token("birthday", int(NOW) + 60, "another-key-" + "x" * 30), flipped, "x" * 39,
                "..%2F..%2Fsecret.html", "%2e%2e", "birthday", "A" * 200):
        assert client.get(f"/previews/{bad}").status_code in (403, 404), bad
    assert client.get("/previews/../secret.html").status_code == 404
    # Signed, but naming no preview folder, or the symlink that leads out of it.
    assert client.get("/previews/" + sign_preview_token("nothing", int(NOW) + 60, SECRET)).status_code == 404
    assert client.get("/previews/" + sign_preview_token("escape", int(NOW) + 60, SECRET)).status_code == 404
    assert _client(previews, secrets=()).get(f"/previews/{good}").status_code == 503


def test_the_receiver_serves_previews_from_its_home(previews, monkeypatch, sqlite_engine):
    monkeypatch.setenv("MEMBERCARE_HOME", str(previews.parent))
    client = TestClient(create_app(ReceiverConfig(secret_key=SECRET), sqlite_engine))
    import time

    url = preview_url("http://127.0.0.1:8080", "birthday", SECRET, time.time())
    assert client.get(_path(url)).status_code == 200
    assert client.get(_path(preview_url("http://127.0.0.1:8080", "birthday", OLD, time.time()))).status_code == 403
