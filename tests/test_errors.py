"""The exception tree drawn in ``membercare/errors.py`` is exactly what the code defines and raises.

Every exception class defined in ``membercare/``, ``channels/`` and ``segments/`` is either drawn in the tree
(with its module, its parent and any other base it keeps) or private (``_Name``), listed under the tree and
caught in its own module; every class drawn exists and is raised somewhere (or is the parent of one that is).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import channels
import membercare
import membercare.errors
import segments

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (membercare, channels, segments)
BUILTIN_EXCEPTIONS = {name for name, obj in vars(builtins).items()
                      if inspect.isclass(obj) and issubclass(obj, BaseException)}


@dataclass(frozen=True)
class Drawn:
    name: str
    module: str
    parent: str | None
    builtins: frozenset[str]


def drawn_tree(doc: str) -> dict[str, Drawn]:
    """The classes of the ``::`` block of ``doc``: name -> module, parent (by indentation), other bases kept."""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    out: dict[str, Drawn] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        m = re.match(r"^(\s*(?:[│ ]   )*(?:[├└]── )?)(\w+)\s+([\w.]+)\s+(.*)$", line)
        assert m, f"cannot read the tree line {line!r}"
        depth, name, module, text = len(m.group(1)), m.group(2), m.group(3), m.group(4)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        assert name not in out, f"{name} is drawn twice"
        kept = frozenset(re.findall(r"also an? (\w+)", text))
        out[name] = Drawn(name, module, stack[-1][1] if stack else None, kept)
        stack.append((depth, name))
    return out


def private_listed(doc: str) -> set[str]:
    """``module._Name`` of the private exceptions the docstring lists under the tree."""
    para = doc.split("Private exceptions", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"``([\w.]+\._\w+)``", para))


def defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined (not re-exported) at module level in the three packages."""
    found: dict[str, type[BaseException]] = {}
    for pkg in PACKAGES:
        modules = [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                                    if ".migrations" not in m.name]
        for name in modules:
            mod = importlib.import_module(name)
            for obj in vars(mod).values():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def short(module: str) -> str:
    return module.removeprefix("membercare.")


def source_files() -> list[Path]:
    return sorted(p for pkg in ("membercare", "channels", "segments", "flows") for p in (ROOT / pkg).rglob("*.py")
                  if "migrations" not in p.parts)


def raised_names() -> set[str]:
    """The class names that some ``raise`` statement instantiates or re-raises by name."""
    names: set[str] = set()
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name):
                    names.add(target.id)
                elif isinstance(target, ast.Attribute):
                    names.add(target.attr)
    return names


DOC = membercare.errors.__doc__ or ""
TREE = drawn_tree(DOC)
DEFINED = defined_exceptions()


def test_the_tree_is_read_as_drawn():
    assert TREE["MembercareError"].parent is None
    assert TREE["UnknownNameError"] == Drawn("UnknownNameError", "errors", "InputError", frozenset())
    assert TREE["InlineError"].parent == "RenderError" and TREE["InlineError"].builtins == {"ValueError"}


def public_exceptions() -> dict[str, type[BaseException]]:
    public = [c for c in DEFINED.values() if not c.__qualname__.startswith("_")]
    by_name = {c.__qualname__: c for c in public}
    assert len(by_name) == len(public), "two public exception classes share a name: the tree cannot tell them apart"
    return by_name


def undrawn_and_nonexistent(tree: dict[str, Drawn]) -> tuple[list[str], list[str]]:
    public = public_exceptions()
    return sorted(set(public) - set(tree)), sorted(set(tree) - set(public))


def never_raised(tree: dict[str, Drawn]) -> list[str]:
    raised, parents = raised_names(), {d.parent for d in tree.values()}
    return sorted(n for n in tree if n not in raised and n not in parents)


def test_every_public_exception_is_drawn_and_every_drawn_class_exists():
    undrawn, nonexistent = undrawn_and_nonexistent(TREE)
    assert undrawn == [], "defined but not drawn in membercare/errors.py"
    assert nonexistent == [], "drawn in membercare/errors.py but defined nowhere"


