"""Finding mentions: the ``Mention`` record and the pipeline component that finds them.

The component runs every ``vocabulary.RULES`` regex over the sentences of the section that hold one
of the rule's keywords (``prefilter.py``), keeps the matches whose sentence (or window) passes the
rule's requires/excludes checks and whose nearest place is no rival's (``Rule.rivals``: calcium in the aortic arch
named beside coronary arteries is the arch's), assigns bare "effusion"/"fluid" to the pleura or
the pericardium from the words of its own list item (a bare "effusion" with none to the pleura), reads an
exception that repeats its finding without naming it ("No effusion except for a small one on the left") as
a mention of that finding, and stores the result as spans in ``doc.spans["findings"]`` (label = CT-RATE
label). ``context.py`` then gives each a status; ``to_mentions`` adds attributes.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import asdict, dataclass

from spacy.language import Language
from spacy.tokens import Doc, Span

from ctprep.reports import attributes as A
from ctprep.reports import spelling
from ctprep.reports.prefilter import compile_lower, keywords, lower_same_length, sentences_with
from ctprep.reports.vocabulary import (AUXILIARIES, BARE_EFFUSION_LABEL, CONTRASTS, EFFUSION, ELLIPTIC_HEADS, EXCEPTIONS,
                                       LUNG, NON_LUNG, PLACE_NOUNS, PLACE_PREPOSITIONS, RELATIVE_PRONOUNS, RULES, SEEN_VERBS,
                                       SPELLING_REAL_WORDS, SPELLING_TERMS, Rule)



@dataclass(frozen=True)
class _Compiled:
    """A rule ready for lower-cased text: its regexes and its prefilter keywords."""

    rule: Rule
    rx: re.Pattern
    requires: re.Pattern | None
    excludes: re.Pattern | None
    words: frozenset[str] | None
    excludes_own: re.Pattern | None = None
    excludes_part: re.Pattern | None = None
    outside: re.Pattern | None = None
    inside: re.Pattern | None = None
    rivals: re.Pattern | None = None


def _compile(rx: str | None) -> re.Pattern | None:
    return compile_lower(rx) if rx else None


_COMPILED = tuple(_Compiled(r, compile_lower(r.pattern), _compile(r.requires), _compile(r.excludes), keywords(r.pattern),
                            _compile(r.excludes_own), _compile(r.excludes_part), _compile(r.outside),
                            _compile(r.inside), _compile(r.rivals))
                  for r in RULES)
#: A verb of the clause: a part without one shares the clause's verb phrase ("Lymph nodes in the mediastinum and
#: lymph nodes in the hila are of normal size": both are normal-sized); subjects joined by a coordination share the
#: predicate after the last of them (``_shared_predicate``)
_JOINED = compile_lower(r"\b(and|or|nor)\b|&")
_PREDICATE = compile_lower(r"\b(" + "|".join((*AUXILIARIES, "do", "does", "did")) + r")\b")
_EFFUSION_WORDS = keywords(EFFUSION.pattern)
_PERICARD = compile_lower(r"\bpericardi\w*")
_PLEURA = compile_lower(r"\b(pleura\w*|hemithora\w*|thorax|thoracic cavit\w*|costophrenic|costodiaphragmatic)")
#: Places outside the chest cavities, where a bare effusion is neither pleural nor pericardial; not the pericardium
#: itself, named in the effusion's phrase for another finding ("Effusion on the right and pericardial thickening").
_NON_LUNG = compile_lower(NON_LUNG.replace(r"|lymph nodes?", "").replace(r"|soft tissue", "")
                          .replace(r"|pericardi\w*", "")
                          + r"|\b(joint|subcapsular|perihepatic|perisplenic|pelvic|free|shoulder|knee|hip|elbow|wrist|"
                            r"ankle|glenohumeral|subacromial|subdeltoid|acromioclavicular|sternoclavicular|bursa\w*)\b")
_LUNG = compile_lower(LUNG)
_ORGAN = compile_lower(NON_LUNG)
_JOIN = re.compile(r"[\s-]{0,2}")  # what may separate two matches of one label that form one phrase
#: "pleural effusion", "pericardial fluid": the effusion word's own place, right before it.
_QUALIFIER = compile_lower(r"\b(pleural|pericardial)[\s-]+$")
#: A place coordinated with that one: "pleural and pericardial effusion", "pericardial or bilateral pleural effusions".
_COORDINATED = compile_lower(r"\b(pleural|pericardial)\s*(,|/|-|\band/or\b|\band\b|\bor\b|\bnor\b)\s*(\w+\s+){0,2}"
                             r"(pleural|pericardial)[\s-]+$")
#: A place adjective that opens the next noun phrase of a coordination: "Effusion on the right and |pericardial|
#: thickening" (the thickening's place, not the effusion's); not before a place noun ("... and pericardial spaces").
_NEXT_QUALIFIER = compile_lower(r"\b(?:and/or|and|or|nor|as well as|along with)\s+(?:[\w-]+\s+){0,2}?"
                                r"(pleura\w*|pericardi\w*)[\s-]+(?!(?:" + "|".join(PLACE_NOUNS) + r")\b)[a-z]")
#: The clause's verb with its place phrase: "Effusion, with a thickness of 12 mm, |is observed in the pericardial
#: space|" places the effusion it is said of, however long the description between them.
_VERB_PLACE = compile_lower(r"\b(?:is|are|was|were)\s+(?:\w+\s+)?(?:" + "|".join(SEEN_VERBS) + r")\s+(?:"
                            + "|".join(PLACE_PREPOSITIONS) + r")\b[^,]*")
_NEXT_EFFUSION = compile_lower(r"(\b(pleural|pericardial)[\s-]+)?\b(effusions?|fluid)\b")
_PLACE_LABEL = {"pleural": "Pleural effusion", "pericardial": "Pericardial effusion"}
#: A template's heading at the sentence start ("Pericardium: Trace effusion."): it says where its value's effusion lies.
_HEADING = compile_lower(r"\s*(?:[-*•]\s+)?([a-z][a-z /&-]{0,40}):")
_HEART = compile_lower(r"\b(heart|cardiac)\b")
_CLAUSE_END = A.CLAUSE_END
_SIDE = compile_lower(r"\b(right|left|bilateral\w*|both|bibasal\w*)\b")
_DEFINITE = compile_lower(r"\b(the|this|these|that|said)\s+([\w-]+\s+){0,2}$")
_PLACED = compile_lower(r"\b(pleural|pericardial)[\s-]+(effusions?|fluid)\b")
#: An exception word and what it excepts, up to the clause punctuation that closes it; a comma followed by a
#: relative pronoun does not close it ("except for a small one, which is seen on the left, ...").
_EXCEPTION = compile_lower(r"\b(" + "|".join(sorted((re.escape(w) for w in EXCEPTIONS), key=len, reverse=True)) + r")\b"
                           r"((?:[^,;:]|,(?=\s*(?:" + "|".join(RELATIVE_PRONOUNS) + r")\b))*)")
_EXCEPTION_WORDS = keywords(_EXCEPTION.pattern)
_CONTRAST = compile_lower(r"\b(" + "|".join(CONTRASTS) + r")\b((?:[^,;:]|,(?=\s*(?:" + "|".join(RELATIVE_PRONOUNS)
                          + r")\b))*)")
_CONTRAST_WORDS = keywords(_CONTRAST.pattern)
_PERICARDIAL_PLACE = compile_lower(r"\bpericardi(um|al)\b")
_PRONOUN_ONE = compile_lower(r"one\s+(can|cannot|can't|could|should|must|may|might|will|would|shall|needs?|notes?|sees?"
                             r"|observes?|notices?)\b")
_ELLIPTIC_HEAD = compile_lower(r"\b(" + "|".join(ELLIPTIC_HEADS) + r")\b(?!\s+of\b)")
#: A place after an anchor is the anchor's through a preposition, near it and in its comma phrase ("calcified
#: plaques in the aortic arch", "calcification involving the LAD"), not as the subject of what follows ("plaques,
#: aorta normal").
_PLACE_LINK = compile_lower(r"\b(of|in|on|at|within|along|involving|affecting|including|throughout|to|into)\b")
_LINK_REACH = 40
#: Two places coordinated in one list ("of the aorta and the coronary arteries", "in the aorta and in the LAD", "in the
#: aortic valve, coronary artery and aortic arch") share what is said of them; a negation, a verb or a new phrase
#: between them parts them ("in the aortic arch, without coronary calcification"), and so does a comma in a list that
#: no conjunction closes ("in the aortic arch, coronary arteries normal"). A hyphen or a slash between two places lists
#: them too ("in the thoracic aorta-coronary arteries", "aorta/coronary arteries").
_COORDINATION = compile_lower(r"\b(and|or|as well as)\b|[&/]")
_NOT_COORDINATED = compile_lower(r"\b(with|without|no|not|free|but|is|are|was|were|has|have|show\w*|which|that|there|"
                                 r"normal|spared|except|apart|other|than)\b")
_COORDINATION_REACH = 60


def doc_text(doc: Doc) -> str:
    """The doc's text, from ``user_data`` where the parser put it (``Doc.text`` re-joins all tokens)."""
    text = doc.user_data.get("text")
    if text is None:
        text = doc.user_data["text"] = doc.text
    return text


