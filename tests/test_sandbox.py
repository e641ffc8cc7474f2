"""The sandbox itself: simulated recipients call signed webhooks, control API, determinism, config checks."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import httpx
import pytest

from channels.base import Accepted, FailureReason, PermanentFailure
from channels.fcm.webhooks import verify_push_tracking
from channels.registry import build_channels, close_channels
from channels.sendgrid.webhooks import verify_sendgrid_signature
from channels.twilio.webhooks import verify_twilio_signature
from membercare.models import Channel
from membercare.sandbox import ConfigError, SandboxConfig, apply_patch, parse_rate_limit
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import SENDGRID_KEY, TWILIO_TOKEN
from test_channels_sandbox import MOBILE, message

ALL = {"delivered": 1.0, "opened": 1.0, "clicked": 1.0, "unsubscribed": 1.0, "complained": 0.0}
NONE = {"delivered": 1.0, "opened": 0.0, "clicked": 0.0, "unsubscribed": 0.0, "complained": 0.0}


def _httpx_client() -> httpx.Client:
    return httpx.Client(timeout=10)  # one client: a new one per call costs ~100 ms of TLS setup


class Receiver:
    """A stand-in for the project's webhook receiver: records every POST, answers the queued statuses."""

    def __init__(self):
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    failing = outer.fail_next > 0
                    outer.fail_next -= failing
                    if not failing:
                        outer.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def of(self, path_prefix: str):
        return [p for p in self.posts if p[0].startswith(path_prefix)]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def wired(sandbox, channel_env, receiver):
    """Adapters whose status callbacks and the sandbox's webhooks all go to ``receiver``."""
    sandbox.configure(webhook_url=receiver.url, push_tracking_secret="push-secret", sendgrid_batch_interval_ms=20,
                      webhook_retry_base_ms=20)
    built = build_channels(dict(channel_env, MEMBERCARE_PUBLIC_URL=receiver.url))
    yield built
    close_channels(built)


def test_sendgrid_events_are_signed_batched_and_carry_our_custom_args(sandbox, wired, receiver):
    sandbox.configure(engagement={"email": ALL}, sendgrid_batch_size=4)
    html_link = "https://shop.example/sale"
    for i in range(3):
        assert isinstance(wired[Channel.EMAIL].send(message(Channel.EMAIL, f"m{i}@example.com", f"m-{i}")), Accepted)
    assert sandbox.drain(10)
    posts = receiver.of("/webhooks/sendgrid")
    events = [e for _, _, body in posts for e in json.loads(body)]
    assert all(len(json.loads(body)) <= 4 for _, _, body in posts) and len(posts) >= 4  # 18 events in <= 4
    for _, headers, body in posts:
        assert verify_sendgrid_signature(sandbox.sendgrid_public_key, body,
                                         headers["x-twilio-email-event-webhook-signature"],
                                         headers["x-twilio-email-event-webhook-timestamp"])
    mine = [e for e in events if e["membercare_message_id"] == "m-1"]
    assert [e["event"] for e in mine] == ["processed", "delivered", "open", "click", "unsubscribe"]
    assert mine[0]["membercare_idempotency_key"] == "c1:o1:m-1" and mine[0]["email"] == "m1@example.com"
    assert next(e for e in mine if e["event"] == "click")["url"] == html_link
    assert len({e["sg_event_id"] for e in events}) == len(events) == 15
    assert all(e["sg_message_id"].startswith(sandbox.messages()[0]["provider_id"][:0]) for e in events)
    # An unsubscribed address is dropped on the next send, as SendGrid does.
    wired[Channel.EMAIL].send(message(Channel.EMAIL, "m1@example.com", "m-again"))
    assert sandbox.drain(10)
    again = [e for _, _, b in receiver.of("/webhooks/sendgrid") for e in json.loads(b)
             if e["membercare_message_id"] == "m-again"]
    assert [(e["event"], e.get("reason")) for e in again] == [("processed", None), ("dropped", "Unsubscribed Address")]


