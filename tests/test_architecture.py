"""Imports go one way: cli -> app -> {report, audit, lm} -> core, and no module imports itself back through others.

The package's imports are read with ``ast`` (module level and inside functions alike), each resolved to the module
it loads. A core module (engine, optim, grad, sampling, accounting, budget, rundir, datasets, ...) may import only
core modules; report, audit and lm may import each other and the core; app may import all of those; only cli and
``__main__`` may import cli. The product layer's modules stay under 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "dptrain"
LIBRARY_PACKAGES = ("report", "audit", "lm", "hf", "federated", "unlearning")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = ("dptrain", *path.relative_to(SRC).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> set[str]:
    """The dptrain modules ``module`` imports (``from package import submodule`` counts as the submodule)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {r for n in names if n.startswith("dptrain") and (r := _resolve(n)) and r != module}
    return found


def _layer(module: str) -> int:
    """0 core, 1 library packages, 2 app, 3 cli."""
    top = module.split(".")[1] if "." in module else ""
    if top in ("cli", "__main__"):
        return 3
    if top == "app":
        return 2
    if top in LIBRARY_PACKAGES:
        return 1
    return 0


GRAPH = {module: _imports(module) for module in MODULES}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module)
    )


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first search, as the cycle it closes (a package's ``__init__`` importing its
    submodules is an edge like any other)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        state[module] = 2
        path.pop()

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_every_import_goes_down_the_layers_or_stays_in_its_own():
    assert not (found := upward_imports(GRAPH)), "\n".join(found)


def test_no_import_cycle():
    assert not (found := import_cycles(GRAPH)), "\n".join(found)


def test_the_checks_see_imports_inside_functions_an_upward_import_and_a_cycle():
    assert "dptrain.app.config" in GRAPH["dptrain.app.train"]  # a module-level import
    assert "dptrain.engine" in GRAPH["dptrain.app.train"]  # an import inside a function
    assert upward_imports({"dptrain.engine": {"dptrain.app.train"}}) == [
        "dptrain.engine (0) imports dptrain.app.train (2)"
    ]
    cycle = {"dptrain.app.demo": {"dptrain.cli"}, "dptrain.cli": {"dptrain.app.demo"}}
    assert import_cycles(cycle) == ["dptrain.app.demo -> dptrain.cli -> dptrain.app.demo"]


def uncommented_function_imports(path: Path) -> list[int]:
    """Lines of imports inside functions with no comment saying why: on the import block itself or on the line
    just above it (a block is a run of import statements, blank lines between them allowed)."""
    lines = path.read_text().splitlines()
    statements = sorted(
        {(node.lineno, node.end_lineno) for fn in ast.walk(ast.parse("\n".join(lines)))
         if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
         for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    )  # fmt: skip
    blocks: list[list[tuple[int, int]]] = []
    for first, last in statements:
        between = lines[blocks[-1][-1][1] : first - 1] if blocks else ["x"]
        if blocks and all(not line.strip() for line in between):
            blocks[-1].append((first, last))
        else:
            blocks.append([(first, last)])
    bad = []
    for block in blocks:
        text = lines[block[0][0] - 2 : block[-1][1]]
        if not any("#" in line for line in text):
            bad.append(block[0][0])
    return bad


def test_the_comment_check_sees_an_uncommented_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\n\ndef f():\n    import json\n\n    return json\n\n\n"
                      "def g():\n    # heavy: only when called\n    import torch\n\n    import numpy\n")
    assert uncommented_function_imports(module) == [5]


def test_imports_inside_functions_say_why():
    """Imports go at the top; one inside a function (a heavy or optional dependency kept off a fast path, such as
    torch for ``dptrain --help``) carries a comment saying so."""
    bad = {module: lines for module, path in MODULES.items() if (lines := uncommented_function_imports(path))}
    assert not bad, bad


def test_product_layer_modules_stay_small():
    large = {
        module: n
        for module, path in MODULES.items()
        if _layer(module) >= 2 and (n := len(path.read_text().splitlines())) > 500
    }
    assert not large, large
