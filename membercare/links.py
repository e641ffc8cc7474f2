"""Signed member links: unsubscribe and preference-centre URLs, and tracked short links.

Every marketing message carries a link that lets the member change their preferences or leave
without logging in, and every marketing email carries it in ``List-Unsubscribe`` (RFC 8058
one-click). Such a link must identify exactly one member, must not be guessable from a member id,
and must keep working for months (mail sits in inboxes), so the token is:

* a 10-byte payload: version (1 byte), member id (8 bytes, big-endian), scope (1 byte: which channel
  the link unsubscribes from; ``all`` for the preference centre);
  the member id is a database id, 1 to 2**63 - 1 (a signed 64-bit integer, as both databases store
  it): signing refuses any other, and a token naming one is invalid however it is signed;
* followed by the first 16 bytes (128 bits) of ``HMAC-SHA256(secret, "membercare.link" + payload)``;
* base64url without padding: 35 characters, short enough for an SMS.

Tokens are deterministic (one member and scope always gives the same token), so re-rendering a
message for a retry yields the same bytes, and they never expire: revoking them means rotating the
secret. Rotation is supported by verifying against several secrets (new first, old after) while the
old mail ages out.

URLs (served by the webhook receiver)::

    GET  {public_url}/u/{token}              confirmation page
    POST {public_url}/u/{token}              RFC 8058 one-click (body ``List-Unsubscribe=One-Click``)
    GET  {public_url}/u/{token}/preferences  preference centre

**Tracked short links** (SMS and LINE of campaigns with ``short_links: true``): each http(s) link of a
message becomes ``{public_url}/r/{token}``. The token is 32 characters of base64url: version (1 byte), our
message id (16 bytes: the hex id's bytes), the link's index in the message (1 byte), and 48 bits of
``HMAC-SHA256(secret, "membercare.click" + payload)``. It names no URL: the receiver reads the original URL
from that message's stored content (``links``), so only URLs we rendered into that message can be redirect
targets (no open redirect), and a token that does not verify is refused before any lookup.

Configuration (read by :meth:`LinkSigner.from_settings`): ``MEMBERCARE_SECRET_KEY`` (required for
anything that sends) and ``MEMBERCARE_PUBLIC_URL`` (default ``http://127.0.0.1:8080``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

from membercare.errors import ConfigurationError, InputError

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"
# Used only for previews, the pre-flight check and the gallery, never for a message that is sent:
# links signed with it are recognisably unusable (see LinkSigner.preview).
PREVIEW_SECRET = "membercare-preview-only-not-a-secret"
_VERSION = 1
_DOMAIN = b"membercare.link"
_SIG_BYTES = 16
_PAYLOAD = struct.Struct(">BQB")
MAX_MEMBER_ID = 2**63 - 1  # BIGINT on PostgreSQL, INTEGER on SQLite: signed 64-bit
_MAX_TOKEN_CHARS = 64  # a token is 35 characters; anything much longer is refused before decoding


class LinkScope(StrEnum):
    """What a token lets its holder change. ``ALL`` opens the preference centre / leaves everything."""

    ALL = "all"
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"


_SCOPE_CODES = {LinkScope.ALL: 0, LinkScope.EMAIL: 1, LinkScope.SMS: 2, LinkScope.PUSH: 3}
_SCOPES_BY_CODE = {v: k for k, v in _SCOPE_CODES.items()}


_CLICK_DOMAIN = b"membercare.click"
_CLICK_SIG_BYTES = 6
_CLICK_PAYLOAD = struct.Struct(">B16sB")
MAX_LINKS = 255  # link indexes fit one byte


@dataclass(frozen=True)
class ClickClaims:
    """What a short-link token names: our message id (32 hex digits) and the link's index in it."""

    message_id: str
    index: int


def _click_mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _CLICK_DOMAIN + payload, hashlib.sha256).digest()[:_CLICK_SIG_BYTES]


def _message_bytes(message_id: str) -> bytes:
    """Our 32-hex message id as 16 bytes; any other id (previews, checks) as the first 16 bytes of its hash,
    which names no message (the link renders at its real length and leads nowhere)."""
    try:
        raw = bytes.fromhex(message_id)
    except ValueError:
        raw = b""
    return raw if len(raw) == 16 else hashlib.sha256(message_id.encode("utf-8")).digest()[:16]


def sign_click_token(message_id: str, index: int, secret: str | bytes) -> str:
    """The short-link token for link ``index`` (0 to 255) of message ``message_id``."""
    if not secret:
        raise ConfigurationError("MEMBERCARE_SECRET_KEY is not set: cannot sign tracked links")
    if not 0 <= index <= MAX_LINKS:
        raise ValueError(f"a message has at most {MAX_LINKS + 1} tracked links")
    key = secret.encode() if isinstance(secret, str) else secret
    payload = _CLICK_PAYLOAD.pack(_VERSION, _message_bytes(message_id), index)
    return _b64(payload + _click_mac(key, payload))


