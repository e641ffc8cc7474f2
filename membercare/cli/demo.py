"""``membercare demo``: the main job, end to end, on embedded defaults.

On a fresh machine it uses:

* a SQLite database in ``$MEMBERCARE_HOME`` (default ``./.membercare``), and a generated demo shop of a few
  thousand members on the first run (``as_of`` = today);
* Prefect's local ephemeral mode, with a *persistent* ``PREFECT_HOME`` under ``$MEMBERCARE_HOME/prefect`` so
  that the runs can be browsed afterwards in the Prefect UI (the command to open it is printed);
* a generated ``MEMBERCARE_SECRET_KEY`` stored in ``$MEMBERCARE_HOME/secret_key`` (mode 600) when none is set;
* the provider sandbox and the webhook receiver on free loopback ports, in-process threads: the adapters talk
  to the sandbox through the real SDKs (a locally generated service-account key runs firebase-admin's real
  OAuth flow), and the sandbox's simulated recipients post signed engagement webhooks to the receiver.

It replays a month of the shop's member events through the journeys on a simulated clock (one
``advance-journeys`` flow run per stop of the clock), runs the day's lifecycle campaigns through the Prefect
flows (scoring first), waits until the sandbox's
webhook queue has drained, runs ``sync-engagement``, and ends with a summary table, the paths of the HTML
report and the template gallery, and the command that opens the Prefect UI on these runs.

Running it again the same day sends nothing twice: every message has an outbox key per campaign occurrence,
and the second run says so. Setting ``PREFECT_API_URL`` runs the flows on that server instead.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, err_console, migrated_engine, state

if TYPE_CHECKING:  # imported where used: `membercare --help` stays fast
    import sqlalchemy as sa

# The day's lifecycle campaigns, in the order the calendar (prefect.yaml) runs them; extra run parameters.
# The welcome series and the post-purchase care are journeys now (welcome_series, post_purchase: run before
# these by the demo, see membercare.cli.demo_journeys), not the superseded welcome_day0/3/7 and
# post_purchase_care campaigns.
DAY_PLAN: tuple[tuple[str, dict], ...] = (
    ("birthday", {}),
    ("coupon_expiry", {"occurrence_tag": "d3", "segment_params": {"days": 3}}),
    ("coupon_expiry", {"occurrence_tag": "d1", "segment_params": {"days": 1}}),
    ("vip_appreciation", {}),  # monthly occurrence key: sent once a month, whichever day the demo runs first
    ("tier_upgrade", {}),
    ("churn_winback", {}),
    ("recommendations", {}),
)
# Demo credentials: the sandbox accepts exactly these; they are not secrets anywhere else.
SENDGRID_KEY = "SG.membercare-demo"
TWILIO_SID = "AC" + "d" * 32
TWILIO_TOKEN = "membercare-demo-auth-token"
FCM_PROJECT = "membercare-demo"
SA_EMAIL = f"push@{FCM_PROJECT}.iam.gserviceaccount.com"
LINE_TOKEN = "membercare-demo-line-channel-access-token"
# Demo sending rates (messages/s) for the shared Prefect rate limits: fast, but still exercised.
DEMO_RATES = {"email": 500.0, "sms": 200.0, "push": 500.0, "line": 500.0}
# The share of demo members who are friends of the shop's LINE Official Account (most Taiwanese shoppers are).
LINE_SHARE = 0.45


def shop_overview(conn: sa.Connection, as_of=None) -> list[tuple[str, str]]:
    """Headline figures of the shop, computed in SQL."""
    import sqlalchemy as sa

    from membercare.models import PURCHASE_STATUSES, Consent, Coupon, Device, Member, Order
    from membercare.timeutil import utcnow

    as_of = as_of or utcnow()
    m, o, c, d, cs = (t.__table__ for t in (Member, Order, Coupon, Device, Consent))
    members = conn.execute(sa.select(sa.func.count()).select_from(m)).scalar_one()
    tiers = conn.execute(sa.select(m.c.tier, sa.func.count()).group_by(m.c.tier).order_by(m.c.tier)).all()
    orders, revenue = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.total_minor), 0))
        .where(o.c.status.in_(PURCHASE_STATUSES))
    ).one()
    buyers = conn.execute(
        sa.select(sa.func.count(sa.distinct(o.c.member_id))).where(o.c.status.in_(PURCHASE_STATUSES))
    ).scalar_one()
    open_coupons = conn.execute(
        sa.select(sa.func.count()).select_from(c).where(c.c.redeemed_at.is_(None), c.c.expires_at > as_of)
    ).scalar_one()
    live_devices = conn.execute(
        sa.select(sa.func.count()).select_from(d).where(d.c.invalidated_at.is_(None))
    ).scalar_one()
    optouts = conn.execute(
        sa.select(cs.c.channel, sa.func.count())
        .where(cs.c.purpose == "marketing", cs.c.granted.is_(False))
        .group_by(cs.c.channel).order_by(cs.c.channel)
    ).all()
    return [
        ("members", f"{members:,}"),
        ("members by tier", ", ".join(f"{t} {n:,}" for t, n in tiers) or "-"),
        ("purchases", f"{orders:,} orders by {buyers:,} buyers, NT${revenue / 100:,.0f}"),
        ("open coupons", f"{open_coupons:,}"),
        ("live push devices", f"{live_devices:,}"),
        ("marketing opt-outs", ", ".join(f"{ch} {n:,}" for ch, n in optouts) or "-"),
    ]


# ------------------------------------------------------------------------------------------- environment


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def demo_secret_key(home: Path) -> str:
    """MEMBERCARE_SECRET_KEY for the demo: the environment's, else one generated once and kept in the home."""
    if os.environ.get("MEMBERCARE_SECRET_KEY"):
        return os.environ["MEMBERCARE_SECRET_KEY"]
    path = home / "secret_key"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    key = secrets.token_urlsafe(32)
    _private_file(path, key + "\n")
    return key


