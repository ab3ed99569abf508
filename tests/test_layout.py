"""The shape of the code: layers import only downwards, no cycles, modules of a readable size."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "embedd"

#: Lower layers first; a module may import only from its own layer or below.
LAYERS: list[set[str]] = [
    {"embedd", "embedd.errors", "embedd.forkserver_guard", "embedd.systemd", "embedd.lockfile", "embedd.http.address"},
    {"embedd.models", "embedd.models.*"},
    {"embedd.protocol", "embedd.settings", "embedd.frame", "embedd.admission"},
    {"embedd.audio", "embedd.audio.*", "embedd.embedding", "embedd.library", "embedd.store", "embedd.store.*", "embedd.executor"},
    {"embedd.batch", "embedd.batch.*"},
    {"embedd.service", "embedd.recommend", "embedd.takeover"},
    {"embedd.ops", "embedd.metrics"},
    {"embedd.http", "embedd.http.*"},
    {"embedd.server", "embedd.client"},
    {"embedd.cli", "embedd.__main__"},
]

#: Modules allowed above the size limit, and why.
LONG_MODULES = {
    "embedd.batch.state": "one SQLite schema and the transactions on it; splitting would scatter the schema",
    "embedd.library": "one reader of Navidrome's schema across its versions",
    "embedd.settings": "every setting's declaration and help text",
    "embedd.server": "the socket server: framing, connections, limits and shutdown in one loop",
    "embedd.executor": "the two lane threads, their scheduling between passes and the model registry they share",
    "embedd.cli": "every subcommand's arguments and its printer; each printer is a few lines",
    "embedd.batch.watch": "the watcher's poll, its snapshot of the library and the debounce, one state machine",
    "embedd.recommend": "the pure ranking (per-model scores, merge, penalties, MMR) beside its one I/O function",
    "embedd.store.index": "the in-memory index: its matrix, its projection beyond 2048 dims and keeping it current",
    "embedd.store.vector_store": "every Milvus operation of the store, each a few lines",
}
MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".*") and module.startswith(member[:-1])):
                return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def _imports(path: pathlib.Path, *, module_level_only: bool) -> set[str]:
    """embedd modules that ``path`` imports (``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module and child.module.startswith("embedd"):
                if inner or not module_level_only:
                    found.add(child.module)
                    found.update(f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in MODULES)
            elif isinstance(child, ast.Import) and (inner or not module_level_only):
                found.update(a.name for a in child.names if a.name.startswith("embedd"))
            visit(child, inner)

    visit(tree, True)
    return found & set(MODULES)


def test_every_import_points_down_the_layers():
    upward = []
    for module, path in MODULES.items():
        for dep in _imports(path, module_level_only=False):
            if _layer(dep) > _layer(module):
                upward.append(f"{module} imports {dep}")
    assert not upward, upward


def test_no_import_cycles_between_modules():
    # A package's __init__ re-exporting its submodules is not a cycle: leave package → own-submodule edges out.
    graph = {
        m: {d for d in _imports(p, module_level_only=True) if d != m and not d.startswith(m + ".")}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                walk(dep, stack + [dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            walk(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_of_a_readable_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    if module in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it or state why in LONG_MODULES"


def test_no_any_typed_back_references_in_the_batch_job():
    """The batch job receives typed collaborators, never the whole service as ``Any``."""
    for path in (PACKAGE / "batch").glob("*.py"):
        text = path.read_text()
        assert "service: Any" not in text and "self.m." not in text and "import Service" not in text, path
