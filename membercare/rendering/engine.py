"""The Jinja engine and the compiled-template store.

Files of a campaign folder (``templates/<campaign>/``), one per channel part and locale::

    email_subject.<loc>.txt     required for email
    email_preheader.<loc>.txt   optional: the inbox preview line
    email.<loc>.html            required for email: the body, placed into _layout/email.<loc>.html
    email_text.<loc>.txt        optional: text/plain part; otherwise derived from email.<loc>.html
    sms.<loc>.txt               required for SMS
    push_title.<loc>.txt        required for push
    push_body.<loc>.txt         required for push
    push_data.<loc>.json        optional (or locale-free push_data.json): FCM data, values are templates

A campaign with a variant test (``optimise.variants`` in campaign.yaml) may override any part for one
variant with ``<part>@<variant>.<locale>.<ext>`` (``email_subject@b.en.txt``); a part the variant does not
override comes from the plain file, so a subject-line test needs only the subject files per variant.

Shared files in ``templates/_layout/``: ``email.<loc>.html`` and ``email_text.<loc>.txt`` (each with a
``{# @content #}`` marker where the campaign's part goes), ``sms_optout.<loc>.txt`` (appended to
marketing SMS) and ``shop.yaml`` (shop name, address, links, currency symbols, tier names, SMS price).

Every template is compiled once per (campaign, part, locale) and kept; for HTML the layout and the
campaign body are combined and CSS-inlined *before* compilation (see :mod:`.htmltext`).

Two sandboxed environments share helpers: one autoescapes (HTML), one does not (subject, SMS, push,
text). Choosing the environment by part instead of ``select_autoescape`` avoids the trap where
``select_autoescape`` escapes string templates (SMS would show ``&amp;``). Both bound what a render
may cost in memory and time (:mod:`.limits`).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError

from membercare.errors import RenderError
from membercare.models import Channel
from membercare.rendering import helpers
from membercare.rendering.bounded import BoundedEnvironment
from membercare.rendering.htmltext import InlineError, html_to_text_template, inline_css
from membercare.rendering.locales import fallback_chain, normalise_locale

LAYOUT_DIR = "_layout"
CONTENT_MARKER = "{# @content #}"
VARIANT_SEP = "@"
_VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")  # as campaigns.VARIANT_NAME_PATTERN


class ContentLimitError(RenderError):
    """Rendered content exceeds a channel limit (SMS segments, push length, FCM payload size)."""


class Part(StrEnum):
    EMAIL_SUBJECT = "email_subject"
    EMAIL_PREHEADER = "email_preheader"
    EMAIL_HTML = "email"
    EMAIL_TEXT = "email_text"
    SMS = "sms"
    PUSH_TITLE = "push_title"
    PUSH_BODY = "push_body"
    PUSH_DATA = "push_data"


EXTENSIONS = {Part.EMAIL_HTML: "html", Part.PUSH_DATA: "json"}
REQUIRED: dict[Channel, tuple[Part, ...]] = {
    Channel.EMAIL: (Part.EMAIL_SUBJECT, Part.EMAIL_HTML),
    Channel.SMS: (Part.SMS,),
    Channel.PUSH: (Part.PUSH_TITLE, Part.PUSH_BODY),
}
OPTIONAL: dict[Channel, tuple[Part, ...]] = {
    Channel.EMAIL: (Part.EMAIL_PREHEADER, Part.EMAIL_TEXT),
    Channel.SMS: (),
    Channel.PUSH: (Part.PUSH_DATA,),
}


def part_filename(part: Part, locale: str | None, variant: str | None = None) -> str:
    ext = EXTENSIONS.get(part, "txt")
    stem = f"{part.value}{VARIANT_SEP}{variant}" if variant else part.value
    return f"{stem}.{locale}.{ext}" if locale else f"{stem}.{ext}"


def parse_template_filename(name: str) -> tuple[Part, str | None, str | None] | None:
    """``sms@b.zh-TW.txt`` -> ``(Part.SMS, "zh-TW", "b")``, ``sms.en.txt`` -> ``(Part.SMS, "en", None)``;
    ``None`` for files that are not template parts."""
    stem, _, ext = name.rpartition(".")
    part_name, _, loc = stem.partition(".")
    part_name, at, variant = part_name.partition(VARIANT_SEP)
    if at and not _VARIANT_NAME.match(variant):
        return None
    try:
        part = Part(part_name)
    except ValueError:
        return None
    if ext != EXTENSIONS.get(part, "txt"):
        return None
    if not loc:
        return (part, None, variant or None) if part == Part.PUSH_DATA else None
    try:
        return part, normalise_locale(loc), variant or None
    except ValueError:
        return None


def parse_filename(name: str) -> tuple[Part, str | None] | None:
    """``sms.zh-TW.txt`` -> ``(Part.SMS, "zh-TW")``; ``None`` for files that are not plain template parts
    (variant files: :func:`parse_template_filename`)."""
    parsed = parse_template_filename(name)
    if parsed is None or parsed[2] is not None:
        return None
    return parsed[0], parsed[1]


@dataclass(frozen=True)
class SourceSpan:
    """Lines ``[start, start + count)`` of a combined source come from ``file`` starting at ``file_line``."""

    start: int
    count: int
    file: str
    file_line: int


@dataclass
class SourceMap:
    spans: list[SourceSpan] = field(default_factory=list)

    def locate(self, line: int) -> tuple[str, int]:
        for s in self.spans:
            if s.start <= line < s.start + s.count:
                return s.file, s.file_line + (line - s.start)
        last = self.spans[-1]
        return last.file, line


def _combine(layout_src: str, layout_file: str, body_src: str, body_file: str) -> tuple[str, SourceMap]:
    """Put ``body_src`` at the layout's content marker, remembering which lines came from where."""
    before, marker, after = layout_src.partition(CONTENT_MARKER)
    if not marker:
        raise RenderError(f"layout has no {CONTENT_MARKER} marker", file=layout_file, code="layout")
    body = body_src.rstrip("\n")
    b_lines = before.count("\n")  # the body starts on the marker's line, b_lines + 1
    body_lines = body.count("\n") + 1
    smap = SourceMap([
        SourceSpan(1, b_lines, layout_file, 1),
        SourceSpan(b_lines + 1, body_lines, body_file, 1),
        SourceSpan(b_lines + body_lines + 1, after.count("\n"), layout_file, b_lines + 2),
    ])
    return before + body + after, smap