@functools.lru_cache(maxsize=1)
def spelling_table() -> dict[str, str]:
    """Misspelling -> finding term (``spelling.py``), minus words a finding rule already reads; built once per process."""
    known = [c.rx for c in _COMPILED] + [compile_lower(EFFUSION.pattern)]
    return spelling.variant_table(SPELLING_TERMS, known, SPELLING_REAL_WORDS)


@dataclass
class Mention:
    """One finding mention in a report."""

    label: str  # CT-RATE label
    text: str  # the matched words
    section: str  # findings / impression / clinical_information / technique
    sentence: int  # sentence index within the section
    start: int  # char offsets in the section's normalised text
    end: int
    status: str  # present / negated / uncertain / hypothetical (looked for, not judged) / historical (an earlier
    # study's, restated for this exam)
    trigger: str | None = None  # the context words that set a non-present status
    laterality: str | None = None  # right / left / bilateral
    location: str | None = None  # lobe code (RUL RML RLL LUL LLL lingula) or organ
    size_mm_min: float | None = None  # smallest size / dimension in mm
    size_mm_max: float | None = None  # largest size / dimension in mm
    count: str | None = None  # single / a few / multiple
    severity: str | None = None  # mild / moderate / severe

    def to_dict(self) -> dict:
        return asdict(self)


