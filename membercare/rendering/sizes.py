"""Size checks of :mod:`membercare.rendering.limits`: each refuses a value, an operation or a filter call whose
result would be over :attr:`~membercare.rendering.limits.RenderLimits.max_value` (or ``max_int_bits``,
``max_range``) *before* computing it, from the sizes of its operands; the templates' ``range`` and ``lipsum``,
and the wrapper that gives Jinja's filters these checks."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from functools import update_wrapper
from itertools import islice
from typing import Any

from jinja2 import pass_context, pass_environment, pass_eval_context
from jinja2.utils import generate_lorem_ipsum

from membercare.rendering.limits import RenderLimits, TemplateLimitError, limits_of, too_big

SIZED = (str, list, tuple, dict, set, frozenset, bytes)


def check_value(lim: RenderLimits, value: Any) -> Any:
    """``value`` unchanged, or :class:`TemplateLimitError` if it is a string or collection over ``max_value``."""
    if isinstance(value, SIZED) and len(value) > lim.max_value:
        raise too_big("a value", len(value), lim.max_value)
    return value


def check_size(lim: RenderLimits, what: str, size: int) -> None:
    if size > lim.max_value:
        raise too_big(what, size, lim.max_value)


def check_width(lim: RenderLimits, width: Any) -> None:
    if isinstance(width, int) and width > lim.max_value:
        raise TemplateLimitError(f"a width or count of {width:,} is over the limit of {lim.max_value:,} "
                                 f"(max_value)")


def _check_replace(lim: RenderLimits, s: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(s, (str, bytes)) and isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)):
        n = len(s) + 1 if not old else s.count(old)  # type: ignore[arg-type]  # (str, str) or (bytes, bytes)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        check_size(lim, "a replaced string", len(s) + n * max(0, len(new) - len(old)))


def _materialise(lim: RenderLimits, items: Any) -> Any:
    """``items`` as a sequence of at most ``max_value`` items (so that a join can be sized before it runs)."""
    if isinstance(items, (list, tuple, str)):
        return items
    out = list(islice(iter(items), lim.max_value + 1))
    if len(out) > lim.max_value:
        raise too_big("a sequence", len(out), lim.max_value)
    return out


def _check_join(lim: RenderLimits, sep: Any, items: Any) -> None:
    n = len(items)
    check_size(lim, "a sequence", n)
    check_size(lim, "a joined string", sum(len(x) for x in items if isinstance(x, (str, bytes)))
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
            check_width(lim, int(digits))
            digits = ""


def check_format(lim: RenderLimits, fmt: Any) -> int:
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


def largest_text(values: Iterable[Any]) -> int:
    """The longest ``str()`` of ``values`` (what one formatting field can print at most)."""
    return max((len(v) if isinstance(v, str) else len(str(v)) for v in values), default=0)


def check_printf(lim: RenderLimits, fmt: Any, args: Any) -> None:
    """``%`` formatting: widths and precisions (``%*d`` included) within ``max_value``, and the result
    estimated (conversions x the longest value) before it is built."""
    if not isinstance(fmt, str) or "%" not in fmt:
        return
    values = args if isinstance(args, tuple) else (args,)
    fields = fmt.count("%")
    if fields > 1:
        longest = largest_text(values[0].values() if len(values) == 1 and isinstance(values[0], dict) else values)
        check_size(lim, "a formatted string", len(fmt) + fields * longest)
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
                check_width(lim, values[i] if i < len(values) else 0)
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
        check_width(lim, args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            tabs = s.count("\t" if isinstance(s, str) else b"\t")  # type: ignore[arg-type]
            check_size(lim, "an expanded string", len(s) + tabs * tab)
    elif name == "replace" and len(args) >= 2:
        _check_replace(lim, s, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "join" and args:
        items = _materialise(lim, args[0])
        _check_join(lim, s, items)
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        widest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        check_size(lim, "a translated string", len(s) * max(widest, 1))
    return args


def precheck_call(lim: RenderLimits, obj: Any, args: tuple, kwargs: dict) -> tuple:
    owner = obj.__self__
    if isinstance(owner, (str, bytes)):
        return _precheck_str_method(lim, owner, obj.__name__, args, kwargs)
    return args


@pass_context
def bounded_lipsum(context: Any, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """``lipsum`` (placeholder text) for templates: at most ``max_value`` characters' worth of words."""
    if isinstance(n, int) and isinstance(max, int):
        check_size(limits_of(context), "placeholder text", n * max * 2)
    return generate_lorem_ipsum(n, html, min, max)


