"""The three provider wire formats: request validation and answer bodies, shaped like the real APIs.

Pure functions (no I/O), so that the shapes can be unit-tested and read in one place.
"""

from __future__ import annotations

import base64
import json
import math
import time
from email.utils import formatdate
from functools import lru_cache
from typing import Any

import phonenumbers

SENDGRID_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."
TWILIO_ERRORS = "https://www.twilio.com/docs/errors/"
GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€\f"
)

# --------------------------------------------------------------------------------------- SendGrid


def sendgrid_error(message: str, field: str | None = None, help_anchor: str | None = None) -> dict[str, Any]:
    return {"message": message, "field": field, "help": SENDGRID_HELP + help_anchor if help_anchor else None}


@lru_cache(maxsize=65536)
def valid_email(address: str) -> bool:
    from email_validator import EmailNotValidError, validate_email

    try:
        validate_email(address, check_deliverability=False, test_environment=True)
        return True
    except EmailNotValidError:
        return False


def validate_sendgrid_mail(body: Any) -> list[dict[str, Any]]:
    """SendGrid's 400 ``errors`` for a Mail Send body (empty when valid): the checks the real API makes
    that matter to us, with its messages and field paths."""
    errors: list[dict[str, Any]] = []
    if not isinstance(body, dict):
        return [sendgrid_error("Bad Request", None, None)]
    has_template = isinstance(body.get("template_id"), str) and body["template_id"]
    pers = body.get("personalizations")
    if not isinstance(pers, list) or not pers:
        errors.append(sendgrid_error("The personalizations field is required and must have at least one "
                                     "personalization.", "personalizations", "personalizations"))
        pers = []
    if len(pers) > 1000:
        errors.append(sendgrid_error("The personalizations field can contain no more than 1000 personalizations.",
                                     "personalizations", "personalizations"))
    all_have_subject = _personalization_errors(pers, errors)
    sender = body.get("from")
    if not isinstance(sender, dict) or "email" not in sender:
        errors.append(sendgrid_error("The from object must be provided for every email send. It is an object "
                                     "that requires an email parameter and may also contain a name parameter.",
                                     "from", "from"))
    elif not isinstance(sender["email"], str) or not valid_email(sender["email"]):
        errors.append(sendgrid_error("The from email does not contain a valid address.", "from.email", "from"))
    if not has_template and not all_have_subject and not (isinstance(body.get("subject"), str) and body["subject"]):
        errors.append(sendgrid_error("The subject is required. You can get around this requirement if you use a "
                                     "template with a subject defined or if every personalization has a subject "
                                     "defined.", "subject", "subject"))
    if not has_template:
        _content_errors(body.get("content"), errors)
    _extras_errors(body, errors)
    return errors


def _personalization_errors(pers: list, errors: list[dict[str, Any]]) -> bool:
    """Append the errors of each personalization; returns whether every one has its own subject."""
    all_have_subject = bool(pers)
    for i, p in enumerate(pers):
        if not isinstance(p, dict):
            errors.append(sendgrid_error("Bad Request", f"personalizations.{i}", "personalizations"))
            all_have_subject = False
            continue
        if not isinstance(p.get("subject"), str) or not p.get("subject"):
            all_have_subject = False
        to = p.get("to")
        if not isinstance(to, list) or not to:
            errors.append(sendgrid_error("The to array is required for all personalization objects, and must have "
                                         "at least one email object with a valid email address.",
                                         f"personalizations.{i}.to", "personalizations.to"))
            continue
        for j, rcpt in enumerate(to):
            addr = rcpt.get("email") if isinstance(rcpt, dict) else None
            if not isinstance(addr, str) or not valid_email(addr):
                errors.append(sendgrid_error("Does not contain a valid address.",
                                             f"personalizations.{i}.to.{j}.email", "personalizations.to"))
        ca = p.get("custom_args")
        if ca is not None and (not isinstance(ca, dict) or not all(isinstance(v, str) for v in ca.values())):
            errors.append(sendgrid_error("Invalid type. Expected: string, given: object.",
                                         f"personalizations.{i}.custom_args", "personalizations.custom_args"))
    return all_have_subject


def _content_errors(content: Any, errors: list[dict[str, Any]]) -> None:
    """The content blocks (checked only when no template supplies the content)."""
    if not isinstance(content, list) or not content:
        errors.append(sendgrid_error("Unless a valid template_id is provided, the content parameter is required. "
                                     "There must be at least one defined content block. We typically suggest both "
                                     "text/plain and text/html blocks are included, but only one block is "
                                     "required.", "content", "content"))
    else:
        for k, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str) or not block.get("type"):
                errors.append(sendgrid_error("The content type must be provided.", f"content.{k}.type",
                                             "content.type"))
            elif not isinstance(block.get("value"), str) or not block["value"]:
                errors.append(sendgrid_error("The content value must be a string at least one character in "
                                             "length.", f"content.{k}.value", "content.value"))
            elif block["type"] == "text/plain" and k != 0:
                errors.append(sendgrid_error("If present, text/plain content must be first, followed by "
                                             "text/html.", f"content.{k}.type", "content.type"))


