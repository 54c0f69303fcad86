"""NegEx/ConText-style status of each finding mention: present, negated, uncertain, hypothetical or historical.

Own component rather than medspaCy (not installed, and its default rules are tuned to US English
notes; translated Turkish prose needs "was not detected"-style post-negation and "-" coordinations).
Triggers are found with spaCy's ``PhraseMatcher``; a pre-trigger ("no", "possible") scopes forward and a
post-trigger ("were not observed", "cannot be excluded") backward, both stopping at a terminator
("but", "however", ";", "apart from"), at a passive assertion ("No effusion was detected, atelectasis
is seen": the scope of "no" ends at "was detected"), or after ``MAX_SCOPE`` tokens. Coordinations
("no effusion or pneumothorax", "X and Y were not observed") stay inside one scope; in a telegraphic list (no
auxiliary) a post-trigger does not reach back into an earlier comma-separated item that states a finding of its own
("Effusion on the right, pericardial effusion absent": the right effusion is present), nor in prose does one whose
clause has a subject of its own ("Atelectasis in the right lower lobe, pleural effusion was not detected"); a relative
clause set off by commas asserts nothing of the main clause ("X, which was seen before, was not observed"). Pseudo-negations
("no change in the nodule", "not only", "regressed in size") cancel the negation word they hold,
unless the finding is their own object ("no increase| in heart size": the heart is not enlarged). A bare "is not"
after a finding denies it ("Pleural effusion is not there", "... is not redemonstrated") but before a word of
description ("The nodule is not calcified", "Emphysema is not severe"), and always for lymph nodes.
Resolved findings are absent from this exam: a sentence-wide post-negation ("X, seen before, has resolved")
reaches back over relative clauses but not over a contrast or a persisting finding (``CLAUSE_BREAKS``:
"Consolidation persists but the effusion has resolved"), nor over a comma to a mention of the same finding when a
nearer one is its subject ("Small left effusion, the right effusion has resolved"); "resolved" before a finding
negates only the few words it modifies ("resolved pleural effusion"), not a new phrase ("has resolved and a new ...");
"partially resolved", "not resolved" are pseudo-triggers, and so are size comparatives ("no larger than 5 mm").
A partitive quantifier presupposes its findings ("None of the nodules is calcified": the nodules are there) and
negates them only with a predicate of existence ("None of the nodules is seen") or, for lymph nodes, of size.
Exceptions set their object apart: "Apart from the nodule, the consolidation has resolved" ends the reach of
every trigger of the main clause at the comma that closes the exception, so the nodule stays present; an
exception set off by commas inside a clause ("The opacities, except for the nodule, have resolved") does not
end that clause's own scope, nor do the terminators and assertions inside it. A relative clause about the
excepted finding is part of the exception ("Apart from the nodule, which was described before, ...": the
exception closes at the second comma; "Pleural effusion, except for a small one which is seen on the left, was
not detected" negates the main effusion).
A template's heading takes its status from the value after its colon ("Lymph nodes: Normal.", "Pulmonary nodules: Not
identified."; not "Pleural effusion: No change."). "and" before a new assertion ends a pre-trigger's scope only ("There
is no effusion, and there is mild cardiomegaly", "No pneumothorax and small effusions"); plain "no A and B" is one
negation. A removal negates the device before it ("The chest tube has been removed"), not over "after".
A finding named in a relative clause about an earlier study ("the prior study, which showed an effusion, ...") is
historical where its sentence names the same finding again for this exam (``prior_study_mentions``). A finding
the exam looked for or could not judge ("assessment for lymphadenopathy is limited", "motion limits evaluation for
small nodules", "the lymph nodes cannot be assessed") is hypothetical: neither seen nor excluded, it sets no label.
"""

from __future__ import annotations

import bisect
import re

from spacy.language import Language
from spacy.matcher import PhraseMatcher
from spacy.tokens import Doc, Span
from spacy.util import filter_spans

from ctprep.reports import attributes as A
from ctprep.reports import vocabulary as V

