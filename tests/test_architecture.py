"""The import contract of docs/architecture.md, read from the source (module- and
function-level imports alike):

* packages are stages in pipeline order, and no stage imports a later one;
* no import cycles between modules (the one documented exception: a node's ``__str__`` calls
  the printer, which dispatches on the node classes — both inside ``patternc.ir``);
* torch is imported only where execution starts (``execute``, ``nn``, the integrations);
* the test oracle ``patternc.reference`` is imported by no product module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "patternc"

# stage of each top-level part, in the order data flows (docs/architecture.md)
STAGES = [
    ("errors", "fileio"),
    ("ir",),
    ("lang",),
    ("lower",),
    ("source",),
    ("execute",),
    ("compiler",),
    ("analysis",),
    ("show", "nn", "transformers", "distributed"),
    ("cli", "__main__"),
]
RANK = {name: k for k, names in enumerate(STAGES) for name in names}
TORCH_OK = {"execute", "nn", "transformers", "distributed"}
TORCH_OK_MODULES = {"patternc.cli.run"}  # `patternc run` is an execution entry point (tensors from --input)
ALLOWED_CYCLES = [{"patternc.ir.nodes", "patternc.ir.printer"}]
ORACLE = "patternc.reference"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_pkg(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its body (patternc modules, plus 'torch')."""
    tree = ast.parse(MODULES[name].read_text())
    base = name.split(".") if _is_pkg(name) else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            out.update(subs)
            if len(subs) < len(node.names):  # names defined in the module (not submodules of a package)
                out.add(mod)
    resolved = set()
    for m in out:
        if m == "torch" or m.startswith("torch."):
            resolved.add("torch")
        elif m in MODULES:
            resolved.add(m)
    resolved.discard(name)
    return resolved


def _part(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for m in MODULES:
        g.add_node(m)
        for t in _imports(m):
            g.add_edge(m, t)
    return g


def test_every_module_has_a_stage():
    missing = sorted({_part(m) for m in MODULES if _part(m) and _part(m) not in RANK and m != ORACLE})
    assert missing == [], f"add these to STAGES and docs/architecture.md: {missing}"


def test_no_import_cycles():
    g = _graph()
    g.remove_node("torch") if "torch" in g else None
    g.remove_node("patternc")  # the lazy root face: imported for __version__ only, by late stages
    cycles = [set(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert [c for c in cycles if c not in ALLOWED_CYCLES] == []


def test_no_stage_imports_a_later_stage():
    bad = []
    for m in MODULES:
        src = _part(m)
        if src is None or m == ORACLE:
            continue
        for t in _imports(m):
            if t == "torch":
                continue
            dst = _part(t)
            if t == "patternc":
                if RANK[src] < RANK["compiler"]:
                    bad.append((m, t))
                continue
            if dst == "reference":
                bad.append((m, t))  # the oracle is for tests
                continue
            if RANK[dst] > RANK[src]:
                bad.append((m, t))
    assert bad == []


def test_torch_only_where_execution_starts():
    bad = [m for m in MODULES if "torch" in _imports(m) and _part(m) not in TORCH_OK and m not in TORCH_OK_MODULES]
    assert bad == []


def test_the_ir_is_standard_library_only():
    third_party = {"numpy", "torch", "lark", "networkx", "matplotlib"}
    bad = []
    for m in MODULES:
        if _part(m) != "ir":
            continue
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [(m, n) for n in names if n.split(".")[0] in third_party]
    assert bad == []
