"""What the parser knows: the 18 CT-RATE labels' phrasings, and the context trigger lists.

Finding phrases are lower-case regular expressions, matched on lower-cased text (``mentions.py``
refuses upper-case literals), rather than spaCy token patterns:
translated radiology prose needs morphology ("atelecta-sis/-tic/-ses"), hyphenated coordinations
("effusion-thickening") and word-internal exclusions ("fibroatelectasis" is not atelectasis), which
a blank pipeline without a lemmatizer cannot express as token attributes. Context triggers are
plain phrases and go through spaCy's ``PhraseMatcher`` (see ``context.py``).

Each ``Rule`` anchors a mention on ``pattern``; ``requires``/``excludes`` look at the mention's
sentence (or its ±``window`` characters) so that, e.g., a calcification counts as *coronary* only
next to "coronary", and a nodule counts as a *lung* nodule only outside the thyroid or liver. Exclusions that
describe the finding itself (a node's normal size, another hernia's type) read only the mention's own words
(``excludes_own``, ``excludes_part``): a sentence often names a true finding beside a normal or another one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ctprep.ctrate import LABELS


@dataclass(frozen=True)
class Rule:
    """One way to mention a label."""

    label: str  # one of ctrate.LABELS
    pattern: str  # anchor regex; the mention's span is its match
    requires: str | None = None  # regex that must occur in the context
    excludes: str | None = None  # regex that must not occur in the context
    window: int = 0  # context = ±window chars around the anchor inside its sentence; 0: whole sentence
    #: regex of phrases that make the anchor they overlap no mention ("aortic valve calcification"), leaving the
    #: other anchors of the context alone ("Mitral annular calcification and aortic atherosclerosis")
    excludes_own: str | None = None
    lung_only: bool = False  # drop the mention if its sentence names another organ and nothing of the lung
    #: regex that must not occur in the mention's own part of its clause (``mentions.py``: the words between the
    #: separators that part it from the rule's other anchors, with the clause's verb phrase where it has none of its
    #: own): "Mediastinal lymphadenopathy with normal-sized axillary lymph nodes" keeps the mediastinal one
    excludes_part: str | None = None
    #: places outside the label's region: the mention is dropped if its part names one and no place of ``inside``
    #: ("Enlarged lymph nodes in the mediastinum and celiac region" is a chest finding, "Paraaortic nodes" is not)
    outside: str | None = None
    inside: str | None = None
    #: regex of places that take the anchor from ``requires`` (``mentions.py``): where the anchor's clause names one,
    #: the place nearest the anchor (before it, or after it through a preposition: "plaques in the aortic arch") must
    #: be one of ``requires`` or be coordinated with one ("calcification of the aorta and coronary arteries"):
    #: "Calcified plaques in the aortic arch, without coronary artery calcification" is no coronary calcium
    rivals: str | None = None


# Words that put a sentence outside the lungs/chest (organ exclusions for lung labels).
NON_LUNG = (r"\b(liver|hepat\w*|kidneys?|renal|adrenal|spleen|splenic|pancrea\w*|bowel|colon\w*|intestin\w*|"
            r"marrow|vertebra\w*|plexus|muscles?|thyroid|breasts?|mammar\w*|subcutaneous|fat planes?|mesenter\w*|"
            r"periton\w*|psoas|bladder|uter\w*|ovar\w*|prostat\w*|gallbladder|stomach|abdom\w*|cecum|rectum|"
            r"bones?|rib|sternum|osseous|lytic|sclerotic|axilla\w*|gland|chest wall|adipose|pericolonic|pericardi\w*|lymph nodes?|soft tissue)\b")
LUNG = (r"\b(lungs?|pulmon\w*|lingul\w*|hemithora\w*|pleur\w*|lung parenchym\w*|fissure|apex|apices|apical|"
        r"subpleural|(upper|middle|lower) lobes?|rul|rml|rll|lul|lll|bronch\w*|perihilar|basal|bases|pneumoni\w*)\b")

_CALC = r"(calcif\w*|calcium|atherom\w*|atheroscleros\w*|atherosclerotic|plaques?)"
#: Vessels other than the coronary arteries, whose calcium is ``Coronary artery wall calcification`` alone: not
#: "coronary vessels"/"coronary vascular", nor a count of diseased vessels ("three-vessel coronary calcification").
_COUNT_VESSEL = "".join(rf"(?<!\b{n}[- ])" for n in ("one", "two", "three", "four", "single", "double", "triple", "multi"))
_VESSEL = (r"\b(?<!(?<![\w-])coronary )(aort(?!opulmonary)\w*\b(?! (valv|annul|leaflet|cusp)\w*)|(?<!descending )(?<!circumflex )"
           r"arter(y|ies|ial)|vascular|" + _COUNT_VESSEL + r"(?<!\d[- ])vessels?|carotid|subclavian|iliac|brachiocephalic|"
           r"truncus|innominate|femoral|celiac|mesenteric arter\w*|arch)\b")
#: Coronary arteries by name: "coronary", or a branch ("LAD", "circumflex", "left main").
_CORONARY = r"\bcoronar\w*|\b(lad|rca|lcx)\b|\bleft anterior descending|\bcircumflex|\bleft main\b"
#: Named places of calcium other than the coronary arteries (not the generic "vessels", "arterial", "vascular", which
#: name the coronary arteries too: "vascular calcifications including the coronary arteries").
_OTHER_CALCIUM_PLACES = (r"\b(aort\w*|arch|carotid\w*|subclavian|iliac|brachiocephalic|truncus|innominate|femoral|"
                         r"celiac|mesenteric|valv\w*|annul\w*|mitral)\b")
#: Up to three words between "enlarged" and a bare "node": side, station and size ("enlarged 15 mm subcarinal node"),
#: but no function word, which starts another phrase ("enlarged heart with a node").
_NODE_MODIFIERS = r"( (?!(with|and|or|of|in|on|the|a|an)\b)[\w.]+){0,3}"
#: Words after "node" that name a place, not a node: "mediastinal lymph node stations".
_NOT_A_NODE = r"(?! stations?| chains?| regions?| areas?| levels?)"
_NODE = r"(lymph ?nodes?|lymphatic nodes?|\bnodes\b)" + _NOT_A_NODE
#: Lymph node stations: "a right paratracheal node" is a lymph node ("sinus node", "Schmorl's node" name none).
_STATIONS = (r"(paratracheal|pretracheal|precarinal|subcarinal|carinal|hilar|prevascular|aortopulmonary|ap window|"
             r"paraesophageal|paraoesophageal|mediastinal|axillary|supraclavicular|internal mammary|tracheobronchial|"
             r"bronchopulmonary|interlobar|retrocrural|cardiophrenic|pericardial|prevertebral|subaortic|cervical)")
#: A bare "node" after a station word ("13 mm right paratracheal node") or a size ("a 12 mm node in the mediastinum");
#: not an intrapulmonary one ("4 mm subpleural node").
_BARE_NODE = (r"\b" + _STATIONS + r"( lymph)? node\b" + _NOT_A_NODE + r"|\b\d+(\.\d+)? ?(mm|cm)\b"
              r"( (?!(with|and|or|of|in|on|the|a|an|subpleural|perifissural|fissural|intrapulmonary|pulmonary)\b)[\w.]+){0,3}"
              r" node\b") + _NOT_A_NODE

RULES: tuple[Rule, ...] = (
    # --- Medical material: devices, lines, tubes, implants, surgical hardware ----------------------
    # (the label's own words, "medical material", are what structured prompts write: the parser must read them back;
    # a sternotomy is closed with wires, a gastric lap band is a device; a vein that "drains into" a vessel is no drain)
    Rule("Medical material", r"\bmedical (materials?|devices?)\b|"
         r"\bstent\w*|\bcatheter\w*|\bpace ?makers?|\bpacing (wires?|leads?)|\bdefibrillator|"
         r"\bprosthe\w*|\bvalve replacement|\b(mechanical|prosthetic|metallic) valves?|\bsternotom(y|ies)\b|"
         r"\b(sternal|surgical|metallic) (wires?|sutures?|clips?|materials?|staples?)|\bwires?\b|\bcerclage|"
         r"\bsurgical clips?|\bclips?\b|\bport catheter|\bchemo ?port|\bport\b|\bcannula\w*|\b(nasogastric|orogastric|"
         r"endotracheal|tracheostomy|thorax|chest|drainage|feeding|gastrostomy|thoracostomy|nephrostomy) tubes?|"
         r"\btracheostomy|\bintubat\w*|\bpeg\b|\belectrodes?|\bcoils?\b|\bembolization material|\bstaples?\b|"
         r"\bvena cava filter|\bscrews?\b|\bfixation material|\bimplants?\b(?!\s*\?)|\bdrains?\b(?! (into|to)\b)|"
         r"\bgrafts?\b|"
         r"\bmesh\b|\bicd\b|\bcabg\b|\bshunt catheter|\bsuture materials?|\bmetallic (density|artifact|foreign)\w*|"
         r"\bforeign bod\w*|\bstent material|\bendoprosthe\w*|\b(ivc|caval) filter|\bpicc\b|\bcentral (venous )?line|"
         r"\b(ng|og) tubes?|\b(t?evar|tavi|tavr)\b|\bannuloplasty|\bloop recorder|\b(endobronchial|zephyr) valves?|"
         r"\btissue expanders?|\b(implantable|implanted|cardiac) (electronic )?devices?|"
         # US abbreviations and brand names: "ETT", "AICD", "Mediport", "Dobhoff tube", "LVAD", "Watchman device"
         r"\b(et|enteric) tubes?|\bett\b|\baicd\b|\bpacer\b|\bdobhoff|"
         r"\b(medi|power) ?ports?\b|\bport-?a-?cath\w*|\bhardware\b|\barthroplast\w*|"
         r"\bventricular assist devices?|\b[lrb]?vads?\b|\bwatchman\b|\boccluder devices?|\bclosure devices?|"
         r"\b(lap[- ]?|gastric )bands?\b(?![- ]like)",
         excludes=r"\b(peritoneal|metasta\w*|tumou?r\w*) implants?|\bimplant\s*\?|\bbypass operation"),
    # --- vessels and heart ------------------------------------------------------------------------
    # the vessel must be named near the calcium (±100 chars), not anywhere in a long sentence
    # a valve's, a node's or an organ's calcium is no arterial wall's, but leaves the artery named beside it
    # ("Mitral annular calcification and mild aortic atherosclerosis", "... of the aortic valve and the aortic arch")
    Rule("Arterial wall calcification", _CALC, requires=_VESSEL, window=100,
         excludes_own=r"\b(pleural|valv\w*|annul\w*|lymph|renal|kidney|gall\w*|hepatic|liver|thyroid|pancrea\w*|pericardial) "
                      r"(calcif\w*|plaques?)|\bcalcifi\w* (lymph|nodes?\b|nodules?\b|granulom)|"
                      # a node's stations between: "Calcified mediastinal and hilar lymph nodes next to the aortic arch"
                      r"\bcalcifi(ed|c)(,? (?!(in|of|on|at|near|along|with|the|a|an|adjacent|to|within|from|plaques?|"
                      r"atherom\w*|atheroscl\w*|aort\w*|arter\w*|vessels?)\b)[\w-]+){1,4} "
                      r"(lymph|nodes?\b|nodules?\b|granulom)|"
                      r"\bcalcif\w* (of|in|on) the (aortic |mitral )?(valv|leaflet|annul)\w*\b"
                      r"(?!,? (and|or|as well as) (of )?(the )?(\w+ )?(aort|arch|arter|vessel|carotid))"),
    Rule("Coronary artery wall calcification", _CALC, requires=_CORONARY, rivals=_OTHER_CALCIUM_PLACES),
    Rule("Coronary artery wall calcification", r"\bcoronary (artery |arteries )?(wall )?(calcif\w*|atherom\w*|atheroscler\w*|plaques?)"),
    Rule("Cardiomegaly", r"\bcardiomegal\w*|\b(enlarged|large|increased) (heart|cardiac)( size| silhouette| dimensions?)?\b|"
         r"\bheart( contour)?( and)?,? (size|sizes|dimensions?|silhouette|volume)s?\b[^.;]{0,40}\b(increased|enlarged|large)\b|"
         r"\b(increase|enlargement) (in|of) (the )?(heart|cardiac)( size| dimensions?)?\b|"
         r"\b(increase|enlargement) (in|of) (the )?(size|dimensions?) of (the )?heart\b|"
         r"\b(ctr|cardio-?thoracic (ratio|index))\b[^.;]{0,30}\b(increased|enlarged|above|high)\b|"
         r"\b(increase|increased|enlargement) ((in|of) (the )?)?(ctr|cardio-?thoracic (ratio|index))|"
         r"\b(heart|cardiac (silhouette|contour|shadow|size))( size| dimensions?| contours?| silhouette)?"
         r"(:| is| was| appears?| seems?| looks?)?( not)?( mildly| slightly| moderately| markedly| significantly| minimally| severely)?"
         r" (enlarged|increased in size)\b|\b(cardiac|heart) enlargement|"
         # "large" only as a predicate: "The heart is large", not "heart and large vessels"
         r"\b(heart|cardiac (silhouette|contour|size))( size| silhouette)?(:| is| was| appears?| seems?| looks?)( not)?"
         r"( mildly| slightly| moderately| markedly| very)? large\b"),
    Rule("Pericardial effusion", r"\bha?emopericardium|\bpneumopericardium|\bpericardial (fluid|effusion|collection)"),
    # (effusions without "pleural"/"pericardial" next to them are assigned in mentions.py)
    # --- mediastinum ------------------------------------------------------------------------------
    # (a hiatus followed by "hernia" is that hernia's: "Umbilical hernia and hiatal hernia" keeps the second)
    Rule("Hiatal hernia", r"\bhiat(al|us) hernia\w*|\bhernia\w*[^.;]{0,60}\bhiat(us|al)\b(?! hernia)|"
         r"\bhiat(us|al)\b[^.;]{0,60}\bhernia\w*|\bsliding([- ]type)? hernia|\bpara-?o?esophageal hernia|\bintrathoracic stomach|"
         r"\bherniat\w*[^.;]{0,50}\b(stomach|gastric|fundus)\b|\b(stomach|gastric fundus|fundus)\b[^.;]{0,40}\bherniat\w*",
         # another hernia's type names the hernia it qualifies only, not the sentence's other words ("Small hiatal
         # hernia containing fat", "Hiatal hernia, atelectasis in the left lung lower lobe")
         excludes_own=r"\b(bochdalek|morgagni|inguinal|umbilical|incisional|ventral|abdominal wall|lung|pulmonary|fat|"
                      r"omental)([- ]type)?( fat)?([- ]containing)? hernia\w*|"
                      r"\bhernia\w* of (the )?(bochdalek|morgagni|lung|(\w+ )?fat)\b|\b(lung|fat) herniat\w*|"
                      r"\bherniat\w* of (the )?(lung|(\w+ )?fat)\b"),
    # ("LAP" abbreviates lymphadenopathy, not the gastric "lap band")
    Rule("Lymphadenopathy", r"\blymphadenopath\w*|\badenopath\w*|\b(lymph)?adenomegal\w*|\blaps?\b(?![- ]?bands?\b)|"
         r"\blymph ?node conglomerat\w*|"
         r"\b(enlarged|pathologic\w*|conglomerat\w*|necrotic)" + _NODE_MODIFIERS + r" node\b|" + _BARE_NODE + "|" + _NODE,
         # normal-sized nodes, and nodes outside the chest, in the nodes' own part of the sentence: "Mediastinal
         # lymphadenopathy with normal-sized axillary lymph nodes", "Enlarged right paratracheal lymph node of 15 mm,
         # other lymph nodes within normal limits"; a chest station beside an abdominal one keeps the finding
         excludes_part=r"\b(normal|natural|physiological|non-?pathological|insignificant)[- ](size|sized|dimension)\w*\b|"
                       r"\bwithin normal (size )?limits|\bnot (in )?(a )?patholog\w*|\bfatty hil\w*|\b(do|does|did) not reach|"
                       r"\bnot reaching|\b(below|under) (the )?patholog\w*|\bintra-?(parenchymal|pulmonary)|"
                       # a denied size: "non-enlarged", "not enlarged by CT size criteria", "do not meet size criteria"
                       # (not a denied growth: "not further enlarged", "not enlarged compared with the prior scan"; and
                       # not after a copula: "Lymph nodes are not enlarged" is a negated mention, said of the finding)
                       r"\bnon-?(enlarged|patholog\w*)\b|(?<!\bis )(?<!\bare )(?<!\bwas )(?<!\bwere )(?<!\bbe )"
                       r"\bnot (?!further\b)(\w+ )?enlarged\b(?!,? (compared|since|"
                       r"relative|than|from)\b)|\b(do|does|did) not meet\b|"
                       r"\bnot meeting\b|\bnone of (which|them|these) meets?\b",
         outside=r"\b(abdom\w*|intra-?abdominal|pelvi\w*|inguinal|iliac|mesenter\w*|meso|colon|perigastric|portal|"
                 r"retroperiton\w*|celiac|paraaortic|para-aortic|paracaval|interaortocaval|pericolonic|perirenal)\b",
         # ("thoracic"/"thorax" is no station: "the upper abdominal sections included in the thorax CT"; a hilum of the
         # liver, spleen or kidney is no lung hilum)
         inside=r"\b((?<!renal )" + _STATIONS + r"|mediastin\w*|(?<!portal )(?<!hepatic )(?<!renal )(?<!splenic )(?<!liver )"
                r"(?<!kidney )hil(a|um|us|i)(?! of the (liver|spleen|kidney))|axilla\w*|aortopulmonary window)\b"),
    # --- lung parenchyma --------------------------------------------------------------------------
    # (air in the soft tissues is no lung emphysema, and leaves the lung's emphysema named beside it alone)
    Rule("Emphysema", r"\bemphysem\w*|\bbullae?\b|\bbullous|\bblebs?\b|\bhyperaerat\w*|\bhyperinflat\w*",
         excludes_own=r"\b(subcutaneous|mediastinal|soft tissue|interstitial) emphysem\w*"),
    Rule("Atelectasis", r"(?<!fibro)(?<!fibro-)(?<!fibro )\batelecta\w*|\bdiscoid atelecta\w*|\bdystelecta\w*|"
         r"\b(lobar|segmental|lung|lobe) collapse\b|"
         r"\bcollaps(e|ed)\b(?= (of )?(the )?(right |left )?(upper |middle |lower )?(lobe|lung|lingula|segment)s?\b)|"
         r"\b(lobes?|lingula|segments?) (is|are|was|were|appears?)( (partially|partly|completely|totally|almost))? collapsed\b"),
    Rule("Lung nodule", r"\b(micro)?nodules?\b(?! formation)|\bnodular (lesion|opacit|formation|appearance)\w*|"
         r"\bmicronodul\w*|\bgranulomas?\b|(?<!pleural )\bnodularit(y|ies)\b|\bnodular\b(?=[ -](or|and)[ -]\w+ (lesion|opacit|densit)\w*)",
         excludes=r"\bnodular (contrast |peripheral )?enhancement", lung_only=True,
         # a node's description, not the other words of the sentence: "A 5 mm nodule in the right upper lobe and
         # axillary lymph nodes with fatty hila"
         excludes_own=r"\blymph ?nodes? with\b(?:(?!\b(and|or|as well as)\b)[^,;])*"),
    Rule("Lung opacity", r"\bground[- ]?glass\w*|\bfrosted[- ]glass|\bggos?\b", lung_only=True),
    Rule("Lung opacity", r"\bopacit(y|ies)\b|\bdensit(y|ies)( increase\w*| increased)|"
         r"\b(increase|increases) in (lung |parenchymal )?density|\bincreased (parenchymal |lung )?densit\w*|"
         r"\binfiltrat(ion|ions|e|es|ive)\b|\bhazy\b|\bpneumonic|\bopacificat\w*|"
         r"\b(patchy|alveolar|air-?space|reticular|focal|inflammatory) densit(y|ies)\b|"
         r"\bair[- ]?space (disease|process)\b|"
         r"\b(increased|increase in) (parenchymal |lung )?attenuation\b",
         lung_only=True, window=50, excludes=r"\bsequel\w*|\bfibro\w*|\b(micro)?nodular opacit\w*|\bmalignant infiltrat\w*|"
                  r"\b(tumou?r|metasta)\w* infiltrat\w*"),
    # "fibrosis" alone (interstitial lung disease) is not a sequela in CT-RATE's labelling; fibrotic/sequelae changes are.
    # a granulomatous disease's sequela is its calcified granulomas and nodes, not fibrosis
    Rule("Pulmonary fibrotic sequela", r"\bfibro(tic|atelecta\w*|us)\b|\bfibroatelecta\w*|"
         r"\bsequel(a|ae|e|ea)\b(?! (of|from|to) ((a|an|the) )?((old|prior|previous|remote|past|healed) )?granulomat\w*)|"
         r"\bscar(ring|s)?\b|\b(linear|fibrotic|parenchymal|subpleural|fibrous) bands?\b|"
         r"\bband([- ]like)? (appearance|opacit|densit)\w*|"
         r"\bhoneycomb\w*|\bcicatri\w*|\bpost-?(inflammatory|infectious|tuberculous) (changes|sequel\w*)",
         excludes=r"\b(rib|fracture|bone|vertebra\w*|liver|kidney|renal|breast|uter\w*)\b"),
    Rule("Pleural effusion", r"\bpleural (fluid|effusion\w*|collection\w*)|\bhydrothora\w*|\bha?emothora\w*|"
         r"\b(hydro|ha?emo|pyo)-?pneumothora\w*|"
         r"\bfluid in the pleural|(?<!gallbladder )(?<!gall bladder )\bempyema\w*"),
    Rule("Mosaic attenuation pattern", r"\bmosaic\w*"),
    # CT-RATE's radiologists label the "peribronchial" wording; plain "bronchial wall thickening" is left out.
    Rule("Peribronchial thickening", r"\bperibronch\w*[^.;]{0,30}\bthick\w*|\bperibronch\w* cuff\w*|"
         r"\bthick\w* (of |in )?(the )?peribronch\w*"),
    Rule("Consolidation", r"\bconsolidat\w*|\bair bronchogram\w*"),
    Rule("Bronchiectasis", r"\bbronchiecta\w*|\bbronchiolecta\w*|\b(dilated|dilatation of the) bronch\w*|"
         r"\bbronch\w* (dilat\w*|ectasi\w*)|\bectasi\w*[^.;]{0,30}\bbronch\w*|\bectatic bronch\w*"),
    # not the heart's septum: "asymmetric septal thickening of the left ventricle"
    Rule("Interlobular septal thickening", r"\b(interlobular|intralobular|interseptal|septal)\b[^.;]{0,40}\b(thick\w*|prominen\w*)\b"
         r"(?! (of|in) the (\w+ )?(ventric\w*|myocard\w*|heart|atri\w*)\b)|"
         r"\b(thick\w*|prominen\w*)\b[^.;]{0,40}\b(interlobular|intralobular|interseptal)\b|\bcrazy[- ]paving|"
         r"\bthick\w* (of the )?septa\b|\bsepta\b[^.;]{0,25}\bthick\w*|\bkerley\b|\bseptal lines\b",
         excludes=r"\binter(ventricular|atrial)\b|\b(ventricular|myocardial|asymmetric) septal"),
)

#: Effusion words that need a place to become pleural or pericardial (``mentions.py``).
EFFUSION = re.compile(r"\beffusions?\b|\bfluid\b", re.IGNORECASE)
#: Where a chest CT's "effusion" lies when its own words name no place ("The effusion has resolved", "bilateral
#: effusions"): the pleura, the commonest by far. Not bare "fluid" (fluid-filled bowel, fluid density, free fluid).
BARE_EFFUSION_LABEL = "Pleural effusion"
#: Words that start a place phrase. A place phrase set off by a comma still places the finding next to it ("In the
#: right pleural space, an effusion ..."); another list item does not ("Effusion on the right, pericardial thickening").
PLACE_PREPOSITIONS = ("in", "on", "at", "within", "inside", "along", "into")
#: Nouns a place adjective names a space with, not another finding: "Effusion in the pleural and pericardial spaces"
#: places the effusion in both, "Effusion on the right and pericardial thickening" does not (``mentions.py``).
PLACE_NOUNS = ("space", "spaces", "cavity", "cavities", "sac", "recess", "recesses", "sinus", "sinuses", "region",
               "regions", "surface", "surfaces", "layer", "layers", "leaf", "leaves", "side", "sides")
#: Auxiliaries: a clause holding one is prose ("Lymph nodes are observed in the right paratracheal, subcarinal and
#: left hilar regions"), whose commas set off phrases of one statement; a clause without is a telegraphic list, whose
#: commas separate its items ("Nodule in the right upper lobe, pleural thickening on the left") (``attributes.py``).
AUXILIARIES = ("is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "can", "could", "may", "might",
               "will", "would", "should")
#: Words that start a comma-set phrase which goes on the item before it rather than starting a new one: a
#: description of the finding ("A nodule, measuring 5 mm, in the right upper lobe", "Consolidation, with air
#: bronchograms, is observed in the lower lobe", "Lymph nodes in the left hilum, consistent with lymphadenopathy")
#: or the clause's verb after such a phrase. Place phrases and sizes go on it as well (``attributes.py``).
CONTINUATION_STARTS = ("with", "without", "measuring", "measured", "sized", "up to", "approximately", "about",
                       "the largest", "largest", "located", "localized", "localised", "extending", "reaching", "seen",
                       "observed", "noted", "detected", "described", "which", "that", "where", "whose",
                       "predominantly", "mainly", "mostly", "more", "most", "especially", "particularly",
                       "consistent", "compatible", "suggestive", "likely", "probably", "possibly",
                       "is", "are", "was", "were", "has", "have", "had", "be", "been", "can", "could", "may", "might",
                       "will", "would", "should", "appears", "appear", "measures", "measure", "extends", "extend")

assert {r.label for r in RULES} == set(LABELS), "every label needs at least one rule"

# ---- context triggers (spaCy Matcher, token-level, lower case) ---------------------------------
_AUX = ["is", "are", "was", "were", "has", "have", "had", "be", "been", "could", "can", "cannot", "did", "does", "do",
        "may", "will", "would", "should"]
#: Participles of seeing/finding, which a negated auxiliary turns into a negation ("was not seen").
SEEN_VERBS = ["detected", "observed", "seen", "noted", "present", "identified", "found", "visualized", "visualised",
              "monitored", "evident", "determined", "encountered", "followed", "demonstrated", "shown", "appreciated",
              "obvious", "apparent", "visible", "distinguished", "recognized", "considered", "revealed", "described",
              "increased", "enlarged", "thickened", "developed", "documented", "defined"]
#: Verbs whose passive ends a pre-negation's scope ("No X was detected, Y is seen").
ASSERT_VERBS = frozenset(SEEN_VERBS) - {"increased", "enlarged", "thickened", "considered", "described"}

PRE_NEGATION = ["previously observed as", "previously seen as", "previously described as", "no", "not", "without", "absence of", "absent", "free of", "negative for", "neither", "nor",
                "rather than", "instead of", "ruled out", "clear of", "devoid of", "excluded", "no evidence of", "no sign of", "no signs of",
                "no finding of", "no findings of", "resolution of", "disappearance of", "complete regression of",
                "interval clearing of", "clearing of", "clearance of", "interval clearance of", "lack of", "there is no",
                # a device taken out is not in this scan: "Interval removal of the chest tube"
                "removal of", "interval removal of",
                "there are no", "there was no", "there were no", "none",
                # abbreviated notes: "Cardiomegaly w/o pericardial effusion", "Neg for pleural effusion"
                "w/o", "neg for",
                # NegEx's probable negation before its finding ("Unlikely to represent consolidation", "Nothing to
                # suggest an effusion"); "unlikely", "less likely" and "improbable" are post-triggers too, read by what
                # follows them ("Consolidation is less likely."; "atelectasis, less likely consolidation")
                "unlikely", "unlikely to represent", "unlikely to be", "less likely", "improbable",
                "nothing to suggest", "nothing to indicate", "nothing to suggest the presence of"]
POST_NEGATION = ["absent", "excluded", "do not reach", "does not reach", "did not reach", "not reaching",
                 "ruled out", "not present", "is normal", "are normal", "was normal", "were normal",
                 "within normal limits", "no longer", "negative", "is not", "are not", "were not", "was not",
                 # NegEx's probable negation: "Pneumonia unlikely", "effusion is considered unlikely"
                 "unlikely", "not likely", "less likely", "improbable",
                 # templated reports ("Pleural effusion: none."): the ":" would end the scope, so the pair is one
                 # trigger (the longest match wins over the ":" terminator); other values (": no", ": normal", but not
                 # ": no change") are read by ``context._template_value``
                 ": none", ": absent", ": negative", ": nil", "- none", "- absent", "- negative", "- nil",
                 "is unremarkable", "are unremarkable", "was unremarkable", "were unremarkable", "appear normal",
                 "appears normal", "appear unremarkable", "appears unremarkable",
                 # a checklist's minus sign: "Pleural effusion (-)" (the whole phrase outranks its "(" terminator)
                 "(-)"]
#: A device taken out is not in this scan: "The endotracheal tube has been removed", "Right chest tube removed". Not
#: over "after" ("Surgical clips after the gallbladder was removed": the clips are there; ``context.py``).
REMOVED = ["removed", "has been removed", "have been removed", "was removed", "were removed"]
POST_NEGATION += REMOVED
# plus the Matcher pattern "(aux) not (been) <seen-verb>" and "<aux>n't" forms built in context.py
PSEUDO_NEGATION = ["no change", "no significant change", "no difference", "no significant difference",
                   "no increase", "no significant increase", "no progression", "not only", "is not only", "are not only",
                   "was not only", "were not only", "no interval change",
                   "not typical", "not change", "no changes", "without change", "without any change",
                   "not significantly changed", "no marked change", "no obvious change", "no numerical",
                   "no prominent change", "no new pathology other than",
                   # the finding persists: "without significant change", "no regression", "regressed in size"
                   "without significant change", "without a significant change", "without any significant change",
                   "no significant interval change", "no regression", "no significant regression", "without regression",
                   "regressed in size", "has regressed in size", "have regressed in size", "has partially regressed",
                   "have partially regressed", "partially regressed",
                   # a finding that is resolving, not resolved, is still there: these hold the "resolved"/"resolution"
                   # a longer match takes from the sentence-wide negation ("partially resolved effusion")
                   "partially resolved", "partly resolved", "incompletely resolved", "largely resolved", "mostly resolved",
                   "nearly resolved", "almost resolved", "not completely resolved", "not fully resolved",
                   "not entirely resolved", "not resolved", "not yet resolved", "is not resolved", "are not resolved",
                   "was not resolved", "were not resolved", "has not resolved", "have not resolved", "has not yet resolved",
                   "has not been resolved", "have not been resolved", "partial resolution", "incomplete resolution",
                   "near complete resolution", "near-complete resolution", "nearly complete resolution",
                   "almost complete resolution", "partial regression", "incomplete regression", "not completely regressed",
                   "has not disappeared", "have not disappeared", "not completely disappeared", "partially cleared",
                   "partial clearing of", "partial clearance of", "not removed", "not been removed", "not yet removed",
                   "not yet been removed",
                   # a technique, no negation of what the scan shows: "CT chest w/o contrast shows a small effusion"
                   "w/o contrast", "w/o iv contrast", "w/o intravenous contrast", "without contrast",
                   "without iv contrast", "without intravenous contrast", "with and without contrast",
                   "with and without iv contrast", "with and without intravenous contrast",
                   # double negation, the finding is there: "Pleural effusion is not absent", "not without a small effusion"
                   "not absent", "is not absent", "are not absent", "was not absent", "were not absent",
                   "not completely absent", "not entirely absent", "not without", "is not without", "are not without",
                   "was not without", "were not without"]
#: "No appreciable interval change in the nodule": the finding is there, only its change is denied. Growth words
#: that are a finding themselves ("no enlargement of the lymph nodes") count only with "interval".
_CHANGES = ["change", "changes", "growth", "worsening", "progression", "difference", "regression"]
_INTERVAL_CHANGES = ["enlargement", "increase"]
_CHANGE_DEGREES = ["", "appreciable", "substantial", "measurable", "definite", "significant", "obvious", "marked",
                   "notable", "major", "apparent", "discernible", "considerable", "perceptible", "relevant", "visible"]
PSEUDO_NEGATION += [" ".join(filter(None, (neg, degree, interval, word)))
                    for neg in ("no", "without", "without any") for degree in _CHANGE_DEGREES
                    for interval, words in (("", _CHANGES), ("interval", _CHANGES + _INTERVAL_CHANGES)) for word in words]
#: Size and number comparatives read like a negation but state a measure of a present finding: "a nodule no longer
#: than 5 mm", "no more than 3 nodules", "not larger than before" ("no longer than" also outranks "no longer").
COMPARATIVES = ["longer", "larger", "bigger", "greater", "more", "wider", "thicker", "higher", "less", "smaller",
                "shorter", "fewer"]
PSEUDO_NEGATION += [f"{neg} {word} than" for neg in ("no", "not") for word in COMPARATIVES]
PRE_UNCERTAIN = ["possible", "possibly", "probable", "probably", "suspicious", "suspicious for", "suspected",
                 "suspicion of", "suspicion", "questionable", "likely", "may be", "might be", "could be", "may represent",
                 "differential diagnosis", "cannot exclude", "can not exclude", "rule out", "to rule out", "r/o",
                 "doubtful", "equivocal", "presumed", "presumably", "consider", "vs", "versus", "suggestive of",
                 "suggesting", "favoring", "favouring", "evaluated in favor of", "evaluated primarily in favor of", "concerning for",
                 "worrisome for", "could represent", "might represent", "possibility of",
                 "considered in favor of", "primarily in favor of", "mostly in favor of"]
# "Cannot rule out a small effusion": spaCy reads "cannot" as "can not", whose "not" must not win
PRE_UNCERTAIN += [f"{aux} {verb}" for aux in ("cannot", "could not", "can't", "couldn't") for verb in ("rule out", "exclude")]
# (bare "in favor of" is no hedge in translated prose: "cardiothoracic ratio increased in favor of the heart")
POST_UNCERTAIN = ["?", "cannot be excluded", "can not be excluded", "could not be excluded", "cannot be ruled out",
                  "can not be ruled out", "could not be ruled out", "not ruled out", "not excluded",
                  # "Cardiomegaly is not excluded": longer than the "is not" it holds, which negates
                  "is not excluded", "are not excluded", "was not excluded", "were not excluded", "not been excluded",
                  "is not ruled out", "are not ruled out", "was not ruled out", "were not ruled out", "not been ruled out",
                  "is suspected", "was suspected", "are suspected", "were suspected", "is possible", "is questionable",
                  "cannot be distinguished", "could not be distinguished", "cannot be differentiated",
                  "could not be differentiated", "may be", "is likely", "is probable"]
# "cannot be entirely excluded": the adverb must not leave "excluded" to negate on its own
POST_UNCERTAIN += [f"{aux} be {adverb} {verb}" for aux in ("cannot", "could not", "can't", "couldn't", "may not")
                   for adverb in ("entirely", "completely", "definitively", "definitely", "fully", "totally", "absolutely",
                                  "confidently", "reliably", "certainly", "safely")
                   for verb in ("excluded", "ruled out")]
#: A finding the exam was to look for, or could not be judged on: neither seen nor excluded ("Assessment for
#: lymphadenopathy is limited without contrast", "Consolidation limits evaluation for an underlying nodule").
#: Not "evaluation of", which opens a statement ("In the evaluation of the lungs, a nodule ..."), nor "is limited"
#: ("effusion limited to the right base"). ``context.py`` gives such a mention the status ``hypothetical``.
PRE_HYPOTHETICAL = ["evaluation for", "assessment for", "evaluate for", "assess for", "evaluating for", "assessing for"]
PRE_HYPOTHETICAL += [f"{verb} {noun} {prep}" for verb in ("limits", "limit", "limiting", "limited", "limited the",
                                                         "precludes", "preclude", "precluding", "hinders", "hampers",
                                                         "degrades", "reduces")
                     for noun in ("evaluation", "assessment", "detection", "the evaluation", "the assessment",
                                  "the detection")
                     for prep in ("of", "for")
                     if not (verb == "limited" and prep == "of")]  # "limited evaluation of the bases shows ..."
POST_HYPOTHETICAL = [f"{aux} be {verb}" for aux in ("cannot", "can not", "could not", "can't", "couldn't")
                     for verb in ("assessed", "evaluated", "reliably assessed", "reliably evaluated")]
POST_HYPOTHETICAL += ["not assessable", "not evaluable", "is not assessable", "is not evaluable"]
#: Post-negations that reach back to the sentence start ("X, which was seen before, has disappeared").
SENTENCE_NEGATION = ["resolved", "disappeared", "regressed completely", "completely regressed", "have regressed",
                     "has regressed", "no longer", "has cleared", "have cleared", "has vanished", "have vanished"]
#: Sentence-wide negations that also negate the finding they modify: "resolved pleural effusion". Only the
#: words right after them (``context.PREMODIFIER_SCOPE``, no comma): "Atelectasis resolved, consolidation in
#: the left lower lobe" keeps the consolidation.
PREMODIFIER_NEGATION = ["resolved"]
#: After a post-negation these make it sentence-wide ("X, seen before, was not detected in the current examination").
CURRENT_EXAM = ["in the current examination", "in the current study", "in this examination", "in the present examination",
                "on the current examination", "in the current scan", "in the control examination"]
#: A relative clause about an earlier study: what it "showed" is that study's finding ("Compared with the prior
#: study, which showed a right effusion, there is no effusion now"); ``context.py`` lets the sentence's own
#: mention of the same finding speak for this exam. Words, joined by spaces, matched on lower-cased text.
PRIOR_STUDIES = ["prior", "previous", "earlier", "preceding", "former", "last", "old", "outside", "baseline"]
STUDY_NOUNS = ["study", "studies", "examination", "examinations", "exam", "exams", "ct", "cts", "scan", "scans",
               "imaging", "images", "ct scan", "ct examination", "ct study", "tomography", "report"]
SHOWED = ["showed", "shown", "demonstrated", "revealed", "depicted", "documented", "described", "reported",
          "noted", "had shown", "had demonstrated", "had revealed"]
#: Exception words: what follows them, up to the comma that closes the exception ("Apart from the nodule, ..."),
#: is set apart from the rest of the sentence, so a negation there does not reach it (``context.py``).
EXCEPTIONS = ["except", "except for", "apart from", "aside from", "other than", "besides", "with the exception of",
              "excepting"]
#: Relative pronouns: a relative clause after an excepted finding belongs to the exception's object ("Apart from the
#: nodule, which was described before, the consolidation has resolved": the exception closes at the second comma).
RELATIVE_PRONOUNS = ["which", "that", "who", "whose", "where"]
#: Head nouns that repeat the finding an exception is taken from ("No pleural effusion except for a small one on the
#: left", "No consolidation other than a small focus in the right lower lobe"); not when "of" names another
#: substance ("except for a small area of atelectasis": that finding is matched on its own).
ELLIPTIC_HEADS = ["one", "ones", "area", "areas", "focus", "foci", "amount", "portion", "part"]
#: Contrast words whose clause may repeat the finding before them unnamed, on another side or place: "No pleural
#: effusion on the right, but a small one on the left" (an elliptic head and a side or place are both needed there:
#: "but one should note ..." repeats nothing).
CONTRASTS = ["but", "whereas", "while"]
#: Ends a trigger's scope: contrast and exception words, and clause punctuation (also ``;`` and ``:`` tokens).
TERMINATORS = ["but", "however", "although", "though", *EXCEPTIONS, "apart from this", "whereas", "while", "yet",
               "nevertheless", "on the other hand",
               "in addition", "additionally", "also", "which", "where", "whose", "accompanied by",
               "secondary to", "due to", "because", "as well as", ";", ":", "(", ")", "•", '"',
               # the rest of a resolved finding is a new item: "Resolution of atelectasis with residual consolidation"
               "with residual", "with persistent", "with persisting", "with remaining", "with new"]
# A comma followed by a quantity or degree word starts a new, asserted item: "No effusion, mild atelectasis".
TERMINATORS += [f", {w}" for w in ("a", "an", "mild", "minimal", "minimally", "moderate", "severe", "marked", "slight",
                                    "small", "several", "multiple", "a few", "there is", "there are",
                                    "residual", "persistent", "persisting", "remaining", "new")]
#: End a pre-trigger's scope only: "and" before a new assertion ("There is no effusion, and there is mild cardiomegaly",
#: "No pneumothorax and small bilateral effusions"). A post-trigger still covers such a coordination ("Pleural effusion
#: and mild atelectasis were not seen" is odd, but "no A and B" stays one negation either way).
PRE_SCOPE_ENDS = [f"{conj} {w}" for conj in ("and", "&")  # "&": "No pleural effusion & mild cardiomegaly"
                  for w in ("there is", "there are", "there was", "there were", "mild", "mildly", "minimal",
                            "minimally", "small", "moderate", "moderately", "large", "trace", "severe",
                            "marked", "slight", "extensive")]
# After a comma, amount and extent words start an asserted item only after a pre-negation ("No pulmonary embolism,
# trace bilateral pleural effusions"): a list a post-negation closes holds them as often ("Consolidation, dense
# opacity or nodule was not observed"). Not "large" ("No focal consolidation, large pleural effusion or pneumothorax":
# a large one is what reports deny), nor sides ("No consolidation, right pleural effusion or pneumothorax").
PRE_SCOPE_ENDS += [f", {w}" for w in ("trace", "extensive", "scattered", "patchy", "dense")]
#: What stops a sentence-wide negation reaching back to the sentence start (``SENTENCE_NEGATION``): contrast and
#: exception terminators, ";" and persistence ("Consolidation persists and the effusion has resolved"). "persists"
#: and "remains" end only that reach, not other scopes: "Pleural effusion remains absent" is negated.
#: Not the relative "which" ("X, which was seen before, has resolved") nor ":" ("Pleural effusion: resolved").
CLAUSE_BREAKS = ["but", "however", "although", "though", "whereas", "while", "yet", "nevertheless", "on the other hand",
                 *EXCEPTIONS, "apart from this", ";",
                 "persists", "persist", "remains", "remain", "with residual", "with persistent", "with persisting",
                 "with remaining", "with new"]

# ---- misspelling tolerance (``spelling.py``) ----------------------------------------------------
#: Single-word finding terms read through one typing error ("cardiomegally", "atelectesis"). Only long
#: jargon words: generic ones ("thickening", "pacemaker" -> "peacemaker") and those with a real-word or
#: other-finding neighbour ("pneumonic" -> "pneumonia", "nodularity" -> "modularity") stay out.
SPELLING_TERMS = (
    "cardiomegaly", "effusion", "emphysema", "emphysematous", "atelectasis", "atelectatic", "consolidation",
    "bronchiectasis", "bronchiectatic", "bronchiolectasis", "lymphadenopathy", "adenopathy", "lymphadenomegaly",
    "calcification", "calcified", "atherosclerotic", "atherosclerosis", "atheromatous", "atheroma", "pericardial",
    "hydrothorax", "hemothorax", "haemothorax", "infiltration", "opacities", "sequelae", "honeycombing",
    "interlobular", "peribronchial", "micronodules", "granuloma", "hyperinflation", "hyperaeration",
)
#: Real words one edit from a term, never "corrected" (English and medical; found by checking every
#: variant against an English vocabulary and by hand). Words the finding rules read are excluded anyway.
#: "opacifies" ("Contrast opacifies the pulmonary arteries", CT angiography) is the verb, no misspelt "opacities"
#: (its other forms, "opacified", "opacifying", are more than one edit away and need no entry).
SPELLING_REAL_WORDS = ("affusion", "granulosa", "hemithorax", "opacifies")
