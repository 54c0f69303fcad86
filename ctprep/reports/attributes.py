"""Mention attributes read from the mention's clause: laterality, lobe/organ, size, count, severity.

A clause often lists several findings ("a 5 mm nodule in the right lower lobe and left pleural
effusion"), so each mention first reads its own *part* of the clause: from the separator after the
previous finding to the last separator before the next one ("a 5 mm nodule in the right lower
lobe" | "left pleural effusion"); a separator inside brackets parts nothing of a finding outside them. Side, lobe
and organ fall back to the mention's list item when the part names no place of its own ("atelectasis and
consolidation in the right lower lobe": both RLL, but "emphysema in the upper lobes and right pleural effusion" is no
right emphysema), and a lobe gives its side; size, count and severity never do (a size belongs to the finding it is
written with). A side word said of something else in the part ("right effusion with mediastinal shift to the left")
is not the finding's: the side nearest it is, unless right and left are listed together. A size written before
another noun is that noun's ("a 3 cm mass with satellite nodules"), an earlier study's ("previously 4 mm") gives way
to the size now, and a change "from 4 to 7 mm" is 7 mm.

In a telegraphic list (a clause without an auxiliary) place words are not lent between items set side by
side by commas alone: "Nodule in the right upper lobe, pleural thickening on the left" is a right nodule,
"Consolidation, mild pericardial effusion" no pericardial consolidation. They are lent inside a list closed by a
conjunction ("atelectasis, consolidation and ground glass in the right lower lobe"), and a place phrase, a size
or a description set off by commas belongs to the item next to it ("A nodule, measuring 5 mm, in the right upper
lobe"). In prose the clause is one item: its commas set off fronted places, place lists and appositions.
"""

from __future__ import annotations

import bisect
import re

from ctprep.reports.vocabulary import AUXILIARIES, CONTINUATION_STARTS, PLACE_NOUNS, PLACE_PREPOSITIONS

#: Side and lobe words in one pass (the groups never overlap; a shared leading ``\b`` scans fast).
_PLACE = re.compile(r"\b(?:(?P<right>right\b)|(?P<left>left\b)|(?P<bilateral>(bilateral\w*|both|bibasal\w*|bibasilar|biapical)\b)"
                    r"|(?P<lobe>(upper|middle|lower|superior|inferior)\s+lobes?\b|lingul\w*|(rul|rml|rll|lul|lll)\b))", re.I)
#: Right and left written as one coordination: the finding is on both sides.
_BOTH_SIDES = re.compile(r"\b(right|left)( (side|lung|hemithorax))?( and |/| & | as well as )(the )?(right|left)\b", re.I)
#: Right and left places listed for one finding ("in the right upper lobe and left lower lobe", "on the right, more than
#: on the left"), not a side said of something else ("Right pleural effusion with mediastinal shift to the left").
_SIDE_LIST = re.compile(r",|/|&|\b(and|or|as well as|than)\b", re.I)
_NOT_A_SIDE_LIST = re.compile(r"\b(with|without|to|toward|towards|from|into|shift\w*|deviat\w*|displac\w*|but|whereas|"
                              r"while)\b", re.I)
_SIDE_LIST_REACH = 60
#: A side word's own words end at the next list break, verb or place phrase: "right" in "left pleural effusion and
#: right pneumothorax in the apex" says "pneumothorax".
_SIDE_WORDS_END = re.compile(r"[,;:.()]|\b(and|or|with|without|but|whereas|while|as well as|of|between|"
                             + "|".join(AUXILIARIES + PLACE_PREPOSITIONS) + r")\b", re.I)
#: Words a side word can carry in a list of places for one finding, not a noun of their own: connectives, articles,
#: place nouns, sizes, degrees, and the adjectives of anatomy by their endings ("right paratracheal and left hilar
#: lymphadenopathy", "right upper lobe and left lower lobe nodules", "small right and moderate left effusions"). Any
#: other word is a noun the side is said of ("right hilar mass", "right pneumothorax", "left rib fracture"), and the
#: sides are not listed for the finding.
_SIDE_LIST_WORD = re.compile(
    r"(and|or|as|well|than|more|less|greater|larger|smaller|much|slightly|also|too|both|the|a|an|one|ones|on|in|at|of"
    r"|to|side|sides|sided|lungs?|hemithorax|hemithoraces|bases?|apex|apices|zones?|segments?|lobes?|upper|middle"
    r"|lower|lingula|hil(um|a)|aspects?|portions?|parts?|mild|mildly|moderate|moderately|severe|small|large|tiny"
    r"|trace|minimal|minor|\d+([.,]\d+)?|mm|cm|x|deepest|thickest|widest|largest|diameter|depth|thickness|measuring"
    r"|deep|thick|wide|which|that|is|are|was|were|seen|noted|present|visible|again|still|there|some|between"
    r"|pleura|" + "|".join(PLACE_NOUNS + PLACE_PREPOSITIONS) + r"|\w+(al|ar|ic|ary|ior|ous|ed|ward|wards))", re.I)
