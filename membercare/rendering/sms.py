"""SMS length: GSM-7 versus UCS-2, segments and cost (3GPP TS 23.038 / 23.040).

* A message whose every character is in the GSM 03.38 default alphabet (or its extension table) is
  sent as GSM-7: 160 septets in one segment; concatenated messages carry a 6-byte header, leaving
  153 septets per part. Extension characters (``^{}\\[~]|€`` and form feed) take two septets (escape +
  code), and an escape pair is never split across parts.
* Any other character (Chinese, emoji, curly quotes) forces UCS-2 for the whole message: 70 UTF-16
  code units in one segment, 67 per part. A character outside the BMP (most emoji) takes two code
  units, and a surrogate pair is never split across parts.

Carriers bill per segment, so the segment count is the cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GSM7 = "GSM-7"
UCS2 = "UCS-2"

_GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = set("^{}\\[~]|€\f")
_NOT_GSM = re.compile("[^" + re.escape("".join(sorted(_GSM_BASIC | _GSM_EXTENDED))) + "]")
_EXTENDED = re.compile("[" + re.escape("".join(sorted(_GSM_EXTENDED))) + "]")
_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")

SINGLE = {GSM7: 160, UCS2: 70}
PART = {GSM7: 153, UCS2: 67}


@dataclass(frozen=True)
class SmsLength:
    encoding: str
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int
    # First characters (index into the text) that forced UCS-2, for the check's explanation.
    non_gsm: tuple[str, ...] = ()

    @property
    def per_segment(self) -> int:
        return SINGLE[self.encoding] if self.segments <= 1 else PART[self.encoding]


def is_gsm7(text: str) -> bool:
    return all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in text)


def _cost(c: str, encoding: str) -> int:
    if encoding == GSM7:
        return 2 if c in _GSM_EXTENDED else 1
    return 2 if ord(c) > 0xFFFF else 1


def measure(text: str) -> SmsLength:
    """Encoding, length in units and segment count of ``text`` (an empty text is one segment)."""
    # Regex scans instead of per-character Python loops: this runs once per rendered SMS.
    if _NOT_GSM.search(text) is None:
        encoding, non_gsm, wide = GSM7, (), _EXTENDED
    else:
        encoding, wide = UCS2, _ASTRAL
        non_gsm = tuple(dict.fromkeys(_NOT_GSM.findall(text)))[:5]
    doubles = len(wide.findall(text))
    units = len(text) + doubles
    if units <= SINGLE[encoding]:
        return SmsLength(encoding, units, 1, non_gsm)
    if not doubles:
        return SmsLength(encoding, units, -(-units // PART[encoding]), non_gsm)
    # Fill parts greedily; a 2-unit character that does not fit starts the next part.
    part, used, segments = PART[encoding], 0, 1
    for c in text:
        cost = _cost(c, encoding)
        if used + cost > part:
            segments += 1
            used = 0
        used += cost
    return SmsLength(encoding, units, segments, non_gsm)


def split(text: str) -> list[str]:
    """The parts a carrier would send (for previews and tests); same rules as :func:`measure`."""
    m = measure(text)
    if m.segments == 1:
        return [text]
    part, used = PART[m.encoding], 0
    parts: list[str] = []
    cur: list[str] = []
    for c in text:
        cost = _cost(c, m.encoding)
        if used + cost > part:
            parts.append("".join(cur))
            cur, used = [], 0
        cur.append(c)
        used += cost
    parts.append("".join(cur))
    return parts


def cost_minor(segments: int, price_per_segment_minor: int) -> int:
    """Estimated carrier cost in minor units."""
    return segments * price_per_segment_minor