def test_twilio_status_callbacks_and_stop_reply_are_signed_and_stop_is_enforced(sandbox, wired, receiver):
    sandbox.configure(engagement={"sms": ALL})
    assert isinstance(wired[Channel.SMS].send(message(Channel.SMS, MOBILE, "m-sms")), Accepted)
    assert sandbox.drain(10)
    status = receiver.of("/webhooks/twilio/status")
    assert [dict(parse_qsl(b.decode()))["MessageStatus"] for _, _, b in status] == ["queued", "sent", "delivered"]
    for path, headers, body in status:
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        assert verify_twilio_signature(TWILIO_TOKEN, receiver.url + path, params, headers["x-twilio-signature"])
        assert path.endswith("mid=m-sms&ik=c1%3Ao1%3Am-sms")
    ((path, headers, body),) = receiver.of("/webhooks/twilio/inbound")
    inbound = dict(parse_qsl(body.decode()))
    assert (inbound["From"], inbound["Body"]) == (MOBILE, "STOP")
    assert verify_twilio_signature(TWILIO_TOKEN, receiver.url + path, inbound, headers["x-twilio-signature"])
    # Twilio refuses further messages to a number that replied STOP.
    result = wired[Channel.SMS].send(message(Channel.SMS, MOBILE, "m-after-stop"))
    assert isinstance(result, PermanentFailure) and result.reason is FailureReason.OPTED_OUT


def test_push_reports_are_hmac_signed_and_uninstall_kills_the_token(sandbox, wired, receiver):
    sandbox.configure(engagement={"push": ALL})
    assert isinstance(wired[Channel.PUSH].send(message(Channel.PUSH, "device-token-0001", "m-push")), Accepted)
    assert sandbox.drain(10)
    posts = receiver.of("/track/push")
    assert [json.loads(b)["event"] for _, _, b in posts] == ["received", "opened"]
    for _, headers, body in posts:
        assert verify_push_tracking("push-secret", body, headers["x-membercare-signature"])
        assert json.loads(body)["message_id"] == "m-push"
    result = wired[Channel.PUSH].send(message(Channel.PUSH, "device-token-0001", "m-push-2"))
    assert isinstance(result, PermanentFailure) and result.reason is FailureReason.UNREGISTERED_TOKEN


def test_webhooks_are_retried_until_the_receiver_answers_2xx(sandbox, wired, receiver):
    sandbox.configure(engagement={"email": NONE})
    receiver.fail_next = 2
    wired[Channel.EMAIL].send(message(Channel.EMAIL, "mei@example.com"))
    assert sandbox.drain(10)
    stats = sandbox.stats()["webhooks"]
    assert stats["sendgrid.failed_attempts"] == 2 and stats["sendgrid.posted"] == 1
    ((_, _, body),) = receiver.of("/webhooks/sendgrid")
    assert [e["event"] for e in json.loads(body)] == ["processed", "delivered"]


def test_engagement_rules_use_recipient_attributes(sandbox, wired, receiver):
    sandbox.configure(engagement={"email": NONE},
                      engagement_rules=[{"match": {"domain": "bounce.example"}, "rates": {"delivered": 0.0}}])
    wired[Channel.EMAIL].send(message(Channel.EMAIL, "a@bounce.example", "m-b"))
    wired[Channel.EMAIL].send(message(Channel.EMAIL, "a@fine.example", "m-f"))
    assert sandbox.drain(10)
    events = {(e["membercare_message_id"], e["event"]) for _, _, b in receiver.of("/webhooks/sendgrid")
              for e in json.loads(b)}
    assert ("m-b", "bounce") in events and ("m-f", "delivered") in events and ("m-b", "delivered") not in events


def test_outcomes_are_deterministic_under_a_seed_whatever_the_order(sandbox, channel_env):
    email = build_channels(channel_env, channels=[Channel.EMAIL])[Channel.EMAIL]

    def run(order):
        sandbox.reset()
        sandbox.configure(email={"error_rate": 0.4}, engagement={"email": {"delivered": 0.5}})
        outcome = {}
        for i in order:
            outcome[i] = type(email.send(message(Channel.EMAIL, f"m{i}@example.com", f"m-{i}"))).__name__
        return outcome, sandbox.stats()["events"]

    first, events1 = run(range(40))
    second, events2 = run(reversed(range(40)))
    assert first == second and events1 == events2
    assert 5 < list(first.values()).count("TransientFailure") < 35  # the seed does inject faults


def test_duplicates_are_counted_by_message_id_and_idempotency_key(sandbox, adapters):
    for _ in range(3):
        adapters[Channel.EMAIL].send(message(Channel.EMAIL, "mei@example.com", "m-dup"))
    stats = sandbox.stats()
    assert stats["accepted"] == {"email": 3}
    assert stats["duplicates_by_message_id"] == {"email": 2} and stats["duplicates_by_idempotency_key_total"] == 2