#: A lobe's side.
LOBE_SIDE = {"RUL": "right", "RML": "right", "RLL": "right", "LUL": "left", "LLL": "left", "lingula": "left"}
#: Words by which a finding's own part of the clause names its place: a place phrase or a lobe word (``describe``).
_OWN_PLACE = re.compile(r"\b(" + "|".join(PLACE_PREPOSITIONS) + r")\b", re.I)
_DIGIT = re.compile(r"\d")
_UNIT = r"(mm|cm|millimet\w*|centimet\w*)\b"
_NUM = r"(\d+(?:[.,]\d+)?)"
_RANGE = re.compile(rf"{_NUM}\s*(?:(?:mm|cm)\s*)?(?:-|–|to)\s*{_NUM}\s*{_UNIT}", re.I)  # "5-7 mm", "3 mm - 5 mm"
# a size as a compound adjective takes a hyphen before its unit: "a 3-mm nodule", "a 2.5-cm mass"
_DIMS = re.compile(rf"{_NUM}(?:\s*[x×*]\s*{_NUM})?(?:\s*[x×*]\s*{_NUM})?(?:\s*|-){_UNIT}", re.I)
_NOT_A_SIZE = r"(?!\s*(?:[.,]\d|[x×*-]|mm|cm|millimet|centimet))"  # "2 nodules" counts, "2 mm" / "2.5" does not
# ("2-3 nodules" counts, "2-3 mm nodules" is a size)
_FEW = re.compile(rf"\b(a few|few|a couple of|couple of|two|three|2{_NOT_A_SIZE}|3{_NOT_A_SIZE}|"
                  rf"(1-2|2-3){_NOT_A_SIZE})\b", re.I)
_MANY = re.compile(r"\b(multiple|several|numerous|innumerable|many|scattered|diffuse|widespread|countless|multifocal)\b", re.I)
_ONE = re.compile(r"\b(a|an|one|single|solitary|isolated|1)\s+(\w+\s+){0,4}$", re.I)
_SEVERITY = (
    ("severe", re.compile(r"\b(severe\w*|marked\w*|extensive\w*|massive\w*|large amount|large|abundant|advanced|gross\w*)\b", re.I)),
    ("moderate", re.compile(r"\b(moderate\w*|medium)\b", re.I)),
    ("mild", re.compile(r"\b(mild\w*|minimal\w*|minim\w*|slight\w*|minor|small amount|small|trace|subtle|faint)\b", re.I)),
)
_ORGANS = (  # organ words (each pattern starts at a word boundary)
    ("coronary arteries", r"coronar\w*"), ("aorta", r"aort\w*"), ("pericardium", r"pericardi\w*"),
    ("pleura", r"(pleura\w*|hemithora\w*)"), ("heart", r"(heart|cardiac|valve)\w*"), ("mediastinum", r"mediastin\w*"),
    ("hilum", r"hil(ar|um|us)\b"), ("axilla", r"axilla\w*"), ("superior vena cava", r"(vena cava|svc)\b"),
    ("esophagus", r"o?esophag\w*"), ("stomach", r"(stomach|gastr\w*)"), ("trachea", r"trache\w*"),
    ("lung", r"(lung|pulmonary|parenchym)\w*"), ("sternum", r"stern\w*"), ("liver", r"(liver|hepat\w*)"),
)
#: One pass finds every organ word; group ``o<i>`` is ``_ORGANS[i]`` (the leading ``\b`` shared by
#: all makes the scan ~4x faster than separate or unfactored patterns).
_ORGAN_RE = re.compile(r"\b(?:" + "|".join(f"(?P<o{i}>{p})" for i, (_, p) in enumerate(_ORGANS)) + ")", re.I)
#: What separates the findings listed in one clause.
SEPARATOR = re.compile(r",|\b(and|or|with|accompanied by|as well as|along with)\b", re.I)
#: A comma that separates list items (not a decimal comma, "2,5 cm").
ITEM_COMMA = re.compile(r",(?!\d)")
#: The start of a place phrase ("in the right lower lobe"); set off by commas it is no item of its own.
PLACE_PHRASE = re.compile(r"\s*(" + "|".join(PLACE_PREPOSITIONS) + r")\b", re.I)
#: A comma-set phrase that goes on the item before it: a place, a size, a description of the finding, the verb.
_CONTINUES = re.compile(r"\s*((" + "|".join(PLACE_PREPOSITIONS + CONTINUATION_STARTS) + r")\b|\d)", re.I)
_PROSE = re.compile(r"\b(" + "|".join(AUXILIARIES) + r")\b", re.I)
#: What closes a list of items: "A, B and C in the right lower lobe".
_CONJUNCTION = re.compile(r"\b(and|or|as well as|along with)\b", re.I)
#: Where a sentence's clauses end (attributes and list items are read inside one clause).
CLAUSE_END = re.compile(r"[;:]|\b(but|however|whereas|although)\b", re.I)
#: Words by which a list item says more of its finding than its name: where (a place phrase), how large, how many.
_DESCRIPTION = re.compile(r"\b(" + "|".join(PLACE_PREPOSITIONS) + r")\b|\d", re.I)

