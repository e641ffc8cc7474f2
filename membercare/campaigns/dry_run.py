"""Dry runs and previews: what a campaign occurrence would send, without sending or writing anything.

:func:`dry_run` takes exactly the decisions of a real run (the outbox planner's own batch function,
:func:`~membercare.delivery.planner.plan_batch`, coupon issuing included) inside transactions that are rolled
back, and returns what would go out: counts per channel and reason plus a few rendered samples.
:func:`write_preview` renders the campaign's template gallery for an operator.

LINE's monthly quota: :func:`with_line_quota` takes a way to read it (the flow passes the LINE adapter's
``quota()``, which asks ``GET /v2/bot/message/quota`` and ``/quota/consumption``) and puts a
:class:`LineQuotaCheck` in the report: how many LINE messages the occurrence would send (now and deferred; LINE
counts one message per recipient and request, however many bubbles) against what is left this month, with a
warning when they would not fit (LINE answers 429 beyond the quota, and those members would fall back or fail).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from membercare.campaigns.audience import Audience
from membercare.campaigns.occurrence import PreparedRun
from membercare.campaigns.plan import PlannerRenderer, make_plan_hooks, make_renderer, recipients_for_batch
from membercare.config import Settings
from membercare.db import insert_for
from membercare.delivery.contract import Content, EmailContent, LineContent, PushContent, SmsContent
from membercare.delivery.models import CampaignRun, OutboxMessage, OutboxState, RunStatus, decode_contents
from membercare.delivery.planner import PlanReport, new_message_id, plan_batch
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.models import Coupon
from membercare.rendering import CampaignRenderer
from membercare.rendering.gallery import write_gallery
from membercare.timeutil import utcnow


@dataclass
class RenderedSample:
    """One rendered message of a dry run, for an operator to read (it contains the member's name)."""

    member_id: int
    channel: str
    headline: str  # subject / push title / first SMS line
    body: str  # text part / push body / SMS, shortened
    detail: str  # "UCS-2, 2 segments" ...


class Quota(Protocol):
    """What LINE's quota endpoints say (``channels.line.adapter.Quota``): ``None`` limit means no limit."""

    @property
    def limit(self) -> int | None: ...

    @property
    def used(self) -> int: ...


@dataclass(frozen=True)
class LineQuotaCheck:
    """The occurrence's LINE messages against this month's quota (``error``: it could not be read)."""

    wanted: int
    limit: int | None = None
    used: int = 0
    error: str | None = None

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)

    @property
    def exceeded(self) -> bool:
        return self.remaining is not None and self.wanted > self.remaining

    def line(self) -> str:
        """One sentence for the terminal and the run's artifact (counts only)."""
        if self.error:
            return f"LINE quota not checked ({self.error}): {self.wanted:,} LINE messages would be sent"
        if self.limit is None:
            return f"LINE quota: no monthly limit set ({self.used:,} messages sent this month)"
        if self.exceeded:
            return (f"WARNING LINE quota: {self.wanted:,} LINE messages would be sent but only {self.remaining:,} of "
                    f"{self.limit:,} are left this month: LINE refuses the rest (HTTP 429); narrow the audience or "
                    f"raise the plan")
        return f"LINE quota: {self.wanted:,} of the {self.remaining:,} messages left this month"


def check_line_quota(wanted: int, read_quota: Callable[[], Quota]) -> LineQuotaCheck:
    """``wanted`` LINE messages against the quota ``read_quota`` returns; a failed read is reported, not raised
    (the dry run stands without it)."""
    try:
        quota = read_quota()
    except Exception as exc:  # noqa: BLE001 - any failure to read the quota only makes the check unavailable
        return LineQuotaCheck(wanted, error=type(exc).__name__)
    return LineQuotaCheck(wanted, limit=quota.limit, used=quota.used)


@dataclass
class DryRunReport:
    campaign: str
    occurrence: str
    audience_size: int
    considered: int
    would_send: dict[str, int] = field(default_factory=dict)  # channel -> messages planned to go out now
    deferred: dict[str, int] = field(default_factory=dict)  # channel -> deferred (quiet hours)
    by_state: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    by_state_reason: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, reason code) -> n
    already_planned: int = 0
    coupons_to_issue: int = 0
    samples: list[RenderedSample] = field(default_factory=list)
    line_quota: LineQuotaCheck | None = None  # when the run would send LINE messages and the quota was asked


