"""``ctprep`` command line: the preparation steps for single files and whole datasets."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

import yaml

from ctprep import __version__, ctrate
from ctprep.errors import (DEBUG_ENV, UserError, positive_int, read_json, run_reporting_errors, seed_int,
                           split_global_flags)

logger = logging.getLogger("ctprep")


#: The workflow's config schema: the one description of every config key (types, ranges, unknown keys)
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def check_sections(cfg: dict, sections: tuple[str, ...], where: str = "config") -> None:
    """The ``sections`` of ``cfg`` a command reads, against the workflow's schema: a wrong type, a value out of
    range or a misspelt key is named in one line (``presets.demo: [1, 2]`` failed with an AttributeError, a
    typo of a demo key was ignored). Skipped where the schema is absent (a ctprep installed without the workflow)."""
    import jsonschema

    if not SCHEMA.is_file():
        return
    full = yaml.safe_load(SCHEMA.read_text())
    # a command reads a section's keys with their defaults: the workflow's required keys are not required here
    props = {s: {k: v for k, v in full["properties"][s].items() if k != "required"}
             for s in sections if s in full.get("properties", {})}
    schema = {"definitions": full.get("definitions", {}), "type": "object", "properties": props}
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors({s: cfg[s] for s in sections if s in cfg}))
    if err is not None:
        raise UserError(f"{where} {'.'.join(map(str, err.absolute_path))}: {err.message}")


def load_config(path: str | None, required: bool = True, sections: tuple[str, ...] = ()) -> dict | None:
    """config.yaml from --config, $CTGEN_CONFIG or the working folder (None if not required and none is found);
    the ``sections`` the command reads are checked against the workflow's schema."""
    if path and not Path(path).is_file():
        raise UserError(f"config {path} not found")
    for c in (path, os.environ.get("CTGEN_CONFIG"), "config.yaml"):
        if c and Path(c).is_file():
            with open(c) as fh:
                cfg = yaml.safe_load(fh)
            if not isinstance(cfg, dict):
                raise UserError(f"config {c} is not a YAML mapping of sections")
            check_sections(cfg, sections, f"config {c}:")
            return cfg
    if required:
        raise UserError("no config found: pass --config PATH (the project's config.yaml holds the presets)")
    return None


def cmd_preprocess(args: argparse.Namespace) -> int:
    from ctprep.preprocess import preprocess_volume
    from ctprep.volume import check_nifti_path, load_nifti, save_nifti

    check_nifti_path(args.output)  # before the work: any other name was written as NIfTI all the same
    cfg = load_config(args.config, sections=("presets", "dataset"))
    presets = cfg.get("presets", {})
    if args.preset not in presets:
        raise UserError(f"unknown preset {args.preset!r}; config has {sorted(presets)}")
    row = read_json(args.metadata_row, "metadata row") if args.metadata_row else None
    dataset = {**cfg.get("dataset", {}), "geometry": "metadata" if row else "header"}
    if args.intensity is not None:  # else the config's dataset.intensity (else ctprep.preprocess's default)
        dataset["intensity"] = args.intensity
    vol = preprocess_volume(load_nifti(args.input), row, presets[args.preset], dataset, dtype="int16")
    save_nifti(vol, args.output, dtype="int16", descrip=f"ctprep preset {args.preset} HU")
    logger.info("wrote %s: %r", args.output, vol)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ctprep.extract import extract_nifti
    from ctprep.volume import check_nifti_path

    check_nifti_path(args.output)  # before the work: any other name was written as NIfTI all the same
    vol = extract_nifti(args.manifest, args.key, args.output, check=not args.no_check)
    logger.info("wrote %s: %r", args.output, vol)
    return 0


def cmd_dicom2nifti(args: argparse.Namespace) -> int:
    from ctprep.dicom import dicom_to_nifti
    from ctprep.volume import check_nifti_path

    check_nifti_path(args.output)
    vol = dicom_to_nifti(args.series_dir, args.output, series_uid=args.series_uid)
    logger.info("wrote %s: %r", args.output, vol)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ctprep.demo import write_demo_cohort

    cfg = (load_config(args.config, required=False, sections=("demo",)) or {}).get("demo") or {}
    if args.seed is not None:
        cfg = {**cfg, "seed": args.seed}
    write_demo_cohort(args.root, cfg)
    return 0


def cmd_cohort(args: argparse.Namespace) -> int:
    from ctprep.cohort import write_cohort

    config = load_config(args.config, required=args.n_chunks is None, sections=("prep", "dataset")) or {}
    prep, dataset = config.get("prep") or {}, config.get("dataset") or {}
    n_chunks = args.n_chunks if args.n_chunks is not None else prep.get("n_chunks")
    if n_chunks is None:
        raise UserError("the config has no prep.n_chunks: pass --n-chunks N")
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise UserError(f"prep.n_chunks must be a positive integer, not {n_chunks!r}")
    strict = args.strict if args.strict is not None else bool(prep.get("strict", False))
    prefer = args.prefer or dataset.get("prefer", "fixed")
    if prefer not in ("fixed", "original"):
        raise UserError(f"dataset.prefer must be fixed or original, not {prefer!r}")
    splits = args.splits or dataset.get("splits") or ["train", "valid"]
    # the same choices as the workflow's cohort rule: the config's dataset section, unless given here
    write_cohort(args.root, args.table, args.rejects, splits=tuple(splits), n_chunks=n_chunks, strict=strict,
                 prefer=prefer)
    return 0