MAX_SCOPE = 30  # tokens a trigger reaches; CT-RATE lists run long ("No enlarged lymph nodes in A, B ... were detected")
#: Inside a coordinated list (no verb between trigger and finding) its commas and conjunctions do not count toward
#: ``MAX_SCOPE``: "No evidence of mediastinal, hilar, ..., subcarinal or paraesophageal lymphadenopathy, pleural
#: effusion, ..., nodules, or emphysema" negates its last item; the list's words still count, and no scope reaches
#: further than ``MAX_LIST_SCOPE`` tokens in all.
_LIST_SEPARATORS = {",", "or", "and", "nor", "/", "&", "and/or"}
MAX_LIST_SCOPE = 2 * MAX_SCOPE
#: Tokens between a pre-modifying negation and its finding ("resolved | left lower lobe | consolidation")
PREMODIFIER_SCOPE = 4
_BREAKS = frozenset(V.CLAUSE_BREAKS)
_PREMODIFIERS = frozenset(V.PREMODIFIER_NEGATION)
_AUX = {"is", "are", "was", "were", "be", "been", "being"}
_EXCEPTIONS = frozenset(V.EXCEPTIONS)
#: Tokens that close an exception's object ("Apart from the nodule|, ..."), unless a relative clause follows.
_CLAUSE_PUNCT = {",", ";", ":"}
_RELATIVE = frozenset(V.RELATIVE_PRONOUNS)
#: Determiners start a new noun phrase: a pre-modifier does not reach over them ("resolved and a new effusion").
_DETERMINERS = {"a", "an", "the"}
#: After one of these "resolved" is a verb, not a pre-modifier ("has resolved and pericardial effusion is new").
_VERB_AUX = _AUX | {"has", "have", "had"}
_NEG_WORDS = {"no", "not", "without"}  # a pseudo-negation starting with one of these negates a mention it runs into
_REMOVED = frozenset(V.REMOVED)
#: What a removal does not reach back over: it is another thing's ("Clips after the gallbladder was removed").
_AFTER = {"after", "following", "post", "s/p", "since", "from"}
#: A post-trigger starting with one of these is a template's value ("Pleural effusion: none"): it answers only
#: the item right before it, not a list ("Small effusion, pneumothorax: none" keeps the effusion).
_TEMPLATE_MARKS = {":", "-"}
#: A template's value that denies its heading's finding: "Lymph nodes: Normal.", "Pleural effusion: No.",
#: "Pulmonary nodules: Not identified." (not "Pleural effusion: No change.", a pseudo-negation).
_TEMPLATE_NEGATIVES = {"no", "none", "normal", "unremarkable", "negative", "absent", "nil", "clear", "not", "nothing"}
#: What parts a template's heading from its value: "Pleural effusion: no.", "Pleural effusion - no." (a dash as its own
#: token: "effusion-related" is one word to the tokenizer's infix rules only with the hyphen between letters)
_TEMPLATE_SEPARATORS = {":", "-", "\u2013", "\u2014"}
#: Words a heading does not hold: a clause ("Effusion is seen: ...") or a list ("Effusion, pneumothorax: none").
_HEADING_BREAKS = {",", ";", ".", "(", ")"} | _VERB_AUX
#: Partitive quantifiers: "none of the nodules is calcified" presupposes the nodules and negates what is said of
#: them; only a predicate of existence ("none of the nodules is seen", "... persists") negates the finding itself.
_PARTITIVES = {"none", "neither"}
_PARTITIVE_HEADS = {"the", "these", "those", "its", "their", "which", "them", "previously", "known", "described"}
#: Predicates that deny the things exist (after an auxiliary, or on their own: "none of them persists").
_EXISTENCE_AFTER_AUX = frozenset(V.ASSERT_VERBS) | {"visible", "present", "there", "apparent", "evident", "identifiable",
                                                   "detectable", "discernible", "still"}
_EXISTENCE = {"remain", "remains", "remained", "persist", "persists", "persisted", "exist", "exists", "existed"}
_PARTITIVE_AUX = _VERB_AUX | {"appear", "appears", "appeared", "seem", "seems", "can", "could", "cannot"}
_ADVERBS = {"also", "now", "still", "anymore", "clearly", "definitely", "currently", "again", "any", "longer", "more",
            "seen", "been"}
#: Words that make a partitive's predicate the lymph nodes' own finding ("none of which is enlarged").
_NODE_SIZE = re.compile(r"\b(enlarg\w*|patholog\w*|significant(ly)? (size|enlarg\w*)|reach\w*|exceed\w*|"
                        r"(larger|greater|more) than|increased in size|lymphadenopath\w*)")
#: A size word right after a bare "none" (a verb may come first): "none enlarged", "none measuring more than 1 cm".
_BARE_NONE_SIZE = re.compile(r"((measuring|being|appearing|is|are|was|were|pathologically)\s+)?" + _NODE_SIZE.pattern
                             + r"|meet\w* (\w+ )?(size )?criteria")

if not Span.has_extension("status"):
    Span.set_extension("status", default="present")
    Span.set_extension("trigger", default=None)


def _words(phrases) -> str:
    return "|".join(r"\s+".join(map(re.escape, p.split())) for p in sorted(phrases, key=len, reverse=True))


#: The text before a mention, from its sentence's start, when the mention lies in a relative clause about an earlier
#: study: "Compared with the prior study, which showed a| ...", "the previous CT (dated ...), in which a| ...".
_PRIOR_CLAUSE = re.compile(
    rf"\b(?:{_words(V.PRIOR_STUDIES)})\s+(?:{_words(V.STUDY_NOUNS)})\b(?:\s+(?:dated|of|from|on|in)\s+[^,;:]{{1,40}}?)?"
    rf"\s*,?\s*(?:(?:which|that)\s+(?:(?:had|has)\s+)?(?:{_words(V.SHOWED)})|(?:in|on)\s+which|where)\b[^,;:()]*$")


#: The text before a mention that an evaluation phrased around an organ looks for: "Evaluation of the mediastinum
#: for| lymphadenopathy is limited", "assessment of the lung bases for| a nodule" (the phrase triggers only name the
#: finding right after their "for").
_LOOKED_FOR = re.compile(r"\b(?:evaluation|assessment|evaluate|assess|evaluating|assessing)\s+of\s+[^,;:()]{1,60}?"
                         r"\bfor(?:\s+(?:a|an|any|the|possible|underlying|small|subtle))*\s*$")


def looked_for_mentions(doc: Doc, mentions, sents) -> list[Span]:
    """Present mentions that an evaluation of an organ was made for (``hypothetical``, as "evaluation for")."""
    firsts = [s[0] for s in sents]
    out = []
    for m in mentions:
        start = sents[bisect.bisect_right(firsts, m.start) - 1][0]
        if m._.status == "present" and _LOOKED_FOR.search(doc[start: m.start].text.lower()):
            out.append(m)
    return out