def _env(autoescape: bool) -> BoundedEnvironment:
    # Immutable sandbox: templates are edited by marketers and must not mutate the shared, cached
    # context data (recommendations, coupons) or reach Python internals; bounded (see .limits) so that
    # a template cannot exhaust memory or run for long.
    env = BoundedEnvironment(
        autoescape=autoescape,
        undefined=StrictUndefined,
        trim_blocks=not autoescape,
        lstrip_blocks=not autoescape,
        keep_trailing_newline=False,
        auto_reload=False,
        cache_size=0,
    )
    env.filters.update(helpers.FILTERS)
    env.globals.update(helpers.GLOBALS)
    return env


HTML_ENV = _env(True)
TEXT_ENV = _env(False)


@dataclass
class Compiled:
    """One compiled part: the template to render, and where its lines come from (for errors)."""

    campaign: str
    part: Part
    locale: str | None
    template: Any  # jinja2.Template, or dict[str, Template] for push data
    files: tuple[str, ...]
    source: str
    source_map: SourceMap | None = None
    debug_template: Any = None  # the un-inlined HTML, whose lines map back to files

    def locate(self, line: int | None) -> tuple[str, int | None]:
        if line is None:
            return self.files[0], None
        if self.source_map is not None:
            return self.source_map.locate(line)
        return self.files[0], line


def _compile(env, source: str, name: str, filename: str | None = None):
    try:
        code = env.compile(source, name=name, filename=filename or name)
    except TemplateSyntaxError as exc:
        raise RenderError(f"syntax error: {exc.message}", file=filename or name, line=exc.lineno,
                          code="syntax") from None
    return env.template_class.from_code(env, code, env.make_globals(None), None)