#: Labels whose mentions have a side; the others (heart, aorta, hiatus) are midline organs.
LATERAL = {"Lymphadenopathy", "Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
           "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation",
           "Bronchiectasis", "Interlobular septal thickening", "Medical material"}
#: Labels whose mentions are counted objects (nodules, nodes, devices).
COUNTABLE = {"Lung nodule", "Lymphadenopathy", "Medical material"}
#: Where a mention is, when its clause names no lobe or organ.
DEFAULT_ORGAN = {"Arterial wall calcification": "aorta", "Cardiomegaly": "heart", "Pericardial effusion": "pericardium",
                 "Coronary artery wall calcification": "coronary arteries", "Hiatal hernia": "esophageal hiatus",
                 "Lymphadenopathy": "mediastinum", "Pleural effusion": "pleura", "Medical material": None}
#: Labels whose mentions get a lobe (the others lie in the pleura, the nodes or a device, whatever their side).
LOBE_LABELS = LATERAL - {"Lymphadenopathy", "Pleural effusion", "Medical material"}


class Clause:
    """A clause's text, with its side, lobe, organ and size words and its list items found once (mentions of one
    clause share them)."""

    __slots__ = ("text", "_hits")

    def __init__(self, text: str):
        self.text = text
        self._hits: dict[object, list] = {}  # matches per regex or side group; "phrases", "items": spans

    def __str__(self) -> str:
        return self.text

    def phrases(self) -> list[tuple[int, int]]:
        """[a, b) of each comma-separated phrase of the clause (``_phrases``, computed once)."""
        found = self._hits.get("phrases")
        if found is None:
            found = self._hits["phrases"] = _phrases(self.text)
        return found

    def items(self) -> list[tuple[int, int]]:
        """[a, b) of each list item of the clause (``_list_items``, computed once)."""
        found = self._hits.get("items")
        if found is None:
            found = self._hits["items"] = _list_items(self.text, self.phrases())
        return found

    def hits(self, rx: re.Pattern | str) -> list[re.Match]:
        """All matches of ``rx`` in the clause, in text order (cached); a string names a group of ``_PLACE``."""
        found = self._hits.get(rx)
        if found is None:
            if isinstance(rx, str):
                for name in ("right", "left", "bilateral", "lobe"):
                    self._hits[name] = []
                for m in _PLACE.finditer(self.text):
                    self._hits[m.lastgroup].append(m)
            elif rx in (_RANGE, _DIMS) and not _DIGIT.search(self.text):
                self._hits[rx] = []  # sizes need digits; most clauses have none
            else:
                self._hits[rx] = list(rx.finditer(self.text))
            found = self._hits[rx]
        return found


def _clause(clause: str | Clause) -> Clause:
    return clause if isinstance(clause, Clause) else Clause(clause)


