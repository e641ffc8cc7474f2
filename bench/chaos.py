"""Chaos benchmark: the delivery engine under provider faults, SIGKILLs, dropped database connections and STOPs.

Not a timed test: a script that runs one campaign per run through the real pieces and counts what went
wrong. Per run it

1. creates a fresh PostgreSQL database (``--database-url`` names the server; its user must be allowed to
   ``CREATE DATABASE``), migrates it, generates a shop of ``--members`` members and stores a delivery policy
   without quiet hours or frequency cap (the figures must not depend on the hour the run starts at);
2. starts ``membercare sandbox`` (faults: 5xx, 429 with Retry-After, latency, ``ghost`` = accepted then
   the connection dropped) and ``membercare serve`` (the webhook receiver) as processes, wired so that the
   sandbox's signed webhooks reach the receiver;
3. plans one marketing campaign for every member (email, SMS, push) in a planner process that is
   SIGKILLed ``--planner-kills`` times and has its connections terminated once, then planned again to the
   end: the rerun must add nothing twice;
4. dispatches with ``--dispatchers`` processes of ``python -m membercare.delivery.pool`` while, at random
   points of progress, a dispatcher is SIGKILLed (and replaced) ``--kills`` times, the dispatchers' (and
   planner's) PostgreSQL connections are ended with ``pg_terminate_backend`` ``--terminations`` times from a
   separate connection, and ``--stops`` members whose SMS is not sent yet (half of them, when possible,
   with the row already claimed) text STOP: a signed Twilio inbound webhook goes to the receiver and the
   moment its 2xx arrives is recorded;
5. settles: waits for the dispatchers, turns rows left ``sending`` into ``unknown`` (``recover_stale``),
   settles ``unknown`` from the sandbox's records (``reconcile_unknown`` + ``SandboxRecords``) and
   dispatches again (two dispatcher processes that return when nothing is due), until nothing is open
   (at most ``--settle-rounds`` rounds);
6. counts, from the ledger and the sandbox's records (``GET /sandbox/messages``).

Figures (one table column and one JSON object per run; precise definitions in docs/delivery.md,
"Chaos benchmark"):

* ``planned``: outbox rows planned to be sent (state ``planned`` once planning finished);
  ``plan_added_twice``: rows beyond one per member after the killed and repeated planning;
* ``sent``: rows ``sent`` in the ledger at the end; ``accepted``: messages the sandbox accepted;
* ``duplicates``: sandbox acceptances beyond the first per message id;
* ``never_attempted_unsent``: rows left ``unknown``, ``planned``, ``deferred`` or ``sending`` at the end
  whose message id the sandbox never accepted (with the default faults every provider answer except a
  ghost's reaches the dispatcher, and ghosts are accepted, so these rows never reached the provider);
* ``unknown_before_reconcile``, ``reconciled``, ``unknown_after``: ``unknown`` rows once chaos ended and
  stale rows were recovered, how many of them ``reconcile_unknown`` found in the sandbox's records, and
  how many are left at the end;
* ``sends_after_stop``: SMS the sandbox accepted for a member after that member's STOP was acknowledged
  (2xx), later than the largest injected provider latency after it, so that the request surely started
  after the acknowledgement;
* ``dispatcher_exits_dropped_connection``: dispatcher processes we did not kill that exited with a
  database connection error; ``dispatcher_exits_other`` the rest of the unexpected exits;
* ``wall_s``: the whole run, shop generation included.

Usage (quick mode for development first; the default is 10,000 members, 12 kills)::

    .venv/bin/python bench/chaos.py --members 2000 --kills 5
    .venv/bin/python bench/chaos.py [--members 10000] [--kills 12] [--terminations 8] [--stops 100]
        [--dispatchers 4] [--runs 1] [--json PATH] [--database-url postgresql://postgres@127.0.0.1:5432/test]

Every loop is bounded in count and time (``--timeout`` per run); all traffic stays on 127.0.0.1; logs of
every process are written to a temporary folder that ``--keep`` keeps (with the database).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test doubles (tests/fakes.py)

import sqlalchemy as sa  # noqa: E402

CAMPAIGN, OCCURRENCE = "chaos", "chaos-1"
APP_DISPATCHER, APP_PLANNER, APP_RECEIVER = "mc-chaos-dispatcher", "mc-chaos-planner", "mc-chaos-receiver"
CHANNELS = ("email", "sms", "push")
OPEN_STATES = ("planned", "deferred", "sending")  # not settled yet
UNSENT_STATES = ("unknown", "planned", "deferred", "sending")  # left without a final decision or outcome
# What a process says on stderr when PostgreSQL ended its connection (pg_terminate_backend, a restart).
DROPPED = re.compile(r"OperationalError|AdminShutdown|terminating connection|server closed the connection|"
                     r"connection is closed|consuming input failed|connection to server at .* failed|"
                     r"InterfaceError")

# The figures every run reports, in table order: (key, label).
FIGURES = (
    ("members", "members"),
    ("planned", "planned"),
    ("plan_added_twice", "plan: rows added twice"),
    ("planner_kills", "planner SIGKILLs"),
    ("planner_exits_dropped_connection", "planner exits (dropped conn.)"),
    ("sent", "sent (ledger)"),
    ("accepted", "accepted (sandbox)"),
    ("duplicates", "duplicates"),
    ("never_attempted_unsent", "not sent, never reached the provider"),
    ("unsent_without_attempt", "  of which never attempted"),
    ("unknown_before_reconcile", "unknown before reconcile"),
    ("reconciled", "settled by reconciler"),
    ("never_received", "confirmed never received (sent)"),
    ("unknown_after", "unknown at the end"),
    ("stops_acknowledged", "STOPs acknowledged"),
    ("stops_on_claimed_rows", "STOPs on claimed rows"),
    ("sends_after_stop", "sends after acked STOP"),
    ("members_sent_after_stop", "members sent after STOP"),
    ("max_send_after_stop_s", "latest send after STOP (s)"),
    ("kills", "dispatcher SIGKILLs"),
    ("terminations", "pg_terminate_backend calls"),
    ("backends_terminated", "backends terminated"),
    ("dispatcher_exits_dropped_connection", "dispatcher exits (dropped conn.)"),
    ("dispatcher_exits_other", "dispatcher exits (other)"),
    ("wall_s", "wall time (s)"),
)


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    members: int = 10_000
    kills: int = 12
    planner_kills: int = 2
    terminations: int = 8
    stops: int | None = None  # default: members // 100, at least 3
    dispatchers: int = 4
    workers: int = 8
    batch_size: int = 100
    lease_s: float = 15.0
    error_rate: float = 0.05
    ghost_rate: float = 0.02
    latency_ms: float = 100.0
    latency_jitter_ms: float = 100.0
    provider_rate: float | None = 80.0  # accepted requests/s per channel before 429s; None: unlimited
    terminate_receiver: bool = False
    settle_rounds: int = 5
    seed: int = 7
    runs: int = 1
    timeout_s: float = 900.0
    database_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    keep: bool = False

    @property
    def stop_count(self) -> int:
        return self.stops if self.stops is not None else max(3, self.members // 100)

    @property
    def max_latency_s(self) -> float:
        return (self.latency_ms + self.latency_jitter_ms) / 1000.0

    def validate(self) -> Options:
        if self.members < 10:
            raise SystemExit("--members must be at least 10")
        if not 1 <= self.dispatchers <= 16:
            raise SystemExit("--dispatchers must be 1-16")
        if min(self.kills, self.planner_kills, self.terminations, self.stop_count) < 0:
            raise SystemExit("--kills, --planner-kills, --terminations and --stops must not be negative")
        if self.workers < 1 or self.batch_size < 1 or self.lease_s <= 0 or self.runs < 1 or self.settle_rounds < 1:
            raise SystemExit("--workers, --batch-size, --lease-s, --runs and --settle-rounds must be positive")
        if not 0 <= self.error_rate + self.ghost_rate <= 1:
            raise SystemExit("--error-rate and --ghost-rate must be within [0, 1] together")
        host = sa.engine.make_url(self.database_url).host or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--database-url must point at a loopback PostgreSQL server, not {host!r}")
        return self


def dispatch_config(opts: Options):
    """The dispatchers' configuration: fast retries so that a run settles within minutes."""
    from membercare.delivery.dispatcher import DispatchConfig

    return DispatchConfig(workers=opts.workers, batch_size=opts.batch_size, lease=timedelta(seconds=opts.lease_s),
                          backoff_base=0.2, backoff_max=3.0, wait_for_deferred=5.0, flush_interval=0.1)


