"""The parser reads its own structured prompts back: render(parse(prompt)) == prompt.

Generators are trained on ``structured_prompt`` text and a user may hand such a prompt back at sampling
time, so every item the renderer can write (noun, side, lobe, severity, "multiple", size, "possible",
trailing "no ..." items) must survive a parse. The synthetic prompts are built from Mention records
here; the report sentences are written for these tests (own words); the real reports are read from
``reports_dev.jsonl`` only where it is present (non-commercial licence: never copied into the repo).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from ctprep.reports import LABELS, Mention, get_parser, parse_report, structured_prompt
from ctprep.reports.attributes import LATERAL, LOBE_LABELS
from ctprep.reports.structured import LOBE_WORDS

DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "reports_dev.jsonl"
if not DEV.is_file():
    DEV = Path("/work/shared/data/reports_dev.jsonl")

SIDES = ("right", "left", "bilateral")
SEVERITIES = ("mild", "moderate", "severe")
SIZES = ((4.0, 4.0), (3.0, 6.0), (2.5, 2.5), (9.5, 17.0))


def mention(label: str, status: str = "present", **attrs) -> Mention:
    return Mention(label=label, text="", section="findings", sentence=0, start=0, end=0, status=status, **attrs)


def variants(label: str) -> list[Mention]:
    """Every mention of ``label`` the parser can produce, as far as the renderer writes it.

    The parser gives a side only to lateral findings and a lobe only to lung findings (``attributes.py``):
    a "right cardiomegaly" or a "right upper lobe pleural effusion" never comes out of a parse, and
    reading one back drops the detail the parser never assigns. Severity, "multiple" and sizes go on every
    label (the renderer writes them only where they apply); counts other than "multiple" and organ locations,
    which it never writes, are left out.
    """
    sides = (None, *SIDES) if label in LATERAL else (None,)
    lobes = (None, *LOBE_WORDS) if label in LOBE_LABELS else (None,)
    out = []
    for status, side, severity, lobe, count, size in itertools.product(
            ("present", "uncertain"), sides, (None, *SEVERITIES), lobes, (None, "multiple"), ((None, None), *SIZES)):
        out.append(mention(label, status, laterality=side, severity=severity, location=lobe, count=count,
                           size_mm_min=size[0], size_mm_max=size[1]))
    return out


def round_trips(mention_sets, negated: str) -> list[tuple[str, str]]:
    """(prompt, prompt re-rendered from its parse) for each distinct prompt of ``mention_sets`` that changes."""
    prompts = sorted({structured_prompt(ms, negated=negated) for ms in mention_sets})
    parsed = get_parser().pipe(prompts)
    return [(p, again) for p, r in zip(prompts, parsed) if (again := structured_prompt(r.mentions, negated=negated)) != p]


def test_every_prompt_noun_is_read_as_its_label():
    for label in LABELS:
        # the noun after a lobe ("right lower lobe opacity") and the one without ("lung opacity")
        nouns = {structured_prompt([mention(label, location="RLL")]).removeprefix("right lower lobe "),
                 structured_prompt([mention(label)])}
        for noun in nouns:
            for text, status in ((noun, "present"), (f"possible {noun}", "uncertain"), (f"no {noun}", "negated")):
                assert [(m.label, m.status) for m in parse_report(text).mentions] == [(label, status)], text


@pytest.mark.parametrize("label", LABELS)
def test_one_item_round_trips_with_every_detail(label):
    distinct = list({structured_prompt([m]): m for m in variants(label)}.values())  # one mention per item text
    others = [other for other in LABELS if other != label]
    # each item also followed by a "no ..." item (every other label in turn): the two stay apart
    negated = [[distinct[i % len(distinct)], mention(others[i % len(others)], "negated")]
               for i in range(max(len(distinct), len(others)))]
    assert round_trips([[m] for m in distinct], "omit") == []
    assert round_trips(negated, "state") == []


def test_mixed_items_round_trip():
    """Seeded mixes of 2-18 labels, each with a random variant, and "no ..." items for some of the others."""
    rng = random.Random(0)
    pool = {label: variants(label) for label in LABELS}
    sets = []
    for _ in range(600):
        labels = rng.sample(LABELS, rng.randint(2, len(LABELS)))
        others = [label for label in LABELS if label not in labels]
        negated = [mention(label, "negated") for label in rng.sample(others, rng.randint(0, min(4, len(others))))]
        sets.append([rng.choice(pool[label]) for label in labels] + negated)
    for mode in ("omit", "state"):
        assert round_trips(sets, mode) == []


def test_sides_of_several_mentions_round_trip_as_one_item():
    ms = [mention("Pleural effusion", laterality="right"), mention("Pleural effusion", laterality="left"),
          mention("Lung nodule", location="RLL", laterality="right", size_mm_min=3.0, size_mm_max=3.0),
          mention("Lung nodule", location="RLL", laterality="right", size_mm_min=6.0, size_mm_max=6.0, count="multiple")]
    prompt = structured_prompt(ms)
    assert prompt == "multiple right lower lobe nodule 6 mm; bilateral pleural effusion"
    assert round_trips([ms], "omit") == []


@pytest.mark.skipif(not DEV.is_file(), reason="reports_dev.jsonl (CC BY-NC-SA, not in the repo) is absent")
def test_prompts_of_the_real_reports_round_trip():
    rows = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()]
    parsed = list(get_parser().pipe(rows))  # the rows' findings and impression fields
    assert len(parsed) == 150
    for mode in ("omit", "state"):
        assert round_trips([p.mentions for p in parsed], mode) == []


# --- telegraphic finding lists, as radiologists write them ------------------------------------------
def found(text: str) -> dict[str, list[tuple]]:
    """{label: [(status, side, lobe, severity), ...]} of the findings and impression mentions."""
    out: dict[str, list[tuple]] = {}
    for m in parse_report(text).mentions:
        out.setdefault(m.label, []).append((m.status, m.laterality, m.location, m.severity))
    return out


def test_semicolon_list_items_are_read_one_by_one():
    f = found("Impression: cardiomegaly; small hiatal hernia; bibasilar atelectasis")
    assert f == {"Cardiomegaly": [("present", None, "heart", None)],
                 "Hiatal hernia": [("present", None, "esophageal hiatus", "mild")],
                 "Atelectasis": [("present", "bilateral", "lung", None)]}
    assert found("Cardiomegaly;small hiatal hernia;bibasilar atelectasis") == f  # typed without spaces


@pytest.mark.parametrize(("text", "label", "status"), [
    # a rule's exclusions read only its own item: the next item's "lung" or "fibrotic" is not about it
    ("Small hiatal hernia; scattered lung nodules", "Hiatal hernia", "present"),
    ("Sliding hiatal hernia; fat-containing umbilical hernia", "Hiatal hernia", "present"),
    ("Patchy ground-glass opacity in the right lower lobe; fibrotic bands in the left lung", "Lung opacity", "present"),
    ("Bilateral lung opacities; fibrotic sequelae at both apices", "Lung opacity", "present"),
    # ... and an organ named in the next item does not take a lung finding out of the lung
    ("Left lower lobe nodule; thyroid enlarged", "Lung nodule", "present"),
    # a hedge or a negation ends with its item
    ("Possible pneumonia; right pleural effusion", "Pleural effusion", "present"),
    ("No pleural effusion; mild emphysema", "Emphysema", "present"),
    ("Mild emphysema; no pleural effusion", "Pleural effusion", "negated"),
    # the label's own name
    ("Medical material in the right hemithorax; cardiomegaly", "Medical material", "present"),
    ("Cardiomegaly; no medical material", "Medical material", "negated"),
    ("Possible medical material; cardiomegaly", "Medical material", "uncertain"),
])
def test_telegraphic_items(text, label, status):
    assert [s for s, *_ in found(text).get(label, [])] == [status]


def test_a_neighbouring_item_lends_no_place_to_a_finding():
    # "coronary" in the next item does not make the aortic calcium coronary, nor "calcified nodes" coronary
    assert found("Aortic calcification; no coronary calcification")["Coronary artery wall calcification"] == [
        ("negated", None, "coronary arteries", None)]
    assert len(found("Coronary artery calcification; calcified mediastinal lymph nodes")[
        "Coronary artery wall calcification"]) == 1
    assert "Lung nodule" not in found("Small hiatal hernia; thyroid nodule")  # the item names the thyroid only


def test_semicolon_items_keep_their_details():
    r = parse_report("Moderate right lower lobe consolidation; left pleural effusion; multiple mediastinal "
                     "lymph nodes up to 14 mm; possible left upper lobe nodule 4 mm")
    got = {m.label: (m.status, m.laterality, m.location, m.severity, m.size_mm_max) for m in r.mentions}
    assert got["Consolidation"] == ("present", "right", "RLL", "moderate", None)
    assert got["Pleural effusion"] == ("present", "left", "pleura", None, None)
    assert got["Lymphadenopathy"][:2] == ("present", None) and got["Lymphadenopathy"][4] == 14.0
    assert got["Lung nodule"] == ("uncertain", "left", "LUL", None, 4.0)
    assert structured_prompt(r.mentions) == ("multiple lymphadenopathy 14 mm; possible left upper lobe nodule 4 mm; "
                                             "left pleural effusion; moderate right lower lobe consolidation")
