"""HTML of a report's decision checks: the verdict on the primary metric, member-clustered intervals, Holm-adjusted
secondary metrics, minimum detectable effects, sample-ratio mismatches and the variant test's per-run evidence.

Kept apart from :mod:`membercare.reports.html` (the page, its charts and the descriptive tables) so that both stay
small; the figures are those of :mod:`membercare.reports.checks` and :mod:`membercare.optimise.sequential`.
"""

from __future__ import annotations

import html
import math
from typing import Any

from membercare.reports.checks import ExperimentChecks, MetricCheck
from membercare.reports.lift import HoldoutRow
from membercare.reports.variants import VariantSection

LABELS = {"conversion": "conversion rate", "visit": "visit rate", "revenue": "revenue / member"}
VERDICT_CLASS = {"works": "good", "hurts": "bad"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def amount(metric: str, x: float, currency: str) -> str:
    """A difference in its unit: percentage points for rates, money (minor units in) for revenue."""
    if math.isnan(x):
        return "–"
    if metric == "revenue":
        return f"{x / 100:+,.2f} {currency}"
    return f"{100 * x:+.2f} pts"


def interval(metric: str, ci: tuple[float, float] | None, currency: str) -> str:
    if ci is None:
        return "–"
    return f"{amount(metric, ci[0], currency)} … {amount(metric, ci[1], currency)}"


def p_text(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.2g}"


def verdict_html(checks: ExperimentChecks | None) -> str:
    if checks is None:
        return "<span class='muted'>an arm has fewer than two members</span>"
    cls = VERDICT_CLASS.get(checks.verdict, "bad" if checks.verdict.startswith("not trustworthy") else "muted")
    return f"<span class='{cls}'>{_e(checks.verdict)}</span> on {_e(LABELS[checks.primary])} (primary)"


def mde_text(m: MetricCheck, currency: str) -> str:
    text = amount(m.metric, m.mde, currency).lstrip("+") if math.isfinite(m.mde) else "–"
    return f"{text} ⚠ larger than the observed effect" if m.underpowered else text


def checks_table(checks: ExperimentChecks, currency: str) -> str:
    """One row per metric, the primary first: difference, clustered and naive intervals, p (Holm-adjusted for the
    secondary ones), MDE."""
    head = ("metric", "role", "difference", "member-clustered interval", "rows-as-independent interval",
            "design effect", "p", "Holm-adjusted p", "significant", "MDE (80 % power)")
    out = ["<table class='checks'><tr>" + "".join(f"<th class='{'t' if i < 2 else ''}'>{_e(h)}</th>"
                                                  for i, h in enumerate(head)) + "</tr>"]
    for m in checks.metrics:
        cells = [LABELS[m.metric], m.role, amount(m.metric, m.difference, currency),
                 interval(m.metric, m.interval, currency), interval(m.metric, m.naive_interval, currency),
                 "–" if math.isnan(m.design_effect) else f"{m.design_effect:.2f}", p_text(m.p_value),
                 p_text(m.adjusted_p) if m.role == "secondary" else "(judged alone)",
                 "yes" if m.significant else "no", mde_text(m, currency)]
        style = " style='font-weight:600'" if m.role == "primary" else ""
        out.append(f"<tr{style}>" + "".join(f"<td class='{'t' if i < 2 else ''}'>{_e(c)}</td>"
                                           for i, c in enumerate(cells)) + "</tr>")
    return "".join(out) + "</table>"


def srm_note(h: HoldoutRow) -> str:
    if not h.sample_ratio:
        return "<p class='note'>Sample ratio: no configured holdout rate to check against.</p>"
    bad = h.mismatched_runs
    if not bad:
        return (f"<p class='note'>Sample ratio: {len(h.sample_ratio)} run(s) checked against the configured "
                f"{h.sample_ratio[0].expected_holdout_share:.0%} holdout, no mismatch (p ≥ 0.001).</p>")
    runs = ", ".join(f"{r.occurrence} ({r.holdout:,} of {r.treated + r.holdout:,} held out, p = {r.p_value:.1e})"
                     for r in bad[:5]) + (" …" if len(bad) > 5 else "")
    return (f"<p class='bad'>Sample-ratio mismatch in {len(bad)} of {len(h.sample_ratio)} run(s) against the "
            f"configured {bad[0].expected_holdout_share:.0%} holdout: {_e(runs)}. The assignment or the logging is "
            "broken; do not trust this comparison.</p>")


def holdout_checks(holdouts: list[HoldoutRow], currency: str) -> str:
    """Per campaign: the verdict on its primary metric, the sample-ratio check and the checks table."""
    parts = ["<h3>Decision checks</h3><p class='note'>Intervals cluster rows by member (a recurring campaign holds "
             "out the same members every run); the verdict rests on the campaign's pre-declared primary metric "
             "alone; the other metrics are secondary, their p-values Holm-adjusted. MDE: the smallest difference "
             "this comparison detects with 80 % power at its current sizes; where it exceeds the observed "
             "difference, \"no effect shown\" is not evidence of no effect.</p>"]
    for h in holdouts:
        members = f"{h.treated_members:,} treated / {h.holdout_members:,} held-out members"
        parts.append(f"<h3>{_e(h.campaign)}: {verdict_html(h.checks)}</h3><p class='note'>{_e(members)} · "
                     f"{h.treated_n:,} / {h.holdout_n:,} rows</p>" + srm_note(h))
        if h.checks is not None:
            parts.append(checks_table(h.checks, currency))
        if h.arms:
            parts.append(arms_table(h, currency))
        if h.cuped:
            parts.append(cuped_table(h, currency))
        if h.cltv or h.cltv_note:
            parts.append(cltv_table(h, currency))
    return "".join(parts)


def cltv_table(h: HoldoutRow, currency: str) -> str:
    """``--cltv``: each arm's expected residual lifetime value distribution and that of its converted members."""
    if not h.cltv:
        return f"<p class='note'>Lifetime value: {_e(h.cltv_note)}</p>"

    def money(x: float | None) -> str:
        return "–" if x is None or math.isnan(x) else f"{x / 100:,.0f} {currency}"

    head = ("arm", "members", "with purchase history", "mean", "p25", "median", "p75", "p90", "mean P(alive)",
            "converted", "converters' mean", "converters' median")
    rows = "".join("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{_e(x)}</td>" for i, x in enumerate((
        a.arm, f"{a.members:,}", f"{a.with_history:,}", *(money(a.value.get(k)) for k in (
            "mean", "p25", "median", "p75", "p90")),
        "–" if math.isnan(a.mean_p_alive) else f"{100 * a.mean_p_alive:.0f} %", f"{a.converted:,}",
        money(a.converted_value.get("mean")), money(a.converted_value.get("median"))))) + "</tr>" for a in h.cltv)
    return (f"<p class='note'>Expected residual lifetime value of the targeted members ({_e(h.cltv_note)}): the "
            "arms differ only by chance; the converters' value shows whom the campaign moved.</p><table><tr>"
            + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(x)}</th>" for i, x in enumerate(head)) + "</tr>"
            + rows + "</table>")


