"""``ctgen`` command line: training, the steps between the models, and shard checks.

A mistake in what the user gives (a missing file, a bad config, an empty prompt, a bad value) ends
with one line ``ctgen: error: ...`` and exit status 2; which exceptions count as such is decided
in :mod:`ctprep.errors`. ``CTGEN_DEBUG=1`` or ``--debug`` shows the traceback as well.

Defaults: an option with a ``config.yaml`` counterpart has no default of its own here. It is
required (``--vocab-size``, ``--hu-window``), or it comes from where the workflow recorded the
config's value: the trained tokenizer's ``config.json`` (``--lowres-scale``) or the cascade's
``cascade_sampling.json`` (``ctgen sample``'s settings). ``tests/test_cli.py`` checks this against
``config.yaml``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from ctprep import __version__
from ctprep.errors import (DEBUG_ENV, UserError, positive_int, read_json, run_reporting_errors, seed_int,
                           split_global_flags)

#: The inputs each model's training reads, as (data key, flag): named when missing.
NEEDS = {"tokenizer": ("manifests",), "generator": ("tokens",), "superres": ("manifests",),
         "autoencoder": (), "latent_flow": ("latents",), "clip": ("manifests",), "classifier": ("manifests",),
         "slicenet": ("manifests",), "report_encoder": ("prompts", "labels", "text_tokenizer")}
#: Data keys that name input files (checked to exist before any work starts).
INPUT_FILES = ("manifests", "tokens", "latents", "probe_latents", "text_cache", "text_tokenizer", "recon",
               "prompts", "labels", "cohort")
#: Every key a training config's ``data`` section may hold: its inputs, what the workflow adds (the prep grid's
#: window, the in-plane factor, the prompt, the splits, the stream's settings) and the presets' own data options
#: (ctgen.jobs.schema's data classes); a misspelt one was ignored and its default used
DATA_KEYS = frozenset(INPUT_FILES) | {"hu_window", "lowres_scale", "prompt", "splits", "max_length", "shuffle_buffer",
                                     "verify_shards", "augment", "slices_per_volume", "patch_size",
                                     "text_probe_latents", "sections"}


def device_option(text: str) -> str:
    """``--device``'s type, importing torch only when the option is given (``ctgen --help`` stays quick)."""
    from ctgen.training.distributed import device_option as check

    return check(text)


def _check_sections(cfg: dict, path: str) -> None:
    for key in ("model", "train", "data"):
        if not isinstance(cfg.get(key), dict):
            raise UserError(f"{path}: `{key}` must be a mapping of settings, not {cfg.get(key)!r}")
    if cfg.get("text_encoder") is not None and not isinstance(cfg["text_encoder"], dict):
        raise UserError(f"{path}: `text_encoder` must be a mapping of settings")
    unknown = sorted(set(cfg["data"]) - DATA_KEYS)
    if unknown:
        raise UserError(f"{path}: data: unknown keys {unknown} (known: {sorted(DATA_KEYS)})")


def _check_inputs(model: str, data: dict) -> None:
    for key in NEEDS[model]:
        if not data.get(key):
            raise UserError(f"training the {model} needs --{key} (or data.{key} in the config)")
    for key in INPUT_FILES:
        values = data.get(key) or []
        for value in values if isinstance(values, list) else [values]:
            if not Path(str(value)).is_file():
                what = "is a folder, not a file" if Path(str(value)).is_dir() else "does not exist"
                raise UserError(f"--{key.replace('_', '-')}: {value} {what}")


