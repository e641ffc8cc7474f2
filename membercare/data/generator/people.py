"""Members as people: names, e-mail addresses, phones, places, time zones, join dates and birthdays."""

from __future__ import annotations

import numpy as np

from membercare.data.generator import reference as D
from membercare.data.generator.arrays import choice, local_day_start, permute, time_of_day
from membercare.data.generator.model import BLOCK, DAY, SHOP_TIMEZONE, Context


def make_people(ctx: Context, rng: np.random.Generator, g: np.ndarray, block: int) -> dict:
    m, n = ctx.model, len(g)
    zh = rng.random(n) < m.zh_share
    female = rng.random(n) < m.female_share
    locale = np.where(zh, "zh-TW", "en")
    country = np.empty(n, dtype=object)
    for loc, in_loc in (("zh-TW", zh), ("en", ~zh)):
        mix = D.COUNTRY_MIX[loc]
        countries = np.array([c for c, _ in mix], dtype=object)
        country[in_loc] = countries[choice(rng, [w for _, w in mix], int(in_loc.sum()))]

    # Names. English-locale members in Taiwan often pair an English given name with a Taiwanese surname.
    tw_sur = choice(rng, [w for *_, w in D.TW_SURNAMES], n)
    en_sur = rng.integers(0, len(D.EN_SURNAMES), n)
    giv = rng.integers(0, 10_000, n)
    style = rng.integers(0, 3, n)
    tw_surname_for_en = (country == "TW") & (rng.random(n) < 0.6)
    names, given_roman, sur_roman = [], [], []
    for i in range(n):
        if zh[i]:
            given_zh = D.TW_GIVEN_FEMALE if female[i] else D.TW_GIVEN_MALE
            gz, gr = given_zh[giv[i] % len(given_zh)]
            sz, sr, _ = D.TW_SURNAMES[tw_sur[i]]
            names.append(sz + gz)
            given_roman.append(gr.replace("-", "").lower())
            sur_roman.append(sr.lower())
        else:
            given_en = D.EN_GIVEN_FEMALE if female[i] else D.EN_GIVEN_MALE
            gn = given_en[giv[i] % len(given_en)]
            sn = D.TW_SURNAMES[tw_sur[i]][1] if tw_surname_for_en[i] else D.EN_SURNAMES[en_sur[i]]
            names.append(f"{gn} {sn}")
            given_roman.append(gn.lower())
            sur_roman.append(sn.lower())

    # E-mail: the member number as suffix makes every address unique (the prefix never ends in a digit).
    domains = [d for d, _ in D.EMAIL_DOMAINS]
    dom = choice(rng, [w for _, w in D.EMAIL_DOMAINS], n)
    has_email = rng.random(n) >= m.email_missing
    email: list[str | None] = []
    for i in range(n):
        if not has_email[i]:
            email.append(None)
            continue
        gr, sr, num = given_roman[i], sur_roman[i], int(g[i]) + 1
        local = (f"{gr}.{sr}{num}", f"{sr}{gr}{num}", f"{gr[0]}{sr}{num}")[style[i]]
        email.append(f"{local}@{domains[dom[i]]}")

    # Geography, timezone and phone per country.
    tz = np.empty(n, dtype=object)
    region = np.empty(n, dtype=object)
    city = np.empty(n, dtype=object)
    phone = np.empty(n, dtype=object)
    # Phone numbers are a bijection of the member index within each country's number space (so
    # they are unique for shops of up to millions of members) that looks random.
    for c in np.unique(country).tolist():
        sel = np.flatnonzero(country == c)
        k = len(sel)
        if c == "TW":
            sub = permute(g[sel], 90_000_000, ctx.seed % 90_000_000)
            tz[sel] = SHOP_TIMEZONE
            pl = choice(rng, [w for *_, w in D.TW_CITIES], k)
            region[sel] = [D.TW_CITIES[p][0] for p in pl]
            city[sel] = [D.TW_CITIES[p][1] for p in pl]
            phone[sel] = [f"+8869{s:08d}" for s in sub.tolist()]  # 09[0-8]x-xxx-xxx mobile range
        elif c == "US":
            sub = permute(g[sel], 8_000_000, ctx.seed % 8_000_000)
            ar = choice(rng, [a[-1] for a in D.US_AREAS], k)
            tz[sel] = [D.US_AREAS[a][1] for a in ar]
            region[sel] = [D.US_AREAS[a][2] for a in ar]
            city[sel] = [D.US_AREAS[a][3] for a in ar]
            phone[sel] = [f"+1{D.US_AREAS[a][0]}{200 + s // 10_000}{s % 10_000:04d}"
                          for a, s in zip(ar.tolist(), sub.tolist(), strict=True)]
        else:
            spec = D.FOREIGN_COUNTRIES[c]
            tz[sel] = spec["tz"]
            places = spec["places"]
            pl = choice(rng, [p[-1] for p in places], k)
            region[sel] = [places[p][0] for p in pl]
            city[sel] = [places[p][1] for p in pl]
            prefixes, digits = spec["prefixes"], spec["digits"]
            space = len(prefixes) * 10**digits
            sub = permute(g[sel], space, ctx.seed % space)
            phone[sel] = [f"+{spec['code']}{prefixes[s // 10**digits]}{s % 10**digits:0{digits}d}"
                          for s in sub.tolist()]
    phone[rng.random(n) < m.phone_missing] = None

    # Joined: growth over ~3 years (more recent members are more numerous) plus a fresh cohort of
    # the last 7 days; at a shop-local time of day with the usual traffic pattern.
    recent = rng.random(n) < m.joined_last_week_share
    older = np.ceil(m.joined_years * 365 * rng.beta(1.0, 1.5, n)).astype(np.int64) + 1
    days_ago = np.where(recent, rng.integers(1, 8, n), older)
    today_start = int(local_day_start(np.array([ctx.as_of]))[0])
    joined = today_start - days_ago * DAY + time_of_day(rng, n)
    joined = np.minimum(joined, ctx.as_of - 60)

    # Birthdays: age group first, then a day of a non-leap year; the birth year makes the age exact.
    has_bd = rng.random(n) >= m.birthday_missing
    ag = choice(rng, [a[-1] for a in D.AGE_GROUPS], n)
    lo = np.array([a[1] for a in D.AGE_GROUPS])[ag]
    hi = np.array([a[2] for a in D.AGE_GROUPS])[ag]
    age = rng.integers(lo, hi + 1)
    doy = rng.integers(0, 365, n)
    md = (np.datetime64("2001-01-01") + doy.astype("timedelta64[D]")).astype(object)
    month = np.array([d.month for d in md])
    day = np.array([d.day for d in md])
    today = ctx.today
    bd_idx = np.flatnonzero(has_bd)
    if len(bd_idx):
        # At least one "birthday today" per block: today's segments are never empty in a demo.
        k = bd_idx[rng.integers(0, len(bd_idx))]
        month[k], day[k] = today.month, today.day
        # Feb 29 at the natural rate (1 in 1461 birthdays), spread evenly over blocks so that every
        # shop of a few thousand members has some.
        q = BLOCK * (1 - m.birthday_missing) / 1461
        if int((block + 1) * q + 0.5) > int(block * q + 0.5):
            others = bd_idx[bd_idx != k] if len(bd_idx) > 1 else bd_idx
            j = others[rng.integers(0, len(others))]
            month[j], day[j] = 2, 29
    after_today = (month * 100 + day) > (today.month * 100 + today.day)
    year = today.year - age - after_today
    leap = (month == 2) & (day == 29)
    year = np.where(leap, year - (year % 4), year)  # nearest earlier leap year (1904..2096 rule is enough)
    birthday: list[str | None] = [None] * n
    age_group: list[str | None] = [None] * n
    age_idx = np.full(n, -1)
    bounds = [(a[1], a[2]) for a in D.AGE_GROUPS]
    for i in bd_idx.tolist():
        y, mo, dd = int(year[i]), int(month[i]), int(day[i])
        birthday[i] = f"{y:04d}-{mo:02d}-{dd:02d}"
        real_age = today.year - y - ((mo, dd) > (today.month, today.day))
        a_i = next((k for k, (a0, a1) in enumerate(bounds) if a0 <= real_age <= a1), len(bounds) - 1)
        age_idx[i] = a_i
        age_group[i] = D.AGE_GROUPS[a_i][0]
    return dict(name=names, email=email, phone=phone.tolist(), country=country.tolist(), locale=locale.tolist(),
                timezone=tz.tolist(), birthday=birthday, age_group=age_group, age_idx=age_idx,
                region=region.tolist(), city=city.tolist(), joined=joined)
