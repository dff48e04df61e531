"""The import graph of src/medpipe against the layer table (medpipe.layers): no circle, no import
from a lower layer to a higher one, function-local imports of medpipe modules few and each with a
reason, and the design page's table equal to the code's."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from medpipe import layers

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "medpipe"
DOC = ROOT / "docs" / "architecture.md"
MAX_LOCAL = 20
REASON = re.compile(r"#\s*deferred:\s*\S")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node, module: str, is_pkg: bool, mods: dict) -> list[str]:
    """The medpipe modules one import statement loads (``from medpipe import x`` -> medpipe.x when x
    is a module; a relative import resolved against the importing module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "medpipe"]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if base.split(".")[0] != "medpipe":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def _imports(tree):
    """Every import statement of a module, with whether it sits inside a function (one walk)."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
            continue
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


@functools.cache
def _graph():
    """Edges (importer, imported, file, line, local) and the function-local import statements."""
    mods = _modules()
    edges, local = [], []
    for module, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        for node, in_function in _imports(ast.parse(text)):
            targets = _targets(node, module, path.name == "__init__.py", mods)
            where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
            for t in dict.fromkeys(targets):
                edges.append((module, t, where, in_function))
            if targets and in_function:
                span = "\n".join(lines[node.lineno - 1: node.end_lineno])
                local.append((where, bool(REASON.search(span))))
    return mods, edges, local


def _cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    succ = {n: sorted({b for a, b, *_ in edges if a == n and b != n}) for n in nodes}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            recurse = False
            for j in range(i, len(succ.get(v, ()))):
                w = succ[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return out


def test_every_module_has_a_layer():
    missing = []
    for module in _modules():
        try:
            layers.layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules without a layer in medpipe.layers.LAYERS: {missing}"


def test_no_import_circle():
    mods, edges, _ = _graph()
    cycles = _cycles(list(mods), edges)
    assert not cycles, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_upward_import():
    _, edges, _ = _graph()
    bad = []
    for a, b, where, _local in edges:
        la, lb = layers.layer_of(a), layers.layer_of(b)
        if lb.number > la.number:
            bad.append(f"{where}: {a} (layer {la.number} {la.name}) imports {b} (layer {lb.number} {lb.name})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def test_function_local_imports_are_few_and_give_a_reason():
    _, _, local = _graph()
    print(f"function-local medpipe imports: {len(local)}")
    unexplained = [where for where, ok in local if not ok]
    assert not unexplained, ("function-local medpipe imports without a '# deferred: <reason>' comment "
                             "(move them to the top of the module):\n" + "\n".join(unexplained))
    assert len(local) <= MAX_LOCAL, f"{len(local)} function-local medpipe imports (at most {MAX_LOCAL})"


def test_graph_reader_resolves_relative_and_submodule_imports():
    mods = {"medpipe", "medpipe.infer", "medpipe.infer.onnx", "medpipe.decision", "medpipe.infer.predictor"}
    tree = ast.parse("from . import onnx\nfrom ..decision import apply\nfrom medpipe import decision, errors\n"
                     "import medpipe.infer.onnx\n")
    got = [_targets(n, "medpipe.infer.predictor", False, mods) for n in tree.body]
    assert got == [["medpipe.infer.onnx"], ["medpipe.decision"], ["medpipe.decision", "medpipe"],
                   ["medpipe.infer.onnx"]]
    assert _cycles(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")]) == [["a", "b", "c"]]
    assert _cycles(["a", "b", "c"], [("a", "b"), ("b", "c")]) == []


def test_layer_patterns():
    assert layers.layer_of("medpipe.sagemaker.env").name == "base"
    assert layers.layer_of("medpipe.sagemaker.training").name == "orchestration"
    assert layers.layer_of("medpipe.sagemaker").name == "orchestration"
    assert layers.layer_of("medpipe").name == "base"
    assert layers.layer_of("medpipe.infer.predictor").number == 4


def test_design_page_table_is_the_code_table():
    text = DOC.read_text()
    assert layers.markdown_table() in text, (
        "docs/architecture.md's layer table differs from medpipe.layers.markdown_table(); paste its output")
