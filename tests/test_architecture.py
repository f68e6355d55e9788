"""The import rules of design.md, checked on the source: arrows only point down.

- Front ends (HTTP APIs, pages, Slack, the CLI) reach the core through the service only: never the
  batcher, the autoscaler or a pool.
- The core never imports Starlette (or a front end); the worker side never imports asyncio or
  Starlette, not even through another muse module it imports.
- A front end never imports another front end; the HTTP plumbing they share (muse.http) imports none.
- The shared types at the top of the package import no other layer.
- No import circle anywhere in the package, at any depth of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "muse"
FRONT_ENDS = ("muse.api", "muse.web", "muse.slack", "muse.cli", "muse.client")
NOT_FOR_FRONT_ENDS = ("muse.core.batcher", "muse.core.autoscaler", "muse.pools")
# Each front end, with the modules that belong to it (the `muse` command and its HTTP client are one).
FRONT_END_GROUPS = (("muse.api",), ("muse.web",), ("muse.slack",), ("muse.cli", "muse.client"))
SHARED = (
    "muse.errors",
    "muse.messages",
    "muse.schedulers",
    "muse.model_info",
    "muse.schema",
    "muse.pictures",
    "muse.periodic",
    "muse.words",
    "muse.averages",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function bodies and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from muse.web import gallery` imports the module muse.web.gallery.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
IMPORTS = {name: imports_of(path) for name, path in MODULES.items()}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def closure(start: str) -> set[str]:
    """The muse modules `start` imports, directly or through other muse modules."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        for imported in IMPORTS.get(name, ()):
            if imported in MODULES and imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def offending(names: set[str], *forbidden: str) -> list[str]:
    return sorted(n for n in names if within(n, *forbidden))


def test_the_walk_sees_the_layout() -> None:
    # A walk that found nothing would pass every rule below.
    assert {"muse.core.service", "muse.pools.local", "muse.worker.main", "muse.api.native", "muse.web.pages"} <= set(
        MODULES
    )
    assert "muse.core.tickets" in IMPORTS["muse.api.native"]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, *FRONT_ENDS)))
def test_front_ends_reach_the_core_through_the_service_only(name: str) -> None:
    assert offending(IMPORTS[name], *NOT_FOR_FRONT_ENDS) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, "muse.core", "muse.pools")))
def test_the_core_and_pools_import_neither_starlette_nor_front_ends(name: str) -> None:
    everything = IMPORTS[name] | {i for m in closure(name) for i in IMPORTS[m]}
    assert offending(everything, "starlette", "uvicorn", *FRONT_ENDS, "muse.app") == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, "muse.worker")))
def test_the_worker_side_imports_neither_asyncio_nor_starlette(name: str) -> None:
    everything = IMPORTS[name] | {i for m in closure(name) for i in IMPORTS[m]}
    assert offending(everything, "asyncio", "starlette", "uvicorn", "muse.core", "muse.pools", *FRONT_ENDS) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, *SHARED)))
def test_shared_types_import_no_layer(name: str) -> None:
    layers = ("muse.core", "muse.pools", "muse.worker", "muse.storage", "muse.app", *FRONT_ENDS)
    assert offending(IMPORTS[name], "starlette", *layers) == []


def test_pools_do_not_import_the_core_they_serve() -> None:
    # The service owns the pool; the pool sees the batcher only through its listener Protocol.
    for name in (n for n in MODULES if within(n, "muse.pools")):
        assert offending(IMPORTS[name], "muse.core") == [], name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, *FRONT_ENDS, "muse.http")))
def test_a_front_end_imports_no_other_front_end(name: str) -> None:
    others = [p for group in FRONT_END_GROUPS if not within(name, *group) for p in group]
    assert offending(IMPORTS[name], *others) == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself): Tarjan's."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycles_finds_a_circle() -> None:
    # The check below would pass on a finder that finds nothing.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    graph = {name: {i for i in imported if i in MODULES and i != name} for name, imported in IMPORTS.items()}
    assert cycles(graph) == []


def test_every_package_ships_in_the_wheel() -> None:
    """A package missing from pyproject's list works from a checkout and fails in the installed wheel."""
    import tomllib

    root = Path(__file__).parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "muse").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
