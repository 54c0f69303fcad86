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
#: A lone UTF-16 surrogate ("\ud800" escaped in JSON input, or text decoded with errors="surrogateescape") is no
#: character: spaCy and every UTF-8 writer raise on it, which stopped a whole --jsonl file. U+FFFD takes its place,
#: one character for one, as errors="replace" would.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_QUOTES = (("\u201c", '"'), ("\u201d", '"'), ("\u201e", '"'), ("\u2033", '"'), ("\u2018", "'"), ("\u2019", "'"))


def replace_surrogates(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD; nothing else changes (the cascade's prompts, which take no other
    normalisation: a prompt's text decides its volume)."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def normalise_lines(text: object) -> str:
    """Normalised text that keeps line breaks (the section splitter looks for headers at line starts)."""
    if text is None:
        return ""
    s = replace_surrogates(str(text))
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


#: A line break between two items of a list typed without closing punctuation ("No pleural effusion\nMild
#: cardiomegaly", "- No effusion\n- Mild cardiomegaly"): the line ends in a word and the next opens an item (a bullet,
#: a number, a capitalised word). A sentence wrapped across lines goes on in lower case ("no pleural\neffusion").
_ITEM_BREAK = re.compile(r"(?<=[\w)%])\n(?=[-*+]\s|\d+[.)]\s|[A-Z][a-z]|(?P<caps>[A-Z][A-Z\s]))")
#: ... unless the line ends half-way through a phrase ("There is no evidence of\nPneumonia").
_OPEN_END = re.compile(r"\b(and|or|nor|of|the|a|an|with|without|in|on|at|to|for|from|by|no|not|is|are|was|were|"
                       r"than|as|into|within|measuring|left|right)$", re.IGNORECASE)
#: In capitals a line's case cannot tell an item from a wrapped sentence: an all-capitals line before one that opens
#: with a capitalised word ends an item only in text without full stops ("NO PLEURAL EFFUSION\nMILD CARDIOMEGALY", a
#: list), while text that ends its sentences with full stops wraps them ("NO PLEURAL\nEFFUSION OR CONSOLIDATION.").
_FULL_STOP = re.compile(r"(?<![\d\s])[.!?](?=\s|$)")
#: ... and even there a line goes on if it ends with a word that needs its noun ("NO EVIDENCE OF PLEURAL\nEFFUSION",
#: "NO SIGNIFICANT MEDIASTINAL\nLYMPHADENOPATHY", "SMALL RIGHT PLEURAL\nEFFUSION") or the next line opens with a
#: joining word ("THERE IS NO PLEURAL EFFUSION\nOR PERICARDIAL EFFUSION", "NO NODULES, MASSES\nOR CONSOLIDATION").
_CAPS_OPEN_END = re.compile(r"\b(PLEURAL|PERICARDIAL|MEDIASTINAL|HILAR|AXILLARY|SUPRACLAVICULAR|PULMONARY|LUNG|CARDIAC|"
                            r"HIATAL|HIATUS|AORTIC|CORONARY|ARTERY|LYMPH|GROUND|GROUND-GLASS|RIGHT|LEFT|BILATERAL|"
                            r"UPPER|LOWER|MIDDLE|SMALL|MILD|MODERATE|SEVERE|LARGE|TRACE|MINIMAL|SIGNIFICANT|FOCAL|"
                            r"SUSPICIOUS|ENLARGED|CALCIFIED|PARASEPTAL|CENTRILOBULAR|SUBSEGMENTAL|ANY|ACUTE|OTHER)$")
_CAPS_JOIN = re.compile(r"(OR|AND|NOR|WITH|WITHOUT|OF|TO|IN|ON|AT|BY|FOR|FROM|AS|BUT|IS|ARE|WAS|WERE|HAS|HAVE|"
                        r"WHICH|THAT|&)\b")
_LOWER = re.compile(r"[a-z]")


def normalise_items(text: object) -> str:
    """``normalise(text)`` but for the line breaks that part list items, kept as "\\n" (which ends a sentence for the
    parser). A "\\n" stands where ``normalise`` puts a space, so the text has the same length and char offsets."""
    lines = normalise_lines(text)
    if "\n" not in lines:
        return lines
    out = []
    pos = 0
    stops = None  # whether the text has full stops, found at its first all-capitals break
    for m in _ITEM_BREAK.finditer(lines):
        if m["caps"]:
            if stops is None:
                stops = bool(_FULL_STOP.search(lines))
            if (stops or _LOWER.search(lines, lines.rfind("\n", 0, m.start()) + 1, m.start())
                    or _CAPS_OPEN_END.search(lines, pos, m.start()) or _CAPS_JOIN.match(lines, m.end())):
                continue
        if not _OPEN_END.search(lines, pos, m.start()):
            out.append(lines[pos: m.start()].replace("\n", " ") + "\n")
            pos = m.end()
    out.append(lines[pos:].replace("\n", " "))
    return "".join(out)


#: A pair of quotation marks around a term ('No "tree-in-bud" nodularity or consolidation'). CT-RATE's text dumps part
#: impression items with a '"' too ('... right lung " Minimal emphysema', '... pelvis" Malignant lesion'), so a pair is
#: read as quotation marks only where both marks cling to the few words they enclose and the text goes on after the
#: closing one in lower case or with punctuation; an item after a separator opens with a capital.
_QUOTED = re.compile(r'(?<![^\s(\[])"(?=\w)([^"\n.!?;•]{1,40}?)(?<=[\w)%])"(?=[,.;:)\]]|\s*[a-z]|\s*$)')


def quote_terms(text: str) -> str:
    """``text`` with the quotation marks around a term as apostrophes, which end no sentence nor section (a '"' is
    one of CT-RATE's item separators); same length, so char offsets are kept."""
    return _QUOTED.sub(lambda m: "'" + m[1] + "'", text) if '"' in text else text

