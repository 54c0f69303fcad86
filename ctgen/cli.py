"""``ctgen`` command line: training, the steps between the models, and shard checks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from ctgen.jobs.config import load_config
    from ctgen.jobs.train import run_training

    cfg = load_config(args.config)
    for key in ("manifests", "tokens", "text_cache", "text_tokenizer", "recon"):
        value = getattr(args, key, None)
        if value:
            cfg["data"][key] = value
    if args.data_workers is not None:
        cfg["train"]["num_workers"] = args.data_workers
    run_training(args.model, cfg, args.out, args.checkpoints or Path(args.out).parent / "checkpoints" / args.model)
    return 0


def _encode_tokens(args: argparse.Namespace) -> int:
    import torch

    from ctgen.jobs.tokens import encode_tokens

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encode_tokens(args.tokenizer, args.manifest, args.out, args.lowres_scale, args.hu_window, recon=args.recon,
                  batch_size=args.batch_size, device=device)
    return 0


def _fit_text_tokenizer(args: argparse.Namespace) -> int:
    from ctgen.jobs.text import fit_text_tokenizer

    fit_text_tokenizer(args.prompts, args.column, args.out, args.vocab_size)
    return 0


def _embed_prompts(args: argparse.Namespace) -> int:
    import yaml

    from ctgen.jobs.text import embed_prompts

    embed_prompts(args.prompts, args.column, yaml.safe_load(args.encoder), args.out)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ctgen.jobs.evaluate import compare_runs

    table = compare_runs(args.run_a, args.run_b, args.out, n_permutations=args.permutations, seed=args.seed)
    sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctgen", description="text-to-CT models: training, sampling and checks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model of the cascade (under torchrun for several processes)")
    t.add_argument("model", choices=("tokenizer", "generator", "superres", "clip", "classifier"))
    t.add_argument("--config", required=True, help="YAML/JSON with model, train, data sections (see ctgen/jobs/config.py)")
    t.add_argument("--out", required=True, help="folder for the final weights, metrics and summary")
    t.add_argument("--checkpoints", help="folder for resumable checkpoints (default: beside --out)")
    t.add_argument("--manifests", nargs="+", help="volume shard manifests (tokenizer, superres, clip, classifier)")
    t.add_argument("--tokens", nargs="+", help="token shard manifests of encode-tokens (generator)")
    t.add_argument("--text-cache", dest="text_cache", help="cached frozen-encoder prompt states")
    t.add_argument("--text-tokenizer", dest="text_tokenizer", help="tokenizer JSON of the trainable text encoder")
    t.add_argument("--recon", nargs="+", help="token shard manifests with reconstructions, as super-resolution inputs")
    t.add_argument("--data-workers", dest="data_workers", type=int,
                   help="DataLoader worker processes reading the shards (default: the config's train.num_workers)")
    t.set_defaults(func=_train)

    e = sub.add_parser("encode-tokens", help="token shards (and reconstructions) of one chunk's volume shards")
    e.add_argument("--tokenizer", required=True, help="trained tokenizer folder")
    e.add_argument("--manifest", required=True, help="the volume shards' (chunk) manifest")
    e.add_argument("--out", required=True, help="output folder of the token shards and their manifest")
    e.add_argument("--recon", action="store_true", help="also store the tokenizer's reconstructions")
    e.add_argument("--batch-size", dest="batch_size", type=int, default=2, help="volumes encoded at once")
    e.add_argument("--lowres-scale", dest="lowres_scale", type=int, default=1)
    e.add_argument("--hu-window", dest="hu_window", type=float, nargs=2, required=True, metavar=("LOW", "HIGH"),
                   help="the prep preset's HU window (its clip), mapped to [-1, 1]")
    e.add_argument("--device", default=None, help="cuda when available, else cpu")
    e.set_defaults(func=_encode_tokens)

    f = sub.add_parser("fit-text-tokenizer", help="fit the small text encoder's tokenizer on the training prompts")
    f.add_argument("--prompts", required=True, help="prompts.parquet")
    f.add_argument("--column", required=True, help="prompt template name")
    f.add_argument("--vocab-size", dest="vocab_size", type=int, default=2000)
    f.add_argument("--out", required=True)
    f.set_defaults(func=_fit_text_tokenizer)

    m = sub.add_parser("embed-prompts", help="cache a frozen text encoder's states for every prompt")
    m.add_argument("--prompts", required=True, help="prompts.parquet")
    m.add_argument("--column", required=True)
    m.add_argument("--encoder", required=True, help='encoder config as YAML/JSON, e.g. \'{kind: minilm, max_length: 128}\'')
    m.add_argument("--out", required=True)
    m.set_defaults(func=_embed_prompts)

    c = sub.add_parser("compare", help="paired permutation test of two runs' per_volume.csv, metric by metric")
    c.add_argument("run_a", help="per_volume.csv of run A (results/evaluation/per_volume.csv)")
    c.add_argument("run_b", help="per_volume.csv of run B")
    c.add_argument("--out", help="write the table here (CSV); it is printed either way")
    c.add_argument("--permutations", type=int, default=10_000)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_compare)

    for command, (_, _, text) in PASS_THROUGH.items():
        sub.add_parser(command, help=text, add_help=False)
    return p


# Commands with their own argument parsers, handed the rest of the command line.
PASS_THROUGH = {
    "sample": ("ctgen.jobs.sample", "sample_main", "report text -> synthetic CT (NIfTI, DICOM); ctgen sample --help"),
    "verify-shards": ("ctgen.data.shards", "verify_shards_main", "re-hash shards against their manifests, count samples"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in PASS_THROUGH:
        module, name, _ = PASS_THROUGH[argv[0]]
        return getattr(__import__(module, fromlist=[name]), name)(argv[1:])
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
