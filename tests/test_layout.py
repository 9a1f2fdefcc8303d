"""The package layout the design card fixes: every stage package imports on its own, no module imports itself back
through others (lazy imports inside functions included), data flows one way, and the stages never import the
orchestration, telemetry or CLI that wrap them."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "pipeline"
STAGES = ["corpus", "extract", "store", "sae", "train", "eval"]
WRAPPERS = ["orchestrate", "telemetry", "cli"]
# corpus -> extract -> store -> train -> analysis; sae and eval are libraries the later stages use.
NEVER_IMPORTS = {
    "corpus": ["extract", "store", "sae", "train", "eval", "analysis"],
    "store": ["extract", "sae", "train", "eval", "analysis"],
    "sae": ["store", "extract", "train", "eval", "analysis"],
    "eval": ["train", "extract", "analysis"],
    "extract": ["train", "sae", "eval", "analysis"],
    "train": ["extract", "analysis"],
    "io": ["corpus", "extract", "store", "sae", "train", "eval", "analysis", "config"],
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every pipeline module `name` imports, anywhere in its file (module level, functions, TYPE_CHECKING blocks)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:  # `import pipeline.x.y` names a module; a name inside one
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere_in_the_package():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_never_import_what_wraps_them_and_data_flows_one_way():
    edges = graph()
    problems = []
    for module, targets in edges.items():
        parts = module.split(".")
        if len(parts) < 2:
            continue
        sub = parts[1]
        forbidden = list(NEVER_IMPORTS.get(sub, []))
        if sub in STAGES:
            forbidden += WRAPPERS
        for target in targets:
            tparts = target.split(".")
            if len(tparts) > 1 and tparts[1] in forbidden:
                problems.append(f"{module} imports {target}")
    assert problems == []


@pytest.mark.parametrize("package", [*STAGES, "io", "config", "cli"])
def test_each_package_imports_on_its_own(package):
    run = subprocess.run([sys.executable, "-c", f"import pipeline.{package}"], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert run.returncode == 0, run.stderr


def test_test_fixtures_and_the_sample_builder_are_not_in_the_runtime_package():
    names = set(modules())
    assert not any(n.endswith((".synthetic", ".build_sample")) for n in names)
    assert not any("crash_point" in p.read_text() or "SAEPIPE_CRASH_AT" in p.read_text() for p in PACKAGE.rglob("*.py"))
