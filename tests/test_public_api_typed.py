"""Type hints on every public function of the core (issue 15).

Public functions, and public methods of public classes, in ``membercare/`` (except ``cli/`` and
``migrations/``), ``segments/`` and ``channels/`` annotate every parameter (``self``/``cls`` excepted)
and their return (``__init__`` excepted). Private names (a leading ``_``) and private modules are
exempt. mypy then checks the annotations against the bodies and the callers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("membercare", "segments", "channels")

# Functions allowed to stay unannotated, by "path::qualified name": none. The test fails on a stale entry, so
# this can only stay empty.
ALLOWED_UNANNOTATED: set[str] = set()

_FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def _missing(fn: _FunctionNode, method: bool) -> list[str]:
    args = fn.args
    params = args.posonlyargs + args.args + args.kwonlyargs
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if method and not is_static and params and params[0].arg in ("self", "cls"):
        params = params[1:]
    missing = [a.arg for a in params if a.annotation is None]
    if args.vararg is not None and args.vararg.annotation is None:
        missing.append("*" + args.vararg.arg)
    if args.kwarg is not None and args.kwarg.annotation is None:
        missing.append("**" + args.kwarg.arg)
    if fn.returns is None and fn.name != "__init__":
        missing.append("return")
    return missing


def unannotated(source: str) -> list[tuple[int, str, list[str]]]:
    """``(line, qualified name, missing)`` for each public function or public method of a public class
    in ``source`` that lacks a parameter or return annotation."""
    found: list[tuple[int, str, list[str]]] = []

    def check(fn: _FunctionNode, owner: str | None) -> None:
        if fn.name.startswith("_"):
            return
        missing = _missing(fn, method=owner is not None)
        if missing:
            found.append((fn.lineno, f"{owner}.{fn.name}" if owner else fn.name, missing))

    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            check(node, None)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    check(sub, node.name)
    return found


def _public_modules() -> list[Path]:
    paths = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).parts
            if "migrations" in parts or (package == "membercare" and "cli" in parts):
                continue
            if any(part.startswith("_") and part != "__init__.py" for part in parts):
                continue  # private modules and packages
            paths.append(path)
    return paths


def test_every_public_function_of_the_core_is_annotated() -> None:
    violations, allowed_seen = [], set()
    for path in _public_modules():
        rel = path.relative_to(ROOT).as_posix()
        for line, name, missing in unannotated(path.read_text(encoding="utf-8")):
            key = f"{rel}::{name}"
            if key in ALLOWED_UNANNOTATED:
                allowed_seen.add(key)
            else:
                violations.append(f"{rel}:{line} {name}: {', '.join(missing)}")
    assert not violations, "public functions missing annotations (file:line function: missing):\n" + "\n".join(
        violations)
    stale = sorted(ALLOWED_UNANNOTATED - allowed_seen)
    assert not stale, "annotated now (or gone): delete from ALLOWED_UNANNOTATED:\n" + "\n".join(stale)


def test_the_checker_catches_missing_annotations() -> None:
    source = '''
def typed(a: int, *args: str, b: bool = False, **kw: float) -> int: ...
def no_return(a: int): ...
def bare(a, *args, **kw) -> None: ...
async def coro(x) -> None: ...
def _private(a): ...

class Public:
    def __init__(self, n: int): ...
    def method(self, x) -> None: ...
    @classmethod
    def make(cls) -> "Public": ...
    @staticmethod
    def static(self) -> None: ...
    def _hidden(self, x): ...

class _Private:
    def method(self, x): ...
'''
    assert unannotated(source) == [
        (3, "no_return", ["return"]),
        (4, "bare", ["a", "*args", "**kw"]),
        (5, "coro", ["x"]),
        (10, "Public.method", ["x"]),
        (14, "Public.static", ["self"]),
    ]
