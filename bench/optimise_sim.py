"""Simulation benchmark of the optimisation strategies (issue 9): a learning curve over a recurring campaign.

A simulated shop whose members have *hidden* truths:

* an engagement probability per channel (email, SMS, push), drawn around their group's rates (age group x
  segment); their stated channel preference matches their truly best channel only some of the time;
* a best hour of the day (their group's typical hour plus personal noise); a message engages less the
  further from that hour it arrives;
* a shared appeal of each template variant (one planted winner).

Members consent to / are reachable on a random subset of channels. A recurring campaign runs ``--rounds``
times. Each *arm* is the same population under one strategy, with independent randomness:

* ``static``: first eligible channel in the member's preference order, the campaign's fixed hour,
  variants uniform (what a shop does without optimisation);
* ``bandit``: static routing and time, variants allocated by Thompson sampling (:mod:`membercare.optimise.bandit`),
  members assigned to variants by :func:`membercare.optimise.assignment.assign_variants`;
* ``best_channel``: channel by :func:`membercare.optimise.channel_choice.best_engagement`;
* ``best_time``: each member's best allowed hour from :func:`membercare.optimise.send_time.best_hours`;
* ``optimised``: all three together;
* ``--honest`` adds ``best_fixed_rule`` (group's best channel and usual hour, variant B) and two exploring learners
  (issue 17): ``causal_time`` (10 % of send hours randomised, the group's hour learned from inverse-propensity
  weighted outcomes of the hours messages were *sent* at) and ``causal`` (the same for channels too, plus the
  bandit), and evaluates every arm's policy off-policy from the ``causal`` arm's logs (IPS, SNIPS, DR) against the
  simulator's exact truth.

Reported: engagement (click) and conversion rate per round and arm (the learning curve), the lift of each arm
over ``static`` in the last ``--final-rounds`` rounds with 95 % intervals
(:func:`membercare.optimise.lift.binary_lift`), and whether the bandit recovers the planted variant winner.
Pure numpy: no database, no providers; the integration step reruns the same scenario through the sandbox.

    .venv/bin/python bench/optimise_sim.py [--members 10000] [--rounds 20] [--seed 7] [--out bench/results]
    .venv/bin/python bench/optimise_sim.py --honest [--explore 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from membercare.optimise import assignment, bandit, causal, channel_choice, offpolicy, send_time
from membercare.optimise.lift import binary_lift

CHANNELS = ("email", "sms", "push")
VARIANTS = ("A", "B", "C")
VARIANT_APPEAL = {"A": 1.00, "B": 1.25, "C": 1.10}  # planted winner: B
VARIANT_CONVERSION = {"A": 0.10, "B": 0.12, "C": 0.11}  # P(order | click)
PLANTED_WINNER = "B"
STATIC_HOUR = 10
ALLOWED = send_time.AllowedHours(9, 21)
ARMS = ("static", "bandit", "best_channel", "best_time", "optimised")
HONEST_ARMS = (*ARMS, "best_fixed_rule", "causal_time", "causal")
HOURS_ALLOWED = np.flatnonzero(ALLOWED.mask())


@dataclass
class Population:
    group: np.ndarray  # (n,) int code: age group x segment
    n_groups: int
    theta: np.ndarray  # (n, 3) hidden engagement probability per channel at the best hour
    eligible: np.ndarray  # (n, 3) consented and reachable
    preference: np.ndarray  # (n, 3) stated channel order (indices), most preferred first
    best_hour: np.ndarray  # (n,) hidden local best hour
    history_member: np.ndarray  # past purchase events before round 1 (member index, local hour)
    history_hour: np.ndarray
    group_rates: np.ndarray | None = None  # (groups, 3) the groups' channel rates (for the best fixed rule)
    group_hour: np.ndarray | None = None  # (groups,) the groups' usual hour (for the best fixed rule)
    shop_hour: int = STATIC_HOUR  # the static send hour

    @property
    def n(self) -> int:
        return self.group.size


def make_population(n: int, rng: np.random.Generator, honest: bool = False) -> Population:
    """The simulated members. ``honest`` (issue 17): the stated channel preference is right 65 % of the time
    (35 % otherwise), past purchases happen at hours that carry no signal of the best hour (uniform over the
    allowed hours), and the static arm sends at the single hour that suits the members best (a shop that has
    sent for years has found it) instead of 10:00."""
    ages, segments = 4, 3
    n_groups = ages * segments
    group = rng.integers(0, n_groups, n)
    # Group base rates per channel: younger groups lean to push, older to email (plus noise).
    age = np.arange(n_groups) // segments
    base = np.stack([
        0.06 + 0.03 * age,  # email
        0.10 - 0.01 * age,  # sms
        0.16 - 0.035 * age,  # push
    ], axis=1) * rng.uniform(0.8, 1.2, (n_groups, 3))
    kappa = 6.0
    mu = base[group]
    theta = rng.beta(kappa * mu, kappa * (1 - mu))
    eligible = rng.random((n, 3)) < np.array([0.90, 0.55, 0.50])
    eligible[~eligible.any(axis=1), 0] = True
    # Stated preference: 35 % of members put their truly best channel first, the rest an arbitrary order.
    random_order = np.argsort(rng.random((n, 3)), axis=1)
    true_order = np.argsort(-theta, axis=1)
    knows = rng.random(n) < (0.65 if honest else 0.35)
    preference = np.where(knows[:, None], true_order, random_order)
    typical = np.array([8, 12, 19, 21, 13, 20, 18, 12, 9, 20, 17, 11])[:n_groups]
    best_hour = np.mod(np.round(typical[group] + rng.normal(0, 2.0, n)), 24).astype(np.int64)
    k = rng.poisson(1.5, n)
    hist_member = np.repeat(np.arange(n), k)
    if honest:
        hist_hour = rng.integers(ALLOWED.start, ALLOWED.end, hist_member.size)
        hours = np.arange(ALLOWED.start, ALLOWED.end)  # quiet hours (21:00-09:00) hold for every arm
        shop_hour = int(hours[np.argmax([timing_factor(np.full(n, h), best_hour).mean() for h in hours])])
    else:
        hist_hour = _activity_hours(best_hour[hist_member], rng)
        shop_hour = STATIC_HOUR
    return Population(group, n_groups, theta, eligible, preference, best_hour, hist_member, hist_hour,
                      base, np.clip(typical, ALLOWED.start, ALLOWED.end - 1), shop_hour)


def _activity_hours(best: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hours at which members are active (open, click, buy): around their best hour."""
    return np.mod(np.round(best + rng.normal(0, 1.5, best.size)), 24).astype(np.int64)


