"""The package's shape: no import cycle, counting imports inside functions too (they hide cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llama4_quant"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # `from . import x` names module x; `from .m import f` names module m.
            graph[name] |= {t for t in targets if t in modules and t != name and t != "llama4_quant"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_the_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "llama4_quant.calibrate.methods" in graph["llama4_quant.pipeline"]  # seen inside a function
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_foundation_imports_nothing_above_it():
    """outputs, model, checkpoint, arch, sources, hub and distributed stay below every command."""
    graph = import_graph()
    foundation = {"llama4_quant.outputs", "llama4_quant.model", "llama4_quant.checkpoint", "llama4_quant.arch",
                  "llama4_quant.sources", "llama4_quant.hub", "llama4_quant.errors", "llama4_quant.distributed"}
    for module in foundation:
        above = graph[module] - foundation - {"llama4_quant.tiny_models"}
        assert not above, f"{module} imports {sorted(above)}"


def test_opening_a_model_imports_no_torch():
    """What every command runs first stays fast: a bad path fails before torch is imported (export
    gguf reads its --tensor-type overrides first: with none, no block types are loaded)."""
    code = ("import sys, llama4_quant.model, llama4_quant.outputs, cli.main; "
            "from llama4_quant.formats.gguf_types import parse_overrides; parse_overrides(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_torch_loads_with_no_collection_then_stays_frozen():
    """The heavy commands' first import of torch (in use_threads) runs no collection, and leaves its
    objects frozen, so the walk's full collections skip them, and collection on."""
    code = ("import gc, sys, cli.main; runs = []; gc.callbacks.append(lambda phase, info: runs.append(info)); "
            "cli.main.use_threads(1); assert 'torch' in sys.modules; "
            "assert not runs, runs; assert gc.isenabled(); assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_the_command_freezes_the_garbage_collector_at_exit():
    """The exit handler runs before Python's last collections, which then skip every object made."""
    code = ("import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            "import cli.main, torch")  # registered first, so run last of the exit handlers
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.stdout.split() == ["frozen", "True"]


def test_the_walk_sits_below_its_targets():
    """walk.py is the one front end: the targets build on it, never the reverse."""
    graph = import_graph()
    assert "llama4_quant.walk" in graph["llama4_quant.pipeline"] and "llama4_quant.walk" in graph["llama4_quant.formats.gguf"]
    assert not graph["llama4_quant.walk"] & {"llama4_quant.pipeline", "llama4_quant.formats.gguf", "llama4_quant.derive"}


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
