"""The dependency rule of the code base, read from the imports of every module (lazy ones inside functions
included): the library's packages import only downwards, the library imports no application, the
applications import none of each other's modules (bench, which measures train and eval, excepted), and no
module imports itself back through others."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = "mixtral_jax"
APPLICATIONS = ("train", "convert", "eval", "pipeline", "bench")
# The library's floors, bottom first: a module imports its own package and the floors below it.
FLOORS = [
    {"errors", "assets", "presets"},
    {"io"},
    {"config"},
    {"settings"},
    {"data", "kernels", "quantization"},
    {"parallel"},
    {"model"},
    {"checkpoints"},
    {"cli"},
]
# Applications that may import another application's modules: the benchmarks measure train and eval.
MEASURES = {"bench": {"train", "eval"}}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for top in (LIBRARY, *APPLICATIONS):
        for path in (ROOT / top).rglob("*.py"):
            found[module_name(path)] = path
    return found


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules that `path` imports anywhere in its body (a name imported from a package counts as
    the submodule where one of that name exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) - {name} for name, path in known.items()}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == LIBRARY and len(parts) > 1 else parts[0]


def floor_of(package: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def test_every_library_package_has_a_floor(graph):
    packages = {package_of(m) for m in graph if m.startswith(LIBRARY + ".")}
    assert packages <= set().union(*FLOORS), f"packages without a floor in FLOORS: {packages - set().union(*FLOORS)}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        if not module.startswith(LIBRARY + "."):
            continue
        for target in targets:
            if target.split(".")[0] != LIBRARY:
                wrong.append(f"{module} -> {target} (an application)")
            elif target != LIBRARY and package_of(target) != package_of(module) and \
                    floor_of(package_of(target)) >= floor_of(package_of(module)):
                wrong.append(f"{module} -> {target} (floor {floor_of(package_of(target))} from "
                             f"{floor_of(package_of(module))})")
    return sorted(wrong)


def cross_application_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        app = module.split(".")[0]
        if app == LIBRARY:
            continue
        for target in targets:
            other = target.split(".")[0]
            if other not in (LIBRARY, app) and other not in MEASURES.get(app, ()):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_library_imports_only_downwards_and_no_application(graph):
    assert not upward_imports(graph), "imports that break the rule:\n" + "\n".join(upward_imports(graph))


def test_applications_import_none_of_each_other(graph):
    wrong = cross_application_imports(graph)
    assert not wrong, "applications importing another application:\n" + "\n".join(wrong)


def test_no_import_circles(graph):
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_forbid():
    """A made-up graph with a circle, an upward arrow, an arrow into an application and one between
    applications is caught by each check."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"mixtral_jax.io.paths": {"mixtral_jax.model.moe"}})
    assert upward_imports({"mixtral_jax.model.moe": {"train.loop"}})
    assert not upward_imports({"mixtral_jax.model.moe": {"mixtral_jax.io.paths", "mixtral_jax.model.lora"}})
    assert cross_application_imports({"eval.ppl": {"train.loop"}}) == ["eval.ppl -> train.loop"]
