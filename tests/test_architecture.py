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
import re
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
    assert "suites.definition" in edges["algm.commands.bench"]  # imported inside a function
    assert "algm.methods" in edges["algm.cli"]


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


# ------------------------------------------------------------------ the framework names no method
def words(text: str) -> set[str]:
    """Lower-case words of a string or identifier: its alphanumeric runs (``"mpm-flash"``
    -> mpm, flash) and every run of consecutive case-change pieces (``ToMeHelper`` ->
    to, me, helper, tome, mehelper, ...)."""
    found = set()
    for part in re.findall(r"[A-Za-z0-9]+", text):
        pieces = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", part)
        found |= {"".join(pieces[i:j]).lower() for i in range(len(pieces)) for j in range(i + 1, len(pieces) + 1)}
        found.add(part.lower())
    return found


def built_in_method_names() -> set[str]:
    """The registry's names of the methods this checkout ships (``none``, the framework's
    own baseline, aside)."""
    from algm.methods import methods

    shipped = {m for m in project_modules() if is_method_module(m)}
    return {name for name, cls in methods().items() if cls.__module__ in shipped}


def names_a_method(module: str, path: Path, names: set[str]) -> list[str]:
    """Where ``module`` names a built-in method in code: an identifier with a method's
    name among its words, or a string literal equal to a name or holding it as a word.
    Docstrings and comments are prose (they may cite a paper). A name that is also a
    package of the checkout (``algm``) counts only as a whole literal or inside a longer
    identifier: as a word it names the package (``algm.cache``, ``algm-bench``)."""
    packages = set(PACKAGES)
    word_names = names - packages
    tree = ast.parse(path.read_text(), str(path))
    prose = {id(node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            hits = (words(node.value) & word_names) | ({node.value} & names)
            found += [f"{module}:{node.lineno} string {node.value[:60]!r} names {sorted(hits)}"] if hits else []
            continue
        identifiers = {ast.Name: "id", ast.Attribute: "attr", ast.FunctionDef: "name", ast.AsyncFunctionDef: "name",
                       ast.ClassDef: "name", ast.arg: "arg", ast.keyword: "arg", ast.alias: "asname"}
        key = identifiers.get(type(node))
        ident = getattr(node, key) if key else None
        if ident:
            hits = (words(ident) & word_names) | (words(ident) & names if ident not in packages else set())
            found += [f"{module}:{node.lineno} identifier {ident} names {sorted(hits)}"] if hits else []
    return sorted(found, key=lambda hit: int(hit.split(":")[1].split(" ")[0]))


def test_the_framework_suites_and_command_line_name_no_method():
    names = built_in_method_names()
    assert len(names) >= 2 and "none" not in names
    wrong = [hit for module, path in sorted(project_modules().items())
             if not is_method_module(module) and module.split(".")[0] in ("algm", "suites")
             for hit in names_a_method(module, path, names)]
    assert wrong == []


def test_the_name_finder_finds_names(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""ToMe and ALGM in prose."""\n'
                      'import algm.cache  # tome in a comment\n'
                      'DEFAULT = "algm"\n'
                      'PROTOCOL = "tome-flash"\n'
                      'HELP = "algm-bench, algm.cache"\n'
                      'class ToMeHelper: pass\n'
                      'algm_tau = algm.cache\n')
    hits = names_a_method("m", source, {"algm", "tome"})
    assert [h.split(" names ")[0] for h in hits] == [
        "m:3 string 'algm'", "m:4 string 'tome-flash'", "m:6 identifier ToMeHelper", "m:7 identifier algm_tau"]
