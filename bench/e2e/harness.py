"""End-to-end benchmark: one campaign per shop size through the real flows, sandbox and receiver.

For every size the harness

1. takes a generated shop from the cache (``--cache``; generated once per ``(members, seed)`` and copied per
   run, the cached file is never written to) or, on PostgreSQL, generates it into a fresh database;
2. starts ``membercare sandbox`` (zero provider latency) and ``membercare serve`` (the webhook receiver) as
   separate processes, wired so that the sandbox's simulated recipients post signed webhooks to the receiver;
3. runs the ``bench_daily`` campaign (every member of the shop, 10 % holdout) through the real Prefect flow
   ``flows.campaign.run_campaign`` in Prefect's local ephemeral mode, timing our domain calls (the stages of
   :mod:`membercare.campaigns`, which the flows call through their modules) from the outside so that
   Prefect's share of each stage is what is left;
4. waits until the sandbox's webhook queue has drained and runs ``flows.engagement.sync_engagement``;
5. reads the Prefect task runs of both flow runs from the Prefect API, the peak RSS of every process, and
   checks that every message the ledger says was sent reached the sandbox exactly once.

Then it runs the naive one-task-per-message Prefect flow (``bench.per_message_baseline``) at the
``--baseline`` sizes against the same sandbox set-up, for the throughput ratio. Stage definitions and how
to read the figures: ``docs/benchmark.md``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from membercare.errors import ConfigurationError, InputError

# The shop's "today" of every benchmark shop: fixed, so that a cached shop stays valid on later days.
SHOP_DATE = date(2026, 11, 23)
DEFAULT_CACHE = Path("/tmp/membercare-bench-cache")
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_BASELINE = (1_000, 10_000)
BENCH_CAMPAIGN = "bench_daily"
# Campaign stages in flow order; "summarise" (ledger counts and artifacts) is reported but small.
STAGES = ("segment", "plan_render", "dispatch", "summarise", "webhooks")
STAGE_LABELS = {"segment": "segment", "plan_render": "plan and render", "dispatch": "dispatch",
                "summarise": "summarise", "webhooks": "webhook ingestion"}
PACKAGES = ("prefect", "sendgrid", "twilio", "firebase-admin", "sqlalchemy", "jinja2", "aiohttp", "uvicorn",
            "psycopg")

# Credentials the sandbox is told to accept; they mean nothing anywhere else.
SENDGRID_KEY = "SG.membercare-bench"
TWILIO_SID = "AC" + "b" * 32
TWILIO_TOKEN = "membercare-bench-auth-token"
FCM_PROJECT = "membercare-bench"
SA_EMAIL = f"push@{FCM_PROJECT}.iam.gserviceaccount.com"

_CLI = ("import sys, importlib, membercare.cli as c; importlib.import_module('membercare.cli.{mod}'); "
        "c.main(sys.argv[1:])")

Progress = Callable[[str], None]


@dataclass
class BenchOptions:
    """What ``membercare bench`` runs. Sizes are shop sizes in members (the campaign reaches nearly all)."""

    members: Sequence[int] = DEFAULT_SIZES
    baseline: Sequence[int] = DEFAULT_BASELINE
    out: Path | None = None
    cache: Path = DEFAULT_CACHE
    seed: int = 42
    db: str = "sqlite"
    postgres_url: str | None = None
    keep: bool = False
    drain_timeout_s: float = 1800.0
    baseline_timeout_s: float | None = 1800.0
    group_size: int | None = None  # members per planning task; None: the flow's default
    dispatchers: int = 1  # the flow's ``dispatchers`` parameter (dispatcher processes per pass)
    processes: int | None = None  # the flow's ``processes`` parameter (planning workers; None: the flow's default)
    verify_messages_up_to: int = 20_000  # compare message ids one by one up to this many sent messages
    ceilings: bool = True  # bare render + insert, raw aiohttp sends (bench/e2e/ceilings.py), per size
    segments: bool = True  # RFM and every standard segment on SQLite vs DuckDB, per size (SQLite runs only)

    def validate(self) -> BenchOptions:
        if not self.members:
            raise InputError("--members: give at least one shop size")
        for n in self.members:
            if n < 1:
                raise InputError(f"--members: sizes must be positive (got {n})")
        for n in self.baseline:
            if n < 0:
                raise InputError(f"--baseline: sizes must be 0 (skip) or positive (got {n})")
        if self.db not in ("sqlite", "postgres"):
            raise InputError(f"--db must be sqlite or postgres (got {self.db!r})")
        if self.db == "postgres" and not self.postgres_url:
            raise ConfigurationError("--db postgres needs --postgres-url or MEMBERCARE_DATABASE_URL (a server URL "
                                     "whose user may CREATE DATABASE; a fresh database is made per size)")
        if self.seed < 0:
            raise InputError(f"--seed must be non-negative (got {self.seed})")
        if not 1 <= self.dispatchers <= 16:
            raise InputError(f"--dispatchers must be 1-16 (got {self.dispatchers})")
        if self.processes is not None and not 0 <= self.processes <= 16:
            raise InputError(f"--processes must be 0-16 (got {self.processes})")
        return self


def parse_sizes(text: str, what: str) -> list[int]:
    """``"10000,100000,1e6"`` or ``"10k,1M"`` -> ints; a clear error naming the bad item."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        mult = 1
        low = item.lower().replace("_", "")
        if low.endswith("k"):
            mult, low = 1_000, low[:-1]
        elif low.endswith("m"):
            mult, low = 1_000_000, low[:-1]
        try:
            value = float(low) * mult
        except ValueError:
            raise InputError(f"{what}: {item!r} is not a number (use e.g. 10000,100000 or 10k,1M)") from None
        if value != int(value) or value < 0:
            raise InputError(f"{what}: {item!r} is not a whole non-negative number")
        out.append(int(value))
    return out