def prior_study_mentions(doc: Doc, mentions, sents) -> list[Span]:
    """Mentions that name an earlier study's finding while their sentence names the same finding for this exam.

    "Compared with the prior study, which showed a right pleural effusion, there is no effusion now": the first
    effusion is the prior study's (``historical``); the second says what this exam shows. Alone in its sentence
    such a mention keeps its status: "Compared with the previous exam, which showed nodules, no change is seen"
    says the nodules are still there.
    """
    firsts = [s[0] for s in sents]
    by_sentence: dict[int, list[Span]] = {}
    for m in mentions:
        by_sentence.setdefault(bisect.bisect_right(firsts, m.start) - 1, []).append(m)
    out = []
    for i, group in by_sentence.items():
        start = sents[i][0]
        prior = [m for m in group if _PRIOR_CLAUSE.search(doc[start: m.start].text.lower())]
        for m in prior:
            current = [c for c in group if c not in prior and c.label_ == m.label_]
            # "... which showed bilateral effusions, the right effusion has resolved (and the left persists)": this
            # exam's mention names one side only, so it does not speak for the other
            if current and not any(_side(doc, c) and _side(doc, c) != _side(doc, m) for c in current):
                out.append(m)
    return out


def _side(doc: Doc, mention: Span) -> str | None:
    """The side of a mention from its words and the few before it (the attributes' laterality of that span)."""
    return A.laterality(doc[max(mention.start - 4, 0): mention.end].text)


def build_phrase_matcher(nlp: Language) -> PhraseMatcher:
    """PhraseMatcher over lower-cased tokens for the trigger lists (phrases tokenised like the reports)."""
    matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
    lists = {"PRE_NEG": V.PRE_NEGATION, "POST_NEG": V.POST_NEGATION, "PSEUDO": V.PSEUDO_NEGATION,
             "PRE_UNC": V.PRE_UNCERTAIN, "POST_UNC": V.POST_UNCERTAIN, "TERM": V.TERMINATORS,
             "PRE_HYP": V.PRE_HYPOTHETICAL, "POST_HYP": V.POST_HYPOTHETICAL,
             "SENT_NEG": V.SENTENCE_NEGATION, "CURRENT": V.CURRENT_EXAM, "PRE_END": V.PRE_SCOPE_ENDS,
             "BREAK": [w for w in V.CLAUSE_BREAKS if w not in V.TERMINATORS]}
    for kind, phrases in lists.items():
        matcher.add(kind, [nlp.make_doc(p.lower()) for p in phrases])
    return matcher


def build_trigger_matcher(nlp: Language) -> PhraseMatcher:
    """PhraseMatcher for the open pattern "(aux) not (be) <seen-verb>", spelled out (~5,000 phrases).

    The same language as a token ``Matcher`` pattern with optional tokens, but a token Matcher whose
    first token is optional starts a state at every token and cost more than the rest of the pipeline.
    """
    matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
    # "(was) not (been) detected", "could not be seen", "wasn't observed" ("can't" -> "ca" "n't")
    aux = [[]] + [[w] for w in sorted(_AUX | {"has", "have", "could", "can", "did", "do", "does", "ca", "wo"})]
    be = [[], ["be"], ["been"]]
    phrases = [Doc(nlp.vocab, words=a + [neg] + b + [seen])
               for a in aux for neg in ("not", "n't", "never") for b in be for seen in V.SEEN_VERBS]
    matcher.add("POST_NEG", phrases)
    return matcher


def _exception_close(doc: Doc, start: int, end: int) -> int | None:
    """The token that closes an exception's object begun at ``start``: the first , ; or : before ``end`` that does not
    open a relative clause about the excepted finding ("except for a small one, which is seen on the left, ..."); None
    if none does."""
    for i in range(start, end):
        if doc[i].text in _CLAUSE_PUNCT and not (doc[i].text == "," and i + 1 < end and doc[i + 1].lower_ in _RELATIVE):
            return i
    return None


def _parenthetical(doc: Doc, term: Span, end: int) -> bool:
    """True if ``term`` is an exception set off by commas that close before token ``end``: the clause around it
    goes on ("The opacities, except for the nodule, have resolved")."""
    return (term.text.lower() in _EXCEPTIONS and term.start > 0 and doc[term.start - 1].text == ","
            and _exception_close(doc, term.end, end) is not None)


def _set_apart(doc: Doc, terms: list[Span], start: int, end: int) -> list[tuple[int, int]]:
    """Token ranges [exception word, closing comma) of the exceptions set off by commas inside [start, end).

    What such an exception holds, relative clauses included, is no part of the clause around it: its terminators
    and assertions do not end that clause's scopes ("Pleural effusion, except for a small one which is seen on the
    left, was not detected": the main effusion is negated)."""
    return [(t.start, _exception_close(doc, t.end, end)) for t in terms
            if start <= t.start and t.end <= end and _parenthetical(doc, t, end)]


def _relative_clauses(doc: Doc, start: int, end: int) -> list[tuple[int, int]]:
    """Token ranges [relative pronoun, closing comma) of the relative clauses set off by commas inside [start, end):
    what they assert is said of the finding before them, not of the clause's predicate ("Consolidation in the right
    lower lobe, which was described before, was not observed": the consolidation is negated)."""
    ranges = []
    for i in range(start, end - 1):
        if doc[i].text == "," and doc[i + 1].lower_ in _RELATIVE:
            close = next((j for j in range(i + 2, end) if doc[j].text in _CLAUSE_PUNCT), None)
            if close is not None:
                ranges.append((i + 1, close))
    return ranges