def _config_json(config) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = {"seconds": value.total_seconds()} if isinstance(value, timedelta) else (
            dict(value) if isinstance(value, dict) else value)
    return out


def with_app_name(url: str, name: str) -> str:
    """``url`` whose connections show up in ``pg_stat_activity`` as ``application_name = name``."""
    u = sa.engine.make_url(url)
    return u.set(query={**u.query, "application_name": name}).render_as_string(hide_password=False)


# ------------------------------------------------------------------------------------------------ planning


def plan_child(url: str, batch: int) -> None:
    """The planner process: one marketing campaign for every member, email/SMS/push (idempotent rerun)."""
    from fakes import simple_renderer
    from membercare.db import make_engine
    from membercare.delivery.planner import PlanSpec, plan_run
    from membercare.delivery.policies import PolicySettings
    from membercare.models import Channel, Member, Purpose

    engine = make_engine(url)
    with engine.connect() as conn:
        ids = list(conn.execute(sa.select(Member.__table__.c.id).order_by(Member.__table__.c.id)).scalars())
    spec = PlanSpec(CAMPAIGN, OCCURRENCE, Purpose.MARKETING, (Channel.EMAIL, Channel.SMS, Channel.PUSH))
    rep = plan_run(engine, spec, [ids[i : i + batch] for i in range(0, len(ids), batch)],
                   datetime.now(UTC), simple_renderer,
                   policy=PolicySettings(marketing_cap=None, quiet_hours=None))
    engine.dispose()
    print(json.dumps({"run_id": rep.run_id, "inserted": rep.inserted, "already_planned": rep.already_planned}),
          flush=True)