# ------------------------------------------------------------------------------------------------ shops


def shop_as_of() -> datetime:
    from membercare.data.generator import default_as_of

    return default_as_of(today=SHOP_DATE)


def cache_path(cache: Path, members: int, seed: int) -> Path:
    return cache / f"shop-{members}-seed{seed}-{SHOP_DATE:%Y%m%d}.sqlite"


def cached_shop(cache: Path, members: int, seed: int, progress: Progress | None = None) -> tuple[Path, dict]:
    """The cached SQLite shop of ``members`` members (generated now when missing) and its generation facts.

    The shop is written to a ``.partial`` file, checkpointed (no WAL left beside it) and renamed, so a
    crash never leaves a half shop that looks complete.
    """
    from membercare.data.generator import generate_shop
    from membercare.db import make_engine, upgrade

    path = cache_path(cache, members, seed)
    meta_path = path.with_suffix(".json")
    if path.is_file():
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return path, {**meta, "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    url = f"sqlite:///{tmp}"
    upgrade(url)
    engine = make_engine(url)
    if progress:
        progress(f"generating a shop of {members:,} members (seed {seed}) into the cache {cache}")
    step = max(members // 10, 5000)
    summary = generate_shop(engine, members=members, seed=seed, as_of=shop_as_of(),
                            progress=(lambda d, t: progress(f"  generated {d:,}/{t:,} members")
                                      if progress and d and d % step == 0 and d < t else None))
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    os.replace(tmp, path)
    meta = {"members": members, "seed": seed, "as_of": summary.as_of.isoformat(),
            "generation_s": round(summary.seconds, 2), "rows": summary.counts}
    meta_path.write_text(json.dumps(meta, indent=1))
    return path, {**meta, "cached": False}


@contextmanager
def shop_database(opts: BenchOptions, workdir: Path, members: int, progress: Progress) -> Iterator[tuple[str, dict]]:
    """A database URL holding a fresh copy of the shop (removed afterwards unless ``keep``)."""
    from membercare.db import make_engine, upgrade
    from membercare.delivery.policies import PolicySettings, save_policy

    if opts.db == "sqlite":
        src, meta = cached_shop(opts.cache, members, opts.seed, progress)
        dst = workdir / f"shop-{members}.sqlite"
        t0 = time.perf_counter()
        shutil.copyfile(src, dst)
        meta = {**meta, "copy_s": round(time.perf_counter() - t0, 2)}
        url = f"sqlite:///{dst}"
        cleanup = lambda: [Path(f"{dst}{s}").unlink(missing_ok=True) for s in ("", "-wal", "-shm")]  # noqa: E731
    else:
        url, cleanup = _fresh_postgres(opts.postgres_url, f"mc_bench_{members}_{secrets.token_hex(3)}")
        from membercare.data.generator import generate_shop

        upgrade(url)
        engine = make_engine(url)
        progress(f"generating a shop of {members:,} members into PostgreSQL")
        summary = generate_shop(engine, members=members, seed=opts.seed, as_of=shop_as_of())
        engine.dispose()
        meta = {"members": members, "seed": opts.seed, "generation_s": round(summary.seconds, 2),
                "rows": summary.counts, "cached": False}
    try:
        upgrade(url)  # a cached shop may predate a newer migration
        engine = make_engine(url)
        with engine.begin() as conn:
            # No quiet hours: the figures must not depend on the wall-clock hour the benchmark starts at (at
            # 21:00-09:00 shop time every SMS and push would be deferred to the morning). Caps stay on.
            save_policy(conn, PolicySettings(quiet_hours=None))
        engine.dispose()
        yield url, meta
    finally:
        if not opts.keep:
            cleanup()


def _fresh_postgres(server_url: str, name: str) -> tuple[str, Callable[[], None]]:
    from membercare.db import make_engine

    admin = make_engine(server_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(admin.url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url, drop


def bench_templates(workdir: Path, source: Path) -> Path:
    """A copy of the templates with the ``bench_daily`` campaign: every member, email/push/SMS, no offer.

    Its content is the welcome day-7 message (a personal subject, three recommendations, an HTML email with
    layout, an SMS with a tracked link, a push with data), sent to ``new_members`` joined within ten years,
    which is every member of a generated shop.
    """
    dest = workdir / "templates"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    camp = dest / BENCH_CAMPAIGN
    camp.mkdir()
    for f in (source / "welcome_day7").iterdir():
        if f.is_file() and f.name != "campaign.yaml":
            shutil.copy2(f, camp / f.name)
    (camp / "campaign.yaml").write_text(
        f"name: {BENCH_CAMPAIGN}\n"
        "description: Benchmark campaign - the whole membership, a personal message on every channel.\n"
        "purpose: marketing\n"
        "segment:\n  name: new_members\n  params: {days: 3650}\n"
        "priority: 60\nchannels: [email, push, sms]\noccurrence: daily\nmessage_per: member\n"
        "default_locale: zh-TW\nlocales: [zh-TW, en]\nparams: {recommendations: 3}\nsms: {max_segments: 3}\n",
        encoding="utf-8")
    return dest


# --------------------------------------------------------------------------------------------- services


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident set) of a process in MB, from /proc; None when unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Services:
    """The sandbox and the receiver processes of one run, and the environment the flows need."""

    sandbox: subprocess.Popen
    receiver: subprocess.Popen
    sandbox_url: str
    receiver_url: str
    env: dict[str, str]
    logs: Path

    def pids(self) -> set[int]:
        return {self.sandbox.pid, self.receiver.pid}

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.sandbox_url + "/sandbox/stats", timeout=30).json()

    def peaks(self) -> dict[str, float | None]:
        return {"sandbox": _r(peak_rss_mb(self.sandbox.pid)), "receiver": _r(peak_rss_mb(self.receiver.pid))}

    def stop(self) -> None:
        import signal

        for proc in (self.sandbox, self.receiver):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    continue
        for proc in (self.sandbox, self.receiver):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise ConfigurationError(f"{what} did not start (exit {proc.poll()}): {tail.strip() or 'no output'}")


def start_services(workdir: Path, db_url: str, seed: int, label: str) -> Services:
    """``membercare sandbox`` and ``membercare serve`` on free loopback ports, wired to each other."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    logs = workdir / f"logs-{label}"
    logs.mkdir(exist_ok=True)
    receiver_port = _free_port()
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    push_secret = secrets.token_urlsafe(24)
    secret_key = secrets.token_urlsafe(32)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    config = {"seed": seed, "sendgrid_api_keys": [SENDGRID_KEY], "twilio_accounts": {TWILIO_SID: TWILIO_TOKEN},
              "fcm_service_accounts": {SA_EMAIL: public_pem}, "fcm_require_known_service_account": True,
              "push_tracking_secret": push_secret, "webhook_url": receiver_url}
    config_path = workdir / f"sandbox-{label}.json"
    _private(config_path, json.dumps(config))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    out_log, err_log = logs / "sandbox.out", logs / "sandbox.err"
    with open(out_log, "w") as out, open(err_log, "w") as err:
        sandbox = subprocess.Popen([sys.executable, "-c", _CLI.format(mod="sandbox"), "sandbox", "--port", "0",
                                    "--config", str(config_path)], stdout=out, stderr=err, env=base_env,
                                   start_new_session=True)

    def banner() -> str | None:
        # The banner's first line carries the URL (later lines may be wrapped by the console).
        for line in out_log.read_text(errors="replace").splitlines():
            if "listening on " in line:
                return line.split("listening on ", 1)[1].split()[0]
        return None

    try:
        import httpx

        sandbox_url = _wait_for(banner, 120, "membercare sandbox", sandbox, err_log)
        sendgrid_public_key = httpx.get(sandbox_url + "/sandbox/keys", timeout=30).json()["sendgrid_webhook_public_key"]
    except BaseException:
        if sandbox.poll() is None:
            sandbox.kill()
        raise
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    sa_path = workdir / f"service-account-{label}.json"
    _private(sa_path, json.dumps({
        "type": "service_account", "project_id": FCM_PROJECT, "private_key_id": "bench-key-1",
        "private_key": private_pem, "client_email": SA_EMAIL, "client_id": "1",
        "token_uri": sandbox_url + "/token", "universe_domain": "googleapis.com"}))
    receiver_env = {**base_env, "MEMBERCARE_DATABASE_URL": db_url, "MEMBERCARE_PUBLIC_URL": receiver_url,
                    "MEMBERCARE_SECRET_KEY": secret_key, "MEMBERCARE_SENDGRID_WEBHOOK_PUBLIC_KEY": sendgrid_public_key,
                    "MEMBERCARE_TWILIO_AUTH_TOKEN": TWILIO_TOKEN, "MEMBERCARE_PUSH_TRACKING_SECRET": push_secret}
    rlog = logs / "receiver.log"
    with open(rlog, "w") as log:
        receiver = subprocess.Popen([sys.executable, "-c", _CLI.format(mod="serve"), "serve", "--port",
                                     str(receiver_port), "--log-level", "warning"], stdout=log,
                                    stderr=subprocess.STDOUT, env=receiver_env, start_new_session=True)

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", receiver_port), timeout=0.5):
                return True
        except OSError:
            return False

    services = Services(sandbox, receiver, sandbox_url, receiver_url, {}, logs)
    try:
        _wait_for(listening, 120, "membercare serve (webhook receiver)", receiver, rlog)
    except BaseException:
        services.stop()
        raise
    services.env = {
        "MEMBERCARE_DATABASE_URL": db_url,
        "MEMBERCARE_SENDGRID_API_KEY": SENDGRID_KEY,
        "MEMBERCARE_SENDGRID_FROM": "Good Days Living <hello@gooddays.example>",
        "MEMBERCARE_SENDGRID_BASE_URL": sandbox_url,
        "MEMBERCARE_TWILIO_ACCOUNT_SID": TWILIO_SID,
        "MEMBERCARE_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "MEMBERCARE_TWILIO_FROM": "+886223456789",
        "MEMBERCARE_TWILIO_BASE_URL": sandbox_url,
        "MEMBERCARE_FIREBASE_CREDENTIALS": str(sa_path),
        "MEMBERCARE_FCM_BASE_URL": sandbox_url,
        "MEMBERCARE_PUBLIC_URL": receiver_url,
        "MEMBERCARE_SECRET_KEY": secret_key,
        "MEMBERCARE_PUSH_TRACKING_SECRET": push_secret,
        "MEMBERCARE_NO_SECRET_BLOCKS": "1",  # the credentials are these variables; skip block look-ups
        **bench_rate_limits(),
    }
    return services


def bench_rate_limits() -> dict[str, str]:
    """The per-channel rate limits the campaign runs with.

    The defaults (100 e-mails, 10 SMS, 200 pushes a second) are sized for real providers; the sandbox answers
    at zero latency with no rate of its own, and this benchmark measures our throughput, so they are lifted
    to a rate that never binds unless the caller set ``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` itself.
    """
    names = (f"MEMBERCARE_RATE_LIMIT_{ch}" for ch in ("EMAIL", "SMS", "PUSH"))
    return {name: os.environ.get(name) or "1000000" for name in names}


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------ measurement


def union_seconds(intervals: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of ``[lo, hi]`` covered by at least one interval (overlapping calls count once)."""
    spans = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class DomainTimer:
    """Wraps functions of a module with timers; the flows call them through the module, so they see the wrappers.

    ``on_call(label)`` runs before each wrapped call (the stage meter uses it to notice stage changes).
    """

    def __init__(self, on_call: Callable[[str], None] | None = None):
        self.calls: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()
        self.on_call = on_call

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.on_call:
                self.on_call(label)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                with self._lock:
                    self.calls.append((label, t0, t1))

        timed.__membercare_timed__ = fn  # type: ignore[attr-defined]
        return timed

    @contextmanager
    def patched(self, module, names: Sequence[str]) -> Iterator[None]:
        saved = {}
        for name in names:
            fn = getattr(module, name)  # a stage that moved must fail here, not silently go untimed
            saved[name] = fn
            setattr(module, name, self.wrap(name, getattr(fn, "__membercare_timed__", fn)))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(module, name, fn)

    @contextmanager
    def patched_all(self, targets: Sequence[tuple[Any, Sequence[str]]]) -> Iterator[None]:
        """:meth:`patched` for several ``(module, names)`` pairs at once."""
        with ExitStack() as stack:
            for module, names in targets:
                stack.enter_context(self.patched(module, names))
            yield

    def spans(self, *labels: str) -> list[tuple[float, float]]:
        with self._lock:
            return [(a, b) for lab, a, b in self.calls if lab in labels]

    def first_start(self, *labels: str) -> float | None:
        s = self.spans(*labels)
        return min(a for a, _ in s) if s else None

    def last_end(self, *labels: str) -> float | None:
        s = self.spans(*labels)
        return max(b for _, b in s) if s else None


def _descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = _children_map() if children is None else children
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a live process and of its children it has already waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After the ")": state is field 3 of stat(5), so utime (14), stime (15), cutime (16), cstime (17) are 11-14.
    return sum(int(x) for x in fields[11:15]) / _TICKS


def cpu_snapshot(services: Mapping[str, int]) -> dict[str, float]:
    """Cumulative CPU seconds of each process group of a run, for stage deltas.

    * ``flow``: this process (the flow runs in it, all its threads);
    * ``workers``: planning workers and dispatcher processes: its children already waited for
      (``os.times``) plus every live descendant outside the services and Prefect's server;
    * one entry per service (``sandbox``, ``receiver``: the process and its descendants);
    * ``prefect_server``: Prefect's local server (a child process in ephemeral mode).

    A child that exits moves from the live sum to its parent's waited-for children, so a delta stays whole.
    """
    t = os.times()
    out = {"flow": t.user + t.system, "workers": t.children_user + t.children_system, "prefect_server": 0.0}
    try:
        tree = _children_map()
    except OSError:
        return out
    seen: set[int] = set()
    for name, pid in services.items():
        group = [pid, *_descendants(pid, tree)]
        seen.update(group)
        out[name] = sum(_proc_cpu_s(p) for p in group)
    for p in _descendants(os.getpid(), tree):
        if p in seen:
            continue
        if _is_prefect_server(p):
            group = [p, *_descendants(p, tree)]
            seen.update(group)
            out["prefect_server"] += sum(_proc_cpu_s(q) for q in group)
    for p in _descendants(os.getpid(), tree):
        if p not in seen:
            out["workers"] += _proc_cpu_s(p)
    return out


def _is_prefect_server(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "prefect" in cmd and ("server" in cmd or "uvicorn" in cmd)


class StageMeter:
    """Peak memory per stage: this process's VmHWM (reset at each stage change by writing 5 to
    /proc/self/clear_refs) and the summed RSS of worker child processes, sampled every 0.5 s (one /proc
    scan costs a few ms of this process's time, so not more often).

    The sandbox, the receiver and Prefect's own local server are children too but are not workers of ours:
    the first two are excluded (measured separately), the Prefect server is reported on its own.
    """

    def __init__(self, exclude: set[int] | None = None, interval: float = 0.5,
                 services: Mapping[str, int] | None = None):
        self.exclude = set(exclude or ()) | set((services or {}).values())
        self.services = dict(services or {})
        # CPU seconds per stage and process group (see cpu_snapshot), from snapshots at every stage change.
        self.cpu: dict[str, dict[str, float]] = {}
        self._cpu_last: dict[str, float] | None = None
        self.current: str | None = None
        self.self_peak: dict[str, float] = {}
        self.children_peak: dict[str, float] = {}
        self.prefect_server_peak = 0.0
        self.can_reset = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageMeter:
        self._thread = threading.Thread(target=self._sample, name="membercare-bench-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.enter(None)
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def _reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.can_reset = False

    def enter(self, stage: str | None) -> None:
        with self._lock:
            if stage == self.current:
                return
            if self.current is not None:
                peak = peak_rss_mb() or 0.0
                if not self.can_reset:  # VmHWM is then the process's peak so far, an upper bound
                    peak = max(peak, self.self_peak.get(self.current, 0.0))
                self.self_peak[self.current] = max(self.self_peak.get(self.current, 0.0), peak)
            snap = cpu_snapshot(self.services)
            if self.current is not None and self._cpu_last is not None:
                acc = self.cpu.setdefault(self.current, {})
                for k, v in snap.items():
                    acc[k] = acc.get(k, 0.0) + max(v - self._cpu_last.get(k, 0.0), 0.0)
            self._cpu_last = snap
            self.current = stage
            if stage is not None:
                self._reset()

    def advance(self, stage: str, after: Sequence[str]) -> None:
        """Enter ``stage`` only if the current stage is one of ``after`` (stages never go backwards)."""
        if self.current in after:
            self.enter(stage)

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self._interval):
            try:
                tree = _children_map()
            except OSError:
                continue
            pids = [p for p in _descendants(me, tree) if p not in self.exclude]
            excluded_trees = set()
            for p in self.exclude:
                excluded_trees.update(_descendants(p, tree))
            workers = 0.0
            for p in pids:
                if p in excluded_trees:
                    continue
                if _is_prefect_server(p):
                    self.prefect_server_peak = max(self.prefect_server_peak, _rss_mb(p))
                else:
                    workers += _rss_mb(p)
            with self._lock:
                if self.current is not None:
                    self.children_peak[self.current] = max(self.children_peak.get(self.current, 0.0), workers)


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _stage_of_task(name: str) -> str:
    for prefix, stage in (("prepare", "segment"), ("resolve-segment", "segment"), ("dry-run", "plan_render"),
                          ("plan", "plan_render"), ("render", "plan_render"), ("dispatch", "dispatch"),
                          ("send", "dispatch"), ("summarise", "summarise"), ("sync", "webhooks"),
                          ("attribute", "webhooks")):
        if name.startswith(prefix):
            return stage
    return "other"


def task_runs_by_stage(flow_run_ids: Sequence[Any]) -> dict[str, int]:
    """Task runs of the given flow runs, read from the Prefect API, counted per stage (by task run name)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    counts: Counter = Counter()
    page = 200
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))),
                                         limit=page, offset=offset)
            for r in runs:
                counts[_stage_of_task(r.name)] += 1
            if len(runs) < page:
                break
            offset += page
    return dict(counts)


def prefect_environment(workdir: Path) -> dict[str, str]:
    """Prefect's local ephemeral mode with a temporary home, unless Prefect is already set up in this process."""
    if "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return {}
    return {"PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
            # The local server takes 10-20 s to start on an idle 2-core machine, longer when it is busy.
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def warm_up_prefect() -> float:
    """Start Prefect (the local ephemeral server starts on the first flow run): not part of any measurement."""
    from prefect import flow

    @flow(name="bench-warm-up", log_prints=False)
    def warm_up() -> int:
        return 1

    t0 = time.perf_counter()
    warm_up()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- one size


def ledger_counts(db_url: str) -> dict[str, Any]:
    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage
    from membercare.engagement.models import EngagementEventRow

    engine = make_engine(db_url)
    o, e = OutboxMessage.__table__, EngagementEventRow.__table__
    try:
        with engine.connect() as conn:
            where = o.c.campaign == BENCH_CAMPAIGN
            states = dict(conn.execute(sa.select(o.c.state, sa.func.count()).where(where).group_by(o.c.state)).all())
            skipped = dict(conn.execute(sa.select(o.c.reason_code, sa.func.count())
                                        .where(where, o.c.state.in_(("skipped", "suppressed")))
                                        .group_by(o.c.reason_code)).all())
            channels = dict(conn.execute(sa.select(o.c.channel, sa.func.count())
                                         .where(where, o.c.state == "sent").group_by(o.c.channel)).all())
            events = dict(conn.execute(sa.select(e.c.kind, sa.func.count()).group_by(e.c.kind)).all())
    finally:
        engine.dispose()
    return {"states": states, "skipped_or_suppressed": skipped, "sent_by_channel": channels, "events": events,
            "events_total": sum(events.values())}


def sent_message_ids(db_url: str) -> list[str]:
    from membercare.db import make_engine
    from membercare.delivery.models import OutboxMessage

    engine = make_engine(db_url)
    o = OutboxMessage.__table__
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(o.c.message_id).where(o.c.campaign == BENCH_CAMPAIGN,
                                                                     o.c.state == "sent")).scalars())
    finally:
        engine.dispose()


def sandbox_message_ids(sandbox_url: str) -> list[str]:
    import httpx

    ids: list[str] = []
    since = 0
    while True:
        page = httpx.get(sandbox_url + "/sandbox/messages", params={"since": since, "limit": 5000}, timeout=60).json()
        ids += [m["message_id"] for m in page["messages"] if not m.get("ghost")]
        if page["count"] < 5000:
            return ids
        since = page["last_seq"]


def wait_for_drain(services: Services, timeout: float) -> tuple[bool, int]:
    """Poll the sandbox until no webhook is queued or in flight. (drained, pending at the end)."""
    deadline = time.monotonic() + timeout
    pending = -1
    while time.monotonic() < deadline:
        pending = services.stats().get("pending_webhooks", 0)
        if pending == 0:
            return True, 0
        time.sleep(0.25)
    return False, pending


def run_size(opts: BenchOptions, workdir: Path, templates: Path, members: int, progress: Progress) -> dict[str, Any]:
    """One campaign end to end on a shop of ``members`` members; the measurements as a dict."""
    from flows.campaign import CampaignRunParameters, run_campaign
    from flows.engagement import sync_engagement
    from membercare.campaigns import audience, dispatch, dry_run, occurrence, plan, summary
    from membercare.delivery import pool
    from membercare.engagement import sync

    load_before = os.getloadavg()
    with shop_database(opts, workdir, members, progress) as (db_url, shop):
        services = start_services(workdir, db_url, opts.seed, str(members))
        try:
            env = {**services.env, "MEMBERCARE_TEMPLATES_DIR": str(templates)}
            meter = StageMeter(services={"sandbox": services.sandbox.pid, "receiver": services.receiver.pid})
            timer = DomainTimer(on_call=lambda label: _on_domain_call(meter, label))
            # The flows call these through their modules, so they see the timed wrappers. With --dispatchers > 1 a
            # pass is pool.dispatch_processes (the rounds run in child processes).
            domain = ((occurrence, ("prepare",)), (audience, ("resolve_audience",)), (dry_run, ("write_preview",)),
                      (plan, ("ensure_run", "plan_group")), (dispatch, ("dispatch_round",)),
                      (summary, ("summarise",)), (sync, ("sync_engagement",)), (pool, ("dispatch_processes",)))
            params = CampaignRunParameters(campaign=BENCH_CAMPAIGN, as_of=SHOP_DATE.isoformat(),
                                           wait_for_deferred_s=5.0, dispatchers=opts.dispatchers,
                                           processes=opts.processes,
                                           **({"group_size": opts.group_size} if opts.group_size else {}))
            progress(f"{members:,} members: running the campaign flow")
            with patched_environ(env), timer.patched_all(domain), meter:
                meter.enter("segment")
                t0 = time.perf_counter()
                state = run_campaign(params, return_state=True)
                t1 = time.perf_counter()
                meter.enter("webhooks")
                summary = state.result()
                campaign_run_id = state.state_details.flow_run_id
                progress(f"{members:,} members: campaign flow {t1 - t0:.1f} s, sent {summary.get('sent_now', 0):,};"
                         " waiting for the engagement webhooks")
                drained, pending = wait_for_drain(services, opts.drain_timeout_s)
                t_drained = time.perf_counter()
                sync_state = sync_engagement(records_url=services.sandbox_url, attribution_days=0.0,
                                             return_state=True)
                sync_report = sync_state.result()
                t2 = time.perf_counter()
            stats = services.stats()
            peaks = services.peaks()
            _dispose_flow_engine(db_url)
            ledger = ledger_counts(db_url)
            verify = verify_exactly_once(db_url, services, stats, ledger, opts.verify_messages_up_to)
        finally:
            services.stop()
        # The references run after the campaign, on the same machine state and data (services stopped).
        references: dict[str, Any] = {}
        sent_now = ledger["states"].get("sent", 0)
        if opts.ceilings:
            from bench.e2e import ceilings

            progress(f"{members:,} members: ceilings (bare render + insert, raw aiohttp sends)")
            try:
                references["planning_ceiling"] = ceilings.planning_ceiling(db_url, templates, BENCH_CAMPAIGN,
                                                                           shop_as_of(), services.env)
            except Exception as exc:  # noqa: BLE001 - a missing reference is a result, not a lost run
                references["planning_ceiling"] = {"error": f"{type(exc).__name__}: {exc}"}
            references["dispatch_ceiling"] = ceilings.dispatch_ceiling(ledger["sent_by_channel"],
                                                                       messages=min(2000, max(200, sent_now)))
        if opts.segments and opts.db == "sqlite":
            from bench.e2e import ceilings

            progress(f"{members:,} members: segments and RFM on SQLite and DuckDB")
            try:
                references["segments"] = ceilings.segments_reference(
                    cache_path(opts.cache, members, opts.seed), members, workdir)
            except Exception as exc:  # noqa: BLE001
                references["segments"] = {"error": f"{type(exc).__name__}: {exc}"}
        task_runs = task_runs_by_stage([campaign_run_id, sync_state.state_details.flow_run_id])
    load_after = os.getloadavg()

    # Stage windows on the flow's own timeline (see docs/benchmark.md): each window runs from the end of the
    # previous stage's last domain call, so Prefect's work between stages is charged to the stage it precedes.
    plan_start = timer.first_start("ensure_run", "plan_group")
    plan_end = timer.last_end("plan_group")
    disp_end = timer.last_end("dispatch_round", "dispatch_processes")
    seg_end = plan_start if plan_start is not None else t0
    windows = {"segment": (t0, seg_end),
               "plan_render": (seg_end, plan_end if plan_end is not None else seg_end),
               "dispatch": (plan_end if plan_end is not None else seg_end,
                            disp_end if disp_end is not None else (plan_end or seg_end)),
               "summarise": (disp_end if disp_end is not None else (plan_end or seg_end), t1),
               "webhooks": (t1, t2)}
    domain_labels = {"segment": ("prepare", "resolve_audience", "write_preview"),
                     "plan_render": ("ensure_run", "plan_group"), "dispatch": ("dispatch_round", "dispatch_processes"),
                     "summarise": ("summarise",), "webhooks": ("sync_engagement",)}
    sent = ledger["states"].get("sent", 0)
    planned_rows = sum(ledger["states"].values())
    units = {"segment": summary.get("segment_size", 0), "plan_render": planned_rows, "dispatch": sent,
             "summarise": planned_rows, "webhooks": ledger["events_total"]}
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        lo, hi = windows[name]
        secs = max(hi - lo, 0.0)
        spans = timer.spans(*domain_labels[name])
        if name == "webhooks":
            spans.append((t1, t_drained))  # waiting for the receiver to ingest: our side, not Prefect's
        dom = union_seconds(spans, lo, hi) if spans else None
        row = {"seconds": round(secs, 3), "messages": units[name],
               "messages_per_s": round(units[name] / secs, 1) if secs > 0 else None,
               "peak_rss_mb": _r(meter.self_peak.get(name)),
               "children_peak_rss_mb": _r(meter.children_peak.get(name, 0.0)),
               "task_runs": task_runs.get(name, 0),
               "domain_seconds": _r(dom, 3),
               "prefect_share": round((secs - dom) / secs, 4) if dom is not None and secs > 0 else None}
        cpu = meter.cpu.get(name, {})
        row["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
        row["cpu_ms_per_unit"] = ({k: round(1000 * v / units[name], 4) for k, v in cpu.items()}
                                  if units[name] else {})
        # "ours": the flow process and its workers (planning workers, dispatchers); Prefect's server, the
        # sandbox (the providers) and the receiver are listed apart.
        ours = cpu.get("flow", 0.0) + cpu.get("workers", 0.0)
        row["ours_cpu_ms_per_unit"] = round(1000 * ours / units[name], 4) if units[name] else None
        stages[name] = row
    # Webhook ingestion runs while dispatch sends: its rate is events over the whole window, dispatch start
    # to drained. Its stage time is the tail after dispatch (what a campaign waits for), plus sync-engagement.
    webhook_window = t_drained - windows["dispatch"][0]
    stages["webhooks"].update({"tail_seconds": round(t_drained - t1, 3), "sync_seconds": round(t2 - t_drained, 3),
                               "window_seconds": round(webhook_window, 3),
                               "messages_per_s": round(ledger["events_total"] / webhook_window, 1)
                               if webhook_window > 0 else None,
                               "drained": drained, "pending_at_end": pending})
    flow_secs = t1 - t0
    flow_domain = union_seconds(timer.spans(*[label for s in STAGES[:4] for label in domain_labels[s]]), t0, t1)
    flow_cpu = {k: sum(meter.cpu.get(st, {}).get(k, 0.0) for st in STAGES[:4])
                for k in ("flow", "workers", "prefect_server", "sandbox", "receiver")}
    flow = {"seconds": round(flow_secs, 3), "messages": sent,
            "cpu_s": {k: round(v, 3) for k, v in flow_cpu.items()},
            # CPU per sent message of everything but the providers and the receiver (the baseline's measure)
            "cpu_ms_per_message": round(1000 * (flow_cpu["flow"] + flow_cpu["workers"] + flow_cpu["prefect_server"])
                                        / sent, 4) if sent else None,
            "messages_per_s": round(sent / flow_secs, 1) if flow_secs > 0 else None,
            "task_runs": sum(v for k, v in task_runs.items() if k != "webhooks"),
            "domain_seconds": round(flow_domain, 3),
            "prefect_share": round((flow_secs - flow_domain) / flow_secs, 4) if flow_secs > 0 else None,
            "peak_rss_mb": _r(max([v for k, v in meter.self_peak.items() if k != "webhooks"] or [0.0])),
            "children_peak_rss_mb": _r(max([v for k, v in meter.children_peak.items() if k != "webhooks"] or [0.0]))}
    holdout = ledger["skipped_or_suppressed"].get("holdout", 0)
    return {
        "members": members, "db": opts.db, "shop": shop, "campaign": BENCH_CAMPAIGN,
        "audience": summary.get("segment_size", 0), "planned": planned_rows, "sent": sent,
        "holdout": holdout, "holdout_share": round(holdout / planned_rows, 4) if planned_rows else 0.0,
        "ledger": ledger, "run_summary": {k: summary.get(k) for k in ("status", "sent", "deferred", "waiting",
                                                                     "unknown", "suppressed", "skipped", "failed")},
        "sync": sync_report, "stages": stages, "campaign_flow": flow,
        "end_to_end_seconds": round(t2 - t0, 3),
        "peak_rss_mb": {"harness": _r(max(meter.self_peak.values() or [0.0])),
                        "workers": _r(max(meter.children_peak.values() or [0.0])),
                        "prefect_server": _r(meter.prefect_server_peak) or None, **peaks},
        "clear_refs_reset": meter.can_reset, "verify": verify,
        "sandbox": {k: stats.get(k) for k in ("accepted", "rejected_total", "throttled", "webhooks", "events")},
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "task_runs": task_runs, **references,
    }


def verify_exactly_once(db_url: str, services: Services, stats: dict, ledger: dict, id_limit: int) -> dict[str, Any]:
    """Did every message the ledger records as sent reach the sandbox, once? By counts always; by message id
    (both directions) when at most ``id_limit`` were sent."""
    v: dict[str, Any] = {"sandbox_accepted": stats.get("accepted_total", 0),
                         "ledger_sent": ledger["states"].get("sent", 0),
                         "duplicates": stats.get("duplicates_by_message_id_total", 0)
                         + stats.get("duplicates_by_idempotency_key_total", 0)}
    ok = v["sandbox_accepted"] == v["ledger_sent"] and v["duplicates"] == 0
    if v["ledger_sent"] <= id_limit:
        ours, theirs = sent_message_ids(db_url), sandbox_message_ids(services.sandbox_url)
        counted = Counter(theirs)
        v["ids_checked"] = True
        v["missing_at_sandbox"] = len(set(ours) - set(counted))
        v["unknown_at_sandbox"] = len(set(counted) - set(ours))
        v["received_more_than_once"] = sum(1 for n in counted.values() if n > 1)
        ok = ok and not (v["missing_at_sandbox"] or v["unknown_at_sandbox"] or v["received_more_than_once"])
    else:
        v["ids_checked"] = False
    v["exactly_once"] = ok
    return v


def _on_domain_call(meter: StageMeter, label: str) -> None:
    if label in ("ensure_run", "plan_group"):
        meter.advance("plan_render", ("segment",))
    elif label in ("dispatch_round", "dispatch_processes"):
        meter.advance("dispatch", ("segment", "plan_render"))
    elif label == "summarise":
        meter.advance("summarise", ("segment", "plan_render", "dispatch"))


def _dispose_flow_engine(db_url: str) -> None:
    """Close the flows' cached engine of a finished run's database (so its file can be removed)."""
    try:
        from flows import common
        from membercare.config import normalise_database_url

        engine = common._ENGINES.pop(normalise_database_url(db_url), None)  # harness clean-up of a private cache
        if engine is not None:
            engine.dispose()
    except Exception:  # noqa: BLE001 - clean-up only
        pass


# ----------------------------------------------------------------------------------------------- baseline


def run_baseline_size(opts: BenchOptions, workdir: Path, templates: Path, n: int, progress: Progress) -> dict[str, Any]:
    """The naive flow (one Prefect task per message, ``bench.per_message_baseline``) at ``n`` messages.

    It gets its own copy of a shop of ``n`` members, its own sandbox and receiver, and the same campaign and
    credentials as our flow. Without that module the row says "baseline not available" and why.
    """
    try:
        from bench.per_message_baseline import run_baseline
    except ImportError as exc:
        return {"messages": n, "error": f"baseline not available: {exc}"}
    load_before = os.getloadavg()
    with shop_database(opts, workdir, n, progress) as (db_url, shop):
        services = start_services(workdir, db_url, opts.seed, f"baseline-{n}")
        try:
            env = {**os.environ, **services.env, "MEMBERCARE_TEMPLATES_DIR": str(templates)}
            progress(f"baseline: {n:,} messages, one Prefect task each")
            try:
                import inspect

                extra = {}
                if "log_path" in inspect.signature(run_baseline).parameters:  # kept with --keep
                    extra["log_path"] = services.logs / "baseline.log"
                with patched_environ({**services.env, "MEMBERCARE_TEMPLATES_DIR": str(templates)}):
                    result = run_baseline(n, env=env, campaign=BENCH_CAMPAIGN, as_of=shop_as_of(),
                                          timeout_s=opts.baseline_timeout_s, **extra)
                row = dict(result.to_dict())
            except Exception as exc:  # noqa: BLE001 - a failing baseline is a result, not a crash of the bench
                row = {"messages": n, "error": f"{type(exc).__name__}: {exc}"}
            stats = services.stats()
            row["sandbox_accepted"] = stats.get("accepted_total", 0)
            row["sandbox_duplicates"] = (stats.get("duplicates_by_message_id_total", 0)
                                         + stats.get("duplicates_by_idempotency_key_total", 0))
        finally:
            services.stop()
        _dispose_flow_engine(db_url)
    row.setdefault("messages", n)
    row["shop_members"] = n
    row["load_before"] = [round(x, 2) for x in load_before]
    row["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


# ---------------------------------------------------------------------------------------------- machine


def machine_facts(db: str, postgres_url: str | None = None) -> dict[str, Any]:
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        facts["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        facts["memory_gib"] = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    facts["packages"] = versions
    try:
        facts["membercare"] = importlib.metadata.version("membercare")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        if rev.returncode == 0:
            facts["git"] = rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if db == "postgres" and postgres_url:
        from membercare.db import make_engine

        engine = make_engine(postgres_url)
        try:
            with engine.connect() as conn:
                facts["postgres"] = conn.exec_driver_sql("SHOW server_version").scalar()
        finally:
            engine.dispose()
    return facts


# ------------------------------------------------------------------------------------------------ driver


def default_out_dir(root: Path | None = None) -> Path:
    root = root or Path.cwd() / "bench" / "results"
    return root / f"e2e-{datetime.now():%Y%m%d-%H%M%S}"


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run every size and baseline of ``opts``; write results.json, results.md and the chart; return the results."""
    from bench.e2e import report
    from membercare.config import Settings

    opts.validate()
    say = progress or (lambda _msg: None)
    out = Path(opts.out) if opts.out else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="membercare-bench-"))
    if opts.keep:
        say(f"work directory (kept): {workdir}")
    results: dict[str, Any] = {"started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                               "command": "membercare bench " + " ".join(_argv_of(opts)),
                               "options": {"members": list(opts.members), "baseline": list(opts.baseline),
                                           "seed": opts.seed, "db": opts.db, "cache": str(opts.cache),
                                           "shop_date": SHOP_DATE.isoformat(), "provider_latency_ms": 0,
                                           "campaign": BENCH_CAMPAIGN, "holdout": 0.10, "quiet_hours": "off",
                                           "dispatchers": opts.dispatchers, "planning_processes": opts.processes,
                                           "rate_limits_per_s": bench_rate_limits()},
                               "machine": machine_facts(opts.db, opts.postgres_url),
                               "load_before": [round(x, 2) for x in os.getloadavg()], "sizes": [], "baseline": []}
    try:
        with patched_environ(prefect_environment(workdir)):
            templates = bench_templates(workdir, Settings.from_env().templates_dir)
            say("starting Prefect (local ephemeral mode)")
            results["prefect_startup_s"] = round(warm_up_prefect(), 2)
            for n in opts.members:
                results["sizes"].append(run_size(opts, workdir, templates, n, say))
                _write(out, results)  # partial results survive a later failure
            for n in opts.baseline:
                if n > 0:
                    results["baseline"].append(run_baseline_size(opts, workdir, templates, n, say))
                    _write(out, results)
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    results["scaling"] = report.scaling_verdict(
        [(s["members"], s["campaign_flow"]["seconds"], s["peak_rss_mb"]["harness"] or 0.0) for s in results["sizes"]])
    _write(out, results, final=True)
    results["out"] = str(out)
    return results


def _write(out: Path, results: dict[str, Any], final: bool = False) -> None:
    from bench.e2e import report

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    if final:
        report.write_report(out, results)


def _argv_of(opts: BenchOptions) -> list[str]:
    args = ["--members", ",".join(str(n) for n in opts.members), "--baseline",
            ",".join(str(n) for n in opts.baseline) or "0", "--seed", str(opts.seed), "--db", opts.db]
    if opts.dispatchers != 1:
        args += ["--dispatchers", str(opts.dispatchers)]
    if opts.processes is not None:
        args += ["--processes", str(opts.processes)]
    return args
