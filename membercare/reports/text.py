"""Terminal tables (Rich) of the experiment sections of a report: treated vs holdout with visit, conversion
and revenue lifts, variant tests, frequency evidence and the programme lift against the global control group.

``membercare report`` prints these after the funnel (:func:`print_experiments`); the JSON and HTML forms carry
the same figures (``Report.to_dict``, :mod:`membercare.reports.html`).
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

from membercare.optimise.lift import BinaryLift, MeanLift
from membercare.reports import FrequencySection, ProgrammeLift, Report, VariantSection
from membercare.reports.checks import ExperimentChecks
from membercare.reports.html_checks import LABELS, amount, interval, mde_text, p_text
from membercare.reports.lift import HoldoutRow


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _money(minor: float | None, currency: str) -> str:
    return "-" if minor is None or math.isnan(minor) else f"{minor / 100:,.2f} {currency}"


def points(lift: BinaryLift | None) -> str:
    """``+7.66 pts [+7.00, +8.32]`` (percentage points with the interval)."""
    if lift is None:
        return "-"
    lo, hi = lift.absolute_lift_ci
    return f"{100 * lift.absolute_lift:+.2f} pts [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def money_lift(lift: MeanLift | None, currency: str) -> str:
    if lift is None:
        return "-"
    lo, hi = lift.absolute_lift_ci
    return f"{lift.absolute_lift / 100:+,.2f} [{lo / 100:+,.2f}, {hi / 100:+,.2f}] {currency}"


def _verdict(lift: BinaryLift | MeanLift | None) -> str:
    if lift is None:
        return "-"
    return f"{'yes' if lift.significant else 'no'} (p={lift.p_value:.2g})"


def print_experiments(console: Console, rep: Report) -> None:
    """Every experiment section that has data, in report order."""
    conf = f"{100 * rep.options.confidence:g}%"
    if rep.holdouts:
        _print_holdouts(console, rep, conf)
        for h in rep.holdouts:
            _print_checks(console, h.campaign, h.checks, rep.options.currency, _srm_line(h))
            _print_arms(console, h, rep.options.currency)
            _print_cuped(console, h, rep.options.currency)
            _print_cltv(console, h, rep.options.currency)
    if rep.programme is not None:
        _print_programme(console, rep.programme, rep.options.currency, conf)
        _print_checks(console, "programme", rep.programme.checks, rep.options.currency,
                      "one outcome per member: clustered and naive intervals agree")
    for v in rep.variants:
        _print_variants(console, v)
    if rep.frequency is not None and rep.frequency.member_weeks:
        _print_frequency(console, rep.frequency, conf)


def _print_holdouts(console: Console, rep: Report, conf: str) -> None:
    cur = rep.options.currency
    days = rep.options.attribution.window_seconds / 86400
    t = Table(title=f"Treated vs holdout (intent to treat; outcomes within the {days:g}-day window after the "
                    f"planned send; {conf} CI)")
    for col in ("campaign", "arm sizes", "metric", "treated", "holdout", "absolute lift [member-clustered CI]",
                "significant", "relative"):
        t.add_column(col, justify="left" if col in ("campaign", "metric") else "right")
    for h in rep.holdouts:
        sizes = f"{h.treated_n:,} / {h.holdout_n:,}"
        for i, (key, lift) in enumerate((("visit", h.visit), ("conversion", h.conversion))):
            rel = _pct(lift.relative_lift, 1) if lift and lift.relative_lift is not None else "-"
            t.add_row(h.campaign if i == 0 else "", sizes if i == 0 else "", LABELS[key],
                      _pct(lift.treated_rate) if lift else "-", _pct(lift.control_rate) if lift else "-",
                      *_clustered(h, key, cur), rel)
        r = h.revenue
        t.add_row("", "", "revenue / member", _money(r.treated.mean, cur) if r else "-",
                  _money(r.control.mean, cur) if r else "-", *_clustered(h, "revenue", cur),
                  _pct(r.relative_lift, 1) if r and r.relative_lift is not None else "-", end_section=True)
    console.print(t)


def _clustered(h: HoldoutRow, metric: str, cur: str) -> tuple[str, str]:
    """The lift with its member-clustered interval, and whether it is significant (Holm-adjusted if secondary)."""
    m = h.checks.metric(metric) if h.checks else None
    if m is None:  # fewer than two members in an arm: no clustered variance, the naive interval says so
        naive = {"visit": h.visit, "conversion": h.conversion, "revenue": h.revenue}[metric]
        shown = money_lift(naive, cur) if isinstance(naive, MeanLift) else points(naive)
        return (shown + " (naive: too few members to cluster)" if naive else "-"), _verdict(naive)
    lo, hi = m.interval
    p = m.p_value if m.role == "primary" else m.adjusted_p
    return (f"{amount(metric, m.difference, cur)} [{amount(metric, lo, cur)}, {amount(metric, hi, cur)}]",
            f"{'yes' if m.significant else 'no'} (p={p_text(p)}{', primary' if m.role == 'primary' else ''})")


def _print_programme(console: Console, p: ProgrammeLift, cur: str, conf: str) -> None:
    t = Table(title="Programme lift: members the marketing programme selected vs the global control group "
                    f"(purchases from their first planned message to the end of the period; {conf} CI)")
    for col in ("metric", "marketed", "global control", "absolute lift", "significant"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    t.add_row("members", f"{p.treated_n:,}", f"{p.control_n:,}", "", "")
    c = p.conversion
    t.add_row("conversion rate", _pct(c.treated_rate) if c else "-", _pct(c.control_rate) if c else "-",
              points(c), _verdict(c))
    r = p.revenue
    t.add_row("revenue / member", _money(r.treated.mean, cur) if r else "-",
              _money(r.control.mean, cur) if r else "-", money_lift(r, cur), _verdict(r))
    console.print(t)


def _print_variants(console: Console, v: VariantSection) -> None:
    t = Table(title=f"Variants of {v.campaign} (goal: {v.goal}; floor {v.floor:.0%}, promote at "
                    f"P(best) >= {v.promote_at:.0%}; latest run {v.latest_occurrence or '-'})")
    for col in ("variant", "sends", "clicks", "conversions", "posterior Beta(a, b)", "mean", "95% credible",
                "P(best)", "latest share", "next share"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for row in v.variants:
        lo, hi = row.credible_interval
        t.add_row(row.name, f"{row.sends:,}", f"{row.clicks:,}", f"{row.conversions:,}",
                  f"({row.posterior_alpha:g}, {row.posterior_beta:g})", _pct(row.posterior_mean),
                  f"{_pct(lo)} .. {_pct(hi)}", f"{row.p_best:.3f}",
                  _pct(row.planned_share if row.planned_share is not None else row.latest_share, 1),
                  _pct(row.next_share, 1))
    console.print(t)
    state = (f"winner: {v.winner} (promoted)" if v.winner else "no winner yet")
    if v.promoted:
        state += f"; planning promoted {v.promoted}"
    if v.plan_reason:
        state += f"; latest shares: {v.plan_reason}"
    console.print(f"  {state}" + "".join(f"; {n}" for n in v.notes))
    ev = v.evidence
    if ev:
        console.print(f"  promotion test: {ev.get('rule', '')}, alpha {ev.get('alpha', 0):g}, within each of {v.runs} "
                      "run(s) (not pooled across runs; the posteriors above pool them and only describe)")
        for p in ev.get("pairs", []):
            lo, hi = p["interval"]
            console.print(f"    {p['better']} vs {p['other']}: {100 * p['difference']:+.2f} pts "
                          f"[{100 * lo:+.2f}, {100 * hi:+.2f}] always-valid; log LR {p['log_likelihood_ratio']:.2f} "
                          f"(bound {p['bound']:.2f})")


def _srm_line(h: HoldoutRow) -> str:
    if not h.sample_ratio:
        return "sample ratio: no configured holdout rate to check against"
    bad = h.mismatched_runs
    share = h.sample_ratio[0].expected_holdout_share
    if not bad:
        return f"sample ratio: {len(h.sample_ratio)} run(s) match the configured {share:.0%} holdout (p >= 0.001)"
    runs = ", ".join(f"{r.occurrence} {r.holdout:,}/{r.treated + r.holdout:,} p={r.p_value:.1e}" for r in bad[:5])
    return (f"SAMPLE-RATIO MISMATCH in {len(bad)} of {len(h.sample_ratio)} run(s) against the configured {share:.0%} "
            f"holdout ({runs}): the assignment or logging is broken, do not trust this comparison")


def _print_arms(console: Console, h: HoldoutRow, cur: str) -> None:
    if not h.arms:
        return
    metric = h.arms[0].check.metric
    t = Table(title=f"{h.campaign}: variants vs holdout on {LABELS[metric]}, Holm across {len(h.arms)} arms")
    for col in ("variant", "difference", "member-clustered CI", "p", "Holm p", "significant", "MDE"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for a in h.arms:
        m = a.check
        t.add_row(a.arm, amount(metric, m.difference, cur), interval(metric, m.interval, cur), p_text(m.p_value),
                  p_text(m.adjusted_p), "yes" if m.significant else "no", mde_text(m, cur))
    console.print(t)


def _print_cuped(console: Console, h: HoldoutRow, cur: str) -> None:
    """CUPED (``--cuped``): each adjusted lift beside the unadjusted member-clustered one."""
    if not h.cuped:
        return
    t = Table(title=f"{h.campaign}: CUPED, adjusted for the {h.cuped[0].pre_days} days before each run's as_of "
                    "(pre-period covariate; member-clustered CIs)")
    for col in ("metric", "covariate", "covariate per row (treated / holdout)", "unadjusted lift [CI]",
                "CUPED lift [CI]", "variance reduction", "theta", "p"):
        t.add_column(col, justify="left" if col in ("metric", "covariate") else "right")
    for c in h.cuped:
        cov = (f"{amount('revenue', c.covariate_treated, cur).lstrip('+')} / "
               f"{amount('revenue', c.covariate_control, cur).lstrip('+')}" if c.metric == "revenue"
               else f"{_pct(c.covariate_treated, 1)} / {_pct(c.covariate_control, 1)}")
        t.add_row(LABELS[c.metric], c.covariate, cov,
                  f"{amount(c.metric, c.unadjusted_difference, cur)} {interval(c.metric, c.unadjusted_interval, cur)}",
                  f"{amount(c.metric, c.difference, cur)} {interval(c.metric, c.interval, cur)}",
                  _pct(c.variance_reduction, 2), f"{c.theta:.3g}", p_text(c.p_value))
    console.print(t)


def _print_cltv(console: Console, h: HoldoutRow, cur: str) -> None:
    """``--cltv``: the arms' expected residual lifetime value, and that of the members who converted."""
    if not h.cltv:
        if h.cltv_note:
            console.print(f"  {h.campaign}: {h.cltv_note}")
        return
    t = Table(title=f"{h.campaign}: expected residual lifetime value per arm ({h.cltv_note})")
    for col in ("arm", "members", "with history", "mean", "p25", "median", "p75", "p90", "mean P(alive)",
                "converted", "converters' mean", "converters' median"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    for a in h.cltv:
        v, c = a.value, a.converted_value
        t.add_row(a.arm, f"{a.members:,}", f"{a.with_history:,}", *(_money(v.get(k), cur) for k in (
            "mean", "p25", "median", "p75", "p90")), _pct(a.mean_p_alive, 0), f"{a.converted:,}",
                  _money(c.get("mean"), cur), _money(c.get("median"), cur))
    console.print(t)


def _print_checks(console: Console, name: str, checks: ExperimentChecks | None, cur: str, note: str) -> None:
    """The decision checks of one comparison: verdict on the primary metric, member-clustered intervals,
    Holm-adjusted secondary metrics and the minimum detectable effect (80 % power)."""
    if checks is None:
        console.print(f"  {name}: no decision (an arm has fewer than two members); {note}")
        return
    t = Table(title=f"{name}: {checks.verdict} on {LABELS[checks.primary]} (primary); {note}")
    for col in ("metric", "role", "difference", "member-clustered CI", "naive CI", "deff", "p", "Holm p",
                "significant", "MDE"):
        t.add_column(col, justify="left" if col in ("metric", "role") else "right")
    for m in checks.metrics:
        t.add_row(LABELS[m.metric], m.role, amount(m.metric, m.difference, cur), interval(m.metric, m.interval, cur),
                  interval(m.metric, m.naive_interval, cur),
                  "-" if math.isnan(m.design_effect) else f"{m.design_effect:.2f}", p_text(m.p_value),
                  p_text(m.adjusted_p) if m.role == "secondary" else "alone", "yes" if m.significant else "no",
                  mde_text(m, cur))
    console.print(t)


def _print_frequency(console: Console, f: FrequencySection, conf: str) -> None:
    complaint = "" if f.max_complaint_rate is None else f", complaints <= {_pct(f.max_complaint_rate, 2)}"
    t = Table(title=f"Frequency: opt-outs by marketing messages received per member per week "
                    f"({f.member_weeks:,} member-weeks, {f.messages:,} messages; Wilson {conf} CI)",
              box=box.SIMPLE_HEAD)
    # Rate and interval share a cell, so the table keeps every column whole in an 80-column terminal.
    for col in ("msgs/wk", "member-wks", "unsub. % (95% CI)", "complaint % (CI)", "unsub./1k"):
        t.add_column(col, justify="left" if col == "msgs/wk" else "right", no_wrap=True)

    def rate(x: float, ci: tuple[float, float], digits: int) -> str:
        return f"{100 * x:.{digits}f} ({100 * ci[0]:.{digits}f}-{100 * ci[1]:.{digits}f})"

    for b in f.buckets:
        if not b.member_weeks:
            continue
        t.add_row(b.label, f"{b.member_weeks:,}", rate(b.unsubscribe_rate, b.unsubscribe_rate_ci, 3),
                  rate(b.complaint_rate, b.complaint_rate_ci, 3), f"{b.unsubscribes_per_1000_messages:.2f}")
    console.print(t)
    safe = f"none ({f.why_none_safe()})" if f.highest_safe is None else str(f.highest_safe)
    console.print(f"  highest weekly frequency whose upper 95% bound keeps unsubscribes <= "
                  f"{_pct(f.max_unsubscribe_rate, 2)}{complaint} (buckets of >= {f.min_member_weeks} "
                  f"member-weeks): {safe}")
