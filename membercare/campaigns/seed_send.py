"""Test sends: every channel, locale and variant of a campaign, sent to a seed list through the real providers.

``membercare campaign test NAME --to SEEDLIST`` renders the campaign for one sample member (the template
gallery's sample member of each locale, or a real member given with ``--member``) and sends each rendered
message to each seed address of its channel, so a marketer sees in their own inbox, phone and app what
members will get, before the real send.

Test messages are marked everywhere a person or a program looks: the subject, SMS and push title start with
``[TEST]``, the message ids start with ``test``, and the provider categories include ``membercare-test``.
They never touch the ledger (no outbox row, no campaign run, no coupon issued), so frequency caps, reports,
attribution and optimisation, which all read the ledger, cannot count them; provider events about them find
no outbox row and settle nothing. Links are signed with the preview-only key: clicking "unsubscribe" in a
test email changes no member's consent.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from membercare.campaigns.definition import Campaign, load_campaign
from membercare.config import Settings
from membercare.delivery.contract import (
    Accepted,
    ChannelAdapter,
    Content,
    EmailContent,
    LineContent,
    OutboundMessage,
    PushContent,
    SmsContent,
    TransientFailure,
)
from membercare.errors import InputError, RenderError
from membercare.links import LinkSigner
from membercare.models import Channel
from membercare.rendering import CampaignRenderer
from membercare.rendering.samples import SAMPLE_AS_OF, sample_context
from membercare.timeutil import utcnow

log = logging.getLogger(__name__)

TEST_MARK = "[TEST]"
TEST_CATEGORY = "membercare-test"
_PHONE = re.compile(r"^\+[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class Seed:
    channel: Channel
    to: str


@dataclass
class SeedMessage:
    """One test message: what was rendered and what the provider answered (the seed address is not kept)."""

    channel: str
    locale: str
    variant: str | None
    seed: int  # index of the seed address in its channel's list
    outcome: str  # "accepted", or the failure's reason
    headline: str


SEED_LISTS_DIR = "seeds"  # named seed lists: <project>/seeds/<name>.txt
_LIST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _read_list(path: Path) -> list[str]:
    return [ln.split("#", 1)[0] for ln in path.read_text(encoding="utf-8").splitlines()]


def parse_seeds(spec: str | Sequence[str], *, lists_dir: Path | None = None) -> list[Seed]:
    """Seed addresses from ``--to``: comma-separated entries, lines of a file given as ``@path``, or the name
    of a seed list (``team`` reads ``seeds/team.txt`` under ``lists_dir``, default the working directory).

    ``name@example.com`` is an email, ``+886912345678`` (E.164) an SMS number, ``push:<token>`` a push token.
    """
    parts: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        item = item.strip()
        if item.startswith("@"):
            path = Path(item[1:]).expanduser()
            if not path.is_file():
                raise InputError(f"seed list file {path} does not exist")
            parts += _read_list(path)
        elif _LIST_NAME.match(item) and not item.startswith("push:"):
            path = (lists_dir if lists_dir is not None else Path.cwd()) / SEED_LISTS_DIR / f"{item}.txt"
            if not path.is_file():
                raise InputError(f"no seed list named {item!r} ({path} does not exist); give addresses, @FILE "
                                 "or the name of a file in seeds/")
            parts += _read_list(path)
        else:
            parts += item.split(",")
    seeds = []
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        if raw.startswith("push:") and len(raw) > 5:
            seeds.append(Seed(Channel.PUSH, raw[5:]))
        elif _EMAIL.match(raw):
            seeds.append(Seed(Channel.EMAIL, raw))
        elif _PHONE.match(raw.replace(" ", "")):
            seeds.append(Seed(Channel.SMS, raw.replace(" ", "")))
        else:
            # Never echo the entry: it may be someone's address with a typo.
            raise InputError(f"seed entry {len(seeds) + 1} is neither an email address, an E.164 phone number "
                             "(+886912345678) nor push:<token>")
    if not seeds:
        raise InputError("the seed list is empty")
    return seeds


def mark(content: Content) -> Content:
    """The content with its headline marked as a test."""
    if isinstance(content, EmailContent):
        return replace(content, subject=f"{TEST_MARK} {content.subject}")
    if isinstance(content, SmsContent):
        return replace(content, body=f"{TEST_MARK} {content.body}")
    if isinstance(content, PushContent):
        return replace(content, title=f"{TEST_MARK} {content.title}")
    if isinstance(content, LineContent):
        return replace(content, text=f"{TEST_MARK} {content.text}")
    return content


def _headline(content: Content) -> str:
    if isinstance(content, EmailContent):
        return content.subject
    if isinstance(content, SmsContent):
        return content.body.split("\n", 1)[0][:80]
    if isinstance(content, LineContent):
        return content.text.split("\n", 1)[0][:80]
    return content.title


def variants_of(campaign: Campaign) -> list[str | None]:
    test = campaign.optimise.variants
    return list(test.names) if test is not None else [None]


def _context_for(renderer: CampaignRenderer, engine: Engine | None, member_id: int | None, locale: str,
                 as_of: datetime) -> dict[str, Any]:
    if member_id is None or engine is None:
        return sample_context(renderer.builder, locale)
    with engine.connect() as conn:
        ctx = renderer.build_context(conn, [member_id], as_of).get(member_id)
    if ctx is None:
        raise InputError(f"member id {member_id} has no template context (deleted?)")
    return {**ctx, "member": {**ctx["member"], "locale": locale}}


def send_test(settings: Settings, campaign: Campaign | str, seeds: Sequence[Seed],
              adapters: Mapping[Channel, ChannelAdapter], *, engine: Engine | None = None,
              member_id: int | None = None, now: datetime | None = None) -> list[SeedMessage]:
    """Render every channel x locale x variant of ``campaign`` and send each to the seeds of its channel.

    ``member_id`` (with ``engine``) renders for that real member in each locale; otherwise for the template
    gallery's sample member. Returns one :class:`SeedMessage` per message; a provider's refusal is reported,
    not raised (a configuration error is raised: nothing would reach anyone).
    """
    camp = load_campaign(campaign, settings) if isinstance(campaign, str) else campaign
    channels = [c for c in camp.channels if any(s.channel == c for s in seeds)]
    if not channels:
        used = ", ".join(c.value for c in camp.channels)
        raise InputError(f"no seed address for the channels of {camp.name} ({used})")
    missing = [c.value for c in channels if c not in adapters]
    if missing:
        raise InputError(f"no provider configured for {', '.join(missing)}")
    renderer = CampaignRenderer(camp, settings, signer=LinkSigner.preview())
    as_of = (now or utcnow()) if member_id is not None else SAMPLE_AS_OF
    out: list[SeedMessage] = []
    for locale in camp.locales:
        ctx = _context_for(renderer, engine, member_id, locale, as_of)
        for variant in variants_of(camp):
            for channel in channels:
                for i, seed in enumerate(s for s in seeds if s.channel == channel):
                    out.append(_send_one(camp, renderer, adapters[channel], ctx, seed, i + 1, locale, variant, as_of))
    return out


@dataclass(frozen=True)
class TestPlan:
    """What a test send needs before its adapters exist: the campaign, the seeds, the channels to build."""

    __test__ = False  # not a pytest test class

    campaign: Campaign
    seeds: list[Seed]
    channels: list[Channel]
    member_id: int | None


def plan_test(settings: Settings, campaign: str, to: str | Sequence[str], *, engine: Engine | None = None,
              member: str | None = None, lists_dir: Path | None = None) -> TestPlan:
    """Load the campaign, parse the seeds and find the sample member (``member``: external or database id;
    ``engine`` required then). ``membercare campaign test`` and the ``run-campaign`` flow's ``test_to`` share it."""
    from membercare.campaigns.triggers import find_member

    camp = load_campaign(campaign, settings)
    seeds = parse_seeds(to, lists_dir=lists_dir)
    member_id = None
    if member is not None:
        if engine is None:
            raise InputError("a sample member needs the database")
        with engine.connect() as conn:
            member_id = find_member(conn, member)
    channels = sorted({s.channel for s in seeds if s.channel in camp.channels})
    return TestPlan(camp, seeds, channels, member_id)


