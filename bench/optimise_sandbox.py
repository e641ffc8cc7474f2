"""Evidence benchmark (issue 9 item 7): the optimisation strategies through the real pipeline and the sandbox.

A generated shop (``membercare.data.generator``) whose members have a *hidden truth*
(:mod:`membercare.sandbox.simulation`): a truly best channel (their stated preference names it only about a
third of the time), a best local hour, and a shared appeal of three template variants with a planted
winner. A weekly campaign runs ``--rounds`` times in simulated time for each *arm*, each arm on its own
copy of the same shop and the same truth:

* ``static``: ``optimise.routing: preference``, ``send_time: immediate``, variants a/b/c at fixed equal
  shares (``floor`` = 1/3, so the bandit cannot move them): what a shop does without optimisation;
* ``optimised``: ``routing: best_engagement``, ``send_time: best_hour`` and the variant bandit
  (``floor`` 0.05, ``promote_at`` 0.95);
* optionally ``channel``, ``time``, ``variants``: one strategy at a time (``--arms``).

Each round goes through the real stages, without Prefect (the Prefect-free campaign stages the flows
sequence: ``prepare``, ``resolve_audience``, ``plan_group``; the ``Dispatcher`` with the real SendGrid and
firebase-admin adapters talking HTTP to an in-process ``SandboxServer``; the sandbox's simulated recipients
post signed webhooks to the real receiver app (``membercare.receiver.create_app`` under uvicorn); orders
caused by clicks are imported with the orders importer; ``compute_attributions`` credits them). The
dispatcher's clock is the simulation's clock, stepped from one due instant to the next, so send-time
deferrals go out at their planned local hour and every event carries its simulated timestamp.

Per round and arm: messages, engagement (click or push tap per message), opens, conversion (messages
credited with an order per message), the share of messages on each member's truly best channel and within
+-1 h of their true best hour, and the variant shares. At the end: the lift of each arm over ``static`` in
the last ``--final-rounds`` rounds (95 % Newcombe / Katz intervals, :func:`membercare.optimise.lift.binary_lift`)
and the variant section of ``membercare report`` (``build_report``) for each arm, which must recover the
planted winner. Outputs ``optimise_sandbox.json``, ``optimise_sandbox.md`` and a learning-curve chart
(``optimise_sandbox.svg``, Altair rendered by vl-convert) in ``--out``.

    .venv/bin/python bench/optimise_sandbox.py [--members 5000] [--rounds 20] [--seed 7] \
        [--arms static,optimised] [--out bench/results] [--work /tmp/sandbox-sim]

Channels: email and push. SMS is left out on purpose: an SMS has no open or click signal, and Twilio's
status callbacks carry no event time (the receiver stamps them on arrival, i.e. in wall-clock time), so in
simulated time neither the engagement nor the attribution of an SMS could be measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa

from membercare.sandbox.simulation import (
    ENGAGED_KINDS,  # a click (email) or a tap (push): the engagement goal
    HiddenTruth,
    ShopSimulation,
    TruthSettings,
    load_members,
    reachable_setup_csvs,
    write_orders_csv,
)
from membercare.timeutil import UTC

CAMPAIGN = "sim_weekly"
SHOP_TZ = "Asia/Taipei"
SEND_LOCAL_HOUR = 10  # the static campaign's run time, shop-local (as the calendar would schedule it)
SENDGRID_KEY = "SG.membercare-sim"
FCM_PROJECT = "membercare-sim"
SA_EMAIL = f"push@{FCM_PROJECT}.iam.gserviceaccount.com"
OPEN_KINDS = ("opened", "push_opened")

ARMS: dict[str, dict] = {
    "static": {"routing": "preference", "send_time": "immediate", "bandit": False},
    "optimised": {"routing": "best_engagement", "send_time": "best_hour", "bandit": True},
    "channel": {"routing": "best_engagement", "send_time": "immediate", "bandit": False},
    "time": {"routing": "preference", "send_time": "best_hour", "bandit": False},
    "variants": {"routing": "preference", "send_time": "immediate", "bandit": True},
}

log = logging.getLogger("optimise_sandbox")


# ------------------------------------------------------------------------------------------------ set-up


def campaign_yaml(arm: str, variants: tuple[str, ...]) -> str:
    a = ARMS[arm]
    floor = 0.05 if a["bandit"] else 1.0 / len(variants)
    # A fixed equal split: with floor = 1/K every variant keeps exactly 1/K whatever the posteriors say;
    # promote_at 1.0 keeps the bandit from promoting (nothing is ever *certain* after finitely many draws).
    promote = 0.95 if a["bandit"] else 1.0
    return (
        f"name: {CAMPAIGN}\n"
        "description: Weekly picks for every member (simulation benchmark, bench/optimise_sandbox.py).\n"
        "purpose: marketing\n"
        "segment:\n  name: new_members\n  params: {days: 3650}\n"
        "priority: 40\n"
        "channels: [email, push]\n"
        "occurrence: weekly\n"
        "message_per: member\n"
        "default_locale: zh-TW\n"
        "locales: [zh-TW, en]\n"
        "params: {recommendations: 3}\n"
        "optimise:\n"
        f"  routing: {a['routing']}\n"
        f"  send_time: {a['send_time']}\n"
        f"  variants: {{names: [{', '.join(variants)}], goal: click, floor: {floor!r}, promote_at: {promote}}}\n"
    )


SUBJECTS = {
    "b": {"en": "{{ member.first_name or member.name }}, three picks we saved for you",
          "zh-TW": "{{ member.first_name or member.name }}，我們替你留了三樣好物"},
    "c": {"en": "This week's picks are in", "zh-TW": "本週精選已上架"},
}


def write_templates(root: Path, arm: str, variants: tuple[str, ...]) -> Path:
    """A templates folder with the shared layout and the benchmark campaign (welcome_day7's copy plus
    subject and push-title overrides for variants b and c)."""
    src = Path(__file__).resolve().parents[1] / "templates"
    out = root / f"templates-{arm}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src / "_layout", out / "_layout")
    camp = out / CAMPAIGN
    camp.mkdir(parents=True)
    for f in (src / "welcome_day7").iterdir():
        if f.name != "campaign.yaml" and not f.name.startswith("sms"):
            shutil.copy(f, camp / f.name)
    for v, text in SUBJECTS.items():
        if v not in variants:
            continue
        for loc, subject in text.items():
            (camp / f"email_subject@{v}.{loc}.txt").write_text(subject + "\n", encoding="utf-8")
            (camp / f"push_title@{v}.{loc}.txt").write_text(subject + "\n", encoding="utf-8")
    (camp / "campaign.yaml").write_text(campaign_yaml(arm, variants), encoding="utf-8")
    return out


def build_base_shop(work: Path, members: int, seed: int, start: datetime) -> Path:
    """Generate the shop once (then copied per arm): consent to email and push marketing for everyone,
    one live push device each, a delivery policy whose push-token age covers the simulated months."""
    from membercare.data.generator import generate_shop
    from membercare.data.importer import import_csv
    from membercare.db import make_engine, upgrade
    from membercare.delivery.policies import PolicySettings, save_policy

    path = work / "base.db"
    if path.exists():
        path.unlink()
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    generate_shop(engine, members=members, seed=seed, as_of=start)
    sims = load_members(engine)
    files = reachable_setup_csvs(sims, work / "setup", at=start)
    for kind in ("consents", "devices"):
        rep = import_csv(engine, kind, files[kind], rejects_path=work / "setup" / f"{kind}.rejects.csv")
        if rep.rejected:
            raise RuntimeError(f"set-up import of {kind} rejected {rep.rejected} rows")
    with engine.begin() as conn:
        save_policy(conn, PolicySettings(push_token_max_age_days=400))
    engine.dispose()
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_account(directory: Path, token_uri: str) -> tuple[Path, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    info = {"type": "service_account", "project_id": FCM_PROJECT, "private_key_id": "sim-1", "private_key": pem,
            "client_email": SA_EMAIL, "client_id": "1", "auth_uri": token_uri.rsplit("/", 1)[0] + "/auth",
            "token_uri": token_uri, "auth_provider_x509_cert_url": "", "client_x509_cert_url": "",
            "universe_domain": "googleapis.com"}
    path = directory / "service-account.json"
    path.write_text(json.dumps(info), encoding="utf-8")
    return path, public


@dataclass
class Services:
    sandbox: object
    server: object
    thread: threading.Thread
    adapters: dict
    settings: object

    def stop(self) -> None:
        from channels.registry import close_channels

        close_channels(self.adapters)
        self.server.should_exit = True
        self.thread.join(10)
        self.sandbox.stop()


def start_services(arm_dir: Path, engine, sim: ShopSimulation, templates: Path, seed: int) -> Services:
    """Sandbox (with the simulation as engagement model and event clock) + receiver + real adapters."""
    import uvicorn

    from channels.registry import build_channels
    from membercare.config import Settings
    from membercare.receiver import ReceiverConfig, create_app
    from membercare.sandbox import SandboxConfig, SandboxServer

    receiver_url = f"http://127.0.0.1:{_free_port()}"
    push_secret = secrets.token_urlsafe(24)
    secret_key = secrets.token_urlsafe(32)
    base = dict(seed=seed, sendgrid_api_keys=[SENDGRID_KEY], webhook_url=receiver_url,
                push_tracking_secret=push_secret, sendgrid_batch_interval_ms=50.0)
    sandbox = SandboxServer(SandboxConfig(**base), model=sim, clock=sim.event_time).start()
    sa_path, public_pem = _service_account(arm_dir, sandbox.token_uri)
    sandbox.app.initial_config = SandboxConfig(**base, fcm_service_accounts={SA_EMAIL: public_pem},
                                               fcm_require_known_service_account=True)
    sandbox.reset(config=True)
    settings = Settings(home=arm_dir, database_url=str(engine.url), templates_dir=templates,
                        public_url=receiver_url, secret_key=secret_key)
    # Simulated time runs months behind the wall clock: accept app reports of any age (the sandbox signs
    # them now, so replay protection by signature is unaffected).
    config = ReceiverConfig.from_env(settings=settings).with_(
        public_url=receiver_url, secret_key=secret_key, sendgrid_public_key=sandbox.sendgrid_public_key,
        push_tracking_secret=push_secret, push_max_age_s=400 * 86400.0)
    port = int(receiver_url.rsplit(":", 1)[1])
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine), host="127.0.0.1", port=port,
                                           log_level="critical", access_log=False, server_header=False))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="sim-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sandbox.stop()
            raise RuntimeError("the webhook receiver did not start")
        time.sleep(0.05)
    env = {"MEMBERCARE_SENDGRID_API_KEY": SENDGRID_KEY, "MEMBERCARE_SENDGRID_FROM": "Sim Shop <shop@example.com>",
           "MEMBERCARE_SENDGRID_BASE_URL": sandbox.url, "MEMBERCARE_FIREBASE_CREDENTIALS": str(sa_path),
           "MEMBERCARE_FCM_BASE_URL": sandbox.url, "MEMBERCARE_PUBLIC_URL": receiver_url}
    adapters = build_channels(env, channels=["email", "push"])
    return Services(sandbox, server, thread, adapters, settings)


# ------------------------------------------------------------------------------------------------ a round


@dataclass
class RoundResult:
    round: int
    as_of: str
    audience: int
    planned: int
    messages: int
    by_channel: dict[str, int]
    engaged: int
    opened: int
    conversions: int
    orders_imported: int
    revenue_minor: int
    best_channel: int
    best_hour: int
    variants: dict[str, int]
    deferred_for_send_time: int
    skipped: dict[str, int]
    seconds: float
    dispatch_steps: int
    unknown_to_sim: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def engagement_rate(self) -> float:
        return self.engaged / self.messages if self.messages else 0.0

    @property
    def conversion_rate(self) -> float:
        return self.conversions / self.messages if self.messages else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["engagement_rate"] = round(self.engagement_rate, 5)
        d["conversion_rate"] = round(self.conversion_rate, 5)
        d["open_rate"] = round(self.opened / self.messages, 5) if self.messages else 0.0
        d["best_channel_share"] = round(self.best_channel / self.messages, 5) if self.messages else 0.0
        d["best_hour_share"] = round(self.best_hour / self.messages, 5) if self.messages else 0.0
        return d


def run_round(engine, services: Services, sim: ShopSimulation, r: int, as_of: datetime, work: Path) -> RoundResult:
    from membercare.campaigns.audience import resolve_audience
    from membercare.campaigns.occurrence import RunOptions, prepare
    from membercare.campaigns.plan import ensure_run, make_renderer, plan_group
    from membercare.data.importer import import_csv
    from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
    from membercare.delivery.models import OutboxMessage
    from membercare.engagement.attribution import compute_attributions
    from membercare.engagement.attribution_models import Attribution
    from membercare.engagement.models import EngagementEventRow

    t0 = time.monotonic()
    settings = services.settings
    sim.now = as_of
    prepared = prepare(settings, CAMPAIGN, RunOptions(as_of=as_of))
    audience = resolve_audience(engine, prepared)
    run_id = ensure_run(engine, prepared)
    plan = plan_group(engine, prepared, audience.entries, renderer=make_renderer(prepared))
    o, e, at = OutboxMessage.__table__, EngagementEventRow.__table__, Attribution.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(o.c.message_id, o.c.member_id, o.c.variant)
                            .where(o.c.run_id == run_id, o.c.message_id.is_not(None))).all()
        deferred = conn.execute(sa.select(sa.func.count()).where(
            o.c.run_id == run_id, o.c.state == "deferred", o.c.reason_code == "send_time")).scalar_one()
    sim.register((m, mid, v) for m, mid, v in rows)

    # Dispatch in simulated time: send what is due, then jump the clock to the next due row (send-time
    # deferrals, quiet hours), until nothing is left within the day.
    dispatcher = Dispatcher(engine, services.adapters, config=DispatchConfig(workers=16), clock=sim.clock)
    horizon = as_of + timedelta(hours=26)
    steps = 0
    while steps < 500:
        steps += 1
        rep = dispatcher.dispatch(run_id)
        nxt = rep.next_due_at
        if nxt is None or nxt > horizon:
            break
        sim.now = max(nxt, sim.now + timedelta(seconds=1))
    # SandboxServer.call waits at most 60 s for an answer: drain in slices (a loaded machine can need minutes).
    for _ in range(10):
        if services.sandbox.drain(timeout=45):
            break
    else:
        log.warning("round %d: webhooks still queued after 450 s", r)

    # Purchases: a share of the clicked / tapped messages lead to an order, imported like any order file.
    with engine.connect() as conn:
        engaged_rows = conn.execute(
            sa.select(o.c.message_id, o.c.member_id, sa.func.min(e.c.occurred_at))
            .join(e, e.c.message_id == o.c.message_id)
            .where(o.c.run_id == run_id, e.c.kind.in_(ENGAGED_KINDS))
            .group_by(o.c.message_id, o.c.member_id)).all()
    engaged_at = []
    for mid, member, first in engaged_rows:
        if isinstance(first, str):
            first = datetime.fromisoformat(first)
        engaged_at.append((mid, int(member), first if first.tzinfo else first.replace(tzinfo=UTC)))
    orders = sim.conversions(engaged_at)
    imported = 0
    if orders:
        path = write_orders_csv(orders, work / f"orders-{r:02d}.csv")
        rep = import_csv(engine, "orders", path, settings=settings, rejects_path=work / f"orders-{r:02d}.rejects.csv")
        imported = rep.inserted
    compute_attributions(engine, as_of, as_of + timedelta(days=7))

    # Measure from the ledger, the engagement events and the attributions, against the hidden truth.
    truth = sim.truth
    with engine.connect() as conn:
        sent = conn.execute(sa.select(o.c.message_id, o.c.member_id, o.c.channel, o.c.variant, o.c.sent_at)
                            .where(o.c.run_id == run_id, o.c.state == "sent")).all()
        engaged_ids = set(conn.execute(sa.select(sa.distinct(e.c.message_id)).join(o, o.c.message_id == e.c.message_id)
                                       .where(o.c.run_id == run_id, e.c.kind.in_(ENGAGED_KINDS))).scalars())
        opened_ids = set(conn.execute(sa.select(sa.distinct(e.c.message_id)).join(o, o.c.message_id == e.c.message_id)
                                      .where(o.c.run_id == run_id, e.c.kind.in_(OPEN_KINDS))).scalars())
        credited = conn.execute(sa.select(at.c.message_id, at.c.revenue_minor).where(
            at.c.run_id == run_id, at.c.model == "last_touch")).all()
        skipped = dict(conn.execute(sa.select(o.c.reason_code, sa.func.count()).where(
            o.c.run_id == run_id, o.c.state.in_(("skipped", "suppressed", "failed"))).group_by(o.c.reason_code)).all())
    converted = {m for m, _ in credited}
    by_channel, variants = Counter(), Counter()
    best_channel = best_hour = 0
    for _mid, member, channel, variant, sent_at in sent:
        by_channel[channel] += 1
        variants[variant or "-"] += 1
        if isinstance(sent_at, str):
            sent_at = datetime.fromisoformat(sent_at)
        sent_at = sent_at if sent_at.tzinfo else sent_at.replace(tzinfo=UTC)
        best_channel += truth.is_best_channel(int(member), channel)
        best_hour += truth.within_best_hour(int(member), sent_at)
    ids = {m for m, *_ in sent}
    return RoundResult(
        round=r, as_of=as_of.isoformat(), audience=len(audience), planned=plan.inserted, messages=len(sent),
        by_channel=dict(by_channel), engaged=len(engaged_ids & ids), opened=len(opened_ids & ids),
        conversions=len(converted & ids), orders_imported=imported,
        revenue_minor=int(sum(v for m, v in credited if m in ids)), best_channel=best_channel, best_hour=best_hour,
        variants=dict(variants), deferred_for_send_time=int(deferred), skipped={str(k): v for k, v in skipped.items()},
        seconds=round(time.monotonic() - t0, 1), dispatch_steps=steps, unknown_to_sim=sim.unknown_messages)


def variant_report(engine, since: datetime, until: datetime) -> dict | None:
    """The variant section of ``membercare report`` for the benchmark campaign (None if the report has none)."""
    from membercare.reports import ReportOptions, build_report

    opts = ReportOptions(since=since, until=until, campaign=CAMPAIGN, refresh=False)
    rep = build_report(engine, opts)
    sections = [v for v in getattr(rep, "variants", []) if v.campaign == CAMPAIGN]
    if not sections:
        return None
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(sections[0]), default=str))


def run_arm(arm: str, base_db: Path, truth: HiddenTruth, args, start: datetime,
            progress=print, on_round=None) -> dict:
    from membercare.db import make_engine

    arm_dir = Path(args.work) / arm
    if arm_dir.exists():
        shutil.rmtree(arm_dir)
    arm_dir.mkdir(parents=True)
    db = arm_dir / "shop.db"
    shutil.copy(base_db, db)
    engine = make_engine(f"sqlite:///{db}")
    templates = write_templates(arm_dir, arm, truth.settings.variants)
    sim = ShopSimulation(truth, seed=args.seed * 1000 + sorted(ARMS).index(arm), now=start)
    services = start_services(arm_dir, engine, sim, templates, seed=args.seed)
    rounds = []
    try:
        for r in range(args.rounds):
            as_of = round_instant(start, r)
            res = run_round(engine, services, sim, r + 1, as_of, arm_dir)
            rounds.append(res)
            if on_round is not None:
                on_round({"arm": arm, "strategy": ARMS[arm], "rounds": [x.to_dict() for x in rounds],
                          "variant_report": None, "webhooks": {}, "incomplete": True})
            progress(f"{arm:>9} round {r + 1:2d}: {res.messages:5d} msgs, engagement {res.engagement_rate:6.2%}, "
                     f"conversion {res.conversion_rate:6.2%}, "
                     f"best channel {res.best_channel / max(res.messages, 1):5.1%}, "
                     f"best hour {res.best_hour / max(res.messages, 1):5.1%}, variants {res.variants}, "
                     f"{res.seconds:.1f} s")
        end = round_instant(start, args.rounds)
        variants = variant_report(engine, start, end)
        webhooks = services.sandbox.stats().get("webhooks", {})
    finally:
        services.stop()
        engine.dispose()
    return {"arm": arm, "strategy": ARMS[arm], "rounds": [x.to_dict() for x in rounds], "variant_report": variants,
            "webhooks": webhooks}


def round_instant(start: datetime, r: int) -> datetime:
    """Round ``r`` (0-based) runs at SEND_LOCAL_HOUR shop-local on day ``7 r`` after ``start``."""
    local = start.astimezone(ZoneInfo(SHOP_TZ)) + timedelta(days=7 * r)
    return local.replace(hour=SEND_LOCAL_HOUR, minute=0, second=0, microsecond=0).astimezone(UTC)


# ------------------------------------------------------------------------------------------------ results


def promoted_round(arm: dict) -> int | None:
    """The first round in which one variant got every message (the bandit promoted a winner)."""
    for x in arm["rounds"]:
        if len([k for k, v in x["variants"].items() if v]) == 1 and "-" not in x["variants"]:
            return x["round"]
    return None


def final_lift(arm: dict, static: dict, last: int, static_rounds: list[dict] | None = None) -> dict:
    """Lift of ``arm``'s last ``last`` rounds over ``static``'s last ``last`` rounds (or ``static_rounds``)."""
    from membercare.optimise.lift import binary_lift

    def totals(rs: list[dict], key: str) -> tuple[int, int]:
        return sum(x[key] for x in rs), sum(x["messages"] for x in rs)

    base = static_rounds if static_rounds is not None else static["rounds"][-last:]
    out = {"static_rounds": [x["round"] for x in base], "rounds": [x["round"] for x in arm["rounds"][-last:]]}
    for key in ("engaged", "conversions"):
        xt, nt = totals(arm["rounds"][-last:], key)
        xc, nc = totals(base, key)
        if not nt or not nc:
            continue
        lift = binary_lift(xt, nt, xc, nc)
        out[key] = {"treated": [xt, nt], "static": [xc, nc], "rate": xt / nt, "static_rate": xc / nc,
                    "absolute": lift.absolute_lift, "absolute_ci": list(lift.absolute_lift_ci),
                    "relative": lift.relative_lift,
                    "relative_ci": list(lift.relative_lift_ci) if lift.relative_lift_ci else None,
                    "p_value": lift.p_value}
    return out


def write_chart(results: dict, path: Path) -> Path | None:
    try:
        import altair as alt
        import vl_convert as vlc
    except ImportError:
        return None
    rows = []
    for arm in results["arms"]:
        for x in arm["rounds"]:
            rows.append({"arm": arm["arm"], "round": x["round"], "metric": "engagement (click or tap)",
                         "rate": x["engagement_rate"]})
            rows.append({"arm": arm["arm"], "round": x["round"], "metric": "conversion", "rate": x["conversion_rate"]})
    data = alt.Data(values=rows)
    chart = (alt.Chart(data).mark_line(point=True)
             .encode(x=alt.X("round:Q", title="round (weekly campaign occurrence)",
                             axis=alt.Axis(tickMinStep=1, format="d")),
                     y=alt.Y("rate:Q", title="per message", axis=alt.Axis(format="%")),
                     color=alt.Color("arm:N", title="strategy"))
             .properties(width=360, height=220)
             .facet(column=alt.Column("metric:N", title=None, sort=["engagement (click or tap)", "conversion"]))
             .resolve_scale(y="independent"))
    svg = vlc.vegalite_to_svg(chart.to_dict())
    path.write_text(svg, encoding="utf-8")
    return path


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 100:+.{digits}f}"


def write_markdown(results: dict, path: Path) -> None:
    arms = results["arms"]
    lines = [f"# Optimisation through the pipeline and the sandbox ({results['members']:,} members, "
             f"{results['rounds']} weekly rounds, seed {results['seed']})", "",
             f"Load average (1/5/15 min) before / after: {results.get('load_before', '-')} / "
             f"{results.get('load_after', '-')}; wall time {results.get('seconds', 0):.0f} s. "
             "Truth: stated preference is the best channel for "
             f"{results['truth']['stated_is_best']:.0%} of members; planted variant winner "
             f"**{results['truth']['planted_winner']}**.", "",
             "## Learning curve (per message)", "",
             "| round | " + " | ".join(f"{a['arm']} engagement | {a['arm']} conversion" for a in arms) + " |",
             "|---|" + "---|---|" * len(arms)]
    for i in range(results["rounds"]):
        cells = []
        for a in arms:
            x = a["rounds"][i] if i < len(a["rounds"]) else None
            cells += [f"{x['engagement_rate']:.2%}", f"{x['conversion_rate']:.2%}"] if x else ["-", "-"]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the messages went (last round)", "",
              "| arm | messages | on true best channel | within ±1 h of true hour | variant shares |",
              "|---|---|---|---|---|"]
    for a in arms:
        x = a["rounds"][-1]
        shares = ", ".join(f"{k} {v / max(x['messages'], 1):.0%}" for k, v in sorted(x["variants"].items()))
        lines.append(f"| {a['arm']} | {x['messages']:,} | {x['best_channel_share']:.1%} | "
                     f"{x['best_hour_share']:.1%} | {shares} |")
    lines += ["", f"## Final lift over static (last {results['final_rounds']} rounds of each arm, "
              f"95 % Newcombe / Katz intervals)", "",
              "| arm | engagement | absolute (points) | relative | conversion | absolute (points) | relative |",
              "|---|---|---|---|---|---|---|"]
    def cell(x: dict | None) -> list[str]:
        if not x:
            return ["-", "-", "-"]
        rel = (f"{_pct(x['relative'], 1)} % [{_pct(x['relative_ci'][0], 1)}, {_pct(x['relative_ci'][1], 1)}]"
               if x["relative_ci"] else "-")
        return [f"{x['rate']:.2%} vs {x['static_rate']:.2%}",
                f"{_pct(x['absolute'])} [{_pct(x['absolute_ci'][0])}, {_pct(x['absolute_ci'][1])}]", rel]

    baselines = [results["lift"]]
    if results.get("lift_vs_uniform_static"):
        baselines.append(results["lift_vs_uniform_static"])
    for lifts in baselines:
        for name, lift in lifts.items():
            sr, ar = lift.get("static_rounds") or [], lift.get("rounds") or []
            label = (f"{name} rounds {ar[0]}-{ar[-1]} vs static rounds {sr[0]}-{sr[-1]}" if sr and ar else name)
            lines.append(f"| {label} | " + " | ".join(cell(lift.get("engaged")) + cell(lift.get("conversions"))) + " |")
    lines += ["", "## Variant section of `membercare report` (whole period)", ""]
    for a in arms:
        v = a.get("variant_report")
        if not v:
            lines.append(f"* {a['arm']}: no variant section")
            continue
        rows = ", ".join(f"{r['name']}: {r['sends']:,} sends, {r['clicks']:,} clicks, P(best) {r['p_best']:.3f}"
                         for r in v["variants"])
        lines.append(f"* {a['arm']}: winner **{v.get('winner')}**, promoted {v.get('promoted')}; {rows}")
    if results.get("static_promoted_round"):
        lines += ["", f"Note: the static arm's fixed equal split (floor 1/3, promote_at 1.0) was promoted to "
                  f"the winner in round {results['static_promoted_round']} (P(best) reached exactly 1.00 in "
                  f"the bandit's Monte-Carlo draws), so its last rounds already send the winning copy; the "
                  f"second lift table compares against its last equal-split rounds instead."]
    lines += ["", f"Planted winner recovered by the optimised arm: **{results.get('winner_recovered')}**", ""]
    unfinished = [a["arm"] for a in arms if a.get("incomplete")]
    if unfinished:
        lines += [f"Stopped early: {', '.join(unfinished)} ran {len(arms[-1]['rounds'])} of {results['rounds']} "
                  f"rounds (the lifts use its last completed rounds).", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--arms", default="static,optimised",
                    help=f"comma-separated, from {', '.join(ARMS)} (static is always included)")
    ap.add_argument("--final-rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--work", default="/tmp/sandbox-sim")
    ap.add_argument("--start", default="2026-05-04", help="the first round's date (simulated; keep it months "
                                                          "in the past so all simulated events are)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--reuse", metavar="JSON", help="take the arms found in this earlier results file (same "
                                                    "members, rounds and seed: the truth must match) instead of "
                                                    "running them again")
    ap.add_argument("--report-only", metavar="JSON", help="recompute lifts and rewrite the outputs from a saved "
                                                          "results file (optimise_sandbox[.partial].json)")
    args = ap.parse_args(argv)
    if args.report_only:
        results = json.loads(Path(args.report_only).read_text(encoding="utf-8"))
        from membercare.db import make_engine

        for a in results["arms"]:  # an arm stopped mid-way: its report section from its database
            db = Path(results.get("work", args.work)) / a["arm"] / "shop.db"
            if a.get("variant_report") is None and a.get("incomplete") and db.is_file() and "start" in results:
                start = datetime.fromisoformat(results["start"])
                engine = make_engine(f"sqlite:///{db}")
                a["variant_report"] = variant_report(engine, start, round_instant(start, results["rounds"]))
                engine.dispose()
        finish(results, results["truth"]["planted_winner"])
        results.setdefault("load_after", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        write_outputs(results, Path(args.out), print)
        return results
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "static" not in arms:
        arms.insert(0, "static")
    if args.rounds < 1 or args.members < 10:
        ap.error("need at least 1 round and 10 members")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("membercare.delivery.dispatcher", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    say = (lambda *_: None) if args.quiet else (lambda msg: print(msg, flush=True))

    t0 = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = datetime.fromisoformat(args.start).replace(tzinfo=ZoneInfo(SHOP_TZ)).astimezone(UTC)
    base = build_base_shop(work, args.members, args.seed, start)
    from membercare.db import make_engine

    engine = make_engine(f"sqlite:///{base}")
    truth = HiddenTruth.generate(load_members(engine), seed=args.seed, settings=TruthSettings())
    engine.dispose()
    say(f"shop of {args.members:,} members ready in {time.monotonic() - t0:.1f} s; truth: {truth.summary()}")

    results: dict = {"members": args.members, "rounds": args.rounds, "seed": args.seed,
                     "final_rounds": min(args.final_rounds, args.rounds), "truth": truth.summary(), "arms": [],
                     "start": start.isoformat(), "work": str(work), "load_before": load_before}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reused = {}
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text(encoding="utf-8"))
        if old["truth"] != json.loads(json.dumps(results["truth"])) or old["rounds"] != args.rounds:
            ap.error(f"{args.reuse} was run on another truth or number of rounds")
        reused = {a["arm"]: a for a in old["arms"]}
    for arm in arms:
        if arm in reused:
            say(f"{arm}: reusing the results of {args.reuse}")
            results["arms"].append(dict(reused[arm], reused_from=str(args.reuse)))
            continue
        def save(current: dict | None = None) -> None:
            # Keep what is done so far (after every round): a long run that dies or is stopped later still
            # leaves its results; --report-only turns them into the usual outputs.
            partial = dict(results, arms=results["arms"] + ([current] if current else []))
            (out / "optimise_sandbox.partial.json").write_text(json.dumps(partial, indent=1, default=str),
                                                                encoding="utf-8")

        results["arms"].append(run_arm(arm, base, truth, args, start, progress=say, on_round=save))
        save()
    finish(results, truth.settings.winner)
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["load_before"] = load_before
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_outputs(results, out, say)
    return results


def finish(results: dict, winner: str) -> None:
    """Lifts over static and the winner check, from the per-round results."""
    static = results["arms"][0]
    last = results["final_rounds"]
    results["lift"] = {a["arm"]: final_lift(a, static, last) for a in results["arms"][1:]}
    promoted = promoted_round(static)
    results["static_promoted_round"] = promoted
    if promoted is not None:
        uniform = [x for x in static["rounds"] if x["round"] < promoted][-last:]
        if uniform:
            results["lift_vs_uniform_static"] = {a["arm"]: final_lift(a, static, last, uniform)
                                                 for a in results["arms"][1:]}
    recovered = {}
    for a in results["arms"]:
        v = a.get("variant_report")
        if v and ARMS[a["arm"]]["bandit"]:
            best = next((r for r in v["variants"] if r["name"] == winner), None)
            recovered[a["arm"]] = bool(v.get("winner") == winner or v.get("promoted") == winner
                                       or (best and best["p_best"] >= 0.95))
    results["winner_recovered"] = recovered


def write_outputs(results: dict, out: Path, say=print) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimise_sandbox.partial.json").unlink(missing_ok=True)
    (out / "optimise_sandbox.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    write_markdown(results, out / "optimise_sandbox.md")
    chart = write_chart(results, out / "optimise_sandbox.svg")
    results["chart"] = str(chart) if chart else None
    say(f"wrote {out / 'optimise_sandbox.json'}, {out / 'optimise_sandbox.md'}" + (f", {chart}" if chart else ""))
    say((out / "optimise_sandbox.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
