"""Tolerance for misspelt finding words ("cardiomegally", "effusoin", "atelectesis").

Hand-typed and dictated reports misspell the long Greek/Latin finding words, and one wrong letter
hides the finding from every rule. Each vocabulary term in ``vocabulary.SPELLING_TERMS`` is expanded
once, when the parser is built, into all strings one Damerau-Levenshtein edit away from it (a
deletion, insertion, substitution or swap of neighbours): ~500 per term, ~17,000 in all. Parsing then
costs one hash look-up per token (``Speller``), no edit distance; a misspelt token is read as its
term by the finding rules (``mentions.find_mentions``), while the mention keeps the report's own
spelling and offsets.

Safeguards, since a wrong "correction" invents a finding:

- terms of at least ``MIN_LENGTH`` letters only: one edit in a short word lands on another word
  ("pleura" -> "plural", "nodule" -> "module"); among long medical words it almost never does;
- a variant that a rule already matches ("effusions", "emphysem") is left to the rule;
- a variant one edit from two different terms ("effusiona") is ambiguous and dropped;
- a variant that is a real word (``vocabulary.SPELLING_REAL_WORDS``: "affusion", "granulosa") is
  dropped; the terms are chosen so that none of their variants is a word of a 30,000-word English
  vocabulary (``tests/ctprep/test_report_language.py`` re-checks this where that vocabulary is installed).

No fuzzy-matching library is among the dependencies (rapidfuzz, symspellpy ... are not installed),
and the precomputed-variants scheme is SymSpell's idea in a dozen lines.
"""

from __future__ import annotations

import bisect
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from spacy.attrs import LOWER
from spacy.strings import hash_string
from spacy.tokens import Doc

#: Shortest term that gets misspelling tolerance (letters). Shorter words have too many real-word neighbours.
MIN_LENGTH = 8
_LETTERS = string.ascii_lowercase


def edits1(word: str) -> set[str]:
    """All strings one Damerau-Levenshtein edit (restricted: adjacent swap) away from ``word``, over a-z."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    deletes = {a + b[1:] for a, b in splits if b}
    swaps = {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    replaces = {a + c + b[1:] for a, b in splits if b for c in _LETTERS}
    inserts = {a + c + b for a, b in splits for c in _LETTERS}
    return (deletes | swaps | replaces | inserts) - {word}


def variant_table(terms: Iterable[str], known: Iterable[re.Pattern] = (), real_words: Iterable[str] = ()) -> dict[str, str]:
    """Misspelling -> term, for terms of ``MIN_LENGTH``+ letters, without ambiguous, known or real words.

    ``known``: patterns that already recognise a word (the finding rules); a variant one of them
    matches needs no correction. ``real_words``: spellings that must never be "corrected".
    """
    terms = sorted({t.lower() for t in terms if len(t) >= MIN_LENGTH and t.isalpha()})
    blocked = set(terms) | {w.lower() for w in real_words}
    owner: dict[str, str | None] = {}
    for term in terms:
        for v in edits1(term):
            owner[v] = term if owner.get(v, term) == term else None  # None: one edit from two terms
    candidates = sorted(v for v, t in owner.items() if t is not None and v not in blocked)
    read = _matched(candidates, known)
    return {v: owner[v] for i, v in enumerate(candidates) if i not in read}


def _matched(words: list[str], patterns: Iterable[re.Pattern]) -> set[int]:
    """Indices of the words some pattern finds (one scan of all words joined by newlines per pattern:
    a search per word and pattern took seconds)."""
    joined = "\n".join(words)
    starts = [0]
    for w in words[:-1]:
        starts.append(starts[-1] + len(w) + 1)
    hit = set()
    for rx in patterns:
        for m in rx.finditer(joined):
            if "\n" not in m.group():
                hit.add(bisect.bisect_right(starts, m.start()) - 1)
    return hit


class Speller:
    """Finds the tokens of a doc that are misspellings in a ``variant_table``.

    A vectorised look-up of each token's lower-case hash (spaCy's ``LOWER``) in the sorted variant
    hashes rather than a ``PhraseMatcher``: for single-token patterns the two do the same look-up, but
    a PhraseMatcher needs a Doc and a Lexeme per variant (~17,000: 0.4 s per parser build and as many
    vocabulary entries).
    """

    def __init__(self, table: dict[str, str]):
        self.terms = {hash_string(v): t for v, t in table.items()}
        # sorted once: a binary search per token (np.isin would re-hash all variants for every doc)
        self.hashes = np.sort(np.fromiter(self.terms, dtype=np.uint64, count=len(self.terms)))

    def __call__(self, doc: Doc) -> list[tuple[int, int, str]]:
        """(start char, end char, term) of each misspelt token of ``doc``."""
        if not len(self.hashes) or not len(doc):
            return []
        lower = doc.to_array([LOWER]).reshape(-1)
        at = np.minimum(np.searchsorted(self.hashes, lower), len(self.hashes) - 1)
        return [(doc[i].idx, doc[i].idx + len(doc[i]), self.terms[int(lower[i])])
                for i in np.flatnonzero(self.hashes[at] == lower).tolist()]


@dataclass(frozen=True)
class Corrected:
    """A lower-cased text with misspelt words replaced by their terms, and the way back to the original offsets.

    ``edits`` are (original start, original end, new start, new end) of each replaced word, in order.
    """

    text: str
    edits: tuple[tuple[int, int, int, int], ...] = ()

    def to_new(self, pos: int) -> int:
        """Offset in ``text`` of original offset ``pos`` (a word boundary: never inside a replaced word)."""
        for a, b, c, d in reversed(self.edits):
            if pos >= b:
                return pos - b + d
        return pos

    def to_old(self, pos: int, end: bool = False) -> int:
        """Original offset of ``text`` offset ``pos``; inside a replaced word: its start, or its end if ``end``."""
        for a, b, c, d in reversed(self.edits):
            if pos >= d:
                return pos - d + b
            if pos > c:
                return b if end else a
        return pos


def correct(low: str, replacements: Iterable[tuple[int, int, str]]) -> Corrected:
    """``low`` with the (start, end, word) replacements made (sorted, non-overlapping)."""
    parts, edits, prev, shift = [], [], 0, 0
    for start, end, word in sorted(replacements):
        parts += [low[prev:start], word]
        edits.append((start, end, start + shift, start + shift + len(word)))
        shift += len(word) - (end - start)
        prev = end
    parts.append(low[prev:])
    return Corrected("".join(parts), tuple(edits))
