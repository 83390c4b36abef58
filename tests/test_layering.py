"""Imports point one way: server → scheduler → model; no web stack below server, and server
reaches model/ only through scheduler/ (so never torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package → top-level modules it must never import (TYPE_CHECKING imports count too)
FORBIDDEN = {
    "model": {"scheduler", "server", "fastapi", "pydantic", "prometheus_client", "starlette"},
    "scheduler": {
        "server",
        "fastapi",
        "pydantic",
        "prometheus_client",
        "starlette",
        "uvicorn",
        "sse_starlette",
    },
    "server": {"torch", "model"},
}


def imported_modules(source: str, package: str) -> set[str]:
    """Top-level names of every module a source file imports (relative imports → its package)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add(package)
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def wrong_way_edges(package: str, files: dict[str, str]) -> list[str]:
    return [
        f"{name} imports {mod}"
        for name, source in files.items()
        for mod in sorted(imported_modules(source, package) & FORBIDDEN[package])
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_wrong_way_imports(package: str) -> None:
    files = {
        str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / package).rglob("*.py"))
    }
    assert files, f"no sources found under {package}/"
    assert wrong_way_edges(package, files) == []


@pytest.mark.timeout(10)
def test_checker_catches_wrong_edges() -> None:
    """The walker itself: every import form is seen, including ones under TYPE_CHECKING."""
    src = (
        "import os\nimport torch.nn as nn\nfrom scheduler.outputs import RequestOutput\n"
        "if TYPE_CHECKING:\n    from server import app\nfrom . import sibling\n"
    )
    assert imported_modules(src, "model") == {"os", "torch", "scheduler", "server", "model"}
    assert wrong_way_edges("model", {"m.py": src}) == [
        "m.py imports scheduler",
        "m.py imports server",
    ]
    assert wrong_way_edges("server", {"s.py": src}) == ["s.py imports torch"]
    direct = (
        "from model.sampling_params import SamplingParams\nfrom scheduler import TokenLogprob\n"
    )
    assert wrong_way_edges("server", {"s.py": direct}) == ["s.py imports model"]
    assert wrong_way_edges("scheduler", {"c.py": "import fastapi\nfrom pydantic import X"}) == [
        "c.py imports fastapi",
        "c.py imports pydantic",
    ]


@pytest.mark.timeout(60)
def test_server_modules_load_without_torch() -> None:
    """The HTTP layer itself (app, protocol, CLI) and the scheduler surface it imports at load
    time (contract types, errors, config, outputs) run without importing torch."""
    code = (
        "import sys\n"
        "import server.app, server.cli, server.protocol, server.sse, server.auth, server.errors\n"
        "import scheduler, scheduler.errors, scheduler.config, scheduler.outputs\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every project module → the project modules it imports, at any depth of the file
    (an import inside a function is still an edge: that is how cycles hide)."""
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for package in FORBIDDEN
        for p in (root / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None; depth-first with colours."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.timeout(30)
def test_no_import_cycles() -> None:
    """model/runner.py (one rank), model/worker.py (the other ranks' loop) and model/executor.py
    (the ranks) import one way; no module reaches itself, even through a function-level import."""
    graph = module_graph()
    assert {"model.runner", "model.worker", "model.executor"} <= set(graph)
    assert "model.executor" in graph["scheduler.engine"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
