"""The pack's import graph has no circles, and its modules import each other at module level.

A function-local import of one of our own modules is how an import circle hides until call time; the rule is
that function-local imports are only for optional packages, heavy libraries (kept off ComfyUI's start-up) and
ComfyUI itself. ``python tools/import_cycles.py`` prints the same graph check.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_circles(repo_tool):
    tool = repo_tool("import_cycles")
    graph = tool.import_graph(ROOT)
    assert len(graph) > 40 and "comfy_finetune.training.frame" in graph
    assert tool.cycles(graph) == []


def test_the_cycle_finder_finds_a_circle(repo_tool):
    tool = repo_tool("import_cycles")
    assert tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_local_imports_of_the_pack(repo_tool):
    tool = repo_tool("import_cycles")
    known = set(tool.import_graph(ROOT))
    local = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in tool.SKIP_DIRS or rel.parts[0].startswith("."):
            continue
        module = tool.module_name(ROOT, path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_checking = tool._type_checking_nodes(tree)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_checking:
                    stub = ast.Module(body=[node], type_ignores=[])
                    if tool.imports_of(module, path.name == "__init__.py", stub, known):
                        local.append(f"{rel}:{node.lineno}")
    assert local == [], "import these at module level: " + ", ".join(local)