def timing_factor(send_hour: np.ndarray, best_hour: np.ndarray) -> np.ndarray:
    d = np.abs(send_hour - best_hour)
    d = np.minimum(d, 24 - d)
    return 0.45 + 0.55 * np.exp(-0.5 * (d / 2.0) ** 2)


def static_channel(pop: Population) -> np.ndarray:
    ok = np.take_along_axis(pop.eligible, pop.preference, axis=1)
    first = ok.argmax(axis=1)
    return pop.preference[np.arange(pop.n), first]


@dataclass
class ArmState:
    name: str
    use_bandit: bool
    use_channel: bool
    use_time: bool
    rng: np.random.Generator
    sends: np.ndarray  # (n, 3) per member x channel
    clicks: np.ndarray
    variant_counts: dict = field(default_factory=lambda: {v: [0, 0] for v in VARIANTS})
    variant_runs: list = field(default_factory=list)  # per round: [VariantStats per variant], for the promotion test
    event_member: list = field(default_factory=list)
    event_hour: list = field(default_factory=list)
    curve: list = field(default_factory=list)
    bandit_reports: list = field(default_factory=list)
    final_clicks: int = 0
    final_conversions: int = 0
    final_sends: int = 0
    fixed_rule: bool = False  # the best fixed rule: group's best channel, group's usual hour, variant B
    honest: bool = False  # clicks happen at the hour the message was sent, not around the hidden best hour
    explore: float = 0.0  # causal arms: the exploration rate of channel and hour (epsilon-greedy, logged)
    logs: list = field(default_factory=list)  # causal arms, per round: the decision log (see run_round)
    last: dict = field(default_factory=dict)  # the last round's actions (channel, hour, variant), for off-policy checks


