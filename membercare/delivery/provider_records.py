"""Provider-backed :class:`~membercare.delivery.reconcile.ProviderVerdicts`: settle ``unknown`` rows from what
the providers themselves know, including which messages they **never** received.

An ``unknown`` row is a message whose provider call may or may not have been accepted (the answer was lost,
or the dispatcher died mid-send). :func:`~membercare.delivery.reconcile.reconcile_unknown` asks a source
for a :class:`~membercare.delivery.reconcile.Settlement`: *found* rows become ``sent``; rows the provider
*confirms it never received* go back to ``planned`` (reason ``never_received``) and are sent, marketing
included, because no duplicate is possible; the rest are left to the grace-period policy.

Per provider (details and residual risks in ``docs/delivery.md``, "Reconciliation"):

* **Twilio** (:class:`TwilioListRecords`): the Messages list (``GET .../Messages.json`` with ``To``, ``From``
  and ``DateSent`` filters, every page) for the member's number over the row's time window. Twilio's
  Message resource does not return the status-callback URL, so our id cannot be read back from the list:
  a message is matched on recipient + exact body (the ledger stores the rendered content) + time window,
  one listed message per row, never one that another row already recorded. *Never received* needs a
  complete, empty answer: no unclaimed message from our sender to that number in the window at all (a
  different body might be ours, altered by Twilio: smart encoding, redaction), the window closed longer
  ago than Twilio can keep a message queued (``settle_after``; a queued message has no ``date_sent``
  yet), and the member's record unchanged since the row was planned (the number is resolved now, at
  lookup time, and never stored in the ledger; had it changed, the old number's list is out of reach).
* **SendGrid** (:class:`SendGridEventRecords`): the Event Webhook, as stored in ``engagement_events``.
  Any acceptance event with our ``membercare_message_id`` proves acceptance. SendGrid has no API to look a
  message up by our id, but it posts ``processed`` for every message it accepts; so, only when the
  operator says the event stream is trustworthy (``MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM``: the Event
  Webhook is configured with ``processed`` enabled and the receiver is monitored), a row with no event
  at all after ``grace`` (longer than SendGrid's 24 h of webhook retries) is taken as never received, and
  only once the stream has delivered a ``processed`` event received after that row's send (it is live).
* **LINE** (:class:`~membercare.delivery.retry_key_records.RetryKeyRecords`): no lookup API either, but
  its retry key is LINE's own idempotency for 24 hours: an ``unknown`` row's request is repeated with the
  same ``X-Line-Retry-Key`` (409: it was sent; 200: it had not arrived and is sent now, once), after the
  send gate; past the key's validity the row is reported for an operator and never resent.
* **FCM**: there is no lookup API. An ``unknown`` push row is settled only by a push-tracking event from
  the app carrying our message id (the webhook receiver does that); otherwise it stays ``unknown``.

Everything here is SDK-free: the Twilio list call lives in the adapter
(:meth:`channels.twilio.adapter.TwilioSmsChannel.list_messages`, any :class:`MessageLister` will do).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.delivery.models import OutboxMessage, OutboxState, decode_contents
from membercare.delivery.reconcile import ProviderRecords, ProviderVerdicts, Settlement
from membercare.delivery.sqlutil import any_of
from membercare.errors import ConfigurationError, DeliveryError
from membercare.models import Channel, Member
from membercare.timeutil import ensure_utc, utcnow

log = logging.getLogger(__name__)

ENV_TRUST_SENDGRID_EVENTS = "MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM"
# Twilio keeps an unsent message queued for at most its ValidityPeriod (default and maximum 36,000 s); until it
# is sent it has no date_sent, so a DateSent-filtered list cannot show it yet.
TWILIO_QUEUE_LIMIT = timedelta(seconds=36_000)
# SendGrid retries a failed Event Webhook POST for up to 24 hours.
SENDGRID_WEBHOOK_RETRY_PERIOD = timedelta(hours=24)


class ProviderLookupError(DeliveryError, RuntimeError):
    """A provider lookup could not be made completely (the message names no address)."""


@dataclass(frozen=True)
class ListedMessage:
    """One message of a provider's message list, as much as reconciliation needs."""

    sid: str
    to: str
    body: str | None
    status: str | None
    sent_at: datetime | None  # Twilio date_sent: None while queued
    created_at: datetime | None

    @property
    def at(self) -> datetime | None:
        """When the provider accepted it (created the resource), which is what a send window bounds."""
        return self.created_at or self.sent_at