def _outside(i: int, ranges: list[tuple[int, int]]) -> bool:
    return not any(a <= i < b for a, b in ranges)


def _asserted(doc: Doc, start: int, end: int, apart: list[tuple[int, int]] = ()) -> bool:
    """True if tokens [start, end), outside the ranges ``apart``, hold a passive assertion ("is seen", "were observed")
    or a double negation ("is not absent")."""
    return any(i > start and _outside(i, apart)
               and ((doc[i].lower_ in V.ASSERT_VERBS and doc[i - 1].lower_ in _AUX)
                    or (doc[i].lower_ == "absent" and doc[i - 1].lower_ == "not"))
               for i in range(start, end))


def _scope_length(doc: Doc, start: int, end: int) -> int:
    """How many tokens of [start, end) count toward ``MAX_SCOPE``: all of them in prose (a verb between), only the
    words in a list, whose commas and conjunctions only set its items side by side (``_LIST_SEPARATORS``)."""
    tokens = [doc[i].lower_ for i in range(start, end)]
    if any(t in _VERB_AUX for t in tokens):
        return end - start
    return sum(t not in _LIST_SEPARATORS for t in tokens)


def _blocked(doc: Doc, terms: list[Span], start: int, end: int) -> bool:
    """True if something between token ``start`` and ``end`` ends a trigger's scope."""
    if end - start > MAX_SCOPE and (end - start > MAX_LIST_SCOPE or _scope_length(doc, start, end) > MAX_SCOPE):
        return True
    apart = _set_apart(doc, terms, start, end) + _relative_clauses(doc, start, end)
    return (any(start <= t.start and t.end <= end and _outside(t.start, apart) for t in terms)
            or _asserted(doc, start, end, apart))


def exception_end(doc: Doc, mention: Span, sent: Span, terms: list[Span]) -> int | None:
    """End token of the exception that holds ``mention`` ("Apart from the nodule|, the rest has resolved"): the
    comma (or ; :) that closes the nearest exception word before it; None if none does (nothing to set apart)."""
    exceptions = [t for t in terms if t.end <= mention.start and t.text.lower() in _EXCEPTIONS]
    if not exceptions:
        return None
    i = _exception_close(doc, exceptions[-1].end, sent.end)
    return i if i is not None and i >= mention.end else None


def _modifies(doc: Doc, terms: list[Span], trigger: Span, mention: Span) -> bool:
    """True if ``trigger`` stands right before the mention as its modifier ("resolved right pleural effusion"),
    not before a new clause ("... resolved but atelectasis", "... resolved, consolidation")."""
    gap = doc[trigger.end: mention.start]
    return (len(gap) <= PREMODIFIER_SCOPE and not any(tok.is_punct and tok.text != "-" for tok in gap)
            and not any(tok.lower_ in _DETERMINERS for tok in gap)
            and not any(tok.lower_ in _VERB_AUX for tok in doc[max(0, trigger.start - 2): trigger.start])
            and not _blocked(doc, terms, trigger.end, mention.start))


def _reaches_back(doc: Doc, terms: list[Span], breaks: list[Span], mention: Span, trigger: Span) -> bool:
    """True if the sentence-wide negation ``trigger`` reaches back to ``mention``: no clause break between them, but
    for those inside an exception set off by commas ("The opacities, except for the nodule which persists, have
    resolved"), and no nearer mention of the same finding that the negation is said of (``_said_of_nearer``)."""
    apart = _set_apart(doc, terms, mention.end, trigger.start)
    return (not any(mention.end <= b.start and b.end <= trigger.start and _outside(b.start, apart) for b in breaks)
            and not _said_of_nearer(doc, mention, trigger))


#: Words that join two mentions under one predicate ("The right effusion, as well as the left one, has resolved",
#: "The left effusion, together with the right one, has resolved", "The left effusion, like the right one, ...").
_COORDINATORS = {"and", "or", "nor", "as", "along", "&", "and/or", "together", "like", "plus"}
#: Words of a predicate said of several mentions ("Right pleural effusion, left pleural effusion, both resolved",
#: "..., all resolved", "... have resolved"), or a colon that closes a list ("..., consolidation in the LLL: resolved").
_COLLECTIVE = {"both", "all", "each", "they", "these", "those", "have", "are", "were", ":"}


def _said_of_nearer(doc: Doc, mention: Span, trigger: Span) -> bool:
    """True if a mention of the same finding between ``mention`` and the sentence-wide negation ``trigger`` is parted
    from it by a comma and no conjunction: the negation is that one's ("Small left pleural effusion, the right pleural
    effusion has resolved", "Stable nodule in the right upper lobe, the left lower lobe nodule no longer seen"); not
    when the predicate is said of them all (``_COLLECTIVE``: "Right pleural effusion, left pleural effusion, both
    resolved")."""
    findings = doc.spans["findings"]
    starts = doc.user_data.get("finding_starts")
    if starts is None or len(starts) != len(findings):
        starts = doc.user_data["finding_starts"] = [f.start for f in findings]  # in text order
    for k in range(bisect.bisect_left(starts, mention.end), bisect.bisect_left(starts, trigger.start)):
        other = findings[k]
        if other.label_ == mention.label_:
            gap = doc[mention.end: other.start]
            if (any(tok.text == "," for tok in gap) and not any(tok.lower_ in _COORDINATORS for tok in gap)
                    and not any(tok.lower_ in _COLLECTIVE for tok in doc[other.end: trigger.end])):
                return True
    return False