def _bare_effusion_label(section: str, pos: int, item: str) -> str:
    """Where an effusion lies whose own words name no place (``item`` holds them; ``pos``: where it starts in the
    section): "the effusion" is the one last named with its place ("Pericardial effusion of 8 mm; the effusion is
    stable"), an effusion with a side or without an article is pleural ("bilateral effusions", "small effusion")."""
    if not _SIDE.search(item) and _DEFINITE.search(section, max(0, pos - 40), pos):
        named = list(_PLACED.finditer(section, 0, pos))
        if named:
            return _PLACE_LABEL[named[-1].group(1)]
    return BARE_EFFUSION_LABEL


def _effusion_labels(section: str, s0: int, e0: int, start: int, end: int) -> list[str]:
    """Where a bare effusion/fluid lies: pleura, pericardium, both ("pleural or pericardial effusion") or neither.

    ``section[s0:e0]`` is the effusion's sentence; ``start``/``end`` are offsets in that sentence. An effusion word
    named by its place ("pericardial effusion") lies there and in the places coordinated with it only, not in a place
    named later in the sentence ("Pericardial effusion, pleural thickening"). Otherwise the place words of its own
    comma-separated phrase decide (``attributes.own_phrase``), near it, but for the place adjectives of a noun phrase
    coordinated after it ("Effusion on the right and pericardial thickening"); beyond, the place phrase of the clause's
    verb does. A bare "effusion" with none is placed by ``_bare_effusion_label``, unless its phrase names an organ
    outside the chest ("subcapsular effusion in the spleen").
    """
    sent = section[s0:e0]
    before = _CLAUSE_END.split(sent[max(0, start - 45): start])[-1]
    own = _QUALIFIER.search(before)
    if own:
        both = _COORDINATED.search(before)
        return sorted({_PLACE_LABEL[own.group(1)]} | ({_PLACE_LABEL[both.group(1)]} if both else set()))
    a, b = A.own_phrase(sent, start, end)  # its own words: "Effusion on the right, pericardial thickening"
    before = _CLAUSE_END.split(sent[max(a, start - 45): start])[-1]
    # blanked before the window is cut, so that a cut cannot part a place adjective from the noun it goes with
    after = _CLAUSE_END.split(_without_next_qualifiers(sent[end:b])[:50])[0]
    # another effusion word and the place before it are that effusion's: "The effusion has resolved and a new
    # pericardial effusion is seen" does not put the first one in the pericardium
    later = _NEXT_EFFUSION.search(after)
    after = after[: later.start()] if later else after
    # nothing near it: the place phrase of the clause's verb, however far ("Effusion, 12 mm thick, is seen in ...")
    labels = _places(before + " " + after) or _places(_verb_place(sent, end, b))
    heading = _HEADING.match(sent)
    if not labels and heading and heading.end() <= start:
        # the heading says where: "Pericardium: Small effusion", "Heart: Trace effusion"; or that it is outside the chest
        labels = _places(heading.group(1)) or (["Pericardial effusion"] if _HEART.search(heading.group(1)) else [])
        if not labels and _NON_LUNG.search(heading.group(1)):
            return []
    if not labels and sent[start:end].startswith("effusion") and not _NON_LUNG.search(sent, a, b):
        labels.append(_bare_effusion_label(section, s0 + start, sent[a:b]))
    return labels


