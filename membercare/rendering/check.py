"""The pre-flight check: render every campaign x channel x locale before anything is sent.

Reports, each with the file and (where there is one) the line:

* ``campaign``        campaign.yaml does not parse or validate
* ``missing-locale``  a required part is missing for a locale the campaign lists
* ``syntax``          Jinja syntax errors, invalid push_data JSON
* ``undefined``       a variable or attribute the context does not have
* ``render``          any other error while rendering (bad filter argument, ...)
* ``limit``           a render over a bound of :mod:`.limits` (a huge string or list, too much output,
  too many loop iterations, too long, macros recursing too deeply); names the limit
* ``sms-too-long``    more segments than the campaign's ``sms.max_segments``
* ``push-too-long`` / ``push-payload``   push title/body over the limits, FCM payload of 4 KB or more
* ``line-too-long``   LINE text over 5,000 characters, Flex altText over 1,500, Flex contents over 30 KB
* ``bad-link``        a link that is not an absolute http(s)/mailto/tel/app URL, or has spaces or leftovers
* ``inline``          the email cannot be CSS-inlined without changing it
* ``layout``          a missing or broken shared layout file
* ``variant``         a variant file (``<part>@<variant>...``) for a variant the campaign does not declare
* warnings: ``ucs2-forced`` (an English SMS pushed into UCS-2 by one character), ``unknown-file``,
  ``unused-channel`` (templates for a channel the campaign does not use)

A campaign with a variant test (``optimise.variants``) is rendered once per variant as well as with
the plain templates, so every variant's overrides pass the same checks.

Templates are rendered against the sample members of :mod:`.samples` (a typical one and a worst
case per locale) and, with a database connection, against real members.
:func:`ensure_campaign_ready` is what a flow calls before it starts a campaign.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from membercare.campaigns.definition import CampaignDefinitionError, campaign_names, load_campaign
from membercare.config import Settings
from membercare.delivery.contract import EmailContent, LineContent, PushContent, SmsContent
from membercare.errors import ConfigurationError
from membercare.links import LinkSigner
from membercare.models import Channel, Coupon, Member
from membercare.rendering import sms as smslen
from membercare.rendering.engine import (
    OPTIONAL,
    REQUIRED,
    Part,
    RenderError,
    TemplateStore,
    parse_template_filename,
    part_filename,
)
from membercare.rendering.htmltext import inline_rendered
from membercare.rendering.renderer import CampaignRenderer, store_for
from membercare.rendering.samples import SAMPLE_AS_OF, SAMPLE_VARIANTS, sample_context
from membercare.timeutil import utcnow


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    campaign: str
    code: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else (self.file or self.campaign)
        return f"{where}: {self.severity}: [{self.code}] {self.message}"


class TemplateCheckError(ConfigurationError):
    """A campaign's templates fail the pre-flight check; the campaign must not start."""

    def __init__(self, campaign: str, problems: list[Problem]):
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        first = "; ".join(str(p) for p in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        super().__init__(f"campaign {campaign} fails the template check: {first}{more}")


_URL_IN_TEXT = re.compile(r"\b(?:https?://|mailto:|tel:)[^\s<>\"']+|\b[a-z][a-z0-9+.-]*://[^\s<>\"']+", re.I)
_LEFTOVER = re.compile(r"\{\{|\}\}|\{%|%\}|\bNone\b|\bUndefined\b")


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v is not None:
                self.hrefs.append(v)


def link_problem(url: str, app_scheme: str | None) -> str | None:
    """Why ``url`` is not a usable link in a message, or ``None`` if it is fine."""
    if not url or url != url.strip() or any(c.isspace() for c in url):
        return "contains whitespace or is empty"
    if _LEFTOVER.search(url):
        return "contains unrendered template text or None"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host or "." not in host and host != "localhost" and not host.replace(".", "").isdigit():
            return "has no valid host"
        return None
    if scheme == "mailto":
        return None if "@" in parts.path else "mailto without an address"
    if scheme == "tel":
        return None if re.fullmatch(r"\+?[0-9-]{5,}", parts.path) else "malformed phone number"
    if app_scheme and scheme == app_scheme.lower():
        return None
    if not scheme:
        return "is not absolute (mail clients and SMS need a full URL)"
    return f"unsupported scheme {scheme!r}"


def _source_line(store: TemplateStore, file: str | None, needle: str) -> int | None:
    """The first line of ``file`` that contains the static start of ``needle`` (to place a link error)."""
    if not file:
        return None
    path = store.root.parent / file.split(" ")[0]
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    for probe in (needle[:40], needle[:20], needle[:10], "href="):
        probe = probe.split("?")[0]
        if probe:
            for i, line in enumerate(text.splitlines(), 1):
                if probe in line:
                    return i
    return None


class _Checker:
    def __init__(self, name: str, settings: Settings, store: TemplateStore, signer: LinkSigner):
        self.name, self.settings, self.store, self.signer = name, settings, store, signer
        self.problems: dict[tuple, Problem] = {}

    def add(self, severity: str, code: str, message: str, file: str | None = None, line: int | None = None) -> None:
        key = (code, file, line, message)
        if key not in self.problems:
            self.problems[key] = Problem(severity, self.name, code, message, file, line)

    def from_error(self, exc: RenderError, suffix: str = "") -> None:
        self.add("error", exc.code, exc.detail + suffix, exc.file, exc.line)

    def run(self, conn: Connection | None, db_members: int) -> list[Problem]:
        try:
            campaign = load_campaign(self.name, self.settings)
        except CampaignDefinitionError as exc:
            m = re.match(r"^(.*?campaign\.yaml)(?::(\d+))?: (.*)$", str(exc))
            file = self.store.rel(Path(m.group(1))) if m else f"templates/{self.name}/campaign.yaml"
            line = int(m.group(2)) if m and m.group(2) else None
            self.add("error", "campaign", m.group(3) if m else str(exc), file, line)
            return self.result()
        self.files(campaign)
        try:
            renderer = CampaignRenderer(campaign, self.settings, signer=self.signer, store=self.store)
        except RenderError as exc:
            self.from_error(exc)
            return self.result()
        if any(p.severity == "error" and p.code == "layout" for p in self.problems.values()):
            return self.result()
        self.compile_all(campaign)
        if any(p.severity == "error" for p in self.problems.values()):
            return self.result()  # rendering broken templates would only repeat the same errors
        for locale in campaign.locales:
            for sample in SAMPLE_VARIANTS:
                ctx = sample_context(renderer.builder, locale, sample)
                for tv in _template_variants(campaign):
                    label = f", variant {tv}" if tv else ""
                    self.render_all(renderer, campaign, ctx, SAMPLE_AS_OF,
                                    f" (sample member {sample}, {locale}{label})",
                                    verify_inline=sample == "typical", variant=tv)
        if conn is not None and db_members:
            self.against_db(renderer, campaign, conn, db_members)
        return self.result()

    def result(self) -> list[Problem]:
        order = {"error": 0, "warning": 1}
        return sorted(self.problems.values(), key=lambda p: (order[p.severity], p.file or "", p.line or 0, p.code))

    def files(self, campaign) -> None:
        folder = self.store.root / campaign.name
        found = self.store.available(campaign.name)
        for loc in campaign.locales:
            for channel in campaign.channels:
                for part in REQUIRED[channel]:
                    if loc not in found.get(part, set()):
                        self.add("error", "missing-locale", f"missing {channel.value} {part.value} for locale {loc}",
                                 self.store.rel(folder / part_filename(part, loc)))
        for p in sorted(folder.iterdir()):
            if p.name == "campaign.yaml" or p.name.startswith("."):
                continue
            parsed = parse_template_filename(p.name)
            if parsed is None:
                self.add("warning", "unknown-file", "not a template part name (see docs/templates.md)",
                         self.store.rel(p))
                continue
            part, loc, tv = parsed
            if tv is not None and tv not in _template_variants(campaign):
                declared = campaign.optimise.variants
                self.add("error", "variant", f"variant {tv!r} is not declared in optimise.variants.names"
                         + (f" ({', '.join(declared.names)})" if declared else " (the campaign has no variant test)"),
                         self.store.rel(p))
                continue
            channel = next(ch for ch in Channel if part in REQUIRED[ch] or part in OPTIONAL[ch])
            if channel not in campaign.channels:
                self.add("warning", "unused-channel", f"campaign does not use {channel.value}", self.store.rel(p))
            if loc and loc not in campaign.locales:
                self.add("warning", "unknown-file", f"locale {loc} is not in the campaign's locales", self.store.rel(p))

    def compile_all(self, campaign) -> None:
        for loc in campaign.locales:
            for channel in campaign.channels:
                for part in REQUIRED[channel] + OPTIONAL[channel]:
                    for tv in _template_variants(campaign):
                        try:
                            self.store.get(campaign.name, part, loc, tv)
                        except RenderError as exc:
                            self.from_error(exc)

    def render_all(self, renderer: CampaignRenderer, campaign, ctx: dict, as_of: datetime, who: str,
                   verify_inline: bool = False, variant: str | None = None) -> None:
        self._ctx, self._variant = ctx, variant
        for channel in campaign.channels:
            try:
                content = renderer.render(channel, ctx, as_of=as_of, message_id="check-0000", variant=variant)
            except RenderError as exc:
                self.from_error(exc, who)
                continue
            locale = renderer.template_locale(channel, ctx["member"].get("locale"))
            self.inspect(renderer, campaign, channel, locale, content, who, verify_inline)

    def inspect(self, renderer, campaign, channel, locale, content, who, verify_inline) -> None:
        app = renderer.shop_all.get("app_scheme")
        tv = self._variant

        def part_file(part: Part) -> str:
            own = tv is not None and self.store.overrides(campaign.name, part, locale, tv)
            return self.store.rel(self.store.path(campaign.name, part, locale, tv if own else None))

        urls: list[tuple[str, str, int | None]] = []
        if isinstance(content, EmailContent):
            p = _Hrefs()
            p.feed(content.html)
            urls += [(u, part_file(Part.EMAIL_HTML), None) for u in p.hrefs]
            for field_name, value, part in (("subject", content.subject, Part.EMAIL_SUBJECT),):
                if _LEFTOVER.search(value):
                    self.add("error", "render", f"{field_name} contains template leftovers or None{who}",
                             part_file(part))
            if verify_inline:
                self.verify_inline(renderer, locale, content)
        elif isinstance(content, SmsContent):
            urls += [(u, part_file(Part.SMS), None) for u in (*_URL_IN_TEXT.findall(content.body), *content.links)]
            m = smslen.measure(content.body)
            if m.encoding == smslen.UCS2 and not locale.startswith(("zh", "ja", "ko")):
                chars = ", ".join(repr(c) for c in m.non_gsm)
                self.add("warning", "ucs2-forced", f"characters {chars} force UCS-2 (70 characters per segment){who}",
                         part_file(Part.SMS))
        elif isinstance(content, LineContent):
            urls += [(u, part_file(Part.LINE), None) for u in (*_URL_IN_TEXT.findall(content.text), *content.links)]
            if content.flex_json:
                urls += [(u, part_file(Part.LINE_FLEX), None) for u in _flex_uris(json.loads(content.flex_json))]
        elif isinstance(content, PushContent):
            data = self.store.get(campaign.name, Part.PUSH_DATA, locale, tv)
            if data is not None:
                urls += [(content.data[k], data.files[0], line) for k, (_, line) in data.template.items()
                         if ("link" in k or "url" in k) and k in content.data]
        for url, file, line in urls:
            why = link_problem(url, app)
            if why:
                self.add("error", "bad-link", f"link {url[:80]!r} {why}{who}", file,
                         line or _source_line(self.store, file, url))

    def verify_inline(self, renderer, locale: str, content: EmailContent) -> None:
        """Inlining the source must give what inlining the rendered message would (compile-time safety net)."""
        compiled = self.store.get(renderer.campaign.name, Part.EMAIL_HTML, locale, self._variant)
        if compiled is None or compiled.debug_template is None:
            return
        # Same variables as the render that produced ``content``: subject/preheader are in the output.
        try:
            raw = compiled.debug_template.render(self._last_vars(renderer, locale, content))
        except Exception:  # noqa: BLE001 - the main render already reported real errors
            return
        if _norm(inline_rendered(raw)) != _norm(inline_rendered(content.html)):
            self.add("error", "inline", "CSS inlining of the template source changes the output; keep Jinja "
                     "statements inside table cells, or give tables an explicit <tbody> around looped rows",
                     compiled.files[0])

    def _last_vars(self, renderer, locale, content):
        ctx = self._ctx
        v = renderer._vars(Channel.EMAIL, ctx, locale, "check-0000", SAMPLE_AS_OF, self._variant)
        return {**v, "subject": content.subject, "preheader": content.preheader or ""}

    def against_db(self, renderer: CampaignRenderer, campaign, conn: Connection, limit: int) -> None:
        m, c = Member.__table__, Coupon.__table__
        now = utcnow()
        q = sa.select(m.c.id)
        if campaign.per_coupon:
            # Only members a per-coupon campaign could actually address.
            q = q.where(sa.exists().where(c.c.member_id == m.c.id, c.c.redeemed_at.is_(None), c.c.expires_at > now))
        ids: list[int] = []
        for loc in campaign.locales:
            ids += conn.execute(q.where(m.c.locale == loc).order_by(m.c.id).limit(limit)).scalars().all()
        ids += conn.execute(q.where(m.c.locale.not_in(campaign.locales)).order_by(m.c.id).limit(2)).scalars().all()
        if not ids:
            return
        contexts = renderer.build_context(conn, ids, now)
        for ctx in contexts.values():
            for tv in _template_variants(campaign):
                label = f", variant {tv}" if tv else ""
                self.render_all(renderer, campaign, ctx, now, f" (member {ctx['member']['external_id']}{label})",
                                variant=tv)


def _template_variants(campaign) -> tuple[str | None, ...]:
    """What to render: the plain templates, plus each declared variant of a variant test."""
    test = campaign.optimise.variants
    return (None, *test.names) if test is not None else (None,)


class _Dom(HTMLParser):
    """A comparable token list of a document: tags with sorted attributes, whitespace-normalised text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tokens: list[tuple] = []

    def handle_starttag(self, tag, attrs):
        self.tokens.append(("<", tag, tuple(sorted((k, v or "") for k, v in attrs))))

    def handle_endtag(self, tag):
        self.tokens.append((">", tag))

    def handle_data(self, data):
        text = re.sub(r"\s+", " ", data).strip()
        if text:
            self.tokens.append(("t", text))


def _norm(html: str) -> list[tuple]:
    d = _Dom()
    d.feed(html)
    d.close()
    return d.tokens


def check_campaign(name: str, settings: Settings | None = None, *, conn: Connection | None = None,
                   signer: LinkSigner | None = None, store: TemplateStore | None = None,
                   db_members: int = 10) -> list[Problem]:
    """Every problem of campaign ``name``'s templates (errors first). Empty means ready to send."""
    settings = settings or Settings.from_env()
    store = store or TemplateStore(settings.templates_dir, shop_locale=settings.shop_locale)  # fresh: see edits
    signer = signer or LinkSigner.from_settings(settings, allow_preview=True)
    checker = _Checker(name, settings, store, signer)
    return checker.run(conn, db_members)


def check_all(settings: Settings | None = None, *, conn: Connection | None = None, db_members: int = 10,
              campaigns: list[str] | None = None) -> dict[str, list[Problem]]:
    settings = settings or Settings.from_env()
    store = TemplateStore(settings.templates_dir, shop_locale=settings.shop_locale)
    names = campaigns or campaign_names(settings.templates_dir)
    return {n: check_campaign(n, settings, conn=conn, store=store, db_members=db_members) for n in names}


def ensure_campaign_ready(name: str, settings: Settings | None = None, *, conn: Connection | None = None) -> None:
    """Raise :class:`TemplateCheckError` if campaign ``name`` has any template error (flows call this first)."""
    settings = settings or Settings.from_env()
    problems = check_campaign(name, settings, conn=conn, store=store_for(settings))
    if any(p.severity == "error" for p in problems):
        raise TemplateCheckError(name, problems)


def _flex_uris(node) -> list[str]:
    """The ``uri`` of every URI action in a Flex container (``linkUri`` and ``uri`` keys)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("uri", "linkUri") and isinstance(value, str):
                found.append(value)
            else:
                found += _flex_uris(value)
    elif isinstance(node, list):
        for value in node:
            found += _flex_uris(value)
    return found