def run_round(arm: ArmState, pop: Population, rnd: int, final: bool) -> None:
    n = pop.n
    rng = arm.rng
    ids = np.arange(1, n + 1)
    occurrence = f"round-{rnd:02d}"
    # Variants.
    if arm.fixed_rule:
        shares = {v: 1.0 if v == PLANTED_WINNER else 0.0 for v in VARIANTS}
    elif arm.use_bandit:
        # Promotion is final, as in the planner (membercare.optimise.variants): the winner keeps all traffic.
        promoted = next((r for r in arm.bandit_reports if r.winner), None)
        report = promoted or bandit.allocate(
            bandit.stats_from_mapping({v: tuple(c) for v, c in arm.variant_counts.items()}),
            goal="click", seed=bandit.seed_for("sim", occurrence), runs=arm.variant_runs)
        shares = report.shares
        arm.bandit_reports.append(report)
    else:
        shares = bandit.uniform_shares(VARIANTS)
    variant = assignment.assign_variants(ids, "sim", occurrence, shares)
    # Channel.
    if arm.fixed_rule and pop.group_rates is not None:
        channel = np.where(pop.eligible, pop.group_rates[pop.group], -1.0).argmax(axis=1)
    elif arm.explore and arm.use_channel:
        channel, p_channel, greedy_channel = causal_channels(arm, pop)
    elif arm.use_channel:
        choice = channel_choice.best_engagement(
            channel_choice.EngagementCounts(arm.sends, arm.clicks), pop.group, pop.eligible,
            rng=rng, n_groups=pop.n_groups, preferred=static_channel(pop))
        channel = choice.channel
    else:
        channel = static_channel(pop)
    # Send hour.
    if arm.fixed_rule and pop.group_hour is not None:
        hour = pop.group_hour[pop.group]
    elif arm.explore and arm.use_time:
        hour, p_hour, greedy_hour = causal_hours(arm, pop)
    elif arm.use_time:
        members = np.concatenate([pop.history_member, np.asarray(arm.event_member, np.int64)])
        hours = np.concatenate([pop.history_hour, np.asarray(arm.event_hour, np.int64)])
        H = send_time.hour_histograms(n, members, hours)
        hour = send_time.best_hours(H, pop.group, n_segments=pop.n_groups, allowed=ALLOWED).hour
    else:
        hour = np.full(n, pop.shop_hour)
    appeal = np.array([VARIANT_APPEAL[v] for v in variant])
    p_click = np.clip(pop.theta[np.arange(n), channel] * timing_factor(hour, pop.best_hour) * appeal, 0, 1)
    click = rng.random(n) < p_click
    p_conv = np.array([VARIANT_CONVERSION[v] for v in variant])
    conv = click & (rng.random(n) < p_conv)
    if arm.explore:
        if not arm.use_channel:  # static routing: deterministic, propensity 1
            p_channel, greedy_channel = np.ones(n), channel
        arm.logs.append({"channel": channel, "hour": hour, "p_channel": p_channel, "p_hour": p_hour,
                         "greedy_channel": greedy_channel, "greedy_hour": greedy_hour, "click": click,
                         "variant": variant})
    arm.last = {"channel": channel, "hour": hour, "variant": variant}
    # Feedback.
    np.add.at(arm.sends, (np.arange(n), channel), 1)
    np.add.at(arm.clicks, (np.arange(n), channel), click.astype(np.int64))
    this_run = []
    for v in sorted(VARIANTS):
        sel = variant == v
        arm.variant_counts[v][0] += int(sel.sum())
        arm.variant_counts[v][1] += int(click[sel].sum())
        this_run.append(bandit.VariantStats(v, int(sel.sum()), int(click[sel].sum())))
    arm.variant_runs.append(this_run)
    clicked = np.flatnonzero(click)
    arm.event_member.extend(clicked.tolist())
    # Honest: a click happens when the message is read, right after it arrives, so its hour is the send hour.
    click_hours = hour[clicked] if arm.honest else _activity_hours(pop.best_hour[clicked], rng)
    arm.event_hour.extend(np.asarray(click_hours).tolist())
    arm.curve.append({
        "round": rnd, "engagement_rate": float(click.mean()), "conversion_rate": float(conv.mean()),
        "share_on_best_channel": float((channel == np.where(pop.eligible, pop.theta, -1).argmax(axis=1)).mean()),
        "mean_hour_distance": float(np.mean(np.minimum(np.abs(hour - pop.best_hour),
                                                       24 - np.abs(hour - pop.best_hour)))),
        "variant_shares": {k: round(float(x), 4) for k, x in shares.items()},
    })
    if final:
        arm.final_sends += n
        arm.final_clicks += int(click.sum())
        arm.final_conversions += int(conv.sum())