def _places(words: str) -> list[str]:
    """The effusion labels whose place ``words`` name (pericardium first, as the spans are sorted)."""
    return [label for label, rx in (("Pericardial effusion", _PERICARD), ("Pleural effusion", _PLEURA)) if rx.search(words)]


def _without_next_qualifiers(after: str) -> str:
    """``after`` (the words after an effusion) with the place adjectives of the next noun phrase of a coordination
    blanked: "Effusion on the right and pericardial thickening" names no place of the effusion."""
    for m in _NEXT_QUALIFIER.finditer(after):
        after = after[: m.start(1)] + " " * (m.end(1) - m.start(1)) + after[m.end(1):]
    return after


def _verb_place(sent: str, end: int, b: int) -> str:
    """The place phrase of the clause's verb after the effusion word (ending at ``end``) inside its own phrase
    (ending at ``b``), however far: a description set off by commas may stand between them ("Effusion, with a thickness
    of 12 mm, is observed in the pericardial space"); "" if none. It stops at the clause's end and at another effusion
    word, whose place that is, and leaves out the place adjectives of a noun phrase coordinated after it."""
    rest = _CLAUSE_END.split(sent[end:b])[0]
    later = _NEXT_EFFUSION.search(rest)
    m = _VERB_PLACE.search(rest, 0, later.start() if later else len(rest))
    return _without_next_qualifiers(m.group(0)) if m else ""


