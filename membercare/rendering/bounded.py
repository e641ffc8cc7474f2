"""The bounded Jinja environment: :class:`BoundedEnvironment` (Jinja's immutable sandbox plus the checks of
:mod:`membercare.rendering.sizes`), its template and context classes that carry a render's
:class:`~membercare.rendering.limits.Budget`, and :func:`render_bounded`, the renderer's path.

What is bounded and why: :mod:`membercare.rendering.limits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import update_wrapper
from typing import Any

from jinja2 import Template, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, new_context, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from membercare.rendering.limits import DEFAULT_LIMITS, Budget, RenderLimits, limits_of, too_big
from membercare.rendering.sizes import (
    GROWING_FILTERS,
    SIZED,
    bounded_filter,
    bounded_lipsum,
    bounded_range,
    check_bits,
    check_format,
    check_printf,
    check_size,
    check_value,
    largest_text,
    precheck_call,
)


class BoundedContext(Context):
    """A template context that carries its render's budget (``None``: sizes are checked, steps and
    time are not), also into the contexts derived from it."""

    budget: Budget | None = None

    def derived(self, locals: dict[str, Any] | None = None) -> Context:
        ctx = super().derived(locals)
        ctx.budget = self.budget  # type: ignore[attr-defined]
        return ctx



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
        ctx.budget = Budget(limits, out)  # type: ignore[attr-defined]
    try:
        out.extend(template.root_render_func(ctx))
        total = sum(map(len, out))
        if total > limits.max_output:  # before joining: the chunks may be many references to one string
            raise too_big("output", total, limits.max_output, "max_output", "characters")
        return "".join(out)
    except Exception:  # noqa: BLE001 - Jinja's own contract: handle_exception re-raises with template lines
        return template.environment.handle_exception()


def _join_bounded(parts: Iterable[str], limit: int) -> str:
    """``"".join(parts)``, refusing more than ``limit`` characters; a generator is refused before more
    than one chunk over the limit is in memory."""
    if type(parts) is list:
        total = sum(map(len, parts))
        if total > limit:
            raise too_big("output", total, limit, "max_output", "characters")
        return "".join(parts)
    out: list[str] = []
    append = out.append
    total = 0
    for chunk in parts:
        total += len(chunk)
        if total > limit:
            raise too_big("output", total, limit, "max_output", "characters")
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
        ctx.budget = Budget(limits)  # type: ignore[attr-defined]
        try:
            return _join_bounded(self.root_render_func(ctx), limits.max_output)
        except Exception:  # noqa: BLE001 - Jinja's own contract: handle_exception re-raises with template lines
            return self.environment.handle_exception()



# ------------------------------------------------------------------------------------- environment

_BUILTIN_METHOD = type("".join)  # 'x'.center
_METHOD = type(Markup("").join)  # Markup('x').center (a markup string from |safe, macros, {% set %} blocks)
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


_DICT_ATTRIBUTES = frozenset(dir(dict))


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
        self.filters = {name: bounded_filter(name, f) if name in GROWING_FILTERS else f
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
            raise too_big("a concatenated string", total, limit)
        text = "".join(map(str, parts)) if join is str_join else join(parts)
        if len(text) > limit:
            raise too_big("a concatenated string", len(text), limit)
        return text

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's ``str.format`` / ``format_map``, refused at access when a width or precision in
        the format string is over ``max_value`` or computed (checked against the environment's limits)."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        limits, fmt = self.limits, value.__self__
        fields = check_format(limits, fmt)

        def bounded(*args: Any, **kwargs: Any) -> str:
            if fields > 1:
                if value.__name__ == "format_map":
                    values = args[0].values() if args and isinstance(args[0], dict) else ()
                else:
                    values = (*args, *kwargs.values())
                check_size(limits, "a formatted string", len(fmt) + fields * largest_text(values))
            return check_value(limits, wrapper(*args, **kwargs))

        return update_wrapper(bounded, wrapper)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        lim = limits_of(context)
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                check_bits(lim, abs(left).bit_length() + abs(right).bit_length())
            elif isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
                check_size(lim, "a repeated string or list", len(left) * max(right, 0))
            elif isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
                check_size(lim, "a repeated string or list", len(right) * max(left, 0))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                check_bits(lim, (abs(left).bit_length() - 1) * right)
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                check_size(lim, "a concatenated string or list", len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            check_printf(lim, left, right)
        return check_value(lim, self.binop_table[operator](left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        # ``member.name`` on a context dict, the commonest lookup of every template: the sandbox first tries
        # getattr(), whose AttributeError costs more than the lookup itself. A dict instance has no other
        # attributes than its type's, so for a name that is not one of those the result is the same.
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # SandboxedEnvironment.call inlined (this runs for every call in every template): a step of the
        # budget, the size checks before and after, and the sandbox's own safety check. Positional-only, as
        # Jinja's ``__self, __context, __obj``, so that a template may pass keyword arguments of those names.
        # ``context`` is a BoundedContext, but Jinja's signature (which an override may not narrow) says Context.
        budget = context.budget
        if budget is not None:
            budget.steps -= 1
            if not budget.steps & 15:
                budget.check()
        if not self.is_safe_callable(obj):
            raise SecurityError(f"{obj!r} is not safely callable")
        kind = type(obj)
        if kind is not _BUILTIN_METHOD and kind is not _METHOD:
            # Helpers, macros and Jinja's globals: their results are bounded by their inputs, by the
            # output limit of macros, or by their own checks (range, lipsum).
            return context.call(obj, *args, **kwargs)
        lim = budget.limits if budget is not None else self.limits
        args = precheck_call(lim, obj, args, kwargs)
        rv = context.call(obj, *args, **kwargs)
        if isinstance(rv, SIZED) and len(rv) > lim.max_value:
            raise too_big("a value", len(rv), lim.max_value)
        return rv

    def concat(self, parts: Iterable[str]) -> str:
        """Join a macro's or a block's output (and :meth:`BoundedTemplate.render`'s), within ``max_output``."""
        return _join_bounded(parts, self.limits.max_output)

