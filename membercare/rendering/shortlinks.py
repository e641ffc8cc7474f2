"""Tracked short links in SMS and LINE: every http(s) URL of a rendered message becomes
``{public_url}/r/{token}`` (see :mod:`membercare.links`), and the original URLs are kept in the content's
``links`` so that the receiver can redirect to them and record the click of that message.

Shortening happens on the rendered text, before the SMS is measured, so the segment count (and the cost
estimate) are those of what is sent. Trailing sentence punctuation stays outside a link ("…/new." keeps
its full stop), as SMS apps and LINE linkify it.
"""

from __future__ import annotations

import re
from typing import Any

from membercare.links import MAX_LINKS, LinkSigner

# An http(s) URL: the characters RFC 3986 allows in one (so a URL followed directly by Chinese text ends there).
_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&()*+,;=%]+", re.I)
_TRAILING = ".,;:!?)。，、；：！？"


class Shortener:
    """Shortens the links of one message (``message_id``), numbering them in the order they are met."""

    def __init__(self, signer: LinkSigner, message_id: str):
        self.signer, self.message_id = signer, message_id
        self.links: list[str] = []

    def url(self, original: str) -> str:
        """The short link for ``original`` (the same original URL twice in a message gets one index)."""
        if original in self.links:
            index = self.links.index(original)
        else:
            if len(self.links) > MAX_LINKS:
                return original  # more links than a token can number: left as they are
            self.links.append(original)
            index = len(self.links) - 1
        return self.signer.short_url(self.message_id, index)

    def text(self, text: str) -> str:
        def replace(m: re.Match) -> str:
            found = m.group(0)
            url = found.rstrip(_TRAILING)
            return self.url(url) + found[len(url):] if url else found

        return _URL.sub(replace, text)

    def flex(self, node: Any) -> Any:
        """A Flex container with the http(s) ``uri`` / ``linkUri`` of its actions shortened."""
        if isinstance(node, dict):
            return {k: (self.url(v) if k in ("uri", "linkUri") and isinstance(v, str) and _URL.fullmatch(v)
                        else self.flex(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.flex(v) for v in node]
        return node
