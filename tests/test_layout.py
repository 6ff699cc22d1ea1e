"""The package's layout: no import cycles among latro_jax's modules; the training loop stays short
and is imported only to train (a saved step is read through `runs`); the tools import latro_jax
as an installed package. Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_files(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, folder))
                  for f in files if f.endswith(".py"))


def module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def imported(path: str) -> set[str]:
    """The latro_jax modules `path` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "latro_jax":
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from latro_jax import train`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "latro_jax")
    return names


def test_no_import_cycles():
    graph = {module_name(p): imported(p) for p in python_files("latro_jax")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    done, cycles = set(), []

    def visit(module, path):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles


def test_the_loop_is_short_and_imported_only_to_train():
    with open(os.path.join(ROOT, "latro_jax", "train.py")) as f:
        source = f.read()
    assert len(source.splitlines()) <= 300
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
    users = {os.path.relpath(p, ROOT) for p in python_files("latro_jax") + python_files("tools")
             if "latro_jax.train" in imported(p)}
    # tools/soak.py runs a training run too, to measure its memory and compilations
    assert users == {os.path.join("tools", "train.py"), os.path.join("tools", "soak.py"),
                     os.path.join("latro_jax", "demo.py")}, users


def test_tools_do_not_edit_sys_path():
    for path in python_files("tools"):
        with open(path) as f:
            assert "sys.path" not in f.read(), path
