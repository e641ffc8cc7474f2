"""``membercare stack up|down|status``: a whole Prefect deployment of membercare on this host, on loopback.

``up`` starts, each as its own process group with a log and a pid file in the state directory
(``$MEMBERCARE_HOME/stack``, default ``.membercare/stack``):

* ``server``: ``prefect server start`` on a free loopback port, backed by PostgreSQL
  (``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...``) in a database of its own on the given
  server (created when missing; ``down --drop-database`` removes it);
* the work pool ``membercare`` (process type), the global concurrency limits ``membercare-<channel>`` from
  ``MEMBERCARE_RATE_LIMIT_<CHANNEL>`` (what ``membercare setup-blocks`` creates) and the deployments of
  ``prefect.yaml`` (``prefect deploy``, non-interactive; ``--deployment`` picks some);
* ``worker-1`` .. ``worker-N``: ``prefect worker start --pool membercare`` (process workers; a flow run is a
  subprocess of its worker, in the worker's process group);
* ``serve``: ``membercare serve`` (the webhook receiver) on a free loopback port.

Every process inherits the caller's environment (``MEMBERCARE_DATABASE_URL``, the channel settings), with
``PREFECT_API_URL`` pointing at the stack's server and ``PYTHONPATH`` at the project directory, so the flow runs
use this checkout. The scheduler is off unless ``--scheduler``: a local stack should not start the campaign
calendar against whatever database the environment names. ``down`` stops exactly the process groups whose pid
files ``up`` wrote (a pid file records the process's start time too, so a reused pid is never signalled).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.table import Table

from membercare.cli import app
from membercare.cli.common import console, err_console
from membercare.errors import ConfigurationError, InputError

stack_app = typer.Typer(help="A local Prefect stack: server on PostgreSQL, work pool, workers and the receiver.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")

POOL = "membercare"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "membercare_prefect"
STATE_FILE = "stack.json"
PROJECT_DIR = Path(__file__).resolve().parents[2]


def default_state_dir() -> Path:
    return Path(os.environ.get("MEMBERCARE_HOME") or ".membercare") / "stack"


@dataclass
class Component:
    """One started process: its name, pid (the leader of its own process group), log, and port if any."""

    name: str
    pid: int
    started: str  # /proc/<pid>/stat start time: a pid reused by another process does not match
    log: str
    port: int | None = None


# ------------------------------------------------------------------------------------------------ processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the command name


def alive(c: Component) -> bool:
    return _start_time(c.pid) == c.started


def _spawn(state: Path, name: str, cmd: list[str], env: dict[str, str], port: int | None = None) -> Component:
    log = state / f"{name}.log"
    with open(log, "ab") as out:
        # A session of its own: ``down`` signals the whole group (a worker's flow-run subprocesses included).
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=PROJECT_DIR, start_new_session=True)
    comp = Component(name, proc.pid, _start_time(proc.pid) or "", str(log), port)
    (state / f"{name}.pid").write_text(f"{comp.pid} {comp.started}\n")
    return comp


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc). A process worker starts each flow run in a session of its
    own (Prefect isolates them from group-wide signals), so a worker's process group does not hold its flow
    runs: they are found as its children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def signal_tree(pid: int, sig: int) -> None:
    """``sig`` to the process group of ``pid`` and to the process group of each of its descendants."""
    groups = {pid}
    for p in descendants(pid):
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_component(c: Component, state: Path, timeout: float = 15.0) -> str:
    """SIGTERM to the component's process group and its descendants' groups, SIGKILL after ``timeout``;
    removes its pid file."""
    outcome = "not running"
    if alive(c):
        outcome = "stopped"
        tree = [(p, _start_time(p)) for p in descendants(c.pid)]
        signal_tree(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(c) and time.monotonic() < deadline:
            _reap(c.pid)
            time.sleep(0.2)
        if alive(c):
            outcome = "killed"
        signal_tree(c.pid, signal.SIGKILL)  # the group may outlive its leader (a flow run mid-send)
        for p, started in tree:  # descendants orphaned meanwhile (re-parented, no longer under the leader)
            if started is not None and _start_time(p) == started:  # the same process, not a reused pid
                signal_tree(p, signal.SIGKILL)
        _reap(c.pid)
    (state / f"{c.name}.pid").unlink(missing_ok=True)
    return outcome


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait(predicate, timeout: float, what: str, comp: Component) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not alive(comp):
            break
        time.sleep(0.5)
    tail = Path(comp.log).read_text(errors="replace")[-1500:] if Path(comp.log).is_file() else ""
    raise ConfigurationError(f"{what} did not start within {timeout:.0f} s (log {comp.log}): {tail.strip()}")


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- database


def prefect_database_url(server_url: str, database: str) -> str:
    """The asyncpg URL of ``database`` on the PostgreSQL server of ``server_url`` (any driver spelling)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(server_url)
    if not url.drivername.startswith("postgresql"):
        raise InputError(f"--postgres must be a PostgreSQL URL, not {url.drivername}")
    return url.set(drivername="postgresql+asyncpg", database=database).render_as_string(hide_password=False)


