"""Reference data for the demo shop generator (:mod:`membercare.data.generator`).

Plain tuples, so that a change here is a visible, reviewable change of the generated shop. Weights
are relative frequencies (they need not sum to one). Everything is fictional: names are common
given names and surnames, e-mail domains are the reserved example domains (RFC 2606 / RFC 6761),
phone numbers follow each country's mobile numbering plan but belong to nobody we know of.
"""

from __future__ import annotations

# --- Names -----------------------------------------------------------------------------------------

# The most common surnames in Taiwan (Ministry of the Interior ranking, rounded shares in per mille)
# with the Wade-Giles-style romanisation used on Taiwanese passports.
TW_SURNAMES: tuple[tuple[str, str, float], ...] = (
    ("陳", "Chen", 112), ("林", "Lin", 83), ("黃", "Huang", 60), ("張", "Chang", 53), ("李", "Li", 51),
    ("王", "Wang", 41), ("吳", "Wu", 40), ("劉", "Liu", 32), ("蔡", "Tsai", 29), ("楊", "Yang", 26),
    ("許", "Hsu", 23), ("鄭", "Cheng", 19), ("謝", "Hsieh", 18), ("洪", "Hung", 15), ("郭", "Kuo", 15),
    ("邱", "Chiu", 15), ("曾", "Tseng", 14), ("廖", "Liao", 13), ("賴", "Lai", 13), ("徐", "Hsu", 12),
    ("周", "Chou", 12), ("葉", "Yeh", 12), ("蘇", "Su", 12), ("莊", "Chuang", 10), ("呂", "Lu", 10),
    ("江", "Chiang", 10), ("何", "Ho", 9), ("蕭", "Hsiao", 9), ("羅", "Lo", 9), ("高", "Kao", 9),
    ("潘", "Pan", 8), ("簡", "Chien", 7), ("朱", "Chu", 7), ("鍾", "Chung", 7), ("游", "Yu", 6),
    ("彭", "Peng", 6), ("詹", "Chan", 6), ("胡", "Hu", 5), ("施", "Shih", 5), ("沈", "Shen", 5),
)

TW_GIVEN_FEMALE: tuple[tuple[str, str], ...] = (
    ("怡君", "Yi-Chun"), ("雅婷", "Ya-Ting"), ("佳穎", "Chia-Ying"), ("婉婷", "Wan-Ting"), ("欣怡", "Hsin-Yi"),
    ("淑芬", "Shu-Fen"), ("雅雯", "Ya-Wen"), ("詩涵", "Shih-Han"), ("宜蓁", "Yi-Chen"), ("心怡", "Hsin-Yi"),
    ("美玲", "Mei-Ling"), ("佩君", "Pei-Chun"), ("思妤", "Szu-Yu"), ("品妍", "Pin-Yen"), ("子晴", "Tzu-Ching"),
    ("宜庭", "Yi-Ting"), ("筱涵", "Hsiao-Han"), ("家瑜", "Chia-Yu"), ("郁婷", "Yu-Ting"), ("惠如", "Hui-Ju"),
    ("玉珍", "Yu-Chen"), ("靜宜", "Ching-Yi"), ("韻如", "Yun-Ju"), ("芷若", "Chih-Jo"), ("語彤", "Yu-Tung"),
)

TW_GIVEN_MALE: tuple[tuple[str, str], ...] = (
    ("家豪", "Chia-Hao"), ("志明", "Chih-Ming"), ("冠宇", "Kuan-Yu"), ("承恩", "Cheng-En"), ("宗翰", "Tsung-Han"),
    ("俊傑", "Chun-Chieh"), ("建宏", "Chien-Hung"), ("志偉", "Chih-Wei"), ("柏翰", "Po-Han"), ("彥廷", "Yen-Ting"),
    ("冠廷", "Kuan-Ting"), ("俊宏", "Chun-Hung"), ("信宏", "Hsin-Hung"), ("育誠", "Yu-Cheng"), ("哲瑋", "Che-Wei"),
    ("宇軒", "Yu-Hsuan"), ("品睿", "Pin-Jui"), ("承翰", "Cheng-Han"), ("明哲", "Ming-Che"), ("文雄", "Wen-Hsiung"),
    ("國華", "Kuo-Hua"), ("子豪", "Tzu-Hao"), ("柏宇", "Po-Yu"), ("睿恩", "Jui-En"), ("凱文", "Kai-Wen"),
)