def _elliptic_exceptions(text: str, sentence: tuple[int, int], found: list[tuple[int, int, str]],
                         contrast: bool = False) -> list[tuple[int, int, str]]:
    """Mentions an exception makes by repeating its finding without naming it: "No pleural effusion except for a
    small one on the left" (the "one" is a left pleural effusion), "No consolidation except in the right lower lobe".

    The exception's object must name no finding of its own and be either an elliptic head ("one", "a small focus")
    or a place phrase; it repeats the nearest finding before the exception (after it, if the exception comes
    first: "Apart from a small one on the left, no effusion is seen"). Its place must be in the chest.

    ``contrast``: the same for a contrast word's clause ("No pleural effusion on the right, but a small one on
    the left"), which must hold both an elliptic head and a side or place, and repeats only a finding before it.
    """
    s0, e0 = sentence
    out = []
    for m in (_CONTRAST if contrast else _EXCEPTION).finditer(text, s0, e0):
        o0, o1 = m.span(2)
        if any(o0 <= a < o1 for a, _, _ in found):
            continue
        head = _ELLIPTIC_HEAD.search(text, o0, o1)
        if contrast and (head is None or _PRONOUN_ONE.match(text, head.start())
                         or not (_SIDE.search(text, head.end(), o1) or A.PLACE_PHRASE.search(text, head.end(), o1))):
            continue  # "but one cannot exclude ...": the pronoun, not the finding
        if head is not None:
            start, end = head.span()
        elif A.PLACE_PHRASE.match(text, o0):  # the place phrase itself, without the sentence's last stop
            phrase = text[o0:o1]
            start, end = o0 + len(phrase) - len(phrase.lstrip()), o0 + len(phrase.rstrip().rstrip(".!?").rstrip())
        else:
            continue
        if _NON_LUNG.search(text, o0, o1):
            continue
        before = [f for f in found if s0 <= f[0] and f[1] <= m.start()]
        after = [] if contrast else [f for f in found if o1 <= f[0] and f[1] <= e0]
        if before:
            last = max(f[1] for f in before)
            labels = {f[2] for f in before if f[1] == last}
        elif after:
            first = min(f[0] for f in after)
            labels = {f[2] for f in after if f[0] == first}
        else:
            continue
        if _PERICARDIAL_PLACE.search(text, o0, o1):  # "but a small one in the pericardium": that effusion
            labels = {"Pericardial effusion" if label == "Pleural effusion" else label for label in labels}
        out.extend((start, end, label) for label in sorted(labels))
    return out


def _part_excluded(c: _Compiled, low: str, s0: int, e0: int, m: re.Match, anchors: list[re.Match]) -> bool:
    """True if the rule's part-scoped exclusions drop the anchor ``m`` of the sentence ``low[s0:e0]``.

    The part is the mention's own words: inside its clause, from the separator after the rule's previous anchor to
    the last separator before its next one (``attributes.finding_part``), so that a normal-sized or abdominal node
    named beside it is no reason to drop it. A part without a verb shares the verb phrase of its comma-set phrase,
    which says what its coordinated subjects are ("Lymph nodes in the mediastinum and hila are of normal size").
    """
    marks = [x.span() for x in A.CLAUSE_END.finditer(low, s0, e0)]
    c0 = max([b for _, b in marks if b <= m.start()], default=s0)
    c1 = min([a for a, _ in marks if a >= m.end()], default=e0)
    clause = low[c0:c1]
    s, e = m.start() - c0, m.end() - c0
    prev_end = max((x.end() - c0 for x in anchors if c0 <= x.start() and x.end() <= m.start()), default=None)
    next_start = min((x.start() - c0 for x in anchors if x.start() >= m.end() and x.end() <= c1), default=None)
    if low[c1:c1 + 1] == ":" and not clause[:s].strip(" \t-*") and not clause[e:].strip():
        context = low[c1 + 1:e0]  # a heading ("Lymph nodes: subcentimeter, within normal limits"): what follows it
    else:
        a, b = A.finding_part(clause, s, e, prev_end, next_start)
        context = clause[a:b]
        if not _PREDICATE.search(context):
            _, phrase_end = A.own_phrase(clause, s, e)
            verb = _PREDICATE.search(clause, b, phrase_end) if b < phrase_end else None
            if verb:
                context += " " + clause[verb.start():phrase_end]
            else:
                context += " " + _shared_predicate(clause, b, [(x.start() - c0, x.end() - c0) for x in anchors
                                                              if c0 <= x.start() and x.end() <= c1])
    if c.excludes_part and c.excludes_part.search(context):
        return True
    if not c.outside:
        return False
    if c.outside.search(context) and not (c.inside and c.inside.search(context)):
        return True
    # a sentence that names places outside the region and none inside it is outside it, whatever part names them:
    # "In the upper abdomen, lymph nodes in the gastrohepatic ligament ... are enlarged"
    sentence = low[s0:e0]
    return bool(c.outside.search(sentence) and not (c.inside and c.inside.search(sentence)))