def verify_click_token(token: str, secrets: str | bytes | Sequence[str | bytes]) -> ClickClaims:
    """The message and link a short-link token names; :class:`InvalidTokenError` unless we signed it."""
    payload = _verified_payload(token, secrets, _CLICK_PAYLOAD.size, _CLICK_SIG_BYTES, _click_mac)
    version, mid, index = _CLICK_PAYLOAD.unpack(payload)
    if version != _VERSION:
        raise InvalidTokenError("unsupported link token")
    return ClickClaims(message_id=mid.hex(), index=index)


_PREVIEW_DOMAIN = b"membercare.preview"
_PREVIEW_PAYLOAD = struct.Struct(">BI8s")  # version, expiry (unix seconds), the preview's name digest
PREVIEW_LINK_TTL_S = 14 * 24 * 3600  # a run's artifact stays readable for two weeks


def preview_digest(name: str) -> bytes:
    """The 8 bytes a preview token names a preview by (its folder name's SHA-256 prefix): the token carries
    no path, so the receiver can only serve a folder it lists itself."""
    return hashlib.sha256(name.encode("utf-8")).digest()[:8]


def _preview_mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _PREVIEW_DOMAIN + payload, hashlib.sha256).digest()[:_SIG_BYTES]


def sign_preview_token(name: str, expires_at: int, secret: str | bytes) -> str:
    """A token for the rendered preview ``name`` (a campaign's preview folder) valid until ``expires_at``
    (unix seconds): ``{public_url}/previews/{token}`` on the receiver (``membercare serve``)."""
    if not 0 < int(expires_at) < 2**32:
        raise InputError("preview link expiry out of range")
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise ConfigurationError("no secret configured to sign preview links")
    payload = _PREVIEW_PAYLOAD.pack(_VERSION, int(expires_at), preview_digest(name))
    return _b64(payload + _preview_mac(key, payload))


def preview_url(public_url: str, name: str, secret: str | bytes, now: float, ttl_s: int = PREVIEW_LINK_TTL_S) -> str:
    """``{public_url}/previews/{token}``: the preview ``name`` on the receiver, for ``ttl_s`` from ``now``."""
    return f"{public_url.rstrip('/')}/previews/{sign_preview_token(name, int(now) + ttl_s, secret)}"


@dataclass(frozen=True)
class PreviewClaims:
    digest: bytes
    expires_at: int


def verify_preview_token(token: str, secrets: str | bytes | Sequence[str | bytes]) -> PreviewClaims:
    """The claims of a preview token one of ``secrets`` signed (expiry not checked here: the caller's clock
    decides); :class:`InvalidTokenError` otherwise."""
    payload = _verified_payload(token, secrets, _PREVIEW_PAYLOAD.size, _SIG_BYTES, _preview_mac)
    version, expires_at, digest = _PREVIEW_PAYLOAD.unpack(payload)
    if version != _VERSION:
        raise InvalidTokenError("unknown preview token version")
    return PreviewClaims(digest, int(expires_at))


class InvalidTokenError(InputError):
    """A link token that is malformed or not signed by any of our secrets."""


@dataclass(frozen=True)
class LinkClaims:
    member_id: int
    scope: LinkScope


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN + payload, hashlib.sha256).digest()[:_SIG_BYTES]


def valid_member_id(member_id: object) -> bool:
    """Whether ``member_id`` can be a member's database id: an ``int`` (not a bool) from 1 to
    :data:`MAX_MEMBER_ID`."""
    return type(member_id) is int and 1 <= member_id <= MAX_MEMBER_ID


def sign_member_token(member_id: int, secret: str | bytes, scope: LinkScope | str = LinkScope.ALL) -> str:
    """The token for ``member_id`` and ``scope``, signed with ``secret``.

    Raises ``ValueError`` for an id that is not a member's database id (see :func:`valid_member_id`):
    such a link could only ever fail when followed.
    """
    if not secret:
        raise ConfigurationError("MEMBERCARE_SECRET_KEY is not set: cannot sign unsubscribe links")
    if not valid_member_id(member_id):
        raise ValueError(f"member id must be an integer from 1 to {MAX_MEMBER_ID}")
    key = secret.encode() if isinstance(secret, str) else secret
    payload = _PAYLOAD.pack(_VERSION, member_id, _SCOPE_CODES[LinkScope(scope)])
    return _b64(payload + _mac(key, payload))


def verify_member_token(token: str, secrets: str | bytes | Sequence[str | bytes]) -> LinkClaims:
    """Check ``token`` against the current secret and any older ones; return what it grants.

    Raises :class:`InvalidTokenError` for anything that is not a token we signed, including one that
    names an id no member can have (0, or over :data:`MAX_MEMBER_ID`). Comparison is constant-time.
    ``secrets`` may be one secret or a sequence (newest first) during a rotation.
    """
    payload = _verified_payload(token, secrets, _PAYLOAD.size, _SIG_BYTES, _mac)
    version, member_id, scope_code = _PAYLOAD.unpack(payload)
    if version != _VERSION or scope_code not in _SCOPES_BY_CODE:
        raise InvalidTokenError("unsupported link token")
    if not valid_member_id(member_id):
        raise InvalidTokenError("link token names no valid member id")
    return LinkClaims(member_id=member_id, scope=_SCOPES_BY_CODE[scope_code])


