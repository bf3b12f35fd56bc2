"""Find import circles among the pack's own modules.

Every ``import`` / ``from ... import`` of a pack module counts, at module level or inside a function (a
function-local import still makes a circle, it only hides it until call time). Imports under
``if TYPE_CHECKING:`` are left out: they never run. Prints each strongly connected component of the import
graph with more than one module, and exits 1 if there is any.

    python tools/import_cycles.py [ROOT]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "comfy_finetune"
SKIP_DIRS = {"tests", "benchmarks", "tools", ".venv", "venv", "build", ".git"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements inside ``if TYPE_CHECKING:`` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    out.update(id(n) for n in ast.walk(stmt))
    return out


def imports_of(module: str, is_package: bool, tree: ast.AST, known: set[str]) -> set[str]:
    skip = _type_checking_nodes(tree)
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from . import host" names a module; "from .x import f" names module x
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS)
             and not p.relative_to(root).parts[0].startswith(".")]
    trees = {module_name(root, p): (p.name == "__init__.py", ast.parse(p.read_text(encoding="utf-8"))) for p in files}
    known = set(trees)
    return {m: imports_of(m, pkg, tree, known) for m, (pkg, tree) in trees.items()}


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parent.parent)
    graph = import_graph(root)
    found = cycles(graph)
    for comp in found:
        print("circle:", " <-> ".join(comp))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports of pack modules, {len(found)} circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
