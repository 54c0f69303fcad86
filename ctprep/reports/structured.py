"""A canonical, structured prompt from the mentions: "right lower lobe nodule 5 mm; bilateral pleural effusion".

One item per label, in CT-RATE's label order (deterministic), built from the label's most specific
present mention (lobe, side, size, severity). Uncertain mentions are stated as "possible <finding>"
(they count as present in the labels, see ``labels.py``). ``negated="state"`` appends "no <finding>"
for labels that are only negated. A report with nothing to say gives ``NO_FINDINGS``.

Generators are trained on these prompts and a user may hand one back at sampling time, so the parser must
read them as written: rendering the parse of a prompt gives the prompt again (every noun here is in the
vocabulary's rules, and "; " ends a sentence, see ``pipeline.SENTENCE_PUNCT``;
``tests/ctprep/test_prompt_round_trip.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ctprep.ctrate import LABELS

#: The text for a report without any present or uncertain finding of the 18 labels (and, with
#: ``negated="state"``, without negations either): it says the scan shows none of them.
NO_FINDINGS = "no acute findings"
#: Short finding nouns used in prompts.
NOUN = {
    "Medical material": "medical material", "Arterial wall calcification": "arterial wall calcification",
    "Cardiomegaly": "cardiomegaly", "Pericardial effusion": "pericardial effusion",
    "Coronary artery wall calcification": "coronary artery calcification", "Hiatal hernia": "hiatal hernia",
    "Lymphadenopathy": "lymphadenopathy", "Emphysema": "emphysema", "Atelectasis": "atelectasis",
    "Lung nodule": "nodule", "Lung opacity": "opacity", "Pulmonary fibrotic sequela": "fibrotic sequela",
    "Pleural effusion": "pleural effusion", "Mosaic attenuation pattern": "mosaic attenuation",
    "Peribronchial thickening": "peribronchial thickening", "Consolidation": "consolidation",
    "Bronchiectasis": "bronchiectasis", "Interlobular septal thickening": "interlobular septal thickening",
}
LOBE_WORDS = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe", "LUL": "left upper lobe",
              "LLL": "left lower lobe", "lingula": "lingular"}
_LUNG_NOUN = {"Lung nodule": "lung nodule", "Lung opacity": "lung opacity"}


def _detail(m) -> int:
    """How much a mention says (picks the mention an item is built from)."""
    return sum(x is not None for x in (m.laterality, m.size_mm_max, m.severity, m.count)) + 2 * (m.location in LOBE_WORDS)


def _fmt_mm(x: float) -> str:
    return f"{x:g}"


def describe(label: str, mentions: list) -> str:
    """One item for a label from its positive mentions."""
    best = max(mentions, key=_detail)
    sides = {m.laterality for m in mentions if m.laterality}
    side = "bilateral" if "bilateral" in sides or {"right", "left"} <= sides else next(iter(sides), None)
    parts = []
    if best.severity and label not in {"Lung nodule", "Medical material", "Lymphadenopathy"}:
        parts.append(best.severity)
    if label in {"Lung nodule", "Lymphadenopathy"} and any(m.count == "multiple" for m in mentions):
        parts.append("multiple")
    if best.location in LOBE_WORDS and len({m.location for m in mentions if m.location in LOBE_WORDS}) == 1 and side != "bilateral":
        parts.append(LOBE_WORDS[best.location])
        noun = NOUN[label]
    else:
        parts += [side] if side else []
        noun = _LUNG_NOUN.get(label, NOUN[label])  # "right lung nodule", "lung opacity"
    parts.append(noun)
    if best.size_mm_max is not None and label in {"Lung nodule", "Lymphadenopathy"}:
        lo, hi = best.size_mm_min, best.size_mm_max
        parts.append(f"{_fmt_mm(lo)}-{_fmt_mm(hi)} mm" if lo is not None and lo != hi else f"{_fmt_mm(hi)} mm")
    text = " ".join(parts)
    return text if any(m.status == "present" for m in mentions) else f"possible {text}"


def structured_prompt(mentions: Iterable, negated: str = "omit", max_chars: int = 0) -> str:
    """Canonical findings sentence: items in ``LABELS`` order joined by "; ".

    ``negated``: "omit" leaves negated findings out; "state" adds "no <finding>" for labels that have
    negated and no positive mentions. ``max_chars`` > 0 keeps whole items only (at least the first
    item, cut at a word if it alone is too long). Empty: ``NO_FINDINGS``.
    """
    if negated not in {"omit", "state"}:
        raise ValueError(f"negated must be 'omit' or 'state', not {negated!r}")
    from ctprep.reports.labels import FINDING_SECTIONS

    mentions = [m for m in mentions if m.section in FINDING_SECTIONS]  # not the indication's "nodule follow-up"
    items, negs = [], []
    for label in LABELS:
        positive = [m for m in mentions if m.label == label and m.status in {"present", "uncertain"}]
        if positive:
            items.append(describe(label, positive))
        elif negated == "state" and any(m.label == label and m.status == "negated" for m in mentions):
            negs.append(f"no {NOUN[label] if label not in _LUNG_NOUN else _LUNG_NOUN[label]}")
    items += negs
    if not items:
        return NO_FINDINGS
    # the first item is kept whole, over the budget too, as ``prompts.truncate`` keeps its first sentence: a cut
    # inside it lost the finding's noun ("possible right lower lobe") or left a bare "no"
    out = items[0]
    for item in items[1:]:
        if max_chars > 0 and len(out) + 2 + len(item) > max_chars:
            break
        out = f"{out}; {item}"
    return out
