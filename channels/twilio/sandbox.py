"""Twilio's Messages API wire format as the provider sandbox speaks it: number checks, resources, error bodies.

Pure functions (no I/O), shaped like the real API, so that they can be unit-tested and read in one place; the
request pipeline (credentials, faults, rate limits, recording) is the sandbox's
(``membercare/sandbox/endpoints.py`` and ``pipeline.py``).
"""

from __future__ import annotations

import math
import time
from email.utils import formatdate
from functools import lru_cache
from typing import Any

import phonenumbers

TWILIO_ERRORS = "https://www.twilio.com/docs/errors/"
GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€\f"
)


def twilio_error(status: int, code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "more_info": f"{TWILIO_ERRORS}{code}", "status": status}


def twilio_unauthorized() -> dict[str, Any]:
    body = twilio_error(401, 20003, "Authenticate")
    body["detail"] = "Your AccountSid or AuthToken was incorrect."
    return body


@lru_cache(maxsize=65536)
def classify_number(number: str) -> str:
    """``"mobile"``, ``"landline"`` or ``"invalid"`` for an E.164 number (as Twilio needs one)."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return "invalid"
    if not phonenumbers.is_valid_number(parsed):
        return "invalid"
    kind = phonenumbers.number_type(parsed)
    if kind == phonenumbers.PhoneNumberType.FIXED_LINE:
        return "landline"
    return "mobile"


def number_region(number: str) -> str:
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(number, None)) or ""
    except phonenumbers.NumberParseException:
        return ""


def sms_segments(body: str) -> tuple[str, int]:
    if all(ch in GSM7 for ch in body):
        return "GSM-7", 1 if len(body) <= 160 else math.ceil(len(body) / 153)
    units = len(body.encode("utf-16-le")) // 2
    return "UCS-2", 1 if units <= 70 else math.ceil(units / 67)


def rfc2822(at: float) -> str:
    """Twilio's timestamp format: ``Fri, 24 May 2019 17:44:46 +0000``."""
    return formatdate(at, usegmt=True).replace("GMT", "+0000")


def twilio_message_resource(*, sid: str, account_sid: str, to: str, from_: str | None, body: str,
                            messaging_service_sid: str | None, now: float | None = None,
                            status: str | None = None, date_sent: float | None = None) -> dict[str, Any]:
    """The Message resource Twilio answers a create with (201); a listed message passes its ``status`` and
    ``date_sent`` (when the sandbox handed it on: at once)."""
    date = rfc2822(time.time() if now is None else now)
    _, segments = sms_segments(body)
    uri = f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}"
    return {
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": date,
        "date_sent": rfc2822(date_sent) if date_sent is not None else None,
        "date_updated": date,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": from_,
        "messaging_service_sid": messaging_service_sid,
        "num_media": "0",
        "num_segments": str(segments),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": status or ("accepted" if messaging_service_sid and not from_ else "queued"),
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": to,
        "uri": f"{uri}.json",
    }


TWILIO_LIST_MAX_PAGE_SIZE = 1000


def twilio_date_bounds(value: str) -> tuple[float, float]:
    """``(first, last)`` Unix seconds a ``DateSent`` filter value covers, both inclusive.

    Twilio documents ``YYYY-MM-DD`` (a whole GMT day) and accepts timestamps (the SDK sends
    ``YYYY-MM-DDTHH:MM:SSZ``; the spec's examples also show ``2019-06-11 22:05:25.000`` and RFC 2822): an
    instant covers itself. Raises ``ValueError`` for anything else.
    """
    from datetime import UTC, date, datetime, timedelta
    from email.utils import parsedate_to_datetime

    text = value.strip()
    if len(text) == 10:
        day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        return day.timestamp(), (day + timedelta(days=1)).timestamp() - 1e-6
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            at = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            raise ValueError(f"unsupported date {value!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp(), at.timestamp()


def twilio_list_page(*, account_sid: str, filters: list[tuple[str, str]], messages: list[dict[str, Any]],
                     page: int, page_size: int, token: str | None, next_token: str | None,
                     previous_token: str | None) -> dict[str, Any]:
    """A page of Twilio's Messages list (``ListMessageResponse``): ``messages`` plus the paging fields, whose
    URIs repeat the filters so that following ``next_page_uri`` continues the same query."""
    from urllib.parse import urlencode

    path = f"/2010-04-01/Accounts/{account_sid}/Messages.json"

    def uri(number: int, token: str | None) -> str:
        params = [*filters, ("PageSize", str(page_size)), ("Page", str(number))]
        if token:
            params.append(("PageToken", token))
        return f"{path}?{urlencode(params)}"

    start = page * page_size
    return {
        "end": start + len(messages) - 1 if messages else start,
        "first_page_uri": uri(0, None),
        "messages": messages,
        "next_page_uri": uri(page + 1, next_token) if next_token else None,
        "page": page,
        "page_size": page_size,
        "previous_page_uri": uri(page - 1, previous_token) if page > 0 and previous_token else None,
        "start": start,
        "uri": uri(page, token),
    }