def prefect_env(home: Path) -> dict[str, str]:
    """Prefect settings of the demo: local ephemeral mode with a persistent home (unless an API is configured).

    Runs log at INFO (counts and reasons, never personal data) so that their pages in the Prefect UI show what
    happened; only the console handler is raised to WARNING, which keeps the demo's terminal quiet. (With
    ``PREFECT_LOGGING_LEVEL=WARNING`` every run page said "This run didn't generate logs".)
    """
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}
    if not os.environ.get("PREFECT_API_URL"):
        env["PREFECT_HOME"] = str(home / "prefect")
    return env


def service_account(home: Path, token_uri: str, *, name: str = "service-account.json") -> tuple[Path, str]:
    """The demo's FCM service-account key (generated once; its token_uri follows the sandbox's port)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = home / "sandbox" / name
    first = home / "sandbox" / "service-account.json"  # one key for both files
    info = None
    if first.is_file():
        info = json.loads(first.read_text(encoding="utf-8"))
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": FCM_PROJECT, "private_key_id": "demo-key-1",
            "private_key": private_pem, "client_email": SA_EMAIL, "client_id": "1",
            "auth_uri": token_uri.rsplit("/", 1)[0] + "/auth", "token_uri": token_uri,
            "auth_provider_x509_cert_url": "", "client_x509_cert_url": "", "universe_domain": "googleapis.com"}
    _private_file(path, json.dumps(info))
    return path, public_pem


def write_demo_config(home: Path, settings) -> Path:
    """``home/config.toml``: the demo's database, Prefect home and secret key, and provider credentials pointed
    at the sandbox that ``membercare sandbox`` serves on its default port (see membercare.cli.project)."""
    from membercare.cli.project import PREFECT_STARTUP_TIMEOUT_S, SANDBOX_PORT, write_project_config

    url = f"http://127.0.0.1:{SANDBOX_PORT}"
    sa_path, _ = service_account(home, f"{url}/token", name="service-account-standalone.json")
    env = {
        "MEMBERCARE_DATABASE_URL": settings.db_url,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": PREFECT_STARTUP_TIMEOUT_S,
        "MEMBERCARE_SHOP_TIMEZONE": settings.shop_timezone,
        "MEMBERCARE_SENDGRID_API_KEY": SENDGRID_KEY,
        "MEMBERCARE_SENDGRID_FROM": "Good Days Living <hello@gooddays.example>",
        "MEMBERCARE_SENDGRID_BASE_URL": url,
        "MEMBERCARE_TWILIO_ACCOUNT_SID": TWILIO_SID,
        "MEMBERCARE_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "MEMBERCARE_TWILIO_FROM": "+886223456789",
        "MEMBERCARE_TWILIO_BASE_URL": url,
        "MEMBERCARE_FIREBASE_CREDENTIALS": str(sa_path),
        "MEMBERCARE_FCM_BASE_URL": url,
        "MEMBERCARE_NO_SECRET_BLOCKS": "1",
    }
    notes = {"MEMBERCARE_SENDGRID_BASE_URL": "`membercare sandbox` (port 8025); remove for the real SendGrid",
             "MEMBERCARE_FIREBASE_CREDENTIALS": "demo key whose token_uri is the sandbox's",
             "MEMBERCARE_NO_SECRET_BLOCKS": "credentials come from here, not from Prefect Secret blocks"}
    return write_project_config(home, env, secret_key_file="secret_key" if (home / "secret_key").is_file()
                                else None, comments=notes)


@dataclass
class DemoServices:
    sandbox: Any  # membercare.sandbox.SandboxServer (imported when the demo starts it)
    receiver: Any  # uvicorn.Server
    receiver_thread: threading.Thread
    receiver_url: str
    env: dict[str, str]

    def stop(self) -> None:
        self.receiver.should_exit = True
        self.receiver_thread.join(10)
        self.sandbox.stop()


def start_services(home: Path, engine, secret_key: str, seed: int) -> DemoServices:
    """The provider sandbox and the webhook receiver on free loopback ports, wired to each other."""
    import uvicorn

    from membercare.receiver import ReceiverConfig, create_app
    from membercare.sandbox import SandboxConfig, SandboxServer

    receiver_url = f"http://127.0.0.1:{_free_port()}"
    push_secret = secrets.token_urlsafe(24)
    line_secret = secrets.token_hex(16)  # a LINE channel secret is 32 hex digits
    base: dict[str, Any] = dict(seed=seed, sendgrid_api_keys=[SENDGRID_KEY], twilio_accounts={TWILIO_SID: TWILIO_TOKEN},
                                line_access_tokens=[LINE_TOKEN], line_channel_secret=line_secret,
                                webhook_url=receiver_url, push_tracking_secret=push_secret)
    sandbox = SandboxServer(SandboxConfig(**base)).start()
    sa_path, public_pem = service_account(home, sandbox.token_uri)
    sandbox.app.initial_config = SandboxConfig(**base, fcm_service_accounts={SA_EMAIL: public_pem},
                                               fcm_require_known_service_account=True)
    sandbox.reset(config=True)

    config = ReceiverConfig.from_env(settings=state.settings).with_(
        public_url=receiver_url, secret_key=secret_key, sendgrid_public_key=sandbox.sendgrid_public_key,
        twilio_auth_token=TWILIO_TOKEN, push_tracking_secret=push_secret, webhook_secrets=(("line", line_secret),))
    port = int(receiver_url.rsplit(":", 1)[1])
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine), host="127.0.0.1", port=port,
                                           log_level="critical", access_log=False, server_header=False))
    # (critical: a webhook refused with 5xx while SQLite is busy is retried by the sandbox, and the summary
    # reports any it gave up on; the tracebacks would only bury the progress display.)
    # Not the main thread: uvicorn must not install signal handlers.
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.run, name="membercare-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sandbox.stop()
            raise RuntimeError("the webhook receiver did not start")
        time.sleep(0.05)
    env = {
        "MEMBERCARE_SENDGRID_API_KEY": SENDGRID_KEY,
        "MEMBERCARE_SENDGRID_FROM": "Good Days Living <hello@gooddays.example>",
        "MEMBERCARE_SENDGRID_BASE_URL": sandbox.url,
        "MEMBERCARE_TWILIO_ACCOUNT_SID": TWILIO_SID,
        "MEMBERCARE_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "MEMBERCARE_TWILIO_FROM": "+886223456789",
        "MEMBERCARE_TWILIO_BASE_URL": sandbox.url,
        "MEMBERCARE_FIREBASE_CREDENTIALS": str(sa_path),
        "MEMBERCARE_FCM_BASE_URL": sandbox.url,
        "MEMBERCARE_LINE_CHANNEL_ACCESS_TOKEN": LINE_TOKEN,
        "MEMBERCARE_LINE_BASE_URL": sandbox.url,
        "MEMBERCARE_LINE_CHANNEL_SECRET": line_secret,
        "MEMBERCARE_PUBLIC_URL": receiver_url,
        "MEMBERCARE_SECRET_KEY": secret_key,
        "MEMBERCARE_PUSH_TRACKING_SECRET": push_secret,
        # The demo's credentials are these variables; skip the Secret block lookups.
        "MEMBERCARE_NO_SECRET_BLOCKS": "1",
    }
    return DemoServices(sandbox, server, thread, receiver_url, env)


# --------------------------------------------------------------------------------------------- summary


def engagement_counts(conn: sa.Connection, since) -> dict[str, int]:
    import sqlalchemy as sa

    from membercare.engagement.models import EngagementEventRow

    e = EngagementEventRow.__table__
    return {str(kind): int(n) for kind, n in conn.execute(
        sa.select(e.c.kind, sa.func.count()).where(e.c.received_at >= since).group_by(e.c.kind))}


def _report(home: Path, env: dict[str, str]) -> tuple[Path | None, str]:
    """The HTML report through ``membercare report --html`` when the reports module is installed."""
    import importlib.util

    if importlib.util.find_spec("membercare.reports") is None:
        return None, "the reports module (membercare.reports) is not installed in this build"
    from datetime import timedelta

    from membercare.journeys.demo import DAYS
    from membercare.timeutil import shop_today

    path = home / "report.html"
    # Back to the oldest journey entry the demo replays (the report's default is 30 days).
    since = (shop_today(state.settings.shop_timezone) - timedelta(days=DAYS + 1)).isoformat()
    # Import the report command explicitly: it works whether or not the CLI registers it yet.
    code = ("import sys, importlib, membercare.cli as c\n"
            "try:\n    importlib.import_module('membercare.cli.report')\nexcept ImportError:\n    pass\n"
            "c.main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "report", "--since", since, "--html", str(path)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not path.is_file():
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        return None, "membercare report failed: " + (detail[-1] if detail else f"exit {proc.returncode}")
    return path, ""


# ------------------------------------------------------------------------------------------------ demo


@app.command("demo")
def demo(
    members: int = typer.Option(3000, "--members", min=1, help="Size of the demo shop generated on the first run."),
    seed: int = typer.Option(7, "--seed", min=0, help="Random seed of the demo shop and the simulated recipients."),
    drain_timeout: float = typer.Option(60.0, "--drain-timeout", help="Seconds to wait for simulated engagement."),
) -> None:
    """Run the main job on embedded defaults: a demo shop, the day's campaigns through Prefect, engagement."""
    import sqlalchemy as sa

    from membercare.models import Member

    started = time.monotonic()
    settings = state.settings
    home = settings.ensure_home()
    secret_key = demo_secret_key(home)
    os.environ.update(prefect_env(home))  # before Prefect is imported anywhere in this process
    os.environ["MEMBERCARE_SECRET_KEY"] = secret_key
    engine = migrated_engine()
    console.print(f"[bold]membercare demo[/] · home {home} · database {settings.db_url}")

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(Member.__table__)).scalar_one()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                        transient=False)
    with progress:
        if existing:
            console.print(f"using the existing demo shop ({existing:,} members)")
        else:
            from membercare.data.generator import generate_shop

            gen = progress.add_task(f"generating a demo shop of {members:,} members", total=members)
            summary = generate_shop(engine, members=members, seed=seed,
                                    progress=lambda done, total: progress.update(gen, completed=done, total=total))
            console.print(f"generated a demo shop of {members:,} members in {summary.seconds:.1f} s (seed {seed})")

        svc_task = progress.add_task("starting the provider sandbox and the webhook receiver", total=1)
        services = start_services(home, engine, secret_key, seed)
        os.environ.update(services.env)
        config = write_demo_config(home, settings)
        progress.update(svc_task, completed=1)
        try:
            followed = link_line_friends(engine, services, seed)
            if followed:
                console.print(f"{followed:,} demo members added the shop's LINE account as a friend "
                              "(signed follow webhooks; LINE comes first in their channel order)")
            results, sync, journeys = _run_day(progress, services, drain_timeout, engine=engine, home=home,
                                               seed=seed)
        finally:
            services.stop()

    _print_summary(engine, home, results, sync, services, started, rerun=bool(existing), journeys=journeys)
    console.print(f"[bold]project configuration:[/] {config} (every membercare command run in this folder uses "
                  f"this database, Prefect home and secret key; `membercare sandbox` serves its providers)")


