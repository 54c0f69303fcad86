"""Report parser: sections, negation/uncertainty, attributes, labels, prompts, robustness, CLI, evaluation.

All report sentences here are written for these tests (CT-RATE style, own words).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ctprep.cli import main
from ctprep.errors import UserError
from ctprep.reports import (LABELS, NO_FINDINGS, ParsedReport, ReportParser, evaluate, get_parser, parse_report,
                            structured_prompt)
from ctprep.reports.cli import parse_report_main
from ctprep.reports.evaluate import evaluate_main, split_of
from ctprep.reports.sections import split_sections

DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "reports_dev.jsonl"
if not DEV.is_file():
    DEV = Path("/work/shared/data/reports_dev.jsonl")


def statuses(text, label):
    return [m.status for m in parse_report(text).mentions if m.label == label]


def one(text, label):
    ms = [m for m in parse_report(text).mentions if m.label == label]
    assert ms, f"no {label} mention in {text!r}"
    return ms[0]


# --- sections -------------------------------------------------------------------------------
def test_sections_from_ctrate_columns():
    s = split_sections({"ClinicalInformation_EN": "Cough.", "Technique_EN": "Not given.",
                        "Findings_EN": "Small nodule &amp; <br>effusion.", "Impressions_EN": "Nodule."})
    assert s == {"clinical_information": "Cough.", "technique": "", "findings": "Small nodule & effusion.",
                 "impression": "Nodule."}


def test_sections_from_headers_case_insensitive_with_or_without_colon():
    s = split_sections("Clinical Information: fever\nTECHNIQUE: non-contrast\nFindings\nA nodule is seen.\nIMPRESSION Nodule.")
    assert s["clinical_information"] == "fever" and s["technique"] == "non-contrast"
    assert s["findings"] == "A nodule is seen." and s["impression"] == "Nodule."


def test_prose_word_findings_is_not_a_header():
    s = split_sections("CT findings of pneumonia are not seen. Heart is normal.")
    assert s["findings"].startswith("CT findings of pneumonia") and s["impression"] == ""


@pytest.mark.parametrize("text", [
    "Findings: Surgical clips from the earlier procedure: mediastinum. A small right pleural effusion.",
    "Findings: Postoperative changes, clinical history: wedge resection. A small right pleural effusion.",
    "FINDINGS: Status after procedure: a median sternotomy. A small right pleural effusion.\nIMPRESSION: Effusion.",
])
def test_a_header_word_with_a_colon_inside_a_clause_is_prose(text):
    """Such a word opened a section that took every finding up to the next header."""
    s = split_sections(text)
    assert "small right pleural effusion" in s["findings"] and not s["technique"] and not s["clinical_information"]
    assert parse_report(text).labels["Pleural effusion"] == 1


def test_a_colon_header_opening_a_sentence_or_capitalised_still_counts():
    assert split_sections("The heart is normal. impression: mild emphysema.")["impression"] == "mild emphysema."
    s = split_sections("Lungs are clear, Impression: normal chest CT.")
    assert s["findings"] == "Lungs are clear," and s["impression"] == "normal chest CT."


@pytest.mark.parametrize("sep", ['"', "•"])
def test_sections_from_separators(sep):
    s = split_sections(f"Aorta is calcified. No effusion. {sep} Aortic calcification {sep} Emphysema")
    assert s["findings"] == "Aorta is calcified. No effusion."
    assert s["impression"].startswith(sep) and "Emphysema" in s["impression"]


# --- negation and uncertainty ---------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Pleural effusion-thickening is not seen in either hemithorax.",
    "No pleural effusion is seen.",
    "There is no evidence of pleural effusion.",
    "No nodular or infiltrative lesion was found in the lungs, and no pleural effusion or thickening.",
])
def test_negated_effusion(text):
    assert statuses(text, "Pleural effusion") == ["negated"]


def test_coordinated_pre_negation():
    text = "No consolidation, pleural effusion or pneumothorax is present."
    assert statuses(text, "Consolidation") == ["negated"] and statuses(text, "Pleural effusion") == ["negated"]


def test_coordinated_post_negation():
    text = "Atelectasis and bronchiectasis were not observed in either lung."
    assert statuses(text, "Atelectasis") == ["negated"] and statuses(text, "Bronchiectasis") == ["negated"]


def test_scope_ends_at_terminator_and_assertion():
    assert statuses("No pleural effusion, but atelectasis is present in the left lower lobe.", "Atelectasis") == ["present"]
    assert statuses("No effusion was detected in the pleura, linear atelectasis is seen on the right.", "Atelectasis") == ["present"]
    assert statuses("Emphysema is seen in both lungs; consolidation was not detected.", "Emphysema") == ["present"]


def test_lung_parenchyma_window_phrase():
    text = "On review of the lung window; no nodular or infiltrative lesion is seen in either lung."
    assert statuses(text, "Lung nodule") == ["negated"] and statuses(text, "Lung opacity") == ["negated"]


@pytest.mark.parametrize("text", [
    "Appearance suspicious for consolidation in the right lower lobe.",
    "Consolidation in the right lower lobe cannot be excluded.",
    "Possible consolidation in the right lower lobe.",
])
def test_uncertain(text):
    assert statuses(text, "Consolidation") == ["uncertain"]


def test_sentence_wide_negation_of_previous_findings():
    text = "The pleural effusion on the right, which was seen on the earlier scan, was not detected in the current examination."
    assert statuses(text, "Pleural effusion") == ["negated"]


# --- attributes -----------------------------------------------------------------------------
def test_laterality_and_lobe():
    m = one("A 6 mm nodule is observed in the lower lobe of the right lung.", "Lung nodule")
    assert (m.laterality, m.location) == ("right", "RLL")
    assert one("Atelectasis in the left lung upper lobe lingular segment.", "Atelectasis").laterality == "left"
    assert one("Subsegmental atelectasis in the left upper lobe.", "Atelectasis").location == "LUL"
    assert one("Mild atelectasis in the right middle lobe.", "Atelectasis").location == "RML"
    assert one("Bilateral pleural effusion is present.", "Pleural effusion").laterality == "bilateral"
    assert one("Emphysematous changes in both lungs.", "Emphysema").laterality == "bilateral"
    assert one("Cardiomegaly is present.", "Cardiomegaly").location == "heart"


@pytest.mark.parametrize("text,label,side", [
    # the other side is said of another noun: the finding keeps its own
    ("Right lower lobe atelectasis and left hilar mass.", "Atelectasis", "right"),
    ("Right pleural effusion and left pneumothorax.", "Pleural effusion", "right"),
    ("Left pneumothorax and right pleural effusion.", "Pleural effusion", "right"),
    ("Left clavicle fracture and right pleural effusion.", "Pleural effusion", "right"),
    ("Atelectasis in the right lower lobe and left chest wall lipoma.", "Atelectasis", "right"),
    # right and left listed for the one finding
    ("Left and right pleural effusions.", "Pleural effusion", "bilateral"),
    ("Moderate left and small right pleural effusions.", "Pleural effusion", "bilateral"),
    ("Left upper lobe and right lower lobe atelectasis.", "Atelectasis", "bilateral"),
    ("Left hilar and right paratracheal lymphadenopathy.", "Lymphadenopathy", "bilateral"),
    ("Right pleural effusion, and a smaller one on the left.", "Pleural effusion", "bilateral"),
    ("Atelectasis in the left lower lobe and the right middle lobe.", "Atelectasis", "bilateral"),
])
def test_a_side_said_of_another_noun_is_not_listed_with_the_findings(text, label, side):
    """"Left effusion and right pneumothorax" made the effusion bilateral, and the prompt said so."""
    m = one(text, label)
    assert m.laterality == side
    assert structured_prompt(parse_report(text).mentions).startswith(side) or side in structured_prompt([m])


@pytest.mark.parametrize("text,lo,hi", [
    ("A 5-7 mm nodule in the right upper lobe.", 5.0, 7.0),
    ("A nodule of 1.2 cm in the left lower lobe.", 12.0, 12.0),
    ("A 9x6 mm nodule in the left lower lobe.", 6.0, 9.0),
    ("A nodule measuring 4 to 8 mm in the lingula.", 4.0, 8.0),
    # a size as a compound adjective, hyphenated before its unit
    ("A 3-mm nodule in the right upper lobe.", 3.0, 3.0),
    ("A 1.5-cm nodule in the left upper lobe.", 15.0, 15.0),
    ("A 12 x 8-mm nodule in the left lower lobe.", 8.0, 12.0),
])
def test_sizes(text, lo, hi):
    m = one(text, "Lung nodule")
    assert (m.size_mm_min, m.size_mm_max) == (lo, hi)


def test_count_and_severity():
    assert one("Multiple nodules are seen in both lungs.", "Lung nodule").count == "multiple"
    assert one("A few millimetric nodules in the right lung.", "Lung nodule").count == "a few"
    assert one("A single nodule is seen in the right lung.", "Lung nodule").count == "single"
    assert one("Mild emphysema in the upper lobes.", "Emphysema").severity == "mild"
    assert one("Moderate pleural effusion on the left.", "Pleural effusion").severity == "moderate"
    assert one("Severe centrilobular emphysema.", "Emphysema").severity == "severe"


# --- vocabulary -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,label", [
    ("A pacemaker with leads in the right heart is noted.", "Medical material"),
    ("Sternotomy wires are present.", "Medical material"),
    ("Calcified atheroma plaques are seen in the wall of the thoracic aorta.", "Arterial wall calcification"),
    ("Calcific plaques in the coronary arteries.", "Coronary artery wall calcification"),
    ("The heart size is increased.", "Cardiomegaly"),
    ("Pericardial effusion of 8 mm thickness.", "Pericardial effusion"),
    ("A sliding type hiatal hernia is observed.", "Hiatal hernia"),
    ("Enlarged lymph nodes in the subcarinal region, the largest 14 mm.", "Lymphadenopathy"),
    ("Paraseptal emphysema in the apices.", "Emphysema"),
    ("Plate-like atelectatic changes in the lower lobes.", "Atelectasis"),
    ("Patchy ground-glass densities in the right lung.", "Lung opacity"),
    ("Pleuroparenchymal sequelae changes at the apex of the left lung.", "Pulmonary fibrotic sequela"),
    ("Mosaic attenuation pattern in both lungs.", "Mosaic attenuation pattern"),
    ("Peribronchial thickening in the lower lobes.", "Peribronchial thickening"),
    ("Consolidation with air bronchograms in the left lower lobe.", "Consolidation"),
    ("Cylindrical bronchiectatic changes in both lower lobes.", "Bronchiectasis"),
    ("Thickening of the interlobular septa in both lungs.", "Interlobular septal thickening"),
])
def test_each_label_is_found(text, label):
    assert parse_report(text).labels[label] == 1


def test_organ_and_wording_exclusions():
    r = parse_report("A hypodense nodule in the right lobe of the thyroid gland. Lymph nodes of normal size in the mediastinum. "
                     "Calcific plaques in the coronary arteries. Fibroatelectatic bands in the left lung.")
    assert r.labels["Lung nodule"] == 0 and r.labels["Lymphadenopathy"] == 0
    assert r.labels["Arterial wall calcification"] == 0 and r.labels["Coronary artery wall calcification"] == 1
    assert r.labels["Atelectasis"] == 0 and r.labels["Pulmonary fibrotic sequela"] == 1


def test_bare_effusion_is_placed():
    r = parse_report("Effusion measuring 20 mm in the left hemithorax. No pleural or pericardial effusion on the right side.")
    assert statuses("Effusion measuring 20 mm in the left hemithorax.", "Pleural effusion") == ["present"]
    assert statuses("No pleural or pericardial effusion.", "Pericardial effusion") == ["negated"]
    assert r.labels["Pleural effusion"] == 1 and r.labels["Pericardial effusion"] == 0


@pytest.mark.parametrize("text,label", [
    ("Scattered GGOs are present in the left lung.", "Lung opacity"),
    ("Patchy opacification of the lingula.", "Lung opacity"),
    ("Patchy densities at the base of the right lung.", "Lung opacity"),
    ("Areas of increased attenuation in both upper lobes.", "Lung opacity"),
    ("The heart is mildly enlarged.", "Cardiomegaly"),
    ("Cardiac enlargement is noted.", "Cardiomegaly"),
    ("Increased cardiothoracic ratio.", "Cardiomegaly"),
    ("An increase in the size of the heart is seen.", "Cardiomegaly"),
    ("Collapse of the left lower lobe.", "Atelectasis"),
    ("Dystelectatic bands at both lung bases.", "Atelectasis"),
    ("Nodularity in the superior segment of the left lower lobe.", "Lung nodule"),
    ("Thickened septa are seen in the periphery of both lungs.", "Interlobular septal thickening"),
    ("Kerley B lines at the lung bases.", "Interlobular septal thickening"),
    ("A calcified plaque in the proximal LAD.", "Coronary artery wall calcification"),
    ("Calcium deposits in the coronary arteries.", "Coronary artery wall calcification"),
    ("A small sliding hernia is present.", "Hiatal hernia"),
    ("The gastric fundus has herniated into the posterior mediastinum.", "Hiatal hernia"),
    ("Fluid collection in the right costophrenic sinus.", "Pleural effusion"),
    ("Loculated empyema on the left.", "Pleural effusion"),
    ("Haemothorax on the right after trauma.", "Pleural effusion"),
    ("Lymphadenomegaly in the aortopulmonary window.", "Lymphadenopathy"),
    ("An enlarged subcarinal node of 17 mm.", "Lymphadenopathy"),
    ("An IVC filter is seen in the lower sections.", "Medical material"),
    ("A PICC line enters through the right arm.", "Medical material"),
    ("Endobronchial valves in the right upper lobe bronchus.", "Medical material"),
    ("Band-like densities at the apex of the right lung.", "Pulmonary fibrotic sequela"),
    ("Ectatic bronchi in the lower lobes.", "Bronchiectasis"),
])
def test_synonyms_and_variants(text, label):
    assert parse_report(text).labels[label] == 1


@pytest.mark.parametrize("text,label", [
    ("A calcified plaque in the proximal LAD.", "Arterial wall calcification"),
    ("Calcified lymph nodes in the aortopulmonary window.", "Arterial wall calcification"),
    ("Calcification of the aortic valve leaflets.", "Arterial wall calcification"),
    ("A Bochdalek hernia containing fat on the left.", "Hiatal hernia"),
    ("Nodular thickening with pleural nodularity on the right.", "Lung nodule"),
    ("Gallbladder empyema in the upper abdominal sections.", "Pleural effusion"),
])
def test_lookalikes_are_not_findings(text, label):
    assert parse_report(text).labels[label] == 0


@pytest.mark.parametrize("text,label,status", [
    ("The heart is not enlarged.", "Cardiomegaly", "negated"),
    ("No increase in heart size.", "Cardiomegaly", "negated"),
    ("No increase in lung density is seen.", "Lung opacity", "negated"),
    ("Both lungs are clear of nodules.", "Lung nodule", "negated"),
    ("Pleural effusion wasn't observed on this scan.", "Pleural effusion", "negated"),
    ("Nodules can't be seen in the upper lobes.", "Lung nodule", "negated"),
    ("No pleural effusion, mild atelectasis at the left base.", "Atelectasis", "present"),
    ("Effusion is not only on the left but on both sides in the pleural spaces.", "Pleural effusion", "present"),
    ("The nodule in the left lung has regressed in size.", "Lung nodule", "present"),
    ("The pleural effusion has regressed completely.", "Pleural effusion", "negated"),
    ("No regression of the nodule in the right lower lobe.", "Lung nodule", "present"),
    ("Without significant change, the nodules persist in the right lung.", "Lung nodule", "present"),
    ("Reticular changes suggestive of atelectasis at the bases.", "Atelectasis", "uncertain"),
    ("Linear densities evaluated in favor of atelectasis.", "Atelectasis", "uncertain"),
    ("Opacities concerning for consolidation in the lingula.", "Consolidation", "uncertain"),
    ("The cardiothoracic ratio is increased in favor of the heart, with atelectasis at the bases.", "Atelectasis", "present"),
])
def test_negation_pseudo_negation_and_hedges(text, label, status):
    assert statuses(text, label) == [status]


def test_attributes_come_from_the_findings_own_words():
    r = parse_report("A 5 mm nodule in the right lower lobe and left pleural effusion.")
    nodule, effusion = (next(m for m in r.mentions if m.label == k) for k in ("Lung nodule", "Pleural effusion"))
    assert (nodule.laterality, nodule.location, nodule.size_mm_max) == ("right", "RLL", 5.0)
    assert (effusion.laterality, effusion.size_mm_max) == ("left", None)
    r = parse_report("Emphysema in both lungs and a nodule in the left upper lobe.")
    emph, nodule = (next(m for m in r.mentions if m.label == k) for k in ("Emphysema", "Lung nodule"))
    assert (emph.laterality, emph.location, nodule.laterality, nodule.location) == ("bilateral", "lung", "left", "LUL")
    r = parse_report("Atelectasis and consolidation in the right lower lobe.")  # a shared place applies to both
    assert {(m.label, m.laterality, m.location) for m in r.mentions} == {("Atelectasis", "right", "RLL"),
                                                                         ("Consolidation", "right", "RLL")}
    assert one("Nodules in the right upper lobe and left lower lobe.", "Lung nodule").laterality == "bilateral"


def test_attribute_spellings():
    assert one("A 3 mm nodule in the left upper lobe.", "Lung nodule").count == "single"  # "3 mm" is a size
    assert one("Two nodules in the left upper lobe.", "Lung nodule").count == "a few"
    assert one("A nodule in the RLL.", "Lung nodule").location == "RLL"
    m = one("Nodules of 3 mm - 5 mm in the left lung.", "Lung nodule")
    assert (m.size_mm_min, m.size_mm_max) == (3.0, 5.0)
    assert one("Biapical fibrotic sequelae.", "Pulmonary fibrotic sequela").laterality == "bilateral"
    assert one("A large left pleural effusion.", "Pleural effusion").severity == "severe"


def test_prefilter_keywords_cover_every_match():
    from ctprep.reports.prefilter import compile_lower, keywords, lower_same_length
    from ctprep.reports.vocabulary import RULES
    assert keywords(r"\bfoo(bar|baz)s?|qux\w*") == frozenset({"foo", "qux"})
    assert keywords(r"\w+") is None
    with pytest.raises(ValueError):
        compile_lower(r"\bNodule")
    assert lower_same_length("İ nodule") == "i nodule"
    texts = [p.lower() for p in ("Calcified atheroma plaques in the aortic arch and the LAD.", "Sliding type hernia.",
                                 "Peribronchial cuffing, honeycombing and ectatic bronchi.", "Chemo port in place.",
                                 "Septa are thickened; crazy-paving.", "Fluid in the pleural space and GGOs.")]
    for rule in RULES:
        words = keywords(rule.pattern)
        assert words, f"no keywords for {rule.label}: the rule would scan every sentence"
        rx = compile_lower(rule.pattern)
        for t in texts:
            for m in rx.finditer(t):
                assert any(w in m.group(0) for w in words), (rule.label, m.group(0))


# --- labels and prompts ---------------------------------------------------------------------
def test_label_vector_rules():
    r = parse_report({"findings": "Minimal atelectasis in the right lower lobe. No pleural effusion.",
                      "impression": "Possible consolidation. No pneumonia."})
    assert list(r.labels) == list(LABELS)
    assert r.labels["Atelectasis"] == 1 and r.labels["Consolidation"] == 1  # uncertain counts
    assert r.labels["Pleural effusion"] == 0 and sum(r.labels.values()) == 2


def test_structured_prompt():
    ms = parse_report("A 5 mm nodule in the right lower lobe. Bilateral pleural effusion. Cardiomegaly. "
                      "No pericardial effusion.").mentions
    assert structured_prompt(ms) == "cardiomegaly; right lower lobe nodule 5 mm; bilateral pleural effusion"
    assert structured_prompt(ms, negated="state").endswith("; no pericardial effusion")
    assert structured_prompt(ms, max_chars=42) == "cardiomegaly; right lower lobe nodule 5 mm"
    assert structured_prompt(ms, max_chars=41) == "cardiomegaly"
    assert structured_prompt(ms, max_chars=5) == "cardiomegaly"  # the first item whole: a cut lost its noun
    assert structured_prompt([]) == NO_FINDINGS
    assert structured_prompt(parse_report("No effusion in the pleura.").mentions) == NO_FINDINGS
    with pytest.raises(ValueError):
        structured_prompt(ms, negated="maybe")


# --- robustness and API ---------------------------------------------------------------------
@pytest.mark.parametrize("x", ["", "Not given.", None, {}, {"findings": None, "impression": float("nan")},
                               "<p>Pleural effusion&nbsp;is seen.</p>", "Çöp şüphesi yok. 肺结节 ??? ...", "• • \" \"",
                               "A nodule. " * 800])
def test_robust_inputs(x):
    r = parse_report(x)
    assert isinstance(r, ParsedReport) and set(r.labels) == set(LABELS)
    json.dumps(r.to_json())


def test_markup_and_long_report():
    assert parse_report("<b>Pleural&nbsp;effusion</b> is seen.").labels["Pleural effusion"] == 1
    r = parse_report("Heart size is normal. " * 350 + "Bilateral pleural effusion.")
    assert len(r.sections["findings"]) > 7000 and r.labels["Pleural effusion"] == 1


def test_a_run_on_sentence_parses_in_time_near_that_of_the_same_text_with_full_stops():
    """A dictated report without full stops: its comma list is one sentence. The closed-list check walked that sentence
    for every mention x comma trigger (a 3.5 kB sentence took ~400 times as long as the same items with full stops,
    7 kB a minute); computed once per sentence the run-on costs a few times the stopped text. The bound is a ratio
    to the stopped text timed alongside, so a slow or loaded machine slows both."""
    import time
    item = "a tiny nodule in the left upper lobe, trace pleural fluid, some atelectasis and mild emphysema, "
    run_on, stopped = "There is " + item * 40, "There is " + (item[:-2] + ". ") * 40
    assert len(run_on) > 3500

    def best(text, tries):
        times = []
        for _ in range(tries):
            t0 = time.perf_counter()
            r = parse_report(text)
            times.append(time.perf_counter() - t0)
        return min(times), r

    parse_report("Warm up.")
    base, _ = best(stopped, 3)
    took, r = best(run_on, 1)
    if took > 60 * max(base, 0.005):
        took, r = best(run_on, 1)  # one more try, should the machine have been busy just then
    assert took < 60 * max(base, 0.005), (took, base)
    assert r.labels["Lung nodule"] == r.labels["Pleural effusion"] == r.labels["Emphysema"] == 1


def test_a_run_on_sentence_is_read_in_stretches_of_at_most_max_sentence_tokens():
    """Each rule reads a mention's whole sentence, so the section cap bounds time only with sentences of bounded length:
    a longer one is split after a comma in the second half of each stretch, or at the stretch's end; a finding
    repeated across a split without punctuation is two mentions, not one span across both sentences."""
    from ctprep.reports.pipeline import MAX_SENTENCE_TOKENS, ReportParser
    nlp = ReportParser().nlp
    item = "a tiny nodule in the left upper lobe, trace pleural fluid, some atelectasis and mild emphysema, "
    doc = nlp("There is " + item * 60)
    sents = doc.user_data["sents"]
    assert len(doc) > 2 * MAX_SENTENCE_TOKENS and len(sents) >= 3
    assert all(b - a <= MAX_SENTENCE_TOKENS for a, b, *_ in sents)
    assert all(doc[a - 1].text == "," for a, *_ in sents[1:])  # split after a comma, where the list has one
    r = parse_report("There is " + item * 60)
    assert r.labels["Lung nodule"] == r.labels["Pleural effusion"] == r.labels["Atelectasis"] == 1
    words = "effusion " * (MAX_SENTENCE_TOKENS + 50)
    doc = nlp(words)
    assert [b - a for a, b, *_ in doc.user_data["sents"]] == [MAX_SENTENCE_TOKENS, 50]
    ms = parse_report(words).mentions
    assert len(ms) == 2 and ms[0].sentence == 0 and ms[1].sentence == 1



@pytest.mark.parametrize("filler", ["mild emphysema in the right upper lobe ,", "the heart size is normal",
                                    "no nodule , the aorta is normal ,"])
@pytest.mark.parametrize("n", [390, 392, 394, 396, 398, 420])
def test_a_run_on_sentence_is_not_cut_inside_an_open_negation(filler, n):
    """The cut used to fall after the list's last comma, and the items after it read as present."""
    from ctprep.reports.pipeline import MAX_SENTENCE_TOKENS, ReportParser
    words = (filler.split() * n)[:n]
    text = " ".join(words) + " no consolidation, pleural effusion, atelectasis, or emphysema."
    sents = ReportParser().nlp(text).user_data["sents"]
    assert len(sents) >= 2 and all(b - a <= MAX_SENTENCE_TOKENS for a, b, *_ in sents)
    tail = [m for m in parse_report(text).mentions if m.start > len(text) - 65]
    assert [m.label for m in tail] == ["Consolidation", "Pleural effusion", "Atelectasis", "Emphysema"]
    assert all(m.status == "negated" for m in tail)