def _training_config(args: argparse.Namespace) -> dict:
    """The training config of ``--config`` with the input files and ``--run-settings`` given on the line."""
    from ctgen.jobs.config import load_config

    cfg = load_config(args.config)
    _check_sections(cfg, args.config)
    for key in INPUT_FILES:
        value = getattr(args, key, None)
        if value:
            if isinstance(value, list) and len(value) > 1 and args.model != "latent_flow":
                raise UserError(f"--{key.replace('_', '-')}: the {args.model} reads one cache, not {len(value)}")
            cfg["data"][key] = value[0] if isinstance(value, list) and len(value) == 1 else value
    if args.run_settings:
        from ctgen.training.loop import RUN_ONLY

        try:
            given = json.loads(args.run_settings)
        except ValueError as err:
            raise UserError(f"--run-settings: not JSON: {err}") from None
        if not isinstance(given, dict) or set(given) - set(RUN_ONLY):
            raise UserError(f"--run-settings: a JSON object of {', '.join(RUN_ONLY)} only "
                            f"(what decides how the run works, not what it trains), not {args.run_settings}")
        cfg["train"] = {**cfg["train"], **given}
    if args.data_workers is not None:
        cfg["train"]["num_workers"] = args.data_workers
    _check_inputs(args.model, cfg["data"])
    return cfg


def _train(args: argparse.Namespace) -> int:
    from ctgen.jobs.train import run_training

    cfg = _training_config(args)
    run_training(args.model, cfg, args.out, args.checkpoints or Path(args.out).parent / "checkpoints" / args.model)
    return 0


def _probe_latent_flow(args: argparse.Namespace) -> int:
    from ctgen.jobs.train_latent import probe_latent_flow

    args.model = "latent_flow"
    cfg = _training_config(args)
    if not (Path(args.network) / "config.json").is_file():
        raise UserError(f"--network: {args.network} holds no trained flow network (no config.json)")
    probe_latent_flow(cfg, args.network, args.out)
    return 0


def tokenizer_lowres_scale(tokenizer_dir: str | Path, given: int | None = None) -> int:
    """The in-plane scale to encode at: the one the tokenizer was trained with (its config.json's training data).

    ``given`` (``--lowres-scale``) is checked against it: another scale gives other token grids than
    the generator will be trained and sampled with.
    """
    path = Path(tokenizer_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"--tokenizer: {tokenizer_dir} holds no trained model (no config.json)")
    recorded = ((read_json(path, "model config").get("provenance") or {}).get("data") or {}).get("lowres_scale")
    recorded = None if recorded is None else int(recorded)
    if given is None and recorded is None:
        raise UserError(f"{tokenizer_dir} does not record the lowres_scale it was trained with: pass --lowres-scale")
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"--lowres-scale {given} differs from the {recorded} the tokenizer in {tokenizer_dir} was "
                        "trained with: its token grids would not be the generator's")
    return recorded if given is None else given


def _encode_tokens(args: argparse.Namespace) -> int:
    import torch

    from ctgen.jobs.tokens import encode_tokens

    low, high = args.hu_window
    if not low < high:
        raise UserError(f"--hu-window: LOW must be below HIGH, got {low:g} {high:g}")
    scale = tokenizer_lowres_scale(args.tokenizer, args.lowres_scale)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encode_tokens(args.tokenizer, args.manifest, args.out, scale, args.hu_window, recon=args.recon,
                  batch_size=args.batch_size, device=device)
    return 0


