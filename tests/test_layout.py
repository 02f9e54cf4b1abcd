"""The package's dependency rule (ARCHITECTURE.md): `runtime` imports neither `pipeline` nor `evaluation`,
`pipeline` does not import `evaluation`, no module imports itself through others (type-only and function-level
imports included), and `import lynx_hf` loads the runtime only."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"runtime": 0, "pipeline": 1, "evaluation": 2}  # a part may import the parts before it, never after


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Every module of `package` (a folder) -> the package modules it imports anywhere: at the top, inside
    functions, or under `TYPE_CHECKING`. `from x import name` counts `x.name` when that is a module."""
    modules = {_module(p, package): p for p in package.rglob("*.py") if "organism/bundle" not in p.as_posix()}
    graph = {}
    for name, path in modules.items():
        package_name = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_name.split(".")[: len(package_name.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def violations(package: Path) -> list[str]:
    """What breaks the rule in `package`: back-imports between the parts, and import circles."""
    graph = import_graph(package)
    top = package.name
    problems = []

    def layer(module: str) -> int | None:
        parts = module.split(".")
        return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == top else None

    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer(module), layer(target)
            if here is not None and there is not None and there > here:
                problems.append(f"{module} imports {target}")
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target == top:  # the package itself: its __init__ runs first anyway
                continue
            if state.get(target) == 1:
                problems.append("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return problems


def test_runtime_imports_neither_pipeline_nor_evaluation_and_nothing_imports_itself_in_a_circle():
    assert violations(ROOT / "lynx_hf") == []


def test_the_rule_check_catches_a_back_import_and_a_circle(tmp_path):
    package = tmp_path / "lynx_hf"
    shutil.copytree(ROOT / "lynx_hf", package, ignore=shutil.ignore_patterns("bundle", "model", "__pycache__"))
    cues = package / "runtime" / "cues.py"
    cues.write_text(cues.read_text() + "\n\ndef _late():\n    from ..evaluation import demo  # noqa: F401\n")
    found = violations(package)
    assert "lynx_hf.runtime.cues imports lynx_hf.evaluation.demo" in found
    assert any(p.startswith("import circle:") and "lynx_hf.runtime.cues" in p for p in found)


def test_import_lynx_hf_loads_the_runtime_only():
    code = ("import sys, lynx_hf; print(sorted(m for m in sys.modules if m.startswith(('lynx_hf.pipeline', "
            "'lynx_hf.evaluation'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"
