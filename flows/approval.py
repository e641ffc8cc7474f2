"""Approval before a send: ``approval: required`` in a campaign's ``campaign.yaml``.

The ``run-campaign`` flow of such a campaign first plans the occurrence in memory (the dry run: nothing
written, nothing sent) and publishes its summary and a link to the rendered preview as artifacts; the
occurrence's run is created ``paused`` ("awaiting approval"), so no dispatcher (``dispatch-due``, a rerun)
can send anything meanwhile. The flow run then **pauses for input**: the Prefect UI shows a form
(:class:`ApprovalInput`: approve or not, the approver's name, a comment) on the flow run's page. On approve,
the run is resumed and the flow plans and sends as usual; on reject, the run is cancelled
(:func:`membercare.delivery.controls.cancel_run`): nothing is planned or sent for this occurrence, ever.
Who decided, when and why is recorded in the ``<campaign>-approval`` artifact, the run's ``status_reason``
and the flow's log. No decision within ``approval_timeout_s`` fails the flow run; the run stays paused and
nothing is sent.

Only the first planning of an occurrence asks: a rerun or a resume of an occurrence that already has ledger
rows was approved before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.common import artifact_key, engine_for, run_logger
from membercare.campaigns.occurrence import PreparedRun
from membercare.campaigns.plan import ensure_run
from membercare.delivery.controls import cancel_run, pause_run, resume_run
from membercare.delivery.models import OutboxMessage
from membercare.timeutil import shop_date_label, utcnow

AWAITING = "awaiting approval in the Prefect UI"


class ApprovalInput(RunInput):
    """The form on the paused flow run's page in the Prefect UI."""

    approve: bool = Field(default=False, description="Tick to approve the send; leave unticked to reject it "
                                                      "(nothing is sent for this occurrence).")
    approver: str = Field(min_length=1, max_length=64, description="Your name: recorded with the decision.")
    comment: str = Field(default="", max_length=300, description="Why (recorded with the decision).")


@dataclass(frozen=True)
class ApprovalDecision:
    approved: bool
    approver: str
    comment: str
    at: datetime
    run_id: int

    def line(self) -> str:
        verb = "approved" if self.approved else "rejected"
        return f"{verb} by {self.approver} at {self.at.isoformat(timespec='seconds')}" + (
            f": {self.comment}" if self.comment else "")


def needs_approval(settings, prepared: PreparedRun, *, dry_run: bool) -> bool:
    """A real run of an ``approval: required`` campaign whose occurrence has no ledger rows yet."""
    if dry_run or prepared.campaign.approval != "required":
        return False
    from membercare.delivery.models import CampaignRun

    r, o = CampaignRun.__table__, OutboxMessage.__table__
    with engine_for(settings).connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(o.join(r, r.c.id == o.c.run_id)).where(
            r.c.campaign == prepared.name, r.c.occurrence == prepared.occurrence)).scalar_one()
    return rows == 0


def wait_for_approval(settings, prepared: PreparedRun, *, summary_line: str, timeout_s: int,
                      poll_s: int = 5) -> ApprovalDecision:
    """Hold the occurrence's run paused, ask in the Prefect UI, record and apply the answer."""
    logger = run_logger()
    engine = engine_for(settings)
    run_id = ensure_run(engine, prepared)
    pause_run(engine, run_id, reason=AWAITING, by="run-campaign")
    key = artifact_key(prepared.name, "approval")
    create_markdown_artifact("\n".join([
        f"# Approval needed: {prepared.name} · {prepared.occurrence}", "",
        f"*{prepared.campaign.description}*", "",
        f"- dry run: {summary_line}",
        "- see this flow run's `" + artifact_key(prepared.name, "dry-run") + "` and `"
        + artifact_key(prepared.name, "report") + "` artifacts (counts, the rendered preview)",
        f"- nothing is sent until someone approves; no answer within {timeout_s // 3600 or 1} h fails the run",
        "", "**Resume** this flow run in the Prefect UI and fill in the form: approve (or not), your name, "
        "a comment."]), key=key, description=f"{prepared.name} {prepared.occurrence}: waiting for approval")
    logger.info("%s/%s: waiting for approval in the Prefect UI (run %d)", prepared.name, prepared.occurrence, run_id)
    answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s, poll_interval=poll_s,
                            key=artifact_key("approval", prepared.occurrence))
    decision = ApprovalDecision(bool(answer.approve), answer.approver.strip(), answer.comment.strip(), utcnow(),
                                run_id)
    if decision.approved:
        resume_run(engine, run_id, by=decision.approver, now=decision.at, reason="approved in the Prefect UI"
                   + (f": {decision.comment}" if decision.comment else ""))
    else:
        cancel_run(engine, run_id, reason="rejected in the Prefect UI" + (f": {decision.comment}" if decision.comment
                                                                            else ""),
                   by=decision.approver, now=decision.at, settle_wait_s=0)
    tz = settings.shop_timezone
    create_markdown_artifact("\n".join([
        f"# {prepared.name} · {prepared.occurrence}: **{'approved' if decision.approved else 'rejected'}**", "",
        f"- by **{decision.approver}** at {shop_date_label(decision.at, tz)}",
        f"- comment: {decision.comment or '-'}",
        f"- dry run shown: {summary_line}",
        "- " + ("the flow plans and sends now" if decision.approved else
                "nothing was planned or sent; the occurrence is cancelled")]),
        key=key, description=f"{prepared.name} {prepared.occurrence}: approval decision")
    logger.info("%s/%s %s", prepared.name, prepared.occurrence, decision.line())
    return decision


__all__ = ["AWAITING", "ApprovalDecision", "ApprovalInput", "needs_approval", "wait_for_approval"]