EN_GIVEN_FEMALE: tuple[str, ...] = (
    "Emma", "Olivia", "Sophia", "Grace", "Chloe", "Emily", "Hannah", "Rachel", "Megan", "Jessica",
    "Amy", "Vivian", "Irene", "Cindy", "Tiffany", "Sarah", "Laura", "Natalie", "Joanne", "Michelle",
)

EN_GIVEN_MALE: tuple[str, ...] = (
    "James", "Daniel", "Michael", "David", "Kevin", "Jason", "Eric", "Andrew", "Ryan", "Brian",
    "Thomas", "Matthew", "Oliver", "Samuel", "Patrick", "Vincent", "Jeffrey", "Alan", "Peter", "Ethan",
)

EN_SURNAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson", "Taylor",
    "Thomas", "Moore", "Martin", "Thompson", "White", "Harris", "Clark", "Lewis", "Walker", "Young",
    "Wong", "Tan", "Lim", "Ng", "Lee", "Tanaka", "Suzuki", "Sato", "Nakamura", "Kobayashi",
)

# Reserved example domains only (never a real mailbox provider).
EMAIL_DOMAINS: tuple[tuple[str, float], ...] = (
    ("example.com", 45), ("example.net", 20), ("example.org", 12), ("mail.example", 10),
    ("inbox.example", 8), ("shop.example", 5),
)

# --- Geography ---------------------------------------------------------------------------------------

# Taiwanese members: (region, city, weight). Weights follow population, nudged towards the online-
# shopping-heavy metropolitan areas.
TW_CITIES: tuple[tuple[str, str, float], ...] = (
    ("Northern Taiwan", "New Taipei", 19), ("Northern Taiwan", "Taipei", 15), ("Northern Taiwan", "Taoyuan", 10),
    ("Northern Taiwan", "Hsinchu", 5), ("Northern Taiwan", "Keelung", 1.5), ("Northern Taiwan", "Yilan", 1.8),
    ("Central Taiwan", "Taichung", 12), ("Central Taiwan", "Changhua", 4.5), ("Central Taiwan", "Miaoli", 2),
    ("Central Taiwan", "Nantou", 1.8), ("Central Taiwan", "Yunlin", 2.2),
    ("Southern Taiwan", "Kaohsiung", 11), ("Southern Taiwan", "Tainan", 7.5), ("Southern Taiwan", "Chiayi", 2.5),
    ("Southern Taiwan", "Pingtung", 2.8),
    ("Eastern Taiwan", "Hualien", 1.2), ("Eastern Taiwan", "Taitung", 0.8),
    ("Outlying Islands", "Penghu", 0.4), ("Outlying Islands", "Kinmen", 0.4),
)

# Members abroad. Each country: calling code, timezone, (region, city, weight), and the national
# mobile prefixes we draw from plus how many subscriber digits follow. Prefixes are taken from the
# countries' mobile ranges (checked with ``phonenumbers`` in the tests).
US_AREAS: tuple[tuple[str, str, str, str, float], ...] = (
    # area code, timezone, region (state), city, weight
    ("626", "America/Los_Angeles", "California", "San Gabriel Valley", 4),
    ("408", "America/Los_Angeles", "California", "San Jose", 3),
    ("415", "America/Los_Angeles", "California", "San Francisco", 3),
    ("213", "America/Los_Angeles", "California", "Los Angeles", 3),
    ("206", "America/Los_Angeles", "Washington", "Seattle", 2),
    ("212", "America/New_York", "New York", "New York", 3),
    ("646", "America/New_York", "New York", "New York", 2),
    ("617", "America/New_York", "Massachusetts", "Boston", 1.5),
    ("312", "America/Chicago", "Illinois", "Chicago", 1.5),
)

