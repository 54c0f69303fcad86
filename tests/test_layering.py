"""The packages' layering, read from the source with ``ast``: no import loops, no reaching into private names.

Every import counts, also those inside functions (a deferred import hides a loop from Python, not
from a reader). Rules: ``ctprep`` never imports ``ctgen``; neither package imports ``snakemake``; the
module graph of each package is acyclic; no module imports another module's ``_private`` name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ctprep", "ctgen")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import statement of ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for n in ast.walk(block)}  # imports for annotations only never run
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in known else (base, alias.name))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        own_packages = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        for mod, _ in imports(path, known):
            # importing a.b.c runs a/__init__ and a.b/__init__ too, except the packages this module is
            # inside (they are already initialising when it runs)
            parts = mod.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()
        edges[name] = targets - {name} - own_packages
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_no_import_loops():
    edges = graph()
    assert len(edges) > 50  # the walk found the packages
    assert cycles(edges) == []


def test_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers():
    known = modules()
    for name, path in known.items():
        targets = {mod for mod, _ in imports(path, known)}
        assert not any(t.split(".")[0] == "snakemake" for t in targets), f"{name} imports snakemake"
        if name.startswith("ctprep"):
            assert not any(t.split(".")[0] == "ctgen" for t in targets), f"{name} imports ctgen"


def private_attribute_uses(path: Path, known: dict[str, Path]) -> list[str]:
    """``mod._name`` where ``mod`` is a name bound to another project module by an import."""
    tree = ast.parse(path.read_text())
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update({(a.asname or a.name): a.name for a in node.names if a.name in known})
        elif isinstance(node, ast.ImportFrom) and node.module:
            bound.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names
                          if f"{node.module}.{a.name}" in known})
    return [f"{bound[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def test_private_attribute_finder(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from ctgen.data import batches\nbatches._hidden(1)\nbatches.public(2)\n")
    assert private_attribute_uses(path, {"ctgen.data.batches": path}) == ["ctgen.data.batches._hidden"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_modules(package):
    known = modules()
    bad = []
    for name, path in known.items():
        if not name.startswith(package):
            continue
        for mod, attr in imports(path, known):
            if mod.split(".")[0] in PACKAGES and mod != name and (attr or mod.rpartition(".")[2]).startswith("_") \
                    and (attr or mod.rpartition(".")[2]) != "__version__":
                bad.append(f"{name} imports {mod}{'.' + attr if attr else ''}")
        bad += [f"{name} uses {use}" for use in private_attribute_uses(path, known)]
    assert bad == []
