"""``membercare journeys simulate``: the path one member would take through a journey, with the reason at each
step, sending nothing.

The walk uses the advancer's own evaluators (exits, waits, branch conditions) at a simulated instant that moves
with each wait. Events the database does not hold yet are assumed not to happen (a wait for an event times
out) unless they are already recorded inside the wait. A send shows what the planner would decide for the
member at that instant (state, channel, reason: consent, reachability, frequency cap, quiet hours), computed
in a transaction that is rolled back, with no run created and no coupon issued.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from membercare.campaigns.triggers import find_member
from membercare.config import Settings
from membercare.delivery.policies import PolicySettings, load_policy
from membercare.journeys.conditions import InstanceView, evaluate, event_happened, exit_reason
from membercare.journeys.definition import END, Journey, parse_duration
from membercare.journeys.entry import holdout_domain
from membercare.journeys.send import preview_send
from membercare.journeys.waits import wait_until
from membercare.models import Member
from membercare.optimise.assignment import in_holdout


def simulate(engine: Engine, settings: Settings, journey: Journey, member: str | int, now: datetime, *,
             policy: PolicySettings | None = None) -> list[str]:
    """The path as lines: ``<local time>  <step>: <what happens and why>``."""
    tz = settings.shop_timezone
    with engine.connect() as conn:
        member_id = find_member(conn, member)
        policy = policy or load_policy(conn)
        zone = conn.execute(sa.select(Member.__table__.c.timezone)
                            .where(Member.__table__.c.id == member_id)).scalar() or policy.fallback_timezone
        when = ZoneInfo(zone)

        def line(at: datetime, step: str, text: str) -> str:
            return f"{at.astimezone(when):%Y-%m-%d %H:%M %Z}  {step}: {text}"

        if journey.holdout and in_holdout(member_id, holdout_domain(journey), journey.holdout):
            return [line(now, "entry", f"held out ({journey.holdout:.0%} holdout of this journey): "
                                       f"recorded, never messaged")]
        view = InstanceView(0, journey.name, member_id, now)
        out = [line(now, "entry", f"enters on {journey.entry.event or 'segment ' + str(journey.entry.segment)}")]
        t, step_id = now, journey.steps[0].id
        while step_id != END:
            reason = exit_reason(conn, journey.exit, view, t, tz)
            if reason is not None:
                out.append(line(t, step_id, f"exits before this step: {reason}"))
                return out
            step = journey.step(step_id)
            target: str | None = step.next
            if step.send is not None:
                text = preview_send(conn, engine, settings, step, member_id, t, policy)
                conn.rollback()
                out.append(line(t, step.id, f"send {step.send.message}: would be {text}"))
            elif step.wait is not None:
                until, why = wait_until(conn, step.wait, view, t, zone)
                out.append(line(t, step.id, f"{why}" + (f" -> {until.astimezone(when):%Y-%m-%d %H:%M}"
                                                        if until else "")))
                t = max(t, until or t)
            elif step.wait_for is not None:
                w = step.wait_for
                deadline = t + parse_duration(w.timeout)
                if event_happened(conn, view, w.event, t, deadline):
                    out.append(line(t, step.id, f"{w.event} is recorded within {w.timeout}: goes on"))
                    target = w.then or step.next
                else:
                    out.append(line(t, step.id, f"no {w.event} recorded within {w.timeout} (assumed not to "
                                                f"happen): times out"))
                    target, t = w.else_ or step.next, deadline
            elif step.branch is not None:
                ok, why = evaluate(conn, step.branch.if_, view, t, tz)
                target = step.branch.then if ok else step.branch.else_
                out.append(line(t, step.id, f"{why} -> {target}"))
            step_id = target or journey.following(step.id)
        out.append(line(t, "end", "journey complete"))
        return out


__all__ = ["simulate"]