def link_line_friends(engine, services: DemoServices, seed: int, share: float = LINE_SHARE) -> int:
    """Give a share of the demo members a LINE user id and make them follow the shop's account.

    Members are picked by a hash of their id and the seed, once (a rerun finds them linked). Their
    consent comes the way it would in production: each follows the account in the sandbox, which posts a
    signed ``follow`` webhook to the receiver (LINE marketing consent granted). LINE goes first in
    their channel order, as it does for most Taiwanese shoppers.
    """
    import hashlib

    import httpx
    import sqlalchemy as sa

    from membercare.models import Member

    m = Member.__table__
    with engine.begin() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(m).where(m.c.line_user_id.is_not(None))).scalar_one():
            return 0
        picked = []
        for member_id, preferred in conn.execute(sa.select(m.c.id, m.c.preferred_channels).order_by(m.c.id)):
            digest = hashlib.sha256(f"line:{seed}:{member_id}".encode()).digest()
            if int.from_bytes(digest[:4], "big") / 2**32 < share:
                user = "U" + hashlib.md5(f"line-user:{seed}:{member_id}".encode()).hexdigest()
                order = ",".join(["line", *[c for c in (preferred or "").split(",") if c and c != "line"]])
                picked.append({"mid": member_id, "user": user, "order": order})
        if picked:
            conn.execute(sa.update(m).where(m.c.id == sa.bindparam("mid"))
                         .values(line_user_id=sa.bindparam("user"), preferred_channels=sa.bindparam("order")),
                         picked)
    with httpx.Client(base_url=services.sandbox.url, timeout=10) as client:
        for row in picked:
            client.post("/sandbox/line/events", json={"type": "follow", "userId": row["user"]}).raise_for_status()
    services.sandbox.drain(timeout=60)
    return len(picked)