def _rival_place(c: _Compiled, low: str, s0: int, e0: int, m: re.Match) -> bool:
    """True if a place of the rule's ``rivals`` takes the anchor ``m`` from its ``requires`` (``Rule.rivals``).

    Read in the anchor's clause: a clause that names neither leaves the anchor to the sentence ("Coronary arteries:
    mild calcification"); one that names only rivals takes it. Otherwise the place nearest the anchor decides: before
    it, or after it through a preposition (``_PLACE_LINK``); a rival coordinated with a required place shares it."""
    marks = [x.span() for x in A.CLAUSE_END.finditer(low, s0, e0)]
    c0 = max([b for _, b in marks if b <= m.start()], default=s0)
    c1 = min([a for a, _ in marks if a >= m.end()], default=e0)
    required = list(c.requires.finditer(low, c0, c1))
    rivals = list(c.rivals.finditer(low, c0, c1))
    if not rivals:
        return False
    if not required:
        return True
    near, dist = None, 0
    for place, is_required in [(x, True) for x in required] + [(x, False) for x in rivals]:
        if place.end() <= m.start():
            d = m.start() - place.end()
        elif place.start() >= m.end():
            between = low[m.end(): place.start()]
            if len(between) > _LINK_REACH or "," in between or not _PLACE_LINK.search(between):
                continue
            d = place.start() - m.end()
        else:
            d = 0
        if near is None or d < dist or (d == dist and is_required):
            near, dist, near_required = place, d, is_required
    if near is None or near_required:
        return False
    return not any(_coordinated(low, *((near, q) if q.start() >= near.end() else (q, near)), c1) for q in required)


def _coordinated(low: str, first: re.Match, second: re.Match, end: int) -> bool:
    """True if two places (``first`` before ``second``, in a clause ending at ``end``) are items of one list."""
    between = low[first.end(): second.start()]
    if between.strip() in ("-", "/"):
        return True  # "aorta-coronary arteries"
    if len(between) > _COORDINATION_REACH or _NOT_COORDINATED.search(between):
        return False
    if _COORDINATION.search(between):
        return True
    if "," not in between:
        return False
    # "A, B and C": a conjunction must close the list after the second place
    rest = low[second.end(): min(end, second.end() + _COORDINATION_REACH)]
    stop = _NOT_COORDINATED.search(rest)
    return bool(_COORDINATION.search(rest, 0, stop.start() if stop else len(rest)))


