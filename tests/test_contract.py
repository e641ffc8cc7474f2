"""Contract test: what the real SDKs send through our adapters validates against the providers' official
OpenAPI descriptions, and what the sandbox answers validates against the same descriptions.

The requests are captured by the sandbox (``capture_requests``) exactly as the SDKs put them on the wire
and validated with openapi-core (a Python request validator: CI needs no npm/Prism).

Specs (tests/fixtures/provider-specs/, MIT licence, unmodified content):
* ``sendgrid_mail_v3.yaml``: copy of shared/provider-specs/sendgrid_mail_v3.yaml
  (twilio/sendgrid-oai @ dbe0e0d, spec/yaml/tsg_mail_v3.yaml).
* ``twilio_messages_v2010.yaml``: the Messages.json path and the components it references, extracted by
  :func:`extract_twilio_messages_spec` from shared/provider-specs/twilio_api_v2010.yaml
  (twilio/twilio-oai @ d50069b); the full file is 1.5 MB.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from channels.base import EmailContent, OutboundMessage, SmsContent
from channels.registry import build_channels
from membercare.models import Channel, Purpose
from sandbox_fixtures import *  # noqa: F403
from sandbox_fixtures import SENDGRID_KEY, TWILIO_SID, TWILIO_TOKEN

SPECS = Path(__file__).parent / "fixtures" / "provider-specs"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "provider-specs"
TWILIO_PATH = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the full Twilio spec is 1.5 MB


def extract_twilio_messages_spec(full: dict) -> dict:
    """The subset of Twilio's 2010 API spec for creating and listing Messages: the path (POST and GET) and
    every referenced component."""
    item = {k: v for k, v in full["paths"][TWILIO_PATH].items()
            if k in ("post", "get", "servers", "description", "x-twilio", "parameters")}
    needed: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    needed.add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(item)
    components: dict = {}
    done: set[str] = set()
    while needed - done:
        ref = sorted(needed - done)[0]
        done.add(ref)
        parts = ref.lstrip("#/").split("/")
        node = full
        for part in parts:
            node = node[part]
        target = components
        for part in parts[1:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
        walk(node)
    return {"openapi": full["openapi"], "info": full["info"], "servers": full.get("servers", []),
            "security": full.get("security", []), "paths": {TWILIO_PATH: item},
            "components": {"securitySchemes": full["components"]["securitySchemes"], **components}}


@pytest.fixture(scope="module")
def sendgrid_api() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPECS / "sendgrid_mail_v3.yaml"))


@pytest.fixture(scope="module")
def twilio_api() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPECS / "twilio_messages_v2010.yaml"))


def _msg(channel, to, content, mid="msg-contract-1"):
    return OutboundMessage(message_id=mid, idempotency_key=f"camp:2026-11-23:{mid}", channel=channel,
                           purpose=Purpose.MARKETING, to=to, content=content, campaign="winback",
                           categories=("winback", "marketing"))


def test_the_twilio_extract_matches_the_shared_spec():
    if not (SHARED / "twilio_api_v2010.yaml").exists():
        pytest.skip("shared/provider-specs is not beside this checkout")
    full = yaml.load((SHARED / "twilio_api_v2010.yaml").read_text(encoding="utf-8"), Loader=_LOADER)
    stored = yaml.safe_load((SPECS / "twilio_messages_v2010.yaml").read_text(encoding="utf-8"))
    assert stored == json.loads(json.dumps(extract_twilio_messages_spec(full)))
    assert (SPECS / "sendgrid_mail_v3.yaml").read_bytes() == (SHARED / "sendgrid_mail_v3.yaml").read_bytes()


def test_sendgrid_sdk_request_and_sandbox_answers_match_the_spec(sandbox, channel_env, sendgrid_api):
    sandbox.configure(capture_requests=10)
    email = build_channels(channel_env, channels=[Channel.EMAIL])[Channel.EMAIL]
    content = EmailContent(subject="We miss you", html="<html><body><p>Hi <a href='https://shop.example/'>"
                           "shop</a></p></body></html>", text="Hi", preheader="20% off this week",
                           headers={"List-Unsubscribe": "<https://shop.example/u/abc>",
                                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    assert email.send(_msg(Channel.EMAIL, "mei@example.com", content)).__class__.__name__ == "Accepted"
    (captured,) = sandbox.captured()
    body = captured["body"].encode()
    headers = {**captured["headers"], "Authorization": f"Bearer {SENDGRID_KEY}"}
    request = MockRequest("https://api.sendgrid.com", "post", "/v3/mail/send", headers=headers, data=body,
                          content_type="application/json")
    sendgrid_api.validate_request(request)  # raises with the violations when the SDK request is off-spec
    sent = json.loads(body)
    assert sent["personalizations"][0]["custom_args"]["membercare_message_id"] == "msg-contract-1"
    assert "custom_args" not in sent  # the spec types the top-level field as a string
    assert {h for h in sent["headers"]} == {"List-Unsubscribe", "List-Unsubscribe-Post"}
    assert sorted(sent["categories"]) == ["marketing", "winback"]
    assert "20% off this week" in sent["content"][1]["value"]  # preheader inserted into the HTML
    assert [c["type"] for c in sent["content"]] == ["text/plain", "text/html"]

    # The sandbox's 400 for an invalid payload is SendGrid's documented error body.
    import httpx

    bad = dict(sent, personalizations=[{"to": [{"email": "not-an-address"}]}])
    resp = httpx.post(sandbox.url + "/v3/mail/send", json=bad, headers={"Authorization": f"Bearer {SENDGRID_KEY}"})
    assert resp.status_code == 400
    errors = resp.json()["errors"]
    assert errors[0]["field"] == "personalizations.0.to.0.email"
    assert all(isinstance(e["help"], str) or e["help"] is None for e in errors)  # as the real API answers
    # The spec types ``help`` as an object, unlike the real API (a URL string or null) and the spec's own
    # example (no ``help``); nothing reads it. Everything else must match the spec.
    comparable = json.dumps({"errors": [{k: v for k, v in e.items() if k != "help"} for e in errors]}).encode()
    sendgrid_api.validate_response(request, MockResponse(comparable, status_code=400, content_type="application/json"))


def test_twilio_sdk_request_and_sandbox_answer_match_the_spec(sandbox, channel_env, twilio_api):
    sandbox.configure(capture_requests=10)
    sms = build_channels(channel_env, channels=[Channel.SMS])[Channel.SMS]
    try:
        result = sms.send(_msg(Channel.SMS, "+886912345678", SmsContent("Hi Mei, 20% off: shop.example", "GSM-7", 1)))
    finally:
        sms.close()
    assert result.__class__.__name__ == "Accepted"
    (captured,) = sandbox.captured()
    path = captured["path"]
    assert path == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    auth = "Basic " + base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
    request = MockRequest("https://api.twilio.com", "post", path,
                          headers={**captured["headers"], "Authorization": auth}, data=captured["body"].encode(),
                          content_type="application/x-www-form-urlencoded")
    twilio_api.validate_request(request)
    form = dict(parse_qsl(captured["body"]))
    assert form["StatusCallback"].startswith("http://127.0.0.1:9/webhooks/twilio/status?mid=msg-contract-1&ik=")

    # And the sandbox's 201 is a valid Message resource.
    import httpx

    resp = httpx.post(sandbox.url + path, data={"To": "+886912345678", "From": "+886223456789", "Body": "x"},
                      auth=(TWILIO_SID, TWILIO_TOKEN))
    assert resp.status_code == 201
    twilio_api.validate_response(request, MockResponse(resp.content, status_code=201, content_type="application/json"))


def test_the_validator_does_catch_an_off_spec_request(sendgrid_api):
    """Guard against a validator that accepts everything."""
    from openapi_core.exceptions import OpenAPIError

    body = json.dumps({"personalizations": [{"to": [{"email": "a@example.com"}]}], "from": {"email": "b@example.com"},
                       "subject": "x", "content": [{"type": "text/plain"}]}).encode()  # content.value missing
    request = MockRequest("https://api.sendgrid.com", "post", "/v3/mail/send",
                          headers={"Authorization": "Bearer x"}, data=body, content_type="application/json")
    with pytest.raises(OpenAPIError):
        sendgrid_api.validate_request(request)


def test_twilio_sdk_list_request_and_sandbox_page_match_the_spec(sandbox, channel_env, twilio_api):
    """The message list the reconciler reads (``TwilioSmsChannel.list_messages``): the SDK's GET with ``To``,
    ``From``, ``DateSent>``/``DateSent<`` and ``PageSize``, and the sandbox's pages, against the spec."""
    import httpx

    from membercare.timeutil import utcnow

    sms = build_channels(channel_env, channels=[Channel.SMS])[Channel.SMS]
    try:
        for i in range(3):
            sms.send(_msg(Channel.SMS, "+886912345678", SmsContent(f"Hi Mei {i}", "GSM-7", 1), mid=f"msg-list-{i}"))
        sandbox.configure(capture_requests=10)
        today = utcnow().date()
        listed = sms.list_messages("+886912345678", first_day=today, last_day=today, page_size=2)
    finally:
        sms.close()
    assert sorted(m.body for m in listed) == ["Hi Mei 0", "Hi Mei 1", "Hi Mei 2"]
    first, second = sandbox.captured()  # two pages: the SDK followed next_page_uri
    auth = "Basic " + base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
    for captured in (first, second):
        path, _, query = captured["path"].partition("?")
        assert path == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json" and captured["method"] == "GET"
        headers = {**captured["headers"], "Authorization": auth}
        request = MockRequest("https://api.twilio.com", "get", path, headers=headers, args=dict(parse_qsl(query)))
        twilio_api.validate_request(request)
    params = dict(parse_qsl(first["path"].partition("?")[2]))
    assert params["To"] == "+886912345678" and params["From"] == "+886223456789" and params["PageSize"] == "2"
    assert params["DateSent>"] == f"{today.isoformat()}T00:00:00Z"

    # Each page the sandbox serves is a valid ListMessageResponse.
    page = httpx.get(sandbox.url + first["path"], auth=(TWILIO_SID, TWILIO_TOKEN))
    assert page.status_code == 200
    body = page.json()
    assert len(body["messages"]) == 2 and body["next_page_uri"] and body["page"] == 0
    request = MockRequest("https://api.twilio.com", "get", first["path"].partition("?")[0], args=params)
    twilio_api.validate_response(request, MockResponse(page.content, status_code=200, content_type="application/json"))
    last = httpx.get(sandbox.url + body["next_page_uri"], auth=(TWILIO_SID, TWILIO_TOKEN)).json()
    assert [m["body"] for m in last["messages"]] == ["Hi Mei 0"] and last["next_page_uri"] is None
