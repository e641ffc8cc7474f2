"""membercare.validation: canonical forms and the reject-rather-than-guess rule."""

from datetime import UTC, date, datetime, timedelta

import pytest

from membercare import validation as v
from membercare.errors import InputError
from membercare.models import CouponKind, OrderStatus


def test_validation_error_is_an_input_error_and_a_value_error():
    with pytest.raises(InputError):
        v.parse_amount_minor("abc")
    with pytest.raises(ValueError):
        v.parse_amount_minor("abc")


@pytest.mark.parametrize(
    "text, minor",
    [("1200", 120000), ("1,200", 120000), ("1200.50", 120050), ("1,200.5", 120050), ("0", 0), ("0.01", 1),
     ("1,234,567.89", 123456789), (" 12 ", 1200), ("+5", 500), ("99999999999.99", 9999999999999)],
)
def test_amounts_become_exact_minor_units(text, minor):
    assert v.parse_amount_minor(text) == minor


@pytest.mark.parametrize("text", ["1,20", "12,00.5", "1.005", "1e3", "NT$1200", "", "1 200", "1.2.3", ".5", "1,2345"])
def test_ambiguous_or_malformed_amounts_are_refused(text):
    with pytest.raises(v.ValidationError):
        v.parse_amount_minor(text)


def test_negative_amounts_are_refused_unless_allowed():
    with pytest.raises(v.ValidationError, match="negative"):
        v.parse_amount_minor("-10")
    assert v.parse_amount_minor("-10.5", allow_negative=True) == -1050


def test_amount_precision_is_exact_where_floats_are_not():
    # 0.1 + 0.2 style errors: 1.15 * 100 as a float is 114.99999999999999.
    assert v.parse_amount_minor("1.15") == 115
    assert v.parse_amount_minor("4.35") == 435


def test_email_is_normalised_without_dns_and_bad_ones_rejected():
    assert v.normalise_email("  Someone@EXAMPLE.com ") == "Someone@example.com"
    assert v.normalise_email("someone@no-such-shop-domain-xyz.com.tw") == "someone@no-such-shop-domain-xyz.com.tw"
    for bad in ["plain", "a@b", "two@@example.com", "a b@example.com", ""]:
        with pytest.raises(v.ValidationError) as exc:
            v.normalise_email(bad)
        # Reasons are shown in terminals and logs: they never contain the address itself.
        assert bad.strip() == "" or bad not in str(exc.value)


def test_phone_is_parsed_in_the_members_region_and_normalised_to_e164():
    assert v.normalise_phone("0912-345-678", "TW") == "+886912345678"
    assert v.normalise_phone("(02) 2345-6789", "TW") == "+886223456789"
    assert v.normalise_phone("090-1234-5678", "JP") == "+819012345678"
    # A number with its own country code is valid whatever the member's region.
    assert v.normalise_phone("+886 912 345 678", "JP") == "+886912345678"
    for bad, region in [("12345", "TW"), ("call me", "TW"), ("0912-345-678", "JP"), ("+1 555 0100", "US")]:
        with pytest.raises(v.ValidationError) as exc:
            v.normalise_phone(bad, region)
        assert bad not in str(exc.value)


def test_country_locale_timezone():
    assert v.normalise_country("tw") == "TW"
    for bad in ["TWN", "XX", "", "T1"]:
        with pytest.raises(v.ValidationError):
            v.normalise_country(bad)
    assert v.normalise_locale("zh_tw") == "zh-TW"
    assert v.normalise_locale("zh-Hant-TW") == "zh-Hant-TW"
    assert v.normalise_locale("EN") == "en"
    for bad in ["xx-YY", "klingon", "zh-TW-extra", ""]:
        with pytest.raises(v.ValidationError, match="locale"):
            v.normalise_locale(bad)
    assert v.normalise_timezone(" Asia/Taipei ") == "Asia/Taipei"
    for bad in ["Asia/Taipie", "../etc/passwd", "", "Mars/Olympus"]:
        with pytest.raises(v.ValidationError, match="timezone"):
            v.normalise_timezone(bad)