def _extras_errors(body: dict[str, Any], errors: list[dict[str, Any]]) -> None:
    """custom_args, categories and headers."""
    ca = body.get("custom_args")
    if ca is not None:
        if not isinstance(ca, dict) or not all(isinstance(v, str) for v in ca.values()):
            errors.append(sendgrid_error("Invalid type. Expected: string, given: object.", "custom_args",
                                         "custom_args"))
        elif len(json.dumps(ca)) > 10_000:
            errors.append(sendgrid_error("The custom_args field may not exceed 10,000 bytes.", "custom_args",
                                         "custom_args"))
    cats = body.get("categories")
    if cats is not None:
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            errors.append(sendgrid_error("Categories must be strings.", "categories", "categories"))
        elif len(cats) > 10 or len(set(cats)) != len(cats) or any(len(c) > 255 for c in cats):
            errors.append(sendgrid_error("Too many categories, duplicate categories, or a category longer than "
                                         "255 characters.", "categories", "categories"))
    headers = body.get("headers")
    if headers is not None and (not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())):
        errors.append(sendgrid_error("Invalid type. Expected: string, given: object.", "headers", "headers"))


def sendgrid_unauthorized() -> dict[str, Any]:
    return {"errors": [{"field": None, "message": "The provided authorization grant is invalid, expired, or revoked",
                        "help": None}]}


def first_link(html: str | None) -> str | None:
    if not html:
        return None
    import re

    m = re.search(r"""href\s*=\s*["'](https?://[^"']+)["']""", html, flags=re.IGNORECASE)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------- Twilio


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


# -------------------------------------------------------------------------------------------- FCM


def fcm_error(status: int, grpc_status: str, message: str, error_code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if error_code:
        error["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
    return {"error": error}


def fcm_unregistered() -> dict[str, Any]:
    return fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")


def fcm_quota_exceeded() -> dict[str, Any]:
    return fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send messages'.", "QUOTA_EXCEEDED")


def fcm_unauthenticated() -> dict[str, Any]:
    return fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 "
                     "access token, login cookie or other valid authentication credential.")


def validate_fcm_message(body: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(message, None)`` when valid, else ``(None, INVALID_ARGUMENT message)``."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return None, "Request contains an invalid argument."
    msg = body["message"]
    targets = [k for k in ("token", "topic", "condition", "fid") if msg.get(k)]
    if len(targets) != 1:
        return None, "Exactly one of token, topic, condition or fid must be specified."
    data = msg.get("data")
    if data is not None:
        if not isinstance(data, dict):
            return None, "Invalid value at 'message.data'"
        for i, (k, v) in enumerate(data.items()):
            if not isinstance(v, str):
                return None, f"Invalid value at 'message.data[{i}].value' (TYPE_STRING)"
            if k in ("from", "notification", "message_type") or k.startswith(("google.", "gcm.")):
                return None, f"Invalid data payload key: {k}"
    if msg.get("token") and len(msg["token"]) < 8:
        return None, "The registration token is not a valid FCM registration token"
    return msg, None


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def check_jwt_assertion(assertion: str, *, token_url_path: str, public_keys: dict[str, str],
                        require_known: bool, now: float | None = None) -> tuple[str | None, str | None]:
    """Check a Google service-account JWT-bearer assertion. ``(client_email, None)`` or ``(None, error)``.

    The claims are always checked (issuer, audience = our token endpoint, expiry); the RS256 signature is
    verified when the issuer's public key is registered (``fcm_service_accounts``).
    """
    try:
        head_b64, claims_b64, sig_b64 = assertion.split(".")
        header = json.loads(_b64url(head_b64))
        claims = json.loads(_b64url(claims_b64))
        signature = _b64url(sig_b64)
    except (ValueError, TypeError):
        return None, "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
    if header.get("alg") != "RS256":
        return None, "Invalid JWT Signature."
    iss, aud = claims.get("iss"), str(claims.get("aud") or "")
    current = time.time() if now is None else now
    if not iss or not aud.endswith(token_url_path):
        return None, "Invalid JWT: audience or issuer is wrong."
    if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] < current - 30 or \
            claims.get("iat", 0) > current + 300:
        return None, "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
    key_pem = public_keys.get(iss)
    if key_pem:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        key = serialization.load_pem_public_key(key_pem.encode())
        try:
            key.verify(signature, f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
        except InvalidSignature:
            return None, "Invalid JWT Signature."
    elif require_known:
        return None, "Invalid grant: account not found"
    return str(iss), None