def _nearest(rx: re.Pattern | str, clause: Clause, pos: int) -> re.Match | None:
    """The match of ``rx`` in the clause closest to character ``pos`` (the first one on ties)."""
    best, dist = None, 0
    for m in clause.hits(rx):
        d = abs(m.start() - pos)
        if best is None or d < dist:
            best, dist = m, d
    return best


def finding_part(clause: str, start: int, end: int, prev_end: int | None, next_start: int | None) -> tuple[int, int]:
    """[a, b) of the clause that belongs to the mention at [start, end) between its neighbouring findings. A separator
    inside brackets the mention is not in parts nothing of it ("Nodule in the right upper lobe (stable, 8 mm) and left
    pleural effusion": the effusion's part starts at "and")."""
    a, b = 0, len(clause)
    bracket = "(" in clause and not _in_parentheses(clause, start)
    if prev_end is not None:
        m = next((m for m in SEPARATOR.finditer(clause, prev_end, start)
                  if not (bracket and _in_parentheses(clause, m.start()))), None)
        a = m.end() if m else prev_end
    if next_start is not None:
        seps = [m for m in SEPARATOR.finditer(clause, end, next_start)
                if not (bracket and _in_parentheses(clause, m.start()))]
        b = seps[-1].start() if seps else next_start
    return a, b


def _in_parentheses(text: str, pos: int) -> bool:
    """True if ``pos`` lies inside an open parenthesis ("consolidation (sequela?, atelectasis?) in both lungs")."""
    return text.count("(", 0, pos) > text.count(")", 0, pos)


def _phrases(text: str) -> list[tuple[int, int]]:
    """[a, b) of each comma-separated phrase of a clause, joined to the phrase before it if it goes on it
    (``_CONTINUES``); a fronted place phrase goes on the phrase after it ("In the right pleural space, an effusion")."""
    cuts = [m.start() for m in ITEM_COMMA.finditer(text) if not _in_parentheses(text, m.start())]
    pieces = list(zip([0] + [c + 1 for c in cuts], cuts + [len(text)]))
    phrases: list[tuple[int, int]] = []
    for a, b in pieces:
        if phrases and _CONTINUES.match(text, a):
            phrases[-1] = (phrases[-1][0], b)
        else:
            phrases.append((a, b))
    if len(phrases) > 1 and PLACE_PHRASE.match(text):
        phrases[:2] = [(0, phrases[1][1])]
    return phrases


