"""The conda environments and pyproject's dependency lists against what the code imports.

Nothing here builds an environment (no conda channel is reachable from CI); it checks the lists a
build would use: each rule names an env file that exists, each package's third-party imports are
declared in pyproject.toml (core for ctprep, core + `models` for ctgen), and each env file holds
every distribution its rules' package needs, so `pip install ..` inside it adds nothing else
(in the prep env: no torch).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
#: conda-forge package -> the Python distribution it installs, where the names differ
CONDA_TO_DIST = {"pytorch": "torch", "python-isal": "isal", "matplotlib-base": "matplotlib"}
#: distributions ctgen needs that no import statement names: torch.utils.tensorboard imports tensorboard
IMPLICIT = {"tensorboard"}
#: optional extras beside `models`: code importing them names the extra when it is missing (ctprep.errors.MissingExtra)
OPTIONAL_EXTRAS = ("minilm",)
#: dependencies whose next major version is known to break us: capped in pyproject and in every env file
CAPPED = {"numpy", "pandas", "webdataset", "transformers", "diffusers"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _third_party_imports(*roots: str) -> set[str]:
    """Top-level modules imported anywhere under ``roots`` that are neither stdlib nor ours."""
    found = set()
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("ctprep", "ctgen", "__future__")}


def _dists_of(modules: set[str]) -> set[str]:
    mapping = packages_distributions()
    missing = sorted(m for m in modules if m not in mapping)
    assert not missing, f"imported but not installed in the test environment: {missing}"
    return {_norm(mapping[m][0]) for m in modules}


def _env(name: str) -> tuple[set[str], list[str]]:
    """(distributions an env file installs, its local pip installs such as `..[models]`)."""
    spec = yaml.safe_load((REPO / "envs" / name).read_text())
    dists, local = set(), []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for req in dep["pip"]:
                (local.append(req) if req.startswith(".") else dists.add(_requirement_name(req)))
        else:
            conda = re.split(r"[<>=! ]", dep, maxsplit=1)[0]
            dists.add(_norm(CONDA_TO_DIST.get(conda, conda)))
    return dists, local


def test_every_rule_names_an_existing_conda_env():
    named = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        for env in re.findall(r"conda:\s*\n\s*\"([^\"]+)\"", smk.read_text()):
            named.setdefault((smk.parent / env).resolve(), []).append(smk.name)
    assert {p.name for p in named} == {"prep.yaml", "train.yaml"}
    assert all(p.is_file() for p in named)


def test_pyproject_declares_what_each_package_imports():
    core = {_requirement_name(r) for r in _pyproject()["dependencies"]}
    models = {_requirement_name(r) for r in _pyproject()["optional-dependencies"]["models"]}
    ctprep = _dists_of(_third_party_imports("ctprep"))
    assert ctprep <= core, f"ctprep imports undeclared distributions: {sorted(ctprep - core)}"
    assert "torch" not in core, "torch belongs to the `models` extra: the prep environment must not pull it"
    optional = {_requirement_name(r) for x in OPTIONAL_EXTRAS for r in _pyproject()["optional-dependencies"][x]}
    assert not optional & models, "an optional extra's package is in `models` as well"
    ctgen = _dists_of(_third_party_imports("ctgen", "workflow/scripts")) | IMPLICIT
    declared = core | models | optional
    assert ctgen <= declared, f"ctgen imports undeclared distributions: {sorted(ctgen - declared)}"


def _specs(reqs) -> dict[str, str]:
    return {_requirement_name(r): re.sub(r"\s+", "", r) for r in reqs}


def test_known_breaking_majors_are_capped_alike_everywhere():
    project = _pyproject()
    specs = _specs(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs.update(_specs(extra))
    for name in sorted(CAPPED):
        assert re.search(r"<\d", specs[name]), f"{name} has no upper bound in pyproject.toml: {specs[name]}"
    for env in ("prep.yaml", "train.yaml"):
        spec = yaml.safe_load((REPO / "envs" / env).read_text())
        entries = [d for d in spec["dependencies"] if isinstance(d, str)]
        entries += [r for d in spec["dependencies"] if isinstance(d, dict) for r in d["pip"] if not r.startswith(".")]
        for entry in entries:
            name = _requirement_name(CONDA_TO_DIST.get(re.split(r"[<>=! ]", entry, maxsplit=1)[0], entry))
            if name in CAPPED:
                assert re.sub(r"\s+", "", entry).lower() == specs[name].lower(), \
                    f"{env}: {entry} differs from pyproject's {specs[name]}"


@pytest.mark.parametrize("env, extras", [("prep.yaml", []), ("train.yaml", ["models", "minilm"])])
def test_env_files_hold_every_distribution_their_rules_need(env, extras):
    dists, local = _env(env)
    project = _pyproject()
    need = {_requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        need |= {_requirement_name(r) for r in project["optional-dependencies"][extra]}
    assert need <= dists, f"{env} lacks {sorted(need - dists)} (pip would pull them unpinned from PyPI)"
    suffix = f"[{','.join(extras)}]" if extras else ""
    assert [req.split("#")[0].strip() for req in local] == [f"..{suffix}"]
    if not extras:
        assert "torch" not in dists
