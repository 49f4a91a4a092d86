"""The house rules a parser can check: no import cycles under engine/, a headless engine, one
builder of the library configs, and packages that import only what docs/architecture.md allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every engine module ``path`` imports, at module level or inside a function (a lazy import is still a
    dependency). ``from engine.x import y`` counts y when it is a module, else engine.x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = engine_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = imports_of(path, name, known)
        # Importing engine.a.b also runs engine.a's __init__, unless the importer lives inside engine.a.
        for target in list(edges):
            parent = target.rpartition(".")[0]
            while parent and parent != "engine":
                if parent in known and parent != name and not name.startswith(parent + "."):
                    edges.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_engine_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and "engine.training.worker" in graph
    assert "engine.config" in graph["engine.training.worker"]  # the parser sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_engine_never_imports_gradio():
    offenders = [str(p.relative_to(ROOT)) for p in ENGINE.rglob("*.py")
                 if re.search(r"^\s*(import gradio|from gradio)", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []


def test_one_module_builds_each_library_config():
    sources = [p for folder in ("engine", "ui", "bench") for p in (ROOT / folder).rglob("*.py")] + [ROOT / "app.py"]
    for call in ("LoraConfig(", "BitsAndBytesConfig(", "SFTConfig(", "TrainingArguments("):
        builders = sorted({str(p.relative_to(ROOT)) for p in sources
                           if re.search(rf"(?<![\w`]){re.escape(call)}", p.read_text(encoding="utf-8"))})
        assert builders in ([], ["engine/config/build.py"]), f"{call} built in {builders}"


def test_packages_import_only_what_the_architecture_allows():
    """docs/architecture.md's table: the shared small modules and config are below everything else."""
    allowed = {
        "engine.errors": set(), "engine.names": {"engine.errors"},
        "engine.config": {"engine.errors", "engine.names", "engine.data", "engine.evals"},
        # The metric registry is read by the config schema, so evals stays a leaf above errors only.
        "engine.evals": {"engine.errors"},
        "engine.limits": {"engine.errors"},
        "engine.data": {"engine.errors", "engine.hub", "engine.demo", "engine.names", "engine.limits"},
        "engine.memory": {"engine.errors", "engine.config", "engine.hub", "engine.demo", "engine.data"},
    }
    graph = import_graph()
    for name, edges in graph.items():
        for owner, may in allowed.items():
            if name == owner or name.startswith(owner + "."):
                outside = {e for e in edges if not (e == owner or e.startswith(owner + "."))}
                tops = {e if e.count(".") < 2 else ".".join(e.split(".")[:2]) for e in outside} - {"engine"}
                assert tops <= may, f"{name} imports {sorted(tops - may)}"
