"""The catalogue: arrival date and stock (migration, import, generator), recommendations that honour the
campaign's category and never name an out-of-stock product, and the new-arrival and back-in-stock campaigns
on a small constructed shop (who is selected, and which products their message names)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from membercare.config import Settings
from membercare.data.generator import generate_shop
from membercare.data.importer import import_csv
from membercare.db import alembic_config
from membercare.journeys.models import MemberEvent
from membercare.links import LinkSigner
from membercare.models import Channel, Member, Order, OrderLine, Product
from membercare.rendering import CampaignRenderer, TemplateStore
from membercare.timeutil import UTC
from segments import SegmentContext, ref, rows

PROJECT_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SIGNER = LinkSigner("test-secret", "https://mc.example.org")
AS_OF = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
p = Product.__table__


# -- schema, import, generator ----------------------------------------------------------------------------


def test_migration_adds_the_columns_to_an_existing_catalogue(db_url, engine):
    command.downgrade(alembic_config(db_url), "0012_order_summary")
    with engine.begin() as conn:
        assert "stock" not in {c["name"] for c in sa.inspect(conn).get_columns("products")}
        conn.execute(sa.text("INSERT INTO products (sku, name, category, price_minor, currency) "
                             "VALUES ('A', 'Beans', 'coffee', 52000, 'TWD')"))
    engine.dispose()
    command.upgrade(alembic_config(db_url), "heads")
    with engine.begin() as conn:
        row = conn.execute(sa.select(p.c.sku, p.c.arrived_at, p.c.stock, p.c.restocked_at)).one()
        assert tuple(row) == ("A", None, None, None)  # unknown: treated as available
        conn.execute(p.update().values(stock=3, arrived_at=AS_OF))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(p.update().values(stock=-1))


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_products_import_rejects_malformed_values_with_line_numbers_and_marks_restocks(engine, tmp_path):
    settings = Settings(shop_timezone="Asia/Taipei")
    first = _csv(tmp_path, "products.csv",
                 "sku,name,category,price,arrived_at,stock\n"
                 "COF-1,Beans,coffee,520,2026-11-18,0\n"
                 "COF-2,Grinder,coffee,\"1,480\",2026-11-18 10:00+08:00,\n"
                 "COF-3,Bad price,coffee,12.345,,3\n"
                 "COF-4,Bad date,coffee,100,2026-02-30,3\n"
                 "COF-5,Negative,coffee,100,,-2\n"
                 "COF-6,Not a number,coffee,100,,many\n"
                 "COF-7,,coffee,100,,1\n")
    report = import_csv(engine, "products", first, settings=settings, now=AS_OF)
    assert (report.inserted, report.rejected) == (2, 5)
    reasons = {r.line: r.reason for r in report.sample_rejects}
    assert set(reasons) == {4, 5, 6, 7, 8}
    assert "price" in reasons[4] and "arrived_at" in reasons[5] and "stock" in reasons[6] and "below 0" in reasons[6]
    assert "stock" in reasons[7] and "name is required" in reasons[8]
    with engine.connect() as conn:
        got = {r.sku: r for r in conn.execute(sa.select(p))}
    assert got["COF-1"].arrived_at == datetime(2026, 11, 17, 16, 0, tzinfo=UTC)  # shop-local midnight
    assert got["COF-1"].stock == 0 and got["COF-2"].stock is None and got["COF-2"].price_minor == 148000
    # A stock feed: 0 -> 12 is a restock at the import's time; unknown -> 5 is not; a new SKU needs its fields.
    later = AS_OF + timedelta(hours=3)
    feed = _csv(tmp_path, "stock.csv", "sku,stock\nCOF-1,12\nCOF-2,5\nNEW-1,4\n")
    report = import_csv(engine, "products", feed, settings=settings, now=later)
    assert (report.updated, report.rejected) == (2, 1)
    assert report.sample_rejects[0].line == 4 and "needs name, category, price" in report.sample_rejects[0].reason
    with engine.connect() as conn:
        got = {r.sku: r for r in conn.execute(sa.select(p))}
    assert got["COF-1"].stock == 12 and got["COF-1"].restocked_at == later
    assert got["COF-2"].restocked_at is None
    assert got["COF-1"].name == "Beans"  # columns the feed does not have are kept
    # Importing the feed again changes nothing (the restock is not moved).
    report = import_csv(engine, "products", feed, settings=settings, now=later + timedelta(days=1))
    assert report.unchanged == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(p.c.restocked_at).where(p.c.sku == "COF-1")).scalar_one() == later


def test_generated_catalogue_has_new_arrivals_stockouts_and_restocks_reproducibly(engine):
    as_of = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
    generate_shop(engine, members=300, seed=11, as_of=as_of)

    def snapshot():
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                sa.select(p.c.id, p.c.sku, p.c.name, p.c.arrived_at, p.c.stock, p.c.restocked_at).order_by(p.c.id))]

    first = snapshot()
    new = [r for r in first if r[3] > as_of - timedelta(days=14)]
    assert len(new) == 8 and all(r[3] <= as_of and r[4] > 0 for r in new)
    assert sum(r[4] == 0 for r in first) >= 3
    restocked = [r for r in first if r[5] is not None]
    assert restocked and all(as_of - timedelta(days=14) < r[5] <= as_of and r[4] > 0 for r in restocked)
    with engine.connect() as conn:
        # Nothing was ordered before it arrived.
        early = conn.execute(sa.select(sa.func.count()).select_from(
            OrderLine.__table__.join(Order.__table__, Order.__table__.c.id == OrderLine.__table__.c.order_id)
            .join(p, p.c.id == OrderLine.__table__.c.product_id))
            .where(Order.__table__.c.placed_at < p.c.arrived_at)).scalar_one()
    assert early == 0
    generate_shop(engine, members=300, seed=11, as_of=as_of, replace=True)
    assert snapshot() == first


# -- a small constructed shop -------------------------------------------------------------------------------


def _shop(conn) -> dict[str, int]:
    """Members and what selects (or does not select) each of them; see the assertions below."""
    def ins(table, **values):
        return conn.execute(table.__table__.insert().values(**values).returning(table.__table__.c.id)).scalar_one()

    day = timedelta(days=1)
    products = {}
    for sku, name, cat, arrived, stock, restocked in [
        ("COF-OLD", "House Blend", "coffee", AS_OF - 400 * day, 50, None),
        ("COF-NEW", "Geisha Beans", "coffee", AS_OF - 3 * day, 20, None),
        ("COF-GONE", "Sold-out Drip Bags", "coffee", AS_OF - 2 * day, 0, None),  # new but out of stock
        ("COF-SOON", "Next Week's Blend", "coffee", AS_OF + 2 * day, 10, None),  # not arrived yet
        ("TEA-OLD", "Oolong", "tea", AS_OF - 400 * day, None, None),
        ("TEA-BACK", "Oriental Beauty", "tea", AS_OF - 300 * day, 5, AS_OF - 2 * day),
        ("KIT-NEW", "Enamel Kettle", "kitchen", AS_OF - 1 * day, 0, None),  # kitchen's only new one: sold out
        ("KIT-BACK0", "Knife", "kitchen", AS_OF - 300 * day, 0, AS_OF - 3 * day),  # restocked, sold out again
        ("MKP-1", "Setting Powder", "makeup", AS_OF - 400 * day, 30, None),
        ("ELA-1", "Wireless Earbuds", "electronics accessories", AS_OF - 400 * day, 30, None),
    ]:
        products[sku] = ins(Product, sku=sku, name=name, category=cat, price_minor=50000, arrived_at=arrived,
                            stock=stock, restocked_at=restocked)
    members = {}
    for ext, joined in [("coffee_buyer", 500), ("gadget_fan", 500), ("tea_buyer", 500), ("coffee_viewer", 500),
                        ("old_coffee", 900), ("kitchen_buyer", 500), ("not_yet", -1), ("nobody", 500)]:
        members[ext] = ins(Member, external_id=ext, name=ext, locale="en", joined_at=AS_OF - joined * day,
                           email=f"{ext}@example.com")
    n = 0

    def order(member, skus, days_ago):
        nonlocal n
        n += 1
        oid = ins(Order, external_id=f"O{n}", member_id=members[member], placed_at=AS_OF - days_ago * day,
                  status="paid", total_minor=1000 * len(skus))
        for i, sku in enumerate(skus, 1):
            cat = conn.execute(sa.select(p.c.category).where(p.c.sku == sku)).scalar_one()
            conn.execute(OrderLine.__table__.insert().values(order_id=oid, line_no=i, product_id=products[sku],
                                                             sku=sku, category=cat, quantity=1, amount_minor=1000))

    order("coffee_buyer", ["COF-OLD"], 30)
    order("coffee_buyer", ["COF-OLD"], 20)
    # Coffee bought together with setting powder and earbuds, twice: what a plain co-purchase model recommends.
    order("gadget_fan", ["COF-OLD", "MKP-1", "ELA-1"], 60)
    order("gadget_fan", ["COF-OLD", "MKP-1", "ELA-1"], 50)
    order("tea_buyer", ["TEA-OLD"], 40)
    order("old_coffee", ["COF-OLD"], 400)  # outside the year of affinity
    order("kitchen_buyer", ["KIT-BACK0"], 100)
    order("not_yet", ["COF-OLD"], -2)  # joined (and ordered) after as_of
    # A member who never bought coffee but looked at it last week (a Segment "Product Viewed" event).
    conn.execute(MemberEvent.__table__.insert().values(
        event_id="ev-1", name="product.viewed", member_id=members["coffee_viewer"], occurred_at=AS_OF - 7 * day,
        received_at=AS_OF - 7 * day, properties=json.dumps({"sku": "COF-OLD", "name": "House Blend"})))
    conn.execute(MemberEvent.__table__.insert().values(
        event_id="ev-2", name="product.viewed", member_id=members["nobody"], occurred_at=AS_OF + day,
        received_at=AS_OF + day, properties=json.dumps({"category": "coffee"})))  # after as_of: invisible
    return members


def _selected(engine, name: str, as_of: datetime = AS_OF, **params) -> set[str]:
    with engine.connect() as conn:
        return {r["external_id"] for r in rows(SegmentContext(conn, as_of), ref(name, **params))}


def test_new_arrivals_segment_selects_members_with_affinity_for_a_category_with_new_stock(engine):
    with engine.begin() as conn:
        _shop(conn)
    assert _selected(engine, "new_arrivals") == {"coffee_buyer", "gadget_fan", "coffee_viewer"}
    assert _selected(engine, "new_arrivals", views=False) == {"coffee_buyer", "gadget_fan"}
    assert _selected(engine, "new_arrivals", category="tea") == set()
    # As of ten days earlier the Geisha beans had not arrived (and the view had not happened).
    assert _selected(engine, "new_arrivals", as_of=AS_OF - timedelta(days=10)) == set()
    with engine.connect() as conn:
        row = next(r for r in rows(SegmentContext(conn, AS_OF), ref("new_arrivals"))
                   if r["external_id"] == "coffee_buyer")
    assert row["arrived_products"] == 1 and row["categories"] == 1


def test_back_in_stock_segment_selects_members_whose_category_has_restocked_products(engine):
    with engine.begin() as conn:
        _shop(conn)
    # Oriental Beauty is back (tea); the knife came back but is sold out again (kitchen).
    assert _selected(engine, "back_in_stock") == {"tea_buyer"}
    assert _selected(engine, "back_in_stock", days=1) == set()


def _renderer(name: str, templates: Path = PROJECT_TEMPLATES) -> CampaignRenderer:
    return CampaignRenderer(name, Settings(templates_dir=templates), signer=SIGNER, store=TemplateStore(templates))


def test_new_arrivals_and_back_in_stock_messages_name_the_right_products(engine):
    with engine.begin() as conn:
        ids = _shop(conn)
    new, back = _renderer("new_arrivals"), _renderer("back_in_stock")
    with engine.connect() as conn:
        ctx = new.build_context(conn, [ids["coffee_buyer"], ids["coffee_viewer"], ids["tea_buyer"]], AS_OF)
        back_ctx = back.build_context(conn, [ids["tea_buyer"]], AS_OF)
    for who in ("coffee_buyer", "coffee_viewer"):
        assert [r["sku"] for r in ctx[ids[who]]["recommendations"]] == ["COF-NEW"]
        email = new.render(Channel.EMAIL, ctx[ids[who]], as_of=AS_OF)
        assert email.subject == "Just arrived: Geisha Beans"
        assert "Geisha Beans" in email.text and "Sold-out Drip Bags" not in email.text
        assert "Next Week" not in email.text and "Enamel Kettle" not in email.text
        for channel in (Channel.SMS, Channel.PUSH, Channel.LINE):
            assert "Geisha Beans" in str(new.render(channel, ctx[ids[who]], as_of=AS_OF, message_id="m-1"))
    # Someone with no affinity for a category with new arrivals still hears what is new (a test send, say).
    assert [r["sku"] for r in ctx[ids["tea_buyer"]]["recommendations"]] == ["COF-NEW"]
    assert [r["sku"] for r in back_ctx[ids["tea_buyer"]]["recommendations"]] == ["TEA-BACK"]
    push = back.render(Channel.PUSH, back_ctx[ids["tea_buyer"]], as_of=AS_OF, message_id="m-2")
    assert "Oriental Beauty" in push.body and "Knife" not in push.body
    sms = back.render(Channel.SMS, back_ctx[ids["tea_buyer"]], as_of=AS_OF, message_id="m-3")
    assert "Back in stock: Oriental Beauty" in sms.body


COFFEE_LOVERS = """\
name: coffee_lovers
description: For coffee lovers.
purpose: marketing
segment: {name: category_affinity, params: {category: coffee}}
channels: [email]
params: {recommendations: 3}
recommendations: {category: coffee}
"""


def test_a_campaigns_category_restricts_recommendations_and_never_names_out_of_stock(engine, tmp_path):
    tpl = tmp_path / "templates"
    shutil.copytree(PROJECT_TEMPLATES, tpl)
    (tpl / "coffee_lovers").mkdir()
    (tpl / "coffee_lovers" / "campaign.yaml").write_text(COFFEE_LOVERS, encoding="utf-8")
    for f in (PROJECT_TEMPLATES / "recommendations").glob("email*"):
        shutil.copy(f, tpl / "coffee_lovers" / f.name)
    with engine.begin() as conn:
        ids = _shop(conn)
    plain, coffee = _renderer("recommendations", tpl), _renderer("coffee_lovers", tpl)
    with engine.connect() as conn:
        everything = plain.build_context(conn, [ids["coffee_buyer"]], AS_OF)[ids["coffee_buyer"]]
        ctx = coffee.build_context(conn, [ids["coffee_buyer"], ids["nobody"]], AS_OF)
    # Without a category the co-purchases of its coffee win: setting powder and earbuds (the reported defect).
    assert {r["sku"] for r in everything["recommendations"][:2]} == {"ELA-1", "MKP-1"}
    # With it: coffee only, never the sold-out drip bags, never what has not arrived; fewer when there is no more.
    for mid in (ids["coffee_buyer"], ids["nobody"]):
        skus = [r["sku"] for r in ctx[mid]["recommendations"]]
        assert skus and all(s.startswith("COF-") for s in skus), skus
        assert "COF-GONE" not in skus
    # The member already has the house blend; a member with no purchases gets the category's best-seller first.
    assert [r["sku"] for r in ctx[ids["coffee_buyer"]]["recommendations"]] == ["COF-NEW"]
    assert [r["sku"] for r in ctx[ids["nobody"]]["recommendations"]] == ["COF-OLD", "COF-NEW"]
    email = coffee.render(Channel.EMAIL, ctx[ids["coffee_buyer"]], as_of=AS_OF)
    assert "Geisha Beans" in email.text and "Setting Powder" not in email.text and "Earbuds" not in email.text


def test_the_documented_products_example_imports(engine, tmp_path):
    src = Path(__file__).parent / "fixtures" / "import" / "products.csv"
    shutil.copyfile(src, tmp_path / "products.csv")
    report = import_csv(engine, "products", tmp_path / "products.csv", settings=Settings(), now=AS_OF)
    assert (report.inserted, report.rejected) == (2, 0)
    with engine.connect() as conn:
        got = {r.sku: r for r in conn.execute(sa.select(p))}
    assert got["COF-GEISHA"].stock == 40 and got["COF-DRIP"].stock == 0 and got["COF-GEISHA"].price_minor == 98000


def test_a_sold_out_co_purchase_is_never_recommended(engine):
    with engine.begin() as conn:
        ids = _shop(conn)
        conn.execute(p.update().where(p.c.sku == "MKP-1").values(stock=0))
    with engine.connect() as conn:
        ctx = _renderer("recommendations").build_context(conn, [ids["coffee_buyer"]], AS_OF)[ids["coffee_buyer"]]
    skus = [r["sku"] for r in ctx["recommendations"]]
    assert skus[0] == "ELA-1" and "MKP-1" not in skus and "COF-GONE" not in skus and "COF-SOON" not in skus


@pytest.mark.parametrize("block, message", [
    ("{category: 7}", "category 7 must be a non-empty text"),
    ("{category: [coffee, coffee]}", "listed twice"),
    ("{category: ''}", "non-empty text"),
    ("{only: bestsellers}", "only"),
    ("{within_days: 0}", "within_days"),
    ("{categories: coffee}", "categories"),
])
def test_the_recommendations_block_is_validated(tmp_path, block, message):
    from membercare.campaigns.definition import CampaignDefinitionError, load_campaign

    (tmp_path / "coffee_lovers").mkdir()
    (tmp_path / "coffee_lovers" / "campaign.yaml").write_text(
        COFFEE_LOVERS.replace("recommendations: {category: coffee}", f"recommendations: {block}"), encoding="utf-8")
    with pytest.raises(CampaignDefinitionError, match=message) as info:
        load_campaign("coffee_lovers", Settings(templates_dir=tmp_path))
    assert "recommendations" in str(info.value)


def test_a_category_may_be_one_name_or_a_list(tmp_path):
    from membercare.campaigns.definition import load_campaign

    (tmp_path / "coffee_lovers").mkdir()
    path = tmp_path / "coffee_lovers" / "campaign.yaml"
    path.write_text(COFFEE_LOVERS, encoding="utf-8")
    assert load_campaign("coffee_lovers", Settings(templates_dir=tmp_path)).recommendations.category == ("coffee",)
    path.write_text(COFFEE_LOVERS.replace("{category: coffee}", "{category: [coffee, tea], only: back_in_stock}"),
                    encoding="utf-8")
    rules = load_campaign("coffee_lovers", Settings(templates_dir=tmp_path)).recommendations
    assert rules.category == ("coffee", "tea") and rules.only == "back_in_stock" and rules.within_days == 14
