"""The report parser: a blank English spaCy pipeline with rule components, built once per process.

``nlp = spacy.blank("en")`` + ``sentencizer`` (also at ``;`` and CT-RATE's ``"``/``•`` item separators) +
``ctprep_findings`` (mentions.py) + ``ctprep_context`` (context.py). No model download, no
lemmatizer. Each report is split into sections first; every non-empty section is one Doc, and
``pipe`` streams all sections of a batch of reports through ``nlp.pipe`` together.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import spacy
from spacy.attrs import IDX, IS_ALPHA, IS_DIGIT, LOWER, ORTH, SENT_START, SPACY
from spacy.language import Language
from spacy.tokens import Doc

from ctprep.ctrate import LABELS
from ctprep.reports import context as _context  # noqa: F401 - registers ctprep_context
from ctprep.reports import mentions as _mentions  # noqa: F401 - registers ctprep_findings
from ctprep.reports import vocabulary as V
from ctprep.reports.labels import label_vector
from ctprep.reports.mentions import Mention, to_mentions
from ctprep.reports.sections import SECTIONS, split_sections

logger = logging.getLogger(__name__)

#: Characters that end a sentence; CT-RATE also separates impression items with " and •. A semicolon
#: separates the items of a telegraphic finding list ("cardiomegaly; small hiatal hernia; bibasilar atelectasis",
#: and the structured prompts, which the parser must read back): each item is its own statement, so a rule's
#: sentence-wide checks must not read its neighbours ("lung" in the next item does not make a hiatal hernia a
#: lung hernia). Negation scopes and attribute clauses already ended at ";".
SENTENCE_PUNCT = (".", "!", "?", "•", "·", '"', "\n", ";")
#: A semicolon typed without a space ("cardiomegaly;hiatal hernia") is still its own token (spaCy's English
#: infixes split "a,b" but not "a;b"), so it can end the sentence.
_SEMICOLON_INFIX = r"(?<=[A-Za-z0-9]);(?=[A-Za-z])"
#: Longest section text parsed (characters); longer text is cut, with a warning, to bound time and memory. Time is
#: bounded by this cap only together with ``MAX_SENTENCE_TOKENS``: the rules read a mention's whole sentence, so one
#: sentence costs about the square of its length, and a section's time grows with its length times that of its
#: longest sentence.
MAX_SECTION_CHARS = 100_000
#: Longest sentence (tokens) the rules read. A longer one (a dictated report without full stops) is read in stretches
#: of at most this many tokens (``_split_long_sentences``), cut where no pre-trigger's scope is open. Written reports'
#: sentences are far shorter (the 150 dev reports: at most 133 tokens), and no trigger reaches further than
#: ``context.MAX_LIST_SCOPE`` (60) tokens, so only a mention near such a split can read differently; without the
#: split a run-on sentence of 100,000 characters took minutes.
MAX_SENTENCE_TOKENS = 400


@Language.component("ctprep_sentences")
def set_sentences(doc: Doc) -> Doc:
    """Sentence starts after . ! ? ; and the item separators, but not inside "9.6x8" or before ")" ",".

    Vectorised over token attributes (a Python loop over tokens costs more than the rest of the
    pipeline); the sentences are also kept as (first token, end token, start char, end char) in
    ``doc.user_data["sents"]`` for the later components.
    """
    n = len(doc)
    if n == 0:
        doc.user_data["sents"] = []
        return doc
    arr = doc.to_array([ORTH, SPACY, IS_ALPHA, IS_DIGIT, IDX])  # uint64 (ORTH is a hash)
    orth, space, alnum, idx = arr[:, 0], arr[:, 1].astype(bool), (arr[:, 2] | arr[:, 3]).astype(bool), arr[:, 4].astype(np.int64)
    strings = doc.vocab.strings
    punct = np.isin(orth, np.array([strings.add(p) for p in SENTENCE_PUNCT], dtype=np.uint64))
    no_start = punct | np.isin(orth, np.array([strings.add(p) for p in (")", ",", ";", ":")], dtype=np.uint64))
    dot = orth == strings.add(".")
    start = np.zeros(n, dtype=bool)
    start[1:] = punct[:-1] & ~no_start[1:] & ~(dot[:-1] & ~space[:-1] & alnum[1:])
    # a sentence needs a word before it ends: a leading "•" belongs to the item after it
    word = ~punct
    seen = np.maximum.accumulate(np.where(word, np.arange(n), -1))  # last word position up to each token
    prev_start = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    start[1:] &= seen[:-1] >= prev_start[:-1]
    start[0] = True
    if n > MAX_SENTENCE_TOKENS:
        lower = doc.to_array([LOWER]).ravel()
        _split_long_sentences(start, orth == strings.add(","), np.isin(lower, _trigger_openers(strings)))
    sent = np.where(start, 1, -1).astype(np.uint64).reshape(-1, 1)
    doc.from_array([SENT_START], sent)
    firsts = np.flatnonzero(start).tolist()
    ends = firsts[1:] + [n]
    doc.user_data["sents"] = [(a, b, int(idx[a]), int(idx[b - 1]) + len(doc[b - 1])) for a, b in zip(firsts, ends)]
    return doc


@functools.lru_cache(maxsize=4)
def _opener_words() -> frozenset[str]:
    """First words of the pre-triggers (negation, uncertainty, looked-for): a word that may open a forward scope."""
    phrases = [*V.PRE_NEGATION, *V.PRE_UNCERTAIN, *V.PRE_HYPOTHETICAL]
    return frozenset(p.split()[0].lower() for p in phrases if p.strip())


def _trigger_openers(strings) -> np.ndarray:
    """The hashes (``LOWER``) of ``_opener_words`` in a vocabulary's string store."""
    return np.array(sorted(strings.add(w) for w in _opener_words()), dtype=np.uint64)