def _other_item(doc: Doc, sent: Span, mention: Span, trigger: Span) -> bool:
    """True if the post-trigger ``trigger`` ends another item of a telegraphic list than the mention's, and the
    mention's item states a finding of its own: "Effusion on the right, pericardial effusion absent" keeps the right
    effusion. Items are ``attributes.list_item``'s (commas separate them in a clause without an auxiliary; a
    conjunction closes a list that shares its predicate; a clause in prose is one item: "Pleural effusion, pericardial
    effusion and pneumothorax were not detected"). An item that only names its finding may belong to the list the
    predicate closes ("Pleural effusion, pericardial effusion absent": both negated)."""
    text = doc.user_data.get("text") or doc.text
    if "," not in text[mention.end_char: trigger.start_char]:
        return False  # no comma, one item (the common case: nothing more to read)
    s0, s1 = sent.start_char, sent.end_char
    m0, m1, t0 = mention.start_char - s0, mention.end_char - s0, trigger.start_char - s0
    stext = text[s0:s1]
    # the clause holding both (a terminator between them would have ended the scope already)
    lo = max((m.end() for m in A.CLAUSE_END.finditer(stext, 0, m0)), default=0)
    hi = next((m.start() for m in A.CLAUSE_END.finditer(stext, trigger.end_char - s0)), len(stext))
    clause = A.Clause(stext[lo:hi])
    a, b = A.list_item(clause, m0 - lo, m1 - lo)
    if b <= t0 - lo:
        return A.describes(clause.text[a:b])
    # prose: a comma splice whose second clause has a subject of its own ("Atelectasis in the right lower lobe,
    # pleural effusion was not detected"): the predicate answers that subject, not a finding the first phrase states
    a, b = A.own_phrase(clause, m0 - lo, m1 - lo)
    return (b <= t0 - lo and A.describes(clause.text[a:b])
            and any(b + lo + s0 <= m.start_char and m.end_char <= trigger.start_char for m in doc.spans["findings"]))


def _template_value(doc: Doc, mention: Span, sent: Span, triggers: list[Span]) -> Span | None:
    """The value that denies the finding of a template's heading ("Lymph nodes: Unremarkable.", "Lymphadenopathy: Not
    present."), from the colon to the end of its negation; None if the mention heads no such value.

    The mention must end its heading: a few words may follow it ("Lymph nodes, mediastinal: ..." is a list, not a
    heading), and the value must start with a negation or a normal statement, not a pseudo-negation ("Pleural
    effusion: No change.") nor a description ("Hiatal hernia: Small.").
    """
    colon = next((j for j in range(mention.end, min(sent.end, mention.end + 6))
                  if doc[j].text in _TEMPLATE_SEPARATORS or doc[j].lower_ in _HEADING_BREAKS), None)
    if colon is None or doc[colon].text not in _TEMPLATE_SEPARATORS or colon + 1 >= sent.end:
        return None
    v = colon + 1
    words = [t for t in triggers if t.start == v]
    if any(t.label_ == "PSEUDO" for t in words):
        return None
    if doc[v].lower_ == "not" and not any(t.label_ == "POST_NEG" and len(t) > 1 for t in words):
        return None  # "Not seen", "Not enlarged"; not "Not changed"
    value = " ".join(tok.lower_ for tok in doc[v: min(sent.end, v + 3)])
    if doc[v].lower_ in _TEMPLATE_NEGATIVES or value.startswith("within normal"):
        end = max((t.end for t in words), default=v + (3 if value.startswith("within normal") else 1))
        return doc[colon: min(end, sent.end)]
    return None


def _partitive(doc: Doc, t: Span, sent: Span) -> bool:
    """``t`` is "none"/"neither" followed by "of the|these|which|them ...": a quantifier over things presupposed."""
    return (t.text.lower() in _PARTITIVES and t.end + 1 < sent.end and doc[t.end].lower_ == "of"
            and doc[t.end + 1].lower_ in _PARTITIVE_HEADS)


def _predicate_end(doc: Doc, start: int, sent: Span) -> int:
    """End of the clause that starts at token ``start`` (its next , ; : or the sentence end)."""
    return next((j for j in range(start, sent.end) if doc[j].text in _CLAUSE_PUNCT or doc[j].text == "."), sent.end)


def _denies_existence(doc: Doc, start: int, end: int) -> bool:
    """Whether the predicate in tokens [start, end) says the things are absent ("is seen", "are present", "persists")."""
    after_aux = False
    for tok in doc[start:end]:
        w = tok.lower_
        if w in _EXISTENCE:
            return True
        if w in _PARTITIVE_AUX:
            after_aux = True
        elif after_aux and w in _EXISTENCE_AFTER_AUX:
            return True
        elif after_aux and w not in _ADVERBS:
            after_aux = False
    return False


