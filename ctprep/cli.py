"""``ctprep`` command line: the preparation steps for single files and whole datasets."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

logger = logging.getLogger("ctprep")


def _load_config(path: str | None) -> dict:
    """config.yaml from --config, $CTGEN_CONFIG or the working folder."""
    candidates = [path, os.environ.get("CTGEN_CONFIG"), "config.yaml"]
    for c in candidates:
        if c and Path(c).is_file():
            with open(c) as fh:
                return yaml.safe_load(fh)
    raise SystemExit("no config found: pass --config PATH (the project's config.yaml holds the presets)")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from ctprep.preprocess import preprocess_volume
    from ctprep.volume import load_nifti, save_nifti

    cfg = _load_config(args.config)
    presets = cfg.get("presets", {})
    if args.preset not in presets:
        raise SystemExit(f"unknown preset {args.preset!r}; config has {sorted(presets)}")
    row = json.loads(Path(args.metadata_row).read_text()) if args.metadata_row else None
    dataset = {**cfg.get("dataset", {}), "geometry": "metadata" if row else "header", "intensity": args.intensity}
    vol = preprocess_volume(load_nifti(args.input), row, presets[args.preset], dataset, dtype="int16")
    save_nifti(vol, args.output, dtype="int16", descrip=f"ctprep preset {args.preset} HU")
    logger.info("wrote %s: %r", args.output, vol)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ctprep.extract import extract_nifti

    vol = extract_nifti(args.manifest, args.key, args.output, check=not args.no_check)
    logger.info("wrote %s: %r", args.output, vol)
    return 0


def cmd_dicom2nifti(args: argparse.Namespace) -> int:
    from ctprep.dicom import dicom_to_nifti

    vol = dicom_to_nifti(args.series_dir, args.output)
    logger.info("wrote %s: %r", args.output, vol)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ctprep.demo import write_demo_cohort

    cfg = _load_config(args.config).get("demo", {}) if args.config or Path("config.yaml").is_file() else {}
    if args.seed is not None:
        cfg = {**cfg, "seed": args.seed}
    write_demo_cohort(args.root, cfg)
    return 0


def cmd_cohort(args: argparse.Namespace) -> int:
    from ctprep.cohort import write_cohort

    write_cohort(args.root, args.table, args.rejects, n_chunks=args.n_chunks, strict=args.strict)
    return 0


# Commands with their own argument parsers (in ctprep.reports), passed the rest of the command line.
PASS_THROUGH = {
    "parse-report": ("ctprep.reports", "parse_report_main",
                     "parse one report (stdin: text or CT-RATE JSON) or --jsonl IN OUT to sections, mentions, labels, prompts"),
    "evaluate-parser": ("ctprep.reports", "evaluate_main",
                        "score the report labeller against radiologist-labelled reports (JSONL)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:
        module, name, _ = PASS_THROUGH[argv[0]]
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return getattr(__import__(module, fromlist=[name]), name)(argv[1:])
    parser = argparse.ArgumentParser(prog="ctprep", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="preprocess one NIfTI volume to HU on a preset's grid")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--preset", required=True, help="a preset name from config.yaml (generatect, spacing, demo, ...)")
    p.add_argument("--config", help="config.yaml holding the presets (default: $CTGEN_CONFIG or ./config.yaml)")
    p.add_argument("--metadata-row", help="JSON file with the volume's CT-RATE metadata row (else: header geometry)")
    p.add_argument("--intensity", default="auto", choices=["auto", "hu", "raw"])
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("extract", help="write one prepared volume of the shards as NIfTI, with its affine")
    p.add_argument("manifest", help="a shard manifest (results/shards/<split>/manifest.json)")
    p.add_argument("key", help="the sample key or the CT-RATE VolumeName (train_1_a_1 or train_1_a_1.nii.gz)")
    p.add_argument("output", help="the NIfTI file to write (.nii or .nii.gz)")
    p.add_argument("--no-check", action="store_true", help="skip hashing the shard against the manifest")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("dicom2nifti", help="convert one DICOM CT series folder to an HU NIfTI")
    p.add_argument("series_dir")
    p.add_argument("output")
    p.set_defaults(func=cmd_dicom2nifti)

    p = sub.add_parser("demo", help="write the synthetic demo cohort in the CT-RATE layout")
    p.add_argument("root", help="the dataset/ folder to create")
    p.add_argument("--config")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cohort", help="build the cohort table of a CT-RATE-layout folder")
    p.add_argument("root")
    p.add_argument("table")
    p.add_argument("rejects")
    p.add_argument("--n-chunks", type=int, default=1)
    p.add_argument("--strict", action="store_true")
    p.set_defaults(func=cmd_cohort)

    for command, (_, _, text) in PASS_THROUGH.items():
        sub.add_parser(command, help=text, add_help=False)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from ctprep.volume import VolumeError

    try:
        return args.func(args)
    except (VolumeError, FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