def test_pipe_matches_parse_and_factory_is_cached():
    texts = ["Emphysema in both lungs.", "No emphysema.", {"findings": "Cardiomegaly."}]
    parser = ReportParser()
    assert [p.labels for p in parser.pipe(texts, batch_size=2)] == [parser.parse(t).labels for t in texts]
    assert get_parser() is get_parser()
    assert parse_report(texts[0]).mentions[0].to_dict()["label"] == "Emphysema"


# --- CLI ------------------------------------------------------------------------------------
def _run(monkeypatch, capsys, stdin, argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert parse_report_main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_plain_text(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # no config.yaml here: structured prompt only
    out = _run(monkeypatch, capsys, "Findings: A 4 mm nodule in the left upper lobe.\nImpression: Nodule.", [])
    assert out["labels"]["Lung nodule"] == 1 and out["sections"]["impression"] == "Nodule."
    assert out["prompts"] == {"structured": "left upper lobe nodule 4 mm"} and out["mentions"][0]["location"] == "LUL"


def test_cli_json_with_templates(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('prompts:\n  templates:\n    g: "{age} years old {sex}: {impression}"\n    t: "{technique}"\n')
    doc = {"id": "r1", "age": 61, "sex": "female", "findings": "Cardiomegaly.", "impression": "Cardiomegaly."}
    out = _run(monkeypatch, capsys, json.dumps(doc), ["--config", str(cfg)])
    assert out["id"] == "r1" and out["prompts"] == {"structured": "cardiomegaly", "g": "61 years old female: Cardiomegaly.",
                                                    "t": None}


def test_cli_jsonl(tmp_path, repo_config):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "No effusion in the pleura."}) + "\n\n"
                   + json.dumps({"id": "b", "findings": "Emphysema.", "impression": "Emphysema.", "age": 50, "sex": "male"}) + "\n")
    assert parse_report_main(["--jsonl", str(src), str(dst), "--config", str(repo_config)]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["labels"]["Emphysema"] == 1
    assert rows[0]["prompts"]["structured"] == NO_FINDINGS and rows[0]["prompts"]["generatect"] is None
    assert rows[1]["prompts"]["generatect"] == "50 years old male: Emphysema."


def test_a_lone_surrogate_is_replaced_not_fatal(tmp_path, repo_config):
    """A "\\ud800" escape in JSON input is a lone surrogate, which no UTF-8 writer takes: it stopped the whole file."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "text": "Small left pleural effusion \\ud800."}\n'
                   '{"id": "b", "findings": "Emphysema \\udfff.", "impression": "Emphysema.", "age": 50, "sex": "male",'
                   ' "labels": {"Emphysema": 1}}\n')
    assert parse_report_main(["--jsonl", str(src), str(dst), "--config", str(repo_config)]) == 0
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["labels"]["Pleural effusion"] == 1 and rows[0]["sections"]["findings"].endswith("effusion \ufffd.")
    assert rows[1]["prompts"]["findings_impression"] == "50 years old male. Findings: Emphysema \ufffd. Impression: Emphysema."
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"id": "a", "text": "Small left pleural effusion \\ud800.", "labels": {"Pleural effusion": 1}}\n')
    assert evaluate(ref)["micro_f1"] == 1.0


def test_an_empty_report_in_a_jsonl_file_is_one_error_row_not_the_end_of_the_file(monkeypatch, caplog, tmp_path):
    """One empty row stopped the whole file with status 2 and no output at all."""
    monkeypatch.chdir(tmp_path)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "findings": "Mild emphysema."}, {"id": "b", "findings": "", "impression": None},
        {"id": "c", "text": "Small right pleural effusion."}, {"text": "  "}]) + "\n")
    assert main(["parse-report", "--jsonl", str(src), str(dst)]) == 0
    err = caplog.text  # a warning: on stderr from the command line
    assert f"{src}:2" in err and f"{src}:4" in err and "empty" in err and f"{src}:1" not in err
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a", "b", "c", None]  # one row out for each row in, in order
    assert rows[0]["labels"]["Emphysema"] == 1 and rows[2]["labels"]["Pleural effusion"] == 1
    for row in rows[1], rows[3]:
        assert row["error"] == "the report text is empty" and row["labels"] == {} and row["mentions"] == []
        assert row["prompts"]["structured"] is None and set(row) >= {"sections", "mentions", "labels", "prompts"}
    assert "error" not in rows[0] and rows[0]["prompts"]["structured"] != NO_FINDINGS


def test_a_line_that_is_no_json_object_or_a_field_that_is_no_text_is_an_error_row(monkeypatch, caplog, capsys, tmp_path):
    """One line that was not JSON stopped the whole file (status 2, no output); {"findings": {"a": 1}} or 5 was parsed
    as the text "{'a': 1}" or "5"."""
    monkeypatch.chdir(tmp_path)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([json.dumps({"id": "a", "findings": "Mild emphysema."}), '{"id": "b", findings: 1}',
                              json.dumps({"id": "c", "findings": {"a": 1}}), "[1, 2]",
                              json.dumps({"id": "e", "impression": 5}), json.dumps({"id": "f", "text": "Cardiomegaly."}),
                              json.dumps({"id": "g", "findings": ""})]) + "\n")
    with caplog.at_level("INFO"):
        assert main(["parse-report", "--jsonl", str(src), str(dst)]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a", None, "c", None, "e", "f", "g"]  # one row out for each row in
    assert [r.get("error") for r in rows] == [None, "not a JSON object", "field 'findings' is not text but a JSON object",
                                              "not a JSON object", "field 'impression' is not text but a JSON number",
                                              None, "the report text is empty"]
    assert rows[0]["labels"]["Emphysema"] == 1 and rows[5]["labels"]["Cardiomegaly"] == 1
    for row in rows[1:5]:
        assert row["labels"] == {} and row["mentions"] == [] and row["prompts"]["structured"] is None
    assert f"{src}:2, {src}:4" in caplog.text and f"{src}:3" in caplog.text
    assert caplog.records[-1].getMessage().endswith("parsed 2 reports from " + f"{src} into {dst}; 5 row(s) written "
                                                    "with an error instead (see the warnings)")
    src.write_text("[1, 2]\nnot json\n")  # a file that is no JSON lines at all: one line, not N error rows
    assert main(["parse-report", "--jsonl", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{src}:1: not a JSON object, and no row of the file has a report to parse")
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"findings": ["Emphysema."]}'))
    assert main(["parse-report"]) == 2
    assert "stdin: field 'findings' is not text but a JSON array" in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ("- 1\n", "is not a YAML mapping of sections"),
    ("prompts: [1]\n", "prompts: [1] is not of type 'object'"),
    ("prompts:\n  templates: [1, 2]\n", "prompts.templates: [1, 2] is not of type 'object'"),
    ("prompts:\n  templates: {g: '{age}'}\n  max_chars: abc\n", "prompts.max_chars: 'abc' is not of type 'integer'"),
    ("prompts:\n  templates: {g: '{nope'}\n", "config prompts.templates.g: expected '}' before end of string"),
    ("prompts:\n  templates: {g: '{diagnosis}'}\n", "config prompts.templates.g: prompt template '{diagnosis}' uses "
                                                     "unknown fields ['diagnosis']"),
], ids=["list", "prompts-list", "templates-list", "max-chars", "unbalanced", "unknown-field"])
def test_a_bad_parse_report_config_is_one_line_naming_the_key(monkeypatch, capsys, tmp_path, config, message):
    """A list gave an AttributeError or TypeError traceback, max_chars: abc "invalid literal for int()" with no key,
    a template "{nope" "expected '}' before end of string" with no template."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Cardiomegaly."))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    assert main(["parse-report", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_field_names_are_read_in_any_case():
    """A report keyed "Findings" read as empty: no label, and the prompt "no acute findings"."""
    s = split_sections({"FINDINGS": "Moderate cardiomegaly.", "Impression": "Cardiomegaly.", "Clinical Information": "Dyspnoea."})
    assert s == {"clinical_information": "Dyspnoea.", "technique": "", "findings": "Moderate cardiomegaly.",
                 "impression": "Cardiomegaly."}
    assert split_sections({"findings_en": "Emphysema."})["findings"] == "Emphysema."
    assert parse_report({"Report": "Findings: A small right pleural effusion."}).labels["Pleural effusion"] == 1


def test_cli_refuses_an_input_without_report_text(monkeypatch, capsys, tmp_path):
    """A misnamed field or an empty input gave all-zero labels and "no acute findings" with status 0."""
    monkeypatch.chdir(tmp_path)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": 1, "Findings": "Mild emphysema."}) + "\n" + json.dumps({"id": 2, "body": "Emphysema."}) + "\n")
    assert main(["parse-report", "--jsonl", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: no report field" in err and "Findings_EN" in err and len(err.strip().splitlines()) == 1
    for doc in ({"id": 3, "findings": "  ", "impression": "Not given."}, {"id": 4, "text": ""}):
        src.write_text(json.dumps(doc) + "\n")  # a file of nothing but empty reports
        assert main(["parse-report", "--jsonl", str(src), str(dst)]) == 2
        assert f"{src}:1: the report text is empty" in capsys.readouterr().err
    for stdin in (" \n", '{"id": 5, "Findings": ""}'):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        assert main(["parse-report"]) == 2
        assert "stdin: the report text is empty" in capsys.readouterr().err
    out = _run(monkeypatch, capsys, json.dumps({"id": 6, "Findings": "Mild emphysema."}), [])
    assert out["labels"]["Emphysema"] == 1 and out["sections"]["findings"] == "Mild emphysema."


# --- evaluation -----------------------------------------------------------------------------
def test_a_failed_f1_threshold_says_so(tmp_path, caplog):
    """Status 1 came without a word of why."""
    path = tmp_path / "ref.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "Emphysema in both lungs.",
                                "labels": {**dict.fromkeys(LABELS, 0), "Pleural effusion": 1}}) + "\n")
    with caplog.at_level("ERROR"):
        assert evaluate_main([str(path), "--out", str(tmp_path / "t.tsv"), "--min-macro-f1", "0.5"]) == 1
    assert "macro-F1 0.000 is below --min-macro-f1 0.500" in caplog.text


def test_score_on_own_reports(tmp_path):
    rows = [{"id": "x", "text": "Cardiomegaly. No effusion in the pleura.", "labels": {**dict.fromkeys(LABELS, 0), "Cardiomegaly": 1}},
            {"id": "y", "text": "Emphysema in both lungs.", "labels": {**dict.fromkeys(LABELS, 0), "Pleural effusion": 1}}]
    path = tmp_path / "ref.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = evaluate(path)
    assert res["per_label"]["Cardiomegaly"]["f1"] == 1.0
    assert res["per_label"]["Pleural effusion"]["recall"] == 0.0 and res["per_label"]["Emphysema"]["precision"] == 0.0
    assert evaluate(path, ids=["x"])["n_reports"] == 1
    out = tmp_path / "t.tsv"
    assert evaluate_main([str(path), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0].startswith("label\tprecision") and evaluate_main([str(path), "--min-macro-f1", "0.99"]) == 1
    assert {split_of(str(i)) for i in range(30)} == {"dev", "heldout"} and split_of("abc") == split_of("abc")


def test_the_macro_f1_averages_labels_with_positives_and_an_empty_split_is_refused(tmp_path, capsys):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "No pleural effusion.", "labels": {"Pleural effusion": 1}}) + "\n")
    res = evaluate(path)
    # the 17 labels without a positive (each F1 1.0 on no prediction) no longer lift the missed effusion to 0.944
    assert res["macro_labels"] == 1 and res["macro_f1"] == 0.0
    heldout = [i for i in map(str, range(30)) if split_of(i) == "heldout"][0]
    assert split_of("a") == "dev" and heldout
    with pytest.raises(UserError, match="no labelled reports in the chosen split"):
        evaluate(path, ids=[heldout])
    assert main(["evaluate-parser", str(path), "--split", "heldout"]) != 0
    err = capsys.readouterr().err
    assert "no labelled reports in the chosen split" in err and "Traceback" not in err
    path.write_text(json.dumps({"id": "a", "text": "Emphysema.", "labels": {}}) + "\n")
    with pytest.raises(UserError, match="no label is positive"):
        evaluate(path)


