"""Bounds on what one template render may cost: memory (value and output sizes) and time (steps, seconds).

Templates are edited by marketers and rendered once per member, so a template must not be able to
take the process down: ``{{ 'a' * 10**9 }}`` would allocate a gigabyte and nested loops could run
for hours. :class:`~membercare.rendering.bounded.BoundedEnvironment` is Jinja's immutable sandbox plus these
checks (the size checks are in :mod:`membercare.rendering.sizes`):

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

Steps, time and output are counted per render (a :class:`Budget`): ``render_bounded`` (the renderer's path)
and ``BoundedTemplate.render`` (both in :mod:`membercare.rendering.bounded`) give the render's context one;
Jinja's ``generate``/``stream`` run without one (the size checks still apply). The budget travels on the
context, so the hot path reads no thread-local state. Pass a ``clock`` in :class:`RenderLimits` to test the
time bound without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import SecurityError

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


class Budget:
    """What is left to one render: steps, time and (for :func:`~membercare.rendering.bounded.render_bounded`) output.

    A step is a loop iteration or a call. Every 16 steps :meth:`check` reads the clock (the first
    time at step 16, where the deadline starts, so a short render never reads it) and measures the
    output printed since the last check; ``render_bounded`` measures the whole output at the end.
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
                raise too_big("output", self.size, limits.max_output, "max_output", "characters")
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


def too_big(what: str, size: int, limit: int, name: str = "max_value", unit: str = "characters or items"
            ) -> TemplateLimitError:
    """The error for ``what`` of ``size`` over ``limit`` (the setting ``name``): sizes only, never a value."""
    return TemplateLimitError(f"{what} of {size:,} {unit} is over the limit of {limit:,} ({name})")


def limits_of(context: Any) -> RenderLimits:
    """The limits a template context renders within: its budget's, else its environment's."""
    budget = getattr(context, "budget", None)
    return budget.limits if budget is not None else context.environment.limits

