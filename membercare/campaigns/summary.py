"""The summary of a campaign occurrence: its counts from the outbox ledger (no personal data).

Counting from the ledger (not from a dispatcher's report) also covers earlier passes, other workers, and
rows that a provider event settled as sent before the dispatcher recorded its own answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.campaigns.dry_run import DryRunReport
from membercare.delivery.models import CampaignRun, OutboxMessage, OutboxState
from membercare.timeutil import ensure_utc


@dataclass
class RunSummary:
    """The run in numbers (from the ledger, so it also covers earlier passes and other workers)."""

    campaign: str
    occurrence: str
    run_id: int | None
    status: str
    segment_size: int
    planned: int  # rows in the ledger for this occurrence (every member the run accounted for)
    newly_planned: int  # rows this invocation added
    sent: dict[str, int] = field(default_factory=dict)  # channel -> sent
    deferred: int = 0
    waiting: int = 0  # planned, not yet sent
    unknown: int = 0
    suppressed: dict[str, int] = field(default_factory=dict)  # reason -> n
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> n (holdout, no_consent, frequency_cap...)
    failed: dict[str, int] = field(default_factory=dict)  # reason -> n
    sent_now: int = 0  # accepted by providers during this invocation
    dry_run: bool = False
    status_reason: str | None = None  # why the run is paused (an operator, the error budget), resumed, ...

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    def table(self) -> list[dict[str, Any]]:
        """Rows ``{"metric", "value"}`` for a table artifact or a terminal table."""
        rows: list[tuple[str, Any]] = [("status", self.status + (f" ({self.status_reason})"
                                                                 if self.status_reason else "")),
                                       ("segment size", self.segment_size), ("planned (ledger rows)", self.planned),
                                       ("newly planned", self.newly_planned)]
        for ch in ("email", "sms", "push"):
            rows.append((f"sent via {ch}", self.sent.get(ch, 0)))
        rows += [("sent in this run", self.sent_now), ("deferred", self.deferred), ("waiting", self.waiting),
                 ("unknown", self.unknown)]
        rows += [(f"suppressed: {r}", n) for r, n in sorted(self.suppressed.items())]
        rows += [(f"skipped: {r}", n) for r, n in sorted(self.skipped.items())]
        rows += [(f"failed: {r}", n) for r, n in sorted(self.failed.items())]
        return [{"metric": k, "value": v} for k, v in rows]

    def line(self) -> str:
        """One log line of counts (no personal data)."""
        return (f"{self.campaign}/{self.occurrence}: segment {self.segment_size}, planned {self.planned} "
                f"(+{self.newly_planned}), sent {self.sent_total} ({self.sent_now} now; "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.sent.items())) + f"), deferred {self.deferred}, "
                f"suppressed {sum(self.suppressed.values())}, skipped {sum(self.skipped.values())}, "
                f"failed {sum(self.failed.values())}, unknown {self.unknown}")


def summarise(engine: Engine, run_id: int | None, *, campaign: str, occurrence: str, segment_size: int,
              newly_planned: int = 0, sent_since: datetime | None = None) -> RunSummary:
    """The run's counts from the ledger; ``sent_now`` counts rows sent at or after ``sent_since``.

    Counting from the ledger (not from a dispatcher's report) also covers rows that a provider event
    settled as sent before the dispatcher recorded its own answer, and other workers' sends.
    """
    o, r = OutboxMessage.__table__, CampaignRun.__table__
    s = RunSummary(campaign, occurrence, run_id, "no run", segment_size, 0, newly_planned)
    if run_id is None:
        return s
    if sent_since is not None:
        with engine.connect() as conn:
            s.sent_now = conn.execute(sa.select(sa.func.count()).where(
                o.c.run_id == run_id, o.c.state == OutboxState.SENT.value, o.c.sent_at >= ensure_utc(sent_since))
            ).scalar_one()
    sent, suppressed, skipped, failed = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    with engine.connect() as conn:
        s.status, s.status_reason = conn.execute(sa.select(r.c.status, r.c.status_reason)
                                                 .where(r.c.id == run_id)).one()
        for state, channel, code, n in conn.execute(
            sa.select(o.c.state, o.c.channel, o.c.reason_code, sa.func.count()).where(o.c.run_id == run_id)
            .group_by(o.c.state, o.c.channel, o.c.reason_code)
        ):
            s.planned += n
            if state == OutboxState.SENT.value:
                sent[channel] += n
            elif state == OutboxState.DEFERRED.value:
                s.deferred += n
            elif state in (OutboxState.PLANNED.value, OutboxState.SENDING.value):
                s.waiting += n
            elif state == OutboxState.UNKNOWN.value:
                s.unknown += n
            elif state == OutboxState.SUPPRESSED.value:
                suppressed[code] += n
            elif state == OutboxState.SKIPPED.value:
                skipped[code] += n
            elif state == OutboxState.FAILED.value:
                failed[code] += n
    s.sent, s.suppressed, s.skipped, s.failed = dict(sent), dict(suppressed), dict(skipped), dict(failed)
    return s


def dry_run_summary(rep: DryRunReport) -> RunSummary:
    """A dry run in the shape of a :class:`RunSummary` (``sent`` = would be sent now)."""
    skipped = {k: v for k, v in rep.by_reason.items()
               if k in ("holdout", "global_control", "no_consent", "no_reachable_channel", "no_allowed_channel",
                        "frequency_cap", "preempted")}
    return RunSummary(rep.campaign, rep.occurrence, None, "dry run", rep.audience_size, rep.considered,
                      sum(rep.by_state.values()), sent=dict(rep.would_send), deferred=sum(rep.deferred.values()),
                      suppressed={"suppressed": rep.by_state.get("suppressed", 0)} if rep.by_state.get("suppressed")
                      else {}, skipped=skipped, dry_run=True)


__all__ = ["RunSummary", "dry_run_summary", "summarise"]