class TemplateStore:
    """Finds, compiles and caches the template parts under one templates folder. Thread-safe."""

    def __init__(self, root: Path, shop_locale: str = "zh-TW"):
        self.root = Path(root)
        self.shop_locale = normalise_locale(shop_locale)
        self._cache: dict[tuple, Compiled | None] = {}  # compiled parts (None: no such file)
        self._overridden: dict[tuple, bool] = {}
        self._resolved: dict[tuple, str | None] = {}
        self._lock = threading.Lock()
        self._shop: dict | None = None

    # -- files -----------------------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root.parent))
        except ValueError:
            return str(path)

    def path(self, campaign: str, part: Part, locale: str | None, variant: str | None = None) -> Path:
        return self.root / campaign / part_filename(part, locale, variant)

    def overrides(self, campaign: str, part: Part, locale: str | None, variant: str) -> bool:
        """Whether ``variant`` has its own file for ``part`` in ``locale`` (else the plain part is used).

        The text/plain part counts as overridden when the variant has its own text *or* HTML body (text
        derived from the variant's HTML, never the control's copy); push data also by a locale-free file.
        """
        key = (campaign, part, locale, variant)
        hit = self._overridden.get(key)
        if hit is None:
            names = [(part, locale)]
            if part == Part.EMAIL_TEXT:
                names.append((Part.EMAIL_HTML, locale))
            elif part == Part.PUSH_DATA:
                names.append((part, None))
            hit = any(self.path(campaign, p, loc, variant).is_file() for p, loc in names)
            self._overridden[key] = hit
        return hit

    def available(self, campaign: str) -> dict[Part, set[str | None]]:
        found: dict[Part, set[str | None]] = {}
        folder = self.root / campaign
        for p in folder.iterdir() if folder.is_dir() else ():
            parsed = parse_filename(p.name)
            if parsed:
                found.setdefault(parsed[0], set()).add(parsed[1])
        return found

    def resolve_locale(self, campaign: str, channel: Channel, chain: list[str]) -> str | None:
        """The first locale of ``chain`` that has every required part of ``channel``."""
        key = (campaign, channel, tuple(chain))
        if key in self._resolved:
            return self._resolved[key]
        found = None
        for loc in chain:
            if all(self.path(campaign, part, loc).is_file() for part in REQUIRED[channel]):
                found = loc
                break
        self._resolved[key] = found
        return found

    def shop(self) -> dict:
        """``_layout/shop.yaml``: shop facts shared by all campaigns."""
        if self._shop is None:
            path = self.root / LAYOUT_DIR / "shop.yaml"
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except yaml.YAMLError as exc:
                raise RenderError(f"not valid YAML: {exc}", file=self.rel(path), code="layout") from None
            self._shop = data or {}
        return self._shop

    def layout_locale(self, name: str, locale: str | None, shop_locale: str) -> tuple[Path, str]:
        for loc in fallback_chain(locale, shop_locale):
            p = self.root / LAYOUT_DIR / name.format(loc=loc)
            if p.is_file():
                return p, loc
        raise RenderError(f"no layout {name.format(loc=locale)} (nor a fallback)",
                          file=self.rel(self.root / LAYOUT_DIR), code="layout")

    # -- compiling -------------------------------------------------------------------------------
    def get(self, campaign: str, part: Part, locale: str | None, variant: str | None = None) -> Compiled | None:
        """The compiled part, or ``None`` if that file does not exist (optional parts).

        With ``variant``, the variant's own file when it has one, else the plain part.
        """
        if variant is not None and not self.overrides(campaign, part, locale, variant):
            variant = None
        key = (campaign, part, locale, variant)
        hit = self._cache.get(key, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._build(campaign, part, locale, self.shop_locale, variant)
            return self._cache[key]

    def _read(self, path: Path) -> str:
        return path.read_text(encoding="utf-8")

    def _build(self, campaign: str, part: Part, locale: str | None, shop_locale: str,
               variant: str | None = None) -> Compiled | None:
        path = self.path(campaign, part, locale, variant)
        if part == Part.PUSH_DATA and not path.is_file():
            path = self.path(campaign, part, None, variant)
        if part == Part.EMAIL_TEXT:
            return self._text(campaign, locale, shop_locale, path, variant)
        if not path.is_file():
            return None
        rel, src = self.rel(path), self._read(path)
        name = f"{campaign}/{path.name}"
        if part == Part.EMAIL_HTML:
            return self._html(campaign, locale, shop_locale, rel, src)
        if part == Part.PUSH_DATA:
            return self._push_data(campaign, locale, rel, src)
        return Compiled(campaign, part, locale, _compile(TEXT_ENV, src, name, rel), (rel,), src)

    def _html(self, campaign: str, locale: str | None, shop_locale: str, rel: str, body: str) -> Compiled:
        # Compile the body alone first so that syntax errors point at the campaign's own file.
        _compile(HTML_ENV, body, rel, rel)
        lpath, _ = self.layout_locale("email.{loc}.html", locale, shop_locale)
        lrel = self.rel(lpath)
        combined, smap = _combine(self._read(lpath), lrel, body, rel)
        debug = _compile(HTML_ENV, combined, f"{campaign}/email.{locale}.html+layout", f"{rel}+layout")
        try:
            inlined = inline_css(combined)
        except InlineError as exc:
            raise RenderError(str(exc), file=rel, code="inline") from None
        tpl = _compile(HTML_ENV, inlined, f"{campaign}/email.{locale}.html:inlined", f"{rel}+layout:inlined")
        return Compiled(campaign, Part.EMAIL_HTML, locale, tpl, (rel, lrel), combined, smap, debug)

    def _text(self, campaign: str, locale: str | None, shop_locale: str, path: Path,
              variant: str | None = None) -> Compiled | None:
        """The text/plain part: the ``email_text`` file, or text derived from the HTML body; in the text layout."""
        if path.is_file():
            rel, src = self.rel(path), self._read(path)
            _compile(TEXT_ENV, src, rel, rel)
        else:
            hpath = self.path(campaign, Part.EMAIL_HTML, locale, variant)
            if not hpath.is_file():
                return None
            rel, src = f"{self.rel(hpath)} (derived text)", html_to_text_template(self._read(hpath))
        lpath, _ = self.layout_locale("email_text.{loc}.txt", locale or shop_locale, shop_locale)
        lrel = self.rel(lpath)
        combined, smap = _combine(self._read(lpath), lrel, src, rel)
        tpl = _compile(TEXT_ENV, combined, f"{campaign}/email_text.{locale}.txt+layout", f"{rel}+layout")
        return Compiled(campaign, Part.EMAIL_TEXT, locale, tpl, (rel, lrel), combined, smap, tpl)

    def _push_data(self, campaign: str, locale: str | None, rel: str, src: str) -> Compiled:
        try:
            data = json.loads(src)
        except json.JSONDecodeError as exc:
            raise RenderError(f"not valid JSON: {exc.msg}", file=rel, line=exc.lineno, code="syntax") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise RenderError("push data must be a JSON object of string keys and string values (FCM data)",
                              file=rel, line=1, code="syntax")
        lines = src.splitlines()
        compiled = {}
        for key, value in data.items():
            line = next((i + 1 for i, text in enumerate(lines) if f'"{key}"' in text), 1)
            try:
                compiled[key] = (_compile(TEXT_ENV, value, f"{rel}#{key}", rel), line)
            except RenderError as exc:
                raise RenderError(exc.detail, file=rel, line=line, code="syntax") from None
        return Compiled(campaign, Part.PUSH_DATA, locale, compiled, (rel,), src)

    def layout_text(self, name: str, locale: str, shop_locale: str | None = None) -> tuple[str, str]:
        path, _ = self.layout_locale(name, locale, shop_locale or self.shop_locale)
        return self.rel(path), self._read(path)


def context_line(exc: BaseException, filename: str) -> int | None:
    """The template line where ``exc`` was raised, from Jinja's rewritten traceback."""
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


