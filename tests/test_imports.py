"""The package's import graph, read from the source (imports inside functions included): layers only
point down, there is no circle, and nothing below the CLI imports it."""

from __future__ import annotations

import ast
import concurrent.futures
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "retrocli"

# Lower rank = lower layer. A module may import its own rank or below, never above.
LAYERS = [
    ["retrocli.errors", "retrocli.options", "retrocli.assets", "retrocli.progress", "retrocli.lock",
     "retrocli.device", "retrocli.distributed", "retrocli.storage", "retrocli.artifacts"],
    ["retrocli.checksums", "retrocli.cluster", "retrocli.block_stage", "retrocli.corpus", "retrocli.tokenizer",
     "retrocli.index_kinds"],
    ["retrocli.db", "retrocli"],
    ["retrocli.staging"],
    ["retrocli.chunk", "retrocli.embed"],
    ["retrocli.index"],
    ["retrocli.shard_owners"],
    ["retrocli.build_db", "retrocli.sequences", "retrocli.add",
     "retrocli.remove", "retrocli.compact"],
    ["retrocli.overlap", "retrocli.knn_lm"],
    ["retrocli.near_duplicates"],
    ["retrocli.neighbors", "retrocli.neighbor_arrays"],
    ["retrocli.batch_neighbors"],
    ["retrocli.verify", "retrocli.info"],  # verify takes batch neighbours too
    ["retrocli.retriever"],
    ["retrocli.serve"],
    ["retrocli.model.layers", "retrocli.model.copy_head", "retrocli.model.retro", "retrocli.model.retrofit",
     "retrocli.model", "retrocli.model.checkpoint"],
    ["retrocli.datastore"],
    ["retrocli.knn_datastore"],
    ["retrocli.train", "retrocli.eval", "retrocli.generate"],
    ["retrocli.leakage", "retrocli.leakage_html"],
    ["retrocli.web"],  # the page and its routes: serve's JSON API plus generation and leakage reports
    ["retrocli.dedupe"],
    ["retrocli.cli", "retrocli.cli.common", "retrocli.cli.options", "retrocli.cli.db", "retrocli.cli.retrieval",
     "retrocli.cli.leakage", "retrocli.cli.model", "retrocli.cli.__main__",
     "retrocli.__main__"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every retrocli module `path` imports, at the top or inside a function."""
    found = set()
    # Parsed in a fresh thread: CPython 3.11's ast.parse can fail with "AST constructor recursion depth
    # mismatch" in a thread whose recursion count an earlier test (Dask's event loop) left off.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tree = pool.submit(ast.parse, path.read_text(encoding="utf-8")).result()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from retrocli.cli import db` imports the submodule retrocli.cli.db
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    assert sorted(set(package_modules()) - set(RANK)) == []


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_layers_only_point_down():
    upward = [(a, b) for a, deps in import_graph().items() for b in deps if RANK[b] > RANK[a]]
    assert upward == []


def test_nothing_below_the_cli_imports_it():
    graph = import_graph()
    entry_points = {"retrocli.__main__"}  # `python -m retrocli` is the CLI under another name
    offenders = [a for a, deps in graph.items() if not a.startswith("retrocli.cli") and a not in entry_points
                 and any(b.startswith("retrocli.cli") for b in deps)]
    assert offenders == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The detectors themselves: a planted circle is found, through an import inside a function."""
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert find_cycle(graph) is None
    graph["c"] = {"a"}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from retrocli.cli import app\n    import retrocli.train\n")
    assert imports_of(src, {"retrocli.cli", "retrocli.train"}) == {"retrocli.cli", "retrocli.train"}


@pytest.mark.parametrize("module", sorted(m for m in package_modules() if not m.startswith("retrocli.cli")))
def test_the_api_imports_its_own_modules_at_the_top(module):
    """Imports inside functions are how a circle hides; below the CLI only optional or heavy third-party
    packages are imported lazily, never another retrocli module."""
    tree = ast.parse(package_modules()[module].read_text(encoding="utf-8"))
    inner = [node.module for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
             for node in ast.walk(fn)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrocli")]
    assert inner == []


def test_reading_commands_do_not_load_torch():
    """`retro info` and `retro verify` only read files: importing torch would cost them over a second."""
    import subprocess
    import sys

    code = "import sys, retrocli.cli, retrocli.info, retrocli.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
