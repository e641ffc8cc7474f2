"""Bounds on what one template render may cost: memory (value and output sizes) and time (steps, seconds).

Templates are edited by marketers and rendered once per member, so a template must not be able to
take the process down: ``{{ 'a' * 10**9 }}`` would allocate a gigabyte and nested loops could run
for hours. :class:`BoundedEnvironment` is Jinja's immutable sandbox plus these checks:

* **values**: the intercepted operators ``*``, ``+``, ``%`` and ``**`` refuse a result larger than
  :attr:`RenderLimits.max_value` characters or items (or a number over ``max_int_bits`` bits)
  *before* computing it; so do the string methods and built-in filters that take a size
  (``center``, ``ljust``, ``zfill``, ``replace``, ``join``, ``indent``, ``format``, ``batch``, ...),
  and ``~`` concatenations and formatting with many fields (sized from their operands); the
  result of every method call and of every filter that can grow its input is checked too;
* **range()**: at most ``max_range`` items;
* **output**: at most ``max_output`` characters per rendered part (and per macro or ``{% set %}`` block);
* **work**: loop iterations plus calls are counted against ``max_steps``, and the wall time of the
  render against ``max_seconds``.

A breach raises :class:`TemplateLimitError` (a Jinja ``SecurityError``) naming the limit; the renderer
turns it into a ``RenderError`` with code ``limit`` and the template's file and line, which
``membercare templates check`` reports. Messages give sizes and limits, never a value.

Steps, time and output are counted per render: :func:`render_bounded` (the renderer's path) and
:meth:`BoundedTemplate.render` give the render's context a budget; Jinja's ``generate``/``stream``
run without one (the size checks still apply). The budget travels on the context, so the hot path
reads no thread-local state. Pass a ``clock`` in :class:`RenderLimits` to test the time bound
without waiting.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import update_wrapper
from itertools import islice
from typing import Any

from jinja2 import Template, nodes, pass_context, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, new_context, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup

from membercare.errors import RenderError


class TemplateLimitError(RenderError, SecurityError):
    """A template went over one of the :class:`RenderLimits` (the message names the limit, never a value)."""


@dataclass(frozen=True)
class RenderLimits:
    """What one rendered part may cost. The defaults are orders of magnitude above any real message
    (a complete HTML email is well under 100 KB and renders in about 0.1 ms) and far below harm."""

    max_output: int = 1_000_000  # characters of one rendered part (also of one macro or {% set %} block)
    max_value: int = 1_000_000  # characters or items of any string, list or mapping a template builds
    max_int_bits: int = 4096  # numbers a template computes (about 1,200 digits)
    max_range: int = 10_000  # items of one range()
    max_steps: int = 100_000  # loop iterations plus calls per render
    max_seconds: float = 1.0  # wall time per render
    clock: Callable[[], float] = time.monotonic


DEFAULT_LIMITS = RenderLimits()


class _Budget:
    """What is left to one render: steps, time and (for :func:`render_bounded`) output.

    A step is a loop iteration or a call. Every 16 steps :meth:`check` reads the clock (the first
    time at step 16, where the deadline starts, so a short render never reads it) and measures the
    output printed since the last check; :func:`render_bounded` measures the whole output at the end.
    """

    __slots__ = ("limits", "steps", "deadline", "output", "seen", "size")

    def __init__(self, limits: RenderLimits, output: list[str] | None = None):
        self.limits = limits
        self.steps = limits.max_steps
        self.deadline: float | None = None
        self.output = output
        self.seen = self.size = 0

    def step(self) -> None:
        self.steps -= 1
        if not self.steps & 15:
            self.check()

    def check(self) -> None:
        limits = self.limits
        if self.steps < 0:
            raise TemplateLimitError(f"more than {limits.max_steps:,} loop iterations and calls in one "
                                     f"render is over the limit (max_steps)")
        out = self.output
        if out is not None and len(out) > self.seen:
            self.size += sum(map(len, out[self.seen:]))
            self.seen = len(out)
            if self.size > limits.max_output:
                raise _too_big("output", self.size, limits.max_output, "max_output", "characters")
        now = limits.clock()
        if self.deadline is None:
            self.deadline = now + limits.max_seconds
        elif now > self.deadline:
            raise TemplateLimitError(f"rendering for longer than {limits.max_seconds:g} s is over the "
                                     f"limit (max_seconds)")

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        step = self.step
        for item in iterable:
            step()
            yield item


class BoundedContext(Context):
    """A template context that carries its render's budget (``None``: sizes are checked, steps and
    time are not), also into the contexts derived from it."""

    budget: _Budget | None = None

    def derived(self, locals: dict[str, Any] | None = None) -> Context:
        ctx = super().derived(locals)
        ctx.budget = self.budget  # type: ignore[attr-defined]
        return ctx


def _limits_of(context: Any) -> RenderLimits:
    budget = getattr(context, "budget", None)
    return budget.limits if budget is not None else context.environment.limits


def render_bounded(template: Template, variables: dict, limits: RenderLimits = DEFAULT_LIMITS, *,
                   shared: bool = True) -> str:
    """Render ``template`` (of a :class:`BoundedEnvironment`) with ``variables`` within ``limits``.

    With ``shared`` (the renderer's hot path) ``variables`` is used as the context directly instead of
    being copied: it must hold the globals and be built fresh for each message. Errors go through
    Jinja's handler, so tracebacks point at template lines.

    The output is collected by C code and measured every 16 steps and before it is joined, so a render
    holds at most ``max_output`` plus what the template prints between two checks (each printed value
    is itself within ``max_value``); :meth:`BoundedTemplate.render` measures chunk by chunk instead.
    """
    out: list[str] = []
    ctx = new_context(template.environment, template.name, template.blocks, variables, shared=shared)
    work = getattr(template, "has_work", True)
    if work is None:  # first render of a BoundedTemplate: what its code generator found
        work = template.has_work = template.root_render_func.__globals__.get("has_work", True)  # type: ignore
    if work or limits is not template.environment.limits:  # type: ignore[attr-defined]
        ctx.budget = _Budget(limits, out)  # type: ignore[attr-defined]
    try:
        out.extend(template.root_render_func(ctx))
        total = sum(map(len, out))
        if total > limits.max_output:  # before joining: the chunks may be many references to one string
            raise _too_big("output", total, limits.max_output, "max_output", "characters")
        return "".join(out)
    except Exception:  # noqa: BLE001 - Jinja's own contract: handle_exception re-raises with template lines
        return template.environment.handle_exception()


def _join_bounded(parts: Iterable[str], limit: int) -> str:
    """``"".join(parts)``, refusing more than ``limit`` characters; a generator is refused before more
    than one chunk over the limit is in memory."""
    if type(parts) is list:
        total = sum(map(len, parts))
        if total > limit:
            raise _too_big("output", total, limit, "max_output", "characters")
        return "".join(parts)
    out: list[str] = []
    append = out.append
    total = 0
    for chunk in parts:
        total += len(chunk)
        if total > limit:
            raise _too_big("output", total, limit, "max_output", "characters")
        append(chunk)
    return "".join(out)


class BoundedTemplate(Template):
    """``render`` within the environment's limits, with its own budget.

    ``has_work``: whether the template has loops or calls (its code generator says); without them a
    render takes time in proportion to the template's size, and :func:`render_bounded` within the
    environment's own limits gives it no budget (its sizes are checked against those limits)."""

    has_work: bool | None = None

    def render(self, *args: Any, **kwargs: Any) -> str:
        limits = self.environment.limits  # type: ignore[attr-defined]
        ctx = self.new_context(dict(*args, **kwargs))
        ctx.budget = _Budget(limits)  # type: ignore[attr-defined]
        try:
            return _join_bounded(self.root_render_func(ctx), limits.max_output)
        except Exception:  # noqa: BLE001 - Jinja's own contract: handle_exception re-raises with template lines
            return self.environment.handle_exception()


# ------------------------------------------------------------------------------------------- checks


def _too_big(what: str, size: int, limit: int, name: str = "max_value", unit: str = "characters or items"
             ) -> TemplateLimitError:
    return TemplateLimitError(f"{what} of {size:,} {unit} is over the limit of {limit:,} ({name})")


_SIZED = (str, list, tuple, dict, set, frozenset, bytes)


def _check_value(lim: RenderLimits, value: Any) -> Any:
    """``value`` unchanged, or :class:`TemplateLimitError` if it is a string or collection over ``max_value``."""
    if isinstance(value, _SIZED) and len(value) > lim.max_value:
        raise _too_big("a value", len(value), lim.max_value)
    return value


def _check_size(lim: RenderLimits, what: str, size: int) -> None:
    if size > lim.max_value:
        raise _too_big(what, size, lim.max_value)


def _check_width(lim: RenderLimits, width: Any) -> None:
    if isinstance(width, int) and width > lim.max_value:
        raise TemplateLimitError(f"a width or count of {width:,} is over the limit of {lim.max_value:,} "
                                 f"(max_value)")


def _check_replace(lim: RenderLimits, s: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(s, (str, bytes)) and isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)):
        n = len(s) + 1 if not old else s.count(old)  # type: ignore[arg-type]  # (str, str) or (bytes, bytes)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_size(lim, "a replaced string", len(s) + n * max(0, len(new) - len(old)))


