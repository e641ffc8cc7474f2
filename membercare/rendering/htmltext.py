"""Jinja-aware HTML preparation, done once per template at compile time.

Two jobs, both on the *template source* rather than on each rendered message:

* :func:`inline_css`: move the CSS of ``<style>`` blocks into ``style`` attributes (mail clients such
  as Gmail and Outlook ignore or mangle ``<style>``), keeping ``@media`` rules for responsive
  layouts. css-inline parses HTML, which would mangle Jinja syntax, so Jinja tags are first swapped
  for inert placeholders: an HTML comment for a statement between elements (comments survive
  anywhere, even between table rows, where text would be moved out of the table by the HTML
  parser), and a plain ``@@mcjN@@`` token for expressions and for anything inside a tag. The
  placeholders are swapped back afterwards, so Jinja compiles an already-inlined document and each
  message costs only the Jinja render.
* :func:`html_to_text_template`: derive a plain-text *template* from an HTML template (links become
  ``label: URL``, list items ``- item``, blocks separate lines) for the ``text/plain`` part of an
  email, when no ``email_text`` file is given.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import css_inline

from membercare.errors import RenderError

_RAW = r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}"
_JINJA = re.compile(rf"{_RAW}|\{{\{{.*?\}}\}}|\{{%.*?%\}}|\{{#.*?#\}}", re.S)
_TOKEN = re.compile(r"<!--mcj(\d+)-->|@@mcj(\d+)@@")


class InlineError(RenderError, ValueError):
    """The template cannot be CSS-inlined without changing its Jinja structure."""


def protect(source: str) -> tuple[str, list[str]]:
    """Replace Jinja syntax by placeholders; returns the HTML and the original snippets by index."""
    out: list[str] = []
    snippets: list[str] = []
    pos = 0
    in_tag = False  # are we between "<" and ">" of a tag (Jinja text itself excluded)?
    for m in _JINJA.finditer(source):
        chunk = source[pos : m.start()]
        out.append(chunk)
        if "<" in chunk or ">" in chunk:
            in_tag = chunk.rfind("<") > chunk.rfind(">")
        pos = m.end()
        text = m.group(0)
        if text.startswith("{#"):
            continue  # comments vanish, as Jinja would make them
        i = len(snippets)
        snippets.append(text)
        if text.startswith("{%") and not in_tag:
            out.append(f"<!--mcj{i}-->")
        else:
            out.append(f"@@mcj{i}@@")
    out.append(source[pos:])
    return "".join(out), snippets


def restore(html: str, snippets: list[str]) -> str:
    seen: list[int] = []

    def sub(m: re.Match) -> str:
        i = int(m.group(1) or m.group(2))
        seen.append(i)
        return snippets[i]

    result = _TOKEN.sub(sub, html)
    if sorted(seen) != list(range(len(snippets))):
        lost = sorted(set(range(len(snippets))) - set(seen))
        what = ", ".join(repr(snippets[i]) for i in lost[:3]) or "a tag was duplicated"
        raise InlineError(f"CSS inlining moved or dropped Jinja syntax ({what}); keep Jinja tags inside elements")
    return result


_INLINER = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)


def inline_css(source: str) -> str:
    """Inline the ``<style>`` CSS of a Jinja HTML template, keeping its Jinja syntax intact."""
    for style in re.finditer(r"<style\b.*?</style>", source, re.S | re.I):
        if _JINJA.search(style.group(0)):
            raise InlineError("Jinja syntax inside <style> cannot be inlined; use fixed CSS")
    html, snippets = protect(source)
    return restore(_INLINER.inline(html), snippets)


def inline_rendered(html: str) -> str:
    """Inline an already rendered document (used to verify :func:`inline_css` and by the benchmark)."""
    return _INLINER.inline(html)


_BLOCK = {"p", "div", "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "section", "header",
          "footer", "blockquote", "center", "hr"}
_SKIP = {"style", "script", "head", "title"}


class _TextBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self._skip_tag = ""
        self.row_cells = 0
        self.links: list[tuple[str, int]] = []  # (href, index in out where the label starts)

    def _nl(self, n: int = 1) -> None:
        self.out.append("\n" * n)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        hidden = "display:none" in (a.get("style") or "").replace(" ", "") or "preheader" in (a.get("class") or "")
        if self.skip:
            if tag == self._skip_tag:
                self.skip += 1
            return
        if tag in _SKIP or hidden:
            self.skip, self._skip_tag = 1, tag
            return
        if tag == "tr":
            self.row_cells = 0
        elif tag in ("td", "th"):
            # Cells of one row stay on one line, separated so that "name" and "price" do not run together.
            if self.row_cells:
                self.out.append(" — ")
            self.row_cells += 1
        if tag == "br":
            self._nl()
        elif tag == "li":
            self._nl()
            self.out.append("- ")
        elif tag in _BLOCK:
            self._nl(2 if tag in {"p", "h1", "h2", "h3", "table", "ul", "ol", "hr"} else 1)
        elif tag == "a" and a.get("href"):
            self.links.append((a["href"], len(self.out)))

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self._skip_tag:
                self.skip -= 1
            return
        if tag == "a" and self.links:
            href, start = self.links.pop()
            label = "".join(self.out[start:]).strip()
            if href.startswith("mailto:") or href == label:
                return
            self.out.append(f": {href}" if label else href)
        elif tag in _BLOCK:
            self._nl(2 if tag in {"p", "h1", "h2", "h3", "table", "ul", "ol"} else 1)

    def handle_data(self, data):
        if not self.skip:
            self.out.append(re.sub(r"[ \t\r\n]+", " ", data))

    def handle_comment(self, data):
        if not self.skip and data.startswith("mcj"):
            self.out.append(f"<!--{data}-->")


def html_to_text_template(source: str) -> str:
    """A plain-text Jinja template derived from an HTML Jinja template (compile time, once)."""
    html, snippets = protect(source)
    b = _TextBuilder()
    b.feed(html)
    b.close()
    text = "".join(b.out)
    lines = [re.sub(r" {2,}", " ", line).strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    # Restore Jinja; statements get their own whitespace control so they leave no blank lines.
    return _TOKEN.sub(lambda m: snippets[int(m.group(1) or m.group(2))], text)
