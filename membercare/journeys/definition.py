"""Journey definitions: ``templates/<journey>/journey.yaml``, loaded and validated with file:line errors.

A journey is a sequence of steps a member walks through over days, one instance per member per entry::

    name: abandoned_cart
    description: Remind members of the cart they left, once by email and once by push if not clicked.
    entry: {event: cart.updated}       # or {segment: {name: new_members, params: {day: 0}}}
    reentry: after_exit                # never | after_exit (default): one active instance per member at a time
    holdout: 0.1                       # share of entries held out (recorded, never messaged) for lift
    exit: {purchased: true, unsubscribed: true}   # checked before every step; also left_segment, events
    steps:
      - {id: wait_1h, wait: {duration: 1h}}
      - {id: email, send: {message: abandoned_cart_email}}
      - {id: wait_click, wait_for: {event: clicked, timeout: 24h, then: end}}
      - {id: push, send: {message: abandoned_cart_push}}

Step kinds: ``send`` (a message: a campaign folder whose ``campaign.yaml`` has
``trigger: {event: journey.<journey>}``, planned through the same planner, routing, policies and outbox as
every campaign), ``wait`` (``duration``; ``until_time`` of day in the member's zone; ``until_date`` of a
date attribute with ``offset_days``), ``wait_for`` (an event with a ``timeout``; ``then`` on the event,
``else`` on the timeout), ``branch`` (``if`` a condition, ``then``/``else``). Each step goes to ``next``
(default: the step below it; ``end`` finishes the journey). Jumps go forward only, so a journey never loops
and each instance takes each step at most once (the step log is unique per instance and step).

Conditions (``branch.if``): ``{attribute: tier, equals: gold}`` (also ``in``, ``gte``, ``lte``; attributes
are the member's columns or ``context.<key>`` of the entry event's properties), ``{segment: name}``,
``{event: purchased, since: entry}`` (or a step id), ``{engaged: clicked}`` (a message of this instance was
opened or clicked). Events are ``purchased`` (an order, or an ``order.placed`` event), ``opened``,
``clicked`` (engagement with this instance's messages) or any member event name (``review.answered``).
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from membercare.campaigns.definition import SegmentRef, load_campaign
from membercare.config import Settings
from membercare.errors import InputError, UnknownNameError
from membercare.models import Channel, Purpose

JOURNEY_FILE = "journey.yaml"
END = "end"
STEP_ID = r"^[a-z][a-z0-9_]{0,39}$"  # "journey:<step>" is the outbox occurrence (64 characters at most)
EVENT_NAME = r"^[a-z][a-z0-9_.]{0,63}$"
DURATION = r"^\d{1,5}(m|h|d)$"
TIME_OF_DAY = r"^([01]\d|2[0-3]):[0-5]\d$"
# Events that are not member events: derived from orders and from engagement with this instance's messages.
BUILTIN_EVENTS = ("purchased", "opened", "clicked")


class JourneyDefinitionError(InputError):
    """A ``journey.yaml`` that does not parse or validate (the message names the file and line)."""


def parse_duration(text: str) -> timedelta:
    """``30m``, ``1h``, ``7d`` -> timedelta."""
    m = re.match(DURATION, text)
    if not m:
        raise InputError(f"not a duration: {text!r} (use e.g. 30m, 1h, 7d)")
    n = int(text[:-1])
    return {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n)}[m.group(1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Send(_Model):
    message: str = Field(pattern=r"^[a-z][a-z0-9_]{1,62}$", description="a campaign folder holding the message")
    channels: tuple[Channel, ...] | None = Field(default=None, description="narrows the message's channels")


class Wait(_Model):
    duration: str | None = Field(default=None, pattern=DURATION)
    until_time: str | None = Field(default=None, pattern=TIME_OF_DAY, description="HH:MM in the member's zone")
    until_date: str | None = Field(default=None, description="a date attribute: birthday or context.<key>")
    offset_days: int = Field(default=0, ge=-366, le=366)
    at: str = Field(default="10:00", pattern=TIME_OF_DAY, description="time of day for until_date")

    @model_validator(mode="after")
    def _one(self) -> Wait:
        if sum(x is not None for x in (self.duration, self.until_time, self.until_date)) != 1:
            raise ValueError("give exactly one of duration, until_time or until_date")
        return self


class WaitFor(_Model):
    event: str = Field(pattern=EVENT_NAME)
    timeout: str = Field(pattern=DURATION)
    then: str | None = Field(default=None, description="where to go when the event happens (default: next)")
    else_: str | None = Field(default=None, alias="else", description="where to go on the timeout (default: next)")


class Condition(_Model):
    attribute: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_.]{0,63}$")
    equals: Any = None
    in_: tuple[Any, ...] | None = Field(default=None, alias="in")
    gte: float | None = None
    lte: float | None = None
    segment: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$")
    params: dict[str, Any] = Field(default_factory=dict)
    event: str | None = Field(default=None, pattern=EVENT_NAME)
    engaged: Literal["opened", "clicked"] | None = None
    since: str = Field(default="entry", description="entry or a step id: count events after it")

    @model_validator(mode="after")
    def _one(self) -> Condition:
        if sum(x is not None for x in (self.attribute, self.segment, self.event, self.engaged)) != 1:
            raise ValueError("give exactly one of attribute, segment, event or engaged")
        if self.attribute is not None and self.equals is None and self.in_ is None and self.gte is None \
                and self.lte is None:
            raise ValueError("an attribute condition needs equals, in, gte or lte")
        return self


class Branch(_Model):
    if_: Condition = Field(alias="if")
    then: str
    else_: str = Field(alias="else")


class Step(_Model):
    id: str = Field(pattern=STEP_ID)
    send: Send | None = None
    wait: Wait | None = None
    wait_for: WaitFor | None = None
    branch: Branch | None = None
    next: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        if sum(x is not None for x in (self.send, self.wait, self.wait_for, self.branch)) != 1:
            raise ValueError("a step is exactly one of send, wait, wait_for or branch")
        if self.id == END:
            raise ValueError(f"{END!r} is reserved (it finishes the journey)")
        if self.branch is not None and self.next is not None:
            raise ValueError("a branch goes to then/else, not next")
        return self

    @property
    def kind(self) -> str:
        return "send" if self.send else "wait" if self.wait else "wait_for" if self.wait_for else "branch"

    def targets(self) -> list[str]:
        """Explicit jumps of this step (forward only; ``end`` finishes)."""
        out = [self.next]
        if self.wait_for is not None:
            out += [self.wait_for.then, self.wait_for.else_]
        if self.branch is not None:
            out += [self.branch.then, self.branch.else_]
        return [t for t in out if t is not None]


class Entry(_Model):
    event: str | None = Field(default=None, pattern=EVENT_NAME)
    segment: SegmentRef | None = None

    @model_validator(mode="after")
    def _one(self) -> Entry:
        if (self.event is None) == (self.segment is None):
            raise ValueError("give exactly one of event or segment")
        return self


class Exit(_Model):
    purchased: bool = False
    unsubscribed: bool = False
    left_segment: SegmentRef | None = None
    events: tuple[str, ...] = ()


class Journey(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,62}$")
    description: str = Field(min_length=1)
    entry: Entry
    reentry: Literal["never", "after_exit"] = "after_exit"
    holdout: float = Field(default=0.0, ge=0.0, lt=0.5)
    exit: Exit = Field(default_factory=Exit)
    steps: tuple[Step, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph(self) -> Journey:
        index = {s.id: i for i, s in enumerate(self.steps)}
        if len(index) != len(self.steps):
            raise ValueError("step ids are listed twice")
        for i, s in enumerate(self.steps):
            for t in s.targets():
                if t != END and t not in index:
                    raise ValueError(f"step {s.id}: unknown step {t!r} (steps: {', '.join(index)}, or end)")
                if t != END and index[t] <= i:
                    raise ValueError(f"step {s.id}: jumps go forward only ({t!r} is not below it)")
            cond = s.branch.if_ if s.branch else None
            if cond is not None and cond.since not in ("entry", *index):
                raise ValueError(f"step {s.id}: since {cond.since!r} is neither entry nor a step id")
        return self

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise InputError(f"journey {self.name} has no step {step_id!r}")

    def following(self, step_id: str) -> str:
        """The step below ``step_id``, or ``end`` after the last one."""
        ids = [s.id for s in self.steps]
        i = ids.index(step_id)
        return ids[i + 1] if i + 1 < len(ids) else END

    @property
    def messages(self) -> list[str]:
        return [s.send.message for s in self.steps if s.send is not None]


# --------------------------------------------------------------------------------------------- loading


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Source line (1-based) of every key path in a composed YAML document."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            out[key] = k.start_mark.line + 1
            _lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, (*path, i), out)
    return out


def _format(path: Path, exc: ValidationError, lines: dict[tuple, int]) -> str:
    parts = []
    for e in exc.errors():
        loc = tuple(x for x in e["loc"] if not isinstance(x, str) or not x.startswith(("function-", "tagged-")))
        loc = tuple({"if_": "if", "else_": "else", "in_": "in"}.get(x, x) if isinstance(x, str) else x for x in loc)
        probe = loc
        while probe not in lines and probe:
            probe = probe[:-1]
        where = ".".join(str(x) for x in loc) or "(top level)"
        parts.append(f"{path}:{lines.get(probe, 1)}: {where}: {e['msg']}")
    return "\n".join(parts)


def parse_journey(path: Path) -> Journey:
    """Read and validate one ``journey.yaml`` (structure only; :func:`load_journey` also checks the messages)."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise JourneyDefinitionError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or node is None:
        raise JourneyDefinitionError(f"{path}:1: expected a mapping of journey fields")
    folder = path.parent.name
    data.setdefault("name", folder)
    if data["name"] != folder:
        raise JourneyDefinitionError(f"{path}:1: name {data['name']!r} must match its folder {folder!r}")
    try:
        return Journey.model_validate(data)
    except ValidationError as exc:
        raise JourneyDefinitionError(_format(path, exc, _lines(node))) from None


