"""The layout rules that keep exports self-contained and inference independent of training."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ldm_users"
# Every module of pipeline/ but its __init__ is shipped in exports (a new family file included).
SHIPPED = tuple(sorted(p.name for p in (PACKAGE / "pipeline").glob("*.py") if p.name != "__init__.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ldm_users module `path` imports, at module level or inside functions, with their parent packages."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0] == "ldm_users")
    return found


def test_inference_and_pipeline_never_reach_training():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    for start in [n for n in modules if n.startswith(("ldm_users.inference", "ldm_users.pipeline"))]:
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            current = todo.pop()
            for nxt in graph[current] - seen:
                seen.add(nxt)
                via[nxt] = current
                todo.append(nxt)
        reached = sorted(n for n in seen if n.startswith("ldm_users.training"))
        if reached:
            chain, node = [], reached[0]
            while node:
                chain.append(node)
                node = via[node]
            raise AssertionError(f"{start} imports training: {' <- '.join(chain)}")


def test_shipped_pipeline_files_import_only_torch_diffusers_and_each_other():
    allowed = {"torch", "diffusers", "__future__"} | set(sys.stdlib_module_names)
    for name in SHIPPED:
        tree = ast.parse((PACKAGE / "pipeline" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: a sibling shipped file, which diffusers copies along
                    assert node.level == 1 and f"{node.module}.py" in SHIPPED, (name, node.module)
                    continue
                tops = [node.module.split(".")[0]]
            else:
                continue
            assert set(tops) <= allowed, f"pipeline/{name} imports {tops}: an export could not load it"
