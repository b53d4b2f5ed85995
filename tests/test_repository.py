"""The repository's own contracts: import direction, README and CI agree."""
import ast
import re
import shutil
import subprocess
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


def test_ci_runs_the_readme_test_command(tmp_path):
    """.ci/run, run for real in a copy whose README's commands leave traces: it runs the
    README's pytest block and nothing else, from the repository root, and fails with it."""
    (tmp_path / ".ci").mkdir()
    shutil.copy2(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    blocks = readme_commands()
    test_block = next(c for c in blocks if "pytest" in c)
    assert "pip install -e '.[test]'" in test_block and "-m pytest" in test_block
    readme = (REPO / "README.md").read_text()
    for number, block in enumerate(blocks):
        trace = ("pwd > ran-pytest-block && echo pytest && exit 3" if block == test_block
                 else f"touch ran-block-{number}")
        readme = readme.replace(f"```sh\n{block}\n```", f"```sh\n{trace}\n```")
    (tmp_path / "README.md").write_text(readme)
    ci = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path / ".ci",
                        capture_output=True, text=True, timeout=60)
    assert ci.returncode == 3, ci.stdout + ci.stderr
    assert (tmp_path / "ran-pytest-block").read_text().strip() == str(tmp_path)
    assert not list(tmp_path.glob("ran-block-*")), "only the test command runs in CI"
