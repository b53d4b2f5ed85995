"""The repository's own contracts: import direction, README and CI agree."""
import ast
import re
import sys
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


PARTS = ("manager", "workers", "orchestrator")


def part_of(module: str) -> str | None:
    """Which part an absolute import names: "manager" for bcorch.manager.x, "core" for
    bcorch.protocol, None for anything outside bcorch. The old top-level names count too."""
    names = module.split(".")
    if names[0] in PARTS:
        return names[0]
    if names[0] != "bcorch":
        return None
    return names[1] if len(names) > 1 and names[1] in PARTS else "core"


def test_part_of_reads_both_spellings():
    assert [part_of(m) for m in ("bcorch.manager.store", "manager.store", "bcorch.protocol",
                                 "bcorch", "requests", "bcorch.workers")] == \
        ["manager", "manager", "core", "core", None, "workers"]


def test_workers_import_neither_orchestrator_nor_manager():
    bad = [(p.name, m) for p, m in imported_modules("workers")
           if part_of(m) in ("orchestrator", "manager")]
    assert bad == []


def test_manager_imports_nothing_of_the_engine_side_or_the_orchestrator():
    bad = [(p.name, m) for p, m in imported_modules("manager")
           if part_of(m) in ("workers", "orchestrator")]
    assert bad == []


def test_core_imports_no_part_and_only_the_standard_library():
    bad = [(p.name, m) for p, m in imported_modules("core")
           if part_of(m) in PARTS or (part_of(m) is None and m.split(".")[0] not in
                                      sys.stdlib_module_names and m != "tomli")]
    assert bad == []


def test_no_module_imports_the_old_top_level_names():
    """Installed, the parts exist only as bcorch.<part>; `import manager` works only in a
    source tree, and would load a second copy of the module."""
    bad = [(p.name, m) for part in (*PARTS, "core", "tests", "scripts")
           for p, m in imported_modules(part) if m.split(".")[0] in PARTS]
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
