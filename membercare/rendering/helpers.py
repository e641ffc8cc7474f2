"""Template helpers: the filters and functions marketers use in templates.

They read the render's locale-specific :class:`~membercare.rendering.locales.Formatter` and the
channel/campaign from the Jinja context (keys ``_fmt``, ``_channel``, ``_campaign``, ``_as_of``,
``_tz``, set by the renderer), so one compiled template serves every member and locale.

Filters::

    {{ 120000 | money }}                 NT$1,200           (minor units; optional currency)
    {{ 1234567 | number }}               1,234,567
    {{ coupon.expires_at | date }}       2026年11月23日 / November 23, 2026
    {{ member.birthday | date("month_day") }}   11月23日 / November 23
    {{ coupon | discount }}              現折NT$200 / NT$200 off, 85折 / 15% off
    {{ coupon | voucher }}               NT$200 折價券 / NT$200 voucher, 85折優惠券 / 15%-off voucher
    {{ coupon | min_spend }}             滿NT$1,000可用 / on orders of NT$1,000 or more
    {{ coupon.expires_at | days_left }}  3   (calendar days in the member's time zone)
    {{ 3 | in_days }}                    3天後 / in 3 days (今天 / today, 明天 / tomorrow)
    {{ member.tier | tier_name }}        金卡 / Gold

Functions::

    {{ salutation(member) }}             王小明您好 / Hi Ming,
    {{ link("https://shop.example.com/sale", "hero") }}   adds utm_source/medium/campaign/content
    {{ product_url(product) }}           the product page, with UTM tags
    {{ app_link("coupons/" ~ coupon.code) }}              app deep link (push data)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeAlias

from jinja2 import pass_context
from jinja2.runtime import Context

from membercare.links import add_utm
from membercare.rendering.locales import days_until

# A template value whose fields the helpers read: a dict (sample data, offers) or an object with
# attributes (a model row); see :func:`_get`.
Record: TypeAlias = Mapping[str, Any] | object

# Which utm_medium each channel reports as.
UTM_MEDIUM = {"email": "email", "sms": "sms", "push": "push", "line": "line"}


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


@pass_context
def money(ctx: Context, amount_minor: int, currency: str | None = None) -> str:
    return ctx["_fmt"].money(int(amount_minor), currency)


@pass_context
def number(ctx: Context, value: int | float | Decimal, digits: int | None = None) -> str:
    return ctx["_fmt"].number(value, digits)


@pass_context
def date_filter(ctx: Context, value: date | datetime, style: str = "long") -> str:
    return ctx["_fmt"].date(value, style)


@pass_context
def discount(ctx: Context, coupon: Record, style: str = "discount") -> str:
    """A coupon's or an offer's value, the way shoppers in the member's language read it."""
    return ctx["_fmt"].discount(kind=_get(coupon, "kind"), amount_minor=_get(coupon, "amount_minor"),
                                percent_off=_get(coupon, "percent_off"), currency=_get(coupon, "currency"),
                                style=style)


@pass_context
def voucher(ctx: Context, coupon: Record) -> str:
    return discount(ctx, coupon, "voucher")


@pass_context
def min_spend(ctx: Context, coupon: Record) -> str:
    return ctx["_fmt"].min_spend(int(_get(coupon, "min_spend_minor", 0) or 0), _get(coupon, "currency"))


@pass_context
def days_left(ctx: Context, when: datetime | date) -> int:
    return days_until(when, ctx["_as_of"], ctx["_fmt"].tz)


@pass_context
def in_days(ctx: Context, n: int) -> str:
    zh = ctx["_fmt"].language == "zh"
    if n <= 0:
        return "今天" if zh else "today"
    if n == 1:
        return "明天" if zh else "tomorrow"
    return f"{n}天後" if zh else f"in {n} days"


@pass_context
def tier_name(ctx: Context, code: str) -> str:
    names = (ctx["shop"].get("tiers") or {}).get(code) or {}
    return names.get(ctx["_locale"]) or names.get(ctx["_fmt"].language) or code.title()


@pass_context
def salutation(ctx: Context, member: Record) -> str:
    """A greeting line in the member's language; falls back gracefully when the name is missing."""
    zh = ctx["_fmt"].language == "zh"
    name = (_get(member, "name") or "").strip()
    if zh:
        return f"{name}您好" if name else "親愛的會員您好"
    first = (_get(member, "first_name") or (name.split()[0] if name else "")).strip()
    return f"Hi {first}," if first else "Hi there,"


@pass_context
def link(ctx: Context, url: str, content: str | None = None) -> str:
    """``url`` tagged with UTM parameters for this campaign and channel."""
    channel = ctx["_channel"]
    return add_utm(str(url), source="membercare", medium=UTM_MEDIUM.get(channel, channel),
                   campaign=ctx["_campaign"], content=content)


@pass_context
def product_url(ctx: Context, product: Record, content: str | None = "product") -> str:
    return link(ctx, _get(product, "url"), content)


@pass_context
def app_link(ctx: Context, path: str) -> str:
    scheme = ctx["shop"].get("app_scheme") or "app"
    return f"{scheme}://{str(path).lstrip('/')}"


FILTERS = {
    "money": money,
    "number": number,
    "date": date_filter,
    "discount": discount,
    "voucher": voucher,
    "min_spend": min_spend,
    "days_left": days_left,
    "in_days": in_days,
    "tier_name": tier_name,
}
GLOBALS = {
    "salutation": salutation,
    "link": link,
    "product_url": product_url,
    "app_link": app_link,
}