@dataclass(frozen=True)
class LinkSigner:
    """Builds a member's unsubscribe and preference URLs. Cheap to call; safe to share between threads."""

    secret: str
    public_url: str = DEFAULT_PUBLIC_URL
    is_preview: bool = False

    def __post_init__(self) -> None:
        if not self.secret:
            raise ConfigurationError("MEMBERCARE_SECRET_KEY is not set: cannot sign unsubscribe links")
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))

    @classmethod
    def preview(cls, public_url: str = DEFAULT_PUBLIC_URL) -> LinkSigner:
        """A signer for previews and checks: the links look real but the receiver never accepts them."""
        return cls(secret=PREVIEW_SECRET, public_url=public_url, is_preview=True)

    @classmethod
    def from_settings(cls, settings: Any = None, env: Mapping[str, str] | None = None, *,
                      allow_preview: bool = False) -> LinkSigner:
        """The signer for ``settings`` (``secret_key`` / ``public_url`` attributes), else the environment.

        Without a secret: a :class:`ConfigurationError`, or the preview signer if ``allow_preview``
        (previews, the pre-flight check and the gallery must work on a fresh checkout).
        """
        env = os.environ if env is None else env
        secret = getattr(settings, "secret_key", None) or env.get("MEMBERCARE_SECRET_KEY") or ""
        public = getattr(settings, "public_url", None) or env.get("MEMBERCARE_PUBLIC_URL") or DEFAULT_PUBLIC_URL
        if not secret:
            if allow_preview:
                return cls.preview(public)
            raise ConfigurationError("MEMBERCARE_SECRET_KEY is not set: cannot sign unsubscribe links")
        return cls(secret=secret, public_url=public)

    def token(self, member_id: int, scope: LinkScope | str = LinkScope.ALL) -> str:
        return sign_member_token(member_id, self.secret, scope)

    def unsubscribe_url(self, member_id: int, scope: LinkScope | str = LinkScope.ALL) -> str:
        return f"{self.public_url}/u/{self.token(member_id, scope)}"

    def preferences_url(self, member_id: int) -> str:
        return self.member_urls(member_id)[1]

    def member_urls(self, member_id: int) -> tuple[str, str]:
        """``unsubscribe_url(member_id)`` (all channels) and ``preferences_url(member_id)``, which carry the
        same token: signed once (every template context has both)."""
        unsubscribe = self.unsubscribe_url(member_id, LinkScope.ALL)
        return unsubscribe, f"{unsubscribe}/preferences"

    def verify(self, token: str) -> LinkClaims:
        return verify_member_token(token, self.secret)

    def short_url(self, message_id: str, index: int) -> str:
        """The tracked short link for link ``index`` of message ``message_id``."""
        return f"{self.public_url}/r/{sign_click_token(message_id, index, self.secret)}"


def add_utm(url: str, *, source: str, medium: str, campaign: str, content: str | None = None) -> str:
    """``url`` with UTM parameters added (existing ``utm_*`` parameters in ``url`` win).

    Only http(s) URLs are tagged: app deep links and ``mailto:`` are returned unchanged.
    Memoised: a campaign tags the same few URLs for every member.
    """
    return _add_utm(url, source, medium, campaign, content)


@lru_cache(maxsize=16384)
def _add_utm(url: str, source: str, medium: str, campaign: str, content: str | None) -> str:
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    present = {k for k, _ in query}
    extra = [("utm_source", source), ("utm_medium", medium), ("utm_campaign", campaign)]
    if content:
        extra.append(("utm_content", content))
    query += [(k, v) for k, v in extra if k not in present]
    return urlunsplit(parts._replace(query=urlencode(query)))

def _verified_payload(token: str, secrets: str | bytes | Sequence[str | bytes], payload_size: int, sig_bytes: int,
                      mac: Callable[[bytes, bytes], bytes]) -> bytes:
    """The payload of ``token`` when one of ``secrets`` (newest first during a rotation) signed it; else
    :class:`InvalidTokenError`. Every key is checked, with no early exit, so timing does not reveal which matched."""
    if isinstance(secrets, (str, bytes)):
        secrets = [secrets]
    keys = [s.encode() if isinstance(s, str) else s for s in secrets if s]
    if not keys:
        raise ConfigurationError("no secret configured to verify link tokens")
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
        raise InvalidTokenError("malformed link token")
    try:
        raw = _unb64(token)
    except (binascii.Error, ValueError):
        raise InvalidTokenError("malformed link token") from None
    if len(raw) != payload_size + sig_bytes:
        raise InvalidTokenError("malformed link token")
    payload, sig = raw[:payload_size], raw[payload_size:]
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(sig, mac(key, payload))
    if not ok:
        raise InvalidTokenError("link token signature does not verify")
    return payload