def _partitive_status(doc: Doc, mention: Span, sent: Span, t: Span) -> str | None:
    """Status a partitive quantifier gives ``mention``, or None where it is no partitive about it.

    Before the finding ("None of the nodules is calcified"): the nodules are there, what is said of them is
    negated, unless that is their existence ("None of the nodules is seen") or, for lymph nodes, whose mention is
    the finding only as far as they are enlarged, anything at all. After it ("Lymph nodes, none of which is
    enlarged"): only lymph nodes, and only a predicate of size, lose their finding.
    """
    if not _partitive(doc, t, sent):
        # a bare "none" right before a size word: "Several small mediastinal lymph nodes, none enlarged by CT criteria"
        if (t.text.lower() == "none" and mention.label_ == "Lymphadenopathy" and t.start > mention.end
                and doc[t.start - 1].text == ","
                and _BARE_NONE_SIZE.match(doc[t.end: _predicate_end(doc, t.end, sent)].text.lower())
                and not any(doc[j].text in {";", ":"} for j in range(mention.end, t.start))):
            return "negated"
        return None
    if t.end <= mention.start <= t.end + 6 and not any(doc[j].text in _CLAUSE_PUNCT for j in range(t.end, mention.start)):
        end = _predicate_end(doc, mention.end, sent)
        if mention.label_ == "Lymphadenopathy" or _denies_existence(doc, mention.end, end):
            return "negated"
        return "present"
    if t.start >= mention.end and doc[t.start - 1].text == "," and mention.label_ == "Lymphadenopathy":
        end = _predicate_end(doc, t.end, sent)
        if _NODE_SIZE.search(doc[t.end:end].text.lower()) and not any(
                doc[j].text in {";", ":"} for j in range(mention.end, t.start)):
            return "negated"
    return None


def _closed_lists(doc: Doc, sent: Span) -> list[bool]:
    """For each token of ``sent`` (by offset from its start), whether the text after it runs into a ", or"/", nor" before
    any verb, ";" or ":" (what ``_in_closed_list`` asks of a comma terminator ending there).

    Computed once per sentence, right to left, and kept in ``doc.user_data``: asked afresh for every mention x trigger
    the walk made a run-on sentence (a dictated report without full stops) cost the cube of its length.
    """
    cache = doc.user_data.setdefault("closed_lists", {})
    key = (sent.start, sent.end)
    if key not in cache:
        words = [tok.lower_ for tok in sent]
        closed = [False] * (len(words) + 1)
        for k in range(len(words) - 2, -1, -1):  # the last token has no word after it to close a list with
            w = words[k]
            if w in _VERB_AUX or w in V.SEEN_VERBS or w in (";", ":"):
                closed[k] = False
            elif w == "," and words[k + 1] in ("or", "nor"):
                closed[k] = True
            else:
                closed[k] = closed[k + 1]
        cache[key] = closed
    return cache[key]


def _in_closed_list(doc: Doc, t: Span, sent: Span) -> bool:
    """True if ``t`` is a comma terminator (", mild", ", trace") inside a list that ", or"/", nor" closes later in its
    clause, before any verb: "No focal consolidation, small pleural effusion, or pneumothorax" denies all three."""
    if t.label_ not in ("TERM", "PRE_END") or doc[t.start].text != ",":
        return False
    return t.end < sent.end and _closed_lists(doc, sent)[t.end - sent.start]


#: A bare "is not" ("are/was/were not") after a finding denies it ("Pleural effusion is not there", "... is not
#: redemonstrated", "... is not in evidence", "... are not perceptible") but before a word that describes the finding:
#: then it says what the finding is not, and the finding is there ("The nodule is not calcified", "The effusion is not
#: loculated", "Emphysema is not severe", "is not new", "The consolidation is not as dense as before"). The words of
#: description are listed (``_DESCRIPTIONS``); any other word keeps the denial, which was the rule before them.
_BARE_NOT = {"is not", "are not", "was not", "were not"}
_EXISTENCE_PREDICATES = frozenset(V.SEEN_VERBS) | {
    "there", "visible", "apparent", "evident", "identifiable", "detectable", "discernible", "appreciable",
    "demonstrable", "observable", "distinguishable", "delineated", "depicted", "likely"}
_DESCRIPTIONS = frozenset({
    "calcified", "calcific", "loculated", "septated", "new", "large", "larger", "big", "bigger", "huge", "massive",
    "bulky", "small", "smaller", "severe", "marked", "moderate", "extensive", "significant", "substantial",
    "changed", "unchanged", "different", "as", "more", "less", "further", "dense", "denser", "solid", "cystic",
    "spiculated", "lobulated", "circumscribed", "marginated", "homogeneous", "heterogeneous", "suspicious",
    "typical", "specific", "simple", "complex", "free", "free-flowing", "mobile", "compressive", "progressive",
    "progressing", "growing", "grown", "improved", "worse", "worsened", "better", "decreased", "reduced",
    "diffuse", "widespread", "confluent", "cavitated", "cavitary", "enhancing", "symptomatic", "hemorrhagic",
    "haemorrhagic", "tense", "sizable", "sizeable", "prominent", "pronounced", "advanced"})
#: Words between "is not" and its predicate: adverbs ("not clearly seen", "not well seen", "not now seen", "not
#: clearly-defined").
_NOT_ADVERBS = (_ADVERBS - {"more"}) | {"well", "be", "-", "very", "too", "so", "that", "particularly"}