class MessageLister(Protocol):
    """Extension point: a provider's message list for one recipient (``TwilioSmsChannel`` implements it).

    Returns every outbound message from our sender to ``to`` sent on ``first_day`` .. ``last_day`` (UTC,
    inclusive), all pages read; raises (e.g. :class:`ProviderLookupError`) rather than return a partial list.
    """

    def list_messages(self, to: str, *, first_day: date, last_day: date) -> Sequence[ListedMessage]: ...


@dataclass
class _SmsRow:
    id: int
    message_id: str
    state: str
    body: str | None
    phone: str | None
    start: datetime  # earliest moment the provider can have accepted it (minus clock slack)
    end: datetime  # latest such moment (plus clock slack)
    created_at: datetime
    member_updated_at: datetime | None



def _sent_within(m: ListedMessage, start: datetime, end: datetime) -> bool:
    """The listed message carries a date, and it lies in [start, end]."""
    return m.at is not None and start <= m.at <= end


def _rows(engine: Engine, message_ids: Sequence[str], channel: Channel) -> list[dict[str, Any]]:
    """Outbox rows of ``channel`` among ``message_ids`` with their member's current record."""
    o, m = OutboxMessage.__table__, Member.__table__
    if not message_ids:
        return []
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(o.c.id, o.c.message_id, o.c.state, o.c.content, o.c.created_at, o.c.updated_at,
                      m.c.phone, m.c.updated_at.label("member_updated_at"))
            .select_from(o.outerjoin(m, m.c.id == o.c.member_id))
            .where(any_of(conn, o.c.message_id, list(message_ids)), o.c.channel == channel.value)
            .order_by(o.c.id)).mappings()]


class TwilioListRecords:
    """Twilio's message list as a :class:`~membercare.delivery.reconcile.ProviderVerdicts` source.

    One list call per distinct recipient of the rows asked about. ``slack`` widens every row's window
    (``created_at`` .. ``updated_at``) for clock differences between us and Twilio; ``settle_after`` is how
    long after a row's window closes absence may be concluded (at least Twilio's queueing limit, 10 h by
    default; lower it only if the Messaging Service sets a shorter ValidityPeriod). Past that, the list for
    the window no longer changes, so a row still undecided ``look_back`` later is not looked up again
    (``sync-engagement`` runs every 15 minutes: the list is not read for it forever).
    """

    def __init__(self, engine: Engine, lister: MessageLister, *, slack: timedelta = timedelta(minutes=10),
                 settle_after: timedelta = TWILIO_QUEUE_LIMIT + timedelta(hours=1),
                 look_back: timedelta = timedelta(days=3), clock: Callable[[], datetime] = utcnow):
        self.engine, self.lister = engine, lister
        self.slack, self.settle_after, self.look_back, self.clock = slack, settle_after, look_back, clock

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        """:class:`ProviderRecords`: the rows Twilio lists (used before a transactional resend)."""
        return self.settle(message_ids, now=self.clock()).found

    def settle(self, message_ids: Sequence[str], *, now: datetime) -> Settlement:
        now = ensure_utc(now)
        out = Settlement()
        by_phone: dict[str, list[_SmsRow]] = defaultdict(list)
        for r in _rows(self.engine, message_ids, Channel.SMS):
            sms = decode_contents(r["content"]).get(Channel.SMS.value)
            row = _SmsRow(r["id"], r["message_id"], r["state"], getattr(sms, "body", None), r["phone"],
                          r["created_at"] - self.slack, r["updated_at"] + self.slack, r["created_at"],
                          r["member_updated_at"])
            if row.phone and row.body and now <= row.end + self.settle_after + self.look_back:
                by_phone[row.phone].append(row)
        for phone, rows in by_phone.items():
            # Twilio filters on date_sent, which trails acceptance by up to the queueing limit: read that far on.
            first, last = min(r.start for r in rows), max(r.end for r in rows) + self.settle_after
            # Kept whatever their ``to`` looks like: Twilio filtered on the recipient, and dropping a message
            # over formatting would make the list look emptier than it is.
            free = self._unclaimed(list(self.lister.list_messages(phone, first_day=first.date(),
                                                                  last_day=last.date())))
            self._match(rows, free, out, now)
        return out

    def _unclaimed(self, listed: list[ListedMessage]) -> list[ListedMessage]:
        """Listed messages that no outbox row has recorded as its own."""
        if not listed:
            return []
        o = OutboxMessage.__table__
        with self.engine.connect() as conn:
            known = set(conn.execute(sa.select(o.c.provider_message_id)
                                     .where(any_of(conn, o.c.provider_message_id, [m.sid for m in listed])))
                        .scalars())
        return [m for m in listed if m.sid not in known]

    def _match(self, rows: list[_SmsRow], free: list[ListedMessage], out: Settlement, now: datetime) -> None:
        # Matches first, over every row of the recipient: a message that is some row's exact match is not
        # evidence against another row's absence.
        dated = sorted((m for m in free if m.at is not None), key=lambda m: (m.at, m.sid))
        undated = len(dated) < len(free)  # a message without any date could be anyone's: no absence then
        unmatched = []
        for row in sorted(rows, key=lambda r: (r.start, r.id)):
            match = next((m for m in dated if _sent_within(m, row.start, row.end) and m.body == row.body), None)
            if match is None:
                unmatched.append(row)
                continue
            dated.remove(match)
            out.found[row.message_id] = match.sid
            out.notes[row.message_id] = "Twilio's message list has it (same recipient, body and time window)"
        for row in unmatched:
            if row.state != OutboxState.UNKNOWN.value or now < row.end + self.settle_after:
                continue
            if row.member_updated_at is None or row.member_updated_at > row.created_at:
                continue  # the number may have changed since the send: the list we read may be the wrong one
            if undated or any(_sent_within(m, row.start, row.end) for m in dated):
                continue  # something unaccounted for was sent to this number meanwhile: it may be this one
            out.never_received[row.message_id] = (
                f"Twilio lists no message from our sender to the member's number between "
                f"{row.start:%Y-%m-%d %H:%M} and {row.end:%Y-%m-%d %H:%M} UTC")


