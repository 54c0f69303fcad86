"""Per-volume prompts from templates in config.

The default template is GenerateCT's ``"{age} years old {sex}: {impression}"``; templates may use
``{age}``, ``{sex}``, ``{impression}``, ``{findings}``, ``{clinical_information}`` and
``{technique}``. Structured, negation-aware prompts come from the report parser.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Callable, Iterable

import pandas as pd

from ctprep import rejects

logger = logging.getLogger(__name__)

FIELDS = ("age", "sex", "impression", "findings", "clinical_information", "technique")

# A sentence ends at . ! ? or the bullet CT-RATE uses between impression items, followed by space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*•\s*")


def clean(text: str) -> str:
    """Unicode-normalised text on one line (reports come with stray whitespace and newlines)."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).split())


def truncate(text: str, max_chars: int, measure: Callable[[str], int] = len) -> str:
    """The whole sentences of ``text`` that fit in ``max_chars``; at least the first, whole, even when it is longer.
    ``measure``: how a text's length is counted (characters; a text encoder's token count, which cuts its inputs
    to the sentences that fit its ``max_length``: ``ctgen.models.text_encoders.fit_sentences``).

    Never a cut inside a sentence: CT-RATE states absent findings with a trailing negation ("Pleural effusion and
    pericardial effusion ... were not observed."), and a cut before it turns them into present findings. A first
    sentence over the budget is kept whole, as ``structured_prompt`` keeps its first item (``build_prompts`` counts
    such prompts); the budget is a length preference, a prompt that says the opposite of its report is wrong.
    """
    if max_chars <= 0 or measure(text) <= max_chars:
        return text
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    out = sentences[0] if sentences else text
    for sentence in sentences[1:]:
        candidate = f"{out} {sentence}"
        if measure(candidate) > max_chars:
            break
        out = candidate
    return out


def template_fields(template: str) -> set[str]:
    """Names a template refers to; unknown names, positional fields, conversions and format specs are a config error.

    Checked before any job (``check_prompts``): a ``{}`` or ``{impression!x}`` passed the names check and failed
    every row of the prompts job (IndexError, ValueError). The values are cleaned text, so a conversion or a
    format spec ("{age:d}", "{impression!r}") has nothing to do: the template names fields and nothing more.
    """
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):  # ValueError on unbalanced braces
        if name is None:
            continue
        if not name or name.isdigit():
            raise ValueError(f"prompt template {template!r} has a positional field {{{name}}}; name one of {FIELDS}")
        if conversion is not None or spec:
            field = "{" + name + (f"!{conversion}" if conversion is not None else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"prompt template {template!r}: {field} takes no conversion or format spec; write {{{name}}}")
        names.add(name)
    unknown = names - set(FIELDS)
    if unknown:
        raise ValueError(f"prompt template {template!r} uses unknown fields {sorted(unknown)}; known: {FIELDS}")
    return names


def render(template: str, row: dict, max_chars: int = 0) -> str:
    """One prompt; raises ``KeyError`` naming a field the row lacks."""
    values = {}
    for name in template_fields(template):
        value = row.get(name)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            raise KeyError(name)
        values[name] = clean(str(value))
    return truncate(clean(template.format(**values)), max_chars)


STRUCTURED = "structured"


def structured_prompts(mentions: pd.DataFrame, negated: str = "omit", max_chars: int = 0) -> dict[str, str]:
    """{VolumeName: the parser's canonical findings sentence} from the mentions table."""
    from dataclasses import fields

    from ctprep.reports import Mention, structured_prompt

    names = [f.name for f in fields(Mention)]
    by_volume: dict[str, list] = {}
    for rec in mentions.to_dict("records") if len(mentions) else []:
        by_volume.setdefault(rec["VolumeName"], []).append(
            Mention(**{k: (None if isinstance(rec[k], float) and rec[k] != rec[k] else rec[k]) for k in names}))
    return {name: structured_prompt(ms, negated=negated, max_chars=max_chars) for name, ms in by_volume.items()}


def report_prompt(report: str | dict, template: str, max_chars: int = 0, negated: str = "omit") -> str:
    """One report's prompt, rendered as the ``prompts`` rule renders the training prompts.

    ``template`` ``"structured"``: the report (a dict with ``findings``/``impression``, or one free
    text) is parsed and rendered as the parser's sentence (``negated``, ``max_chars`` as in
    :func:`structured_prompts`); any other template text is filled from the report's fields
    (raises ``KeyError`` naming a field the report lacks). Sampling from new reports goes through
    here, so a generator sees its prompts in the form it was trained on.
    """
    if template == STRUCTURED:
        from ctprep.reports import parse_report, structured_prompt

        return structured_prompt(parse_report(report).mentions, negated=negated, max_chars=max_chars)
    return render(template, report if isinstance(report, dict) else {"findings": report}, max_chars)