# ----------------------------------------------------------------------------------------------- processes


@dataclass
class Child:
    """A process we started: a planner or a dispatcher, its logs, and whether we killed it."""

    proc: subprocess.Popen
    log: Path
    killed: bool = False
    started: float = field(default_factory=time.monotonic)

    def exit_kind(self) -> str:
        """``killed``, ``ok``, ``dropped_connection`` or ``other`` (only once it exited)."""
        if self.killed:
            return "killed"
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        report = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), None)
        if self.proc.returncode == 0 and report is not None and '"error"' not in report:
            return "ok"
        return "dropped_connection" if DROPPED.search(text) else "other"

    def last_error(self) -> str:
        """The last exception line of the log, cut short (class and message; never bound values)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [ln for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception|Paused|Shutdown)\b", ln)]
        return (lines[-1] if lines else f"exit code {self.proc.returncode}")[:160].split("[SQL:")[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM to the service's process group (it runs in its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One run's moving parts and counters."""

    opts: Options
    rng: random.Random
    workdir: Path
    url: str  # the run's database (no application name)
    engine: Any
    admin: Any  # a separate engine for pg_terminate_backend
    env: dict[str, str] = field(default_factory=dict)  # the dispatchers' environment
    sandbox_url: str = ""
    receiver_url: str = ""
    run_id: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    stops: dict[int, float] = field(default_factory=dict)  # member id -> Unix time the STOP's 2xx arrived
    exits: Counter = field(default_factory=Counter)  # unexpected dispatcher exits by kind
    errors: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str], stdin: str | None = None) -> Child:
        """A child process whose output goes to ``NNN-name.log`` in the run's folder."""
        log = self.workdir / f"{len(self.children) + 1:03d}-{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        child = Child(proc, log)
        self.children.append(child)
        return child

    def reap(self, child: Child) -> str:
        """Classify an exited dispatcher; unexpected exits are counted and their error noted."""
        kind = child.exit_kind()
        if kind in ("dropped_connection", "other"):
            self.exits[kind] += 1
            self.errors.append(f"dispatcher ({kind}): {child.last_error()}")
        return kind

    def states(self) -> Counter:
        from membercare.delivery.models import OutboxMessage

        o = OutboxMessage.__table__
        with self.engine.connect() as conn:
            return Counter(dict(conn.execute(sa.select(o.c.state, sa.func.count()).where(o.c.run_id == self.run_id)
                                             .group_by(o.c.state)).all()))

    def due_now(self) -> int:
        """Rows a dispatcher started now would claim (planned, or deferred and due within two seconds)."""
        from membercare.delivery.models import OutboxMessage

        o = OutboxMessage.__table__
        soon = datetime.now(UTC) + timedelta(seconds=2)
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).where(
                o.c.run_id == self.run_id, sa.or_(o.c.state == "planned",
                                                  sa.and_(o.c.state == "deferred", o.c.next_attempt_at <= soon)))
            ).scalar_one()

    def terminate_backends(self, names: tuple[str, ...]) -> int:
        """End every connection of the run's database whose application name is in ``names``."""
        database = sa.engine.make_url(self.url).database
        with self.admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            rows = conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db "
                "AND application_name = ANY(:names) AND pid <> pg_backend_pid()"),
                {"db": database, "names": list(names)}).scalars().all()
        self.figures["terminations"] = self.figures.get("terminations", 0) + 1
        self.figures["backends_terminated"] = self.figures.get("backends_terminated", 0) + sum(bool(r) for r in rows)
        return len(rows)

    def targets(self) -> tuple[str, ...]:
        return (APP_DISPATCHER, APP_PLANNER) + ((APP_RECEIVER,) if self.opts.terminate_receiver else ())