def _admin_engine(server_url: str):
    import sqlalchemy as sa

    from membercare.db import make_engine

    url = sa.engine.make_url(server_url).set(drivername="postgresql+psycopg")
    return make_engine(url.render_as_string(hide_password=False))


def ensure_database(server_url: str, database: str) -> bool:
    """Create ``database`` on the server when it does not exist; True when it was created."""
    import sqlalchemy as sa

    engine = _admin_engine(server_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": database}).first():
                return False
            conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
            return True
    finally:
        engine.dispose()


def drop_database(server_url: str, database: str) -> None:
    engine = _admin_engine(server_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------------------ up


def prefect_bin() -> str:
    """The ``prefect`` executable beside this interpreter (the venv's bin; it need not be on PATH)."""
    path = Path(sys.executable).parent / "prefect"
    if path.is_file():
        return str(path)
    found = shutil.which("prefect")
    if not found:
        raise ConfigurationError(f"no prefect executable beside {sys.executable} or on PATH")
    return found


def stack_env(state: Path, api_url: str | None) -> dict[str, str]:
    """The environment of every stack process: the caller's, this checkout first on the path, the stack's API."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update({"PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MEMBERCARE_PROJECT_DIR": str(PROJECT_DIR), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")]))})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _run_prefect(args: list[str], env: dict[str, str], what: str, timeout: float = 600.0) -> str:
    proc = subprocess.run([prefect_bin(), *args], env=env, cwd=PROJECT_DIR, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:].strip()
        raise ConfigurationError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def create_limits(api_url: str, env: dict[str, str]) -> dict[str, float]:
    """The shared rate limits (``setup-blocks``'s logic) on the stack's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ratelimits import configured_rates, ensure_limits

    rates = configured_rates(env)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        ensure_limits(rates)
    return rates


ZOMBIE_AUTOMATION = PROJECT_DIR / "deploy" / "automations" / "crash-unresponsive-runs.yaml"
HEARTBEAT_SECONDS = "30"  # Prefect's minimum; the automation crashes a run after 90 s without one


def create_automations(api_url: str) -> list[str]:
    """The automation that marks runs of a lost worker Crashed (flow runs send heartbeats on the stack), unless
    the server already has one of that name (a stack brought up again on its database)."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = yaml.safe_load(ZOMBIE_AUTOMATION.read_text())
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        if not client.read_automations_by_name(name=spec["name"]):
            client.create_automation(AutomationCore.model_validate(spec))
    return [spec["name"]]


def load_state(state: Path) -> dict:
    path = state / STATE_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    data["components"] = [Component(**c) for c in data.get("components", [])]
    return data


def _save_state(state: Path, data: dict) -> None:
    out = {**data, "components": [asdict(c) for c in data["components"]]}
    (state / STATE_FILE).write_text(json.dumps(out, indent=1))


@dataclass
class UpOptions:
    workers: int = 2
    postgres: str = DEFAULT_POSTGRES
    database: str = DEFAULT_DATABASE
    deployments: tuple[str, ...] = ()  # empty: every deployment of prefect.yaml
    deploy: bool = True
    scheduler: bool = False
    serve: bool = True
    worker_limit: int | None = None
    startup_timeout: float = 240.0


def stack_up(state: Path, opts: UpOptions, say=lambda msg: None) -> dict:
    """Start the stack (see the module docstring); returns the state written to ``stack.json``. On any failure
    everything started so far is stopped again before the error propagates."""
    if any(alive(c) for c in load_state(state).get("components", [])):
        raise InputError(f"a stack is already running from {state}: `membercare stack down` first")
    state.mkdir(parents=True, exist_ok=True)
    (state / "prefect").mkdir(exist_ok=True)
    created = ensure_database(opts.postgres, opts.database)
    say(f"PostgreSQL database {opts.database}: {'created' if created else 'exists'}")
    port = _free_port()
    api_url, ui_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    data: dict = {"api_url": api_url, "ui_url": ui_url, "database": opts.database, "pool": POOL,
                  "postgres": _redacted(opts.postgres), "components": []}
    try:
        env = stack_env(state, None)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database_url(opts.postgres, opts.database)
        env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "true" if opts.scheduler else "false"
        # The UI asks the API at 127.0.0.1:4200 unless told otherwise; ours is on a free port.
        env["PREFECT_UI_API_URL"] = api_url
        server = _spawn(state, "server", [prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port",
                                          str(port)], env, port)
        data["components"].append(server)
        _save_state(state, data)
        _wait(lambda: _http_ok(api_url + "/health"), opts.startup_timeout, "prefect server", server)
        say(f"prefect server on {ui_url} (PostgreSQL database {opts.database})")
        _start_the_rest(state, opts, data, api_url, say)
    except BaseException:
        stack_down(state)
        raise
    return data


def _start_the_rest(state: Path, opts: UpOptions, data: dict, api_url: str, say) -> None:
    env = stack_env(state, api_url)
    _run_prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env, "work pool")
    say(f"work pool {POOL} (process)")
    rates = create_limits(api_url, env)
    say("global concurrency limits: " + ", ".join(f"membercare-{ch} {r:g}/s" for ch, r in rates.items()))
    if opts.deploy:
        names = [a for n in opts.deployments for a in ("--name", n)] or ["--all"]
        _run_prefect(["--no-prompt", "deploy", *names], env, "prefect deploy")
        say(f"deployed {', '.join(opts.deployments) or 'every deployment of prefect.yaml'}")
    say("automations: " + ", ".join(create_automations(api_url)))
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": env.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
                  "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_SECONDS)}
    for i in range(1, opts.workers + 1):
        cmd = [prefect_bin(), "worker", "start", "--pool", POOL, "--type", "process", "--name", f"stack-worker-{i}"]
        if opts.worker_limit:
            cmd += ["--limit", str(opts.worker_limit)]
        data["components"].append(_spawn(state, f"worker-{i}", cmd, worker_env))
        _save_state(state, data)
    say(f"{opts.workers} process worker(s) on pool {POOL}")
    if opts.serve:
        port = _free_port()
        serve = _spawn(state, "serve", [sys.executable, "-m", "membercare.cli", "serve", "--host", "127.0.0.1",
                                        "--port", str(port), "--log-level", "warning"], env, port)
        data["components"].append(serve)
        data["receiver_url"] = f"http://127.0.0.1:{port}"
        _save_state(state, data)
        _wait(lambda: _listening(port), opts.startup_timeout, "membercare serve", serve)
        say(f"membercare serve on {data['receiver_url']}")


def _redacted(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def stack_down(state: Path, *, drop: bool = False, postgres: str = DEFAULT_POSTGRES) -> list[tuple[str, str]]:
    """Stop every component ``up`` recorded (the receiver and workers first, the server last)."""
    data = load_state(state)
    comps: list[Component] = data.get("components", [])
    order = [c for c in comps if c.name != "server"] + [c for c in comps if c.name == "server"]
    results = [(c.name, stop_component(c, state)) for c in order]
    (state / STATE_FILE).unlink(missing_ok=True)
    if drop and data.get("database"):
        drop_database(postgres, data["database"])
        results.append((f"database {data['database']}", "dropped"))
    return results


# --------------------------------------------------------------------------------------------------- commands


@stack_app.command("up")
def up(
    workers: int = typer.Option(2, "--workers", min=1, max=16, help="Process workers to start."),
    postgres: str = typer.Option(os.environ.get("MEMBERCARE_STACK_POSTGRES_URL", DEFAULT_POSTGRES), "--postgres",
                                 help="A PostgreSQL server URL (any database on it; the stack uses its own)."),
    database: str = typer.Option(DEFAULT_DATABASE, "--database", help="The Prefect server's database name."),
    deployment: list[str] = typer.Option([], "--deployment",
                                         help="Deploy only these (prefect.yaml names; repeatable). Default: all."),
    deploy: bool = typer.Option(True, "--deploy/--no-deploy", help="Register the deployments of prefect.yaml."),
    scheduler: bool = typer.Option(False, "--scheduler/--no-scheduler",
                                   help="Run the schedules of prefect.yaml (off: runs start only on request)."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start `membercare serve` too."),
    worker_limit: int | None = typer.Option(None, "--worker-limit", min=1,
                                            help="Flow runs one worker runs at a time (default: unlimited)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Pid files, logs and stack.json "
                                                                    "(default $MEMBERCARE_HOME/stack)."),
) -> None:
    """Start a Prefect server on PostgreSQL, the work pool and limits, the deployments, workers and the receiver."""
    state = (state_dir or default_state_dir()).resolve()
    opts = UpOptions(workers=workers, postgres=postgres, database=database, deployments=tuple(deployment),
                     deploy=deploy, scheduler=scheduler, serve=serve, worker_limit=worker_limit)
    t0 = time.monotonic()
    data = stack_up(state, opts, say=lambda msg: console.print(f"[dim]{time.monotonic() - t0:6.1f}s[/] {msg}"))
    _print_status(state, data)
    console.print(f"Prefect UI: {data['ui_url']}   API: export PREFECT_API_URL={data['api_url']}")
    console.print("stop it with: membercare stack down" + (f" --state-dir {state}" if state_dir else ""))


@stack_app.command("down")
def down(
    state_dir: Path | None = typer.Option(None, "--state-dir", help="The directory `stack up` used."),
    drop_database: bool = typer.Option(False, "--drop-database", help="Also drop the Prefect server's database."),
    postgres: str = typer.Option(os.environ.get("MEMBERCARE_STACK_POSTGRES_URL", DEFAULT_POSTGRES), "--postgres",
                                 help="The PostgreSQL server (for --drop-database)."),
) -> None:
    """Stop exactly the processes `stack up` started (by their pid files)."""
    state = (state_dir or default_state_dir()).resolve()
    results = stack_down(state, drop=drop_database, postgres=postgres)
    if not results:
        err_console.print(f"no stack recorded in {state}")
    for name, outcome in results:
        console.print(f"{name}: {outcome}")


@stack_app.command("status")
def status(state_dir: Path | None = typer.Option(None, "--state-dir", help="The directory `stack up` used.")) -> None:
    """List the stack's processes, whether each is running, its port and log."""
    state = (state_dir or default_state_dir()).resolve()
    data = load_state(state)
    if not data:
        console.print(f"no stack recorded in {state}")
        raise typer.Exit(1)
    _print_status(state, data)
    if not all(alive(c) for c in data["components"]):
        raise typer.Exit(1)


def _print_status(state: Path, data: dict) -> None:
    t = Table(title=f"membercare stack ({state})")
    for col in ("process", "pid", "state", "port", "log"):
        t.add_column(col)
    for c in data["components"]:
        t.add_row(c.name, str(c.pid), "running" if alive(c) else "[red]stopped[/]", str(c.port or "-"), c.log)
    console.print(t)
