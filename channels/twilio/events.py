"""Twilio status callbacks and inbound SMS -> :class:`membercare.engagement.events.EngagementEvent`.

**Status callbacks** (``POST /webhooks/twilio/status?mid=<our message id>&ik=...``, form-encoded):
``MessageSid``, ``MessageStatus``, ``To``, ``From``, ``AccountSid``, and ``ErrorCode`` /
``ErrorMessage`` on failure. Twilio sends one callback per status change and no event id or
timestamp, so the dedupe key is ``MessageSid:MessageStatus`` and the time is when we received it.

=========================================  ==================================================
``MessageStatus``                          kind
=========================================  ==================================================
accepted, scheduled, queued                queued
sending, sent                              sent
delivered                                  delivered
read                                       opened (WhatsApp / RCS read receipts)
undelivered                                bounced: hard for the "number does not exist / is
                                           not a mobile" codes below, soft otherwise
failed                                     failed (hard bounce for the same codes; ``rejected``
                                           with reason ``opted_out`` for 21610)
canceled                                   rejected (reason ``canceled``)
anything else                              unknown
=========================================  ==================================================

An id or number that cannot be a key (a control character such as NUL, or absurd length: ``MessageSid``,
``To``, ``From``, our ``mid``) is not refused: the event is stored without it (the dedupe key becomes a hash
of the SID), since Twilio would not resend it and the raw parameters are the only record.

**Inbound messages** (``POST /webhooks/twilio/inbound``): ``MessageSid``, ``From``, ``To``, ``Body``.
They become ``inbound`` events; the body is matched against the opt-out / opt-in / help keywords the
way carriers and Twilio do it: the whole message, trimmed and case-insensitive, must be the keyword
(so "please stop the spam" is not an opt-out, exactly as Twilio treats it). Twilio's standard keywords
plus Traditional Chinese ones our members use:

* opt out (``stop``): STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE, OPTOUT, 取消, 退訂
* opt in (``start``): START, UNSTOP, YES
* help (``help``): HELP, INFO
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from datetime import datetime

from channels.base import CALLBACK_MESSAGE_ID_PARAM
from membercare.engagement.events import (
    BounceClass,
    EngagementEvent,
    EventKind,
    InboundCommand,
    MalformedPayload,
    Provider,
    clip,
    stable_key,
    usable_id,
)
from membercare.models import Channel
from membercare.timeutil import utcnow

STOP_KEYWORDS = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "revoke", "optout",
                           "取消", "退訂"})
START_KEYWORDS = frozenset({"start", "unstop", "yes"})
HELP_KEYWORDS = frozenset({"help", "info"})
# Keywords Twilio's own opt-out handling answers by itself (Advanced Opt-Out defaults): we must not send a
# second confirmation for these, but we must confirm the ones Twilio does not know (取消, 退訂).
TWILIO_HANDLED_KEYWORDS = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "revoke", "optout",
                                     "start", "unstop", "yes", "help", "info"})

# Error codes that mean the number can never receive SMS: suppress it.
#   21211 invalid 'To' number, 21614 'To' is not a mobile number, 30005 unknown destination handset,
#   30006 landline or unreachable carrier.
HARD_ERROR_CODES = frozenset({"21211", "21614", "30005", "30006"})
OPTED_OUT_CODE = "21610"  # the recipient replied STOP to this sender

_STATUS: dict[str, EventKind] = {
    "accepted": EventKind.QUEUED,
    "scheduled": EventKind.QUEUED,
    "queued": EventKind.QUEUED,
    "sending": EventKind.SENT,
    "sent": EventKind.SENT,
    "delivered": EventKind.DELIVERED,
    "read": EventKind.OPENED,
    "undelivered": EventKind.BOUNCED,
    "failed": EventKind.FAILED,
    "canceled": EventKind.REJECTED,
}

_TRIM = " \t\r\n.!?。！？,，;；:：'\"“”「」"


def normalise_keyword(body: str | None) -> str:
    """The body as the keyword matcher sees it: NFKC (full-width letters fold), trimmed, case-folded."""
    text = unicodedata.normalize("NFKC", body or "")
    return text.strip(_TRIM).casefold()


def classify_inbound(body: str | None) -> InboundCommand | None:
    word = normalise_keyword(body)
    if word in STOP_KEYWORDS:
        return InboundCommand.STOP
    if word in START_KEYWORDS:
        return InboundCommand.START
    if word in HELP_KEYWORDS:
        return InboundCommand.HELP
    return None


def twilio_handles_reply(body: str | None) -> bool:
    """Whether Twilio's own opt-out handling already answered this keyword (so we must not)."""
    return normalise_keyword(body) in TWILIO_HANDLED_KEYWORDS