def dry_run(engine: Engine, prepared: PreparedRun, audience: Audience, *, renderer: CampaignRenderer | None = None,
            policy: PolicySettings | None = None) -> DryRunReport:
    """Plan and render exactly as a real run would, in transactions that are rolled back: writes nothing.

    Each batch runs the planner's own batch function (routing, policies, holdouts, rendering) plus coupon
    issuing inside one transaction, reads back what it would have inserted, and rolls back. Locks are those
    of a real planning batch, held as briefly. Members already planned for this occurrence are counted in
    ``already_planned`` (a rerun would send them nothing). :func:`with_line_quota` adds the LINE quota check.
    """
    if renderer is None:
        renderer = make_renderer(prepared, preview=not prepared.settings.secret_key)
    adapter = PlannerRenderer(renderer)
    hooks = make_plan_hooks(engine, prepared)
    spec = prepared.spec
    rep = DryRunReport(prepared.name, prepared.occurrence, audience.size, len(audience))
    state, reason, send, deferred = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    pairs = Counter[tuple[str, str]]()
    o, c = OutboxMessage.__table__, Coupon.__table__
    with engine.connect() as conn:
        pol = policy or load_policy(conn)
        conn.rollback()
    for batch in audience.batches(prepared.options.batch_size, engine):
        with engine.connect() as conn:
            tx = conn.begin()
            try:
                run_id = _run_row_in(conn, prepared)
                coupons_before = conn.execute(sa.select(sa.func.count()).select_from(c)
                                              .where(c.c.campaign == prepared.name)).scalar_one()
                recipients = recipients_for_batch(conn, prepared, renderer, batch)
                rep.coupons_to_issue += conn.execute(sa.select(sa.func.count()).select_from(c).where(
                    c.c.campaign == prepared.name)).scalar_one() - coupons_before
                report = PlanReport(run_id)
                minted: list[str] = []

                def mint(minted: list[str] = minted) -> str:
                    mid = new_message_id()
                    minted.append(mid)
                    return mid

                # The planner's batch function: the same decisions as plan_run, inside our transaction.
                plan_batch(conn, run_id, spec, recipients, prepared.as_of, adapter, pol, mint, report, hooks=hooks)
                rep.already_planned += report.already_planned
                # Only the rows this transaction inserted carry a message id minted here.
                created = conn.execute(
                    sa.select(o.c.member_id, o.c.state, o.c.reason_code, o.c.channel, o.c.content)
                    .where(o.c.message_id.in_(minted))
                ).all() if report.inserted else []
                for r in created:
                    state[r.state] += 1
                    reason[r.reason_code] += 1
                    pairs[(r.state, r.reason_code)] += 1
                    if r.state == OutboxState.PLANNED.value:
                        send[r.channel] += 1
                    elif r.state == OutboxState.DEFERRED.value:
                        deferred[r.channel] += 1
                    if r.channel and r.content and len(rep.samples) < prepared.options.samples:
                        content = decode_contents(r.content).get(r.channel)
                        if content is not None and not any(s.channel == r.channel for s in rep.samples):
                            rep.samples.append(_sample(r.member_id, r.channel, content))
            finally:
                tx.rollback()
    rep.by_state, rep.by_reason, rep.would_send, rep.deferred = dict(state), dict(reason), dict(send), dict(deferred)
    rep.by_state_reason = dict(pairs)
    return rep


def with_line_quota(rep: DryRunReport, read_quota: Callable[[], Quota]) -> DryRunReport:
    """``rep`` with its LINE messages (sent now and deferred) checked against the month's quota; the quota is
    not read when the run would send nothing on LINE."""
    wanted = rep.would_send.get("line", 0) + rep.deferred.get("line", 0)
    if wanted:
        rep.line_quota = check_line_quota(wanted, read_quota)
    return rep


def _run_row_in(conn: Connection, prepared: PreparedRun) -> int:
    r = CampaignRun.__table__
    now = utcnow()
    spec = prepared.spec
    conn.execute(insert_for(conn, r).on_conflict_do_nothing(index_elements=["campaign", "occurrence"]), dict(
        campaign=spec.campaign, occurrence=spec.occurrence, purpose=spec.purpose.value, priority=spec.priority,
        as_of=prepared.as_of, status=RunStatus.PLANNED.value, error_budget=spec.error_budget, counts="{}",
        auto_resume_after_s=spec.auto_resume_after_s, created_at=now, updated_at=now))
    return conn.execute(sa.select(r.c.id).where(r.c.campaign == spec.campaign,
                                                r.c.occurrence == spec.occurrence)).scalar_one()


def _short(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _sample(member_id: int, channel: str, content: Content) -> RenderedSample:
    if isinstance(content, EmailContent):
        return RenderedSample(member_id, channel, content.subject, _short(content.text), "email")
    if isinstance(content, SmsContent):
        return RenderedSample(member_id, channel, content.body.split("\n", 1)[0][:80], _short(content.body),
                              f"{content.encoding}, {content.segments} segment(s)")
    if isinstance(content, PushContent):
        return RenderedSample(member_id, channel, content.title, _short(content.body), "push")
    if isinstance(content, LineContent):
        return RenderedSample(member_id, channel, content.text.split("\n", 1)[0][:80], _short(content.text),
                              "LINE text" + (" + Flex" if content.flex_json else ""))
    return RenderedSample(member_id, channel, "", "", type(content).__name__)


# ------------------------------------------------------------------------------------------- preview


def write_preview(settings: Settings, campaign: str) -> Path:
    """Render the campaign's gallery page (sample members, preview-only links) to ``$HOME/previews/<campaign>/``."""
    return write_gallery(settings.ensure_home() / "previews" / campaign, settings, campaigns=[campaign])


__all__ = ["DryRunReport", "LineQuotaCheck", "RenderedSample", "check_line_quota", "dry_run", "with_line_quota",
           "write_preview"]
