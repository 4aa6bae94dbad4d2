"""The package's layers import in one direction only (see the README's "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import lcowatch

PACKAGE = Path(lcowatch.__file__).parent

#: Per layer, the lcowatch packages its modules must not import.
FORBIDDEN = {
    # Science steps work on arrays, headers and their own config section: no files queue, no SQL, no outputs.
    "science": ("intake", "state", "outputs", "pipeline", "simulation", "cli"),
    # Intake hands complete files to the pipeline; it never opens an image itself.
    "intake": ("science",),
    "state": ("intake", "pipeline", "outputs", "simulation", "cli"),
    "outputs": ("intake", "pipeline", "simulation", "cli"),
}


def lcowatch_imports(path: Path) -> set[str]:
    """Dotted names of the lcowatch modules a source file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "lcowatch"}


class TestImportDirection:
    """Science never imports intake, state, outputs or the pipeline; intake never imports science; state and
    outputs never import intake or the pipeline."""

    def test_no_layer_imports_against_the_flow(self) -> None:
        wrong = []
        for layer, forbidden in FORBIDDEN.items():
            for path in sorted((PACKAGE / layer).glob("*.py")):
                for name in lcowatch_imports(path):
                    parts = name.split(".")
                    if len(parts) > 1 and parts[1] in forbidden:
                        wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
        assert wrong == []

    def test_every_module_is_in_a_layer_or_shared(self) -> None:
        shared = {"__init__", "__main__", "bands", "cli", "config", "errors", "flags", "log", "states"}
        assert {p.stem for p in PACKAGE.glob("*.py")} <= shared
        layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
        assert layers == {"intake", "science", "pipeline", "state", "outputs", "simulation"}


class TestSqlInOneLayer:
    """Only the state layer runs SQL: everything else asks it."""

    def test_no_execute_outside_state(self) -> None:
        calls = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if path.parent.name == "state":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                func = node.func if isinstance(node, ast.Call) else None
                if isinstance(func, ast.Attribute) and func.attr in {"execute", "executemany", "executescript"}:
                    calls.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
        assert calls == []


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """Lines of a definition, its docstring left out (numpydoc parameter lists are not code)."""
    assert node.end_lineno is not None
    has_doc = ast.get_docstring(node) is not None
    start = node.body[1].lineno if has_doc and len(node.body) > 1 else node.lineno
    return node.end_lineno - start + 1


class TestSizes:
    """No class over 300 lines and no function over 100 (docstrings aside): each unit stays readable."""

    def test_units_are_small(self) -> None:
        large = []
        for path in sorted(PACKAGE.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and code_lines(node) > 300:
                    large.append(f"class {node.name} ({path.relative_to(PACKAGE)}): {code_lines(node)}")
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and code_lines(node) > 100:
                    large.append(f"def {node.name} ({path.relative_to(PACKAGE)}): {code_lines(node)}")
        assert large == []
