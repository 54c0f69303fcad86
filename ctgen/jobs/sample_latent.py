"""``ctgen sample --family latent_flow``: reports in, NIfTI (+ DICOM) volumes and sidecars out, as for the cascade.

The latent flow model conditions on report sections (findings and impression, or the structured
prompt), so its inputs are rows with those columns: the workflow's ``sample_prompts`` CSV carries
them beside the cascade's prompt. A free text (``--prompt``, a VLM3D report, a line of a text
file, a row with only ``prompt``/``text``) is split into findings and impression at its headers
(all findings without them; an absent section conditions on its null segment); a model conditioned
on the structured prompt gets the report parsed and rendered as its training prompts were
(:func:`sections_for`). The output contract is the cascade's:
``<id>_s<seed>.nii.gz`` int16 HU with a truthful affine, a JSON sidecar naming the family, seed,
settings, weight hashes and the spacing's source, an optional DICOM series, and ``samples.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from ctgen.jobs.inputs import check_unique_ids, given_text, read_rows, render_structured, row_id
from ctgen.pipelines.latent_flow import SPEC, LatentFlowPipeline, LatentSampleSettings
from ctprep.ctrate import is_blank_section
from ctprep.errors import UserError, read_json, read_text

log = logging.getLogger(__name__)

SEGMENT_COLUMNS = ("findings", "impression", "structured")
#: the key of a report given as one free text (not split into sections)
REPORT = "report"


def sections_for(sections: dict[str, str], segments: list[str], rendering: dict | None = None,
                 pid: str | None = None) -> dict[str, str]:
    """{segment: text} the model conditions on, from what a report gives (``SEGMENT_COLUMNS`` and/or ``REPORT``).

    ``findings`` and ``impression``: their own texts, else the free text's sections (split at its
    "Findings:"/"Impression:" headers or CT-RATE's separator, as the training reports were; a text
    without them is all findings), else "" (the null segment); ``structured``: its own text, else the
    report (findings and impression, or the free text) parsed and rendered with the spec's
    ``rendering`` (:func:`ctprep.prompts.report_prompt`), so a plain prompt reaches a structured
    model in the form it was trained on (a report the parser finds nothing in is warned about, naming ``pid``:
    :func:`~ctgen.jobs.inputs.render_structured`).
    """
    from ctprep.prompts import STRUCTURED
    from ctprep.reports.sections import split_sections

    given = {k: v for k, v in sections.items() if not is_blank_section(v)}  # "Not given.": the null segment, as trained
    split = {}
    if REPORT in given:
        split = {k: v for k, v in split_sections(given[REPORT]).items() if k in ("findings", "impression") and v}
        split = split or {"findings": given[REPORT]}  # no findings or impression found: all of it
    used = {}
    for seg in segments:
        if seg in given:
            used[seg] = given[seg]
        elif seg in ("findings", "impression"):
            used[seg] = split.get(seg, "")
        elif seg == STRUCTURED and given:
            report = given.get(REPORT) or {k: given[k] for k in ("findings", "impression") if k in given}
            used[seg] = render_structured(report, rendering, pid)
        else:
            used[seg] = ""
    return used


def latent_spec(models: str | Path) -> dict:
    path = Path(models) / SPEC
    if not path.is_file():
        raise UserError(f"{models} holds no trained latent flow model: {SPEC} is missing "
                        "(run the workflow's `latent_flow_spec` rule)")
    return read_json(path, "sampling spec")


def read_sections(path: str | Path) -> list[tuple[str, dict[str, str]]]:
    """(id, {segment: text}) of a CSV/JSONL of reports; a plain-text file gives one findings text per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist")
    if path.suffix not in (".csv", ".jsonl", ".json"):
        # numbered by line before blank lines are dropped, as the cascade's reader does: both families give one
        # report one id (and so one seed and one file name), which `ctgen compare` pairs them by
        lines = [line.strip() for line in read_text(path).splitlines()]  # a non-UTF-8 file is named
        return [(f"prompt{i:04d}", {REPORT: line}) for i, line in enumerate(lines) if line]
    out = []
    for i, (n, row) in enumerate(read_rows(path)):
        bad = [k for k in (*SEGMENT_COLUMNS, "prompt", "text") if row.get(k) is not None and not isinstance(row[k], str)]
        if bad:  # a JSON list or number: not a report text
            raise UserError(f"{path}:{n}: `{bad[0]}` must be a text, not a {type(row[bad[0]]).__name__}")
        sections = {k: str(row[k]) for k in SEGMENT_COLUMNS if isinstance(row.get(k), str) and row[k].strip()}
        free = next((row[k] for k in ("prompt", "text") if isinstance(row.get(k), str) and row[k].strip()), None)
        if not sections and free:
            sections = {REPORT: free}
        if not sections:
            cells = [k for k in (*SEGMENT_COLUMNS, "prompt", "text") if k in row]
            raise UserError(f"{path}:{n}: " + (f"empty {', '.join(cells)} for {row_id(row, i)}" if cells else
                            f"no report text: the columns read are {', '.join((*SEGMENT_COLUMNS, 'prompt', 'text'))} "
                            f"(this row has {', '.join(map(str, row)) or 'none'})"))
        out.append((row_id(row, i, f"{path}:{n}"), sections))
    if not out:
        raise UserError(f"prompts file {path} holds no reports")
    check_unique_ids([pid for pid, _ in out], path)
    return out


