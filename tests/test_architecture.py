"""The import graph: layers point one way, no module imports itself in a circle, and a
wall stands around every method.

Layers, lowest first: ``core`` (every ``algm`` module except the command line),
``baselines``, ``suites``, ``app`` (``algm.cli`` and ``algm.commands``, the only place
that imports ``algm.commands``). A module may import its own layer and the layers below.
Every import counts, including those inside functions: a lazy import still ties two
modules together.

The wall: method modules (ALGM's ``algm.algm`` and every module of ``baselines``) import
only the method contract, the shared token kernels, the training loop, the data geometry
and loading, and the file helpers (:data:`METHOD_MAY_IMPORT`), plus the modules of their
own family (``cts`` -> ``cts_policy``); nothing else imports a method module, so the
framework, the suites and the command line find methods through the registry only.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every top-level package of the checkout (found, not listed: a new one is checked too)
PACKAGES = tuple(sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"))
LAYERS = ("core", "baselines", "suites", "app")
METHOD_MAY_IMPORT = ("algm.reduction", "algm.methods", "algm.merging", "algm.config", "algm.training.loop",
                     "algm.data.windows", "algm.data.datasets", "algm.cache", "algm.atomic",
                     "algm.weights.torch_file")


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` names a.b.c; keep the known prefix
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def layer(module: str) -> str:
    if module == "algm.cli" or module == "algm.commands" or module.startswith("algm.commands."):
        return "app"
    return "core" if module.split(".")[0] == "algm" else module.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def is_method_module(module: str) -> bool:
    return module == "algm.algm" or module.split(".")[0] == "baselines" and module != "baselines"


def family(module: str) -> str:
    """``baselines.cts_policy`` -> ``cts``: a method file and the files beside it."""
    return module.rpartition(".")[2].split("_")[0]


def test_packages_are_discovered():
    assert {"algm", "baselines", "suites"} <= set(PACKAGES)
    assert all(layer(m) in LAYERS for m in project_modules())


def test_nothing_imports_a_method_module():
    wrong = sorted(f"{src} imports {dst}" for src, dsts in graph().items() for dst in dsts
                   if is_method_module(dst) and not is_method_module(src))
    assert wrong == []


def test_methods_import_only_the_contract_and_shared_kernels():
    def allowed(src: str, dst: str) -> bool:
        if is_method_module(dst):
            return family(dst) == family(src)
        return any(dst == m or dst.startswith(m + ".") for m in METHOD_MAY_IMPORT)

    wrong = sorted(f"{src} imports {dst}" for src, dsts in graph().items() if is_method_module(src)
                   for dst in dsts if not allowed(src, dst))
    assert wrong == []


def test_the_graph_sees_known_edges():
    edges = graph()
    assert "algm.reduction" in edges["algm.methods"]
    assert "algm.methods" in edges["baselines.tome"]
    assert "suites.runner" in edges["algm.commands.bench"]  # imported inside a function
    assert "algm.commands.flops" in edges["algm.cli"]


def test_layers_point_one_way():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = sorted(f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
                   for src, dsts in graph().items() for dst in dsts
                   if rank[layer(dst)] > rank[layer(src)])
    assert wrong == []


def test_only_the_command_line_imports_commands():
    wrong = sorted(f"{src} imports {dst}" for src, dsts in graph().items() for dst in dsts
                   if layer(dst) == "app" and layer(src) != "app")
    assert wrong == []


def test_no_import_cycles_between_modules():
    assert cycles(graph()) == []


def package(module: str, packages: set[str]) -> str:
    """The package a module belongs to: ``baselines``, ``suites``, the command line
    (``app``), a subpackage of ``algm`` (``algm.model``, ...) or, for a module directly
    in ``algm/``, the module itself (``algm/`` is not one unit: ``algm.config`` sits
    below the subpackages, ``algm.build`` above them)."""
    parts = module.split(".")
    if layer(module) == "app" or parts[0] != "algm":
        return layer(module)
    if len(parts) > 2 or module in packages:
        return ".".join(parts[:2])
    return module


def test_no_import_cycles_between_packages():
    modules = project_modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    edges: dict[str, set[str]] = {}
    for src, dsts in graph().items():
        a = package(src, packages)
        edges.setdefault(a, set()).update(package(d, packages) for d in dsts if package(d, packages) != a)
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
