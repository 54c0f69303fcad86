"""Section splitting: CT-RATE columns where given, else headers or the ``"``/``•`` separators in free text.

Sections are ``clinical_information``, ``technique`` (with the comparison), ``findings`` and ``impression``. CT-RATE's CSV
gives them as columns (``Findings_EN`` ...), a missing one reading "Not given."; other sources send one
free text with headers ("FINDINGS:", "Impression") or, like CT-RATE's own text dumps, the findings
followed by impression items each introduced by ``"`` or ``•``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from ctprep.reports.normalise import normalise_items, normalise_lines, quote_terms

SECTIONS: tuple[str, ...] = ("clinical_information", "technique", "findings", "impression")

#: Input keys accepted for each section: our names, CT-RATE's CSV columns and common variants.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "clinical_information": ("clinical_information", "ClinicalInformation_EN", "clinical information", "indication", "history"),
    "technique": ("technique", "Technique_EN"),
    "findings": ("findings", "Findings_EN"),
    "impression": ("impression", "impressions", "Impressions_EN", "Impression_EN", "conclusion"),
}
_TEXT_KEYS = ("text", "report", "report_text")

# Header words -> section; longest alternatives first so "clinical information" wins over nothing.
_HEADERS = {
    "clinical information": "clinical_information", "clinical history": "clinical_information",
    "clinical findings": "clinical_information", "indication": "clinical_information", "history": "clinical_information",
    "indications": "clinical_information", "clinical indication": "clinical_information",
    "clinical indications": "clinical_information", "clinical data": "clinical_information",
    "clinical details": "clinical_information", "clinical notes": "clinical_information",
    "clinical question": "clinical_information", "reason for exam": "clinical_information",
    "reason for examination": "clinical_information", "reason for study": "clinical_information",
    "reason for scan": "clinical_information", "reason for referral": "clinical_information",
    "reason for request": "clinical_information",
    # abbreviations of the request form: "HX: nodule follow-up", "CLINICAL HX: ...", "Clinical info: ..."
    "hx": "clinical_information", "clinical hx": "clinical_information", "clinical info": "clinical_information",
    "technique": "technique", "procedure": "technique",
    # the comparison names prior studies ("COMPARISON: CT 2019, which showed an effusion"): what it says
    # is not this scan's finding, so it goes with the technique, which sets no label
    "comparison": "technique", "comparisons": "technique",
    "findings": "findings", "finding": "findings", "report": "findings",
    "impressions": "impression", "impression": "impression", "conclusions": "impression", "conclusion": "impression",
    "result": "impression", "results": "impression", "opinion": "impression", "summary": "impression",
    "interpretation": "impression",
}
_HEADER_WORDS = "|".join(sorted(map(re.escape, _HEADERS), key=len, reverse=True))
#: Headers that are common words too ("compared with the prior exam: the nodule ..."): only with a colon, opening a
#: line or a sentence ("EXAM: CT chest without contrast").
# ("Dx:", "Request:" are not: at a report's end "DX:" is often the radiologist's own diagnosis, and a "Request:" line
# inside the findings would take the findings after it)
_COLON_HEADERS = {"exam": "technique", "examination": "technique"}
_COLON_WORDS = "|".join(sorted(map(re.escape, _COLON_HEADERS), key=len, reverse=True))
_ALL_HEADERS = {**_HEADERS, **_COLON_HEADERS}
#: The main sections' names. With a colon one of these opens a section inside a lower-case line too, where a header
#: opened the line's text before it ("clinical information: cough findings: effusion impression: effusion", a report
#: typed on one line; ``_inline_heads``): a report's sections come in a row, and these names are what a
#: report calls them, whereas "procedure", "history" or "comparison" with a colon inside a clause are prose ("the
#: prior procedure: sternotomy wires", "changes, history: lobectomy"). Not after a determiner or a preposition
#: ("... of the impression: ..."), which makes the word part of a phrase.
_MAIN_HEADERS = ("clinical information", "technique", "findings", "impression", "impressions", "conclusion",
                 "conclusions")
_MAIN_WORDS = "|".join(sorted(map(re.escape, _MAIN_HEADERS), key=len, reverse=True))
_PHRASE_BEFORE = re.compile(r"(?<![\w-])(?:the|a|an|this|that|these|those|its|their|our|his|her|prior|previous|of|in|"
                            r"on|to|for|with|from|no|and|or)[ \t]+$", re.IGNORECASE)
# A dash after a header: an en/em dash, or a hyphen standing free ("Findings - ...", not "findings-based")
_DASH = r"(?:[\u2013\u2014]|-(?=[ \t]|$))"
# A header: at a line start (colon optional; or a dash, "Findings - ...", or a period ending the line,
# "Findings.") or with a colon, opening a sentence (after . ! ? ; with or without a space, or after a " or •
# item separator) or capitalised ("... normal. impression: ...", "effusion.impression: ...", "... normal
# Impression: ..."; a main section's name also after another header's text on its line, ``_MAIN_HEADERS``; inside a lower-case clause a header word with a colon is prose, "changes related to the prior
# procedure: sternotomy wires", and took the findings after it into another section); a colon-less one at a line start must be followed by a capital letter
# (case-sensitive inside the IGNORECASE pattern: "Comparison with the prior study shows ..." and "History of
# smoking ..." are sentences, not headers); a colon-less inline header must be in capitals
# ("... normal. IMPRESSION No acute finding", its dash or colon taken with it: "IMPRESSION \u2014 ...")
# or open a sentence with a dash ("... normal. Impression - ..."); prose says "CT findings of ...",
# "the impression is", "In conclusion - ...".
_HEADER = re.compile(
    rf"(?:^|(?<=\n))[ \t]*(?P<a>{_HEADER_WORDS})[ \t]*"
    rf"(?::|{_DASH}|\.?[ \t]*(?:\n|$)|(?=[ \t]+(?-i:[A-Z])))"
    rf"|(?:(?<=[.!?;\"•·])[ \t]*|(?<![\w-])(?=(?-i:[A-Z])))(?P<b>{_HEADER_WORDS})[ \t]*:"
    rf"|(?<![\w-])(?P<c>(?-i:{_HEADER_WORDS.upper()}))(?![\w-])(?:[ \t]*(?::|{_DASH}))?"
    rf"|(?<=[.!?])[ \t]+(?P<d>{_HEADER_WORDS})[ \t]*{_DASH}"
    rf"|(?:^|(?<=[.!?])[ \t]+)[ \t]*(?P<e>{_COLON_WORDS})[ \t]*:"
    rf"|(?<![\w-])(?P<f>{_MAIN_WORDS})[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
#: In text typed mostly in capitals a header word's case says nothing ("... IN KEEPING WITH HISTORY OF SARCOIDOSIS",
#: "NO CHANGE SINCE THE PROCEDURE"): there a colon-less header counts only set off by a dash, or alone on its line
#: ("FINDINGS\nNO EFFUSION"); a colon-less one inside a line or before more words of its line is prose.
_UPPER = re.compile(r"[A-Z]")
_LOWER = re.compile(r"[a-z]")
_SET_OFF = re.compile(rf"[ \t]*(?::|{_DASH})")
#: ... or, opening its line or its sentence, by a full stop, a semicolon or a tab ("FINDINGS. NO NODULE. IMPRESSION.
#: NORMAL.", "FINDINGS;\nNO NODULE"). ``normalise_lines`` makes a tab a space, so a tab after a capitalised header word
#: at a line start is read as a colon first (``_TAB_HEADER``: "FINDINGS\tNO EFFUSION"), one character for one.
_STOP_OR_TAB = re.compile(r"(?:[.;](?=\s|$)|\t)")
_TAB_HEADER = re.compile(rf"^([ \t]*(?-i:{_HEADER_WORDS.upper()}))\t", re.MULTILINE)
_OPENS = re.compile(r"(?:^|[.!?:;][ \t]*|\n[ \t]*)$")
_SEPARATOR = re.compile(r'["•·]')
_NOT_GIVEN = re.compile(r"^\W*(not given|none|n/?a|-+)\W*$", re.IGNORECASE)


def _clean(value: object) -> str:
    """A normalised section text; CT-RATE's "Not given." and empty cells become ''. Lines typed as list items
    without closing punctuation stay apart (``normalise_items``): "No pleural effusion\nMild cardiomegaly"; a term in
    quotation marks is no separated item (``quote_terms``): 'No "tree-in-bud" nodularity'."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    s = quote_terms(normalise_items(value))
    return "" if _NOT_GIVEN.match(s) else s