FOREIGN_COUNTRIES: dict[str, dict] = {
    "HK": dict(code="852", tz="Asia/Hong_Kong", places=(("Hong Kong Island", "Hong Kong", 3), ("Kowloon", "Kowloon", 4),
                                                         ("New Territories", "Sha Tin", 3)),
               prefixes=("94", "96", "97", "61", "63", "64", "65", "69"), digits=6),
    "SG": dict(code="65", tz="Asia/Singapore", places=(("Central Region", "Singapore", 1),),
               prefixes=("81", "82", "83", "87", "88", "90", "91", "93", "96", "97", "98"), digits=6),
    "JP": dict(code="81", tz="Asia/Tokyo",
               places=(("Kanto", "Tokyo", 5), ("Kansai", "Osaka", 3), ("Kyushu", "Fukuoka", 1)),
               prefixes=("901", "902", "803", "805", "806", "708"), digits=7),
    "US": dict(code="1", tz=None, places=None, prefixes=None, digits=7),  # area codes from US_AREAS
}

# Country mix per locale: (country, weight).
COUNTRY_MIX: dict[str, tuple[tuple[str, float], ...]] = {
    "zh-TW": (("TW", 96), ("HK", 2.5), ("US", 1), ("JP", 0.5)),
    "en": (("TW", 45), ("US", 20), ("SG", 13), ("HK", 12), ("JP", 10)),
}

# --- Age ---------------------------------------------------------------------------------------------

# (label, min age, max age inclusive, weight): an online shop skews 25-44.
AGE_GROUPS: tuple[tuple[str, int, int, float], ...] = (
    ("18-24", 18, 24, 14), ("25-34", 25, 34, 31), ("35-44", 35, 44, 26),
    ("45-54", 45, 54, 16), ("55-64", 55, 64, 9), ("65+", 65, 80, 4),
)

# Channel preference orders and their weights per age group: younger members prefer push, then
# SMS, then e-mail; older members the reverse. The off-diagonal orders are the noise.
CHANNEL_ORDERS: tuple[str, ...] = (
    "push,sms,email", "push,email,sms", "sms,push,email", "sms,email,push", "email,sms,push", "email,push,sms",
)
CHANNEL_ORDER_WEIGHTS: dict[str | None, tuple[float, ...]] = {
    "18-24": (46, 18, 14, 6, 8, 8),
    "25-34": (36, 20, 14, 8, 12, 10),
    "35-44": (18, 16, 14, 14, 24, 14),
    "45-54": (9, 9, 12, 20, 40, 10),
    "55-64": (5, 6, 10, 22, 50, 7),
    "65+": (3, 4, 9, 22, 56, 6),
    None: (16, 14, 13, 15, 28, 14),  # no birthday given
}

# --- Catalogue ---------------------------------------------------------------------------------------