def _materialise(lim: RenderLimits, items: Any) -> Any:
    """``items`` as a sequence of at most ``max_value`` items (so that a join can be sized before it runs)."""
    if isinstance(items, (list, tuple, str)):
        return items
    out = list(islice(iter(items), lim.max_value + 1))
    if len(out) > lim.max_value:
        raise _too_big("a sequence", len(out), lim.max_value)
    return out


def _check_join(lim: RenderLimits, sep: Any, items: Any) -> None:
    n = len(items)
    _check_size(lim, "a sequence", n)
    _check_size(lim, "a joined string", sum(len(x) for x in items if isinstance(x, (str, bytes)))
                + len(sep) * max(0, n - 1))


def _spec_widths(lim: RenderLimits, spec: str) -> None:
    digits = ""
    for ch in spec + " ":
        if ch.isdigit():
            digits += ch
            continue
        if digits:
            if len(digits) > 9:
                raise TemplateLimitError(f"a format width of {len(digits)} digits is over the limit of "
                                         f"{lim.max_value:,} (max_value)")
            _check_width(lim, int(digits))
            digits = ""


def _check_format(lim: RenderLimits, fmt: Any) -> int:
    """``str.format`` specs: literal widths and precisions within ``max_value``, no computed ones.
    Returns the number of replacement fields."""
    if not isinstance(fmt, str) or "{" not in fmt:
        return 0
    fields = 0
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is not None:
            fields += 1
            if spec:
                if "{" in spec:
                    raise TemplateLimitError("a computed format width or precision ('{:{n}}') cannot be "
                                             "checked against the limits (max_value): write the number")
                _spec_widths(lim, spec)
    return fields