def test_every_f1_has_a_bootstrap_ci_over_reports():
    """F1s against scikit-learn's (an independent reference); the CI holds the value and narrows with more reports."""
    from sklearn.metrics import f1_score

    from ctprep.reports.evaluate import score

    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        ref = rng.uniform(size=(n, len(LABELS))) < 0.3
        pred = ref ^ (rng.uniform(size=ref.shape) < 0.1)  # 10% of the labels wrong
        res = score(((dict(zip(LABELS, p.astype(int))), dict(zip(LABELS, r.astype(int)))) for p, r in zip(pred, ref)),
                    n_boot=300)
        assert res["macro_f1"] == pytest.approx(f1_score(ref, pred, average="macro", zero_division=1.0))
        assert res["micro_f1"] == pytest.approx(f1_score(ref, pred, average="micro"))
        for name in ("macro_f1", "micro_f1"):
            assert res[f"{name}_ci"][0] < res[name] < res[f"{name}_ci"][1]
        assert all(v["f1_ci"][0] <= v["f1"] <= v["f1_ci"][1] for v in res["per_label"].values())
        widths.append(res["macro_f1_ci"][1] - res["macro_f1_ci"][0])
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(10)


@pytest.mark.skipif(not DEV.is_file(), reason="reports_dev.jsonl (CC BY-NC-SA, not in the repo) is absent")
def test_macro_f1_on_radiologist_labels():
    res = evaluate(DEV)
    assert res["n_reports"] == 150
    assert res["macro_f1"] >= 0.95, res["macro_f1"]
    assert 0.9 < res["macro_f1_ci"][0] < res["macro_f1"] < res["macro_f1_ci"][1] <= 1.0


