"""Import structure of the project: strictly downward imports, at the top of files.

Pure `ast` over the source files (nothing is imported): the graph of imports between project
modules, counting every import in a file (module level and inside functions), has no cycle; and no
project import is written inside a function or method body.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("opd", "pallas_kernels")


def _modules() -> dict:
    """{dotted module name: file path} for every .py file under the project packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str):
    """[(imported project module, line, inside a function?)] for every import in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if _is_project(alias.name):
                        found.append((_known(alias.name), child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_from(module, is_package, child)
                if _is_project(base):
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        found.append((sub if sub in MODULES else _known(base), child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _known(name: str) -> str:
    """`name`, or its nearest enclosing module that exists as a file (for `import a.b.c` names)."""
    while name and name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _graph() -> dict:
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            if target != module and target in MODULES:
                graph[module].add(target)
    return graph


def _components(graph: dict) -> list:
    """The strongly connected components of more than one module (each holds a cycle), sorted."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def strongconnect(m):  # Tarjan; the graph is small enough for recursion
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph[m]):
            if n not in index:
                strongconnect(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            scc = set()
            while True:
                n = stack.pop()
                on_stack.discard(n)
                scc.add(n)
                if n == m:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for m in sorted(graph):
        if m not in index:
            strongconnect(m)
    return sorted(sccs, key=min)


def _cycles(graph: dict) -> list:
    """One cycle, as [m0, m1, ..., m0], through each strongly connected component."""
    cycles = []
    for scc in _components(graph):
        start = min(scc)  # shortest path start -> ... -> start inside the component (BFS)
        parent, frontier, end = {}, [start], None
        while frontier and end is None:
            nxt = []
            for m in frontier:
                for n in sorted(graph[m] & scc):
                    if n == start:
                        end = m
                        break
                    if n not in parent:
                        parent[n] = m
                        nxt.append(n)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def test_modules_found():
    assert "opd.target" in MODULES and "opd.paths" in MODULES and "pallas_kernels.verify" in MODULES


def test_no_import_cycle():
    graph = _graph()
    cycles = _cycles(graph)
    if cycles:
        pytest.fail(f"{len(cycles)} group(s) of project modules import each other (imports inside functions count):\n"
                    + "\n".join(f"{' -> '.join(c)}   (group: {', '.join(sorted(scc))})"
                                 for c, scc in zip(cycles, _components(graph))), pytrace=False)


def test_no_project_import_inside_functions():
    bad = {}  # "file:line" -> imported modules
    for module, path in sorted(MODULES.items()):
        for target, line, in_function in _imports(module, path):
            if in_function:
                bad.setdefault(f"{os.path.relpath(path, ROOT)}:{line}", []).append(target)
    if bad:
        pytest.fail(f"{len(bad)} project import statement(s) inside functions (move them to the top of the file):\n"
                    + "\n".join(f"{where} ({', '.join(dict.fromkeys(targets))})" for where, targets in bad.items()),
                    pytrace=False)


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"], ["c", "d", "c"]]


def test_resolves_from_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\nfrom opd.data import assets\nfrom opd.target import Target\n"
                    "from . import remote\n\ndef f():\n    import opd.models.config\n")
    found = _imports("opd.fake", str(path))
    assert found == [("opd.data.assets", 2, False), ("opd.target", 3, False), ("opd.remote", 4, False),
                     ("opd.models.config", 7, True)]
