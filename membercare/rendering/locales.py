"""Locales: normalisation, the template fallback chain, and Babel-backed formatting helpers.

Locale tags are BCP 47 with a hyphen (``zh-TW``, ``en``), the form members and file names use.
Babel wants ``zh_TW``; :func:`babel_locale` converts (and resolves ``zh_TW`` to ``zh_Hant_TW``).

Formatting is the hot path of rendering (Babel's ``format_currency`` costs about 100 µs a call), so
each :class:`Formatter` memoises its results: a run formats the same few coupon values and dates
for thousands of members.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_skeleton
from babel.numbers import format_currency, format_decimal

_TAG = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


def normalise_locale(tag: str) -> str:
    """``zh_tw`` -> ``zh-TW``, ``EN`` -> ``en``, ``zh-hant-tw`` -> ``zh-Hant-TW``. Raises ValueError if not a tag."""
    tag = (tag or "").strip()
    if not _TAG.match(tag):
        raise ValueError(f"not a locale tag: {tag!r}")
    parts = re.split(r"[-_]", tag)
    out = [parts[0].lower()]
    for p in parts[1:]:
        if len(p) == 4 and p.isalpha():
            out.append(p.title())  # script
        elif len(p) in (2, 3):
            out.append(p.upper())  # region
        else:
            out.append(p.lower())
    return "-".join(out)


def language_of(tag: str) -> str:
    return normalise_locale(tag).split("-")[0]


def fallback_chain(member_locale: str | None, *defaults: str) -> list[str]:
    """Locales to try, best first: the member's locale, its language, then each default (and its language).

    ``fallback_chain("zh-Hant-TW", "zh-TW")`` -> ``["zh-Hant-TW", "zh-Hant", "zh", "zh-TW"]``.
    An unparseable member locale is skipped rather than failing the message.
    """
    chain: list[str] = []
    for tag in (member_locale, *defaults):
        if not tag:
            continue
        try:
            parts = normalise_locale(tag).split("-")
        except ValueError:
            continue
        for n in range(len(parts), 0, -1):
            cand = "-".join(parts[:n])
            if cand not in chain:
                chain.append(cand)
    return chain


@lru_cache(maxsize=64)
def babel_locale(tag: str) -> Locale:
    try:
        return Locale.parse(normalise_locale(tag).replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse(language_of(tag))


# In Formatter's body its method ``datetime`` hides the type of that name from the annotations after it.
_DateTime = datetime


class Formatter:
    """Per-locale formatting of money, numbers, dates and coupon values, memoised.

    ``currency_symbols`` overrides Babel's symbol per currency (Babel writes TWD as ``$`` in
    zh-TW, where shops print ``NT$``). Money arrives in minor units (hundredths) as stored.
    """

    def __init__(self, locale: str, *, timezone: str = "Asia/Taipei",
                 currency_symbols: Mapping[str, str] | None = None, default_currency: str = "TWD"):
        self.tag = normalise_locale(locale)
        self.language = language_of(self.tag)
        self.locale = babel_locale(self.tag)
        self.tz = ZoneInfo(timezone)
        self.default_currency = default_currency
        self._symbols = dict(currency_symbols or {})
        # Bound per instance so that each Formatter has its own cache.
        self.money = lru_cache(maxsize=4096)(self._money)
        self.number = lru_cache(maxsize=4096)(self._number)
        self.date = lru_cache(maxsize=4096)(self._date)

    # -- money and numbers --------------------------------------------------------------------
    def _money(self, amount_minor: int, currency: str | None = None) -> str:
        currency = currency or self.default_currency
        value = Decimal(int(amount_minor)) / 100
        whole = value == value.to_integral_value()
        fmt = "¤#,##0" if whole else "¤#,##0.00"
        text = format_currency(value, currency, format=fmt, locale=self.locale, currency_digits=False)
        symbol = self._symbols.get(currency)
        if symbol:
            from babel.numbers import get_currency_symbol

            babel_symbol = get_currency_symbol(currency, self.locale)
            text = text.replace(babel_symbol, symbol, 1)
        return text.replace("\xa0", " ")

    def _number(self, value: int | float | Decimal, digits: int | None = None) -> str:
        if digits is not None:
            value = round(Decimal(str(value)), digits)
            return format_decimal(value, format="#,##0." + "0" * digits if digits else "#,##0", locale=self.locale)
        return format_decimal(value, locale=self.locale)

    # -- dates ---------------------------------------------------------------------------------
    def _date(self, value: date | datetime, style: str = "long") -> str:
        if isinstance(value, datetime):
            value = value.astimezone(self.tz).date()
        if style == "month_day":
            # "11月23日" / "November 23": birthdays and near deadlines, where the year is noise.
            return format_skeleton("MMMMd", value, locale=self.locale)
        return format_date(value, style, locale=self.locale)

    def datetime(self, value: datetime, style: str = "short") -> str:
        return format_datetime(value.astimezone(self.tz), style, tzinfo=self.tz, locale=self.locale)

    def local_date(self, value: _DateTime) -> date:
        return value.astimezone(self.tz).date()

    # -- coupons and offers --------------------------------------------------------------------
    def discount(self, *, kind: str, amount_minor: int | None = None, percent_off: int | None = None,
                 currency: str | None = None, style: str = "discount") -> str:
        """A coupon's value as shoppers read it.

        ``discount``: ``現折NT$200`` / ``NT$200 off``, ``85折`` / ``15% off``;
        ``voucher``: ``NT$200 折價券`` / ``NT$200 voucher``, ``85折優惠券`` / ``15%-off voucher``.
        """
        zh = self.language == "zh"
        if kind == "percent":
            pct = int(percent_off or 0)
            if zh:
                # Taiwanese retail writes 15 % off as 85折 and 10 % off as 9折.
                rest = 100 - pct
                value = f"{rest // 10 if rest % 10 == 0 else rest}折"
                return value + "優惠券" if style == "voucher" else value
            return f"{pct}%-off voucher" if style == "voucher" else f"{pct}% off"
        amount = self.money(int(amount_minor or 0), currency)
        if style == "voucher":
            return f"{amount} 折價券" if zh else f"{amount} voucher"
        return f"現折{amount}" if zh else f"{amount} off"

    def min_spend(self, amount_minor: int, currency: str | None = None) -> str:
        if not amount_minor:
            return "無低消限制" if self.language == "zh" else "no minimum spend"
        amount = self.money(int(amount_minor), currency)
        return f"滿{amount}可用" if self.language == "zh" else f"on orders of {amount} or more"


def days_until(when: datetime | date, as_of: datetime, tz: ZoneInfo) -> int:
    """Whole calendar days from ``as_of`` to ``when`` in the member's zone (0 = today, negative = past)."""
    today = as_of.astimezone(tz).date()
    target = when.astimezone(tz).date() if isinstance(when, datetime) else when
    return (target - today).days


def join_names(names: Iterable[str], language: str) -> str:
    names = [n for n in names if n]
    if not names:
        return ""
    if language == "zh":
        return "、".join(names)
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]