def test_the_indication_never_sets_a_label_or_a_prompt_item():
    from ctprep.reports import parse_report, structured_prompt

    parsed = parse_report({"clinical_information": "Cough. Known nodule, follow-up. Rule out effusion.",
                           "findings": "No nodular lesion is seen in either lung. The pleural spaces are clear.",
                           "impression": "Mild cardiomegaly."})
    assert any(m.section == "clinical_information" and m.label == "Lung nodule" for m in parsed.mentions)
    assert parsed.labels["Lung nodule"] == 0 and parsed.labels["Cardiomegaly"] == 1
    assert structured_prompt(parsed.mentions) == "mild cardiomegaly"


@pytest.mark.parametrize("text,label,status", [
    # a phrase on the pre- and the post-negation lists kept one reading: never a pre-negation
    ("Absent pericardial effusion.", "Pericardial effusion", "negated"),
    ("Lungs clear, absent pleural effusion.", "Pleural effusion", "negated"),
    ("Ruled out pericardial effusion.", "Pericardial effusion", "negated"),
    ("Excluded pericardial effusion.", "Pericardial effusion", "negated"),
    ("Pericardial effusion absent, moderate emphysema.", "Emphysema", "present"),
    ("Pericardial effusion excluded, moderate emphysema.", "Emphysema", "present"),
    ("Pericardial effusion is absent.", "Pericardial effusion", "negated"),
    # "may be" on both hedge lists: never a post-hedge
    ("Consolidation may be present.", "Consolidation", "uncertain"),
    ("Emphysema may be seen in the upper lobes.", "Emphysema", "uncertain"),
    ("May be consolidation.", "Consolidation", "uncertain"),
])
def test_a_trigger_on_both_lists_reads_both_ways(text, label, status):
    assert statuses(text, label) == [status]