def _largest_text(values: Iterable[Any]) -> int:
    """The longest ``str()`` of ``values`` (what one formatting field can print at most)."""
    return max((len(v) if isinstance(v, str) else len(str(v)) for v in values), default=0)


def _check_printf(lim: RenderLimits, fmt: Any, args: Any) -> None:
    """``%`` formatting: widths and precisions (``%*d`` included) within ``max_value``, and the result
    estimated (conversions x the longest value) before it is built."""
    if not isinstance(fmt, str) or "%" not in fmt:
        return
    values = args if isinstance(args, tuple) else (args,)
    fields = fmt.count("%")
    if fields > 1:
        longest = _largest_text(values[0].values() if len(values) == 1 and isinstance(values[0], dict) else values)
        _check_size(lim, "a formatted string", len(fmt) + fields * longest)
    i, pos, n = 0, 0, len(fmt)
    while True:
        pos = fmt.find("%", pos)
        if pos < 0 or pos + 1 >= n:
            return
        pos += 1
        if fmt[pos] == "%":
            pos += 1
            continue
        if fmt[pos] == "(":  # mapping key: no '*' possible
            pos = fmt.find(")", pos) + 1 or n
        while pos < n and fmt[pos] in "#0- +":
            pos += 1
        for _ in range(2):  # width, then precision
            if pos < n and fmt[pos] == "*":
                _check_width(lim, values[i] if i < len(values) else 0)
                i, pos = i + 1, pos + 1
            else:
                start = pos
                while pos < n and fmt[pos].isdigit():
                    pos += 1
                if pos > start:
                    _spec_widths(lim, fmt[start:pos])
            if pos < n and fmt[pos] == ".":
                pos += 1
            else:
                break
        i += 1