def fresh_database(server_url: str) -> tuple[str, Any]:
    """A new empty database on the server (like tests/conftest.py): its URL and the admin engine."""
    from membercare.db import make_engine

    admin = make_engine(server_url)
    name = f"mc_chaos_{secrets.token_hex(5)}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False), admin


def drop_database(admin, url: str) -> None:
    name = sa.engine.make_url(url).database
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def configure_sandbox(run: Run) -> None:
    import httpx

    o = run.opts
    behaviour = {"error_rate": o.error_rate, "ghost_rate": o.ghost_rate, "latency_ms": o.latency_ms,
                 "latency_jitter_ms": o.latency_jitter_ms, "rate_limit": o.provider_rate,
                 "burst": max(1.0, o.provider_rate / 4) if o.provider_rate else None}
    patch: dict[str, Any] = {ch: dict(behaviour) for ch in CHANNELS}
    # The only opt-outs are the benchmark's own STOPs, whose timing it knows.
    patch["engagement"] = {ch: {"unsubscribed": 0.0, "complained": 0.0} for ch in CHANNELS}
    httpx.post(run.sandbox_url + "/sandbox/config", json=patch, timeout=30).raise_for_status()


def phase_plan(run: Run, deadline: float) -> None:
    """Plan in a process that is SIGKILLed and loses its connection on the way, then plan to the end."""
    from membercare.delivery.models import CampaignRun, OutboxMessage

    o, r = OutboxMessage.__table__, CampaignRun.__table__
    opts = run.opts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plan-child", with_app_name(run.url, APP_PLANNER),
           "--plan-batch", "100"]

    def rows() -> int:
        with run.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(o.join(r, o.c.run_id == r.c.id))
                                .where(r.c.campaign == CAMPAIGN, r.c.occurrence == OCCURRENCE)).scalar_one()

    # Disruptions at random points of progress: kills, and one dropped connection.
    events = sorted([(run.rng.uniform(0.1, 0.8), "kill") for _ in range(opts.planner_kills)]
                    + ([(run.rng.uniform(0.1, 0.8), "terminate")] if opts.terminations else []))
    kills = 0
    exits: Counter = Counter()
    for _ in range(len(events) + 4):  # bounded: one start per disruption, then a few to finish
        child = run.start("planner", cmd, env)
        while child.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            if events and rows() >= events[0][0] * opts.members:
                _, what = events.pop(0)
                if what == "kill":
                    child.kill()
                    kills += 1
                else:
                    run.terminate_backends((APP_PLANNER,))
        if child.proc.poll() is None:
            child.kill()
            raise SystemExit(f"planning did not finish in time (log {child.log})")
        kind = child.exit_kind()
        if kind == "ok":
            run.run_id = json.loads(child.log.read_text().strip().splitlines()[-1])["run_id"]
            break
        if kind != "killed":
            exits[kind] += 1
            run.errors.append(f"planner ({kind}): {child.last_error()}")
    else:
        raise SystemExit("planning did not finish after repeated attempts (see the planner logs)")
    with run.engine.connect() as conn:
        total, members = conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(o.c.member_id)))
                                      .where(o.c.run_id == run.run_id)).one()
    run.figures.update(planned=run.states().get("planned", 0), plan_rows=total, plan_added_twice=total - members,
                       planner_kills=kills, planner_exits_dropped_connection=exits["dropped_connection"],
                       planner_exits_other=exits["other"])