def _describes_not(doc: Doc, mention: Span, t: Span, sent: Span) -> bool:
    """True if ``t`` is a bare "is not" that goes on with a description of the finding (``_DESCRIPTIONS``), not a
    denial of it. Lymph nodes are a finding only as far as they are enlarged: whatever a bare "is not" says of them
    denies it ("The mediastinal lymph nodes are not of pathological size"), as a partitive's predicate does."""
    if mention.label_ == "Lymphadenopathy" or t.text.lower() not in _BARE_NOT:
        return False
    j = t.end
    while (j < sent.end and doc[j].lower_ not in _EXISTENCE_PREDICATES and doc[j].lower_ not in _DESCRIPTIONS
           and (doc[j].lower_ in _NOT_ADVERBS or doc[j].lower_.endswith("ly"))):
        j += 1
    return j < sent.end and doc[j].lower_ in _DESCRIPTIONS


def mention_status(doc: Doc, mention: Span, sent: Span, triggers: list[Span]) -> tuple[str, Span | None]:
    """(status, trigger) for one mention, from the triggers of its sentence ``sent`` (in text order)."""
    value = _template_value(doc, mention, sent, triggers)
    if value is not None:
        return "negated", value  # "Lymph nodes: Normal."
    # a comma's new item inside a list that ", or" closes is the list's ("No pneumothorax, dense consolidation, or
    # pleural effusion": all three denied), not an asserted item
    triggers = [t for t in triggers if not _in_closed_list(doc, t, sent)]
    terms = [t for t in triggers if t.label_ == "TERM"]
    pre_terms = terms + [t for t in triggers if t.label_ == "PRE_END"]  # "No effusion and mild atelectasis"
    breaks = [t for t in triggers if t.label_ == "BREAK" or (t.label_ == "TERM" and t.text.lower() in _BREAKS)]
    found: dict[str, Span] = {}
    limit = exception_end(doc, mention, sent, terms)  # triggers from here on belong to the main clause
    current_starts = {t.start for t in triggers if t.label_ == "CURRENT"}
    for t in triggers:
        if t.label_ == "PSEUDO" and t.start < mention.start < t.end and doc[t.start].lower_ in _NEG_WORDS:
            found.setdefault("NEG", t)  # the finding is the pseudo-trigger's object: "no increase| in heart size"
            continue
        if t.start < sent.start or t.end > sent.end or t.label_ in {"TERM", "PSEUDO", "CURRENT", "BREAK", "PRE_END"}:
            continue
        if t.label_ == "PRE_NEG" and (status := _partitive_status(doc, mention, sent, t)) is not None:
            if status == "negated":
                found.setdefault("NEG", t)
            continue  # "none of the nodules is calcified": the nodules are there
        if (t.label_ == "PRE_NEG" and t.text.lower() == "none" and t.start == mention.end
                and (t.end == sent.end or doc[t.end].is_punct)):
            found.setdefault("NEG", t)  # a template's value without its colon: "Pleural effusion none."
            continue
        if limit is not None and t.start >= limit:
            continue
        if (t.start >= mention.end and (t.label_ == "SENT_NEG" or (t.label_ == "POST_NEG" and t.end in current_starts))
                and _reaches_back(doc, terms, breaks, mention, t)):
            found.setdefault("NEG", t)  # sentence-wide: "X, seen before, has disappeared"
            continue
        if t.label_ == "SENT_NEG":
            if t.end <= mention.start and t.text.lower() in _PREMODIFIERS and _modifies(doc, terms, t, mention):
                found["NEG"] = t  # "resolved pleural effusion"
            continue
        if t.label_.startswith("PRE") and t.end <= mention.start and not _blocked(doc, pre_terms, t.end, mention.start):
            found[t.label_[4:]] = t  # triggers come in text order: the nearest pre-trigger wins
        elif (t.label_.startswith("POST") and t.start >= mention.end and not _blocked(doc, terms, mention.end, t.start)
              and (t.start == mention.end or doc[t.start].lower_ not in _TEMPLATE_MARKS)
              and not (t.text.lower() in _REMOVED and any(tok.lower_ in _AFTER for tok in doc[mention.end: t.start]))
              and not _other_item(doc, sent, mention, t) and not _describes_not(doc, mention, t, sent)):
            found.setdefault(t.label_[5:], t)  # the nearest post-trigger wins
        elif mention.start <= t.start and t.end <= mention.end and t.label_ in {"PRE_NEG", "POST_NEG"}:
            found.setdefault("NEG", t)  # "heart size is not increased" lies inside the mention
    if "NEG" in found:
        return "negated", found["NEG"]
    if "HYP" in found:
        return "hypothetical", found["HYP"]  # looked for, not judged: "assessment for lymphadenopathy is limited"
    if "UNC" in found:
        return "uncertain", found["UNC"]
    return "present", None


#: Where the clause of a two-way trigger ends (``_triggers``): punctuation that parts clauses or list items, and the
#: words that start another clause or attach another thing. A finding beyond one of these is not what the trigger
#: is about: "Pleural effusion absent and emphysema present", "Pleural effusion is absent but emphysema is noted",
#: "Absent right kidney with pleural effusion". Not "-" or "/", which join words ("free-flowing", "and/or").
_CLAUSE_ENDS = {",", ";", ":", ".", "!", "?", "(", ")", "and", "or", "nor", "but", "with", "without", "however",
                "although", "though", "whereas", "while", "yet", "which", "given", "than"}
