"""SendGrid's Mail Send wire format as the provider sandbox speaks it: request validation and answer bodies.

Pure functions (no I/O), shaped like the real API, so that they can be unit-tested and read in one place; the
request pipeline (credentials, faults, rate limits, recording) is the sandbox's
(``membercare/sandbox/endpoints.py`` and ``pipeline.py``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

SENDGRID_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."


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


def validate_sendgrid_mail(body: Any) -> list[dict[str, Any]]:  # noqa: C901 - one check per field, in the API's order
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
    content = body.get("content")
    if not has_template:
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
    return errors


def sendgrid_unauthorized() -> dict[str, Any]:
    return {"errors": [{"field": None, "message": "The provided authorization grant is invalid, expired, or revoked",
                        "help": None}]}


def first_link(html: str | None) -> str | None:
    if not html:
        return None
    import re

    m = re.search(r"""href\s*=\s*["'](https?://[^"']+)["']""", html, flags=re.IGNORECASE)
    return m.group(1) if m else None