def rendering(prompts_cfg: dict) -> dict:
    """:func:`report_prompt`'s settings from the config's ``prompts`` section (recorded in each model spec)."""
    return {"max_chars": int(prompts_cfg.get("max_chars") or 0),
            "negated": (prompts_cfg.get("structured") or {}).get("negated", "omit")}


def build_prompts(cohort: pd.DataFrame, templates: dict[str, str], max_chars: int = 0,
                  structured: dict[str, str] | None = None,
                  required: Iterable[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prompts table with one column per template, rejects) for every cohort row.

    ``structured``: {VolumeName: structured prompt}; when given, a ``structured`` column is added
    (a volume without mentions gets the parser's "no findings" sentence).

    A template whose field a row lacks ("{sex}" without PatientSex) leaves that row's cell empty (null), counted in a
    warning; the row keeps its other prompts (the structured prompt needs no metadata). Only where the template is
    one of ``required`` (the prompts the models are trained on: ``models.prompt``) is the row rejected instead.
    """
    from ctprep.reports import NO_FINDINGS

    for tpl in templates.values():
        template_fields(tpl)
    if structured is not None and STRUCTURED in templates:
        raise ValueError(f"template name {STRUCTURED!r} is reserved for the parser's structured prompt")
    required = set(required)
    unknown = required - set(templates) - ({STRUCTURED} if structured is not None else set())
    if unknown:
        raise ValueError(f"required prompts {sorted(unknown)} are not among the prompts written: "
                         f"{[*templates, *([STRUCTURED] if structured is not None else [])]}")
    rows, bad, over = [], [], 0
    empty: dict[str, list] = {}  # template -> [cells left empty, first (VolumeName, field)]
    for rec in cohort.to_dict("records"):
        rec["age"] = None if pd.isna(rec.get("age")) else int(rec["age"])
        out = {"VolumeName": rec["VolumeName"], "split": rec["split"]}
        missing: dict[str, str] = {}  # template -> the field the row lacks
        for name, tpl in templates.items():
            try:
                out[name] = render(tpl, rec, max_chars)
            except KeyError as err:
                out[name], missing[name] = None, err.args[0]
            else:
                over += 0 < max_chars < len(out[name])
        needed = [name for name in templates if name in missing and name in required]
        if needed:
            bad.append({"VolumeName": rec["VolumeName"], "split": rec["split"], "stage": "prompts",
                        "reason": f"prompt template {needed[0]!r} needs {missing[needed[0]]}, which the "
                                  f"report/metadata lacks (the models are trained on this prompt)"})
            continue
        if structured is not None:
            out[STRUCTURED] = structured.get(rec["VolumeName"], NO_FINDINGS)
            over += 0 < max_chars < len(out[STRUCTURED])
        for name, field in missing.items():
            empty.setdefault(name, [0, (rec["VolumeName"], field)])[0] += 1
        rows.append(out)
    for name, (n, (volume, field)) in empty.items():
        logger.warning("prompts: template %r left empty for %d volume(s) whose report/metadata lacks a field it needs "
                       "(first: %s lacks %s); their other prompts are kept", name, n, volume, field)
    if over:
        logger.warning("prompts: %d prompts keep a first sentence longer than prompts.max_chars (%d), or a structured "
                       "prompt its first item: neither is cut, a negation may come at its end", over, max_chars)
    columns = ["VolumeName", "split", *templates, *([STRUCTURED] if structured is not None else [])]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({c: "object" for c in columns[2:]}), rejects.frame(bad)


def write_prompts(cohort_path, out_table, out_rejects, templates: dict[str, str], max_chars: int = 0,
                  strict: bool = False, structured: dict | None = None, mentions_path=None,
                  required: Iterable[str] = ()) -> pd.DataFrame:
    """Build prompts for the cohort table and write them with their rejects (Parquet).

    ``structured`` is the config's ``{enabled, negated}``; when enabled, ``mentions_path`` (the
    parse_reports mentions table) gives the structured prompt column. ``required``: the prompts a row must have
    (``build_prompts``); any other one it cannot fill is an empty cell.
    """
    cohort = pd.read_parquet(cohort_path)
    sentences = None
    if structured and structured.get("enabled"):
        if not mentions_path:
            raise ValueError("the structured prompt needs the mentions table of parse_reports")
        sentences = structured_prompts(pd.read_parquet(mentions_path), structured.get("negated", "omit"), max_chars)
    table, rej = build_prompts(cohort, templates, max_chars, structured=sentences, required=required)
    rejects.check(rej, strict, "prompt building")
    table.to_parquet(out_table, index=False)
    rej.to_parquet(out_rejects, index=False)
    logger.info("prompts: %d volumes x %d templates, %d rejected", len(table), len(templates), len(rej))
    return table