def _encode_latents(args: argparse.Namespace) -> int:
    import torch

    from ctgen.jobs.latents import encode_latents

    low, high = args.hu_window
    if not low < high:
        raise UserError(f"--hu-window: LOW must be below HIGH, got {low:g} {high:g}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.encode_overlap is not None and args.encode_window is None:
        raise UserError("--encode-overlap needs --encode-window")
    encode_latents(args.autoencoder, args.manifest, args.out, args.hu_window, batch_size=args.batch_size, device=device,
                   encode_window=args.encode_window, encode_overlap=args.encode_overlap)
    return 0


def _embed_sections(args: argparse.Namespace) -> int:
    import yaml

    from ctgen.jobs.text import embed_sections

    encoder = yaml.safe_load(args.encoder)
    if not isinstance(encoder, dict):
        raise UserError(f"--encoder must be a YAML/JSON mapping such as '{{kind: hf, path: ...}}', not {args.encoder!r}")
    embed_sections(args.cohort, args.prompts, encoder, args.out)
    return 0


def _fit_text_tokenizer(args: argparse.Namespace) -> int:
    from ctgen.jobs.text import fit_text_tokenizer

    fit_text_tokenizer(args.prompts, args.column, args.out, args.vocab_size, splits=args.splits)
    return 0


def _embed_prompts(args: argparse.Namespace) -> int:
    import yaml

    from ctgen.jobs.text import embed_prompts

    encoder = yaml.safe_load(args.encoder)
    if not isinstance(encoder, dict):
        raise UserError(f"--encoder must be a YAML/JSON mapping such as '{{kind: minilm}}', not {args.encoder!r}")
    embed_prompts(args.prompts, args.column, encoder, args.out)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ctgen.jobs.compare import compare_runs

    table = compare_runs(args.run_a, args.run_b, args.out, n_permutations=args.permutations, seed=args.seed)
    sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


def _ceiling(args: argparse.Namespace) -> int:
    """cascade-ceiling and latent-ceiling: the classifier on each stage of a family, applied to the real scans."""
    from ctgen.jobs import ceiling

    for path in [args.prompts, *args.real, *([args.labels] if args.labels else [])]:
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist")
    common = (args.models, args.prompts, args.real, args.out, _settings(args.settings), args.device)
    if args.family == "cascade":
        out = ceiling.cascade_ceiling(*common, args.sr_steps, labels=args.labels)
    else:
        out = ceiling.latent_ceiling(*common, labels=args.labels)
    print(out[out["name"].str.endswith(".macro")][["stage", "value", "ci_low", "ci_high", "n"]].to_string(index=False))
    return 0


def _settings(value: str | None) -> dict:
    """--settings: a YAML/JSON mapping, or a file holding one (a whole config.yaml gives its `evaluation`)."""
    import yaml

    if value is None:
        return {}
    path = Path(value)
    text = path.read_text() if path.suffix in (".yaml", ".yml", ".json") and path.is_file() else value
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"--settings is not YAML/JSON: {err}") from None
    if isinstance(settings, dict) and isinstance(settings.get("evaluation"), dict):
        settings = settings["evaluation"]
    if not isinstance(settings, dict):
        raise UserError(f"--settings must be a mapping such as '{{bootstrap: 1000}}' or a YAML file, not {value!r}")
    return settings