def _split_long_sentences(start: np.ndarray, comma: np.ndarray, opener: np.ndarray | None = None,
                          limit: int | None = None) -> None:
    """Mark further sentence starts in ``start`` (in place) so that no sentence is longer than ``limit`` tokens
    (``MAX_SENTENCE_TOKENS``).

    Each stretch of ``limit`` tokens is cut in its second half at the last place that leaves no pre-trigger's scope
    open: after a comma that no ``opener`` (the first word of a pre-trigger, ``_opener_words``) precedes within
    ``context.MAX_LIST_SCOPE`` tokens, or right before an opener, whose scope then lies whole in the next stretch (a
    nearer pre-trigger outranks an earlier one, so the earlier one's reach past it counts for nothing). The last comma
    of the second half alone cut "no consolidation, pleural effusion, atelectasis, or emphysema" inside its list, and
    the items after the cut read as present. Failing such a place: the last comma of the second half, or else the
    stretch's end."""
    limit = limit or MAX_SENTENCE_TOKENS
    n = len(start)
    if opener is None:
        opener = np.zeros(n, dtype=bool)
    scope = _context.MAX_LIST_SCOPE
    # the last opener at or before each token (-scope - 1 where none)
    last_opener = np.maximum.accumulate(np.where(opener, np.arange(n), -scope - 1))
    firsts = np.flatnonzero(start)
    ends = np.append(firsts[1:], n)
    for a, b in zip(firsts[ends - firsts > limit].tolist(), ends[ends - firsts > limit].tolist()):
        while b - a > limit:
            lo, hi = a + limit // 2, a + limit - 1
            commas = lo + np.flatnonzero(comma[lo: hi])  # a cut after one of these
            closed = commas[commas - last_opener[commas] >= scope]
            openers = lo + 1 + np.flatnonzero(opener[lo + 1: a + limit])  # a cut right before one of these
            cuts = [int(closed[-1]) + 1] if len(closed) else []
            cuts += [int(openers[-1])] if len(openers) else []
            a = max(cuts) if cuts else int(commas[-1]) + 1 if len(commas) else a + limit
            start[a] = True


@dataclass
class ParsedReport:
    """One parsed report: its sections, finding mentions and the 18-label vector."""

    sections: dict[str, str]
    mentions: list[Mention] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LABELS, 0))

    def present(self) -> list[Mention]:
        """Mentions whose status is present."""
        return [m for m in self.mentions if m.status == "present"]

    def to_json(self) -> dict:
        """JSON-ready dict with ``sections``, ``mentions`` and ``labels``."""
        return {"sections": dict(self.sections), "mentions": [m.to_dict() for m in self.mentions],
                "labels": dict(self.labels)}


class ReportParser:
    """Negation-aware chest-CT report parser; build once and reuse (building costs ~0.2 s, mostly the trigger phrases)."""

    def __init__(self):
        self.nlp = spacy.blank("en")
        infixes = [*self.nlp.Defaults.infixes, _SEMICOLON_INFIX]
        self.nlp.tokenizer.infix_finditer = spacy.util.compile_infix_regex(infixes).finditer
        self.nlp.add_pipe("ctprep_sentences")
        self.nlp.add_pipe("ctprep_findings")
        self.nlp.add_pipe("ctprep_context")

    def parse(self, report: str | Mapping | None) -> ParsedReport:
        """Parse one report: free text, or a mapping of section fields (CT-RATE columns or our names)."""
        return next(self.pipe([report]))

    def pipe(self, reports: Iterable[str | Mapping | None], batch_size: int = 64) -> Iterator[ParsedReport]:
        """Parse many reports lazily, in order; sections of ``batch_size`` reports share one ``nlp.pipe``."""
        batch: list[dict[str, str]] = []
        for report in reports:
            batch.append(split_sections(report))
            if len(batch) >= batch_size:
                yield from self._parse_batch(batch)
                batch = []
        if batch:
            yield from self._parse_batch(batch)

    def _make_doc(self, text: str) -> Doc:
        """Tokenised doc carrying its text (``Doc.text`` re-joins every token on each access)."""
        doc = self.nlp.make_doc(text)
        doc.user_data["text"] = text
        return doc

    def _parse_batch(self, batch: list[dict[str, str]]) -> Iterator[ParsedReport]:
        texts, where = [], []
        for i, sections in enumerate(batch):
            for name in SECTIONS:
                text = sections[name]
                if len(text) > MAX_SECTION_CHARS:
                    logger.warning("report section %s has %d chars; parsing the first %d", name, len(text), MAX_SECTION_CHARS)
                    text = sections[name] = text[:MAX_SECTION_CHARS]
                if text:
                    texts.append(text)
                    where.append((i, name))
        mentions: list[list[Mention]] = [[] for _ in batch]
        for (i, name), doc in zip(where, self.nlp.pipe((self._make_doc(t) for t in texts), batch_size=256)):
            mentions[i].extend(to_mentions(doc, name))
        for sections, ms in zip(batch, mentions):
            yield ParsedReport(sections=sections, mentions=ms, labels=label_vector(ms))


@functools.lru_cache(maxsize=1)
def get_parser() -> ReportParser:
    """The process's parser, built on first use and cached (an explicit factory, not a module global;
    ``get_parser.cache_clear()`` rebuilds it)."""
    return ReportParser()


def parse_report(report: str | Mapping | None) -> ParsedReport:
    """Parse one report with the process's cached parser (see ``get_parser``)."""
    return get_parser().parse(report)
