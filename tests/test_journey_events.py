"""Member events in: ``POST /events`` (signed, batched, our shape and the Segment/RudderStack ``track`` shape,
stored once by event id, starting journeys), ``membercare events import`` and ``membercare journeys
simulate`` (the path with reasons, sending nothing)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from channels.fcm.webhooks import SIGNATURE_HEADER, sign_push_tracking
from clirun import run_cli
from journey_helpers import JI, OB, members, settings_for
from membercare.journeys.models import MemberEvent
from membercare.models import Member
from membercare.receiver import ReceiverConfig, create_app
from membercare.receiver.events import build_events_router

SECRET = "events-secret-" + "y" * 20
ME = MemberEvent.__table__


def client_for(engine, settings, clock) -> TestClient:
    app = FastAPI()
    app.include_router(build_events_router(engine, SECRET, settings, clock=clock))
    return TestClient(app)


def post(client: TestClient, payload, secret: str = SECRET):
    body = json.dumps(payload).encode()
    return client.post("/events", content=body, headers={SIGNATURE_HEADER: sign_push_tracking(secret, body)})


def external(engine, mid: int) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.select(Member.__table__.c.external_id).where(Member.__table__.c.id == mid)).scalar()


def test_events_are_signed_batched_stored_once_and_start_journeys(engine, clock, tmp_path):
    settings = settings_for(tmp_path)
    a, b = (external(engine, m) for m in members(engine, 2, clock(), journey="abandoned_cart", settings=settings))
    client = client_for(engine, settings, clock)
    ours = {"events": [{"id": "e1", "name": "cart.updated", "member": a, "at": "2026-11-23T03:00:00Z",
                        "properties": {"items": 2}},
                       {"id": "e2", "name": "review.answered", "member": a},
                       {"id": "e3", "name": "cart.updated", "member": "M9999999"}]}
    track = {"batch": [{"type": "track", "event": "Product Added", "userId": b, "messageId": "seg-1",
                        "timestamp": "2026-11-23T03:30:00.000Z", "properties": {"sku": "S1"}},
                       {"type": "identify", "userId": b, "traits": {"plan": "x"}}]}
    assert client.post("/events", content=b"{}").status_code == 401
    assert post(client, ours, secret="wrong").status_code == 403
    assert post(client, {"events": [{"name": "x"}]}).status_code == 400
    assert post(client, {"events": [{"id": "e9", "name": "Bad Name!!" * 10, "member": a}]}).status_code == 400
    r = post(client, ours)
    assert r.status_code == 200, r.text
    assert r.json() == {"received": 3, "stored": 2, "duplicates": 0, "unknown_members": 1, "skipped": 0,
                        "entered": 1, "woken": 0}
    r = post(client, track)
    assert r.json()["stored"] == 1 and r.json()["skipped"] == 1 and r.json()["entered"] == 1
    again = post(client, ours).json()  # a retried delivery: nothing new, nobody enters twice
    assert (again["stored"], again["duplicates"], again["entered"]) == (0, 2, 0)
    with engine.connect() as conn:
        names = conn.execute(sa.select(ME.c.event_id, ME.c.name).order_by(ME.c.event_id)).all()
        inst = conn.execute(sa.select(JI.c.journey, JI.c.status, JI.c.context).order_by(JI.c.id)).all()
    assert [tuple(n) for n in names] == [("e1", "cart.updated"), ("e2", "review.answered"),
                                         ("seg-1", "cart.updated")]
    assert [(i.journey, i.status) for i in inst] == [("abandoned_cart", "active")] * 2
    assert json.loads(inst[0].context) == {"event": "cart.updated", "items": 2}


def test_the_receiver_mounts_events_and_answers_503_without_a_secret(engine):
    client = TestClient(create_app(ReceiverConfig(public_url="https://shop.example"), engine))
    assert post(client, {"events": []}).status_code == 503


def test_events_import_and_simulate_from_the_command_line(sqlite_url, clock, tmp_path):
    from membercare.db import make_engine

    engine = make_engine(sqlite_url)
    settings = settings_for(tmp_path)
    mid = members(engine, 1, clock(), journey="abandoned_cart", settings=settings)[0]
    ext = external(engine, mid)
    engine.dispose()
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"id": "f1", "name": "cart.updated", "member": ext, "at": clock().isoformat()})
                    + "\n" + json.dumps({"type": "track", "event": "Order Completed", "userId": "M7777777",
                                         "messageId": "f2", "timestamp": clock().isoformat()}) + "\n",
                    encoding="utf-8")
    env = {"MEMBERCARE_DATABASE_URL": sqlite_url}
    first = run_cli("events", "import", str(path), home=tmp_path / "home", env=env)
    assert first.returncode == 0, first.stderr
    assert "2 event(s): 1 stored, 0 already stored, 1 for unknown members; 1 journey entries" in first.stdout
    second = run_cli("events", "import", str(path), home=tmp_path / "home", env=env)
    assert "0 stored, 1 already stored" in second.stdout
    sim = run_cli("journeys", "simulate", "abandoned_cart", "--member", ext, "--at", "2026-11-23T12:00:00+08:00",
                  home=tmp_path / "home", env=env)
    assert sim.returncode == 0, sim.stderr
    out = sim.stdout
    assert "2026-11-23 12:00 CST  wait_1h: wait 1h -> 2026-11-23 13:00" in out
    assert "2026-11-23 13:00 CST  email: send abandoned_cart_email: would be planned on email" in out
    assert "wait_click: no clicked recorded within 24h (assumed not to happen): times out" in out
    assert "2026-11-24 13:00 CST  push: send abandoned_cart_push: would be planned on push" in out
    assert "journey complete" in out
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:  # simulating sent nothing and stored nothing
        assert conn.execute(sa.select(sa.func.count()).select_from(OB)).scalar() == 0
    engine.dispose()
    shown = run_cli("journeys", "show", "abandoned_cart", home=tmp_path / "home", env=env)
    assert "instances: active 1" in shown.stdout
