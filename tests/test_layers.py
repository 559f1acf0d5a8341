"""The floors of STYLE.md ("Layers: who may import whom"), checked on the source with ``ast``.

Nothing is imported or executed: every ``.py`` under z2all/, parallel/, optimizer/, data_preprocess/
plus the entry points is parsed, and every import statement (module level or inside a function,
``TYPE_CHECKING`` blocks included) becomes an edge of the import graph among our modules:

* ``import a.b.c`` imports ``a.b.c``;
* ``from a.b import c`` imports ``a.b`` (its ``__init__`` runs) and ``a.b.c`` when that is a module;
* ``importlib.import_module("a.b")`` with a literal imports ``a.b``; a module that calls it with a
  computed name (a lazy ``__getattr__``) imports every module its string constants name.

Each test lists all its violations at once, each naming the file, the line and the import.

The floors (lowest first; a floor imports only floors below it and itself):

    basement   z2all (the package __init__), z2all.labels, z2all.atomic, z2all.log
               z2all.cli_args: the flag parser, on the basement but only for the floors that parse
               flags: faces, training, data_preprocess (a library floor takes values, not argv)
    ground     z2all.model     (+ z2all.labels, z2all.atomic only: torch and kernels, no logging setup)
               z2all.tokenizer (+ basement)
               optimizer       (nothing of ours; and only torch, numpy, the standard library)
    above      parallel        (+ optimizer; only torch, numpy, the standard library)
               z2all.data      (+ z2all.tokenizer, basement)
               data_preprocess (+ z2all.data, z2all.tokenizer, basement, z2all.cli_args)
    top        z2all.training  (anything above, not data_preprocess and not the faces)
    faces      train_my_ddp, monitor_process, the ``python -m`` tools (a module with a ``__main__``
               block outside data_preprocess: z2all.sample, z2all.tokenizer.train_tokenizer, ...):
               anything but data_preprocess and the other faces; monitor_process only the basement
               (a watchdog must survive whatever kills training, so it imports none of its code)
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("z2all", "parallel", "optimizer", "data_preprocess")
ENTRY_POINTS = ("train_my_ddp.py", "monitor_process.py")
MAX_LINES = 500

# z2all.monitor_jobs: monitor_process.py's local and remote (ssh) jobs, standard library only, split out
# of monitor_process.py, which may import only the basement.
BASEMENT = frozenset({"z2all", "z2all.labels", "z2all.atomic", "z2all.log", "z2all.monitor_jobs"})
CLI_ARGS = "z2all.cli_args"
TOP_LEVEL_FACES = frozenset({"train_my_ddp", "monitor_process"})
# Third-party libraries parallel/ and optimizer/ may import outside a try/except ImportError.
ENGINE_LIBRARIES = frozenset({"torch", "numpy"})


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name as written (resolved if relative), ours or not
    path: str  # file, relative to the repository
    line: int
    code: str  # the statement, for messages
    optional: bool  # inside a try whose handler catches ImportError

    def where(self) -> str:
        return f"{self.path}:{self.line} `{self.code}`"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _sources() -> dict[str, Path]:
    """Our modules: dotted name -> file."""
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    files += [REPO / f for f in ENTRY_POINTS if (REPO / f).is_file()]
    return {_module_name(p): p for p in files}


@functools.cache
def _trees() -> dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in _sources().items()}


def _ours(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``import a.b`` of a module a.b)."""
    modules = _sources()
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    if handler.type is None:
        return True
    for node in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
        names.append(node.id if isinstance(node, ast.Name) else getattr(node, "attr", ""))
    return bool({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names))


def _optional_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a ``try:`` body that catches ImportError: an optional library."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt))
    return out


def _is_import_module_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
    )