def _shared_predicate(clause: str, b: int, spans: list[tuple[int, int]]) -> str:
    """What a verbless part shares with the subjects it is coordinated with: the clause's predicate after its last
    anchor where "and"/"or" joins the subjects ("Lymph nodes in the prevascular area, lymph nodes in the
    paratracheal region and lymph nodes in the subcarinal region were observed in normal size"), or, in a clause
    without a verb, the trailing comma phrases that name no finding ("..., not pathological"); "" where neither is
    ("Lymphadenopathy in the mediastinum, the other lymph nodes are of normal size": not coordinated)."""
    last = max([end for _, end in spans if end >= b], default=b)
    verb = _PREDICATE.search(clause, last)
    if verb:
        first = min([start for start, _ in spans], default=b)
        return clause[verb.start():] if _JOINED.search(clause, first, verb.start()) else ""
    tail = clause.find(",", last)
    return clause[tail + 1:] if tail >= 0 else ""


def find_mentions(doc: Doc, corrections: list[tuple[int, int, str]] = ()) -> list[Span]:
    """Finding spans of one section doc (labels are CT-RATE names; one span per label and place).

    Rules match inside one sentence, on the lower-cased text, and only in the sentences holding one
    of the rule's keywords (``prefilter.py``); a rule's sentence-wide checks run once per sentence.
    ``corrections`` (start, end, term) replace misspelt words in the text the rules read; the spans
    keep the report's own words and offsets.
    """
    text = doc_text(doc)
    low = lower_same_length(text)
    sents = doc.user_data["sents"]  # (first token, end token, start char, end char), from ctprep_sentences
    fixed = spelling.correct(low, corrections) if corrections else None
    if fixed is not None:
        low = fixed.text
        sents = [(a, b, fixed.to_new(c), fixed.to_new(d)) for a, b, c, d in sents]
    starts = [s[2] for s in sents]
    n = len(sents)
    off_lung: dict[int, bool] = {}  # sentence index -> names another organ and nothing of the lung
    found: list[tuple[int, int, str]] = []
    for c in _COMPILED:
        rule = c.rule
        for i in sentences_with(low, c.words, starts, n):
            s0, e0 = sents[i][2], sents[i][3]
            sentence_ok = None  # requires/excludes on the whole sentence, computed at the first match
            anchors = list(c.rx.finditer(low, s0, e0))
            for m in anchors:
                if rule.window:
                    context = low[max(s0, m.start() - rule.window): min(e0, m.end() + rule.window)]
                    ok = (c.requires is None or c.requires.search(context)) and not (c.excludes and c.excludes.search(context))
                else:
                    if sentence_ok is None:
                        sentence = low[s0:e0]
                        sentence_ok = bool((c.requires is None or c.requires.search(sentence))
                                           and not (c.excludes and c.excludes.search(sentence)))
                    ok = sentence_ok
                if not ok:
                    continue
                if c.excludes_own and any(x.start() < m.end() and m.start() < x.end()
                                          for x in c.excludes_own.finditer(low, s0, e0)):
                    continue
                if (c.excludes_part or c.outside) and _part_excluded(c, low, s0, e0, m, anchors):
                    continue
                if c.rivals and _rival_place(c, low, s0, e0, m):
                    continue
                if rule.lung_only:
                    if i not in off_lung:
                        sentence = low[s0:e0]
                        off_lung[i] = bool(_ORGAN.search(sentence)) and not _LUNG.search(sentence)
                    if off_lung[i]:
                        continue
                found.append((m.start(), m.end(), rule.label))
    for i in sentences_with(low, _EFFUSION_WORDS, starts, n):
        s0, e0 = sents[i][2], sents[i][3]
        for m in EFFUSION.finditer(low, s0, e0):
            found.extend((m.start(), m.end(), label) for label in _effusion_labels(low, s0, e0, m.start() - s0, m.end() - s0))
    for i in sentences_with(low, _EXCEPTION_WORDS, starts, n):
        found.extend(_elliptic_exceptions(low, sents[i][2:], found))
    for i in sentences_with(low, _CONTRAST_WORDS, starts, n):
        found.extend(_elliptic_exceptions(low, sents[i][2:], found, contrast=True))
    if fixed is not None:
        found = [(fixed.to_old(a), fixed.to_old(b, end=True), label) for a, b, label in found]
    merged: dict[str, list[list[int]]] = {}
    # sentence start chars in the report's own text: adjacent matches join only within a sentence (a run-on sentence
    # split at MAX_SENTENCE_TOKENS may have no punctuation at the split: "effusion effusion ...")
    sent_starts = [s[2] for s in doc.user_data["sents"]]
    for start, end, label in sorted(found, key=lambda x: (x[0], -x[1])):
        runs = merged.setdefault(label, [])
        if runs and (start < runs[-1][1] or (_JOIN.fullmatch(text[runs[-1][1]: start])
                                             and bisect.bisect_right(sent_starts, runs[-1][1])
                                             == bisect.bisect_right(sent_starts, start))):
            runs[-1][1] = max(runs[-1][1], end)  # overlapping or adjacent ("calcified atheroma plaques"): one mention
        else:
            runs.append([start, end])
    spans = [doc.char_span(s, e, label=label, alignment_mode="expand") for label, runs in merged.items() for s, e in runs]
    return sorted((s for s in spans if s is not None), key=lambda s: (s.start, s.label_))


