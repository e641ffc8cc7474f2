"""The domain package does not depend on Prefect.

* Statically: no import statement anywhere in ``membercare/`` outside ``membercare/cli/`` names ``prefect`` or
  ``flows``, function-level imports and ``importlib.import_module("...")`` / ``__import__("...")`` with a
  literal name included. What the core needs from Prefect (shared rate-limit slots, starting a deployment)
  comes through interfaces the core defines and ``flows/`` implements; the CLI wires them.
* At run time: importing every module of ``membercare/``, ``segments/`` and ``channels/`` leaves ``prefect`` out
  of ``sys.modules`` (in a subprocess, so other tests' imports do not interfere).
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Only the command line may reach the orchestration layer (it wires flows/ implementations into the core).
ALLOWED = (ROOT / "membercare" / "cli",)
BANNED = ("prefect", "flows")
DYNAMIC = {"import_module", "__import__"}


def banned_imports(source: str, filename: str = "<source>") -> list[str]:
    """``line: name`` for every import of ``prefect`` or ``flows`` (or a submodule) in ``source``, at any depth."""

    def banned(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in BANNED)

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in DYNAMIC and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{node.lineno}: {n}" for n in names if banned(n)]
    return found


def test_no_module_of_the_core_imports_prefect_or_flows_even_inside_a_function():
    offenders = []
    for path in sorted((ROOT / "membercare").rglob("*.py")):
        if any(path.is_relative_to(a) for a in ALLOWED):
            continue
        rel = path.relative_to(ROOT)
        offenders += [f"{rel}:{hit}" for hit in banned_imports(path.read_text(encoding="utf-8"), str(rel))]
    assert not offenders, ("only membercare/cli/ may import prefect or flows; pass what the core needs through an "
                           "interface instead:\n" + "\n".join(offenders))


def test_the_check_catches_every_form_of_import():
    hidden = textwrap.dedent(
        """
        import json

        def start():
            import prefect

        class Flow:
            def run(self):
                from prefect.deployments import run_deployment
                from flows.triggers import trigger_message
                import flows.campaign as campaign

        def dynamic():
            import importlib
            return importlib.import_module("prefect.client"), __import__("flows")
        """
    )
    assert [hit.split(": ")[1] for hit in banned_imports(hidden)] == [
        "prefect", "prefect.deployments", "flows.triggers", "flows.campaign", "prefect.client", "flows"]
    # Names that merely start alike, and relative imports (which stay inside membercare), are not Prefect.
    assert banned_imports("import prefecture\nfrom flowsheet import x\nfrom .flows import y\n") == []


def test_the_check_fails_on_a_violation_in_the_tree(tmp_path, monkeypatch):
    """The real test, run over a copy of the tree with one lazy import added, fails and names the line."""
    import pytest

    fake_root = tmp_path / "repo"
    (fake_root / "membercare" / "cli").mkdir(parents=True)
    (fake_root / "membercare" / "receiver").mkdir()
    (fake_root / "membercare" / "cli" / "serve.py").write_text("from flows.deployments import DeploymentStarter\n")
    (fake_root / "membercare" / "receiver" / "triggers.py").write_text(
        "def start(parameters):\n    from prefect.deployments import run_deployment\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    monkeypatch.setattr(sys.modules[__name__], "ALLOWED", (fake_root / "membercare" / "cli",))
    with pytest.raises(AssertionError, match=r"membercare/receiver/triggers\.py:2: prefect\.deployments"):
        test_no_module_of_the_core_imports_prefect_or_flows_even_inside_a_function()


def test_importing_every_core_module_does_not_import_prefect():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import membercare, segments, channels
        names = []
        for pkg in (membercare, segments, channels):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if ".migrations" in m.name:
                    continue
                importlib.import_module(m.name)
                names.append(m.name)
        bad = sorted(k for k in sys.modules if k == "prefect" or k.startswith("prefect."))
        print(len(names), "modules;", "prefect loaded" if bad else "prefect not loaded")
        sys.exit(1 if bad else 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
