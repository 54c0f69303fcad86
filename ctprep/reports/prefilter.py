"""Keyword prefilter for the finding regexes: literal words without which a pattern cannot match.

Python's ``re`` has no fast scan for patterns that start with ``\\b`` or a group, so running the
19 finding rules over every character of a report dominated the parser's cost. ``keywords(pattern)``
reads the parsed regex and returns a set of literal strings such that every match contains at
least one of them ("stent", "cathet", ...). ``str.find`` locates these at C speed, and a rule's
regex then runs only over the sentences that hold one. Derived from the pattern itself, so editing
a rule can never make the prefilter drop a match; a pattern it cannot read gives ``None`` (no
prefilter, the rule scans every sentence).
"""

from __future__ import annotations

import bisect
import re

try:  # the regex parse tree (CPython 3.11+); without it every rule scans every sentence
    import re._constants as C
    import re._parser as P
except ImportError:  # pragma: no cover
    C = P = None

#: Texts are lower-cased before matching, so patterns must be lower case (escapes aside).
_UPPER_LITERAL = re.compile(r"(?<!\\)[A-Z]")


def lower_same_length(text: str) -> str:
    """``text.lower()`` with char offsets kept: a char whose lower case is longer ("İ" -> "i̇") keeps its first char."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(ch.lower()[0] for ch in text)


def compile_lower(pattern: str) -> re.Pattern:
    """Compile a pattern meant for lower-cased text (refuses upper-case literals, which could never match)."""
    if _UPPER_LITERAL.search(re.sub(r"\\.", "", pattern)):
        raise ValueError(f"pattern for lower-cased text has upper-case letters: {pattern!r}")
    return re.compile(pattern)


def _best(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """The more selective of two keyword sets (longest shortest keyword, then fewest keywords)."""
    if not a:
        return b
    if not b:
        return a
    return a if (min(map(len, a)), -len(a)) >= (min(map(len, b)), -len(b)) else b


def _required(items) -> frozenset[str] | None:
    """Keywords one of which every match of the parsed sequence ``items`` contains, or None."""
    best, run = None, []
    for op, av in list(items) + [(None, None)]:
        if op is C.LITERAL:
            run.append(chr(av))
            continue
        if run:
            best, run = _best(best, frozenset(["".join(run)])), []
        if op is C.SUBPATTERN:
            best = _best(best, _required(av[-1].data))
        elif op is C.BRANCH:
            alternatives = [_required(alt.data) for alt in av[1]]
            if all(alternatives):
                best = _best(best, frozenset().union(*alternatives))
        elif op is C.IN and all(o is C.LITERAL for o, _ in av):
            best = _best(best, frozenset(chr(a) for _, a in av))
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT) and av[0] >= 1:
            best = _best(best, _required(av[2].data))
        # AT (\b), ANY, other IN classes, look-arounds and optional parts guarantee no literal
    return best


def keywords(pattern: str) -> frozenset[str] | None:
    """Literal strings one of which every match of ``pattern`` (case-sensitive) contains; None if unknown."""
    if P is None:  # pragma: no cover
        return None
    try:
        words = _required(P.parse(pattern).data)
    except Exception:  # noqa: BLE001 - a private-API change must cost speed, not correctness
        return None
    # a keyword containing another one is implied by it ("stent material" by "stent")
    return frozenset(w for w in words if not any(v != w and v in w for v in words)) if words else None


def sentences_with(low: str, words: frozenset[str] | None, starts: list[int], n: int) -> list[int]:
    """Sorted indices of the sentences (char starts ``starts``, ``n`` of them) where one of ``words`` occurs."""
    if words is None:
        return list(range(n))
    hit = set()
    for word in words:
        pos = low.find(word)
        while pos >= 0:
            i = max(0, bisect.bisect_right(starts, pos) - 1)
            hit.add(i)
            # jump to the next sentence: one hit per sentence is enough
            pos = low.find(word, starts[i + 1]) if i + 1 < n else -1
    return sorted(hit)
