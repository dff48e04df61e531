"""Size limits of ``src/medpipe``: every function at most 80 lines, every module at most 650 lines unless its
docstring says why (a line starting ``Size:``)."""

import ast
import functools
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medpipe"
MAX_FUNCTION_LINES = 80  # AST count: end_lineno - lineno + 1, docstring included, decorators not
MAX_MODULE_LINES = 650


@functools.lru_cache(maxsize=2)
def _parsed(src: Path) -> list[tuple[str, str, ast.Module]]:
    """(name, text, tree) of every module under ``src``, parsed once for all checks."""
    out = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        out.append((path.relative_to(src.parent).as_posix(), text, ast.parse(text, filename=str(path))))
    return out


def _modules():
    return _parsed(SRC)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for name, _, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return out


def long_modules(limit: int = MAX_MODULE_LINES) -> list[str]:
    out = []
    for name, text, tree in _modules():
        lines = len(text.splitlines())
        doc = ast.get_docstring(tree) or ""
        if lines > limit and not any(line.strip().startswith("Size:") for line in doc.splitlines()):
            out.append(f"{name} ({lines} lines; no 'Size:' line in its docstring)")
    return out


def test_no_function_over_80_lines():
    offenders = long_functions()
    assert not offenders, "functions over 80 lines:\n  " + "\n  ".join(offenders)


def test_no_module_over_650_lines_without_a_reason():
    offenders = long_modules()
    assert not offenders, "modules over 650 lines:\n  " + "\n  ".join(offenders)


def test_the_checks_find_offenders(tmp_path, monkeypatch):
    """The checks see methods and nested functions, count the docstring, and accept a module's reason."""
    pkg = tmp_path / "src" / "medpipe"
    pkg.mkdir(parents=True)

    def method(name: str, statements: int) -> str:  # def + docstring + statements + return
        return f'    def {name}(self):\n        """Doc."""\n' + "".join(f"        x = {i}\n" for i in range(statements)) \
            + "        return x\n"

    (pkg / "a.py").write_text("class C:\n" + method("fits", 77) + method("too_long", 78))
    (pkg / "b.py").write_text('"""Long.\n\nSize: a generated table."""\n' + "X = 1\n" * 700)
    (pkg / "c.py").write_text('"""Long, no reason."""\n' + "X = 1\n" * 700)
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    assert long_functions() == ["medpipe/a.py:82 too_long (81 lines)"]
    assert long_modules() == ["medpipe/c.py (701 lines; no 'Size:' line in its docstring)"]