def _check_messages(journey: Journey, path: Path, settings: Settings) -> None:
    for i, s in enumerate(journey.steps):
        if s.send is None:
            continue
        try:
            camp = load_campaign(s.send.message, settings)
        except UnknownNameError:
            raise JourneyDefinitionError(f"{path}: steps.{i}.send.message: no campaign folder "
                                         f"{s.send.message!r} holds this message") from None
        wanted = f"journey.{journey.name}"
        if camp.trigger is None or camp.trigger.event != wanted:
            raise JourneyDefinitionError(f"{path}: steps.{i}.send.message: campaign {camp.name} must have "
                                         f"trigger: {{event: {wanted}}} (it is this journey's message)")
        if journey.holdout and camp.purpose == Purpose.TRANSACTIONAL:
            raise JourneyDefinitionError(f"{path}: holdout: {camp.name} is transactional (a member's own service "
                                         f"message); a journey that sends it cannot hold members out")
        extra = set(s.send.channels or ()) - set(camp.channels)
        if extra:
            raise JourneyDefinitionError(f"{path}: steps.{i}.send.channels: {camp.name} does not use "
                                         f"{', '.join(sorted(c.value for c in extra))}")


def journey_names(templates_dir: Path) -> list[str]:
    if not templates_dir.is_dir():
        return []
    return sorted(p.name for p in templates_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and (p / JOURNEY_FILE).is_file())


@lru_cache(maxsize=128)
def _load_cached(path: Path, mtime_ns: int, settings: Settings) -> Journey:
    journey = parse_journey(path)
    _check_messages(journey, path, settings)
    return journey


def load_journey(name: str, settings: Settings | None = None) -> Journey:
    """The journey ``name`` of the templates folder, its messages checked; :class:`UnknownNameError` if none."""
    settings = settings or Settings.from_env()
    root = settings.templates_dir
    path = root / name / JOURNEY_FILE
    if not name or "/" in name or name.startswith((".", "_")) or not path.is_file():
        raise UnknownNameError("journey", name, journey_names(root))
    return _load_cached(path.resolve(), path.stat().st_mtime_ns, settings)


def list_journeys(settings: Settings | None = None) -> list[Journey]:
    settings = settings or Settings.from_env()
    return [load_journey(n, settings) for n in journey_names(settings.templates_dir)]


__all__ = ["BUILTIN_EVENTS", "END", "JOURNEY_FILE", "Branch", "Condition", "Entry", "Exit", "Journey",
           "JourneyDefinitionError", "Send", "Step", "Wait", "WaitFor", "journey_names", "list_journeys",
           "load_journey", "parse_duration", "parse_journey"]