def start_dispatcher(run: Run) -> Child:
    job = {"database_url": with_app_name(run.url, APP_DISPATCHER), "run_id": run.run_id, "resume": True,
           "config": _config_json(dispatch_config(run.opts)), "channels": None, "shared_limits": []}
    return run.start("dispatcher", [sys.executable, "-m", "membercare.delivery.pool"], run.env, json.dumps(job))


def send_stop(run: Run) -> bool:
    """A signed Twilio inbound STOP from a random member whose SMS is not sent yet; records the 2xx time."""
    import httpx

    from bench.e2e.harness import TWILIO_SID, TWILIO_TOKEN
    from channels.twilio.webhooks import SIGNATURE_HEADER, twilio_signature
    from membercare.delivery.models import OutboxMessage
    from membercare.models import Member

    o, m = OutboxMessage.__table__, Member.__table__
    with run.engine.connect() as conn:
        candidates = conn.execute(sa.select(o.c.member_id, o.c.state, m.c.phone).join(m, m.c.id == o.c.member_id)
                                  .where(o.c.run_id == run.run_id, o.c.channel == "sms",
                                         o.c.state.in_(OPEN_STATES), m.c.phone.is_not(None))).all()
    candidates = [c for c in candidates if c.member_id not in run.stops]
    if not candidates:
        return False
    # Half of the STOPs, when there are any, hit rows already claimed by a dispatcher: the claim-time consent
    # check has passed for those, so only a check right before the provider call can still stop them.
    claimed = [c for c in candidates if c.state == "sending"]
    member_id, state, phone = run.rng.choice(claimed if claimed and run.rng.random() < 0.5 else candidates)
    sid = "SM" + secrets.token_hex(16)
    url = run.receiver_url + "/webhooks/twilio/inbound"
    params = {"AccountSid": TWILIO_SID, "ApiVersion": "2010-04-01", "MessageSid": sid, "SmsSid": sid,
              "SmsMessageSid": sid, "From": phone, "To": "+886223456789", "Body": "STOP", "NumMedia": "0",
              "NumSegments": "1", "OptOutType": "STOP", "SmsStatus": "received"}
    headers = {SIGNATURE_HEADER: twilio_signature(TWILIO_TOKEN, url, params)}
    for _ in range(3):  # Twilio retries a webhook that did not get a 2xx
        try:
            resp = httpx.post(url, data=params, headers=headers, timeout=10)
        except httpx.HTTPError:
            continue
        if 200 <= resp.status_code < 300:
            run.stops[member_id] = time.time()
            run.figures["stops_on_claimed_rows"] += state == "sending"
            return True
    run.figures["stops_unacknowledged"] += 1
    return True


def phase_dispatch(run: Run, deadline: float) -> None:
    """Dispatchers at work while kills, dropped connections and STOPs land at random points of progress."""
    opts = run.opts
    planned = max(1, run.figures["planned"])
    run.figures.update(stops_on_claimed_rows=0, stops_unacknowledged=0)
    events = sorted([(run.rng.uniform(0.05, 0.85), "kill") for _ in range(opts.kills)]
                    + [(run.rng.uniform(0.05, 0.85), "terminate") for _ in range(opts.terminations)]
                    + [(run.rng.uniform(0.02, 0.8), "stop") for _ in range(opts.stop_count)])
    live: list[Child] = [start_dispatcher(run) for _ in range(opts.dispatchers)]
    max_starts = opts.dispatchers + opts.kills + 200  # replacements and restarts after idle exits
    started = len(live)
    kills = 0
    last_restart = 0.0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        for child in [c for c in live if c.proc.poll() is not None]:
            live.remove(child)
            run.reap(child)
        states = run.states()
        progress = 1.0 - sum(states.get(s, 0) for s in OPEN_STATES) / planned
        while events and progress >= events[0][0]:
            _, what = events.pop(0)
            if what == "kill" and live:
                # Preferably one that is past its start-up (imports, adapters) and at work.
                working = [c for c in live if time.monotonic() - c.started > 3.0]
                run.rng.choice(working or live).kill()
                kills += 1
            elif what == "terminate":
                run.terminate_backends(run.targets())
            elif what == "stop":
                send_stop(run)
        due = run.due_now()
        if due and len(live) < opts.dispatchers and started < max_starts and time.monotonic() - last_restart > 0.5:
            live.append(start_dispatcher(run))
            started += 1
            last_restart = time.monotonic()
        if not live and not due:
            if events and states.get("deferred", 0):
                continue  # retries are due later: the dispatchers come back for them
            break
    else:
        run.errors.append("the chaos phase reached its time limit")
    for child in live:  # the time limit: stop the rest (their rows are recovered like a crash's)
        child.kill()
    run.figures.update(kills=kills, events_not_reached=len(events))


