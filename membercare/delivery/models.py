"""Delivery tables: campaign runs, the outbox ledger, the suppression list and policy settings.

The outbox is the source of truth for "was this message sent?". Planning writes one row per
intended message (including members we decided *not* to message, with the reason) before any
provider is called; dispatch moves rows through the state machine documented in ``docs/delivery.md``:

::

    planned ──claim──> sending ──Accepted──────────────> sent
       ^                  │ ├──TransientFailure──────> deferred ──(due)──> sending ...
       │                  │ ├──PermanentFailure─┬────> failed
       │                  │ │                   └────> planned (next channel of the fallback chain)
       └──Configuration───┘ ├──process died─────────> unknown ──reconcile──> sent | unknown (final)
                          └──ambiguous failure─────> unknown (marketing) | deferred (transactional)
    unknown ──reconcile: the provider confirms it never received it──> planned (sent again; no duplicate possible)
    skipped / suppressed: written by planning (or by a pre-send check) and never sent.

Privacy: the ledger stores **no address**. The recipient's email, phone number or push token is
resolved from the member id at dispatch time, so erasing a member's contact data also erases it from
every pending message, and the ledger can be kept for audits without holding PII. Suppressions hold a
SHA-256 of the normalised address, never the address itself.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field

from membercare.delivery.contract import Content, EmailContent, LineContent, PushContent, SmsContent
from membercare.models import ID, Channel, Purpose, TableModel
from membercare.timeutil import UTCDateTime, utcnow


def _in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(e.value) for e in enum)})"


def _ts(nullable: bool = False, index: bool = False, **kw):
    return Field(sa_type=UTCDateTime, nullable=nullable, index=index, **kw)


class RunStatus(StrEnum):
    PLANNED = "planned"
    DISPATCHING = "dispatching"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by an operator: final, never resumed or dispatched again


class OutboxState(StrEnum):
    PLANNED = "planned"
    SENDING = "sending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    SKIPPED = "skipped"
    UNKNOWN = "unknown"


# Rows a dispatcher may claim (when due).
CLAIMABLE_STATES: tuple[str, ...] = (OutboxState.PLANNED.value, OutboxState.DEFERRED.value)
# Rows that hold (or may hold) a frequency-cap slot: they were sent, may have been sent, or will be.
ACTIVE_STATES: tuple[str, ...] = (
    OutboxState.PLANNED.value, OutboxState.DEFERRED.value, OutboxState.SENDING.value,
    OutboxState.SENT.value, OutboxState.UNKNOWN.value,
)
TERMINAL_STATES: tuple[str, ...] = (
    OutboxState.SENT.value, OutboxState.FAILED.value, OutboxState.SUPPRESSED.value, OutboxState.SKIPPED.value,
)


class Decision(StrEnum):
    """Machine-readable decision codes stored in ``outbox_messages.reason_code``; ``reason`` has the prose."""

    ROUTED = "routed"  # planned on its preferred reachable channel
    FALLBACK = "fallback"  # moved to the next channel of its chain
    SENT = "sent"
    NO_CONSENT = "no_consent"
    NO_ALLOWED_CHANNEL = "no_allowed_channel"
    NO_REACHABLE_CHANNEL = "no_reachable_channel"
    SUPPRESSED = "suppressed"
    FREQUENCY_CAP = "frequency_cap"
    PREEMPTED = "preempted"  # a higher-priority campaign took this member's frequency-cap slot
    QUIET_HOURS = "quiet_hours"
    SEND_TIME = "send_time"  # deferred to the member's best send time (campaign option)
    HOLDOUT = "holdout"
    GLOBAL_CONTROL = "global_control"  # programme-wide control group: no marketing at all
    RETRY = "retry"  # transient failure, retrying later
    THROTTLED = "throttled"
    PERMANENT_FAILURE = "permanent_failure"
    RETRIES_EXHAUSTED = "retries_exhausted"
    IN_FLIGHT_AT_CRASH = "in_flight_at_crash"
    # Claimed by a dispatcher that stopped before the provider call began: safe to send, and sent.
    NEVER_ATTEMPTED = "never_attempted"
    RECONCILED = "reconciled"
    RESENT_AFTER_UNKNOWN = "resent_after_unknown"
    UNKNOWN_NOT_RESENT = "unknown_not_resent"
    # The provider's own records show it never accepted the message (see provider_records): sent (again),
    # marketing included, since no duplicate is possible.
    NEVER_RECEIVED = "never_received"
    ADAPTER_ERROR = "adapter_error"
    # A transient failure after which the provider may have accepted the message (TransientFailure.ambiguous):
    AMBIGUOUS = "ambiguous_failure"  # marketing: unknown, settled by reconciliation, never blindly resent
    AMBIGUOUS_RETRY = "ambiguous_retry"  # transactional: retried after a delay, unless records show it sent
    CANCELLED = "cancelled"  # an operator cancelled the run before this row was sent (delivery.controls)


class SuppressionReason(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    INVALID = "invalid"  # the provider said the address or number cannot receive messages
    MANUAL = "manual"


class CampaignRun(TableModel, table=True):
    """One occurrence of a campaign (e.g. the daily birthday campaign of 2026-11-23)."""

    __tablename__ = "campaign_runs"
    __table_args__ = (
        sa.UniqueConstraint("campaign", "occurrence", name="uq_campaign_runs_occurrence"),
        sa.CheckConstraint(_in("status", RunStatus), name="ck_campaign_runs_status"),
        sa.CheckConstraint(_in("purpose", Purpose), name="ck_campaign_runs_purpose"),
        sa.CheckConstraint("error_budget > 0 AND error_budget <= 1", name="ck_campaign_runs_error_budget"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    campaign: str = Field(max_length=64)
    occurrence: str = Field(max_length=64, description="e.g. 2026-11-23 for a daily campaign")
    purpose: str = Field(max_length=16)
    priority: int = Field(default=0, description="higher wins frequency-cap slots")
    as_of: datetime = _ts()
    status: str = Field(default=RunStatus.PLANNED.value, max_length=16)
    # Pause the run when more than this fraction of recent sends failed (see dispatch_outcomes.ErrorBudget).
    error_budget: float = Field(default=0.5)
    status_reason: str | None = Field(default=None, max_length=500)
    # Paused by the error budget with automatic resumption allowed: the time of the next probe, and how
    # many times the run was resumed that way (the cool-down doubles each time).
    auto_resume_at: datetime | None = _ts(nullable=True, default=None)
    auto_resumes: int = Field(default=0)
    # The campaign allows automatic resumption after this cool-down (seconds); None: an operator resumes it.
    auto_resume_after_s: float | None = Field(default=None)
    # Last computed state -> count map (JSON); refreshed at the end of planning and of each dispatch pass.
    counts: str = Field(default="{}", sa_type=sa.Text)
    created_at: datetime = _ts(default_factory=utcnow)
    started_at: datetime | None = _ts(nullable=True, default=None)
    finished_at: datetime | None = _ts(nullable=True, default=None)
    updated_at: datetime = _ts(default_factory=utcnow)


class OutboxMessage(TableModel, table=True):
    """One intended message to one member: the delivery ledger."""

    __tablename__ = "outbox_messages"
    __table_args__ = (
        sa.CheckConstraint(_in("state", OutboxState), name="ck_outbox_state"),
        sa.CheckConstraint(_in("purpose", Purpose), name="ck_outbox_purpose"),
        sa.CheckConstraint(f"channel IS NULL OR {_in('channel', Channel)}", name="ck_outbox_channel"),
        # The claim query: due rows of one run in one of the claimable states.
        sa.Index("ix_outbox_claim", "run_id", "state", "next_attempt_at"),
        # The frequency-cap query: recent rows of a batch of members.
        sa.Index("ix_outbox_member_scheduled", "member_id", "scheduled_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    message_id: str = Field(max_length=32, unique=True, description="our public id, sent to providers")
    run_id: int = Field(foreign_key="campaign_runs.id", sa_type=ID, nullable=False)
    campaign: str = Field(max_length=64)
    occurrence: str = Field(max_length=64)
    member_id: int = Field(foreign_key="members.id", sa_type=ID, nullable=False)
    # campaign|occurrence|member[|coupon]: the exactly-once guard of planning.
    idempotency_key: str = Field(max_length=255, unique=True)
    coupon_code: str | None = Field(default=None, max_length=64)
    variant: str | None = Field(default=None, max_length=32, description="A/B variant or 'holdout'")
    purpose: str = Field(max_length=16)
    priority: int = Field(default=0)
    channel: str | None = Field(default=None, max_length=8, description="channel of the next/last attempt")
    fallback_channels: str = Field(default="", max_length=32, description="remaining chain, e.g. 'email,sms'")
    # Rendered content of `channel` (zlib-compressed JSON, see encode_content): a retry sends exactly what was planned.
    content: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    state: str = Field(default=OutboxState.PLANNED.value, max_length=16)
    reason_code: str = Field(max_length=32)
    reason: str = Field(max_length=500)
    attempts: int = Field(default=0, description="provider calls made")
    transient_failures: int = Field(default=0, description="non-throttle transient failures (bounded retries)")
    scheduled_at: datetime = _ts(description="the occurrence time; frequency caps count by it")
    next_attempt_at: datetime | None = _ts(nullable=True, default=None)
    last_error: str | None = Field(default=None, max_length=500)
    provider_message_id: str | None = Field(default=None, max_length=128)
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_at: datetime | None = _ts(nullable=True, default=None)
    # Written immediately before the provider call, in the transaction that re-checks the send gate. A
    # ``sending`` row without it was claimed but never attempted: recovery sends it again safely.
    attempt_started_at: datetime | None = _ts(nullable=True, default=None)
    sent_at: datetime | None = _ts(nullable=True, default=None)
    created_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)
    # The decision log (membercare.optimise.causal): the policy that chose the channel and local send hour, what it
    # chose and with which probability, so that other policies can be evaluated from the logs (offpolicy).
    policy: str | None = Field(default=None, max_length=64)
    chosen_channel: str | None = Field(default=None, max_length=8)
    channel_propensity: float | None = Field(default=None)
    send_hour: int | None = Field(default=None, sa_type=sa.SmallInteger)
    hour_propensity: float | None = Field(default=None)


class DeliveryControls(TableModel, table=True):
    """One row (id 1): the send gate's change counter and the operator's global kill switch.

    Database triggers (migration ``0008_send_gate``) add one to ``version`` whenever something that can
    forbid a send changes: a consent revoked, an address suppressed, contact data changed, a push token
    invalidated, a run's status changed. Dispatchers compare it with the version their view was loaded at,
    right before each provider call (see :mod:`membercare.delivery.gate`).
    """

    __tablename__ = "delivery_controls"
    __table_args__ = (sa.CheckConstraint("id = 1", name="ck_delivery_controls_singleton"),)

    id: int = Field(default=1, primary_key=True)
    version: int = Field(default=0, sa_type=sa.BigInteger)
    paused_all: bool = Field(default=False)
    paused_reason: str | None = Field(default=None, max_length=500)
    updated_at: datetime | None = _ts(nullable=True, default=None)


class Suppression(TableModel, table=True):
    """Addresses (by hash) or members we must not message on a channel.

    ``address_hash`` is :func:`address_hash` of the normalised address; ``member_id`` rows suppress a
    member on a channel whatever their address (e.g. a manual block). ``channel = 'any'`` suppresses every channel.
    """

    __tablename__ = "suppressions"
    __table_args__ = (
        sa.CheckConstraint(_in("reason", SuppressionReason), name="ck_suppressions_reason"),
        sa.CheckConstraint("channel IN ('email', 'sms', 'push', 'line', 'any')", name="ck_suppressions_channel"),
        sa.CheckConstraint("(address_hash IS NULL) <> (member_id IS NULL)", name="ck_suppressions_target"),
        sa.UniqueConstraint("channel", "address_hash", name="uq_suppressions_address"),
        sa.UniqueConstraint("channel", "member_id", name="uq_suppressions_member"),
        sa.Index("ix_suppressions_member", "member_id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=ID)
    channel: str = Field(max_length=8)
    address_hash: str | None = Field(default=None, max_length=64)
    member_id: int | None = Field(default=None, foreign_key="members.id", sa_type=ID)
    reason: str = Field(max_length=16)
    source: str = Field(default="", max_length=64, description="e.g. sendgrid:bounce, dispatch, support")
    created_at: datetime = _ts(default_factory=utcnow)


class DeliveryPolicyRow(TableModel, table=True):
    """Named policy settings (JSON of :class:`membercare.delivery.policies.PolicySettings`); 'default' applies."""

    __tablename__ = "delivery_policies"

    name: str = Field(primary_key=True, max_length=32)
    settings: str = Field(sa_type=sa.Text)
    updated_at: datetime = _ts(default_factory=utcnow)


# ---------------------------------------------------------------------------------------------------------------------
# Address hashing and content encoding


def normalise_address(channel: str, address: str) -> str:
    """The form suppressions are matched on: emails case-folded, phone numbers and tokens as given.

    Whole-address case folding treats ``Ann@Shop.tw`` and ``ann@shop.tw`` as one mailbox, which is what
    every major mailbox provider does and what bounce/complaint webhooks need to match reliably.
    """
    address = address.strip()
    return address.lower() if channel == Channel.EMAIL else address


def address_hash(channel: str, address: str) -> str:
    return hashlib.sha256(f"{channel}:{normalise_address(channel, address)}".encode()).hexdigest()


_KINDS: dict[type, str] = {EmailContent: "email", SmsContent: "sms", PushContent: "push", LineContent: "line"}
_TYPES = {v: k for k, v in _KINDS.items()}


def _content_dict(content: Content) -> dict[str, Any]:
    payload = {"kind": _KINDS[type(content)], **asdict(content)}
    for key in ("headers", "data"):
        if key in payload:
            payload[key] = dict(payload[key])
    return payload


def encode_contents(contents: Mapping[str, Content]) -> bytes:
    """The rendered content of every channel of a chain, as one zlib-compressed JSON object.

    Compact (HTML mail compresses 5-10x) and lossless, so a retry or a fallback sends exactly what
    planning rendered.
    """
    payload = {ch: _content_dict(c) for ch, c in contents.items()}
    return zlib.compress(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), 6)


def decode_contents(blob: bytes | None) -> dict[str, Content]:
    if not blob:
        return {}
    out: dict[str, Content] = {}
    for ch, payload in json.loads(zlib.decompress(blob)).items():
        kind = payload.pop("kind")
        out[ch] = _TYPES[kind](**payload)
    return out
