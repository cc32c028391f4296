"""The package's layers, as the README draws them: each folder imports only from the layers below it, every
import of the package's own modules sits at the top of its module (none hidden inside a function to dodge a
cycle), and every module imports on its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dreambooth_nb"
ROOT_MODULES = {path.stem for path in PACKAGE.glob("*.py")}  # errors, config, storage, units, ...: below every folder
# Layer → the layers it may import from (the root modules are below every folder).
ALLOWED = {
    "root": {"root"},
    "model": {"root", "model"},
    "dataset": {"root", "dataset"},
    "toy": {"root", "model", "toy"},
    "planning": {"root", "model", "dataset", "planning"},
    "training": {"root", "model", "dataset", "planning", "training"},
    "results": {"root", "model", "dataset", "toy", "planning", "training", "results"},
    "notebook": {"root", "model", "dataset", "toy", "planning", "training", "results", "notebook"},
}


def _layer_of_module(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return "root" if len(relative.parts) == 1 else relative.parts[0]


def _layer_of_import(name: str) -> str | None:
    """The layer an absolute import of the package lands in ("dreambooth_nb.model.base" → "model")."""
    parts = name.split(".")
    if parts[0] != "dreambooth_nb":
        return None
    if len(parts) == 1:  # `from dreambooth_nb import x`: x is a root module, or the public API (__init__ only)
        return "root"
    return "root" if parts[1] in ROOT_MODULES else parts[1]


def _imports(tree: ast.AST):
    """(module imported, line, at the top of the module?) for every import of the package's own modules."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreambooth_nb"):
            names = [node.module] if node.module != "dreambooth_nb" else [f"dreambooth_nb.{a.name}" for a in node.names]
            for name in names:
                yield name, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dreambooth_nb"):
                    yield alias.name, node.lineno, id(node) in top
        if isinstance(node, ast.ImportFrom) and node.level:
            yield "(relative)", node.lineno, False


def test_each_layer_imports_only_from_below_and_only_at_the_top():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the public API gathers from every layer
        layer = _layer_of_module(path)
        for name, line, at_top in _imports(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if not at_top:
                wrong.append(f"{where} imports {name} inside a function (or relatively)")
                continue
            target = _layer_of_import(name)
            if target is not None and target not in ALLOWED[layer]:
                wrong.append(f"{where}: {layer} imports {name} ({target}), above it")
    assert not wrong, "\n".join(wrong)


def _module_name(path: Path) -> str:
    return ".".join(("dreambooth_nb", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def test_no_import_cycles():
    """The graph of module imports has no cycle (layers order the folders; this also covers a folder's own
    modules among themselves)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreambooth_nb"):
                for alias in node.names:  # `from dreambooth_nb.model import loading` names a module too
                    candidate = f"{node.module}.{alias.name}"
                    modules.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file()
                                else node.module)
        graph[_module_name(path)] = {m for m in modules if m != _module_name(path)}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                raise AssertionError(" → ".join(stack[stack.index(other):] + [other]))
            if other not in state:
                visit(other)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_a_config_names_exactly_the_methods_that_train():
    """config validates the method names (and their learning-rate ranges) that `model.methods` implements."""
    from dreambooth_nb.config import METHOD_LEARNING_RATES
    from dreambooth_nb.model.methods import METHODS

    assert set(METHOD_LEARNING_RATES) == set(METHODS)