# category -> (relative demand, [(product, price in NT$)], (variant label, price factor) pairs).
# Every product comes in each variant, so the catalogue has sum(len(products) * len(variants)) items.
CATALOGUE: dict[str, tuple[float, tuple[tuple[str, int], ...], tuple[tuple[str, float], ...]]] = {
    "skincare": (16, (
        ("Hyaluronic Hydrating Toner", 590), ("Niacinamide Brightening Serum", 1280), ("Ceramide Barrier Cream", 980),
        ("Gentle Amino Cleanser", 420), ("Daily UV Shield SPF50", 690), ("Sheet Mask Set", 390),
        ("Retinol Night Essence", 1580), ("Centella Soothing Gel", 520), ("Vitamin C Eye Cream", 1180),
    ), (("", 1.0), (" Travel Size", 0.45))),
    "makeup": (10, (
        ("Cushion Foundation", 980), ("Velvet Matte Lipstick", 590), ("Waterproof Mascara", 450),
        ("Brow Pencil", 320), ("Eyeshadow Palette", 890), ("Setting Powder", 650), ("Lip Tint", 380),
        ("Makeup Remover Oil", 480),
    ), (("", 1.0), (" Mini", 0.55))),
    "haircare": (7, (
        ("Anti-Dandruff Shampoo", 320), ("Repair Conditioner", 340), ("Argan Hair Oil", 560),
        ("Scalp Scrub", 450), ("Heat Protect Spray", 390), ("Hair Mask", 480), ("Dry Shampoo", 290),
        ("Volumising Mousse", 350),
    ), (("", 1.0), (" Refill", 0.8))),
    "snacks": (12, (
        ("Pineapple Cakes", 360), ("Nougat Crackers", 220), ("Dried Mango", 180), ("Seaweed Chips", 120),
        ("Sun Cakes", 300), ("Peanut Brittle", 150), ("Almond Cookies", 260), ("Spicy Dried Tofu", 110),
        ("Mochi Assortment", 240),
    ), (("", 1.0), (" Gift Box", 2.6))),
    "tea": (8, (
        ("Alishan High Mountain Oolong", 880), ("Oriental Beauty Tea", 1200), ("Sun Moon Lake Black Tea", 650),
        ("Tieguanyin", 720), ("Jasmine Green Tea", 380), ("Roasted Oolong Tea Bags", 290), ("Milk Tea Mix", 260),
        ("Honey Citron Tea", 320),
    ), (("", 1.0), (" Gift Tin", 1.9))),
    "coffee": (7, (
        ("Single-Origin Beans", 520), ("House Blend Beans", 420), ("Drip Bags", 280), ("Cold Brew Packs", 350),
        ("Espresso Capsules", 390), ("Instant Coffee Sticks", 220), ("Decaf Beans", 480), ("Hand Grinder", 1480),
    ), (("", 1.0), (" Value Pack", 2.2))),
    "kitchen": (7, (
        ("Non-Stick Frying Pan", 1290), ("Chef's Knife", 1680), ("Glass Food Containers", 690),
        ("Electric Kettle", 1490), ("Bamboo Cutting Board", 450), ("Insulated Lunch Box", 590),
        ("Rice Cooker Inner Pot", 890), ("Silicone Utensil Set", 520),
    ), (("", 1.0), (" Deluxe", 1.6))),
    "home": (8, (
        ("Scented Candle", 480), ("Microfibre Towel Set", 390), ("Storage Box", 260), ("Linen Pillowcase", 590),
        ("Aroma Diffuser", 1180), ("Laundry Capsules", 320), ("Bath Mat", 450), ("Dehumidifier Bags", 199),
    ), (("", 1.0), (" Bundle", 2.4))),
    "apparel": (9, (
        ("Cotton T-Shirt", 490), ("Linen Shirt", 1280), ("Lounge Pants", 890), ("Knit Cardigan", 1490),
        ("Sports Socks", 199), ("Rain Jacket", 1880), ("Canvas Tote", 390), ("Sun Hat", 590),
    ), (("", 1.0), (" Premium", 1.5))),
    "baby": (6, (
        ("Diapers", 599), ("Baby Wipes", 299), ("Baby Lotion", 420), ("Silicone Bib", 260),
        ("Teething Toy", 280), ("Organic Baby Cereal", 320), ("Swaddle Blanket", 690), ("Feeding Bottle", 450),
    ), (("", 1.0), (" Jumbo Pack", 2.1))),
    "pet": (6, (
        ("Grain-Free Cat Food", 890), ("Dog Dental Chews", 320), ("Clumping Cat Litter", 450),
        ("Pet Shampoo", 380), ("Freeze-Dried Treats", 290), ("Chew Toy", 220), ("Pet Bed", 1280),
        ("Wet Food Cans", 560),
    ), (("", 1.0), (" Large", 1.7))),
    "electronics accessories": (8, (
        ("USB-C Cable", 290), ("Fast Charger 30W", 690), ("Power Bank 10000mAh", 890), ("Phone Case", 490),
        ("Screen Protector", 390), ("Wireless Earbuds", 1990), ("Bluetooth Speaker", 1490), ("Laptop Sleeve", 790),
    ), (("", 1.0), (" Pro", 1.6))),
}

# Categories bought together (both directions): the second line of a basket often comes from the
# complementary category of the first.
COMPLEMENTS: tuple[tuple[str, str], ...] = (
    ("skincare", "makeup"), ("haircare", "skincare"), ("snacks", "tea"), ("coffee", "snacks"),
    ("kitchen", "home"), ("baby", "home"), ("pet", "home"), ("apparel", "electronics accessories"),
)
