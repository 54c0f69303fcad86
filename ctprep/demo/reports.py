"""Radiology reports in CT-RATE's style, written from the phantom's findings.

CT-RATE reports are translated from Turkish and follow a fixed tour: airways, mediastinum and
heart, oesophagus, lung parenchyma ("When examined in the lung parenchyma window; ..."), pleura,
upper abdomen, bones; normal structures are stated as negations. The impression lists the present
findings, often as "•" items. Every sentence here was written for this project; each finding has
several phrasings, picked by the scan's generator so the text parser sees variety.
"""

from __future__ import annotations

import numpy as np

from ctprep.ctrate import NOT_GIVEN
from ctprep.demo.phantom import Phantom

#: Words a report parser should find in the findings when a label is present (any one of them).
LABEL_KEYWORDS = {
    "Medical material": ("pacemaker", "sternotomy"),
    "Arterial wall calcification": ("atheroma", "atherosclerotic"),
    "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial effusion",),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal hernia",),
    "Lymphadenopathy": ("lymphadenopathy", "lymph node"),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelecta",),
    "Lung nodule": ("nodule",),
    "Lung opacity": ("ground-glass", "ground glass"),
    "Pulmonary fibrotic sequela": ("fibrotic", "sequela"),
    "Pleural effusion": ("pleural effusion",),
    "Mosaic attenuation pattern": ("mosaic",),
    "Consolidation": ("consolidation",),
}
#: Negated sentences used when a finding is absent (a parser must not read them as positive).
NO_PLEURAL_EFFUSION = ("Pleural effusion-thickening was not detected.", "No pleural effusion was detected in either hemithorax.")

_LOBE_LONG = {"RUL": "upper lobe of the right lung", "RML": "middle lobe of the right lung",
              "RLL": "lower lobe of the right lung", "LUL": "upper lobe of the left lung",
              "LLL": "lower lobe of the left lung"}
_LOBE_SHORT = {"RUL": "Right upper lobe", "RML": "Right middle lobe", "RLL": "Right lower lobe",
               "LUL": "Left upper lobe", "LLL": "Left lower lobe"}

_CLINICAL = ("Cough.", "Fever.", "Shortness of breath.", "Chest pain.", "Nodule follow-up.",
             "Known malignancy, staging.", "Dyspnea.", "Trauma.", "Weakness.")


