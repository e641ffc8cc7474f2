"""Simulated recipients: after a provider accepts a message, decide what the recipient does and call the
project's webhooks back the way SendGrid, Twilio and the shop's app would.

* SendGrid: signed Event Webhook batches (processed, delivered / bounce, open, click, unsubscribe,
  spamreport; dropped for addresses that bounced or unsubscribed before), our custom args merged at the
  top level of each event, up to ``sendgrid_batch_size`` events per POST.
* Twilio: status callbacks (queued, sent, delivered / undelivered with ErrorCode) to the StatusCallback URL
  of each message, in order, and inbound ``STOP`` replies to ``/webhooks/twilio/inbound``; a number that
  replied STOP is refused with 21610 afterwards, as Twilio does.
* Push: app reports (received, opened, dismissed) to ``/track/push`` with an HMAC; an uninstall makes the
  token UNREGISTERED for later sends.
* LINE: signed webhooks (``X-Line-Signature``) to ``/webhooks/line``: a click taps the Flex message's
  postback action (``postback`` with our message id), an unsubscribe blocks the account (``unfollow``) or
  writes "取消" (``message``); ``follow`` and other messages come from :meth:`Recipients.line_user_event`.

Every POST is retried with exponential backoff on non-2xx or connection errors. What a recipient does
depends only on the seed and our message id, so a run is reproducible whatever the request order.

Extension points, both passed to :class:`~membercare.sandbox.server.SandboxServer`:

* an ``EngagementModel`` (any callable ``RecipientContext -> EngagementRates``) makes behaviour depend on
  members in any way;
* an ``EventClock`` (``(RecipientContext, event) -> Unix seconds``) stamps the events with simulated
  times instead of the wall clock, so a simulation can run days of campaigns in minutes and still hand
  the webhook receiver realistic event times (``membercare.sandbox.simulation`` does both). It stamps
  SendGrid's ``timestamp`` and the app reports' ``occurred_at``; Twilio status callbacks carry no event
  time in Twilio's API, so the receiver stamps those on arrival whatever the clock says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from channels.fcm.webhooks import SIGNATURE_HEADER as PUSH_SIGNATURE_HEADER
from channels.fcm.webhooks import sign_push_tracking
from channels.line.sandbox import webhook_body, webhook_event
from channels.line.webhooks import SIGNATURE_HEADER as LINE_SIGNATURE_HEADER
from channels.line.webhooks import line_signature
from channels.sendgrid.webhooks import SendGridWebhookSigner
from channels.twilio.webhooks import SIGNATURE_HEADER as TWILIO_SIGNATURE_HEADER
from channels.twilio.webhooks import twilio_signature
from membercare.sandbox.config import EngagementRates, SandboxConfig
from membercare.sandbox.state import MessageRecord, seeded_rng, stable_id

if TYPE_CHECKING:
    import aiohttp

    from membercare.sandbox.state import SandboxState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipientContext:
    channel: str
    message_id: str | None
    idempotency_key: str | None
    attributes: Mapping[str, str]  # see EngagementRule


EngagementModel = Callable[[RecipientContext], EngagementRates]

EventClock = Callable[[RecipientContext, str], float]
"""When a simulated recipient's event happens, in Unix seconds: called once per event with the message's
context and the provider's event name (SendGrid ``processed``/``delivered``/``open``/``click``/...,
push ``received``/``opened``/``dismissed``). Default: the wall clock at the moment the event is built."""


def table_model(config: SandboxConfig) -> EngagementModel:
    """The configured per-channel table with the first matching rule applied."""

    def model(ctx: RecipientContext) -> EngagementRates:
        rates = config.engagement.get(ctx.channel, EngagementRates())
        for rule in config.engagement_rules:
            if all(_matches(ctx, k, v) for k, v in rule.match.items()):
                return replace(rates, **{k: float(v) for k, v in rule.rates.items()})
        return rates

    return model


def _matches(ctx: RecipientContext, key: str, expected: str) -> bool:
    if key == "channel":
        return expected in ("*", ctx.channel)
    if key == "category":
        cats = ctx.attributes.get("categories", "").split("\x1f")
        return expected == "*" and cats != [""] or expected in cats
    value = ctx.attributes.get(key)
    return value is not None and (expected == "*" or str(value) == str(expected))


def _ulid_like(hex_id: str) -> str:
    """A 26-character upper-case id shaped like LINE's ``webhookEventId`` (a ULID)."""
    return hex_id[:26].upper()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Recipients:
    """Turns accepted messages into webhook calls. Runs on the server's event loop."""

    def __init__(self, get_config: Callable[[], SandboxConfig], state: SandboxState,
                 model: EngagementModel | None, signer: SendGridWebhookSigner, clock: EventClock | None = None):
        self._get_config = get_config
        self._state = state
        self._model = model
        self.clock = clock  # an EventClock, or None for the wall clock; SandboxServer.set_event_clock swaps it
        self.signer = signer
        self._session: aiohttp.ClientSession | None = None
        self._sendgrid_events: list[dict[str, Any]] = []
        self._sendgrid_wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._pending = 0  # webhook deliveries scheduled and not finished
        self._flusher: asyncio.Task | None = None
        self._sem: asyncio.Semaphore | None = None
        self._line_events = 0  # control-API LINE events so far (their ids differ)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self._sem = asyncio.Semaphore(self._get_config().webhook_concurrency)
        self._flusher = asyncio.create_task(self._flush_sendgrid_loop())

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._flusher] if self._flusher else []), return_exceptions=True)
        if self._session:
            await self._session.close()

    def clear(self) -> None:
        """Forget queued events and cancel webhook deliveries in flight (a reset starts from nothing)."""
        self._sendgrid_events.clear()
        for task in list(self._tasks):
            task.cancel()

    @property
    def pending(self) -> int:
        return self._pending + len(self._sendgrid_events)

    async def drain(self, timeout: float) -> bool:
        """Wait until every scheduled webhook was delivered or given up. False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending:
            if self._sendgrid_events:
                self._sendgrid_wakeup.set()  # do not wait for the batch interval
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _spawn(self, coro) -> None:
        self._pending += 1
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._pending -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("simulated recipient failed: %r", task.exception())

    # ---------------------------------------------------------------- decisions

    def on_accepted(self, rec: MessageRecord) -> None:
        cfg = self._get_config()
        ctx = RecipientContext(rec.channel, rec.message_id, rec.idempotency_key, rec.attributes)
        rates = (self._model or table_model(cfg))(ctx)
        rng = seeded_rng(cfg.seed, "engagement", rec.channel, rec.message_id or rec.provider_id)
        delivered = rng.random() < rates.delivered
        opened = delivered and rng.random() < rates.opened
        clicked = opened and rng.random() < rates.clicked
        unsubscribed = delivered and rng.random() < rates.unsubscribed
        complained = delivered and rng.random() < rates.complained
        outcome = dict(delivered=delivered, opened=opened, clicked=clicked, unsubscribed=unsubscribed,
                       complained=complained)
        if rec.channel == "email":
            self._email(cfg, rec, outcome, ctx)
        elif rec.channel == "sms":
            if rec.extra.get("status_callback") or cfg.endpoint("twilio_inbound"):
                self._spawn(self._sms(cfg, rec, outcome))
            else:  # nobody to call back: only the provider-side effect of a STOP reply remains
                if delivered and unsubscribed:
                    self._state.opted_out.add(rec.to)
                self._state.stats.events[f"sms.{'delivered' if delivered else 'undelivered'}"] += 1
        elif rec.channel == "line":
            if cfg.endpoint("line") and cfg.line_channel_secret:
                self._spawn(self._line(cfg, rec, outcome, rng.random(), ctx))
        elif rec.channel == "push":
            if unsubscribed:
                self._state.unregistered.add(rec.to)  # uninstalled: the token is dead from now on
            url = cfg.endpoint("push")
            if url and cfg.push_tracking_secret:
                self._spawn(self._push(cfg, url, rec, outcome, rng.random(), ctx))

    # ---------------------------------------------------------------- SendGrid

    def _email(self, cfg: SandboxConfig, rec: MessageRecord, o: dict[str, bool],
               ctx: RecipientContext | None = None) -> None:
        now = int(time.time())
        base: dict[str, Any] = {}
        base.update(rec.extra.get("custom_args", {}))  # SendGrid merges custom args at the top level
        base.update({"email": rec.to, "timestamp": now, "sg_message_id": f"{rec.provider_id}.filterdrecv-sandbox-0",
                     "smtp-id": f"<{rec.provider_id}@sandbox.membercare>"})
        if rec.extra.get("categories"):
            base["category"] = rec.extra["categories"]
        events: list[dict[str, Any]] = [{"event": "processed"}]
        if rec.to in self._state.bounced or rec.to in self._state.unsubscribed:
            reason = "Bounced Address" if rec.to in self._state.bounced else "Unsubscribed Address"
            events.append({"event": "dropped", "reason": reason})
        elif not o["delivered"]:
            events.append({"event": "bounce", "type": "bounce", "status": "5.1.1",
                           "bounce_classification": "Invalid Address",
                           "reason": "550 5.1.1 The email account that you tried to reach does not exist."})
            self._state.bounced.add(rec.to)
        else:
            events.append({"event": "delivered", "response": "250 2.0.0 OK", "ip": "127.0.0.1", "tls": 1})
            if o["opened"]:
                events.append({"event": "open", "useragent": "Mozilla/5.0 (sandbox)", "ip": "127.0.0.1",
                               "sg_machine_open": False})
            if o["clicked"]:
                events.append({"event": "click", "url": rec.extra.get("link") or "https://shop.example/",
                               "url_offset": {"index": 0, "type": "html"}, "useragent": "Mozilla/5.0 (sandbox)",
                               "ip": "127.0.0.1"})
            if o["unsubscribed"]:
                events.append({"event": "unsubscribe"})
                self._state.unsubscribed.add(rec.to)
            if o["complained"]:
                events.append({"event": "spamreport"})
                self._state.unsubscribed.add(rec.to)
        if not cfg.endpoint("sendgrid"):
            return
        for i, ev in enumerate(events):
            full = dict(base)
            full.update(ev)
            if self.clock is not None and ctx is not None:
                full["timestamp"] = int(self.clock(ctx, ev["event"]))
            full["sg_event_id"] = base64.urlsafe_b64encode(
                bytes.fromhex(stable_id(cfg.seed, "sg_event", rec.seq, i, length=32))).decode().rstrip("=")
            self._state.stats.events[f"email.{ev['event']}"] += 1
            self._sendgrid_events.append(full)
        if len(self._sendgrid_events) >= cfg.sendgrid_batch_size:
            self._sendgrid_wakeup.set()

    async def _flush_sendgrid_loop(self) -> None:
        while True:
            cfg = self._get_config()
            try:
                await asyncio.wait_for(self._sendgrid_wakeup.wait(), timeout=cfg.sendgrid_batch_interval_ms / 1000)
            except TimeoutError:
                pass
            self._sendgrid_wakeup.clear()
            while self._sendgrid_events:
                cfg = self._get_config()
                url = cfg.endpoint("sendgrid")
                batch = self._sendgrid_events[: cfg.sendgrid_batch_size]
                del self._sendgrid_events[: len(batch)]
                if not url:
                    continue
                body = json.dumps(batch, separators=(",", ":")).encode()
                # Sequential on purpose: events of one message stay in order, as SendGrid's mostly are.
                self._pending += 1
                try:
                    await self._post("sendgrid", url, body, lambda b: {"Content-Type": "application/json",
                                                                       **self.signer.sign(b)})
                finally:
                    self._pending -= 1

    # ---------------------------------------------------------------- Twilio

    async def _sms(self, cfg: SandboxConfig, rec: MessageRecord, o: dict[str, bool]) -> None:
        await self._delay(cfg)
        callback = rec.extra.get("status_callback")
        token = rec.extra.get("auth_token") or ""
        common = {"AccountSid": rec.account or "", "ApiVersion": "2010-04-01", "From": rec.extra.get("from") or "",
                  "To": rec.to, "MessageSid": rec.provider_id, "SmsSid": rec.provider_id}
        if rec.extra.get("messaging_service_sid"):
            common["MessagingServiceSid"] = rec.extra["messaging_service_sid"]
        statuses = ["queued", "sent", "delivered" if o["delivered"] else "undelivered"]
        for status in statuses:
            self._state.stats.events[f"sms.{status}"] += 1
            if not callback:
                continue
            params = dict(common, SmsStatus=status, MessageStatus=status)
            if status == "undelivered":
                params["ErrorCode"] = "30003"  # unreachable destination handset
            await self._post_form("twilio_status", callback, params, token)
        inbound = cfg.endpoint("twilio_inbound")
        if o["delivered"] and o["unsubscribed"]:
            self._state.opted_out.add(rec.to)
            self._state.stats.events["sms.stop"] += 1
            if inbound:
                sid = "SM" + stable_id(cfg.seed, "inbound", rec.seq)
                params = {"AccountSid": rec.account or "", "ApiVersion": "2010-04-01", "MessageSid": sid,
                          "SmsSid": sid, "SmsMessageSid": sid, "From": rec.to, "To": rec.extra.get("from") or "",
                          "Body": "STOP", "NumMedia": "0", "NumSegments": "1", "OptOutType": "STOP",
                          "FromCountry": rec.attributes.get("country", ""), "SmsStatus": "received"}
                if rec.extra.get("messaging_service_sid"):
                    params["MessagingServiceSid"] = rec.extra["messaging_service_sid"]
                await self._post_form("twilio_inbound", inbound, params, token)

    async def _post_form(self, kind: str, url: str, params: dict[str, str], auth_token: str) -> None:
        from urllib.parse import urlencode

        body = urlencode(params).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   TWILIO_SIGNATURE_HEADER: twilio_signature(auth_token, url, params),
                   "I-Twilio-Idempotency-Token": stable_id(0, url, body, length=32)}
        await self._post(kind, url, body, lambda b: headers)

    # ---------------------------------------------------------------- push

    async def _push(self, cfg: SandboxConfig, url: str, rec: MessageRecord, o: dict[str, bool], dismiss_draw: float,
                    ctx: RecipientContext | None = None) -> None:
        await self._delay(cfg)
        secret = cfg.push_tracking_secret or ""
        events = []
        if o["delivered"]:
            events.append("received")
            if o["opened"]:
                events.append("opened")
            elif dismiss_draw < 0.3:
                events.append("dismissed")
        for i, event in enumerate(events):
            self._state.stats.events[f"push.{event}"] += 1
            at = self.clock(ctx, event) if self.clock is not None and ctx is not None else time.time()
            payload = {"event_id": stable_id(cfg.seed, "push", rec.seq, i), "message_id": rec.message_id,
                       "idempotency_key": rec.idempotency_key, "event": event, "occurred_at": _iso(at),
                       "platform": "android"}
            body = json.dumps(payload, separators=(",", ":")).encode()
            await self._post("push", url, body, lambda b: {"Content-Type": "application/json",
                                                           PUSH_SIGNATURE_HEADER: sign_push_tracking(secret, b)})

    # ---------------------------------------------------------------- LINE

    async def _line(self, cfg: SandboxConfig, rec: MessageRecord, o: dict[str, bool], block_draw: float,
                    ctx: RecipientContext | None = None) -> None:
        await self._delay(cfg)
        events: list[tuple[str, dict[str, str]]] = []
        if o["delivered"] and o["clicked"] and rec.message_id:
            events.append(("postback", {"data": f"mid={rec.message_id}&action=open"}))
        if o["delivered"] and o["unsubscribed"]:
            events.append(("unfollow", {}) if block_draw < 0.5 else ("message", {"text": "取消"}))
        for i, (kind, extra) in enumerate(events):
            at = self.clock(ctx, kind) if self.clock is not None and ctx is not None else time.time()
            event = webhook_event(kind, rec.to, event_id=_ulid_like(stable_id(cfg.seed, "line-ev", rec.seq, i)),
                                  at=at, text=extra.get("text"), postback_data=extra.get("data"))
            await self._post_line(cfg, [event], f"line.{kind}")

    def line_user_event(self, kind: str, user_id: str, *, text: str | None = None, data: str | None = None) -> bool:
        """A simulated LINE user follows, unfollows, writes ``text`` or taps a postback with ``data``, now.
        False when no LINE webhook URL or channel secret is configured (nothing is posted)."""
        cfg = self._get_config()
        if not (cfg.endpoint("line") and cfg.line_channel_secret):
            return False
        self._line_events += 1
        event = webhook_event(kind, user_id, at=time.time(), text=text, postback_data=data,
                              event_id=_ulid_like(stable_id(cfg.seed, "line-user", user_id, self._line_events)))
        self._spawn(self._post_line(cfg, [event], f"line.{kind}"))
        return True

    async def post_line_now(self, events: list[dict[str, Any]], stat: str) -> bool:
        """Post LINE webhook ``events`` now and wait for the answer (the account-link dialog does); False when
        no LINE webhook URL or channel secret is configured, or the receiver never answered 2xx."""
        cfg = self._get_config()
        if not (cfg.endpoint("line") and cfg.line_channel_secret):
            return False
        self._state.stats.events[stat] += 1
        secret = cfg.line_channel_secret or ""
        return await self._post("line", cfg.endpoint("line") or "", webhook_body(cfg.line_destination, events),
                                lambda b: {"Content-Type": "application/json",
                                           LINE_SIGNATURE_HEADER: line_signature(secret, b)})

    async def _post_line(self, cfg: SandboxConfig, events: list[dict[str, Any]], stat: str) -> None:
        self._state.stats.events[stat] += 1
        secret = cfg.line_channel_secret or ""
        body = webhook_body(cfg.line_destination, events)
        await self._post("line", cfg.endpoint("line") or "", body, lambda b: {
            "Content-Type": "application/json", LINE_SIGNATURE_HEADER: line_signature(secret, b)})

    # ---------------------------------------------------------------- transport

    async def _delay(self, cfg: SandboxConfig) -> None:
        if cfg.engagement_delay_ms > 0:
            await asyncio.sleep(cfg.engagement_delay_ms / 1000)

    async def _post(self, kind: str, url: str, body: bytes, headers_for: Callable[[bytes], dict[str, str]]) -> bool:
        import aiohttp
        import yarl

        assert self._session is not None and self._sem is not None
        stats = self._state.stats.webhooks
        cfg = self._get_config()
        for attempt in range(cfg.webhook_max_attempts):
            if attempt:
                await asyncio.sleep(cfg.webhook_retry_base_ms / 1000 * 2 ** (attempt - 1))
            try:
                async with self._sem:
                    # Signed per attempt: a retry carries a fresh timestamp, like SendGrid's.
                    # encoded=True: call the URL byte for byte as given (yarl would otherwise unquote
                    # %3A and the like, and Twilio signatures cover the exact URL).
                    async with self._session.post(yarl.URL(url, encoded=True), data=body, headers=headers_for(body),
                                                  timeout=aiohttp.ClientTimeout(total=cfg.webhook_timeout_s)) as resp:
                        await resp.read()
                        ok = 200 <= resp.status < 300
            except (aiohttp.ClientError, TimeoutError, OSError):
                ok = False
            if ok:
                stats[f"{kind}.posted"] += 1
                return True
            stats[f"{kind}.failed_attempts"] += 1
        stats[f"{kind}.gave_up"] += 1
        log.warning("gave up posting %s webhook after %d attempts", kind, cfg.webhook_max_attempts)
        return False