@pytest.mark.parametrize("text,label", [
    ("It is unlikely to represent atelectasis.", "Atelectasis"),
    ("Unlikely to represent emphysema.", "Emphysema"),
    ("Unlikely consolidation in the lingula.", "Consolidation"),
    ("Pericardial effusion is less likely.", "Pericardial effusion"),
    ("Atelectasis is improbable.", "Atelectasis"),
    ("Nothing to suggest lymphadenopathy.", "Lymphadenopathy"),
    ("There is nothing to indicate a pericardial effusion.", "Pericardial effusion"),
])
def test_probable_negation_before_and_after_its_finding(text, label):
    """NegEx's probable negation was a post-trigger only ("unlikely"): before its finding it was read as present."""
    assert statuses(text, label) == ["negated"] and parse_report(text).labels[label] == 0


def test_less_likely_in_a_differential_denies_only_what_follows():
    assert [(m.label, m.status) for m in parse_report("Atelectasis, less likely consolidation.").mentions] == [
        ("Atelectasis", "present"), ("Consolidation", "negated")]


def test_stdin_that_is_not_utf8_is_refused_as_a_jsonl_file_is(monkeypatch, capsys, tmp_path):
    """Stdin was decoded with U+FFFD for the bad bytes and parsed with status 0; --jsonl stopped."""
    monkeypatch.chdir(tmp_path)
    bad = "Small pleural effusion.".encode() + b"\xff\xfe"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bad), encoding="utf-8", errors="replace"))
    assert main(["parse-report"]) == 2
    assert "stdin is not UTF-8 text" in capsys.readouterr().err
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"id": 1, "text": "' + bad + b'"}\n')
    assert main(["parse-report", "--jsonl", str(src), str(tmp_path / "out.jsonl")]) == 2
    assert f"{src} is not UTF-8 text" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeffSmall pleural effusion.".encode())))
    assert main(["parse-report"]) == 0 and json.loads(capsys.readouterr().out)["labels"]["Pleural effusion"] == 1