class SendGridEventRecords:
    """The SendGrid Event Webhook (stored in ``engagement_events``) as a ``ProviderVerdicts`` source.

    Found: an event that proves acceptance (processed, delivered, deferred, bounce, open, click, ...)
    carrying our message id. Never received (only with ``trust_event_stream``): no event of any kind for
    the message, ``grace`` passed since the row's last update (its send lies before that), and a SendGrid
    ``processed`` event *received* after that moment, which shows the stream was live and carries
    ``processed`` events. Residual risk: an event SendGrid gave up on (our receiver failed for longer than
    its 24 h of retries) or a webhook whose ``processed`` event type was switched off later.
    """

    def __init__(self, engine: Engine, *, trust_event_stream: bool = False,
                 grace: timedelta = SENDGRID_WEBHOOK_RETRY_PERIOD + timedelta(hours=1),
                 clock: Callable[[], datetime] = utcnow):
        self.engine, self.trust_event_stream, self.grace, self.clock = engine, trust_event_stream, grace, clock

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        return self.settle(message_ids, now=self.clock()).found

    def settle(self, message_ids: Sequence[str], *, now: datetime) -> Settlement:
        from membercare.engagement.events import EventKind, Provider
        from membercare.engagement.models import EngagementEventRow
        from membercare.engagement.store import _ACCEPTANCE_KINDS

        now = ensure_utc(now)
        out = Settlement()
        rows = _rows(self.engine, message_ids, Channel.EMAIL)
        if not rows:
            return out
        e = EngagementEventRow.__table__
        with self.engine.connect() as conn:
            events = conn.execute(
                sa.select(e.c.message_id, e.c.kind, e.c.provider, e.c.provider_message_id)
                .where(any_of(conn, e.c.message_id, [r["message_id"] for r in rows]))
                .order_by(e.c.occurred_at, e.c.id)).all()
            # The latest ``processed`` event received (ordered, not max(): SQLite aggregates lose the type).
            live_until = conn.execute(sa.select(e.c.received_at).where(
                e.c.provider == Provider.SENDGRID.value, e.c.kind == EventKind.QUEUED.value)
                .order_by(e.c.received_at.desc()).limit(1)).scalar()
        seen: set[str] = set()
        accepted = {k.value for k in _ACCEPTANCE_KINDS}
        for mid, kind, provider, pmid in events:
            seen.add(mid)
            if kind in accepted and provider != Provider.MEMBERCARE.value and mid not in out.found:
                out.found[mid] = pmid or ""
                out.notes[mid] = f"SendGrid {kind} event for it"
        if not self.trust_event_stream:
            return out
        for r in rows:
            sent_by = r["updated_at"]
            if (r["state"] != OutboxState.UNKNOWN.value or r["message_id"] in seen or now < sent_by + self.grace
                    or live_until is None or live_until < sent_by):
                continue
            out.never_received[r["message_id"]] = (
                f"no SendGrid event for it in the {self.grace} after {sent_by:%Y-%m-%d %H:%M} UTC while the "
                "Event Webhook delivered processed events for later sends")
        return out