def _run_day(progress, services: DemoServices, drain_timeout: float, *, engine, home: Path, seed: int):
    """The day's flows, in calendar order, each a Prefect flow run."""
    from membercare.timeutil import utcnow

    day_started = utcnow()
    boot = progress.add_task("starting Prefect (local ephemeral mode; first start takes 10-20 s)", total=1)
    from flows.campaign import CampaignRunParameters, run_campaign
    from flows.engagement import sync_engagement
    from flows.ratelimits import ensure_limits
    from flows.scoring import score_members

    t0 = time.monotonic()
    ensure_limits(DEMO_RATES)
    progress.update(boot, completed=1)
    progress.console.print(f"Prefect ready: {time.monotonic() - t0:.1f} s")
    flows = progress.add_task("score-members", total=len(DAY_PLAN) + 2)
    t0 = time.monotonic()
    score_members()
    progress.console.print(f"score-members: {time.monotonic() - t0:.1f} s")
    progress.advance(flows)
    from membercare.cli.demo_journeys import run_journeys

    t0 = time.monotonic()
    journeys = run_journeys(progress, engine, seed=seed)
    progress.console.print(f"journeys on a simulated clock: {len(journeys.stops)} advance-journeys runs, "
                           f"{journeys.sent:,} messages sent, {time.monotonic() - t0:.1f} s")
    results = []
    for name, extra in DAY_PLAN:
        label = name + (f" ({extra['occurrence_tag']})" if extra.get("occurrence_tag") else "")
        progress.update(flows, description=f"run-campaign {label}")
        t0 = time.monotonic()
        result = run_campaign(CampaignRunParameters(campaign=name, wait_for_deferred_s=5.0, **extra))
        result["seconds"] = time.monotonic() - t0
        results.append((label, result))
        progress.advance(flows)
    progress.update(flows, description="waiting for the simulated engagement webhooks")
    t0 = time.monotonic()
    drained = services.sandbox.drain(timeout=drain_timeout)
    progress.console.print(f"engagement webhooks drained: {time.monotonic() - t0:.1f} s")
    purchases = simulate_purchases(engine, home, since=day_started, seed=seed)
    progress.console.print(f"simulated purchases: {purchases['orders']:,} orders from {purchases['engaged']:,} clicked "
                           f"or tapped messages (demo only; imported as an orders file)")
    progress.update(flows, description="sync-engagement")
    t0 = time.monotonic()
    sync = sync_engagement(records_url=services.sandbox.url)
    progress.console.print(f"sync-engagement: {time.monotonic() - t0:.1f} s")
    sync["drained"] = drained
    sync["webhooks"] = services.sandbox.stats().get("webhooks", {})
    progress.advance(flows)
    progress.update(flows, description="done")
    return results, sync, journeys


