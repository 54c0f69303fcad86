"""Text normalisation for report prose: HTML entities and stray tags, unicode NFKC, whitespace.

Reports come from CSV exports, web forms and machine translation, so they carry ``&amp;``, ``<br>``,
non-breaking spaces and odd quotes. Normalising first keeps every later rule simple.
"""

from __future__ import annotations

import html
import re
import unicodedata

_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")  # <br>, <p class=..>, </b>; not "a < b > c" prose
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")  # control/zero-width -> space
_QUOTES = (("\u201c", '"'), ("\u201d", '"'), ("\u201e", '"'), ("\u2033", '"'), ("\u2018", "'"), ("\u2019", "'"))


def normalise_lines(text: object) -> str:
    """Normalised text that keeps line breaks (the section splitter looks for headers at line starts)."""
    if text is None:
        return ""
    s = str(text)
    s = html.unescape(html.unescape(s))  # double-escaped exports (&amp;amp;) are common
    s = _TAG.sub("\n", s)
    s = unicodedata.normalize("NFKC", s)
    if not s.isascii():  # str.translate is slow on long text; replace only what is there
        for a, b in _QUOTES:
            if a in s:
                s = s.replace(a, b)
    s = _CONTROL.sub(" ", s)
    # whitespace runs -> one space, no blank lines, no spaces at line ends
    return "\n".join(filter(None, (" ".join(line.split()) for line in s.split("\n"))))


def normalise(text: object) -> str:
    """Normalised text on one line: what the parser and the mentions' char offsets refer to."""
    return " ".join(normalise_lines(text).split())