def _mostly_upper(text: str) -> bool:
    """True if at least three in four of the text's letters are capitals (an all-capitals report)."""
    return len(_UPPER.findall(text)) > 3 * len(_LOWER.findall(text))


def _set_off(lines: str, m: re.Match) -> bool:
    """True if the header ``m`` is set off by a colon or a dash, or stands alone on its line, or opens its line or
    its sentence and a full stop, a semicolon or a tab follows it ("HISTORY. COUGH. FINDINGS. NO NODULE.", "FINDINGS\tNO
    EFFUSION"); a header word that ends a sentence ("... SINCE THE PROCEDURE.") is prose."""
    name = next(g for g in "abcdef" if m[g])
    if _SET_OFF.match(lines, m.end(name)):
        return True
    if _STOP_OR_TAB.match(lines, m.end(name)) and _OPENS.search(lines, 0, m.start(name)):
        return True
    line_end = lines.find("\n", m.end(name))
    line_start = lines.rfind("\n", 0, m.start(name)) + 1
    return (not lines[line_start: m.start(name)].strip()
            and not lines[m.end(name): len(lines) if line_end < 0 else line_end].strip(" \t."))


def _inline_heads(lines: str, matches: Iterator[re.Match]) -> list[re.Match]:
    """The header matches, less a main section's name inside a line (``_MAIN_HEADERS``) that follows no header of its
    own line or follows a determiner or a preposition: "findings: effusion impression: none" opens two sections,
    "the impression: ..." none."""
    heads: list[re.Match] = []
    for m in matches:
        if m["f"] and (not heads or "\n" in lines[heads[-1].end(): m.start()]
                       or _PHRASE_BEFORE.search(lines[max(0, m.start() - 20): m.start()])):
            continue
        heads.append(m)
    return heads


