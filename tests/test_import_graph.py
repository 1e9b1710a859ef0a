"""The package's imports flow one way, and nowhere in a circle (STYLE.md, "Layout").

Every ``import`` / ``from ... import`` statement under ``egm/`` is read with ``ast`` -- those
inside functions too, since a function-local import is the usual way to hide a cycle -- and
resolved to the egm module it names. Each module belongs to a layer; an import from a higher
layer into a lower one fails, as does any cycle (modules of one layer may import each other,
but never round in a circle). A module that no layer claims fails too: a new module must say
where it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "egm"

# Lowest first. A module may import its own layer (acyclically) and any layer below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("egm", "egm.boxes", "egm.answers", "egm.geometry", "egm.errors")),
    ("records", ("egm.scoring", "egm.reward", "egm.optim", "egm.config_checks", "egm.strategies", "egm.compat",
                 "egm.timing")),
    ("data+models", ("egm.data", "egm.models")),
    ("generation", ("egm.generation",)),
    ("validation", ("egm.validation",)),
    ("sft+rl", ("egm.sft", "egm.rl")),
    ("eval+callbacks", ("egm.eval", "egm.callbacks")),
    ("curation", ("egm.curation",)),
    ("commands", ("egm.cli",)),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the longest prefix that claims ``module``."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            within = module == p or (module.startswith(p + ".") and p != "egm")  # the root claims itself only
            if within and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """egm modules imported anywhere in ``path`` (function bodies included)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from egm.data import manifest` names the module egm.data.manifest
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import egm.data.manifest.x` -> egm.data.manifest
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {m: imports_of(p, modules, root) for m, p in files.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Unplaced modules, imports from a higher layer into a lower one, and cycles."""
    out = [f"{m}: in no layer (add it to LAYERS)" for m in sorted(graph) if layer_of(m) is None]
    for m in sorted(graph):
        lm = layer_of(m)
        for dep in sorted(graph[m]):
            ld = layer_of(dep)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {dep} ({LAYERS[ld][0]}): a higher layer")
    # package __init__ re-exports make `egm.x -> egm.x.y` edges; the parent-child edge is not a cycle
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    out += [f"cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_egm_imports_flow_one_way_without_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "egm.rl.module" in graph
    assert violations(graph) == []


def test_a_planted_back_edge_and_a_cycle_are_caught(tmp_path):
    """The checker itself: a base module importing the GRPO module, and a two-module circle
    hidden in function bodies, are both reported."""
    pkg = tmp_path / "egm"
    (pkg / "rl").mkdir(parents=True)
    (pkg / "data").mkdir()
    for f in ("__init__.py", "rl/__init__.py", "data/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "boxes.py").write_text("def f():\n    from egm.rl.module import GRPOModule\n")
    (pkg / "rl" / "module.py").write_text("import egm.boxes\n")
    (pkg / "data" / "a.py").write_text("def g():\n    from . import b\n")
    (pkg / "data" / "b.py").write_text("def h():\n    import egm.data.a\n")
    found = violations(import_graph(pkg))
    assert "egm.boxes (base) imports egm.rl.module (sft+rl): a higher layer" in found
    assert "cycle: egm.boxes -> egm.rl.module -> egm.boxes" in found
    assert "cycle: egm.data.a -> egm.data.b -> egm.data.a" in found
    (pkg / "stray.py").write_text("")
    assert "egm.stray: in no layer (add it to LAYERS)" in violations(import_graph(pkg))