def _list_items(text: str, phrases: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The items of a telegraphic list: its phrases, joined into the lists a conjunction closes ("atelectasis,
    consolidation and ground glass in the right lower lobe", "in the right paratracheal, subcarinal and left hilar
    regions"), whose place words are shared; phrases set side by side by commas alone stay apart ("Effusion on the
    right, pericardial thickening"). A fronted place goes on the item after it. A clause in prose is one item: its
    commas set off fronted places, place lists and appositions of one statement."""
    if _PROSE.search(text):
        return [(0, len(text))]
    items: list[tuple[int, int]] = []
    first = 0  # the first phrase of the list being read
    for k, (a, b) in enumerate(phrases):
        if _CONJUNCTION.search(text, a, b):
            items.append((phrases[first][0], b))
            first = k + 1
    items += phrases[first:]
    if len(items) > 1 and PLACE_PHRASE.match(text):
        items[:2] = [(0, items[1][1])]
    return items


def _holding(spans: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The union of the ``spans`` (in text order, covering the text) that hold [start, end)."""
    i = bisect.bisect_right([a for a, _ in spans], start) - 1
    j = i
    while j + 1 < len(spans) and spans[j][1] < end:
        j += 1
    return spans[i][0], spans[j][1]


def own_phrase(clause: str | Clause, start: int, end: int) -> tuple[int, int]:
    """[a, b) of the comma-separated phrase (with what goes on it) that holds the mention at [start, end)."""
    return _holding(_clause(clause).phrases(), start, end)


def list_item(clause: str | Clause, start: int, end: int) -> tuple[int, int]:
    """[a, b) of the list item of the clause that holds the mention at [start, end): its phrase, or the list closed
    by a conjunction that the phrase is a member of."""
    return _holding(_clause(clause).items(), start, end)


def describes(item: str) -> bool:
    """True if a list item says where its finding is, how large, how severe or how many ("Effusion on the right",
    "Mild cardiomegaly", "Right pleural effusion"): it states a finding of its own. An item that only names its
    finding ("Pleural effusion", "Mediastinal lymphadenopathy") may be a member of a list a later predicate closes
    ("Pleural effusion, pericardial effusion absent")."""
    c = _clause(item)
    return bool(_DESCRIPTION.search(c.text) or any(c.hits(side) for side in ("right", "left", "bilateral", "lobe"))
                or _MANY.search(c.text) or _FEW.search(c.text) or any(rx.search(c.text) for _, rx in _SEVERITY))


def laterality(clause: str | Clause, pos: int | None = None) -> str | None:
    """right / left / bilateral: "both"/"bilateral", or right and left coordinated ("right and left lower
    lobes", "in the right upper lobe and left lower lobe"), is bilateral. Without ``pos`` any "bilateral" word, or
    both sides named, is; with it, the side word nearest ``pos`` is the mention's unless right and left are listed
    together: "Right pleural effusion with mediastinal shift to the left" is right, "Left pleural effusion with
    bilateral hilar prominence" left."""
    c = _clause(clause)
    right, left, both = c.hits("right"), c.hits("left"), c.hits("bilateral")
    if pos is None:
        if both or (right and left):
            return "bilateral"
        return "right" if right else "left" if left else None
    if right and left and (_BOTH_SIDES.search(c.text) or _sides_listed(c.text, right, left, pos)):
        return "bilateral"
    sides = right + left + both
    # a side word that opens the finding's own words is its side, however near another is ("right lower lobe
    # atelectasis and left hilar mass": the atelectasis is 17 characters from "right" and 16 from "left")
    own = [m for m in sides if m.end() <= pos and not _SIDE_WORDS_END.search(c.text, m.end(), pos)]
    near = min(own or sides, key=lambda m: abs(m.start() - pos), default=None)
    return near.lastgroup if near else None


def _only_place_words(text: str) -> bool:
    """True if ``text`` holds no word but those a side word carries in a list of places (``_SIDE_LIST_WORD``)."""
    return all(_SIDE_LIST_WORD.fullmatch(w) for w in re.findall(r"\w+", text))


def _sides_listed(text: str, right: list[re.Match], left: list[re.Match], pos: int | None = None) -> bool:
    """True if a right and a left side word are places listed for one finding (``_SIDE_LIST``), the finding at ``pos``:
    the side words between them and the finding, and after the later one up to the list's next break, say no noun
    of their own ("left pleural effusion and right pneumothorax", "right pneumothorax and left pleural effusion" are
    one side each)."""
    for r in right:
        for l in left:
            a, b = (r, l) if r.start() < l.start() else (l, r)
            gap = text[a.end(): b.start()]
            if not (len(gap) <= _SIDE_LIST_REACH and _SIDE_LIST.search(gap) and not _NOT_A_SIDE_LIST.search(gap)):
                continue
            if pos is None:
                return True
            stop = _SIDE_WORDS_END.search(text, b.end())
            tail = text[b.end(): stop.start() if stop else len(text)]
            if pos >= b.end():  # "right and left effusions", "right upper lobe and left lower lobe nodules"
                own = gap + " " + text[b.end(): pos]
            elif pos >= a.end():  # "left effusion and right ..." : the later side's words must be the effusion's
                own = tail
            else:  # "effusion in the right and left lower lobes", "effusion on the right and on the left", "effusion
                # 2 cm deep on the right and 1 cm on the left"; a noun between the two places is a finding of its own,
                # the later side its ("Effusion on the right and pneumothorax on the left" is a right effusion)
                own = gap + " " + tail
            if _only_place_words(own):
                return True
    return False


def lobe(clause: str | Clause, pos: int) -> str | None:
    """RUL/RML/RLL/LUL/LLL/lingula for the lobe phrase nearest ``pos`` (side from the nearest right/left)."""
    c = _clause(clause)
    m = _nearest("lobe", c, pos)
    if m is None:
        return None
    word = m.group(0).lower()
    if word in {"rul", "rml", "rll", "lul", "lll"}:
        return word.upper()
    if word.startswith("lingul"):
        return "lingula"
    if word.startswith("middle"):
        return "RML"
    side_r, side_l = _nearest("right", c, m.start()), _nearest("left", c, m.start())
    if side_r and (not side_l or abs(side_r.start() - m.start()) <= abs(side_l.start() - m.start())):
        side = "R"
    elif side_l:
        side = "L"
    else:
        return None
    return side + ("U" if word.startswith(("upper", "superior")) else "L") + "L"


def _lobe_sides(clause: Clause) -> str | None:
    """The side of every lobe code in ``clause`` ("in the RUL": right; "in the RUL and LLL": bilateral)."""
    sides = set()
    for m in clause.hits("lobe"):
        word = m.group(0)
        side = LOBE_SIDE.get(word.upper()) or ("left" if word.lower().startswith("lingul") else None)
        if side:
            sides.add(side)
    return "bilateral" if len(sides) == 2 else sides.pop() if sides else None


def organ(clause: str | Clause, pos: int) -> str | None:
    """The organ named nearest ``pos`` (on a tie the organ listed first in ``_ORGANS``)."""
    near = min(((abs(m.start() - pos), int(m.lastgroup[1:])) for m in _clause(clause).hits(_ORGAN_RE)), default=None)
    return _ORGANS[near[1]][0] if near else None


def location(label: str, clause: str | Clause, pos: int, part: Clause | None = None, part_pos: int = 0,
             borrow: bool = True) -> str | None:
    """A lobe code for lung findings, else the organ named nearest the mention, else the label's organ.

    The mention's own ``part`` of the clause (mention at ``part_pos``) is read first, the clause only
    if the part names no lobe or organ and ``borrow`` is set.
    """
    best = None
    reads = ((part, part_pos), (_clause(clause), pos)) if part is not None else ((_clause(clause), pos),)
    for c, p in reads if borrow or part is None else reads[:1]:
        if label in LOBE_LABELS:
            code = lobe(c, p)
            if code:
                return code
        best = organ(c, p)
        if best:
            break
    if label in DEFAULT_ORGAN and DEFAULT_ORGAN[label] and best not in {DEFAULT_ORGAN[label], "mediastinum", "hilum", "axilla"}:
        return DEFAULT_ORGAN[label]
    return best or DEFAULT_ORGAN.get(label) or ("lung" if label in LATERAL else None)


def _mm(value: str, unit: str) -> float:
    x = float(value.replace(",", "."))
    return round(x * 10.0, 3) if unit.lower().startswith("c") else x


#: A size of an earlier study: "previously 4 mm", "was 5 mm", "4 mm on the prior study", "... from 4 mm" (not "ranging
#: from"); read only where the mention's part gives no other size ("The largest was 8 mm" is its size).
#: A "from" after a verb of change, up to three words between ("increased from", "has grown in size from"): "from 4 to 7
#: mm" is a change there, whose size now is the second; elsewhere it is a range ("ranging in size from 3 to 6 mm",
#: "measuring from 3 mm to 6 mm", "Several nodules, from 3 to 6 mm").
_CHANGE_FROM = (r"\b(increas\w*|decreas\w*|grow\w*|grew|enlarg\w*|chang\w*|progress\w*|reduc\w*|regress\w*|shr[iau]nk\w*|"
                r"diminish\w*|expand\w*|improv\w*|evolv\w*|went|gone|rose|risen|fell|fallen|dropped)\b"
                r"(\s+\w+){0,3}?\s+from")
_EARLIER_BEFORE = re.compile(r"(\b(previously|prior|formerly|earlier|was|were)(\s+(measuring|measured|about|"
                             rf"approximately|at|as|of))?|{_CHANGE_FROM})\s*$", re.I)
_EARLIER_AFTER = re.compile(r"\s*(previously|before|earlier|(on|in|at) the (prior|previous|earlier|last))\b", re.I)
_FROM = re.compile(rf"{_CHANGE_FROM}\s*$", re.I)


def _earlier(text: str, m: re.Match) -> bool:
    return bool(_EARLIER_BEFORE.search(text, max(0, m.start() - 40), m.start()) or _EARLIER_AFTER.match(text, m.end()))


#: A size written before its noun ("a 3.2 cm mass"), not before a preposition, a measure word or a conjunction ("7 mm in
#: thickness", "8 mm in size", "5 mm and 7 mm nodules", "(5 mm)").
_BEFORE_NOUN = re.compile(r"[- ]?(?!(in|of|on|at|and|or|to|from|with|x|by|size|sized|diameter|thick|thickness|long|"
                          r"wide|length|width|axis|short|maximum|respectively|the|a|an|is|are|was|were)\b)[a-z]", re.I)


def _anothers(text: str, m: re.Match, start: int) -> bool:
    """True if the size ``m`` before a mention at ``start`` qualifies another noun: written before a noun, with a
    separator between them ("A 3.2 cm mass in the right upper lobe with adjacent satellite nodules")."""
    return (m.end() <= start and _BEFORE_NOUN.match(text, m.end()) is not None
            and SEPARATOR.search(text, m.end(), start) is not None)


def size_mm(clause: str | Clause, pos: int) -> tuple[float, float] | None:
    """(min, max) in mm of the size nearest the mention at ``pos``: "5-7 mm" -> (5, 7), "1.2 cm" -> (12, 12),
    "21x15 mm" -> (15, 21) (the smallest and largest dimension), "increased from 4 to 7 mm" -> (7, 7). Not a size
    written before the mention for another noun (``_anothers``), nor an earlier study's size where another is given."""
    clause = _clause(clause)
    text = clause.text
    ranges = [m for m in clause.hits(_RANGE) if not _anothers(text, m, pos)]
    dims = [m for m in clause.hits(_DIMS) if not _anothers(text, m, pos)]
    current = [m for m in ranges + dims if not _earlier(text, m)]
    if current:
        ranges, dims = [m for m in ranges if m in current], [m for m in dims if m in current]
    if ranges:
        m = min(ranges, key=lambda r: abs(r.start() - pos))
        lo, hi = _mm(m.group(1), m.group(3)), _mm(m.group(2), m.group(3))
        if _FROM.search(text, max(0, m.start() - 50), m.start()) and "to" in m.group(0).lower():
            return (hi, hi)
        return (min(lo, hi), max(lo, hi))
    if not dims:
        return None
    m = min(dims, key=lambda r: abs(r.start() - pos))
    sizes = [_mm(g, m.group(4)) for g in m.groups()[:3] if g]
    return (min(sizes), max(sizes))


def count(label: str, clause: str, start: int, end: int) -> str | None:
    """single / a few / multiple: count words near the mention, else the noun's number."""
    before = clause[max(0, start - 40): start]
    if _FEW.search(before):
        return "a few"
    if _MANY.search(before) or _MANY.search(clause[start:end]):
        return "multiple"
    if label not in COUNTABLE:
        return None
    word = clause[start:end].split()[-1].lower() if clause[start:end].split() else ""
    if word.endswith(("s", "ies", "ae")) and not word.endswith(("sis", "ss", "us")):
        return "multiple"
    return "single" if _ONE.search(before) or word else None


def severity(clause: str, start: int, end: int) -> str | None:
    """mild / moderate / severe from the words just before the mention or inside it."""
    near = clause[max(0, start - 40): end]
    for name, rx in _SEVERITY:
        if rx.search(near):
            return name
    return None


def _sub(clause: Clause, a: int, b: int) -> Clause:
    return clause if (a, b) == (0, len(clause.text)) else Clause(clause.text[a:b])


def describe(label: str, clause: Clause, start: int, end: int, part: tuple[int, int]) -> dict:
    """All attributes of the mention at [start, end) of ``clause``, whose own words are ``clause[part]``.

    Its place words are those of its part inside its list item; those of its list item only where its part names no
    place ("Atelectasis and consolidation in the right lower lobe": both), not where it names one of its own
    ("Emphysema in the upper lobes and right pleural effusion": no right emphysema). A lobe gives its side ("Nodule in
    the RUL with a left pleural effusion": a right nodule)."""
    a, b = part
    own = _sub(clause, a, b)
    s, e = start - a, end - a
    size = size_mm(own, s)
    sa, sb = list_item(clause, start, end)
    pa, pb = max(a, sa), min(b, sb)
    place, scope = _sub(clause, pa, pb), _sub(clause, sa, sb)
    borrow = not (_OWN_PLACE.search(place.text) or place.hits("lobe"))
    where = location(label, scope, start - sa, place, start - pa, borrow)
    side = None
    if label in LATERAL:
        side = (laterality(place, start - pa) or _lobe_sides(place) or (borrow and _lobe_sides(scope))
                or LOBE_SIDE.get(where))
        if side is None and borrow:
            side = laterality(scope, start - sa)
    return {"laterality": side, "location": where,
            "size_mm_min": size[0] if size else None, "size_mm_max": size[1] if size else None,
            "count": count(label, own.text, s, e), "severity": severity(own.text, s, e)}
