"""What the workflow's rules do with ``config.yaml`` at load: checks that name a mistake in one line before any job
runs, and the form of their params.

Snakemake reruns a job whose params changed, comparing them by ``repr()``: :func:`canonical` turns every dict of
the config into a :class:`Settings`, whose repr lists its keys sorted, so that the same settings in another key
order (a YAML tool that sorts keys, a hand edit) rerun nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Settings(dict):
    """A dict whose repr lists its keys sorted; iteration keeps their order, and a job that gets it pickled (a
    script rule) gets a plain dict."""

    def __repr__(self) -> str:
        items = sorted(self.items(), key=lambda kv: repr(kv[0]))
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in items) + "}"

    def __reduce__(self):
        return dict, (list(self.items()),)


def canonical(value: Any) -> Any:
    """``value`` with every dict, however deep, a :class:`Settings`."""
    if isinstance(value, dict):
        return Settings((k, canonical(v)) for k, v in value.items())
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def number_hint(instance: Any, types: Any) -> str:
    """What to write instead of a number the schema got as text (PyYAML reads ``2e-3``, without a dot, as a
    string): "" where ``instance`` is no such number. ``types``: the schema's ``type`` (a name or a list)."""
    if not isinstance(instance, str) or types is None:
        return ""
    wants = types if isinstance(types, list) else [types]
    try:
        number = float(instance)
    except ValueError:
        return ""
    if "number" in wants:
        return f" (YAML reads {instance} as text: write {number!r})"
    if "integer" in wants and number.is_integer():
        return f" (write {int(number)}, without quotes)"
    return ""


def check_local_files(config: dict) -> None:
    """The local weights the workflow's jobs load exist (a missing InceptionV3 file failed in the evaluation,
    after every training and sampling job); ValueError naming the key."""
    name = config["models"]["preset"]
    paths = {
        "evaluation.inception_weights": config["evaluation"].get("inception_weights"),
        f"model_presets.{name}.autoencoder.maisi_checkpoint":
            (config["model_presets"][name].get("autoencoder") or {}).get("maisi_checkpoint"),
    }
    encoders = [("models.text_encoder", config["models"]["text_encoder"])]
    encoders += [(f"models.latent_flow_text_encoders[{i}]", e)
                 for i, e in enumerate(config["models"].get("latent_flow_text_encoders") or [])]
    paths.update({f"{key}.path": enc.get("path") for key, enc in encoders
                  if enc.get("kind") in ("hf", "report_encoder")})
    for key, path in paths.items():
        if path and not Path(path).expanduser().exists():
            raise ValueError(f"{key}: {path} does not exist (local files only: nothing is downloaded)")


def local_files(path: str | None) -> list[str]:
    """The files of a local weights path (the file, or every file under the folder but hidden ones, through symlinked
    subfolders), as a job's inputs: weights replaced at the same path rerun the jobs that load them (the path in their
    params is the same). Absolute: a relative path into the results folder (an encoder an earlier run trained) would
    name a rule's output, and Snakemake would plan that rule to make it.
    """
    if not path:
        return []
    root = Path(os.path.abspath(Path(path).expanduser()))
    if not root.is_dir():
        return [str(root)]
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files if not f.startswith(".")]
    return sorted(f for f in found if os.path.isfile(f))


def check_splits(config: dict) -> None:
    """Every split a stage reads is one the cohort takes (Snakemake's missing-input listing said it in 25 lines);
    ValueError naming the key."""
    taken = config["dataset"]["splits"]
    used = {"models.train_splits": config["models"]["train_splits"], "sampling.split": [config["sampling"]["split"]],
            "evaluation.split": [config["evaluation"]["split"]]}
    for key, splits in used.items():
        missing = [s for s in splits if s not in taken]
        if missing:
            raise ValueError(f"{key} reads {missing}, which dataset.splits {taken} leaves out")


def dag_filtered(argv: list[str], parser: Callable[[], Any]) -> bool:
    """Whether a snakemake command line holds ``--until`` or ``--omit-from`` (``-U``/``-O``, ``=``, argparse's
    abbreviations, short options run together as in ``-nU``). The cohort is a plain rule then, not a checkpoint
    (workflow/rules/cohort.smk says why); the command line is read because Snakemake sets its DAG settings only
    after it has read the Snakefile. Snakemake's own argument parser decides (``parser()``, from the workflow:
    this package imports no Snakemake; it knows which options take a value); it is built (~0.5 s) only where an
    argument could be one of the two."""
    maybe = [a for a in argv if a.startswith("-") and ((not a.startswith("--") and ("U" in a or "O" in a))
                                                       or a.startswith(("--u", "--o")))]
    if not maybe:
        return False
    try:
        parsed, _ = parser().parse_known_args(argv)
    except SystemExit:  # a command line snakemake itself refuses: it says so when it parses it
        return False
    return bool(getattr(parsed, "until", None) or getattr(parsed, "omit_from", None))