# Commands with their own argument parsers (in ctprep.reports), passed the rest of the command line.
PASS_THROUGH = {
    "parse-report": ("ctprep.reports.cli", "parse_report_main",
                     "parse one report (stdin: text or CT-RATE JSON) or --jsonl IN OUT to sections, mentions, labels, prompts"),
    "evaluate-parser": ("ctprep.reports", "evaluate_main",
                        "score the report labeller against radiologist-labelled reports (JSONL)"),
}


def parser() -> argparse.ArgumentParser:
    """The ``ctprep`` parser; the pass-through commands appear in its help and parse their own arguments."""
    parser = argparse.ArgumentParser(prog="ctprep", description=__doc__,
                                     epilog=f"A mistake in the input ends with one line and status 2; "
                                            f"{DEBUG_ENV}=1 or --debug shows its traceback.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user mistake too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("preprocess", help="preprocess one NIfTI volume to HU on a preset's grid")
    p.add_argument("input", help="the NIfTI volume (.nii or .nii.gz) to preprocess")
    p.add_argument("output", help="the int16 HU NIfTI to write")
    p.add_argument("--preset", required=True, help="a preset name from config.yaml (generatect, spacing, demo, ...)")
    p.add_argument("--config", help="config.yaml holding the presets (default: $CTGEN_CONFIG or ./config.yaml)")
    p.add_argument("--metadata-row", help="JSON file with the volume's CT-RATE metadata row (else: header geometry)")
    p.add_argument("--intensity", choices=["auto", "hu", "raw"],
                   help="stored values: decided per volume (auto), HU already, or raw + rescale "
                        "(default: the config's dataset.intensity)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("extract", help="write one prepared volume of the shards as NIfTI, with its affine")
    p.add_argument("manifest", help="a shard manifest (results/shards/<split>/manifest.json)")
    p.add_argument("key", help="the sample key or the CT-RATE VolumeName (train_1_a_1 or train_1_a_1.nii.gz)")
    p.add_argument("output", help="the NIfTI file to write (.nii or .nii.gz)")
    p.add_argument("--no-check", action="store_true", help="skip hashing the shard against the manifest")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("dicom2nifti", help="convert one DICOM CT series folder to an HU NIfTI")
    p.add_argument("series_dir", help="folder holding the DICOM files of one CT series")
    p.add_argument("output", help="the int16 HU NIfTI to write, with the scanner geometry")
    p.add_argument("--series-uid", help="the SeriesInstanceUID to read where the folder holds several series")
    p.set_defaults(func=cmd_dicom2nifti)

    p = sub.add_parser("demo", help="write the synthetic demo cohort in the CT-RATE layout")
    p.add_argument("root", help="the dataset/ folder to create")
    p.add_argument("--config", help="config.yaml whose `demo` section sizes the cohort "
                                    "(default: $CTGEN_CONFIG or ./config.yaml where present)")
    p.add_argument("--seed", type=seed_int, help="cohort seed (default: the config's demo.seed)")  # -5: numpy's words
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cohort", help="build the cohort table of a CT-RATE-layout folder")
    p.add_argument("root", help="the dataset/ folder (train/, valid/, metadata/, radiology_text_reports/, ...)")
    p.add_argument("table", help="the cohort table to write (Parquet)")
    p.add_argument("rejects", help="the rejects table to write (Parquet): every unusable input and why")
    p.add_argument("--config", help="config.yaml with the prep section (default: $CTGEN_CONFIG or ./config.yaml)")
    p.add_argument("--n-chunks", type=positive_int, help="chunks the volumes are spread over (default: the config's prep.n_chunks)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction,
                   help="fail on any rejected input instead of listing it (default: the config's prep.strict)")
    p.add_argument("--prefer", choices=("fixed", "original"),
                   help="a volume in both <split>_fixed/ and <split>/: which copy (default: the config's dataset.prefer, "
                        "else fixed)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT", choices=list(ctrate.SPLITS),
                   help="the splits to read (default: the config's dataset.splits, else train valid)")
    p.set_defaults(func=cmd_cohort)

    for command, (_, _, text) in PASS_THROUGH.items():
        sub.add_parser(command, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags, rest = split_global_flags(argv, {"-v", "--verbose", "--debug"})
    if rest and rest[0] in PASS_THROUGH:
        logging.basicConfig(level=logging.DEBUG if flags - {"--debug"} else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        module, name, _ = PASS_THROUGH[rest[0]]
        command = getattr(importlib.import_module(module), name)
        return run_reporting_errors("ctprep", lambda: command(rest[1:]), "--debug" in flags)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_reporting_errors("ctprep", lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
