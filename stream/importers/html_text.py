"""Conversion of Stack Exchange post bodies (rendered HTML) to readable plain text.

Rules:
- tags are dropped and their text kept, including the text of code blocks;
- character references are unescaped (`&lt;` becomes `<`);
- block elements (paragraphs, headings, quotes, lists, code blocks, rules) are separated
  by a blank line, or by a line break inside a list, and `<br>` breaks the line;
- list items start on their own line with "- " (unordered) or "1. ", "2. " and so on
  (ordered, counting from 1 whatever `start` says);
- outside `<pre>`, runs of whitespace become one space; inside `<pre>`, line breaks and
  indentation are kept, trailing spaces on each line are removed;
- images and other elements without text contribute nothing.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK_TAGS = frozenset(
    {"p", "div", "pre", "blockquote", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "tr"}
)
_WHITESPACE = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_text(markup: str) -> str:
    """Return the readable text of an HTML fragment, following the module's rules."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return parser.text()


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._pending_newlines = 0
        self._pending_prefix = ""
        self._pre_depth = 0
        # One entry per open list: the last item number of an <ol>, None for a <ul>.
        self._lists: list[int | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._request_newlines(1)
        elif tag == "li":
            self._request_newlines(1)
            self._pending_prefix = self._next_item_marker()
        elif tag in _BLOCK_TAGS and not self._pending_prefix:
            # A paragraph opening a list item stays on the item's marker line.
            self._request_newlines(self._block_gap())
        if tag == "pre":
            self._pre_depth += 1
        elif tag in ("ol", "ul"):
            self._lists.append(0 if tag == "ol" else None)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._pre_depth > 0:
            self._pre_depth -= 1
        elif tag in ("ol", "ul") and self._lists:
            self._lists.pop()
        if tag in _BLOCK_TAGS:
            self._request_newlines(self._block_gap())
        elif tag == "li":
            self._request_newlines(1)

    def handle_data(self, data: str) -> None:
        if self._pre_depth > 0:
            self._append(data)
            return
        collapsed = _WHITESPACE.sub(" ", data)
        if self._at_line_start():
            collapsed = collapsed.lstrip(" ")
        if collapsed:
            self._append(collapsed)

    def text(self) -> str:
        lines = "".join(self._parts).split("\n")
        joined = "\n".join(line.rstrip() for line in lines)
        return _BLANK_LINES.sub("\n\n", joined).strip()

    def _block_gap(self) -> int:
        """Return the newlines around a block: one inside a list, so items stay together."""
        return 1 if self._lists else 2

    def _next_item_marker(self) -> str:
        if not self._lists or self._lists[-1] is None:
            return "- "
        self._lists[-1] += 1
        return f"{self._lists[-1]}. "

    def _request_newlines(self, count: int) -> None:
        self._pending_newlines = max(self._pending_newlines, count)

    def _append(self, text: str) -> None:
        if self._pending_newlines and self._parts:
            self._parts.append("\n" * self._pending_newlines)
        self._pending_newlines = 0
        self._parts.append(self._pending_prefix + text)
        self._pending_prefix = ""

    def _at_line_start(self) -> bool:
        return not self._parts or self._pending_newlines > 0 or self._parts[-1].endswith("\n")