def simulate_purchases(engine, home: Path, *, since, seed: int) -> dict[str, int]:
    """Orders from a share of today's clicks and taps (the sandbox's recipients never buy anything), imported
    through the normal order importer so that sync-engagement attributes them and the report's revenue and
    lift sections have something to show. Order ids are derived from message ids: a rerun imports nothing new."""
    from membercare.data.importer import import_csv
    from membercare.sandbox.simulation import demo_orders, engaged_since, write_orders_csv
    from membercare.timeutil import utcnow

    engaged = engaged_since(engine, since)
    orders = demo_orders(engine, since, seed=seed, now=utcnow(), engaged=engaged)
    if not orders:
        return {"engaged": len(engaged), "orders": 0}
    settings = state.settings
    path = write_orders_csv(orders, home / "demo-orders.csv", currency=settings.shop_currency)
    rep = import_csv(engine, "orders", path, settings=settings, rejects_path=home / "demo-orders.rejects.csv")
    return {"engaged": len(engaged), "orders": rep.inserted}


CHANNEL_LETTERS = (("email", "e"), ("sms", "s"), ("push", "p"), ("line", "L"))


def campaign_table(results: list[tuple[str, dict[str, Any]]], title: str) -> Table:
    """Today's campaigns in five short columns, so the table reads whole in an 80-column terminal: sends by
    channel share one cell, and everything not sent today is one count (its reasons are in the report and
    ``membercare campaign status``)."""
    from rich import box

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, caption_justify="left",
              caption="planned: members new to today's occurrence; sent: e-mail/SMS/push/LINE; waiting: deferred "
                      "to a later hour; not sent: held out, skipped, suppressed or failed")
    t.add_column("campaign", no_wrap=True)
    for col in ("planned", "sent e/s/p/L", "waiting", "not sent"):
        t.add_column(col, justify="right", no_wrap=True)
    for label, r in results:
        by_channel = "/".join(f"{r['sent'].get(ch, 0):,}" for ch, _ in CHANNEL_LETTERS)
        not_sent = sum(r["skipped"].values()) + sum(r["suppressed"].values()) + sum(r["failed"].values())
        t.add_row(label, f"{r['newly_planned']:,}", by_channel, f"{r['deferred']:,}", f"{not_sent:,}")
    return t


