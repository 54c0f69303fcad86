"""``ctgen sample`` and the workflow's sampling step: prompts in, NIfTI (+ DICOM) volumes and sidecars out."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from ctgen.pipelines.text_to_ct import CASCADE, SampleSettings, TextToCTPipeline, sampling_defaults
from ctgen.export.dicom import check_replaceable
from ctgen.export.nifti import check_nifti_path, check_orientation
from ctgen.export.samples import sample_identity, write_samples
from ctgen.jobs.inputs import check_unique_ids, given_text, read_rows, render_structured, row_id
from ctgen.training.distributed import device_option
from ctprep.errors import UserError, read_json, read_text

log = logging.getLogger(__name__)


def read_prompts(path: str | Path, template: str | None = None, rendering: dict | None = None,
                 given: bool = False) -> list[tuple[str, str]] | list[tuple[str, str, str | None]]:
    """(id, prompt) pairs from a text file (one prompt per line), a CSV or a JSONL.

    CSV/JSONL rows give the prompt in a ``prompt`` (or ``text``) column, or as a CT-RATE-style report
    (``findings``, ``impression``, ``age``, ``sex``...) rendered with ``template`` (the cascade's
    prompt template, with the spec's ``rendering``: :func:`ctprep.prompts.report_prompt`) — a
    ``structured`` template parses the report first, and a given prompt too (:func:`model_prompt`). Ids come from ``id`` /
    ``VolumeName`` columns or the line number. A malformed file is a :class:`UserError` naming the
    file and line. ``given``: (id, prompt, the text given) triples, the text where the structured parser made the
    prompt of it (None otherwise), for the sidecar's record of what the user asked for.
    """
    from ctprep.prompts import STRUCTURED

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist")
    if path.suffix in (".csv", ".jsonl", ".json"):
        rows = read_rows(path)
        out = []
        for i, (n, row) in enumerate(rows):
            pid = row_id(row, i, f"{path}:{n}")
            try:
                prompt, text = _row_prompt(row, template, rendering, pid)
            except KeyError as err:  # a template field the report lacks
                raise UserError(f"{path}:{n}: the report has no {err} for the prompt template") from None
            except ValueError as err:
                raise UserError(f"{path}:{n}: {err}") from None
            out.append((pid, prompt, text))
    else:
        lines = [line.strip() for line in read_text(path).splitlines()]
        out = [(f"prompt{i:04d}", model_prompt(line, template, rendering, f"prompt{i:04d}"), line)
               for i, line in enumerate(lines) if line]
    if not out:
        raise UserError(f"prompts file {path} holds no prompts")
    check_unique_ids([pid for pid, _, _ in out], path)
    if template != STRUCTURED:
        out = [(pid, prompt, None) for pid, prompt, _ in out]
    return out if given else [(pid, prompt) for pid, prompt, _ in out]


def model_prompt(text: str, template: str | None, rendering: dict | None = None, pid: str | None = None) -> str:
    """A prompt given as text, in the form the model was trained on: for a ``structured`` model the text is
    parsed and rendered (a structured prompt reads back unchanged, so only free text changes: "Small left
    pleural effusion." -> "mild left pleural effusion"; text the parser finds nothing in is warned about, naming
    ``pid``: :func:`~ctgen.jobs.inputs.render_structured`); for any other template it is used as written."""
    from ctprep.prompts import STRUCTURED

    if template != STRUCTURED or not text.strip():
        return text
    rendered = render_structured(text, rendering, pid)
    if rendered != text:
        log.info("prompt %r rendered as the structured prompt %r", text[:80], rendered)
    return rendered


#: the columns that give a row's prompt as it is (else the row is a report, rendered with the template)
PROMPT_COLUMNS = ("prompt", "text")


def _row_prompt(row: dict, template: str | None, rendering: dict | None = None,
                pid: str | None = None) -> tuple[str, str]:
    """(the model's prompt, the text it was made of) of one row; "" where its prompt cell is empty (the caller names
    such rows), a ValueError naming the accepted columns where the row has none of them."""
    from ctprep.prompts import STRUCTURED, report_prompt, template_fields

    for key in PROMPT_COLUMNS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):  # a JSON list or number: not a report text
            raise ValueError(f"`{key}` must be a text, not a {type(value).__name__}")
        if value and value.strip():
            return model_prompt(value, template, rendering, pid), value
    prompt_column = any(key in row for key in PROMPT_COLUMNS)  # there, but empty in this row
    columns = f"this row has {', '.join(map(str, row)) or 'none'}"
    if template is None:
        if prompt_column:
            return "", ""
        raise ValueError(f"no `prompt` or `text` column ({columns}), and the cascade has no prompt template to render "
                         "a report with")
    if template == STRUCTURED:
        if not any(isinstance(row.get(k), str) and row[k].strip() for k in ("findings", "impression")):
            if prompt_column:
                return "", ""
            raise ValueError(f"no report text: a row needs `prompt`, `text`, `findings` or `impression` ({columns})")
        return render_structured(row, rendering, pid), given_text(row)
    try:
        return report_prompt(row, template, **(rendering or {})), given_text(row)
    except KeyError as err:
        if prompt_column:
            return "", ""
        field = err.args[0]
        if field in row:
            raise  # the column is there, empty in this row: read_prompts names the field
        raise ValueError(f"no `prompt` or `text` column, and no `{field}` for the prompt template {template!r}: the "
                         f"columns read are prompt, text or the template's {', '.join(sorted(template_fields(template)))}"
                         f" ({columns})") from None


def report_template(spec: dict, name: str | None = None) -> tuple[str | None, dict]:
    """(template, rendering) that make a report into the prompt named ``name`` (None: the spec's model's own):
    ``"structured"``, the template text the spec records for its own prompt, or None where the spec does not
    know the named template's text (then a report must come with its prompt). The rendering is the spec's
    (older specs: the defaults)."""
    from ctprep.prompts import STRUCTURED, rendering

    how = spec.get("prompt_rendering") or rendering({})
    if name == STRUCTURED or (name is None and spec.get("prompt_template") == STRUCTURED):
        return STRUCTURED, how
    if name is None or name == spec.get("prompt_template"):
        return spec.get("prompt_template_text"), how
    return None, how


def sample_to_files(models_dir: str | Path, prompts: list[tuple[str, str]], out_dir: str | Path,
                    settings: SampleSettings, seed: int = 0, per_prompt: int = 1, device: str = "cpu",
                    dicom_dir: str | Path | None = None, single_out: str | Path | None = None,
                    exact_names: bool = False, orientation: str | None = None) -> pd.DataFrame:
    """Sample ``per_prompt`` volumes per prompt; write NIfTI + sidecar (+ DICOM series); return the manifest.

    Seeds are ``seed + index`` over the (prompt, repeat) pairs in order, each recorded in its sidecar.
    ``prompts``: (id, prompt) pairs, or (id, prompt, the text given) triples (:func:`read_prompts` with ``given``):
    a text that is not None is recorded as the sidecar's ``prompt_given`` and samples.csv's column of that name.
    ``exact_names``: each volume is ``<id>.nii.gz`` (the VLM3D contract; one volume per prompt) instead of
    ``<id>_s<seed>.nii.gz``. ``orientation``: store the voxels in this axis order (e.g. ``PLI``), the affine
    following (see :func:`stored_as`).
    """
    from ctprep.reports.normalise import replace_surrogates

    # the texts as the pipeline samples them (a lone surrogate as U+FFFD): the sidecar, samples.csv and the DICOM
    # record them, and no UTF-8 file can hold a surrogate
    prompts = [(p[0], *(t if t is None else replace_surrogates(t) for t in p[1:])) for p in prompts]
    pipe = TextToCTPipeline.from_pretrained(models_dir, device=device)
    names = ["the prompt"] if single_out else [f"prompt {p[0]!r}" for p in prompts]  # as the other errors name them
    pipe.validate([p[1] for p in prompts], settings, names)  # every prompt before the first volume
    requests = [(p[0], (p[1], p[2] if len(p) > 2 else None)) for p in prompts]

    def generate(request: tuple[str, str | None], s: int):
        prompt, given = request
        vol = pipe([prompt], settings, [torch.Generator(device=device).manual_seed(s)])[0]
        fields = pipe.sidecar(prompt, s, settings)
        if given is not None:  # the text the structured parser made the prompt of
            fields["prompt_given"] = given
        return vol, fields, prompt

    return write_samples(requests, generate, out_dir, seed=seed, per_prompt=per_prompt, dicom_dir=dicom_dir,
                         single_out=single_out, exact_names=exact_names, orientation=orientation, desc="sample",
                         identity=sample_identity(pipe.sidecar("", 0, settings)))


def sample_parser():
    """``ctgen sample``'s arguments. Settings left out come from the cascade's ``cascade_sampling.json``
    (config.yaml's ``sampling`` section when the workflow trained it), else from :class:`SampleSettings`."""
    import argparse

    from ctprep.errors import positive_int, seed_int

    ap = argparse.ArgumentParser(prog="ctgen sample", description="report text -> synthetic chest CT (NIfTI, DICOM)")
    ap.add_argument("--models", required=True, help="trained models folder (holds cascade.json / latent_flow.json)")
    ap.add_argument("--family", choices=("cascade", "latent_flow"),
                    help="which generator family samples (default: the cascade, or the latent flow family where "
                         "--models holds only that one)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one report/prompt text")
    src.add_argument("--prompts", help="file: one prompt per line, or CSV/JSONL of prompts or CT-RATE-style reports")
    src.add_argument("--vlm3d", metavar="PROMPTS_JSON",
                     help='the VLM3D 2026 prompts.json ([{"input_image_name", "report"}]): one <input_image_name>.nii.gz '
                          "per entry in --out-dir (int16 HU, truthful spacing)")
    ap.add_argument("--orientation", default=None, metavar="AXCODES",
                    help="store the voxels in this axis order, the affine following (--vlm3d default: PLI, CT-RATE's "
                         "stored order: rows anterior->posterior, columns right->left, slices head->feet; the "
                         "challenge's FVD and CLIP read the voxel order and ignore the header); otherwise RAS")
    ap.add_argument("--out", help="output .nii.gz for --prompt")
    ap.add_argument("--out-dir", help="output folder for --prompts / --vlm3d (one volume per prompt, samples.csv)")
    ap.add_argument("--dicom", help="also write DICOM: the series folder (--prompt), or a folder of one series per volume")
    ap.add_argument("--seed", type=seed_int, help="seed of the first volume; the next get seed+1, ... (default: cascade's)")
    ap.add_argument("--per-prompt", type=positive_int, help="volumes per prompt (default: cascade's, else 1)")
    ap.add_argument("--num-slices", type=positive_int, help="slices of the output, at least 2 (default: the training grid's)")
    ap.add_argument("--guidance-scale", type=float, help="generator classifier-free guidance (default: cascade's)")
    ap.add_argument("--steps", type=positive_int, help="MaskGIT decoding steps (default: cascade's)")
    ap.add_argument("--temperature", type=float, help="MaskGIT temperature (default: cascade's)")
    ap.add_argument("--sr-steps", type=positive_int, help="super-resolution sampler steps (default: cascade's, else the model's)")
    ap.add_argument("--batch-size", type=positive_int, help="slices per super-resolution batch (default: cascade's)")
    ap.add_argument("--no-superres", action="store_true", help="stop at the low-res volume")
    ap.add_argument("--truncate-prompt", action="store_true", help="cut prompts longer than the text encoder takes (at the last whole sentence that fits)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_option,
                    help="torch device (default: cuda when available, else cpu)")
    return ap


def _cascade_spec(models: str | Path) -> dict:
    path = Path(models) / CASCADE
    if not path.is_file():
        raise UserError(f"{models} is not a trained cascade: {CASCADE} is missing (run the workflow's `cascade` rule)")
    return read_json(path, "sampling spec")


def _held_family(models: str | Path) -> str:
    """The family a models folder holds: the cascade where its spec is there (the default of a run with
    both), else the latent flow family's; a folder with neither is the cascade's error, naming the file."""
    from ctgen.pipelines.latent_flow import SPEC

    if not (Path(models) / CASCADE).is_file() and (Path(models) / SPEC).is_file():
        log.info("%s holds the latent flow family only: sampling it", models)
        return "latent_flow"
    return "cascade"


def _given(value, default):
    return default if value is None else value


def sample_main(argv: list[str] | None = None) -> int:
    ap = sample_parser()
    args = ap.parse_args(argv)
    if args.prompt is not None and not args.out:
        ap.error("--prompt needs --out OUT.nii.gz")
    # options of the other modes were accepted and ignored (one volume written where three were asked for)
    if args.prompt is not None and args.per_prompt not in (None, 1):
        ap.error("--prompt writes one volume (--out): --per-prompt needs --prompts")
    if args.prompt is not None and args.out_dir:
        ap.error("--prompt writes to --out OUT.nii.gz, not --out-dir (that is for --prompts / --vlm3d)")
    if args.prompt is None and args.out:
        ap.error("--out is for --prompt; --prompts / --vlm3d write to --out-dir DIR")
    if args.prompts is not None and not args.out_dir:
        ap.error("--prompts needs --out-dir DIR")
    if args.vlm3d is not None and not args.out_dir:
        ap.error("--vlm3d needs --out-dir DIR")
    if args.vlm3d is not None and args.per_prompt not in (None, 1):
        ap.error("--vlm3d writes one volume per entry: --per-prompt must be 1")
    if args.vlm3d is not None and args.orientation is None:
        args.orientation = VLM3D_ORIENTATION
    if args.vlm3d is not None:
        from ctgen.metrics.vlm3d.contract import read_prompts_json

        read_prompts_json(args.vlm3d)  # a malformed file is named before the models are loaded
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty: a report text is needed to condition the scan")
    # what is wrong with the outputs is named before any volume is sampled
    check_orientation(args.orientation)
    if args.out:
        check_nifti_path(args.out)
    if args.dicom and Path(args.dicom).is_file():
        raise UserError(f"--dicom {args.dicom} is a file, where the DICOM series' folder is to be made")
    if args.prompt is not None and args.dicom:
        # the series' folder must hold the series alone: the NIfTI written into it (or into a folder below it) made
        # the folder refused as holding other files, but only after sampling (before, it was empty)
        folder = Path(args.out).resolve().parent
        if folder.is_relative_to(Path(args.dicom).resolve()):
            raise UserError(f"--dicom {args.dicom} holds the --out file {args.out}: give the DICOM series a folder "
                            "of its own")
        # the series is replaced with the NIfTI (a rerun with another seed), so a folder that could not be is
        # refused now: after sampling, the new NIfTI would have stood beside the last run's series
        try:
            check_replaceable(args.dicom)
        except FileExistsError as err:
            raise UserError(f"--dicom: {err}; give a new or empty folder") from None
    if args.family is None:
        args.family = _held_family(args.models)
    if args.family == "latent_flow":
        from ctgen.jobs.sample_latent import sample_latent_main

        return sample_latent_main(args)
    spec = _cascade_spec(args.models)
    defaults, base = sampling_defaults(args.models, spec), SampleSettings()
    settings = SampleSettings(
        num_slices=args.num_slices, steps=_given(args.steps, defaults.get("steps", base.steps)),
        guidance_scale=_given(args.guidance_scale, defaults.get("guidance_scale", base.guidance_scale)),
        temperature=_given(args.temperature, defaults.get("temperature", base.temperature)),
        sr_steps=_given(args.sr_steps, defaults.get("sr_steps", base.sr_steps)),
        sr_batch_size=_given(args.batch_size, defaults.get("batch_size", base.sr_batch_size)),
        super_resolution=not args.no_superres, truncate_prompt=args.truncate_prompt)
    seed = _given(args.seed, defaults.get("seed", 0))
    if args.prompt is not None:
        out = Path(args.out)
        template, how = report_template(spec)
        prompt = model_prompt(args.prompt, template, how, "prompt")
        # the series from the volume in memory, as --prompts writes it (the NIfTI re-read gave float32 geometry);
        # its folder was checked replaceable above
        sample_to_files(args.models, [("prompt", prompt, _given_if(template, args.prompt))], out.parent, settings,
                        seed, 1, args.device, dicom_dir=args.dicom, single_out=out, orientation=args.orientation)
    elif args.vlm3d is not None:
        prompts = vlm3d_prompts(args.vlm3d, *report_template(spec), given=True)
        sample_to_files(args.models, prompts, args.out_dir, settings, seed, 1, args.device, dicom_dir=args.dicom,
                        exact_names=True, orientation=args.orientation)
    else:
        prompts = read_prompts(args.prompts, *report_template(spec), given=True)
        empty = [pid for pid, prompt, _ in prompts if not prompt.strip()]
        if empty:
            raise UserError(f"{args.prompts}: empty prompt for {', '.join(map(str, empty[:5]))}")
        sample_to_files(args.models, prompts, args.out_dir, settings, seed,
                        _given(args.per_prompt, defaults.get("per_prompt", 1)), args.device, dicom_dir=args.dicom,
                        orientation=args.orientation)
    return 0


#: CT-RATE's stored voxel order (config dataset.array_axes [row, column, slice], slice_direction -1): row index
#: grows posterior, column index towards the patient's left, slice index towards the feet
VLM3D_ORIENTATION = "PLI"


def vlm3d_prompts(path: str | Path, template: str | None = None, rendering: dict | None = None,
                  given: bool = False) -> list[tuple[str, str]] | list[tuple[str, str, str | None]]:
    """(input_image_name, prompt) of a VLM3D 2026 ``prompts.json``, validated entry by entry
    (:func:`ctgen.metrics.vlm3d.contract.read_prompts_json`).

    The report is the prompt, except for a cascade trained on ``structured`` prompts: then the report is
    parsed and rendered as one (the other templates need report fields the contract does not carry).
    ``given``: triples with the report where it was rendered (as :func:`read_prompts`).
    """
    from ctgen.metrics.vlm3d.contract import read_prompts_json

    out = [(name, model_prompt(report, template, rendering, name), _given_if(template, report))
           for name, report in read_prompts_json(path)]
    return out if given else [(name, prompt) for name, prompt, _ in out]


def _given_if(template: str | None, text: str) -> str | None:
    """The given text, kept where the structured parser makes the prompt of it (else the prompt is the text)."""
    from ctprep.prompts import STRUCTURED

    return text if template == STRUCTURED else None


def select_prompts(prompts_parquet: str | Path, column: str, split: str, volumes: list[str], max_prompts: int,
                   out_csv: str | Path, cohort_parquet: str | Path | None = None) -> pd.DataFrame:
    """The evaluation prompts: the named volumes' prompts, or the first ``max_prompts`` of ``split``.

    Each row keeps the real volume's name, so the evaluation can put the generated scan beside the
    real scan of the same report; with ``cohort_parquet`` also the report's findings and impression
    (and the structured prompt), which the latent flow family conditions on.
    """
    table = pd.read_parquet(prompts_parquet)
    if volumes:
        missing = sorted(set(volumes) - set(table["VolumeName"]))
        if missing:
            raise ValueError(f"sampling.volumes not in the prompts table (rejected or unknown): {missing}")
        table = table[table["VolumeName"].isin(volumes)]
        empty = sorted(table.loc[~table[column].map(lambda t: isinstance(t, str)), "VolumeName"])
        if empty:
            raise ValueError(f"sampling.volumes without a {column!r} prompt (its template needs a field their "
                             f"report/metadata lacks): {empty}")
    else:
        table = table[(table["split"] == split) & table[column].map(lambda t: isinstance(t, str))]
        table = table.sort_values("VolumeName").head(max_prompts)
    if table.empty:
        raise ValueError(f"no prompts to sample in split {split!r}")
    from ctprep.ctrate import volume_key

    out = pd.DataFrame({"id": table["VolumeName"].map(volume_key), "VolumeName": table["VolumeName"],
                        "prompt": table[column]})
    if cohort_parquet is not None:
        from ctgen.jobs.text import section_texts

        texts = section_texts(cohort_parquet, prompts_parquet)
        for seg in ("findings", "impression", "structured"):
            out[seg] = [texts.get(f"{key}:{seg}", "") for key in out["id"]]
    out.to_csv(out_csv, index=False)
    return out


def write_cascade_spec(models_dir: str | Path, preset: dict, models_cfg: dict, train_manifests: list[str],
                       text_tokenizer: str | Path | None = None, prompts: dict | None = None) -> Path:
    """``cascade.json`` with the output spacing resolved (resize presets: the training volumes' median), after
    checking that the generator's token grids and super-resolution's reconstructions came from this tokenizer.

    ``prompts``: the config's ``prompts`` section (the template texts and how a report is rendered).
    """
    from ctgen.data.derived import weights_id
    from ctgen.data.grid import resolved_preset
    from ctgen.pipelines.text_to_ct import write_cascade
    from ctprep.prompts import rendering

    models_dir = Path(models_dir)
    if (models_dir / "tokenizer" / "model.safetensors").is_file():
        tokenizer = weights_id(models_dir / "tokenizer")
        for model, key in (("generator", "tokens_from"), ("superres", "recon_from")):
            config = models_dir / model / "config.json"
            made_by = read_json(config, "model config").get("provenance", {}).get(key) if config.is_file() else None
            if made_by and made_by != tokenizer:
                raise ValueError(f"the {model} was trained on {key.split('_')[0]} of {made_by}, not of this tokenizer "
                                 f"({tokenizer}): re-run encode_tokens and the {model}'s training")
    prompts = prompts or {}
    return write_cascade(models_dir, resolved_preset(preset, train_manifests), models_cfg,
                         text_tokenizer=text_tokenizer, prompt_templates=prompts.get("templates"),
                         prompt_rendering=rendering(prompts))


def write_latent_spec(models_dir: str | Path, preset: dict, models_cfg: dict, sampling: dict, latent_manifests: list[str],
                      train_manifests: list[str], text: str | Path | list | None = None, prompts: dict | None = None,
                      encoders: list[dict] | None = None) -> Path:
    """``latent_flow.json``: the latent flow family's sampling spec, after checking its latents came from its autoencoder.

    ``prompts``: the config's ``prompts`` section (how a new report becomes its structured section).
    ``encoders``: the family's text encoders in training order (None: ``models_cfg["text_encoder"]``).
    """
    from ctgen.data.derived import weights_id
    from ctgen.data.grid import resolved_preset
    from ctgen.jobs.latents import latent_producer
    from ctgen.pipelines.latent_flow import write_latent_flow_spec
    from ctprep.prompts import rendering

    models_dir = Path(models_dir)
    made_by, autoencoder = latent_producer(latent_manifests), weights_id(models_dir / "autoencoder")
    if made_by != autoencoder:
        raise ValueError(f"the latent shards were made by {made_by}, not by {autoencoder}: re-run encode_latents")
    encoders = encoders or [models_cfg["text_encoder"]]
    small = encoders[0]["kind"] == "small"
    caches = None if small or not text else [text] if isinstance(text, (str, Path)) else list(text)
    return write_latent_flow_spec(models_dir, resolved_preset(preset, train_manifests), encoders, sampling,
                                  text_tokenizer=text if small else None, prompt_rendering=rendering(prompts or {}),
                                  evaluation_text_encoder=models_cfg["text_encoder"], caches=caches)