def phase_settle(run: Run, deadline: float) -> None:
    """Recover, reconcile from the sandbox's records and dispatch again until nothing is due."""
    import httpx

    from membercare.delivery.provider_records import provider_records_from_env
    from membercare.delivery.reconcile import SandboxRecords, reconcile_unknown, recover_stale
    from membercare.timeutil import utcnow

    # The product's own provider lookups (Twilio's message list, SendGrid's event stream) plus the sandbox's
    # record of acceptances. "Never received" may only be concluded once the providers' documented windows
    # have passed (Twilio's 10 h queueing limit, SendGrid's 24 h of webhook retries): the bench settles as
    # the sync-engagement run a day later would, by reconciling at now + 26 h. Nothing else is simulated.
    records = provider_records_from_env(run.engine, run.env, also=[SandboxRecords(run.sandbox_url)])
    later = utcnow() + timedelta(hours=26)
    reconciled = never_received = 0
    for i in range(run.opts.settle_rounds):
        recover_stale(run.engine, lease=timedelta(0), run_id=run.run_id)  # every dispatcher has stopped
        # Provider events (status callbacks, SendGrid events, app reports) settle rows too: let them land.
        httpx.post(run.sandbox_url + "/sandbox/drain", params={"timeout": 30}, timeout=60)
        if i == 0:
            run.figures["unknown_before_reconcile"] = run.states().get("unknown", 0)
        rec = reconcile_unknown(run.engine, run_id=run.run_id, records=records, grace=timedelta(0), now=later)
        reconciled += rec.found_sent
        never_received += rec.never_received
        if (not any(run.states().get(s, 0) for s in OPEN_STATES) or i == run.opts.settle_rounds - 1
                or time.monotonic() > deadline):
            break
        # Dispatch again, as the scheduler would: processes that return when nothing is due any more.
        live = [start_dispatcher(run) for _ in range(min(2, run.opts.dispatchers))]
        while any(c.proc.poll() is None for c in live) and time.monotonic() < deadline:
            time.sleep(0.2)
        for child in live:
            if child.proc.poll() is None:
                child.kill()
                run.errors.append("a settling dispatcher was still running at the time limit")
            else:
                run.reap(child)
    httpx.post(run.sandbox_url + "/sandbox/drain", params={"timeout": 30}, timeout=60)
    if records is not None:
        records.close()
    run.figures["reconciled"] = reconciled
    run.figures["never_received"] = never_received


def sandbox_records(url: str) -> list[dict[str, Any]]:
    import httpx

    out: list[dict[str, Any]] = []
    since = 0
    for _ in range(10_000):  # pages of 50,000: bounded far above any run size
        body = httpx.get(url + "/sandbox/messages", params={"since": since, "limit": 50_000}, timeout=60).json()
        out += body["messages"]
        if body["count"] < 50_000:
            return out
        since = body["last_seq"]
    return out


