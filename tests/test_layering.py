"""The package's layers: the model code does not reach up into the experiment harness or the
site, and the shared constants stay torch-free (the schema and the CLI parser read them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "worldplay"
UPPER = ("worldplay.experiments", "worldplay.site")
# cli.py is the top: it registers the experiment and publish commands and reads the input
# manifest for `serve`'s samples; nothing else of the harness (in particular not for `worldplay run`).
CLI_ALLOWED = {"worldplay.experiments.cli", "worldplay.experiments.inputs", "worldplay.site.publish"}


def _absolute(module: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = list(module.relative_to(PACKAGE.parent).with_suffix("").parts)
    base = parts[: len(parts) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(path, node)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _lower_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.relative_to(PACKAGE).parts[0] not in ("experiments", "site")]


def _upper_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if any(m == u or m.startswith(u + ".") for u in UPPER)}


def test_relative_imports_resolve_to_package_modules():
    # The scan must see a real lazy import (cli.py's experiment commands), or it checks nothing.
    assert "worldplay.experiments.cli" in imported_modules(PACKAGE / "cli.py")
    assert "worldplay.constants" in imported_modules(PACKAGE / "nn" / "text.py")


@pytest.mark.parametrize("path", _lower_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_below_the_cli_imports_the_harness_or_the_site(path):
    found = _upper_imports(path)
    if path.name == "cli.py" and path.parent == PACKAGE:
        found = {m for m in found if not any(m == a or m.startswith(a + ".") for a in CLI_ALLOWED)}
    assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}: move what it needs below"


def test_the_experiment_harness_does_not_import_the_site():
    for path in sorted((PACKAGE / "experiments").rglob("*.py")):
        found = {m for m in imported_modules(path) if m.startswith("worldplay.site")}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}"


def test_constants_and_schema_import_without_torch():
    code = ("import sys, worldplay.constants, worldplay.experiments.schema, worldplay.pose; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent, env={"PYTHONPATH": str(PACKAGE.parent)})
    assert out.stdout.strip() == "False"


def _readme_layout() -> str:
    text = (PACKAGE.parent / "README.md").read_text()
    section = text.split("## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_layout_names_every_module_and_folder():
    layout = _readme_layout()
    listed = {line.split()[0] for line in layout.splitlines() if line.strip()}
    expected = set()
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(PACKAGE)
        if "__pycache__" in rel.parts or rel.parts[:2] == ("experiments", "kinds") and path.is_file():
            continue
        if rel.parts[0] == "serve" and "static" in rel.parts[1:-1] or rel.parts[:2] == ("serve", "static") and \
                path.is_file() or "sageattention_stub" in rel.parts[:-1] or rel.parts[-2:-1] == ("sageattention_stub",):
            continue
        if path.is_dir():
            expected.add(path.name + "/")
        elif path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            expected.add(path.name)
    missing = sorted(expected - listed)
    assert not missing, f"README.md's layout misses {missing}"
    stale = sorted(name for name in listed if name.endswith(".py") and name not in expected
                   and not (PACKAGE.parent / name).exists())
    assert not stale, f"README.md's layout lists {stale}, which the tree does not have"