def _imports_of(module: str, tree: ast.Module, path: str, is_pkg: bool) -> list[Import]:
    """The imports of ``module`` (parsed as ``tree`` from ``path``; ``is_pkg``: an ``__init__.py``)."""
    package = module if is_pkg else module.rpartition(".")[0]
    optional = _optional_nodes(tree)
    out: list[Import] = []

    def add(node: ast.AST, target: str, code: str) -> None:
        out.append(Import(module, target, path, node.lineno, code, id(node) in optional))

    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, ast.unparse(node))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source == "__future__":
                continue
            add(node, source, ast.unparse(node))
            for alias in node.names:
                if f"{source}.{alias.name}" in _sources():
                    add(node, f"{source}.{alias.name}", ast.unparse(node))
        elif _is_import_module_call(node):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(node, arg.value, ast.unparse(node))
            else:
                dynamic = True
    if dynamic:  # a computed import_module(name): the module names among its strings are what it loads
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _sources():
                add(node, node.value, f"import_module({node.value!r})")
    return out


@functools.cache
def _all_imports() -> tuple[Import, ...]:
    return tuple(
        imp
        for m, tree in _trees().items()
        for imp in _imports_of(
            m, tree, str(_sources()[m].relative_to(REPO)), _sources()[m].name == "__init__.py"
        )
    )