def _sid(params: Mapping[str, str]) -> str:
    sid = params.get("MessageSid") or params.get("SmsSid") or ""
    if not sid:
        raise MalformedPayload("MessageSid is missing")
    return sid


def _key(*parts: str) -> str:
    """``kind:MessageSid[:status]``, or a hash of it when a part cannot be part of a key (a control
    character, or too long): a Twilio SID is 34 letters and digits, and a key is never truncated, since two
    keys could then become one."""
    key = ":".join(parts)
    return key if usable_id(key, 128) else stable_key(*parts)


def parse_status_callback(params: Mapping[str, str], query: Mapping[str, str] | None = None, *,
                          received_at: datetime | None = None) -> EngagementEvent:
    """One status callback. ``query`` is the callback URL's query (our ``mid``)."""
    query = query or {}
    sid = _sid(params)
    status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
    if not status:
        raise MalformedPayload("MessageStatus is missing")
    kind = _STATUS.get(status, EventKind.UNKNOWN)
    code = (params.get("ErrorCode") or "").strip()
    reason = None
    if code:
        reason = clip(f"{code} {params.get('ErrorMessage') or ''}".strip(), 500)
    bounce_class = None
    suppress = None
    if kind in (EventKind.BOUNCED, EventKind.FAILED) and code in HARD_ERROR_CODES:
        kind, bounce_class, suppress = EventKind.BOUNCED, BounceClass.HARD, "invalid"
    elif kind is EventKind.BOUNCED:
        bounce_class = BounceClass.SOFT
    elif kind is EventKind.FAILED and code == OPTED_OUT_CODE:
        kind, reason = EventKind.REJECTED, "opted_out"
    elif kind is EventKind.REJECTED:
        reason = reason or "canceled"
    elif kind is EventKind.UNKNOWN:
        reason = clip(f"unmapped Twilio status {status!r}", 500)
    mid = query.get(CALLBACK_MESSAGE_ID_PARAM) or None
    raw: dict[str, object] = dict(params)
    if query:
        raw["_query"] = dict(query)
    return EngagementEvent(
        provider=Provider.TWILIO,
        dedupe_key=_key("status", sid, status),
        kind=kind,
        channel=Channel.SMS,
        occurred_at=received_at or utcnow(),
        raw=raw,
        message_id=clip(mid, 32),
        provider_message_id=clip(sid, 128),
        bounce_class=bounce_class,
        reason=reason,
        recipient=params.get("To") or None,
        suppress=suppress,
    )


def parse_inbound(params: Mapping[str, str], *, received_at: datetime | None = None) -> EngagementEvent:
    """One inbound SMS from a member. ``recipient`` is the member's number (``From``)."""
    sid = _sid(params)
    sender = (params.get("From") or "").strip()
    if not sender:
        raise MalformedPayload("From is missing")
    command = classify_inbound(params.get("Body"))
    return EngagementEvent(
        provider=Provider.TWILIO,
        dedupe_key=_key("inbound", sid),
        kind=EventKind.INBOUND,
        channel=Channel.SMS,
        occurred_at=received_at or utcnow(),
        raw=dict(params),
        provider_message_id=clip(sid, 128),
        reason=command.value if command else None,
        recipient=sender,
        command=command,
    )