@pytest.mark.parametrize("name", sorted(TREE))
def test_each_drawn_class_has_its_module_parent_and_builtin_bases(name):
    drawn, cls = TREE[name], next(c for c in DEFINED.values() if c.__qualname__ == name)
    assert short(cls.__module__) == drawn.module, f"{name} is defined in {cls.__module__}"
    ours = [b for b in cls.__bases__ if issubclass(b, membercare.errors.MembercareError)]
    if drawn.parent is None:
        assert cls is membercare.errors.MembercareError
    else:
        assert [b.__qualname__ for b in ours] == [drawn.parent], f"{name} derives from {cls.__bases__}"
    kept = {b.__name__ for b in cls.__bases__ if b not in ours} - {"Exception"}
    assert kept == drawn.builtins, f"{name} keeps {kept or 'no'} other base(s); the tree says {drawn.builtins}"


def test_every_drawn_class_is_raised_or_is_the_parent_of_one_that_is():
    unused = never_raised(TREE)
    assert not unused, f"drawn but never raised: {unused} (raise them where they belong or remove them)"


def test_private_exceptions_are_listed_and_caught_in_their_own_module():
    private = {f"{short(c.__module__)}.{c.__qualname__}": c for c in DEFINED.values()
               if c.__qualname__.startswith("_")}
    assert set(private) == private_listed(DOC)
    for dotted, cls in private.items():
        tree = ast.parse(Path(inspect.getfile(cls)).read_text(encoding="utf-8"))
        handled = {ast.unparse(n.type) for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.type}
        handled |= {ast.unparse(a) for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and ast.unparse(n.func).endswith("exception_handler") for a in n.args}
        assert any(re.search(rf"\b{cls.__qualname__}\b", h) for h in handled), f"{dotted} escapes its module"


def test_no_exception_class_is_defined_inside_a_function_or_class():
    """Nested classes are invisible to the walk above, so there must be none."""
    names = BUILTIN_EXCEPTIONS | {c.__qualname__ for c in DEFINED.values()}
    nested = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for outer in ast.walk(tree):
            if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for node in ast.walk(outer):
                    if node is not outer and isinstance(node, ast.ClassDef) and any(
                            ast.unparse(b).rpartition(".")[2] in names for b in node.bases):
                        nested.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not nested, nested


def test_the_checks_catch_a_drawing_that_does_not_match_the_code():
    """A drawing with a class nobody raises and without the classes defined outside it fails both checks."""
    stale = drawn_tree("""x

::

    MembercareError                  errors   base of everything we raise on purpose
    ├── ConfigurationError           errors   wrong or missing settings/credentials
    ├── InputError                   errors   bad user input
    │   └── UnknownNameError         errors   an unknown segment, campaign, channel, ...
    ├── DataError                    errors   the database holds something that breaks an invariant
    └── DeliveryError                errors   provider-side failures
        ├── TransientDeliveryError   errors   retry later
        └── PermanentDeliveryError   errors   do not retry this recipient on this channel
""")
    assert stale["PermanentDeliveryError"].parent == "DeliveryError"
    undrawn, nonexistent = undrawn_and_nonexistent(stale)
    assert {"ConfigError", "DispatchProcessError", "InlineError", "MalformedPayload", "RenderError"} <= set(undrawn)
    assert nonexistent == ["PermanentDeliveryError", "TransientDeliveryError"]
    assert never_raised(stale) == ["PermanentDeliveryError", "TransientDeliveryError"]


def test_callers_catching_builtin_exceptions_still_catch_ours():
    from membercare.delivery.pool import DispatchProcessError
    from membercare.delivery.provider_records import ProviderLookupError
    from membercare.engagement.events import MalformedPayload
    from membercare.rendering.htmltext import InlineError, inline_css
    from membercare.sandbox.config import ConfigError

    for cls, builtin in ((ConfigError, ValueError), (MalformedPayload, ValueError), (InlineError, ValueError),
                         (DispatchProcessError, RuntimeError), (ProviderLookupError, RuntimeError)):
        assert issubclass(cls, builtin) and issubclass(cls, membercare.errors.MembercareError)
    with pytest.raises(ValueError, match="inside <style>"):
        inline_css("<html><head><style>p { color: {{ colour }} }</style></head><body><p>x</p></body></html>")