def test_a_label_the_reference_leaves_out_is_unknown_not_absent(tmp_path, caplog):
    """A row labelled only {"Emphysema": 1} scored its stated effusion as a false positive, without a word."""
    path = tmp_path / "ref.jsonl"
    rows = [{"id": "p", "text": "Emphysema. Small right pleural effusion.", "labels": {"Emphysema": 1}},
            {"id": "q", "text": "Emphysema.", "labels": {"Emphysema": 1, "Pleural effusion": 0}},
            {"id": "r", "text": "Moderate left pleural effusion.", "labels": {**dict.fromkeys(LABELS, 0), "Pleural effusion": 1}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(path)
    eff = res["per_label"]["Pleural effusion"]
    assert (eff["fp"], eff["tp"], eff["n"]) == (0, 1, 2) and res["micro_f1"] == 1.0
    assert res["per_label"]["Emphysema"]["n"] == 3 and res["per_label"]["Cardiomegaly"]["n"] == 1
    assert "Pleural effusion 1 of 3" in caplog.text
    out = tmp_path / "t.tsv"
    assert evaluate_main([str(path), "--out", str(out)]) == 0
    header, *lines = out.read_text().splitlines()
    assert "\tn\t" in header and any(line.startswith("Pleural effusion\t") and "\t2\t" in line for line in lines)


def test_the_first_structured_item_is_never_cut_and_is_counted(caplog):
    import pandas as pd

    from ctprep.prompts import build_prompts

    ms = parse_report("Possible 6 mm nodule in the left upper lobe. No pleural effusion.").mentions
    first = structured_prompt(ms)
    assert first.endswith("nodule 6 mm") and structured_prompt(ms, max_chars=30) == first
    assert structured_prompt(ms, negated="state", max_chars=10) == first  # not a bare "no"
    cohort = pd.DataFrame([{"VolumeName": "v", "split": "train", "age": 60, "sex": "male", "impression": "Nodule."}])
    build_prompts(cohort, {}, max_chars=10, structured={"v": first})
    assert "1 prompts keep a first sentence longer than prompts.max_chars" in caplog.text


@pytest.mark.parametrize("text,expected", [
    # after its finding, with no other finding in its clause, a two-way trigger looks back, whatever follows it
    ("Pericardial effusion ruled out by echo.", [("Pericardial effusion", "negated")]),
    ("Pleural effusion excluded by this study.", [("Pleural effusion", "negated")]),
    ("Pleural effusion absent bilaterally.", [("Pleural effusion", "negated")]),
    ("Pleural effusion absent today.", [("Pleural effusion", "negated")]),
    ("Consolidation unlikely given the clinical picture.", [("Consolidation", "negated")]),
    # a conjunction starts another clause: the finding after it is not the trigger's
    ("Pleural effusion is absent but emphysema is noted.", [("Pleural effusion", "negated"), ("Emphysema", "present")]),
    ("Pleural effusion absent and emphysema present.", [("Pleural effusion", "negated"), ("Emphysema", "present")]),
    ("Pleural effusion absent with emphysema noted.", [("Pleural effusion", "negated"), ("Emphysema", "present")]),
    # before a thing that is no finding, it denies that thing, not a finding in a later clause
    ("Absent right kidney with pleural effusion.", [("Pleural effusion", "present")]),
    ("Absent left kidney, pleural effusion.", [("Pleural effusion", "present")]),
    # "may be" before a predicate other than existence hedges that predicate, as before
    ("Pleural effusion may be due to heart failure.", [("Pleural effusion", "present")]),
    # ... while the readings the two-way triggers were made for stay
    ("Absent pleural effusion.", [("Pleural effusion", "negated")]),
    ("Atelectasis may be present.", [("Atelectasis", "uncertain")]),
    ("Effusion absent, emphysema.", [("Pleural effusion", "negated"), ("Emphysema", "present")]),
    ("Ruled out pleural effusion.", [("Pleural effusion", "negated")]),
    ("Excluded pleural effusion.", [("Pleural effusion", "negated")]),
    # opening its clause, it has nothing to look back to: forward over a list joined by and/or
    ("Ruled out pleural and pericardial effusion.", [("Pericardial effusion", "negated"), ("Pleural effusion", "negated")]),
    ("Ruled out pneumothorax and pleural effusion.", [("Pleural effusion", "negated")]),
    ("Lungs clear, absent consolidation or atelectasis.", [("Consolidation", "negated"), ("Atelectasis", "negated")]),
])
def test_a_two_way_trigger_looks_back_unless_a_finding_follows_in_its_clause(text, expected):
    assert [(m.label, m.status) for m in parse_report(text).mentions] == expected


@pytest.mark.parametrize("text,first,second", [
    ("Atelectasis is less likely than consolidation.", "Atelectasis", "Consolidation"),
    ("Consolidation less likely than atelectasis in the lower lobes.", "Consolidation", "Atelectasis"),
])
def test_less_likely_than_compares_two_findings_and_denies_neither(text, first, second):
    """Both candidates of a comparison are hedged; the likelier one was read as negated."""
    assert statuses(text, first) == ["uncertain"] and statuses(text, second) == ["uncertain"]


def test_section_names_typed_on_one_lower_case_line_each_open_their_section():
    s = split_sections("clinical information: cough findings: pleural effusion and emphysema impression: effusion")
    assert (s["clinical_information"], s["findings"], s["impression"]) == (
        "cough", "pleural effusion and emphysema", "effusion")
    labels = parse_report("clinical information: cough findings: pleural effusion and emphysema impression: effusion").labels
    assert labels["Pleural effusion"] == 1 and labels["Emphysema"] == 1
    s = split_sections("technique: non-contrast ct findings: nodule conclusion: nodule")
    assert (s["technique"], s["findings"], s["impression"]) == ("non-contrast ct", "nodule", "nodule")


@pytest.mark.parametrize("text", [
    "findings: pleural effusion.impression: emphysema.",
    'findings: pleural effusion " impression: emphysema.',
    "findings: pleural effusion \u2022 impression: emphysema.",
])
def test_a_lower_case_header_right_after_a_full_stop_or_an_item_mark_opens_its_section(text):
    s = split_sections(text)
    assert s["findings"].startswith("pleural effusion") and s["impression"] == "emphysema."


@pytest.mark.parametrize("text", [
    "Findings: changes related to the prior procedure: sternotomy wires. Small pleural effusion.",
    "Findings: postoperative changes, history: lobectomy. Small pleural effusion.",
    "findings: pleural effusion. the impression: emphysema is kept",
    "findings: emphysema as in the findings: of last year. Small pleural effusion.",
])
def test_a_section_name_after_another_header_on_its_line_stays_prose_inside_a_phrase(text):
    """Only a main section's name, and not one a determiner or preposition ties to the words before it."""
    s = split_sections(text)
    assert not s["technique"] and not s["clinical_information"] and not s["impression"]
    assert parse_report(text).labels["Pleural effusion"] == 1