def _edges() -> dict[str, dict[str, list[Import]]]:
    """importer -> our imported module -> the statements (self-imports of a package dropped)."""
    graph: dict[str, dict[str, list[Import]]] = {m: {} for m in _sources()}
    for imp in _all_imports():
        target = _ours(imp.target)
        if target is not None and target != imp.importer:
            graph[imp.importer].setdefault(target, []).append(imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def _shortest_cycle(graph: dict[str, dict[str, list[Import]]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (BFS inside the component)."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {comp}")


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _has_main_block(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


def _is_face(module: str) -> bool:
    if module in TOP_LEVEL_FACES:
        return True
    return not _in(module, "data_preprocess") and _has_main_block(_trees()[module])


def _floor_rule(module: str) -> tuple[str, object]:
    """(floor name, predicate over an imported module of ours: True when allowed)."""
    if module == "monitor_process":
        return "monitor_process", lambda t: t in BASEMENT or t == CLI_ARGS
    if _is_face(module):
        return "a face", lambda t: not _in(t, "data_preprocess") and not _is_face(t)
    if module in BASEMENT:
        return "the basement", lambda t: t in BASEMENT
    if module == CLI_ARGS:
        return "the basement (cli_args)", lambda t: t in BASEMENT
    if _in(module, "z2all.model"):
        return "z2all.model", lambda t: _in(t, "z2all.model") or t in ("z2all.labels", "z2all.atomic")
    if _in(module, "z2all.tokenizer"):
        return "z2all.tokenizer", lambda t: _in(t, "z2all.tokenizer") or t in BASEMENT
    if _in(module, "optimizer"):
        return "optimizer", lambda t: _in(t, "optimizer")
    if _in(module, "parallel"):
        return "parallel", lambda t: _in(t, "parallel", "optimizer")
    if _in(module, "z2all.data"):
        return "z2all.data", lambda t: _in(t, "z2all.data", "z2all.tokenizer") or t in BASEMENT
    if _in(module, "data_preprocess"):
        return (
            "data_preprocess",
            lambda t: (
                (_in(t, "data_preprocess", "z2all.data", "z2all.tokenizer") or t in BASEMENT or t == CLI_ARGS)
                and not _is_face(t)
            ),
        )
    if _in(module, "z2all.training"):
        return "z2all.training", lambda t: not _in(t, "data_preprocess") and not _is_face(t)
    raise AssertionError(f"{module}: no floor; add it to tests/test_layers.py")


def _report(title: str, violations: list[str]) -> str:
    return f"{len(violations)} {title}:\n" + "\n".join(f"  {v}" for v in violations)


# --------------------------------------------------------------------------------------------------
_CHECKER_SAMPLE = """
import importlib
import torch.nn
from . import sampler
from ..model import config as cfg
try:
    import apex
except ImportError:
    apex = None

def late():
    from z2all.training.loop import train
    importlib.import_module("z2all.tokenizer")

LAZY = {"x": "z2all.data.readers"}

def __getattr__(name):
    return importlib.import_module(LAZY[name])
"""


def test_the_checker_sees_every_kind_of_import():
    """Guards the checker itself on a sample module: relative, function-level, optional and lazy."""
    imports = _imports_of("z2all.data.fake", ast.parse(_CHECKER_SAMPLE), "z2all/data/fake.py", False)
    assert {(i.target, i.optional) for i in imports} == {
        ("importlib", False),
        ("torch.nn", False),
        ("z2all.data", False),  # from . import sampler: the package __init__ runs...
        ("z2all.data.sampler", False),  # ...and the submodule
        ("z2all.model", False),
        ("z2all.model.config", False),
        ("apex", True),  # optional: inside try/except ImportError
        ("z2all.training.loop", False),  # function-level
        ("z2all.tokenizer", False),  # import_module with a literal
        ("z2all.data.readers", False),  # a computed import_module: the module names among its strings
    }
    for name in ("z2all", "z2all.model", "z2all.training.loop", "parallel.distributed_data_parallel"):
        assert name in _sources(), sorted(_sources())
    assert "parallel.unwrap" in _edges()["parallel.distributed_data_parallel"]


def test_the_checker_finds_cycles():
    graph = {"a": {"b": []}, "b": {"c": [], "d": []}, "c": {"a": []}, "d": {}, "e": {"f": []}, "f": {"e": []}}
    assert _strongly_connected(graph) == [["a", "b", "c"], ["e", "f"]]
    assert _shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = _edges()
    violations = []
    for comp in _strongly_connected(graph):
        cycle = _shortest_cycle(graph, comp)
        lines = [f"cycle {' -> '.join(cycle)} (all {len(comp)} modules of it: {', '.join(comp)}); imports:"]
        for a in comp:
            for b in sorted(graph[a]):
                if b in comp:
                    lines += [f"    {imp.where()}  [{a} -> {b}]" for imp in graph[a][b]]
        violations.append("\n".join(lines))
    assert not violations, _report("import cycle(s) among our modules", violations)


def test_each_floor_imports_only_floors_below():
    violations = []
    for module, targets in _edges().items():
        floor, allowed = _floor_rule(module)
        for target, imps in sorted(targets.items()):
            if not allowed(target):
                violations += [f"{imp.where()}: {floor} ({module}) may not import {target}" for imp in imps]
    assert not violations, _report("import(s) across the floors", violations)


def test_engine_imports_only_torch_numpy_and_the_standard_library():
    """parallel/ and optimizer/ run anywhere torch does; optional libraries sit in try/except ImportError."""
    violations = []
    for imp in _all_imports():
        if not _in(imp.importer, "parallel", "optimizer") or imp.optional:
            continue
        top = imp.target.split(".")[0]
        if top in ENGINE_LIBRARIES or top in sys.stdlib_module_names or top in ("parallel", "optimizer"):
            continue
        violations.append(f"{imp.where()}: {imp.importer} may import only torch, numpy and the stdlib")
    assert not violations, _report("third-party import(s) in the engine", violations)


def test_no_source_file_over_500_lines():
    violations = []
    for path in sorted(_sources().values()):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            violations.append(f"{path.relative_to(REPO)}: {n} lines (split it by concept)")
    assert not violations, _report(f"file(s) over {MAX_LINES} lines", violations)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_re_exports_a_private_name():
    """``from x import _y as _y``, ``_y`` in ``__all__``, or ``from x import _y`` that the module never
    uses (kept only for others to import from here): a private name is re-exported."""
    violations = []
    for module, tree in _trees().items():
        path = _sources()[module].relative_to(REPO)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if not _private(bound):
                        continue
                    if alias.asname == alias.name:
                        violations.append(f"{path}:{node.lineno} `{ast.unparse(node)}`: explicit re-export")
                    elif bound not in used:
                        violations.append(
                            f"{path}:{node.lineno} `{ast.unparse(node)}`: {bound} imported but not used here"
                        )
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                for elt in getattr(node.value, "elts", []):
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str) and _private(elt.value):
                        violations.append(f"{path}:{node.lineno}: {elt.value!r} in __all__")
    assert not violations, _report("re-export(s) of private names", violations)