def compose_report(p: Phantom, rng: np.random.Generator, slice_mm: float) -> dict[str, str]:
    """Clinical information, technique, findings and impression for one scan."""
    pick = _Picker(rng)
    f = {x["kind"]: x for x in p.pathologies}
    nodules = [x for x in p.pathologies if x["kind"] == "nodule"]
    out: list[str] = []
    imp: list[str] = []

    out.append(pick("Trachea, both main bronchi are open.", "Trachea and both main bronchi are patent.",
                    "The trachea and main bronchi are of normal calibre and open."))
    if "aortic_calcification" in f:
        out.append(pick("Calcific atheroma plaques are observed in the aortic arch and descending aorta.",
                        "Atherosclerotic calcifications are present in the wall of the thoracic aorta."))
        imp.append(pick("Aortic atherosclerosis", "Atherosclerotic changes in the thoracic aorta"))
    else:
        out.append(pick("Mediastinal main vascular structures are of normal calibre.",
                        "Calibrations of the mediastinal major vessels are natural."))
    if "coronary_calcification" in f:
        out.append(pick("Calcified plaques are observed in the coronary arteries.",
                        "Coronary artery wall calcifications are seen."))
        imp.append("Coronary artery calcification")
    if "cardiomegaly" in f:
        ctr = f["cardiomegaly"]["ctr"]
        out.append(pick(f"The heart is enlarged, with a cardiothoracic ratio of about {ctr:.2f}; cardiomegaly is present.",
                        "Cardiomegaly is observed."))
        imp.append("Cardiomegaly")
    else:
        out.append(pick("Heart contour and size are normal.", "Heart size is within normal limits."))
    if "pericardial_effusion" in f:
        t = f["pericardial_effusion"]["thickness_mm"]
        out.append(pick(f"Pericardial effusion reaching {t:.0f} mm in thickness is observed.",
                        f"A pericardial effusion with a thickness of {t:.0f} mm is seen around the heart."))
        imp.append("Pericardial effusion")
    else:
        out.append(pick("Pericardial effusion-thickening was not observed.", "No pericardial effusion was detected."))
    if "lymphadenopathy" in f:
        nodes = f["lymphadenopathy"]["nodes"]
        where = _join([n["station"] for n in nodes])
        big = max(n["short_axis_mm"] for n in nodes)
        out.append(pick(
            f"Lymph nodes reaching {big:.0f} mm in short axis are observed in the {where} region, "
            "consistent with lymphadenopathy.",
            f"Enlarged lymph nodes, the largest {big:.0f} mm in short axis, are seen in the {where} region; "
            "lymphadenopathy.",
        ))
        imp.append("Mediastinal lymphadenopathy")
    else:
        out.append(pick("No mass or lymphadenopathy was detected in the mediastinum.",
                        "No lymph node in pathological size and configuration was detected in the mediastinum "
                        "and hilar regions."))
    if "hiatal_hernia" in f:
        out.append(pick("A hiatal hernia is observed at the level of the esophageal hiatus.",
                        "Part of the stomach herniates into the thorax through the esophageal hiatus; hiatal hernia."))
        imp.append("Hiatal hernia")
    else:
        out.append(pick("Thoracic esophagus calibration was normal and no significant wall thickening was detected.",
                        "The thoracic esophagus has a natural course and calibre."))
    if "medical_material" in f:
        if f["medical_material"]["device"] == "pacemaker":
            out.append(pick(
                "A cardiac pacemaker is observed in the left anterior chest wall, its lead extending into the heart.",
                "There is a pacemaker generator in the left pectoral region with a lead reaching the right heart.",
            ))
            imp.append("Cardiac pacemaker")
        else:
            out.append(pick("Sternotomy wires are observed in the sternum.",
                            "Findings of previous sternotomy with sternal wires."))
            imp.append("Post-sternotomy changes")

    out.append(pick("When examined in the lung parenchyma window;", "In the evaluation of the lung parenchyma;"))
    if "emphysema" in f:
        out.append(pick("Emphysematous changes are present in both lungs, more prominent in the upper lobes.",
                        "Centrilobular emphysema is observed in both lungs, predominantly in the upper lobes."))
        imp.append("Emphysema")
    if "mosaic" in f:
        out.append(pick("A mosaic attenuation pattern is observed in both lungs.",
                        "Areas of differing density giving a mosaic attenuation pattern are seen in both lungs."))
        imp.append("Mosaic attenuation pattern")
    for kind, fmt, short in (
        ("consolidation", ("An area of consolidation about {d} mm across, with air bronchograms, is observed in the {lobe}.",
                           "Consolidation is present in the {lobe}, measuring about {d} mm."), "Consolidation in the {lobe}"),
        ("opacity", ("A ground-glass opacity measuring {d} mm is observed in the {lobe}.",
                     "A ground glass density area of about {d} mm is seen in the {lobe}."), "Ground-glass opacity in the {lobe}"),
        ("fibrosis", ("Linear fibrotic sequelae changes are observed in the {lobe}.",
                      "Fibrotic bands consistent with sequelae are seen in the {lobe}."), "Fibrotic sequelae in the {lobe}"),
        ("atelectasis", ("Atelectatic changes are observed in the posterior part of the {lobe}.",
                         "Subsegmental atelectasis is seen in the dependent part of the {lobe}."),
         "Atelectasis in the {lobe}"),
    ):
        if kind in f:
            x = f[kind]
            d = 2 * x.get("radius_mm", 0.0)
            out.append(pick(*fmt).format(d=f"{d:.0f}", lobe=_LOBE_LONG[x["lobe"]]))
            imp.append(short.format(lobe=_LOBE_LONG[x["lobe"]]))
    for n in nodules:
        d, lobe = f"{n['diameter_mm']:.0f}", _LOBE_LONG[n["lobe"]]
        out.append(pick(f"A {d} mm solid nodule is observed in the {lobe}.",
                        f"There is a solid nodule measuring {d} mm in the {lobe}.",
                        f"A {d} mm diameter nodule is seen in the {lobe}."))
        imp.append(f"{_LOBE_SHORT[n['lobe']]} nodule")
    if not any(k in f for k in ("nodule", "consolidation", "opacity")):
        out.append(pick("No nodular or infiltrative lesion was detected in the lung parenchyma.",
                        "No pneumonic infiltration or mass lesion was detected in both lungs."))
    if "effusion" in f:
        th = f["effusion"]["thickness_mm"]
        if len(th) == 2:
            rt, lt = f"{th['right']:.0f}", f"{th['left']:.0f}"
            out.append(pick(
                f"Bilateral pleural effusion is observed, measuring {rt} mm on the right and {lt} mm on the left "
                "in its thickest part.",
                f"There is bilateral pleural effusion, {rt} mm thick on the right and {lt} mm on the left.",
            ))
            imp.append("Bilateral pleural effusion")
        else:
            side, t = next(iter(th.items()))
            out.append(pick(f"Pleural effusion was observed on the {side}, measuring {t:.0f} mm in its thickest part.",
                            f"There is a {side} pleural effusion with a maximum thickness of {t:.0f} mm."))
            imp.append(f"{side.capitalize()} pleural effusion")
    else:
        out.append(pick(*NO_PLEURAL_EFFUSION))
    out.append(pick("No significant pathology was detected in the upper abdominal organs included in the sections.",
                    "Upper abdominal organs within the sections are unremarkable."))
    out.append(pick("No lytic-destructive lesion was detected in the bone structures.",
                    "Bone structures within the study area are natural."))

    findings = " ".join(out)
    if imp:
        items = [i[0].upper() + i[1:] for i in imp]
        impression = pick(" ".join(f"{i}." for i in items), " ".join(f"• {i}" for i in items))
    else:
        impression = pick("No significant pathology was detected in the thorax CT examination.",
                          "Thorax CT findings are within normal limits.")
    if p.contrast:
        technique = pick("Thorax CT images were obtained after intravenous contrast material injection.",
                         f"Contrast-enhanced axial images of the chest were obtained with {slice_mm:g} mm slice thickness.")
    else:
        technique = pick("Non-contrast axial images of the chest were obtained.",
                         f"Axial sections of the thorax were obtained without contrast material, {slice_mm:g} mm thick.")
    k = int(rng.integers(0, 4))
    clinical = NOT_GIVEN if k == 0 else " ".join(rng.choice(_CLINICAL, size=min(k, 2), replace=False))
    return {"ClinicalInformation_EN": clinical, "Technique_EN": technique,
            "Findings_EN": findings, "Impressions_EN": impression}


class _Picker:
    """Picks one phrasing per call from the scan's generator (so reports are reproducible)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, *options: str) -> str:
        return options[int(self.rng.integers(0, len(options)))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