def test_dates_are_strict_and_feb_29_only_in_leap_years():
    assert v.parse_date("2000-02-29") == date(2000, 2, 29)
    assert v.parse_birthday("2024-02-29", today=date(2026, 1, 1)) == date(2024, 2, 29)
    for bad in ["2023-02-29", "2024-13-01", "20240101", "2024/01/01", "01-02-2024", "2024-1-1"]:
        with pytest.raises(v.ValidationError):
            v.parse_date(bad)
    with pytest.raises(v.ValidationError, match="out of range"):
        v.parse_birthday("2030-01-01", today=date(2026, 1, 1))
    with pytest.raises(v.ValidationError, match="out of range"):
        v.parse_birthday("1850-01-01", today=date(2026, 1, 1))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-03-01", datetime(2026, 3, 1)),
        ("2026-03-01 14:05", datetime(2026, 3, 1, 14, 5)),
        ("2026-03-01T14:05:09.5", datetime(2026, 3, 1, 14, 5, 9, 500000)),
        ("2026-03-01T14:05:09Z", datetime(2026, 3, 1, 14, 5, 9, tzinfo=UTC)),
        ("2026-03-01 14:05:09 +0800", datetime(2026, 3, 1, 6, 5, 9, tzinfo=UTC)),
        ("2026-03-01T14:05:09-05:30", datetime(2026, 3, 1, 19, 35, 9, tzinfo=UTC)),
    ],
)
def test_datetime_formats(text, expected):
    got = v.parse_datetime(text)
    assert got == expected
    assert (got.tzinfo is None) == (expected.tzinfo is None)


@pytest.mark.parametrize("text", ["2026-02-30", "2026-03-01 25:00", "yesterday", "2026-03-01T14:05+2500", "1700000000"])
def test_bad_datetimes_are_refused(text):
    with pytest.raises(v.ValidationError):
        v.parse_datetime(text)


def test_naive_times_are_read_in_the_given_zone_and_stored_utc():
    assert v.parse_datetime_utc("2026-03-01 08:00", "Asia/Taipei") == datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    assert v.parse_datetime_utc("2026-03-01", "Asia/Tokyo") == datetime(2026, 2, 28, 15, 0, tzinfo=UTC)
    # An explicit offset wins over the zone.
    assert v.parse_datetime_utc("2026-03-01 08:00Z", "Asia/Taipei") == datetime(2026, 3, 1, 8, tzinfo=UTC)


def test_dst_gaps_and_overlaps_are_refused_not_shifted():
    with pytest.raises(v.ValidationError, match="does not exist"):
        v.parse_datetime_utc("2026-03-08 02:30", "America/New_York")
    with pytest.raises(v.ValidationError, match="ambiguous"):
        v.parse_datetime_utc("2026-11-01 01:30", "America/New_York")
    expected = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    assert v.parse_datetime_utc("2026-11-01 01:30-04:00", "America/New_York") == expected


def test_not_in_future_allows_small_clock_skew():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert v.not_in_future(now + timedelta(minutes=5), field="x", now=now)
    with pytest.raises(v.ValidationError, match="in the future"):
        v.not_in_future(now + timedelta(hours=1), field="x", now=now)


def test_enums_bools_ints_and_currencies():
    assert v.parse_enum(" Paid ", OrderStatus, field="status") == "paid"
    with pytest.raises(v.ValidationError, match="expected one of: amount, percent"):
        v.parse_enum("fixed", CouponKind, field="kind")
    parsed = [v.parse_bool(x) for x in ["yes", "NO", "true", "False", "1", "0"]]
    assert parsed == [True, False, True, False, True, False]
    with pytest.raises(v.ValidationError):
        v.parse_bool("maybe")
    assert v.parse_int("1,234", field="n") == 1234
    with pytest.raises(v.ValidationError, match="whole number"):
        v.parse_int("12.5", field="n")
    with pytest.raises(v.ValidationError, match="below 0"):
        v.parse_int("-1", field="n", min_value=0)
    assert v.normalise_currency("twd") == "TWD"
    with pytest.raises(v.ValidationError):
        v.normalise_currency("NTD")


def test_channel_order():
    assert v.parse_channel_order("push>email>sms") == "push,email,sms"
    assert v.parse_channel_order("Email > SMS") == "email,sms"
    assert v.parse_channel_order("sms,push") == "sms,push"
    for bad in ["push>fax", "push>push", "push>>email", ""]:
        with pytest.raises(v.ValidationError):
            v.parse_channel_order(bad)


def test_bounded_text_refuses_to_truncate():
    assert v.bounded_text("  x  ", field="f", max_length=3) == "x"
    assert v.bounded_text("", field="f", max_length=3) is None
    with pytest.raises(v.ValidationError, match="longer than 3"):
        v.bounded_text("abcd", field="f", max_length=3)
    with pytest.raises(v.ValidationError, match="required"):
        v.bounded_text(" ", field="f", max_length=3, required=True)
