"""The shape of the code: layers import only downwards, no cycles, modules of a readable size."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "embedd"

#: Lower layers first; a module may import only from its own layer or below.
LAYERS: list[set[str]] = [
    {"embedd", "embedd.errors", "embedd.forkserver_guard", "embedd.systemd", "embedd.lockfile", "embedd.address", "embedd.priority",
     "embedd.allocator"},
    {"embedd.models", "embedd.models.*"},
    {"embedd.protocol", "embedd.settings", "embedd.settings.*", "embedd.frame", "embedd.admission"},
    {"embedd.audio", "embedd.audio.*", "embedd.embedding", "embedd.library", "embedd.library.*", "embedd.store", "embedd.store.*", "embedd.executor", "embedd.executor.*"},
    {"embedd.batch", "embedd.batch.*", "embedd.cluster", "embedd.cluster.*"},
    {"embedd.service", "embedd.recommend", "embedd.recommend.*", "embedd.takeover"},
    {"embedd.ops", "embedd.ops.*", "embedd.metrics"},
    {"embedd.http", "embedd.http.*"},
    {"embedd.server", "embedd.server.*", "embedd.client"},
    {"embedd.cli", "embedd.cli.*", "embedd.__main__"},
]

#: A module over this many lines states in its docstring why it is long (a paragraph "Long because: ...").
MAX_LINES = 450
#: ... and none is over this, whatever the reason.
HARD_MAX_LINES = 1000


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
    """Every module: at most MAX_LINES, or its docstring says why it is longer; none past HARD_MAX_LINES."""
    text = MODULES[module].read_text()
    lines = len(text.splitlines())
    assert lines <= HARD_MAX_LINES, f"{module} has {lines} lines; split it along its concerns"
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "Long because: " in doc, f"{module} has {lines} lines; split it, or say why in its docstring (Long because: ...)"


def test_no_any_typed_back_references_in_the_batch_job():
    """The batch job receives typed collaborators, never the whole service as ``Any``."""
    for path in (PACKAGE / "batch").glob("*.py"):
        text = path.read_text()
        assert "service: Any" not in text and "self.m." not in text and "import Service" not in text, path