def causal_hours(arm: ArmState, pop: Population) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exploring learner's send hours: per group, the allowed hour with the highest inverse-propensity weighted
    click rate of the messages *sent* at that hour (membercare.optimise.causal.hour_rates) over all rounds so far
    (the shop's hour until there is evidence), and a uniformly random allowed hour with probability epsilon."""
    if arm.logs:
        g = np.concatenate([pop.group for _ in arm.logs])
        h = np.concatenate([lg["hour"] for lg in arm.logs])
        r = np.concatenate([lg["click"] for lg in arm.logs])
        mu = np.concatenate([lg["p_hour"] for lg in arm.logs])
        rates = causal.hour_rates(g, h, r, mu, pop.n_groups)
        best = causal.best_hours(rates, ALLOWED)
    else:
        best = np.full(pop.n_groups, pop.shop_hour)
    greedy = np.searchsorted(HOURS_ALLOWED, best[pop.group])
    ex = causal.explore(greedy, np.ones((pop.n, HOURS_ALLOWED.size), bool), arm.explore, arm.rng)
    return HOURS_ALLOWED[ex.choice], ex.propensity, HOURS_ALLOWED[greedy]


def causal_channels(arm: ArmState, pop: Population) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exploring learner's channels: the member's Beta posterior (channel_choice.posterior_params, their own
    history and stated preference) around their group's inverse-propensity weighted channel rates, greedy, and a
    uniformly random eligible channel with probability epsilon."""
    if arm.logs:
        g = np.concatenate([pop.group for _ in arm.logs])
        c = np.concatenate([lg["channel"] for lg in arm.logs])
        r = np.concatenate([lg["click"] for lg in arm.logs])
        mu = np.concatenate([lg["p_channel"] for lg in arm.logs])
        rates = causal.option_rates(g, c, r, mu, pop.n_groups, len(CHANNELS)).rate
    else:
        rates = np.full((pop.n_groups, len(CHANNELS)), 0.05)
    alpha, beta = channel_choice.posterior_params(channel_choice.EngagementCounts(arm.sends, arm.clicks), pop.group,
                                                  rates, preferred=static_channel(pop))
    greedy = np.where(pop.eligible, alpha / (alpha + beta), -np.inf).argmax(axis=1)
    ex = causal.explore(greedy, pop.eligible, arm.explore, arm.rng)
    return ex.choice, ex.propensity, greedy


def simulate(members: int, rounds: int, seed: int, final_rounds: int, honest: bool = False,
             explore: float = causal.DEFAULT_EXPLORATION) -> dict:
    root = np.random.default_rng(seed)
    pop = make_population(members, root, honest)
    names = HONEST_ARMS if honest else ARMS
    seeds = root.integers(0, 2**63 - 1, len(names))
    flags = {"static": (0, 0, 0), "bandit": (1, 0, 0), "best_channel": (0, 1, 0), "best_time": (0, 0, 1),
             "optimised": (1, 1, 1), "best_fixed_rule": (0, 0, 0), "causal_time": (0, 0, 1), "causal": (1, 1, 1)}
    arms = [ArmState(a, *map(bool, flags[a]), np.random.default_rng(int(s)),
                     np.zeros((members, 3), np.int64), np.zeros((members, 3), np.int64),
                     fixed_rule=a == "best_fixed_rule", honest=honest,
                     explore=explore if a.startswith("causal") else 0.0)
            for a, s in zip(names, seeds, strict=True)]
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        for arm in arms:
            run_round(arm, pop, rnd, final=rnd > rounds - final_rounds)
    elapsed = time.perf_counter() - t0
    static = arms[0]
    lifts = {}
    for arm in arms[1:]:
        eng = binary_lift(arm.final_clicks, arm.final_sends, static.final_clicks, static.final_sends)
        conv = binary_lift(arm.final_conversions, arm.final_sends, static.final_conversions, static.final_sends)
        lifts[arm.name] = {"engagement": _lift_summary(eng), "conversion": _lift_summary(conv)}
    opt = next(a for a in arms if a.name == "optimised")
    fixed = next((a for a in arms if a.fixed_rule), None)
    if fixed is not None:
        for arm in arms:
            if arm.name in ("optimised", "causal_time", "causal"):
                eng = binary_lift(arm.final_clicks, arm.final_sends, fixed.final_clicks, fixed.final_sends)
                conv = binary_lift(arm.final_conversions, arm.final_sends, fixed.final_conversions, fixed.final_sends)
                lifts[f"{arm.name} vs best_fixed_rule"] = {"engagement": _lift_summary(eng),
                                                           "conversion": _lift_summary(conv)}
    ope = offpolicy_check(arms, pop, final_rounds) if any(a.logs for a in arms) else None
    last = opt.bandit_reports[-1]
    promoted_round = next((i + 1 for i, r in enumerate(opt.bandit_reports) if r.winner), None)
    leader = last.winner or max(last.variants, key=lambda v: v.posterior_mean).name
    return {
        "config": {"members": members, "rounds": rounds, "seed": seed, "final_rounds": final_rounds,
                   "variant_appeal": VARIANT_APPEAL, "planted_winner": PLANTED_WINNER,
                   "static_hour": pop.shop_hour, "allowed_hours": [ALLOWED.start, ALLOWED.end], "honest": honest,
                   "explore": explore,
                   "arms": list(names)},
        "elapsed_seconds": round(elapsed, 2),
        "curves": {a.name: a.curve for a in arms},
        "final": {a.name: {"sends": a.final_sends,
                           "engagement_rate": a.final_clicks / a.final_sends,
                           "conversion_rate": a.final_conversions / a.final_sends} for a in arms},
        "lift_over_static": lifts,
        "offpolicy": ope,
        "variant_test": {
            "winner": last.winner, "promoted_in_round": promoted_round, "leader": leader,
            "recovered_planted_winner": leader == PLANTED_WINNER,
            "report": last.to_dict(),
        },
    }


def true_click_probability(pop: Population, member: np.ndarray, channel: np.ndarray, hour: np.ndarray,
                           variant: np.ndarray) -> np.ndarray:
    appeal = np.array([VARIANT_APPEAL[v] for v in variant])
    return np.clip(pop.theta[member, channel] * timing_factor(hour, pop.best_hour[member]) * appeal, 0, 1)


def offpolicy_check(arms: list[ArmState], pop: Population, final_rounds: int) -> dict:
    """Evaluate every arm's last-round policy (its channel and hour per member) off-policy from the ``causal`` arm's
    logged decisions of all rounds (membercare.optimise.offpolicy: IPS, SNIPS and DR with a
    separable group x channel x hour outcome model; intervals clustered by member), and compare with the truth: the
    exact expected click rate of that policy on the logged rows (same members, same variants), and with the arm's
    realised rate in those rounds (its own variant mix)."""
    logger = next(a for a in arms if a.name == "causal")
    logs = logger.logs
    n = pop.n
    member = np.tile(np.arange(n), len(logs))
    g = pop.group[member]
    c = np.concatenate([lg["channel"] for lg in logs])
    h = np.concatenate([lg["hour"] for lg in logs])
    r = np.concatenate([lg["click"] for lg in logs]).astype(float)
    v = np.concatenate([lg["variant"] for lg in logs])
    mu = np.concatenate([lg["p_channel"] * lg["p_hour"] for lg in logs])
    # Outcome model for DR: group x channel rate times the group's relative hour curve (both inverse-propensity
    # weighted rates of the logged data).
    rc = causal.option_rates(g, c, r, np.concatenate([lg["p_channel"] for lg in logs]), pop.n_groups, 3).rate
    rh = causal.hour_rates(g, h, r, np.concatenate([lg["p_hour"] for lg in logs]), pop.n_groups)
    rel = rh.rate / np.maximum((rh.rate * ALLOWED.mask()).sum(axis=1, keepdims=True) / ALLOWED.mask().sum(), 1e-9)

    def q(chan: np.ndarray, hr: np.ndarray) -> np.ndarray:
        return rc[g, chan] * rel[g, hr]

    out = {}
    for arm in arms:
        if arm.explore:
            # An exploring arm is evaluated by its greedy part (what it would do with exploration switched off),
            # round by round: each round's greedy choice was fixed before that round's outcomes. (Its last-round
            # greedy policy was learned from these very logs, so scoring it on them would be optimistic.)
            tc = np.concatenate([lg["greedy_channel"] for lg in arm.logs])
            th = np.concatenate([lg["greedy_hour"] for lg in arm.logs])
        else:
            tc, th = arm.last["channel"][member], arm.last["hour"][member]
        pi = ((c == tc) & (h == th)).astype(float)
        qt = q(tc, th)
        truth = float(true_click_probability(pop, member, tc, th, v).mean())
        est = offpolicy.evaluate(r, mu, pi, q_logged=q(c, h), q_target=qt, cluster=member)
        out[arm.name] = {"truth": truth, "greedy_part": bool(arm.explore),
                         "realised": arm.final_clicks / arm.final_sends if arm.final_sends else None,
                         **{k: e.to_dict() for k, e in est.items()}}
    return out


def _lift_summary(r) -> dict:
    return {"absolute": r.absolute_lift, "absolute_ci": list(r.absolute_lift_ci),
            "relative": r.relative_lift, "relative_ci": list(r.relative_lift_ci) if r.relative_lift_ci else None,
            "p_value": r.p_value, "significant": r.significant}


def to_markdown(res: dict) -> str:
    cfg = res["config"]
    arms = cfg["arms"]
    lines = [f"# Optimisation simulation: {cfg['members']:,} members, {cfg['rounds']} rounds, seed {cfg['seed']}", "",
             "Engagement (click) rate per round, %:", "",
             "| round | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for i in range(cfg["rounds"]):
        row = [f"{100 * res['curves'][a][i]['engagement_rate']:.2f}" for a in arms]
        lines.append(f"| {i + 1} | " + " | ".join(row) + " |")
    lines += ["", "Conversion rate per round, %:", "", "| round | " + " | ".join(arms) + " |",
              "|---|" + "---|" * len(arms)]
    for i in range(cfg["rounds"]):
        row = [f"{100 * res['curves'][a][i]['conversion_rate']:.3f}" for a in arms]
        lines.append(f"| {i + 1} | " + " | ".join(row) + " |")
    lines += ["", f"Lift over static routing in the last {cfg['final_rounds']} rounds (95 % CI):", "",
              "| strategy | engagement, points | engagement, relative | conversion, points | conversion, relative |",
              "|---|---|---|---|---|"]
    for arm, lift in res["lift_over_static"].items():
        e, c = lift["engagement"], lift["conversion"]
        lines.append(
            f"| {arm} | {100 * e['absolute']:+.2f} [{100 * e['absolute_ci'][0]:+.2f}, {100 * e['absolute_ci'][1]:+.2f}]"
            f" | {100 * e['relative']:+.1f} % [{100 * e['relative_ci'][0]:+.1f}, {100 * e['relative_ci'][1]:+.1f}]"
            f" | {100 * c['absolute']:+.3f} [{100 * c['absolute_ci'][0]:+.3f}, {100 * c['absolute_ci'][1]:+.3f}]"
            f" | {100 * c['relative']:+.1f} % [{100 * c['relative_ci'][0]:+.1f}, {100 * c['relative_ci'][1]:+.1f}] |")
    if res.get("offpolicy"):
        lines += ["", "Off-policy check: each arm's last-round channel and hour policy (an exploring arm's greedy "
                  f"part), estimated from the causal arm's logs of all {cfg['rounds']} rounds (95 % CI, clustered by "
                  "member) "
                  f"against its true expected rate on those rows, and its realised rate in the last "
                  f"{cfg['final_rounds']} rounds (own variant mix and, for exploring arms, exploration), %:", "",
                  "| arm | truth | IPS | SNIPS | DR | effective n | realised |", "|---|---|---|---|---|---|---|"]
        for arm, o in res["offpolicy"].items():
            cells = [f"{100 * o[k]['value']:.2f} [{100 * o[k]['ci'][0]:.2f}, {100 * o[k]['ci'][1]:.2f}]"
                     for k in ("ips", "snips", "dr")]
            lines.append(f"| {arm} | {100 * o['truth']:.2f} | " + " | ".join(cells)
                         + f" | {o['ips']['effective_n']:,.0f} | {100 * o['realised']:.2f} |")
    vt = res["variant_test"]
    lines += ["", f"Variant test (optimised arm): planted winner {cfg['planted_winner']}, "
              f"promoted winner {vt['winner']} in round {vt['promoted_in_round']}, "
              f"recovered: {'yes' if vt['recovered_planted_winner'] else 'NO'}", "",
              "| variant | sends | clicks | posterior mean | 95 % credible interval | P(best) | share |",
              "|---|---|---|---|---|---|---|"]
    for v in vt["report"]["variants"]:
        lo, hi = v["credible_interval"]
        lines.append(f"| {v['name']} | {v['sends']:,} | {v['successes']:,} | {v['posterior_mean']:.4f} | "
                     f"[{lo:.4f}, {hi:.4f}] | {v['p_best']:.3f} | {v['share']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--final-rounds", type=int, default=5, help="rounds pooled for the final lift")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--honest", action="store_true",
                    help="issue 17's honest scenario: no hidden best-hour signal in event hours, informative stated "
                         "preference, the shop's best single hour for static, and a best-fixed-rule arm")
    ap.add_argument("--explore", type=float, default=causal.DEFAULT_EXPLORATION,
                    help="exploration rate of the causal arms (honest scenario)")
    args = ap.parse_args(argv)
    if not 0 < args.final_rounds <= args.rounds:
        ap.error("--final-rounds must be between 1 and --rounds")
    res = simulate(args.members, args.rounds, args.seed, args.final_rounds, args.honest, args.explore)
    md = to_markdown(res)
    print(md)
    print(f"simulated {args.members:,} members x {args.rounds} rounds x {len(res['config']['arms'])} arms in "
          f"{res['elapsed_seconds']} s")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "optimise_sim_honest" if args.honest else "optimise_sim"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(md)
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