def split_free_text(text: str) -> dict[str, str]:
    """Sections of one free-text report (headers first, then the findings/impression separator)."""
    if "\t" in text:
        text = _TAB_HEADER.sub(r"\1:", text)
    lines = normalise_lines(text)
    out = dict.fromkeys(SECTIONS, "")
    low = lines.lower()
    heads = _inline_heads(lines, _HEADER.finditer(lines)) if any(w in low for w in _ALL_HEADERS) else []  # the scan is slow; most texts have no header
    if heads and _mostly_upper(lines):
        heads = [m for m in heads if _set_off(lines, m)]
    if heads:
        pre = lines[: heads[0].start()]
        for i, m in enumerate(heads):
            name = _ALL_HEADERS[(m["a"] or m["b"] or m["c"] or m["d"] or m["e"] or m["f"]).lower()]
            end = heads[i + 1].start() if i + 1 < len(heads) else len(lines)
            body = _clean(lines[m.end(): end])
            out[name] = f"{out[name]} {body}".strip() if out[name] else body
        if _clean(pre):
            out["findings"] = f"{_clean(pre)} {out['findings']}".strip()
    else:
        out["findings"] = _clean(lines)
    if not out["impression"] and out["findings"]:
        out["findings"], out["impression"] = split_separator(out["findings"])
    return out


def split_separator(text: str) -> tuple[str, str]:
    """(findings, impression): text before the first ``"``/``•`` separator, and the items after it."""
    m = _SEPARATOR.search(text)
    if m is None:
        return text, ""
    return text[: m.start()].strip(), text[m.start():].strip()


def _field_key(key: object) -> str:
    """A field name as it is matched: case, spaces, hyphens and underscores do not count ("Findings", "FINDINGS",
    "Clinical information", "clinical_information"); a report keyed "Findings" read as empty, labelled nothing and
    gave the prompt "no acute findings" without a word."""
    return re.sub(r"[\s_-]+", "_", str(key).strip().casefold())


_FIELD_KEYS = {name: tuple(dict.fromkeys(map(_field_key, keys))) for name, keys in FIELD_ALIASES.items()}
_TEXT_FIELD_KEYS = tuple(map(_field_key, _TEXT_KEYS))


def _by_field_key(report: Mapping) -> dict[str, object]:
    """The mapping keyed by :func:`_field_key`; of two keys that read the same, the first with a value is kept."""
    out: dict[str, object] = {}
    for key, value in report.items():
        k = _field_key(key)
        if out.get(k) is None:
            out[k] = value
    return out


def report_fields(report: Mapping) -> list[str]:
    """The keys of ``report`` that the parser reads as a section or as the whole report's text."""
    known = {k for keys in _FIELD_KEYS.values() for k in keys} | set(_TEXT_FIELD_KEYS)
    return [str(k) for k in report if _field_key(k) in known]


def split_sections(report: str | Mapping | None) -> dict[str, str]:
    """The four sections of a report given as free text or as a mapping of fields (CT-RATE columns, our names; the
    field names in any case)."""
    if report is None:
        return dict.fromkeys(SECTIONS, "")
    if isinstance(report, str):
        return split_free_text(report)
    fields = _by_field_key(report)
    out = dict.fromkeys(SECTIONS, "")
    found = False
    for name, keys in _FIELD_KEYS.items():
        for key in keys:
            if fields.get(key) is not None:
                out[name], found = _clean(fields[key]), True
                break
    if not found or not (out["findings"] or out["impression"]):
        text = next((fields[k] for k in _TEXT_FIELD_KEYS if isinstance(fields.get(k), str)), None)
        if text is not None:
            free = split_free_text(text)
            return {k: out[k] or free[k] for k in SECTIONS}
    return out