def test_http_control_api(sandbox, adapters):
    base = sandbox.url
    httpx = _httpx_client()
    assert httpx.post(base + "/sandbox/config", json={"email": {"eror_rate": 1}}).status_code == 400
    assert httpx.post(base + "/sandbox/config", json={"email": {"error_rate": 2}}).status_code == 400
    resp = httpx.post(base + "/sandbox/config", json={"sms": {"latency_ms": 5}, "twilio_opted_out": [MOBILE]})
    assert resp.status_code == 200 and resp.json()["sms"]["latency_ms"] == 5.0
    assert "twilio-test-auth-token" not in resp.text  # secrets are never echoed
    adapters[Channel.EMAIL].send(message(Channel.EMAIL, "mei@example.com"))
    assert isinstance(adapters[Channel.SMS].send(message(Channel.SMS, MOBILE)), PermanentFailure)
    msgs = httpx.get(base + "/sandbox/messages", params={"channel": "email"}).json()
    assert msgs["count"] == 1 and msgs["messages"][0]["to"] == "m***@example.com"
    stats = httpx.get(base + "/sandbox/stats").json()
    assert stats["accepted_total"] == 1 and stats["rejected"] == {"sms": {"opted_out": 1}}
    assert httpx.get(base + "/sandbox/keys").json()["sendgrid_webhook_public_key"] == sandbox.sendgrid_public_key
    assert httpx.post(base + "/sandbox/reset").json() == {"ok": True}
    assert httpx.get(base + "/sandbox/stats").json()["accepted_total"] == 0
    assert httpx.get(base + "/sandbox/config").json()["sms"]["latency_ms"] == 5.0  # reset keeps the config
    httpx.post(base + "/sandbox/reset", json={"config": True})
    assert httpx.get(base + "/sandbox/config").json()["sms"]["latency_ms"] == 0.0


def test_provider_endpoints_refuse_missing_credentials(sandbox):
    base = sandbox.url
    httpx = _httpx_client()
    assert httpx.post(base + "/v3/mail/send", json={}).status_code == 401
    assert httpx.post(base + "/v3/mail/send", json={}, headers={"Authorization": f"Bearer {SENDGRID_KEY}"}
                      ).status_code == 400
    r = httpx.post(base + "/2010-04-01/Accounts/AC1/Messages.json", data={"To": MOBILE})
    assert r.status_code == 401 and r.json()["code"] == 20003
    r = httpx.post(base + "/v1/projects/p/messages:send", json={"message": {"token": "x" * 20}},
                   headers={"Authorization": "Bearer forged"})
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    r = httpx.post(base + "/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                         "assertion": "a.b.c"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_latency_does_not_block_other_requests(sandbox, adapters):
    from concurrent.futures import ThreadPoolExecutor

    sandbox.configure(email={"latency_ms": 300})
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: adapters[Channel.EMAIL].send(message(Channel.EMAIL, f"m{i}@example.com",
                                                                               f"m-{i}")), range(8)))
    assert all(isinstance(r, Accepted) for r in results)
    assert 0.3 <= time.monotonic() - start < 2.0  # concurrent, not 8 x 300 ms = 2.4 s


def test_config_parsing_and_validation():
    assert parse_rate_limit("sms=10/s") == ("sms", 10.0)
    assert parse_rate_limit("email=600/min") == ("email", 10.0)
    assert parse_rate_limit("push=250") == ("push", 250.0)
    for bad in ("fax=1/s", "sms=-1/s", "sms=0", "sms"):
        with pytest.raises(ConfigError):
            parse_rate_limit(bad)
    cfg = SandboxConfig()
    patched = apply_patch(cfg, {"email": {"error_rate": 0.2}, "engagement": {"sms": {"unsubscribed": 0.5}}})
    assert patched.email.error_rate == 0.2 and patched.engagement["sms"].unsubscribed == 0.5
    assert patched.engagement["sms"].delivered == cfg.engagement["sms"].delivered  # merged, not replaced
    assert cfg.email.error_rate == 0.0  # the original is untouched
    for patch in ({"email": {"error_rate": 0.6, "drop_rate": 0.6}}, {"nope": 1}, {"seed": "x"},
                  {"engagement": {"fax": {}}}, {"engagement_rules": [{"rates": {"opens": 1}}]}):
        with pytest.raises(ConfigError):
            apply_patch(cfg, patch)
