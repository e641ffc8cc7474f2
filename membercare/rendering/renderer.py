"""Render a campaign's message for one member on one channel.

The delivery engine creates one :class:`CampaignRenderer` per campaign run and calls, per batch::

    renderer = CampaignRenderer(campaign, settings)            # or load_campaign(name, settings)
    contexts = renderer.build_context(conn, member_ids, as_of)  # a few set-based queries
    for member_id, ctx in contexts.items():
        content = renderer.render(Channel.SMS, ctx, message_id=...)   # SmsContent / EmailContent / PushContent

``render`` raises :class:`~membercare.rendering.engine.RenderError` when a template fails (code
``limit`` when it goes over a :class:`~membercare.rendering.limits.RenderLimits` bound: too large a
value or output, too many loop iterations, too long) and
:class:`~membercare.rendering.engine.ContentLimitError` when the result breaks a channel limit
(more SMS segments than the campaign allows, push text over its limits, an FCM payload of 4 KB or
more). The engine should record such a message as failed for that member: it is never truncated.

A renderer is safe to share between threads once built (compiled templates and formatters are
cached under a lock; rendering itself holds no shared mutable state).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from sqlalchemy.engine import Connection

from membercare.campaigns.definition import Campaign, load_campaign
from membercare.config import Settings
from membercare.delivery.contract import Content, EmailContent, PushContent, SmsContent
from membercare.links import LinkSigner
from membercare.models import Channel
from membercare.rendering import helpers
from membercare.rendering import sms as smslen
from membercare.rendering.bounded import render_bounded
from membercare.rendering.context import ContextBuilder
from membercare.rendering.engine import (
    Compiled,
    ContentLimitError,
    Part,
    RenderError,
    TemplateStore,
    context_line,
)
from membercare.rendering.limits import DEFAULT_LIMITS, RenderLimits, TemplateLimitError
from membercare.rendering.locales import Formatter, fallback_chain, language_of
from membercare.timeutil import utcnow

FCM_PAYLOAD_LIMIT = 4096  # bytes, notification + data
MESSAGE_ID_PLACEHOLDER = "0" * 36  # reserve room for the id the engine adds, when checking sizes
_WS = re.compile(r"\s+")
_BLANKS = re.compile(r"\n{3,}")

log = logging.getLogger(__name__)

_STORES: dict[str, TemplateStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(settings: Settings) -> TemplateStore:
    """The process-wide compiled-template store of a templates folder (compiled once, reused by every run)."""
    key = str(settings.templates_dir)
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = TemplateStore(settings.templates_dir, shop_locale=settings.shop_locale)
        return _STORES[key]


def reset_stores() -> None:
    """Forget compiled templates (after editing files in a long-lived process, and in tests)."""
    with _STORES_LOCK:
        _STORES.clear()


class CampaignRenderer:
    def __init__(self, campaign: Campaign | str, settings: Settings | None = None, *,
                 signer: LinkSigner | None = None, store: TemplateStore | None = None,
                 limits: RenderLimits = DEFAULT_LIMITS):
        self.settings = settings or Settings.from_env()
        self.limits = limits  # per rendered part (see membercare.rendering.limits)
        self.campaign = load_campaign(campaign, self.settings) if isinstance(campaign, str) else campaign
        self.store = store or store_for(self.settings)
        self.signer = signer or LinkSigner.from_settings(self.settings)
        self.shop_all = self.store.shop()
        self.builder = ContextBuilder(self.campaign, self.signer, self.shop_all)
        self._formatters: dict[tuple[str, str], Formatter] = {}
        self._locales: dict[tuple[Channel, str | None], str] = {}
        self._shop_views: dict[str, dict] = {}
        self._optout: dict[str, str] = {}
        self._lock = threading.Lock()
        self.sms_price_minor = int((self.shop_all.get("sms") or {}).get("price_per_segment_minor", 0))

    # -- contexts ----------------------------------------------------------------------------------
    def build_context(self, conn: Connection, member_ids: Sequence[int], as_of: datetime) -> dict[int, dict]:
        """Template contexts for a batch of members (see :mod:`membercare.rendering.context`)."""
        return self.builder.build(conn, member_ids, as_of)

    # -- locale and helpers ------------------------------------------------------------------------
    def template_locale(self, channel: Channel, member_locale: str | None) -> str:
        """The locale whose templates this member gets on ``channel`` (member locale, language, defaults)."""
        key = (channel, member_locale)
        loc = self._locales.get(key)
        if loc is None:
            chain = fallback_chain(member_locale, self.campaign.default_locale, self.settings.shop_locale)
            loc = self.store.resolve_locale(self.campaign.name, channel, chain)
            if loc is None:
                raise RenderError(f"no {channel.value} templates for any of {chain}",
                                  file=f"templates/{self.campaign.name}", code="missing-locale")
            self._locales[key] = loc
        return loc

    def formatter(self, template_locale: str, member_locale: str | None, timezone: str | None) -> Formatter:
        raw_key = (template_locale, member_locale, timezone)
        f = self._formatters.get(raw_key)  # type: ignore[arg-type]
        if f is None:
            f = self._formatters[raw_key] = self._formatter(template_locale, member_locale, timezone)  # type: ignore[index]
        return f

    def _formatter(self, template_locale: str, member_locale: str | None, timezone: str | None) -> Formatter:
        # Format in the member's own locale when it is a variant of the template's language (en-GB
        # dates for an en template), else in the template's locale so text and numbers agree.
        fmt_locale = template_locale
        if member_locale:
            try:
                if language_of(member_locale) == language_of(template_locale):
                    fmt_locale = member_locale
            except ValueError:
                pass
        key = (fmt_locale, timezone or self.settings.shop_timezone)
        f = self._formatters.get(key)
        if f is None:
            with self._lock:
                f = self._formatters.get(key)
                if f is None:
                    try:
                        f = Formatter(fmt_locale, timezone=key[1],
                                      currency_symbols=self.shop_all.get("currency_symbols"),
                                      default_currency=self.settings.shop_currency)
                    except Exception as exc:  # noqa: BLE001 - unknown zone or locale in member data: not a failure
                        # Once per (locale, zone) pair, as the fallback is cached; neither names a member.
                        log.warning("formatting for locale %.40r, time zone %.40r failed (%s): using %s, %s instead",
                                    fmt_locale, key[1], type(exc).__name__, template_locale,
                                    self.settings.shop_timezone)
                        f = Formatter(template_locale, timezone=self.settings.shop_timezone,
                                      currency_symbols=self.shop_all.get("currency_symbols"),
                                      default_currency=self.settings.shop_currency)
                    self._formatters[key] = f
        return f

    def shop_view(self, locale: str) -> dict:
        """``shop`` in templates: shop.yaml with per-locale values resolved for ``locale``."""
        view = self._shop_views.get(locale)
        if view is None:
            lang = language_of(locale)
            view = {}
            for k, v in self.shop_all.items():
                localised = isinstance(v, dict) and any(isinstance(x, str) for x in v.values())
                if localised and k not in ("currency_symbols",):
                    v = v.get(locale) or v.get(lang) or v.get(self.settings.shop_locale) or next(iter(v.values()))
                view[k] = v
            self._shop_views[locale] = view
        return view

    def _vars(self, channel: Channel, context: Mapping[str, Any], locale: str, message_id: str | None,
              as_of: datetime | None, variant: str | None = None) -> dict:
        member = context["member"]
        fmt = self.formatter(locale, member.get("locale"), member.get("timezone"))
        return {
            **helpers.GLOBALS,
            **context,
            "shop": self.shop_view(locale),
            "campaign": {"name": self.campaign.name, "purpose": self.campaign.purpose.value},
            "is_marketing": self.campaign.is_marketing,
            "message_id": message_id or "",
            "variant": variant,
            "_fmt": fmt,
            "_locale": locale,
            "_channel": channel.value,
            "_campaign": self.campaign.utm_name,
            "_as_of": as_of or context.get("as_of") or utcnow(),
        }

    def _run(self, compiled: Compiled, variables: dict) -> str:
        try:
            return render_bounded(compiled.template, variables, self.limits)
        except TemplateError as exc:
            raise self._located(compiled, exc, variables) from None
        except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError,
                MemoryError) as exc:
            raise self._located(compiled, exc, variables) from None

    def _located(self, compiled: Compiled, exc: Exception, variables: dict) -> RenderError:
        """A RenderError with the file and line of the failing template expression."""
        tpl = compiled.debug_template or compiled.template
        if compiled.debug_template is not None and compiled.debug_template is not compiled.template:
            try:  # re-run the un-inlined twin, whose line numbers map back to the files
                render_bounded(tpl, variables, self.limits, shared=False)
            except Exception as again:  # noqa: BLE001 - we only want its traceback
                if type(again) is type(exc):
                    exc = again
        line = context_line(exc, tpl.filename) if getattr(tpl, "filename", None) else None
        file, fline = compiled.locate(line)
        return _render_error(exc, file, fline)

    def _part(self, part: Part, locale: str, variant: str | None = None) -> Compiled | None:
        return self.store.get(self.campaign.name, part, locale, variant)

    def _required(self, part: Part, locale: str, variant: str | None = None) -> Compiled:
        """A part every locale that ``template_locale`` resolves has (its file was there when resolved)."""
        compiled = self._part(part, locale, variant)
        if compiled is None:
            raise RenderError(f"no {part.value} template for {locale}", file=f"templates/{self.campaign.name}",
                              code="missing-locale")
        return compiled

    def _variant(self, variant: str | None) -> str | None:
        """The template variant to use: ``None`` for plain templates (no test, or control rows)."""
        if variant is None:
            return None
        test = self.campaign.optimise.variants
        if test is None or variant not in test.names:
            raise RenderError(f"campaign {self.campaign.name} has no template variant {variant!r}"
                              + (f" (its variants: {', '.join(test.names)})" if test else ""), code="variant")
        return variant

    # -- rendering ---------------------------------------------------------------------------------
    def render(self, channel: Channel | str, context: Mapping[str, Any], *, message_id: str | None = None,
               as_of: datetime | None = None, variant: str | None = None) -> Content:
        """One channel's content for one member; ``variant`` picks that template variant's parts
        (``<part>@<variant>.<locale>.<ext>``, falling back to the plain parts)."""
        channel = Channel(channel)
        if channel not in self.campaign.channels:
            raise RenderError(f"campaign {self.campaign.name} does not use channel {channel.value}", code="channel")
        variant = self._variant(variant)
        locale = self.template_locale(channel, context["member"].get("locale"))
        variables = self._vars(channel, context, locale, message_id, as_of, variant)
        if channel == Channel.SMS:
            return self.render_sms(locale, variables, variant=variant)
        if channel == Channel.PUSH:
            return self.render_push(locale, variables, message_id, variant=variant)
        return self.render_email(locale, variables, variant=variant)

    def render_email(self, locale: str, v: dict, *, variant: str | None = None) -> EmailContent:
        subject = _WS.sub(" ", self._run(self._required(Part.EMAIL_SUBJECT, locale, variant), v)).strip()
        pre = self._part(Part.EMAIL_PREHEADER, locale, variant)
        preheader = _WS.sub(" ", self._run(pre, v)).strip() if pre else None
        v = {**v, "subject": subject, "preheader": preheader or ""}
        html = self._run(self._required(Part.EMAIL_HTML, locale, variant), v)
        text = self._run(self._required(Part.EMAIL_TEXT, locale, variant), v)
        text = _BLANKS.sub("\n\n", text).strip() + "\n"
        headers: dict[str, str] = {}
        if self.campaign.is_marketing:
            # RFC 8058: an HTTPS URI that accepts a POST "List-Unsubscribe=One-Click", plus RFC 2369's mailto.
            targets = [f"<{v['email_unsubscribe_url']}>"]
            mailto = self.shop_all.get("unsubscribe_mailto")
            if mailto:
                targets.append(f"<mailto:{mailto}?subject=unsubscribe>")
            headers["List-Unsubscribe"] = ", ".join(targets)
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        if not subject:
            raise ContentLimitError("email subject renders empty",
                                    file=self._required(Part.EMAIL_SUBJECT, locale, variant).files[0],
                                    code="empty")
        return EmailContent(subject=subject, html=html, text=text, preheader=preheader, headers=headers)

    def sms_optout(self, locale: str) -> str:
        text = self._optout.get(locale)
        if text is None:
            _, text = self.store.layout_text("sms_optout.{loc}.txt", locale, self.settings.shop_locale)
            self._optout[locale] = text = text.strip()
        return text

    def render_sms(self, locale: str, v: dict, *, variant: str | None = None) -> SmsContent:
        compiled = self._required(Part.SMS, locale, variant)
        body = self._run(compiled, v).strip()
        if self.campaign.is_marketing:
            optout = self.sms_optout(locale)
            if optout and optout not in body:
                body = f"{body} {optout}"
        m = smslen.measure(body)
        if m.segments > self.campaign.sms.max_segments:
            raise ContentLimitError(
                f"SMS is {m.segments} segments ({m.units} {m.encoding} units), over the campaign's "
                f"max_segments {self.campaign.sms.max_segments}", file=compiled.files[0], code="sms-too-long")
        if not body:
            raise ContentLimitError("SMS renders empty", file=compiled.files[0], code="empty")
        return SmsContent(body=body, encoding=m.encoding, segments=m.segments)

    def render_push(self, locale: str, v: dict, message_id: str | None = None, *,
                    variant: str | None = None) -> PushContent:
        tc, bc = self._required(Part.PUSH_TITLE, locale, variant), self._required(Part.PUSH_BODY, locale, variant)
        title = _WS.sub(" ", self._run(tc, v)).strip()
        body = self._run(bc, v).strip()
        data: dict[str, str] = {}
        dc = self._part(Part.PUSH_DATA, locale, variant)
        if dc is not None:
            for key, (tpl, line) in dc.template.items():
                try:
                    data[key] = render_bounded(tpl, v, self.limits).strip()
                except Exception as exc:  # noqa: BLE001 - located below
                    raise _render_error(exc, dc.files[0], line) from None
        data["campaign"] = self.campaign.name
        if message_id:
            data["message_id"] = message_id
        rules = self.campaign.push
        if len(title) > rules.title_max:
            raise ContentLimitError(f"push title is {len(title)} characters, over {rules.title_max}",
                                    file=tc.files[0], code="push-too-long")
        if len(body) > rules.body_max:
            raise ContentLimitError(f"push body is {len(body)} characters, over {rules.body_max}",
                                    file=bc.files[0], code="push-too-long")
        if not title or not body:
            raise ContentLimitError("push title or body renders empty", file=(tc if not title else bc).files[0],
                                    code="empty")
        size = fcm_payload_size(title, body, data if message_id else {**data, "message_id": MESSAGE_ID_PLACEHOLDER})
        if size >= FCM_PAYLOAD_LIMIT:
            raise ContentLimitError(f"FCM payload is {size} bytes; FCM refuses 4096 or more",
                                    file=(dc or bc).files[0], code="push-payload")
        return PushContent(title=title, body=body, data=data)

    def sms_cost_minor(self, content: SmsContent) -> int:
        """Estimated carrier cost (shop.yaml ``sms.price_per_segment_minor`` per segment)."""
        return smslen.cost_minor(content.segments, self.sms_price_minor)


def _render_error(exc: BaseException, file: str, line: int | None) -> RenderError:
    """The RenderError for an exception raised while rendering: ``limit`` for a breached bound (or a
    recursion too deep, or memory exhausted), ``undefined`` for a missing variable, else ``render``."""
    msg = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, TemplateLimitError):
        return RenderError(f"over a template limit: {msg}", file=file, line=line, code="limit")
    if isinstance(exc, (RecursionError, MemoryError)):
        what = "macros call each other too deeply" if isinstance(exc, RecursionError) else "out of memory"
        return RenderError(f"over a template limit: {what}", file=file, line=line, code="limit")
    if type(exc).__name__ == "UndefinedError":
        return RenderError(f"undefined variable: {msg}", file=file, line=line, code="undefined")
    return RenderError(f"{type(exc).__name__}: {msg}", file=file, line=line, code="render")


def fcm_payload_size(title: str, body: str, data: Mapping[str, str]) -> int:
    """Bytes of the FCM message's notification + data, as FCM counts them (UTF-8 JSON)."""
    payload = {"notification": {"title": title, "body": body}, "data": dict(data)}
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