#: Two-way triggers that are a hedged copula: they look back only when what follows them says the finding is there
#: (nothing, an existence word or a place: "Atelectasis may be present", "Emphysema may be seen in the upper lobes");
#: before another predicate they hedge that predicate, not the finding ("Pleural effusion may be due to heart
#: failure") and stay the pre-trigger they always were.
_COPULAR_HEDGES = {"may be"}
#: clause ends that join list items rather than clauses
_LIST_JOINERS = {"and", "or", "nor"}


def _triggers(doc: Doc, sent: Span, spans: list[Span], mention_starts: list[int]) -> list[Span]:
    """The triggers of a sentence in text order; the longest wins where they overlap ("can not be excluded" over
    "not"). ``mention_starts``: the sorted start tokens of the finding mentions.

    A phrase that is both a pre- and a post-trigger ("absent", "ruled out", "excluded", "may be", "unlikely", "less
    likely", "improbable") is a pre-trigger only if a finding mention starts after it before its clause ends
    (``_CLAUSE_ENDS``): "Absent pleural effusion", "Lungs clear, absent pleural effusion", "May be consolidation",
    "Atelectasis, less likely consolidation". Otherwise it looks back, to a finding before it or to none:
    "Atelectasis may be present", "Pericardial effusion ruled out by echo", "Pleural effusion absent today",
    "Consolidation unlikely given the clinical picture", and "Absent right kidney with pleural effusion" keeps the
    effusion. (Reading it by the next word alone made "ruled out by", "absent bilaterally" pre-triggers.)
    ``filter_spans`` alone kept one label of an extent, always the same, so "absent" never negated a finding after it
    and "may be" never hedged one before it.

    "X is less likely than Y" compares two candidates: X is hedged (a post-hedge) and Y, the likelier, is hedged as
    "likely Y" was before "less likely" was a trigger (a pre-hedge); neither is denied.
    """
    labels: dict[tuple[int, int], set[str]] = {}
    for t in spans:
        labels.setdefault((t.start, t.end), set()).add(t.label_)
    out = []
    for t in filter_spans(spans):
        kind = t.label_.split("_", 1)[-1]
        both = {f"PRE_{kind}", f"POST_{kind}"}
        if t.label_ in both and both <= labels[(t.start, t.end)]:
            if t.text.lower().endswith("likely") and t.end < sent.end and doc[t.end].lower_ == "than":
                out += [Span(doc, t.start, t.end, label="POST_UNC"), Span(doc, t.start, t.end, label="PRE_UNC")]
                continue
            clause_end = next((j for j in range(t.end, sent.end) if doc[j].lower_ in _CLAUSE_ENDS), sent.end)
            i = bisect.bisect_left(mention_starts, t.end)
            pre = i < len(mention_starts) and mention_starts[i] < clause_end
            if not pre:
                # a trigger that opens its clause has nothing to look back to: it reads forward past a coordinating
                # "and"/"or" ("Ruled out pleural and pericardial effusion", whose mention starts at "effusion";
                # "Excluded pneumothorax or pleural effusion"), not past a stronger clause end ("Absent right kidney
                # with pleural effusion" keeps the effusion)
                clause_start = next((j + 1 for j in range(t.start - 1, sent.start - 1, -1)
                                     if doc[j].lower_ in _CLAUSE_ENDS), sent.start)
                strong_end = next((j for j in range(t.end, sent.end) if doc[j].lower_ in _CLAUSE_ENDS
                                   and doc[j].lower_ not in _LIST_JOINERS), sent.end)
                before = bisect.bisect_left(mention_starts, clause_start) < bisect.bisect_left(mention_starts, t.start)
                pre = not before and i < len(mention_starts) and mention_starts[i] < strong_end
            if not pre and t.text.lower() in _COPULAR_HEDGES and t.end < clause_end:
                nxt = doc[t.end].lower_
                pre = nxt not in _EXISTENCE_PREDICATES and nxt not in V.PLACE_PREPOSITIONS
            t = Span(doc, t.start, t.end, label=f"PRE_{kind}" if pre else f"POST_{kind}")
        out.append(t)
    return out


@Language.factory("ctprep_context")
def make_context(nlp: Language, name: str) -> ReportContext:
    return ReportContext(nlp)


class ReportContext:
    """Pipeline component: sets ``span._.status`` and ``span._.trigger`` on ``doc.spans["findings"]``."""

    def __init__(self, nlp: Language):
        self.phrases = build_phrase_matcher(nlp)
        self.matcher = build_trigger_matcher(nlp)

    def __call__(self, doc: Doc) -> Doc:
        mentions = doc.spans.get("findings", [])
        if not len(mentions):
            return doc
        sents = doc.user_data["sents"]
        firsts = [s[0] for s in sents]
        mention_starts = sorted(m.start for m in mentions)
        by_sentence: dict[int, tuple[Span, list[Span]]] = {}  # triggers found once per sentence holding a mention
        for m in mentions:
            i = bisect.bisect_right(firsts, m.start) - 1
            if i not in by_sentence:
                sent = doc[sents[i][0]: sents[i][1]]
                by_sentence[i] = (sent, _triggers(doc, sent, self.phrases(sent, as_spans=True)
                                                  + self.matcher(sent, as_spans=True), mention_starts))
            m._.status, m._.trigger = mention_status(doc, m, *by_sentence[i])
        for m in prior_study_mentions(doc, mentions, sents):
            m._.status, m._.trigger = "historical", None
        for m in looked_for_mentions(doc, mentions, sents):
            m._.status, m._.trigger = "hypothetical", None
        return doc
