"""Imports go one way: the campaign stages sit on top, the delivery core below them, and lower layers read only
the campaign *definition*. Checked statically on every import statement (function-level ones included), so a
lazy import cannot hide a climb back up the layers.

The data path: ``membercare.campaigns`` (stages) -> ``membercare.optimise`` (planner hooks) ->
``membercare.engagement`` -> ``membercare.delivery`` -> storage (``db``, ``models``). Rendering and the channels
implement ``membercare.delivery.contract`` and are injected into the planner and the dispatcher.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "membercare"

# Modules of membercare/campaigns/ from the bottom up: each may import only the modules listed before it.
CAMPAIGN_ORDER = ("definition", "occurrence", "audience", "offers", "plan", "dry_run", "estimate", "summary",
                  "dispatch", "triggers", "seed_send", "run")
# Packages that start work (commands, HTTP endpoints) and may call the campaign stages.
ENTRY_POINTS = ("membercare.cli", "membercare.receiver")
# Stages beside the campaigns: journeys plan their send steps through the campaign stages (plan, occurrence)
# and are called by the entry points; nothing below them imports them.
BESIDE_CAMPAIGNS = ("membercare.journeys",)
# Packages each core package must never import (at any depth, in any function).
NEVER = {
    "membercare.campaigns": (*BESIDE_CAMPAIGNS, *ENTRY_POINTS),
    "membercare.journeys": ("membercare.reports", *ENTRY_POINTS),
    "membercare.delivery": ("membercare.campaigns", "membercare.optimise", "membercare.engagement",
                            "membercare.rendering", "membercare.reports", *BESIDE_CAMPAIGNS, *ENTRY_POINTS),
    "membercare.engagement": ("membercare.campaigns", "membercare.optimise", "membercare.rendering",
                              "membercare.reports", *BESIDE_CAMPAIGNS, *ENTRY_POINTS),
    "membercare.optimise": ("membercare.rendering", "membercare.reports", *BESIDE_CAMPAIGNS, *ENTRY_POINTS),
    "membercare.rendering": ("membercare.optimise", "membercare.engagement", "membercare.reports",
                             "membercare.delivery.planner", "membercare.delivery.dispatcher", *BESIDE_CAMPAIGNS,
                             *ENTRY_POINTS),
    # Shop data comes in (import, generator) below everything that reads it: storage, consent, validation only.
    "membercare.data": ("membercare.campaigns", "membercare.optimise", "membercare.engagement", "membercare.delivery",
                        "membercare.rendering", "membercare.reports", *BESIDE_CAMPAIGNS, *ENTRY_POINTS),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from a import b`` names ``a`` and ``a.b``)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def core_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "migrations" not in p.parts)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def campaign_module(name: str) -> str | None:
    """The module of membercare/campaigns/ an imported name belongs to (the package re-exports the definition)."""
    if not within(name, "membercare.campaigns"):
        return None
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[2] in CAMPAIGN_ORDER else "definition"


def test_campaign_modules_import_only_the_ones_below_them():
    for i, name in enumerate(CAMPAIGN_ORDER):
        below = set(CAMPAIGN_ORDER[:i])
        climbs = sorted(t for t in imported(PKG / "campaigns" / f"{name}.py")
                        if campaign_module(t) is not None and campaign_module(t) not in below)
        assert not climbs, f"campaigns/{name}.py imports {climbs}: only {sorted(below) or 'nothing'} is below it"
    assert {p.stem for p in (PKG / "campaigns").glob("*.py")} - {"__init__"} == set(CAMPAIGN_ORDER), \
        "a new module of membercare/campaigns/ needs its place in CAMPAIGN_ORDER"


def test_the_campaign_definition_depends_on_nothing_above_storage():
    allowed = ("membercare.config", "membercare.errors", "membercare.models", "membercare.rendering.locales")
    bad = sorted(t for t in imported(PKG / "campaigns" / "definition.py")
                 if t.startswith("membercare.") and not any(within(t, a) for a in allowed))
    assert not bad, f"campaigns/definition.py is read by every layer; it must not import {bad}"


def test_only_entry_points_call_the_campaign_stages():
    offenders = []
    for path in core_modules():
        mod = module_name(path)
        if within(mod, "membercare.campaigns") or any(within(mod, e) for e in (*ENTRY_POINTS, *BESIDE_CAMPAIGNS)):
            continue
        offenders += [f"{mod} imports {t}" for t in sorted(imported(path))
                      if campaign_module(t) not in (None, "definition")]
    assert not offenders, "lower layers may read only the campaign definition:\n" + "\n".join(sorted(offenders))


# Climbs that exist and are not resolved yet (each names its module and the package it reaches up to).
KNOWN_CLIMBS = {
    # SendGrid's provider verdicts read the stored Event Webhook (engagement_events) inside a function.
    ("membercare.delivery.provider_records", "membercare.engagement"),
}


@pytest.mark.parametrize("package", sorted(NEVER))
def test_core_packages_never_import_the_layers_above_them(package):
    root = PKG / package.split(".", 1)[1]
    offenders = [f"{module_name(p)} imports {t}" for p in sorted(root.rglob("*.py")) for t in sorted(imported(p))
                 for banned in NEVER[package]
                 if within(t, banned) and (module_name(p), banned) not in KNOWN_CLIMBS]
    assert not offenders, "\n".join(offenders)


def test_runner_module_is_gone():
    assert not (PKG / "runner.py").exists()
    offenders = [module_name(p) for p in core_modules() if "membercare.runner" in imported(p)]
    assert not offenders, offenders
