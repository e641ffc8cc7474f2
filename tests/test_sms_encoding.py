"""SMS encoding and segment arithmetic (GSM 03.38 / 3GPP TS 23.040)."""

import pytest

from membercare.rendering.sms import GSM7, UCS2, cost_minor, is_gsm7, measure, split


@pytest.mark.parametrize(
    "text, encoding, units, segments",
    [
        ("", GSM7, 0, 1),
        ("a" * 160, GSM7, 160, 1),
        ("a" * 161, GSM7, 161, 2),
        ("a" * 306, GSM7, 306, 2),
        ("a" * 307, GSM7, 307, 3),
        ("€" * 80, GSM7, 160, 1),  # extension characters count two septets
        ("€" * 81, GSM7, 162, 2),
        ("中" * 70, UCS2, 70, 1),
        ("中" * 71, UCS2, 71, 2),
        ("中" * 134, UCS2, 134, 2),
        ("中" * 135, UCS2, 135, 3),
        ("Hi 😀", UCS2, 5, 1),  # an emoji is a surrogate pair: two UTF-16 units
        ("It’s done", UCS2, 9, 1),  # one curly apostrophe forces UCS-2
    ],
)
def test_measure(text, encoding, units, segments):
    m = measure(text)
    assert (m.encoding, m.units, m.segments) == (encoding, units, segments)


def test_zh_tw_is_ucs2_and_opt_out_counts():
    m = measure("【好日子】您的折價券即將到期 回覆STOP取消")
    assert m.encoding == UCS2 and m.segments == 1 and "好" in m.non_gsm


def test_escape_pair_is_never_split_across_parts():
    # 152 septets then a 2-septet character: it does not fit in part one's last septet.
    text = "a" * 152 + "€" + "b" * 10
    m = measure(text)
    assert m.units == 164 and m.segments == 2
    parts = split(text)
    assert parts[0] == "a" * 152 and parts[1].startswith("€")
    # Without the split rule 306 septets would fit two parts; with a pair at the boundary it needs three.
    assert measure("a" * 152 + "€" + "a" * 152).segments == 3


def test_surrogate_pair_is_never_split():
    text = "中" * 66 + "😀" + "中" * 10
    parts = split(text)
    assert parts[0] == "中" * 66 and parts[1].startswith("😀")
    assert "".join(parts) == text


def test_split_rejoins_and_respects_part_sizes():
    text = "測試" * 100
    parts = split(text)
    assert "".join(parts) == text and all(len(p) <= 67 for p in parts) and len(parts) == measure(text).segments


def test_is_gsm7_and_cost():
    assert is_gsm7("Reply STOP to opt out {ok} €5")
    assert not is_gsm7("回覆STOP取消")
    assert cost_minor(3, 150) == 450
