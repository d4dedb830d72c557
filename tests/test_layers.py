"""The import rules of ARCHITECTURE.md: layers point one way and no module imports itself back.

Every import counts, also those inside functions (they run too, only later)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_packaging import top_level_packages

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(top_level_packages())  # what pyproject.toml installs

# Lowest first; a module may import its own layer (without cycles) and the layers below it.
LAYERS = [
    ("fpkernels", ("fpkernels",)),
    ("base", ("finephys", "finephys.errors", "finephys.files", "finephys.precision")),
    ("model and pose I/O", ("finephys.model", "finephys.poses")),
    ("sampler", ("finephys.sampler",)),
    ("training and export", ("finephys.training", "export")),
    ("backends and tools", ("engine", "engine.backends", "engine.fast_unet", "engine.precompile", "engine.load", "engine.distributed",
                            "engine.video", "engine.outputs", "engine.detect", "engine.check", "engine.eval_video")),
    ("CLI and serve", ("engine.cli", "engine.serve", "engine.__main__")),
]


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import submodule`` names the submodule)."""
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in files]
                targets.update(subs or [mod])
        graph[name] = {t for t in targets if t.split(".")[0] in PACKAGES and t != name}
    return graph


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py (add it where it belongs)")
    return rank


def upward_imports(graph) -> list[str]:
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if layer_of(b) > layer_of(a):
                bad.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")
    return bad


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_files())


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_layer_imports_a_higher_one(graph):
    assert upward_imports(graph) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_checks_catch_what_they_are_for():
    """The rules themselves: a planted upward import and a planted cycle are reported."""
    planted = {"finephys.sampler.loop": {"engine.cli.app"}, "engine.cli.app": set()}
    assert upward_imports(planted) == [
        "finephys.sampler.loop (sampler) imports engine.cli.app (CLI and serve)"]
    ring = {"export.build": {"export.manifest"}, "export.manifest": {"export.contract"},
            "export.contract": {"export.build"}}
    assert cycles(ring) == [["export.build", "export.contract", "export.manifest"]]
