"""``GET /previews/{token}``: a run's rendered template preview, behind a signed, expiring link.

The ``run-campaign`` flow renders the campaign's preview (sample members, preview-only links) into
``$MEMBERCARE_HOME/previews/<campaign>/index.html`` and links it from the run's Prefect artifact as
``{MEMBERCARE_PUBLIC_URL}/previews/{token}`` (:func:`membercare.links.preview_url`), so the link opens in a
browser on any host that reaches the receiver, instead of a ``file://`` path on the worker's disk.

The token is signed with the project's secret key (``MEMBERCARE_SECRET_KEY``; previous keys accepted during
a rotation) and carries an expiry and a digest of the preview's folder name, never a path: the receiver lists
its previews folder and serves the ``index.html`` of the folder whose name matches, so no request can name a
file (no path traversal). Answers: 403 for a token that is malformed or not signed by our keys, 410 once it
has expired, 404 when no preview matches, 503 without a secret key. The receiver must see the folder the
flows write (the same host, or a shared volume mounted at the same ``MEMBERCARE_HOME``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from membercare.errors import InputError
from membercare.links import preview_digest, verify_preview_token

# The preview is self-contained HTML (inline styles, anchors); it runs no script and sends no referrer, so the
# token never leaves in a Referer header.
HEADERS = {
    "Cache-Control": "private, no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
                               "font-src https: data:; frame-ancestors 'none'",
}


def find_preview(root: Path, digest: bytes) -> Path | None:
    """The ``index.html`` of the folder of ``root`` whose name has ``digest``, if it lies inside ``root``."""
    if not root.is_dir():
        return None
    base = root.resolve()
    for folder in root.iterdir():
        if folder.is_dir() and preview_digest(folder.name) == digest:
            page = (folder / "index.html").resolve()
            if page.is_file() and page.is_relative_to(base):
                return page
    return None


def default_previews_dir() -> Path:
    """Where the flows write previews: ``$MEMBERCARE_HOME/previews`` (see membercare.campaigns.dry_run)."""
    from membercare.config import Settings

    return Settings.from_env().home / "previews"


def mount_previews(app: FastAPI, secrets: Sequence[str], previews_dir: Path | None = None,
                   clock: Callable[[], float] = time.time) -> None:
    """Add ``GET /previews/{token}`` serving the previews under ``previews_dir`` (default
    :func:`default_previews_dir`); tokens are verified with ``secrets`` (newest first; none: 503)."""
    root = previews_dir if previews_dir is not None else default_previews_dir()
    keys = tuple(s for s in secrets if s)

    def refuse(status: int, error: str) -> Response:
        return JSONResponse({"error": error}, status_code=status, headers={"Cache-Control": "no-store"})

    @app.get("/previews/{token}", response_class=HTMLResponse)
    def preview(token: str) -> Response:
        if not keys:
            return refuse(503, "MEMBERCARE_SECRET_KEY is not configured")
        try:
            claims = verify_preview_token(token, keys)
        except InputError:
            return refuse(403, "invalid preview link")
        if claims.expires_at < clock():
            return refuse(410, "this preview link has expired: open the run's artifact again for a fresh one")
        page = find_preview(root, claims.digest)
        if page is None:
            return refuse(404, "no such preview")
        return HTMLResponse(page.read_text(encoding="utf-8"), headers=HEADERS)


__all__ = ["HEADERS", "default_previews_dir", "find_preview", "mount_previews"]
