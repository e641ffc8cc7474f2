"""The report's journey section: per journey, its funnel and its lift against the entry holdout.

Per journey with instances that entered in the report's period (the funnel of :mod:`membercare.journeys.funnel`,
the same one ``membercare journeys show`` prints):

* **entered** (messaged instances) and **held out** at entry, with the distinct members behind each;
* **per step**, in the order instances took them: how many instances reached it, their outcomes, and for a
  send how many of its messages were sent;
* **converted**: instances whose member bought within the attribution window after entering (both arms alike);
  **attributed**: messaged instances with an order credited to one of their messages by the report's model;
* **exited**, by reason (purchase, unsubscribe, left the segment, an exit event);
* **holdout lift**: the converted share of messaged instances minus that of held-out ones (intent to treat:
  every entered instance counts, messaged or not), with the member-clustered interval, p-value, MDE and verdict
  of :func:`membercare.reports.checks.experiment_checks` (a member who re-enters has several instances, and
  the holdout is stable per member, so members are the clusters), beside the rows-as-independent Newcombe
  interval of :func:`membercare.optimise.lift.binary_lift`.

Renderings: :func:`print_journeys` (terminal) and :func:`journeys_html` (the HTML report).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Connection

from membercare.journeys.funnel import HOLDOUT, MESSAGED, funnel, journeys_entered
from membercare.journeys.models import JourneyStep
from membercare.optimise.lift import BinaryLift, binary_lift
from membercare.reports.checks import DEFAULT_PRIMARY, ExperimentChecks, experiment_checks
from membercare.reports.options import ReportOptions


@dataclass
class JourneyStepRow:
    step: str
    kind: str
    reached: int  # instances that took the step
    sent: int  # send steps: messages sent (the others: 0)
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass
class JourneySection:
    journey: str
    entered: int  # messaged instances (every instance not held out)
    held_out: int
    members: int  # distinct members behind the messaged instances
    holdout_members: int
    by_status: dict[str, int]
    steps: list[JourneyStepRow]
    exited: dict[str, int]
    converted: int  # messaged instances with a purchase within the window after entry
    holdout_converted: int
    attributed: int  # messaged instances with an order credited to one of their messages
    conversion: BinaryLift | None = None  # instances as independent; None when an arm is empty
    checks: ExperimentChecks | None = None  # member-clustered; None when an arm has fewer than two members

    def rate(self, group: str) -> float | None:
        n, x = (self.held_out, self.holdout_converted) if group == HOLDOUT else (self.entered, self.converted)
        return x / n if n else None


def journey_sections(conn: Connection, options: ReportOptions) -> list[JourneySection]:
    """One section per journey with instances that entered in ``[since, until)`` (with ``options.campaign``,
    only the journey of that name or whose send steps used that message)."""
    out = []
    seconds = options.attribution.window_seconds
    for name in journeys_entered(conn, options.since, options.until):
        f = funnel(conn, name, options.until, since=options.since, window_seconds=seconds,
                   attribution_model=options.attribution.model.value)
        if options.campaign and options.campaign != name and not _uses(conn, name, options.campaign):
            continue
        t, c = f.members.get(MESSAGED), f.members.get(HOLDOUT)
        sec = JourneySection(
            journey=name, entered=f.entered, held_out=f.held_out, members=t.n if t else 0,
            holdout_members=c.n if c else 0, by_status=dict(sorted(f.by_status.items())),
            steps=[JourneyStepRow(step, f.kinds.get(step, ""), f.reached(step), f.sent.get(step, 0), outcomes)
                   for step, outcomes in f.steps.items()],
            exited=dict(sorted(f.exited.items(), key=lambda kv: str(kv[0]))),
            converted=f.converted.get(MESSAGED, 0), holdout_converted=f.converted.get(HOLDOUT, 0),
            attributed=f.attributed)
        if sec.entered and sec.held_out:
            sec.conversion = binary_lift(sec.converted, sec.entered, sec.holdout_converted, sec.held_out,
                                         confidence=options.confidence)
        sec.checks = experiment_checks({"conversion": (t, c)}, DEFAULT_PRIMARY,
                                       options.confidence)
        out.append(sec)
    return out


def _uses(conn: Connection, name: str, campaign: str) -> bool:
    s = JourneyStep.__table__
    return conn.execute(sa.select(s.c.id).where(s.c.journey == name, s.c.message_key.like(f"{campaign}|%"))
                        .limit(1)).first() is not None


# --------------------------------------------------------------------------------------------- renderings


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%"


def lift_text(sec: JourneySection) -> tuple[str, str]:
    """``+4.2 pts [-1.0, +9.4]`` (member-clustered) and the verdict, or why there is none."""
    m = sec.checks.metric("conversion") if sec.checks else None
    if m is None:
        if not sec.held_out:
            return "-", "no holdout"
        return "-", "too few members in an arm"
    lo, hi = m.interval
    assert sec.checks is not None
    return (f"{100 * m.difference:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            f"{sec.checks.verdict} (p={m.p_value:.2g})")


def _step_text(row: JourneyStepRow) -> str:
    outcomes = ", ".join(f"{o} {n:,}" for o, n in row.outcomes.items())
    return outcomes + (f"; sent {row.sent:,}" if row.kind == "send" else "")


def print_journeys(console: Console, sections: list[JourneySection], options: ReportOptions) -> None:
    """Per journey: the funnel table (entered, each step, converted, exited) and the holdout lift line."""
    days = options.attribution.window_seconds / 86400
    conf = f"{100 * options.confidence:g}%"
    for sec in sections:
        t = Table(title=f"Journey {sec.journey}: instances that entered in the period (converted: a purchase within "
                        f"{days:g} days of entry)")
        t.add_column("stage")
        t.add_column("instances", justify="right")
        t.add_column("detail")
        t.add_row("entered", f"{sec.entered:,}", f"{sec.members:,} members; held out {sec.held_out:,} "
                                                 f"({sec.holdout_members:,} members)")
        for row in sec.steps:
            t.add_row(f"  {row.step} ({row.kind})", f"{row.reached:,}", _step_text(row))
        t.add_row("converted", f"{sec.converted:,}", f"{_pct(sec.rate(MESSAGED))} of entered; holdout "
                  f"{sec.holdout_converted:,} ({_pct(sec.rate(HOLDOUT))}); attributed to its messages "
                  f"{sec.attributed:,}")
        t.add_row("exited", f"{sum(sec.exited.values()):,}",
                  ", ".join(f"{r or '?'} {n:,}" for r, n in sec.exited.items()) or "-")
        t.add_row("status", "", ", ".join(f"{s} {n:,}" for s, n in sec.by_status.items()))
        console.print(t)
        lift, verdict = lift_text(sec)
        naive = ""
        if sec.conversion is not None:
            lo, hi = sec.conversion.absolute_lift_ci
            naive = f"; instances as independent [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        console.print(f"  holdout lift on conversion: {lift} member-clustered {conf} CI{naive}; {verdict}")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def journeys_html(sections: list[JourneySection], options: ReportOptions) -> str:
    """The HTML report's journey section (empty when no journey had entries in the period)."""
    if not sections:
        return ""
    days = options.attribution.window_seconds / 86400
    parts = ["<section><h2>Journeys: funnel and lift against the entry holdout</h2><p class='note'>Instances that "
             f"entered in the period. Converted: a purchase within {days:g} days of entry, for messaged and held-out "
             "instances alike (intent to treat); the lift's interval is member-clustered (members who re-enter "
             "have several instances).</p>"]
    for sec in sections:
        lift, verdict = lift_text(sec)
        rows = [("entered", f"{sec.entered:,}", f"{sec.members:,} members; held out {sec.held_out:,} "
                                                f"({sec.holdout_members:,} members)")]
        rows += [(f"{r.step} ({r.kind})", f"{r.reached:,}", _step_text(r)) for r in sec.steps]
        rows += [("converted", f"{sec.converted:,}",
                  f"{_pct(sec.rate(MESSAGED))} of entered; holdout {sec.holdout_converted:,} "
                  f"({_pct(sec.rate(HOLDOUT))}); attributed to its messages {sec.attributed:,}"),
                 ("exited", f"{sum(sec.exited.values()):,}",
                  ", ".join(f"{r or '?'} {n:,}" for r, n in sec.exited.items()) or "–"),
                 ("holdout lift (conversion)", lift, verdict)]
        parts.append(f"<h3>{_e(sec.journey)}</h3><table><tr><th class='t'>stage</th><th>instances</th>"
                     "<th class='t'>detail</th></tr>" + "".join(
                         f"<tr><td class='t'>{_e(a)}</td><td>{_e(b)}</td><td class='t'>{_e(c)}</td></tr>"
                         for a, b, c in rows) + "</table>")
    return "".join(parts) + "</section>"


__all__ = ["JourneySection", "JourneyStepRow", "journey_sections", "journeys_html", "lift_text", "print_journeys"]