def _precheck_str_method(lim: RenderLimits, s: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse a string method call whose result would be over the limit; returns the (maybe listed) args."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_width(lim, args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            tabs = s.count("\t" if isinstance(s, str) else b"\t")  # type: ignore[arg-type]
            _check_size(lim, "an expanded string", len(s) + tabs * tab)
    elif name == "replace" and len(args) >= 2:
        _check_replace(lim, s, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "join" and args:
        items = _materialise(lim, args[0])
        _check_join(lim, s, items)
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        widest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _check_size(lim, "a translated string", len(s) * max(widest, 1))
    return args


_BUILTIN_METHOD = type("".join)  # 'x'.center
_METHOD = type(Markup("").join)  # Markup('x').center (a markup string from |safe, macros, {% set %} blocks)


def _precheck_call(lim: RenderLimits, obj: Any, args: tuple, kwargs: dict) -> tuple:
    owner = obj.__self__
    if isinstance(owner, (str, bytes)):
        return _precheck_str_method(lim, owner, obj.__name__, args, kwargs)
    return args


@pass_context
def bounded_lipsum(context: Any, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """``lipsum`` (placeholder text) for templates: at most ``max_value`` characters' worth of words."""
    if isinstance(n, int) and isinstance(max, int):
        _check_size(_limits_of(context), "placeholder text", n * max * 2)
    return generate_lorem_ipsum(n, html, min, max)


@pass_context
def bounded_range(context: Any, *args: int) -> range:
    """``range`` for templates: at most ``max_range`` items."""
    rng = range(*args)
    limit = _limits_of(context).max_range
    if len(rng) > limit:
        raise _too_big("range()", len(rng), limit, "max_range", "items")
    return rng


# ----------------------------------------------------------------------------------------- filters


def _pre_center(lim, a, kw):
    _check_width(lim, a[1] if len(a) > 1 else kw.get("width"))


def _pre_indent(lim, a, kw):
    s = a[0]
    width = a[1] if len(a) > 1 else kw.get("width", 4)
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if isinstance(s, str):
        _check_size(lim, "an indented string", len(s) + (s.count("\n") + 1) * pad)


def _pre_format(lim, a, kw):
    _check_printf(lim, a[0], kw or tuple(a[1:]))


def _pre_replace(lim, a, kw):
    if len(a) > 2:
        _check_replace(lim, str(a[0]), a[1], a[2], a[3] if len(a) > 3 else kw.get("count", -1))


def _pre_join(lim, a, kw):
    items = _materialise(lim, a[0])
    _check_join(lim, str(a[1]) if len(a) > 1 else str(kw.get("d", "")), items)
    return (items, *a[1:])


def _pre_batch(lim, a, kw):
    if (a[2] if len(a) > 2 else kw.get("fill_with")) is not None:
        _check_width(lim, a[1] if len(a) > 1 else kw.get("linecount"))


def _pre_slice(lim, a, kw):
    _check_width(lim, a[1] if len(a) > 1 else kw.get("slices"))


def _pre_sum(lim, a, kw):
    start = a[2] if len(a) > 2 else kw.get("start", 0)
    if not isinstance(start, (int, float)):
        raise TemplateLimitError("sum() of strings or lists cannot be bounded (its cost is quadratic): use join")


def _pre_wordwrap(lim, a, kw):
    s, wrap = a[0], a[3] if len(a) > 3 else kw.get("wrapstring")
    width = a[1] if len(a) > 1 else kw.get("width", 79)
    if isinstance(s, str) and isinstance(wrap, str) and isinstance(width, int):
        _check_size(lim, "a wrapped string", len(s) + (len(s) // max(width, 1) + s.count("\n") + 1) * len(wrap))


# Checks before a filter runs, given its arguments from the value on (without Jinja's context argument).
_FILTER_PRECHECKS: dict[str, Callable] = {
    "center": _pre_center, "indent": _pre_indent, "format": _pre_format, "replace": _pre_replace,
    "join": _pre_join, "batch": _pre_batch, "slice": _pre_slice, "sum": _pre_sum, "wordwrap": _pre_wordwrap,
}
# Filters whose result can be larger than their input (escaping, serialising, listing): checked after.
_GROWING_FILTERS = frozenset({"e", "escape", "forceescape", "urlencode", "tojson", "xmlattr", "pprint", "string",
                              "list", "upper", "lower", "title", "capitalize", "wordwrap", "center", "indent",
                              "format", "replace", "join", "batch", "slice", "sum", "truncate"})

_CONTEXT_ARG = pass_context(lambda: None).jinja_pass_arg  # type: ignore[attr-defined]
_EVAL_CONTEXT_ARG = pass_eval_context(lambda: None).jinja_pass_arg  # type: ignore[attr-defined]
_ENVIRONMENT_ARG = pass_environment(lambda: None).jinja_pass_arg  # type: ignore[attr-defined]


def _bounded_filter(name: str, f: Callable) -> Callable:
    """``f`` with its size checks; it takes the context (for the render's limits) and hands ``f`` what it
    asked for (context, eval context or environment)."""
    pre, wants = _FILTER_PRECHECKS.get(name), getattr(f, "jinja_pass_arg", None)

    def bounded(context: Any, *args: Any, **kwargs: Any) -> Any:
        lim = _limits_of(context)
        if pre is not None:
            args = pre(lim, args, kwargs) or args
        if wants is _CONTEXT_ARG:
            rv = f(context, *args, **kwargs)
        elif wants is _EVAL_CONTEXT_ARG:
            rv = f(context.eval_ctx, *args, **kwargs)
        elif wants is _ENVIRONMENT_ARG:
            rv = f(context.environment, *args, **kwargs)
        else:
            rv = f(*args, **kwargs)
        return _check_value(lim, rv)

    update_wrapper(bounded, f)
    return pass_context(bounded)


# ------------------------------------------------------------------------------------- environment

_LOOP_FILTER = "_bounded_loop"
_SMALL_LOOP = 16
_SEQUENCES = frozenset({list, tuple, dict, str})


@pass_context  # never folded at compile time: every run's loops are counted
def _bounded_loop(context: Any, iterable: Any) -> Any:
    """A loop's iterable, each item a step of the render's budget. A list, tuple, dict or string of at
    most 16 items is charged in advance and iterated as it is (as cheap as an unchecked loop; no more
    items pass than between two of the budget's checks anyway)."""
    budget = context.budget
    if budget is None:
        return iterable
    if type(iterable) in _SEQUENCES and len(iterable) <= _SMALL_LOOP:
        before = budget.steps
        budget.steps = before - len(iterable)
        if before >> 4 != budget.steps >> 4:  # passed a multiple of 16, where check() is due
            budget.check()
        return iterable
    return budget.iterate(iterable)


class _BoundedCodeGenerator(CodeGenerator):
    """Counts every loop iteration (each ``for`` iterable passes through the ``_bounded_loop`` filter)
    and sizes every ``~`` concatenation before it is joined."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        loops = list(node.find_all(nodes.For))
        for loop in loops:
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
        has_work = bool(loops) or node.find(nodes.Call) is not None
        super().visit_Template(node, frame)
        self.writeline(f"has_work = {has_work!r}")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # Jinja's own, with the join going through environment.checked_join (sized before joining).
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.checked_join(context, {func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox within :class:`RenderLimits` (see the module docstring). ``limits``
    applies to renders that do not bring their own (:func:`render_bounded` does) and to the output of
    macros and ``{% set %}`` blocks."""

    code_generator_class = _BoundedCodeGenerator
    template_class = BoundedTemplate
    context_class = BoundedContext
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, *args: Any, limits: RenderLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.globals["range"] = bounded_range
        self.globals["lipsum"] = bounded_lipsum
        self.filters = {name: _bounded_filter(name, f) if name in _GROWING_FILTERS else f
                        for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = _bounded_loop

    def checked_join(self, context: Any, join: Callable[[tuple], str], parts: tuple) -> str:
        """A ``~`` concatenation, refused before joining when its strings add up to over ``max_value``
        (the other operands are small once converted, or checked after)."""
        budget = context.budget
        limit = (budget.limits if budget is not None else self.limits).max_value
        total = 0
        for part in parts:
            if isinstance(part, str):
                total += len(part)
        if total > limit:
            raise _too_big("a concatenated string", total, limit)
        text = "".join(map(str, parts)) if join is str_join else join(parts)
        if len(text) > limit:
            raise _too_big("a concatenated string", len(text), limit)
        return text

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's ``str.format`` / ``format_map``, refused at access when a width or precision in
        the format string is over ``max_value`` or computed (checked against the environment's limits)."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        limits, fmt = self.limits, value.__self__
        fields = _check_format(limits, fmt)

        def bounded(*args: Any, **kwargs: Any) -> str:
            if fields > 1:
                if value.__name__ == "format_map":
                    values = args[0].values() if args and isinstance(args[0], dict) else ()
                else:
                    values = (*args, *kwargs.values())
                _check_size(limits, "a formatted string", len(fmt) + fields * _largest_text(values))
            return _check_value(limits, wrapper(*args, **kwargs))

        return update_wrapper(bounded, wrapper)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        lim = _limits_of(context)
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                _check_bits(lim, abs(left).bit_length() + abs(right).bit_length())
            elif isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
                _check_size(lim, "a repeated string or list", len(left) * max(right, 0))
            elif isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
                _check_size(lim, "a repeated string or list", len(right) * max(left, 0))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _check_bits(lim, (abs(left).bit_length() - 1) * right)
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                _check_size(lim, "a concatenated string or list", len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_printf(lim, left, right)
        return _check_value(lim, self.binop_table[operator](left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # SandboxedEnvironment.call inlined (this runs for every call in every template): a step of the
        # budget, the size checks before and after, and the sandbox's own safety check.
        budget = __context.budget
        if budget is not None:
            budget.steps -= 1
            if not budget.steps & 15:
                budget.check()
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        kind = type(__obj)
        if kind is not _BUILTIN_METHOD and kind is not _METHOD:
            # Helpers, macros and Jinja's globals: their results are bounded by their inputs, by the
            # output limit of macros, or by their own checks (range, lipsum).
            return __context.call(__obj, *args, **kwargs)
        lim = budget.limits if budget is not None else __self.limits
        args = _precheck_call(lim, __obj, args, kwargs)
        rv = __context.call(__obj, *args, **kwargs)
        if isinstance(rv, _SIZED) and len(rv) > lim.max_value:
            raise _too_big("a value", len(rv), lim.max_value)
        return rv

    def concat(self, parts: Iterable[str]) -> str:
        """Join a macro's or a block's output (and :meth:`BoundedTemplate.render`'s), within ``max_output``."""
        return _join_bounded(parts, self.limits.max_output)


def _check_bits(lim: RenderLimits, bits: int) -> None:
    if bits > lim.max_int_bits:
        raise TemplateLimitError(f"a number of about {bits:,} bits is over the limit of {lim.max_int_bits:,} "
                                 f"(max_int_bits)")