def measure(run: Run) -> None:
    """The figures from the ledger and the sandbox's records."""
    from membercare.delivery.models import OutboxMessage

    o = OutboxMessage.__table__
    with run.engine.connect() as conn:
        ledger = conn.execute(sa.select(o.c.message_id, o.c.member_id, o.c.state, o.c.reason_code, o.c.channel,
                                        o.c.attempt_started_at).where(o.c.run_id == run.run_id)).all()
    records = sandbox_records(run.sandbox_url)
    per_id = Counter(r["message_id"] for r in records if r["message_id"])
    states = Counter(r.state for r in ledger)
    member_of = {r.message_id: r.member_id for r in ledger}
    late: list[tuple[int, float]] = []
    for rec in records:
        member = member_of.get(rec["message_id"])
        if rec["channel"] != "sms" or member not in run.stops:
            continue
        accepted = datetime.fromisoformat(rec["accepted_at"].replace("Z", "+00:00")).timestamp()
        # Accepted after the STOP's 2xx by more than the longest injected latency: the request started after it.
        if accepted - run.opts.max_latency_s > run.stops[member]:
            late.append((member, accepted - run.stops[member]))
    run.figures.update(
        sent=states.get("sent", 0), accepted=len(records),
        duplicates=sum(n - 1 for n in per_id.values() if n > 1),
        records_without_message_id=sum(1 for r in records if not r["message_id"]),
        never_attempted_unsent=sum(1 for r in ledger if r.state in UNSENT_STATES and r.message_id not in per_id),
        # Of those: rows whose provider call had begun when their dispatcher was killed (the request never
        # reached the sandbox) and that no provider lookup can settle, by channel; and rows never attempted.
        unreached_in_flight_by_channel=dict(Counter(
            r.channel for r in ledger if r.state in UNSENT_STATES and r.message_id not in per_id
            and r.attempt_started_at is not None)),
        unsent_without_attempt=sum(1 for r in ledger if r.state in UNSENT_STATES and r.message_id not in per_id
                                   and r.attempt_started_at is None),
        accepted_not_sent_in_ledger=sum(1 for r in ledger if r.state != "sent" and r.message_id in per_id),
        sent_without_record=sum(1 for r in ledger if r.state == "sent" and r.message_id not in per_id),
        unknown_after=states.get("unknown", 0),
        stops_acknowledged=len(run.stops), sends_after_stop=len(late),
        members_sent_after_stop=len({m for m, _ in late}),
        max_send_after_stop_s=round(max((d for _, d in late), default=0.0), 2),
        dispatcher_exits_dropped_connection=run.exits["dropped_connection"],
        dispatcher_exits_other=run.exits["other"],
        final_states=dict(sorted(states.items())),
        reasons_left_unsent=dict(Counter(r.reason_code for r in ledger if r.state in UNSENT_STATES)),
    )
    import httpx

    stats = httpx.get(run.sandbox_url + "/sandbox/stats", timeout=30).json()
    run.figures["sandbox_faults"] = stats["faults"]
    run.figures["sandbox_throttled"] = stats["throttled"]


def run_once(opts: Options, index: int) -> dict[str, Any]:
    from bench.e2e.harness import start_services
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine, upgrade
    from membercare.delivery.policies import PolicySettings, save_policy

    t0 = time.monotonic()
    deadline = t0 + opts.timeout_s
    url, admin = fresh_database(opts.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="membercare-chaos-"))
    engine = services = run = None
    live_note = f"run {index + 1}/{opts.runs}"
    try:
        upgrade(url)
        engine = make_engine(url)
        run = Run(opts, random.Random(opts.seed + index), workdir, url, engine, admin)
        print(f"{live_note}: generating {opts.members:,} members", file=sys.stderr, flush=True)
        generate_shop(engine, members=opts.members, seed=opts.seed)
        with engine.begin() as conn:
            save_policy(conn, PolicySettings(marketing_cap=None, quiet_hours=None))
        services = start_services(workdir, with_app_name(url, APP_RECEIVER), opts.seed, "chaos")
        run.sandbox_url, run.receiver_url = services.sandbox_url, services.receiver_url
        run.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}, **services.env,
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        configure_sandbox(run)
        print(f"{live_note}: planning (planner SIGKILLed {opts.planner_kills}x)", file=sys.stderr, flush=True)
        phase_plan(run, t0 + opts.timeout_s * 0.4)
        t_plan = time.monotonic()
        print(f"{live_note}: dispatching {run.figures['planned']:,} messages with {opts.dispatchers} dispatchers "
              f"({opts.kills} kills, {opts.terminations} terminations, {opts.stop_count} STOPs)",
              file=sys.stderr, flush=True)
        phase_dispatch(run, t0 + opts.timeout_s * 0.75)
        t_dispatch = time.monotonic()
        print(f"{live_note}: settling", file=sys.stderr, flush=True)
        phase_settle(run, deadline)
        t_settle = time.monotonic()
        measure(run)
        run.figures.update(members=opts.members, wall_s=round(time.monotonic() - t0, 1),
                           phase_s={"generate_and_plan": round(t_plan - t0, 1),
                                    "dispatch": round(t_dispatch - t_plan, 1),
                                    "settle": round(t_settle - t_dispatch, 1)},
                           errors=run.errors[:50], workdir=str(workdir) if opts.keep else None)
        return run.figures
    finally:
        for child in run.children if run is not None else ():
            child.kill()  # only processes still running (an interruption or an error)
        if services is not None:
            stop_service(services.sandbox)
            stop_service(services.receiver)
        if engine is not None:
            engine.dispose()
        if not opts.keep:
            drop_database(admin, url)
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        admin.dispose()


