"""Validation and normalisation of member data that arrives from outside (imports, webhooks, the generator).

Every function takes the text as received and returns the value in membercare's canonical form, or
raises :class:`ValidationError` with a short reason that is safe to show and log: reasons never echo
an email address, a phone number or a push token, because rejects end up in terminal output. A value
a reason repeats goes through :func:`quoted`, which shows it only when it cannot be contact data.

The rule throughout is *reject rather than guess*: ``"1,20"`` is not read as 1.20 or 120,
``"2026-02-30"`` is not rolled over to March, a local time that does not exist (or exists twice) in
the member's timezone is not shifted to a neighbour, a phone number that ``phonenumbers`` does not
consider valid for the member's region is not kept "as is".

Canonical forms:

* email: as normalised by ``email-validator`` (domain lower-cased and IDNA-checked; no DNS lookups)
* phone: E.164 (``+886912345678``), parsed in the member's region when it has no country code
* country: ISO 3166-1 alpha-2, upper case, one of the regions ``phonenumbers`` knows
* locale: BCP 47 as written but canonically cased (``zh-TW``, ``zh-Hant-TW``, ``en``), known to Babel
* timezone: an IANA zone name available to :mod:`zoneinfo`
* money: integer minor units (hundredths), computed with :class:`~decimal.Decimal`, never floats
* datetimes: aware UTC; a value without offset is read in a given IANA zone
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo

from membercare.errors import InputError
from membercare.models import Channel
from membercare.timeutil import UTC, utcnow, valid_timezone


class ValidationError(InputError, ValueError):
    """A value from outside that membercare refuses. ``str(error)`` is a one-line, PII-free reason."""


# ---------------------------------------------------------------------------------------------------------------------
# Repeating a value in a reason

_PHONE_LIKE = re.compile(r"\+?[\d\s().\-]+")
_DATE_LIKE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}(?:[T ].*)?")
QUOTE_LIMIT = 40


def quoted(value: str) -> str:
    """``repr`` of a value that a reason may repeat, or a description of it when it could be personal data.

    A value typed into the wrong column (or a file whose header names the columns in the wrong order)
    puts an e-mail address or a phone number where a date or a code was expected; the reason for such a
    row must still not print it. Hidden: anything with an ``@``, anything made of phone-number
    characters with 7 or more digits (dates excepted), anything longer than :data:`QUOTE_LIMIT` characters.
    """
    text = value.strip()
    if "@" in text:
        return "(a value that looks like an e-mail address, not shown)"
    if (_PHONE_LIKE.fullmatch(text) and sum(c.isdigit() for c in text) >= 7
            and not _DATE_LIKE.fullmatch(text)):
        return "(a value that looks like a phone number, not shown)"
    if len(text) > QUOTE_LIMIT:
        return f"(a {len(text)}-character value, not shown)"
    return repr(text)


# ---------------------------------------------------------------------------------------------------------------------
# Characters a cell may hold

# C0 and C1 control characters, DEL, the Unicode line and paragraph separators, and lone surrogates (a
# reader decoding with ``errors="surrogateescape"`` turns every byte that is not UTF-8 into one of them).
_SUSPECT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_FREE_TEXT_ALLOWED = frozenset("\t\n\r\u2028\u2029")
LINE_BREAKS = frozenset("\n\r\u2028\u2029")


def check_cell_characters(value: str, *, field: str, free_text: bool = False) -> None:
    """Refuse a cell holding a control character, a NUL or bytes that were not UTF-8.

    ``free_text`` columns (a name, a note) may hold tabs and line breaks, as a spreadsheet cell can;
    every other column (identifiers, codes, dates, amounts) may not. PostgreSQL cannot store NUL at all,
    and a control character in an identifier is never what the shop meant, so the row is refused rather
    than the character dropped. The reason names the character and its position, never the value.
    """
    for m in _SUSPECT.finditer(value):
        ch = m.group()
        if free_text and ch in _FREE_TEXT_ALLOWED:
            continue
        where = f"at character {m.start() + 1}"
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            raise ValidationError(f"{field} is not UTF-8 text (byte 0x{code - 0xDC00:02X} {where}); "
                                  "save the file as UTF-8")
        if 0xD800 <= code <= 0xDFFF:
            raise ValidationError(f"{field} is not UTF-8 text (a lone surrogate {where})")
        if ch == "\x00":
            raise ValidationError(f"{field} contains a NUL character {where}")
        if ch == "\t":
            raise ValidationError(f"{field} contains a tab {where}")
        if ch in LINE_BREAKS:
            raise ValidationError(f"{field} contains a line break {where}")
        raise ValidationError(f"{field} contains the control character U+{code:04X} {where}")


def has_suspect_characters(text: str) -> bool:
    """Whether :func:`check_cell_characters` needs to look at ``text`` at all (one regex search)."""
    return _SUSPECT.search(text) is not None


# ---------------------------------------------------------------------------------------------------------------------
# Contact data


def normalise_email(value: str) -> str:
    """A syntactically valid address in normalised form. No DNS lookups (imports must not hit the network)."""
    from email_validator import EmailNotValidError, validate_email

    value = value.strip()
    if not value:
        raise ValidationError("email is empty")
    try:
        info = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        # email-validator's messages describe the problem without repeating the address.
        raise ValidationError(f"invalid email: {exc}") from None
    return info.normalized


@lru_cache(maxsize=1)
def _regions() -> frozenset[str]:
    import phonenumbers

    return frozenset(phonenumbers.SUPPORTED_REGIONS)


def normalise_country(value: str) -> str:
    """ISO 3166-1 alpha-2 code (``tw`` -> ``TW``) of a region whose phone numbers we can parse."""
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", code) or code not in _regions():
        raise ValidationError(f"unknown country code {quoted(value)} (expected ISO 3166 alpha-2, e.g. TW)")
    return code


def normalise_phone(value: str, region: str) -> str:
    """E.164 form of a phone number that is valid for ``region`` (or carries its own ``+`` country code)."""
    import phonenumbers

    text = value.strip()
    if not text:
        raise ValidationError("phone is empty")
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise ValidationError(f"phone is not a phone number (region {region})") from None
    if not phonenumbers.is_valid_number(number):
        raise ValidationError(f"phone is not a valid number for region {region}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# ---------------------------------------------------------------------------------------------------------------------
# Locale and time zone

_LOCALE_RE = re.compile(r"(?P<lang>[A-Za-z]{2,3})(?:[-_](?P<script>[A-Za-z]{4}))?"
                        r"(?:[-_](?P<territory>[A-Za-z]{2}|\d{3}))?")


def normalise_locale(value: str) -> str:
    """``zh_tw`` -> ``zh-TW``; the locale must be known to Babel (templates and number formats need it)."""
    return _normalise_locale(value.strip())


@lru_cache(maxsize=512)  # a shop has a handful of locales; Babel's lookup is slow (~1 ms)
def _normalise_locale(value: str) -> str:
    from babel import Locale, UnknownLocaleError

    text = value.strip()
    m = _LOCALE_RE.fullmatch(text)
    if not m:
        raise ValidationError(f"invalid locale {quoted(text)} (expected e.g. zh-TW, en, ja-JP)")
    parts = [m["lang"].lower()]
    if m["script"]:
        parts.append(m["script"].title())
    if m["territory"]:
        parts.append(m["territory"].upper())
    try:
        Locale.parse("_".join(parts))
    except (UnknownLocaleError, ValueError):
        raise ValidationError(f"unknown locale {quoted(text)}") from None
    return "-".join(parts)


def normalise_timezone(value: str) -> str:
    return _normalise_timezone(value.strip())


@lru_cache(maxsize=512)
def _normalise_timezone(name: str) -> str:
    # zoneinfo also accepts relative file paths under the tzdata root; only plain zone names are wanted.
    if not name or not re.fullmatch(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*", name) or not valid_timezone(name):
        raise ValidationError(f"unknown timezone {quoted(name)} (expected an IANA name, e.g. Asia/Taipei)")
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Dates and times

_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME_RE = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)"
    r"\s*(?P<offset>Z|z|[+-]\d{2}:?\d{2})?)?"
)


def parse_date(value: str, *, field: str = "date") -> date:
    """Strict ``YYYY-MM-DD`` (Feb 29 only in leap years, no rollover)."""
    text = value.strip()
    if not _DATE_RE.fullmatch(text):
        raise ValidationError(f"{field} {quoted(text)} is not a YYYY-MM-DD date")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValidationError(f"{field} {quoted(text)} is not a calendar date") from None


def parse_birthday(value: str, *, today: date | None = None) -> date:
    d = parse_date(value, field="birthday")
    today = today or utcnow().date()
    if d.year < 1900 or d > today:
        raise ValidationError(f"birthday {quoted(value)} is out of range (1900 .. today)")
    return d


def parse_datetime(value: str, *, field: str = "datetime") -> datetime:
    """An ISO 8601 date or datetime; naive when the text has no offset (see :func:`localise`).

    Accepted: ``2026-03-01``, ``2026-03-01 14:05``, ``2026-03-01T14:05:09.5``, each optionally followed by
    ``Z``, ``+08:00`` or ``+0800`` (with or without a space, as spreadsheet exports write it).
    A bare date means midnight at the start of that day.
    """
    text = value.strip()
    m = _DATETIME_RE.fullmatch(text)
    if not m:
        raise ValidationError(f"{field} {quoted(text)} is not an ISO date or datetime")
    try:
        d = date.fromisoformat(m["date"])
        if not m["time"]:
            return datetime(d.year, d.month, d.day)
        t = datetime.fromisoformat(f"{m['date']}T{m['time']}")
    except ValueError:
        raise ValidationError(f"{field} {quoted(text)} is not a valid date/time") from None
    offset = m["offset"]
    if offset:
        if offset in ("Z", "z"):
            return t.replace(tzinfo=UTC)
        sign = 1 if offset[0] == "+" else -1
        digits = offset[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            raise ValidationError(f"{field} {quoted(text)} has an invalid UTC offset")
        from datetime import timezone as _tz

        return t.replace(tzinfo=_tz(sign * timedelta(hours=hours, minutes=minutes)))
    return t


def localise(dt: datetime, tz: str, *, field: str = "datetime") -> datetime:
    """Aware UTC from ``dt``; a naive ``dt`` is wall-clock time in ``tz``.

    A wall-clock time that does not exist in ``tz`` (skipped by a DST change) or exists twice (repeated
    by one) is refused: the file does not say which instant was meant.
    """
    if dt.tzinfo is not None and dt.utcoffset() is not None:
        return dt.astimezone(UTC)
    zone = ZoneInfo(tz)
    early, late = dt.replace(tzinfo=zone, fold=0), dt.replace(tzinfo=zone, fold=1)
    if early.utcoffset() != late.utcoffset():
        # Either ambiguous (fall back) or non-existent (spring forward); tell the two apart for the reason.
        if early.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != dt:
            raise ValidationError(f"{field} {dt:%Y-%m-%d %H:%M} does not exist in {tz} (DST gap); give a UTC offset")
        raise ValidationError(f"{field} {dt:%Y-%m-%d %H:%M} is ambiguous in {tz} (DST overlap); give a UTC offset")
    return early.astimezone(UTC)


def parse_datetime_utc(value: str, tz: str, *, field: str = "datetime") -> datetime:
    return localise(parse_datetime(value, field=field), tz, field=field)


def not_in_future(dt: datetime, *, field: str, now: datetime | None = None,
                  skew: timedelta = timedelta(minutes=10)) -> datetime:
    """Refuse timestamps of things that already happened (joined, ordered, seen) that lie in the future."""
    if dt > (now or utcnow()) + skew:
        raise ValidationError(f"{field} {dt:%Y-%m-%d %H:%M} UTC is in the future")
    return dt


# ---------------------------------------------------------------------------------------------------------------------
# Numbers, money and enumerations

_AMOUNT_RE = re.compile(r"(?P<sign>[+-])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d{1,2}))?")


def parse_amount_minor(value: str, *, field: str = "amount", allow_negative: bool = False) -> int:
    """Money text to integer minor units (hundredths), exactly.

    ``"1200"`` -> 120000, ``"1,200"`` -> 120000, ``"1200.5"`` -> 120050, ``"1,200.50"`` -> 120050.
    Refused: more than two decimals (would need rounding), comma groups that are not thousands
    (``"1,20"`` is 1.20 in some locales and 120 in none), currency symbols, exponents, negatives
    unless ``allow_negative``.
    """
    text = value.strip()
    m = _AMOUNT_RE.fullmatch(text)
    if not m:
        raise ValidationError(f"{field} {quoted(text)} is not an amount (e.g. 1200, 1,200 or 1200.50)")
    if m["sign"] == "-" and not allow_negative:
        raise ValidationError(f"{field} {quoted(text)} is negative")
    try:
        amount = Decimal(m["int"].replace(",", "") + "." + (m["frac"] or "0"))
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        raise ValidationError(f"{field} {quoted(text)} is not an amount") from None
    minor = int(amount * 100)
    return -minor if m["sign"] == "-" else minor


def parse_int(value: str, *, field: str, min_value: int | None = None, max_value: int | None = None) -> int:
    text = value.strip().replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", value.strip()) else value.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValidationError(f"{field} {quoted(value)} is not a whole number")
    n = int(text)
    if min_value is not None and n < min_value:
        raise ValidationError(f"{field} {n} is below {min_value}")
    if max_value is not None and n > max_value:
        raise ValidationError(f"{field} {n} is above {max_value}")
    return n


@lru_cache(maxsize=1)
def _currencies() -> frozenset[str]:
    from babel.numbers import list_currencies

    return frozenset(list_currencies())


def normalise_currency(value: str) -> str:
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z]{3}", code) or code not in _currencies():
        raise ValidationError(f"unknown currency {quoted(value)} (expected ISO 4217, e.g. TWD)")
    return code


_TRUE = frozenset({"yes", "true", "1", "y"})
_FALSE = frozenset({"no", "false", "0", "n"})


def parse_bool(value: str, *, field: str = "value") -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValidationError(f"{field} {quoted(value)} is not yes/no, true/false or 1/0")


def parse_enum(value: str, enum: type[StrEnum], *, field: str) -> str:
    text = value.strip().lower()
    try:
        return enum(text).value
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise ValidationError(f"unknown {field} {quoted(value)} (expected one of: {choices})") from None


def parse_channel_order(value: str, *, separators: str = ">,") -> str:
    """``"push>email>sms"`` -> ``"push,email,sms"`` (the stored form of ``Member.preferred_channels``).

    Every channel at most once; channels not listed are simply not preferred (and not used for routing).
    """
    parts = [p.strip().lower() for p in re.split(f"[{re.escape(separators)}]", value.strip())]
    if not value.strip() or any(not p for p in parts):
        raise ValidationError(f"preferred_channels {quoted(value)} is not a list like push>email>sms")
    known = {c.value for c in Channel}
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ValidationError(f"unknown channel {quoted(unknown[0])} in preferred_channels "
                              f"(expected {', '.join(sorted(known))})")
    if len(set(parts)) != len(parts):
        raise ValidationError(f"preferred_channels {quoted(value)} lists a channel twice")
    return ",".join(parts)


def bounded_text(value: str, *, field: str, max_length: int, required: bool = False) -> str | None:
    """Trimmed text that fits its column (we refuse to truncate); ``None`` for an empty optional value."""
    text = value.strip()
    if not text:
        if required:
            raise ValidationError(f"{field} is required")
        return None
    if len(text) > max_length:
        raise ValidationError(f"{field} is longer than {max_length} characters")
    return text
