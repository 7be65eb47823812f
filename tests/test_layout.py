"""The code's shape, as docs/architecture.md draws it: no import cycles, the controller
uses only the modules both sides share, and what a function imports carries no controller
or runtime code."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("faastube", "controller", "shim")
SHARED = {"faastube.protocol", "faastube.errors", "faastube.config", "faastube.cuda"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module of ours → the modules of ours it imports, anywhere in it (a function's
    own imports count: a cycle hidden inside a function is still a cycle)."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_module_of_ours_imports_itself_round_a_cycle():
    graph = imports()
    cycles = []

    def visit(name, path):
        for target in graph[name]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(name)
    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    # A package's __init__ re-exports its modules, which import their siblings through the
    # package: that is no cycle of modules.
    real = [c for c in cycles if not any(m in PACKAGES for m in c)]
    assert real == []


def test_the_controller_uses_only_the_modules_both_sides_share():
    used = {target for name, targets in imports().items() if name.startswith("controller")
            for target in targets if target.startswith("faastube")}
    assert used <= SHARED | {"faastube"}, sorted(used - SHARED)


def test_what_a_function_imports_carries_no_controller_or_runtime_code():
    out = subprocess.run([sys.executable, "-c", "import json, sys, faastube; "
                          "print(json.dumps(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert not {m for m in loaded if m.split(".")[0] in ("controller", "shim", "flask", "gunicorn",
                                                         "redis", "prometheus_client")}
    assert "faastube.client" in loaded and "faastube.local" not in loaded and "faastube.cli" not in loaded