# ------------------------------------------------------------------------------------------------- output


def table(results: list[dict[str, Any]]) -> str:
    head = ["figure"] + [f"run {i + 1}" for i in range(len(results))]
    rows = [[label] + [str(r.get(key, "-")) for r in results] for key, label in FIGURES]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    d = Options()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=d.members)
    ap.add_argument("--kills", type=int, default=d.kills, help="dispatcher SIGKILLs per run")
    ap.add_argument("--planner-kills", type=int, default=d.planner_kills)
    ap.add_argument("--terminations", type=int, default=d.terminations,
                    help="pg_terminate_backend rounds during dispatch (one more during planning when > 0)")
    ap.add_argument("--stops", type=int, default=None, help="STOPs during dispatch (default members/100, at least 3)")
    ap.add_argument("--dispatchers", type=int, default=d.dispatchers)
    ap.add_argument("--workers", type=int, default=d.workers, help="provider calls in flight per dispatcher")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per claim")
    ap.add_argument("--lease-s", type=float, default=d.lease_s,
                    help="after this, a dead dispatcher's rows are recovered by the next one that starts")
    ap.add_argument("--error-rate", type=float, default=d.error_rate, help="share of provider requests answered 5xx")
    ap.add_argument("--ghost-rate", type=float, default=d.ghost_rate,
                    help="share accepted and then the connection dropped")
    ap.add_argument("--latency-ms", type=float, default=d.latency_ms)
    ap.add_argument("--latency-jitter-ms", type=float, default=d.latency_jitter_ms)
    ap.add_argument("--provider-rate", type=float, default=d.provider_rate,
                    help="requests/s per channel the sandbox accepts before answering 429 (0: unlimited)")
    ap.add_argument("--terminate-receiver", action="store_true", help="end the receiver's connections too")
    ap.add_argument("--settle-rounds", type=int, default=d.settle_rounds)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--runs", type=int, default=d.runs)
    ap.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per run at most")
    ap.add_argument("--database-url", default=d.database_url, help="PostgreSQL server (a database is made per run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures of every run here")
    ap.add_argument("--keep", action="store_true", help="keep each run's database and logs")
    ap.add_argument("--plan-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-batch", type=int, default=100, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    opts = Options(members=a.members, kills=a.kills, planner_kills=a.planner_kills, terminations=a.terminations,
                   stops=a.stops, dispatchers=a.dispatchers, workers=a.workers, batch_size=a.batch_size,
                   lease_s=a.lease_s, error_rate=a.error_rate, ghost_rate=a.ghost_rate, latency_ms=a.latency_ms,
                   latency_jitter_ms=a.latency_jitter_ms, provider_rate=a.provider_rate or None,
                   terminate_receiver=a.terminate_receiver, settle_rounds=a.settle_rounds, seed=a.seed, runs=a.runs,
                   timeout_s=a.timeout, database_url=a.database_url, keep=a.keep)
    return a, opts


def main(argv: list[str] | None = None) -> None:
    args, opts = parse_args(argv)
    if args.plan_child:
        return plan_child(args.plan_child, args.plan_batch)
    opts.validate()
    results = []
    for i in range(opts.runs):
        results.append(run_once(opts, i))
        if args.json:  # written after every run: a later failure keeps the earlier figures
            shown = {**dataclasses.asdict(opts), "database_url": sa.engine.make_url(opts.database_url)
                     .render_as_string(hide_password=True)}
            args.json.write_text(json.dumps({"options": shown, "runs": results}, indent=1))
    print(table(results))
    for i, r in enumerate(results):
        for error in r.get("errors", []):
            print(f"run {i + 1}: {error}")


if __name__ == "__main__":
    main()