def cuped_table(h: HoldoutRow, currency: str) -> str:
    """CUPED (``--cuped``): each metric adjusted for the pre-period covariate, beside the unadjusted lift."""
    head = ("metric", "covariate", "covariate per row (treated / holdout)", "unadjusted lift", "unadjusted interval",
            "CUPED lift", "CUPED interval", "variance reduction", "theta", "p")
    rows = []
    for c in h.cuped:
        cov = (f"{amount('revenue', c.covariate_treated, currency).lstrip('+')} / "
               f"{amount('revenue', c.covariate_control, currency).lstrip('+')}" if c.metric == "revenue"
               else f"{100 * c.covariate_treated:.1f}% / {100 * c.covariate_control:.1f}%")
        cells = (LABELS[c.metric], c.covariate, cov, amount(c.metric, c.unadjusted_difference, currency),
                 interval(c.metric, c.unadjusted_interval, currency), amount(c.metric, c.difference, currency),
                 interval(c.metric, c.interval, currency),
                 "–" if math.isnan(c.variance_reduction) else f"{100 * c.variance_reduction:.2f} %",
                 f"{c.theta:.3g}", p_text(c.p_value))
        rows.append("<tr>" + "".join(f"<td class='{'t' if i < 2 else ''}'>{_e(x)}</td>" for i, x in enumerate(cells))
                    + "</tr>")
    return (f"<p class='note'>CUPED: each member's purchases in the {h.cuped[0].pre_days} days before the run's "
            "as_of predict part of the outcome in both arms; removing that part (theta times the covariate, "
            "pooled over the arms) narrows the interval without biasing the lift. The covariate per row differs "
            "between the arms only by chance.</p><table><tr>"
            + "".join(f"<th class='{'t' if i < 2 else ''}'>{_e(x)}</th>" for i, x in enumerate(head)) + "</tr>"
            + "".join(rows) + "</table>")