def _print_summary(engine, home: Path, results, sync, services: DemoServices, started: float, *,
                   rerun: bool = False, journeys=None) -> None:
    from membercare.timeutil import parse_as_of, shop_today

    t = campaign_table(results, f"Today's lifecycle campaigns ({shop_today(state.settings.shop_timezone)}, "
                                f"{state.settings.shop_timezone})")
    new_total = sum(r["newly_planned"] for _, r in results)
    sent_now = sum(r["sent_now"] for _, r in results)
    console.print(t)
    if journeys is not None:
        from membercare.cli.demo_journeys import print_journeys_summary

        print_journeys_summary(console, journeys)
    with engine.connect() as conn:
        # "Today" is the shop's day, as for the campaigns (between 00:00 and 08:00 Taipei, UTC is a day behind).
        tz = state.settings.shop_timezone
        events = engagement_counts(conn, parse_as_of(shop_today(tz).isoformat(), tz))
        rows = shop_overview(conn)
    e = Table(title="Engagement today (simulated recipients, via signed webhooks)", show_header=False)
    e.add_column(style="bold")
    e.add_column(justify="right")
    for kind in sorted(events):
        e.add_row(kind, f"{events[kind]:,}")
    settled = sync.get("settled_from_events", 0) + sync.get("reconciled_from_records", 0)
    e.add_row("settled by sync-engagement", f"{settled:,}")
    hooks = sync.get("webhooks") or {}
    if hooks:
        def total(suffix: str) -> int:
            return sum(v for k, v in hooks.items() if k.endswith(suffix))

        e.add_row("webhook posts (ok / retried attempts / given up)",
                  f"{total('.posted'):,} / {total('.failed_attempts'):,} / {total('.gave_up'):,}")
    console.print(e)
    shop = Table(title="Demo shop", show_header=False)
    shop.add_column(style="bold")
    shop.add_column()
    for label, value in rows:
        shop.add_row(label, value)
    console.print(shop)
    if new_total == 0:
        console.print("[bold green]nothing sent twice:[/] every message of today's campaign occurrences was already "
                      "planned by an earlier run (outbox keys), so this run sent nothing new.")
    elif rerun:
        # Members can enter a segment between two runs of the same day (the simulated purchases move some into
        # "recommendations", for example): they get the message; those planned before are not planned again.
        console.print(f"[bold green]nothing sent twice:[/] messages planned by an earlier run today were not planned "
                      f"again (outbox keys); {new_total:,} new for members who entered a segment since, "
                      f"{sent_now:,} accepted by the sandbox providers in this run.")
    else:
        console.print(f"{sent_now:,} messages accepted by the sandbox providers in this run.")
    if not sync.get("drained", True):
        err_console.print("[yellow]note:[/] the sandbox still had engagement webhooks queued at the end")

    from membercare.rendering.gallery import write_gallery

    gallery = write_gallery(home / "gallery", state.settings)
    report, why = _report(home, services.env)
    console.print(f"[bold]HTML report:[/] {report}" if report else f"[bold]HTML report:[/] not written ({why})")
    console.print(f"[bold]message gallery:[/] {gallery}")
    ui = ("membercare ui   # starts the Prefect server on this home and prints the address to open"
          if not os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_HOME") == str(home / "prefect")
          else f"open {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    console.print(f"[bold]Prefect UI on these runs:[/] {ui}")
    console.print(f"done in {time.monotonic() - started:.1f} s.")
