"""Layering: the generic core never imports the BEV application, and rules never import passes.

Every ``import`` statement counts, including those inside functions (lazy imports), absolute or
relative.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmdfx"
# `python -m lmdfx` runs the BEV command line: the one core module allowed to import it
ENTRY_POINT = PACKAGE / "__main__.py"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (``from a import b`` gives a and a.b)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_walk_sees_relative_and_lazy_imports():
    imports = _imports(PACKAGE / "__init__.py")
    assert "lmdfx.metrics" in imports and "lmdfx.compiler.compile" in imports
    assert "lmdfx.bev.cli.main" in _imports(ENTRY_POINT)
    # weights/__init__.py imports SimpleBEV inside functions
    assert "lmdfx.bev.models.simplebev" in _imports(PACKAGE / "bev" / "weights" / "__init__.py")


@pytest.mark.parametrize("path", [p for p in MODULES if not _within(_module_name(p), "lmdfx.bev") and p != ENTRY_POINT],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_does_not_import_the_bev_application(path):
    bev = sorted(m for m in _imports(path) if _within(m, "lmdfx.bev"))
    assert not bev, f"{_module_name(path)} imports {bev}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "rules").rglob("*.py")), ids=lambda p: p.name)
def test_rules_do_not_import_passes(path):
    passes = sorted(m for m in _imports(path) if _within(m, "lmdfx.passes"))
    assert not passes, f"{_module_name(path)} imports {passes}"