@pass_context
def bounded_range(context: Any, *args: int) -> range:
    """``range`` for templates: at most ``max_range`` items."""
    rng = range(*args)
    limit = limits_of(context).max_range
    if len(rng) > limit:
        raise too_big("range()", len(rng), limit, "max_range", "items")
    return rng


# ----------------------------------------------------------------------------------------- filters


def _pre_center(lim: RenderLimits, a: tuple, kw: dict) -> None:
    check_width(lim, a[1] if len(a) > 1 else kw.get("width"))


def _pre_indent(lim: RenderLimits, a: tuple, kw: dict) -> None:
    s = a[0]
    width = a[1] if len(a) > 1 else kw.get("width", 4)
    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if isinstance(s, str):
        check_size(lim, "an indented string", len(s) + (s.count("\n") + 1) * pad)


def _pre_format(lim: RenderLimits, a: tuple, kw: dict) -> None:
    check_printf(lim, a[0], kw or tuple(a[1:]))


def _pre_replace(lim: RenderLimits, a: tuple, kw: dict) -> None:
    if len(a) > 2:
        _check_replace(lim, str(a[0]), a[1], a[2], a[3] if len(a) > 3 else kw.get("count", -1))


def _pre_join(lim: RenderLimits, a: tuple, kw: dict) -> tuple:
    items = _materialise(lim, a[0])
    _check_join(lim, str(a[1]) if len(a) > 1 else str(kw.get("d", "")), items)
    return (items, *a[1:])


def _pre_batch(lim: RenderLimits, a: tuple, kw: dict) -> None:
    if (a[2] if len(a) > 2 else kw.get("fill_with")) is not None:
        check_width(lim, a[1] if len(a) > 1 else kw.get("linecount"))


def _pre_slice(lim: RenderLimits, a: tuple, kw: dict) -> None:
    check_width(lim, a[1] if len(a) > 1 else kw.get("slices"))


def _pre_sum(lim: RenderLimits, a: tuple, kw: dict) -> None:
    start = a[2] if len(a) > 2 else kw.get("start", 0)
    if not isinstance(start, (int, float)):
        raise TemplateLimitError("sum() of strings or lists cannot be bounded (its cost is quadratic): use join")


def _pre_wordwrap(lim: RenderLimits, a: tuple, kw: dict) -> None:
    s, wrap = a[0], a[3] if len(a) > 3 else kw.get("wrapstring")
    width = a[1] if len(a) > 1 else kw.get("width", 79)
    if isinstance(s, str) and isinstance(wrap, str) and isinstance(width, int):
        check_size(lim, "a wrapped string", len(s) + (len(s) // max(width, 1) + s.count("\n") + 1) * len(wrap))


# Checks before a filter runs, given its arguments from the value on (without Jinja's context argument); a check
# that returns arguments (join: a listed iterable) hands those to the filter instead.
_FILTER_PRECHECKS: dict[str, Callable[[RenderLimits, tuple, dict], tuple | None]] = {
    "center": _pre_center, "indent": _pre_indent, "format": _pre_format, "replace": _pre_replace,
    "join": _pre_join, "batch": _pre_batch, "slice": _pre_slice, "sum": _pre_sum, "wordwrap": _pre_wordwrap,
}
# Filters whose result can be larger than their input (escaping, serialising, listing): checked after.
GROWING_FILTERS = frozenset({"e", "escape", "forceescape", "urlencode", "tojson", "xmlattr", "pprint", "string",
                              "list", "upper", "lower", "title", "capitalize", "wordwrap", "center", "indent",
                              "format", "replace", "join", "batch", "slice", "sum", "truncate"})

_CONTEXT_ARG = pass_context(lambda: None).jinja_pass_arg  # type: ignore[attr-defined]
_EVAL_CONTEXT_ARG = pass_eval_context(lambda: None).jinja_pass_arg  # type: ignore[attr-defined]
_ENVIRONMENT_ARG = pass_environment(lambda: None).jinja_pass_arg  # type: ignore[attr-defined]


def bounded_filter(name: str, f: Callable) -> Callable:
    """``f`` with its size checks; it takes the context (for the render's limits) and hands ``f`` what it
    asked for (context, eval context or environment)."""
    pre, wants = _FILTER_PRECHECKS.get(name), getattr(f, "jinja_pass_arg", None)

    def bounded(context: Any, *args: Any, **kwargs: Any) -> Any:
        lim = limits_of(context)
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
        return check_value(lim, rv)

    update_wrapper(bounded, f)
    return pass_context(bounded)



def check_bits(lim: RenderLimits, bits: int) -> None:
    if bits > lim.max_int_bits:
        raise TemplateLimitError(f"a number of about {bits:,} bits is over the limit of {lim.max_int_bits:,} "
                                 f"(max_int_bits)")