@Language.factory("ctprep_findings")
def make_findings(nlp: Language, name: str) -> FindingMatcher:
    return FindingMatcher()


class FindingMatcher:
    """Pipeline component: ``doc.spans["findings"]`` from the vocabulary's rules, reading misspelt terms as spelt."""

    def __init__(self):
        self.speller = spelling.Speller(spelling_table())

    def __call__(self, doc: Doc) -> Doc:
        doc.spans["findings"] = find_mentions(doc, self.speller(doc)) if len(doc) else []
        return doc


def to_mentions(doc: Doc, section: str) -> list[Mention]:
    """Mention records (with attributes) for the finding spans of one section doc.

    Attributes come from the mention's clause (its sentence cut at ; : but however) and, inside it,
    from the words between the neighbouring findings (``attributes.finding_part``).
    """
    sents = doc.user_data["sents"]
    firsts = [s[0] for s in sents]
    text = doc_text(doc)
    cuts: dict[int, tuple[str, list[int], list[int]]] = {}  # sentence -> (text, clause starts, clause ends)
    groups: dict[tuple[int, int, int], list[tuple[Span, int, int]]] = {}  # clause -> its mentions (clause offsets)
    for span in doc.spans.get("findings", []):
        index = bisect.bisect_right(firsts, span.start) - 1
        if index not in cuts:
            stext = text[sents[index][2]: sents[index][3]]
            marks = [m.span() for m in _CLAUSE_END.finditer(stext)]
            cuts[index] = (stext, [0] + [b for _, b in marks], [a for a, _ in marks] + [len(stext)])
        stext, lows, highs = cuts[index]
        s0, e0 = span.start_char - sents[index][2], span.end_char - sents[index][2]
        lo = lows[bisect.bisect_right(lows, s0) - 1]
        hi = highs[bisect.bisect_left(highs, e0)]
        groups.setdefault((index, lo, hi), []).append((span, s0 - lo, e0 - lo))
    out = []
    for (index, lo, hi), members in groups.items():
        clause = A.Clause(cuts[index][0][lo:hi])
        for span, s, e in members:
            # neighbours: the nearest other findings before and after (overlapping ones describe the same words)
            prev_end = max((e2 for _, s2, e2 in members if e2 <= s), default=None)
            next_start = min((s2 for _, s2, e2 in members if s2 >= e), default=None)
            attrs = A.describe(span.label_, clause, s, e, A.finding_part(clause.text, s, e, prev_end, next_start))
            out.append(Mention(
                label=span.label_, text=text[span.start_char: span.end_char], section=section, sentence=index,
                start=span.start_char, end=span.end_char, status=span._.status,
                trigger=span._.trigger.text if span._.trigger is not None else None, **attrs))
    out.sort(key=lambda m: m.start)
    return out