def arms_table(h: HoldoutRow, currency: str) -> str:
    """Each template variant against the holdout on the primary metric, Holm-adjusted across the variants."""
    head = ("variant", "difference vs holdout", "member-clustered interval", "p", "Holm-adjusted p (across arms)",
            "significant", "MDE (80 % power)")
    metric = h.arms[0].check.metric
    rows = "".join("<tr>" + "".join(f"<td class='{'t' if i == 0 else ''}'>{_e(c)}</td>" for i, c in enumerate((
        a.arm, amount(metric, a.check.difference, currency), interval(metric, a.check.interval, currency),
        p_text(a.check.p_value), p_text(a.check.adjusted_p), "yes" if a.check.significant else "no",
        mde_text(a.check, currency)))) + "</tr>" for a in h.arms)
    return (f"<p class='note'>Variants against the holdout on {_e(LABELS[metric])}, Holm across the "
            f"{len(h.arms)} arms:</p><table><tr>"
            + "".join(f"<th class='{'t' if i == 0 else ''}'>{_e(x)}</th>" for i, x in enumerate(head)) + "</tr>"
            + rows + "</table>")


def programme_checks(checks: ExperimentChecks | None, currency: str) -> str:
    if checks is None:
        return ""
    return (f"<p>Verdict: {verdict_html(checks)} (one outcome per member, so the clustered and naive intervals "
            "agree)</p>" + checks_table(checks, currency))


def variant_evidence(v: VariantSection) -> str:
    """The run-stratified sequential test: the leader against each other variant."""
    ev = v.evidence
    if not ev:
        return ""
    head = ("leader", "against", "stratified difference", "always-valid interval", "log likelihood ratio",
            "bound")
    rows = "".join(
        "<tr>" + "".join(f"<td class='{'t' if i < 2 else ''}'>{_e(c)}</td>" for i, c in enumerate((
            p["better"], p["other"], f"{100 * p['difference']:+.2f} pts",
            f"{100 * p['interval'][0]:+.2f} … {100 * p['interval'][1]:+.2f} pts",
            f"{p['log_likelihood_ratio']:.2f}", f"{p['bound']:.2f}"))) + "</tr>" for p in ev.get("pairs", []))
    return (f"<p class='note'>Promotion test: {_e(ev.get('rule', ''))}, alpha {ev.get('alpha', 0):g}, within each "
            f"of {v.runs} run(s) (counts are not pooled across runs while the shares change); the posteriors above "
            "pool the runs and only describe.</p><table><tr>"
            + "".join(f"<th class='{'t' if i < 2 else ''}'>{_e(h)}</th>" for i, h in enumerate(head)) + "</tr>"
            + rows + "</table>")


__all__ = ["arms_table", "checks_table", "cltv_table", "cuped_table", "holdout_checks", "programme_checks",
           "variant_evidence", "verdict_html"]
