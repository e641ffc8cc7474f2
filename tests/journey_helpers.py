"""Helpers shared by the journey tests: settings on a templates folder, members, events, dispatch, counts."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from fakes import seed_members
from membercare.config import Settings
from membercare.delivery.dispatcher import DispatchConfig, Dispatcher
from membercare.delivery.models import OutboxMessage
from membercare.delivery.policies import PolicySettings
from membercare.journeys.advance import Advancer
from membercare.journeys.definition import load_journey
from membercare.journeys.entry import holdout_domain
from membercare.journeys.events import EventIn, ingest
from membercare.journeys.models import JourneyInstance, JourneyStep
from membercare.models import Order
from membercare.optimise.assignment import in_holdout

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
SECRET = "test-secret-key-" + "x" * 24
OB, JI, JS = OutboxMessage.__table__, JourneyInstance.__table__, JourneyStep.__table__
NOCAP = PolicySettings(marketing_cap=None)
FAST = DispatchConfig(workers=4, batch_size=50, backoff_base=0.05, backoff_max=0.2, wait_for_deferred=0.0,
                      flush_interval=0.02, error_min_samples=10_000)


def settings_for(tmp_path: Path, templates: Path = TEMPLATES) -> Settings:
    return Settings(home=tmp_path / "home", secret_key=SECRET, templates_dir=templates)


def copy_templates(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "templates"
    root.mkdir(exist_ok=True)
    for name in ["_layout", *names]:
        if not (root / name).exists():
            shutil.copytree(TEMPLATES / name, root / name)
    return root


def members(engine, n: int, now: datetime, *, journey: str | None = None, rate: float = 0.1,
            settings: Settings | None = None, **seed) -> list[int]:
    """``n`` members, none of them held out of ``journey`` (so a test knows who gets messages)."""
    with engine.begin() as conn:
        ids = seed_members(conn, n * 2 + 10, now=now, **seed)
    if journey is not None and settings is not None:
        j = load_journey(journey, settings)
        ids = [i for i in ids if not in_holdout(i, holdout_domain(j), j.holdout or rate)]
    return ids[:n]


def send_event(engine, settings: Settings, name: str, member_id: int, at: datetime, event_id: str,
               **properties) -> None:
    from membercare.journeys.definition import list_journeys

    with engine.begin() as conn:
        ingest(conn, [EventIn(event_id, name, str(member_id), at, properties)], list_journeys(settings), at)


def place_order(engine, member_id: int, at: datetime, ref: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(Order.__table__).values(external_id=ref, member_id=member_id, placed_at=at,
                                                       status="paid", total_minor=100_000, currency="TWD",
                                                       updated_at=at))


def advance(engine, settings: Settings, clock, **kw):
    return Advancer(engine, settings, clock=clock, policy=kw.pop("policy", NOCAP), **kw).advance()


def dispatch(engine, adapters, clock, run_ids) -> None:
    for run_id in sorted(run_ids):
        Dispatcher(engine, adapters, config=FAST, policy=NOCAP, clock=clock).dispatch(run_id)


def outbox_by_member(engine) -> dict[int, list[tuple[str, str, str | None]]]:
    out: dict[int, list] = {}
    with engine.connect() as conn:
        for r in conn.execute(sa.select(OB.c.member_id, OB.c.campaign, OB.c.state, OB.c.channel)
                              .order_by(OB.c.id)):
            out.setdefault(r.member_id, []).append((r.campaign, r.state, r.channel))
    return out


def steps_of(engine, instance_id: int) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(JS.c.step, JS.c.outcome)
                                               .where(JS.c.instance_id == instance_id).order_by(JS.c.id))]


def instance_of(engine, journey: str, member_id: int):
    with engine.connect() as conn:
        return conn.execute(sa.select(JI).where(JI.c.journey == journey, JI.c.member_id == member_id)
                            .order_by(JI.c.id.desc())).first()


def sandbox_channels(sandbox) -> Counter:
    return Counter(m.get("channel") for m in sandbox.messages())


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def make_journey(tmp_path: Path, name: str, yaml_text: str, messages: dict[str, str]) -> Settings:
    """A templates folder with the journey ``name`` and its messages (copies of shipped ones:
    ``{message name: shipped message folder}``), each re-pointed at ``journey.<name>``."""
    root = copy_templates(tmp_path, [])
    for msg, source in messages.items():
        shutil.copytree(TEMPLATES / source, root / msg, dirs_exist_ok=True)
        camp = root / msg / "campaign.yaml"
        text = camp.read_text(encoding="utf-8").replace(f"name: {source}", f"name: {msg}")
        lines = [f"trigger: {{event: journey.{name}}}" if ln.startswith("trigger:") else ln
                 for ln in text.splitlines()]
        camp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / name).mkdir(exist_ok=True)
    (root / name / "journey.yaml").write_text(yaml_text, encoding="utf-8")
    return settings_for(tmp_path, root)