def _evaluate(args: argparse.Namespace) -> int:
    from ctgen.jobs.evaluate import evaluate

    for flag, value in (("--generated", args.generated), ("--models", args.models), ("--reports", args.reports),
                        ("--labels", args.labels), ("--spec", args.spec), *(("--real", r) for r in args.real)):
        if value is not None and not Path(value).exists():
            raise UserError(f"{flag}: {value} does not exist")
    for value in args.tstr or ():
        if not (Path(value) / "config.json").is_file():
            raise UserError(f"--tstr: {value} holds no trained classifier (no config.json)")
    evaluate(args.generated, args.real, args.models, args.out, _settings(args.settings), reports=args.reports,
             labels=args.labels, device=args.device, tstr=tuple(args.tstr) if args.tstr else None, spec=args.spec)
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``ctgen`` parser; the pass-through commands appear in its help and parse their own arguments."""
    p = argparse.ArgumentParser(prog="ctgen", description="text-to-CT models: training, sampling and checks",
                                epilog=f"A mistake in the input ends with one line and status 2; "
                                       f"{DEBUG_ENV}=1 or --debug shows its traceback.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user mistake too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one model of the cascade (under torchrun for several processes)")
    t.add_argument("model", choices=tuple(NEEDS), help="which model: the cascade's tokenizer, generator, superres, "
                                                       "the latent flow family's autoencoder and latent_flow, the evaluation's clip, "
                                                       "classifier, slicenet, or the pretrained text encoder report_encoder")
    t.add_argument("--config", required=True, help="YAML/JSON with model, train, data sections (see ctgen/jobs/config.py)")
    t.add_argument("--out", required=True, help="folder for the final weights, metrics and summary")
    t.add_argument("--checkpoints", help="folder for resumable checkpoints (default: beside --out)")
    t.add_argument("--manifests", nargs="+", help="volume shard manifests (tokenizer, superres, clip, classifier)")
    t.add_argument("--tokens", nargs="+", help="token shard manifests of encode-tokens (generator)")
    t.add_argument("--latents", nargs="+", help="latent shard manifests of encode-latents (latent_flow)")
    t.add_argument("--text-cache", dest="text_cache", nargs="+",
                   help="cached frozen-encoder prompt states (latent_flow: one per encoder, in order)")
    t.add_argument("--text-tokenizer", dest="text_tokenizer", help="tokenizer JSON of the trainable text encoder")
    t.add_argument("--recon", nargs="+", help="token shard manifests with reconstructions, as super-resolution inputs")
    t.add_argument("--prompts", help="prompts.parquet (report_encoder: the structured prompt)")
    t.add_argument("--labels", help="labels.parquet of parse-reports (report_encoder: the parser's findings it learns)")
    t.add_argument("--cohort", help="cohort.parquet (report_encoder: the reports' findings and impression)")
    t.add_argument("--data-workers", dest="data_workers", type=int,
                   help="DataLoader worker processes reading the shards (default: the config's train.num_workers)")
    t.add_argument("--run-settings", dest="run_settings",
                   help="JSON of train fields that decide how the run works, not what it trains (log_every, "
                        "ckpt_every, tensorboard, stop_margin_s, ...), over the config's (the workflow passes them so)")
    t.set_defaults(func=_train)

    t = sub.add_parser("probe-latent-flow", help="the trained latent flow network's text-reliance probe: does it "
                                                 "read the report? (a JSON list of metric records)")
    t.add_argument("--config", required=True, help="the network's training config (as `ctgen train latent_flow`)")
    t.add_argument("--network", required=True, help="the trained flow network's folder")
    t.add_argument("--out", required=True, help="the probe's JSON file")
    t.add_argument("--latents", nargs="+", help="the latent shard manifests it trained on")
    t.add_argument("--probe-latents", dest="probe_latents", nargs="+",
                   help="held-out latent shard manifests (the evaluation split's), never trained on: scored beside "
                        "the training latents as text_reliance.heldout.*")
    t.add_argument("--text-cache", dest="text_cache", nargs="+",
                   help="its cached frozen-encoder section states (one per encoder, in order)")
    t.add_argument("--text-tokenizer", dest="text_tokenizer", help="tokenizer JSON of its trainable text encoder")
    t.add_argument("--run-settings", dest="run_settings",
                   help="JSON of the training's run-only train fields (device, ...), as `ctgen train` takes them")
    t.set_defaults(func=_probe_latent_flow, data_workers=None)

    e = sub.add_parser("encode-tokens", help="token shards (and reconstructions) of one chunk's volume shards")
    e.add_argument("--tokenizer", required=True, help="trained tokenizer folder")
    e.add_argument("--manifest", required=True, help="the volume shards' (chunk) manifest")
    e.add_argument("--out", required=True, help="output folder of the token shards and their manifest")
    e.add_argument("--recon", action="store_true", help="also store the tokenizer's reconstructions")
    e.add_argument("--batch-size", dest="batch_size", type=positive_int, default=2, help="volumes encoded at once")
    e.add_argument("--lowres-scale", dest="lowres_scale", type=positive_int,
                   help="in-plane factor between the shards' grid and the tokenizer's (default: the one the "
                        "tokenizer was trained with, from its config.json)")
    e.add_argument("--hu-window", dest="hu_window", type=float, nargs=2, required=True, metavar=("LOW", "HIGH"),
                   help="the prep preset's HU window (its clip), mapped to [-1, 1]")
    e.add_argument("--device", default=None, type=device_option, help="torch device (default: cuda when available, else cpu)")
    e.set_defaults(func=_encode_tokens)

    e = sub.add_parser("encode-latents", help="latent shards (posterior mean and std) of one chunk's volume shards")
    e.add_argument("--autoencoder", required=True, help="trained (or NVIDIA-loaded) autoencoder folder")
    e.add_argument("--manifest", required=True, help="the volume shards' (chunk) manifest")
    e.add_argument("--out", required=True, help="output folder of the latent shards and their manifest")
    e.add_argument("--batch-size", dest="batch_size", type=positive_int, default=1, help="volumes encoded at once")
    e.add_argument("--hu-window", dest="hu_window", type=float, nargs=2, required=True, metavar=("LOW", "HIGH"),
                   help="the prep preset's HU window (its clip), mapped to [-1, 1]")
    e.add_argument("--encode-window", dest="encode_window", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                   help="encode in sliding windows of this many voxels (default: the autoencoder's encode_window; "
                        "without one, whole volumes)")
    e.add_argument("--encode-overlap", dest="encode_overlap", type=float,
                   help="overlap of the encode windows (default: the autoencoder's encode_overlap, 0.25)")
    e.add_argument("--device", default=None, type=device_option, help="torch device (default: cuda when available, else cpu)")
    e.set_defaults(func=_encode_latents)

    f = sub.add_parser("fit-text-tokenizer", help="fit the small text encoder's tokenizer on the training prompts")
    f.add_argument("--prompts", required=True, help="prompts.parquet")
    f.add_argument("--column", required=True, nargs="+", help="prompt template name(s) whose texts it is fitted on")
    f.add_argument("--vocab-size", dest="vocab_size", type=positive_int, required=True,
                   help="vocabulary size (config.yaml: models.text_encoder.vocab_size)")
    f.add_argument("--out", required=True, help="the tokenizer JSON to write")
    f.add_argument("--splits", nargs="+", default=["train"], metavar="SPLIT",
                   help="the splits whose prompts it is fitted on, the models' training splits (config.yaml: "
                        "models.train_splits; default: train)")
    f.set_defaults(func=_fit_text_tokenizer)

    m = sub.add_parser("embed-prompts", help="cache a frozen text encoder's states for every prompt")
    m.add_argument("--prompts", required=True, help="prompts.parquet")
    m.add_argument("--column", required=True, help="prompt template name")
    m.add_argument("--encoder", required=True, help='encoder config as YAML/JSON, e.g. \'{kind: minilm, max_length: 128}\'')
    m.add_argument("--out", required=True, help="the .safetensors cache to write")
    m.set_defaults(func=_embed_prompts)

    m = sub.add_parser("embed-sections", help="cache a frozen text encoder's states of every report's sections")
    m.add_argument("--cohort", required=True, help="cohort.parquet (the reports' findings and impression)")
    m.add_argument("--prompts", required=True, help="prompts.parquet (the structured prompt, where present)")
    m.add_argument("--encoder", required=True, help="encoder config as YAML/JSON, e.g. '{kind: hf, path: /models/cxr-bert}'")
    m.add_argument("--out", required=True, help="the .safetensors cache to write (keys <sample>:<section>)")
    m.set_defaults(func=_embed_sections)

    v = sub.add_parser("evaluate", help="score predictions (a NIfTI folder or samples.csv) against ground truth, "
                                        "matched by stem")
    v.add_argument("--generated", required=True,
                   help="the predictions: a folder of NIfTI files in HU (any depth; stem = file name without .nii/.nii.gz) "
                        "or a sampling manifest (samples.csv)")
    v.add_argument("--real", required=True, nargs="+",
                   help="the ground truth: a folder of NIfTI files in HU, or shard manifests (.json)")
    v.add_argument("--models", required=True,
                   help="models folder with the feature networks: clip, classifier, slicenet, tstr_synthetic, tstr_real "
                        "(those present are used) and a generator spec (cascade.json or latent_flow.json: the grid)")
    v.add_argument("--spec", help="the generator spec whose grid (spacing, shape, HU window) the volumes are scored on; "
                                  "default: cascade.json, else latent_flow.json in --models")
    v.add_argument("--out", required=True, help="output folder: metrics.json, per_volume.csv, skipped.csv, hu_histograms.json")
    v.add_argument("--reports", help="report texts by stem (text lines, CSV or JSONL with id/VolumeName and prompt or "
                                     "report columns), for the CLIP score and retrieval; default: those in the shards")
    v.add_argument("--labels", help="CT-RATE-style label table (VolumeName + the 18 label columns), for faithfulness and "
                                    "TSTR; default: the labels in the shards")
    v.add_argument("--settings", help="scoring settings as YAML/JSON or a YAML file (config.yaml's evaluation keys: "
                                      "bootstrap, auroc_min_positives, slices_per_volume, ...); default: ctgen's defaults")
    v.add_argument("--tstr", nargs=2, metavar=("SYNTHETIC", "REAL"),
                   help="train on synthetic, test on real: the folders of the classifier trained on generated volumes and "
                        "of the one trained on as many real volumes; both are tested on the ground truth")
    v.add_argument("--device", default=None, type=device_option, help="torch device (default: cuda when available, else cpu)")
    v.set_defaults(func=_evaluate)

    for family, name, what, models_help in (
            ("cascade", "cascade-ceiling", "each cascade stage of the real scans (low-res, tokenizer reconstruction, "
             "super-resolution)", "models folder with cascade.json, the cascade and the classifier"),
            ("latent_flow", "latent-ceiling", "the real scans and their autoencoder reconstruction (the latent flow "
             "family's ceiling)", "models folder with autoencoder/, the classifier and a generator spec")):
        g = sub.add_parser(name, help=f"the classifier on {what}: where a finding is lost")
        g.add_argument("--models", required=True, help=models_help)
        g.add_argument("--prompts", required=True, help="the sampling prompts (samples/prompts.csv: id, prompt)")
        g.add_argument("--real", required=True, nargs="+", help="shard manifests of the real scans, with their labels")
        g.add_argument("--out", required=True, help="the table (CSV): stage, name, value, n, profile, flag, CI")
        g.add_argument("--labels", help="CT-RATE-style label table (VolumeName + the 18 labels); default: the shards' labels")
        g.add_argument("--settings", help="scoring settings as for evaluate (faithfulness_labels, bootstrap, guards)")
        if family == "cascade":
            g.add_argument("--sr-steps", type=positive_int, help="super-resolution sampler steps (default: the model's)")
        g.add_argument("--device", default=None, type=device_option, help="torch device (default: cuda when available, else cpu)")
        g.set_defaults(func=_ceiling, family=family)

    c = sub.add_parser("compare", help="paired permutation test of two runs' per_volume.csv, metric by metric")
    c.add_argument("run_a", help="per_volume.csv of run A (results/evaluation/<family>/per_volume.csv)")
    c.add_argument("run_b", help="per_volume.csv of run B")
    c.add_argument("--out", help="write the table here (CSV); it is printed either way")
    c.add_argument("--permutations", type=positive_int, default=10_000, help="random sign flips per metric")
    c.add_argument("--seed", type=seed_int, default=0, help="seed of the sign flips")
    c.set_defaults(func=_compare)

    for command, (_, _, text) in PASS_THROUGH.items():
        sub.add_parser(command, help=text, add_help=False)
    return p


# Commands with their own argument parsers, handed the rest of the command line.
PASS_THROUGH = {
    "sample": ("ctgen.jobs.sample", "sample_main", "report text -> synthetic CT (NIfTI, DICOM); ctgen sample --help"),
    "verify-shards": ("ctgen.data.shards", "verify_shards_main", "re-hash shards against their manifests, count samples"),
    "vlm3d-score": ("ctgen.jobs.vlm3d", "vlm3d_score_main",
                    "score generated CTs with the VLM3D 2026 protocols (local weights); ctgen vlm3d-score --help"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags, rest = split_global_flags(argv, {"--debug"})
    if rest and rest[0] in PASS_THROUGH:
        module, name, _ = PASS_THROUGH[rest[0]]
        command = getattr(importlib.import_module(module), name)
        return run_reporting_errors("ctgen", lambda: command(rest[1:]), "--debug" in flags)
    args = parser().parse_args(argv)
    return run_reporting_errors("ctgen", lambda: args.func(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