class CombinedRecords:
    """Several sources as one: found = any source found it; never received = a source confirms absence and
    none found it. A source that fails is logged and concludes nothing; the others still count."""

    def __init__(self, sources: Sequence[ProviderRecords | ProviderVerdicts],
                 closers: Sequence[Callable[[], None]] = ()):
        self.sources, self._closers = list(sources), list(closers)

    def lookup(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        found: dict[str, str] = {}
        for source in self.sources:
            try:
                found.update({k: v for k, v in source.lookup(message_ids).items() if k not in found})
            except Exception as exc:  # noqa: BLE001 - logged; the other sources still answer
                _unavailable(source, exc)
        return found

    def settle(self, message_ids: Sequence[str], *, now: datetime) -> Settlement:
        out = Settlement()
        for source in self.sources:
            # A source is asked only about what no source before it found: some settle by sending (LINE).
            ids = [m for m in message_ids if m not in out.found]
            if not ids:
                break
            try:
                part = (source.settle(ids, now=now) if isinstance(source, ProviderVerdicts)
                        else Settlement(found=dict(source.lookup(ids))))
            except Exception as exc:  # noqa: BLE001 - logged; the other sources still answer
                _unavailable(source, exc)
                continue
            for mid, pid in part.found.items():
                out.found.setdefault(mid, pid)
                if mid in part.notes:
                    out.notes.setdefault(mid, part.notes[mid])
            out.never_received.update(part.never_received)
            out.pending.update(part.pending)
            out.for_operator.update(part.for_operator)
        out.never_received = {m: w for m, w in out.never_received.items() if m not in out.found}
        return out

    def close(self) -> None:
        for close in self._closers:
            close()


def _unavailable(source: object, exc: Exception) -> None:
    # Only our own lookup errors are known to carry no address; of anything else, the type alone.
    detail = str(exc) if isinstance(exc, ProviderLookupError) else type(exc).__name__
    log.warning("provider records %s unavailable, nothing concluded from them: %s", type(source).__name__, detail)


def trust_sendgrid_events(env: Mapping[str, str]) -> bool:
    """``MEMBERCARE_SENDGRID_TRUST_EVENT_STREAM``; unset: yes against a local API (the sandbox, whose
    webhooks always include ``processed``), no against the real SendGrid."""
    from membercare.validation import ValidationError, parse_bool

    value = (env.get(ENV_TRUST_SENDGRID_EVENTS) or "").strip()
    if not value:
        return bool((env.get("MEMBERCARE_SENDGRID_BASE_URL") or "").strip())
    try:
        return parse_bool(value, field=ENV_TRUST_SENDGRID_EVENTS)
    except ValidationError as exc:
        raise ConfigurationError(str(exc)) from None


def provider_records_from_env(engine: Engine, env: Mapping[str, str], *,
                              also: Sequence[ProviderRecords | ProviderVerdicts] = ()) -> CombinedRecords | None:
    """The provider lookups the configured channels allow (Twilio's list, SendGrid's events, LINE's retry
    keys), plus ``also`` (e.g. a :class:`~membercare.delivery.reconcile.SandboxRecords`). ``None`` when
    there is none. Call ``close()`` on the result when done (it owns the Twilio and LINE adapters)."""
    from channels.registry import build_channels, provider_for

    sources: list = list(also)
    closers: list[Callable[[], None]] = []
    # Each lookup speaks for its provider's messages only: with another provider chosen for the channel
    # (MEMBERCARE_PROVIDER_<CHANNEL>), an absence from Twilio's list or SendGrid's events proves nothing.
    if (env.get("MEMBERCARE_TWILIO_ACCOUNT_SID") or "").strip() and provider_for(Channel.SMS, env).name == "twilio":
        sms = build_channels(env, channels=[Channel.SMS])[Channel.SMS]
        sources.append(TwilioListRecords(engine, sms))  # type: ignore[arg-type]
        closers.append(sms.close)
    if (env.get("MEMBERCARE_SENDGRID_API_KEY") or "").strip() and provider_for(Channel.EMAIL, env).name == "sendgrid":
        sources.append(SendGridEventRecords(engine, trust_event_stream=trust_sendgrid_events(env)))
    line_token = (env.get("MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN") or "").strip()
    if line_token and provider_for(Channel.LINE, env).name == "line":
        from membercare.delivery.retry_key_records import RetryKeyRecords

        line = build_channels(env, channels=[Channel.LINE])[Channel.LINE]
        sources.append(RetryKeyRecords(engine, line))  # type: ignore[arg-type]
        closers.append(line.close)
    return CombinedRecords(sources, closers) if sources else None


__all__ = [
    "CombinedRecords", "ENV_TRUST_SENDGRID_EVENTS", "ListedMessage", "MessageLister", "ProviderLookupError",
    "SendGridEventRecords", "TwilioListRecords", "provider_records_from_env", "trust_sendgrid_events",
]