def recorded_prompt(used: dict[str, str]) -> str:
    """The text samples.csv records for a volume (``ctgen evaluate`` reads it as the report where the ground truth
    has none): a single section's text as it is, as the cascade's prompt ("mild cardiomegaly"), or each
    section named ("findings: ... | impression: ...")."""
    given = {seg: t for seg, t in used.items() if t}
    if len(given) == 1:
        return next(iter(given.values()))
    return " | ".join(f"{seg}: {t}" for seg, t in given.items())


def sample_latent_to_files(models_dir: str | Path, reports: list[tuple[str, dict[str, str]]], out_dir: str | Path,
                           settings: LatentSampleSettings, seed: int = 0, per_prompt: int = 1, device: str = "cpu",
                           dicom_dir: str | Path | None = None, single_out: str | Path | None = None,
                           exact_names: bool = False, orientation: str | None = None) -> pd.DataFrame:
    """``per_prompt`` volumes per report (seeds ``seed + index``); NIfTI + sidecar (+ DICOM); the manifest.

    ``exact_names``/``orientation``: as :func:`ctgen.jobs.sample.sample_to_files` (the VLM3D contract).
    """
    from ctgen.export.samples import sample_identity, write_samples

    pipe = LatentFlowPipeline.from_pretrained(models_dir, device=device)
    segments = pipe.flow.config.segments
    rendering = pipe.spec.get("prompt_rendering")  # older specs: the defaults
    requests = []
    for pid, sections in reports:  # every report before the first volume
        used = sections_for(sections, segments, rendering, pid)
        if not any(t.strip() for t in used.values()):
            raise UserError(f"report {pid}: none of its sections ({', '.join(segments)}) has text")
        rendered = "structured" in segments and "structured" not in sections  # the parser made it of the report
        requests.append((pid, (used, given_text(sections.get(REPORT) or sections) if rendered else None)))

    # a section longer than its encoder takes is cut (the training reports were cut the same way): said, and each
    # sidecar records its token counts (text_tokens)
    cut = [pid for pid, (used, _) in requests
           if any(t["n"] > t["max"] for t in pipe.section_tokens(used).values())]
    if cut:
        log.warning("%d of %d reports have a section longer than the text encoder takes, cut to its length (e.g. %s; "
                    "each sidecar's text_tokens)", len(cut), len(requests), ", ".join(cut[:3]))

    def generate(request: tuple[dict[str, str], str | None], s: int):
        used, given = request
        texts = {seg: [t] for seg, t in used.items()}
        vol = pipe(settings=settings, generators=[torch.Generator(device=device).manual_seed(s)], **texts)[0]
        fields = pipe.sidecar(used, s, settings)
        if given is not None:  # the report text the structured section was rendered from
            fields["prompt_given"] = given
        return vol, fields, recorded_prompt(used)

    return write_samples(requests, generate, out_dir, seed=seed, per_prompt=per_prompt,
                         dicom_dir=dicom_dir, single_out=single_out, exact_names=exact_names, orientation=orientation,
                         desc="sample latent_flow", identity=sample_identity(pipe.sidecar({}, 0, settings)))


def sample_latent_main(args) -> int:
    """The latent flow branch of ``ctgen sample`` (its parsed arguments)."""
    cascade_only = [flag for flag, given in (
        ("--num-slices", args.num_slices is not None), ("--temperature", args.temperature is not None),
        ("--sr-steps", args.sr_steps is not None), ("--batch-size", args.batch_size is not None),
        ("--no-superres", args.no_superres), ("--truncate-prompt", args.truncate_prompt)) if given]
    if cascade_only:
        raise UserError(f"{', '.join(cascade_only)}: the cascade's settings, not the latent flow family's "
                        "(it takes --steps, --guidance-scale, --seed, --per-prompt)")
    from ctgen.pipelines.spec import check_types
    from ctgen.pipelines.text_to_ct import SAMPLING_TYPES

    spec = latent_spec(args.models)
    check_types(spec, {"sampling": dict}, Path(args.models) / SPEC, optional=True)
    defaults = spec.get("sampling") or {}
    check_types(defaults, SAMPLING_TYPES, Path(args.models) / SPEC, optional=True)  # as the cascade's defaults
    base = LatentSampleSettings()
    settings = LatentSampleSettings(
        steps=args.steps if args.steps is not None else defaults.get("steps"),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None
        else defaults.get("guidance_scale", base.guidance_scale))
    seed = args.seed if args.seed is not None else defaults.get("seed", 0)
    per_prompt = args.per_prompt if args.per_prompt is not None else defaults.get("per_prompt", 1)
    if args.prompt is not None:
        out = Path(args.out)
        # the series from the volume in memory, as --prompts writes it (the NIfTI re-read gave float32 geometry);
        # its folder was checked replaceable by sample_main, before sampling
        sample_latent_to_files(args.models, [("prompt", {REPORT: args.prompt})], out.parent, settings, seed, 1,
                               args.device, dicom_dir=args.dicom, single_out=out, orientation=args.orientation)
        return 0
    if args.vlm3d is not None:  # the 2026 contract's report is findings and impression run together
        from ctgen.metrics.vlm3d.contract import read_prompts_json

        reports = [(name, {REPORT: report}) for name, report in read_prompts_json(args.vlm3d)]
        sample_latent_to_files(args.models, reports, args.out_dir, settings, seed, 1, args.device,
                               dicom_dir=args.dicom, exact_names=True, orientation=args.orientation)
        return 0
    sample_latent_to_files(args.models, read_sections(args.prompts), args.out_dir, settings, seed, per_prompt,
                           args.device, dicom_dir=args.dicom, orientation=args.orientation)
    return 0
