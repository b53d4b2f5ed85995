"""The repository's own contracts: import direction, README and CI agree."""
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module


def test_workers_import_neither_orchestrator_nor_manager():
    bad = [(p.name, m) for p, m in imported_modules("workers")
           if m.split(".")[0] in ("orchestrator", "manager")]
    assert bad == []


def test_manager_imports_only_the_protocol_from_workers():
    bad = [(p.name, m) for p, m in imported_modules("manager")
           if m.split(".")[0] == "workers" and not m.startswith("workers.protocol")]
    assert bad == []


def test_protocol_depends_on_the_standard_library_only():
    third_party = {"requests", "psutil", "pynvml", "cheroot", "pod5", "numpy"}
    bad = [(p.name, m) for p, m in imported_modules("workers/protocol")
           if m.split(".")[0] in third_party]
    assert bad == []


def readme_commands():
    return re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert any("bcorch demo" in c for c in commands)
    assert any("pytest" in c for c in commands)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert 'bash -c "$test_command"' in ci
    assert "pytest" in next(c for c in readme_commands() if "pytest" in c)