def accepted_count(sent: Sequence[SeedMessage]) -> int:
    return sum(s.outcome == "accepted" for s in sent)


TRANSIENT_RETRIES = 2  # further attempts of a test message after a transient failure


def _send_one(camp: Campaign, renderer: CampaignRenderer, adapter: ChannelAdapter, ctx: Mapping[str, Any],
              seed: Seed, index: int, locale: str, variant: str | None, as_of: datetime) -> SeedMessage:
    mid = "test" + uuid.uuid4().hex[:28]
    where = f"{camp.name} {seed.channel.value} {locale}" + (f" variant {variant}" if variant else "")
    try:
        content = mark(renderer.render(seed.channel, ctx, message_id=mid, as_of=as_of, variant=variant))
    except RenderError as exc:
        raise InputError(f"{where} does not render: {exc}") from exc
    msg = OutboundMessage(message_id=mid, idempotency_key=f"test:{camp.name}:{mid}", channel=seed.channel,
                          purpose=camp.purpose, to=seed.to, content=content, campaign=camp.name,
                          categories=(camp.name, TEST_CATEGORY))
    result = adapter.send(msg)
    for _ in range(TRANSIENT_RETRIES):
        if not isinstance(result, TransientFailure):
            break
        # A dropped keep-alive connection or a throttle: try again. A test goes to the team's own seeds, so a
        # possible duplicate (an ambiguous failure that was accepted after all) costs less than a missing variant.
        time.sleep(min(result.retry_after if result.retry_after is not None else 0.5, 5.0))
        result = adapter.send(msg)
    outcome = "accepted" if isinstance(result, Accepted) else f"refused: {result.reason}"
    log.info("test send %s seed %d: %s", where, index, outcome)
    return SeedMessage(seed.channel.value, locale, variant, index, outcome, _headline(content))


__all__ = ["SEED_LISTS_DIR", "Seed", "TEST_CATEGORY", "TEST_MARK", "SeedMessage", "TestPlan", "accepted_count", "mark",
           "parse_seeds", "plan_test", "send_test", "variants_of"]
