"""Registry of token-reduction methods and their knobs.

A method is a :class:`~algm.reduction.TokenReduction` subclass with a frozen config
dataclass ``Config``, registered where it is defined::

    @register_method
    class MyMethod(TokenReduction):
        name = "mine"

        @dataclass(frozen=True)
        class Config:
            strength: float = option(0.5, "how much to reduce", type=float)

Config fields are declared with :func:`option`, which records the command-line help,
so the CLI (``--strength``), the suites (``mine: [{strength: 0.7}]``) and pictures build
every method the same way::

    method = build_method("mine", backbone_cfg, dataset_spec, strength=0.7)

Fields left at ``None`` take the per-backbone / per-dataset default the method chooses
in ``from_config``. Options belong to their method: the command line parses ``--method``
first and then that method's options only, so two methods may both have ``--layers``.

Built-in methods and methods of other installed packages are found through the entry
point group ``algm_bench.methods`` (each entry names a module that registers methods
when imported); see this repository's ``pyproject.toml``. Methods can also come from a
plain Python file, without a package: ``--plugin path.py`` on the command line,
:func:`add_plugin_files` in Python, or ``$ALGM_BENCH_PLUGINS`` (files separated by
``os.pathsep``). A module or file that fails to import breaks only its own methods:
choosing one (or an unknown name) reports the failure in one line.

Nothing is imported before it is needed: this module does not import torch, a method
named on the command line imports only its own entry point, and the plugin files and
the other entry points load on the first full listing (:func:`methods`). So the CLI
parses its arguments and answers ``--help`` without torch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from dataclasses import MISSING, field, fields, is_dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algm.config import DatasetSpec, ViTConfig

if TYPE_CHECKING:  # algm.reduction imports torch; it is imported when a method is needed
    from algm.reduction import TokenReduction

ENTRY_POINT_GROUP = "algm_bench.methods"
PLUGINS_ENV = "ALGM_BENCH_PLUGINS"

_REGISTRY: dict[str, type[TokenReduction]] = {}
_BROKEN: dict[str, str] = {}  # entry-point name or plugin file stem -> one line: why it did not import
_LOADED: set[str] = set()  # entry-point names and plugin files tried (loaded or broken)
_PLUGIN_FILES: list[Path] = []  # from add_plugin_files, loaded by _discover
_discovered = False


def option(default: Any = None, help: str = "", **argparse_kwargs) -> Any:
    """A config field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def register_method(cls: type[TokenReduction]) -> type[TokenReduction]:
    """Class decorator: add a method to the registry under ``cls.name``.

    Fails if the name is taken by another class or if ``Config`` is not a dataclass."""
    from algm.reduction import TokenReduction

    _builtin()
    name = cls.name
    if not isinstance(cls, type) or not issubclass(cls, TokenReduction):
        raise TypeError(f"register_method takes a TokenReduction subclass, got {cls!r}")
    if not is_dataclass(cls.Config):
        raise TypeError(f"method {name!r}: Config must be a dataclass")
    old = _REGISTRY.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is taken by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _builtin() -> None:
    """Register ``none`` (on first use, not at import: it imports torch)."""
    if "none" not in _REGISTRY:
        from algm.reduction import NoReduction

        _REGISTRY["none"] = NoReduction


def _option_names(cls: type[TokenReduction]) -> list[str]:
    return [f.name for f in fields(cls.Config)]


def _discover() -> None:
    """Import every module named in the ``algm_bench.methods`` entry-point group, then
    the plugin files (:func:`add_plugin_files`, ``$ALGM_BENCH_PLUGINS``), once each; one
    that fails (import error, a clashing name) is recorded, not raised."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    _builtin()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(ep)
    env = [Path(p) for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]
    for path in env + _PLUGIN_FILES:
        _load_plugin_file(path)


def _load_entry_point(ep) -> None:
    if ep.name in _LOADED:
        return
    _LOADED.add(ep.name)
    try:
        ep.load()
    except Exception as err:  # a third-party plugin may fail in any way
        _BROKEN[ep.name] = f"its module {ep.value} failed to import ({_first_line(err)})"


def _load_plugin_file(path: Path) -> None:
    """Execute a plugin file as a module of its own (it registers its methods as an
    entry-point module does); a failure is recorded under the file's stem."""
    path = path.expanduser().resolve()
    if str(path) in _LOADED:
        return
    _LOADED.add(str(path))
    # a name per path: two plugin files called methods.py do not replace each other
    name = f"algm_bench_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    try:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    except Exception as err:  # a user's file may fail in any way
        sys.modules.pop(name, None)
        _BROKEN[path.stem] = f"the plugin file {path} failed to import ({_first_line(err)})"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def add_plugin_files(paths) -> None:
    """Register the methods of these Python files (``str`` or ``Path``) too; they are
    imported with the entry points, on the first full listing (:func:`methods`), or at
    once if that has happened already."""
    for path in map(Path, paths):
        if path.expanduser().resolve() not in (p.expanduser().resolve() for p in _PLUGIN_FILES):
            _PLUGIN_FILES.append(path)
            if _discovered:
                _load_plugin_file(path)


def method_names() -> list[str]:
    """``none``, the entry points' names, then the other registered methods, without
    importing anything: the names :func:`methods` will hold, for help texts (an entry
    point is named after its method; plugin files' methods are known once imported)."""
    names = ["none", *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)), *_REGISTRY]
    return list(dict.fromkeys(names))


def methods() -> dict[str, type[TokenReduction]]:
    """``{name: class}`` of every registered method: ``none``, the entry points' in their
    order (whatever order they were imported in), then the others."""
    _discover()
    return {name: _REGISTRY[name] for name in method_names() if name in _REGISTRY}


def broken_methods() -> dict[str, str]:
    """``{name: one line}`` of the plugin methods whose module failed to import."""
    _discover()
    return {name: f"method {name!r} is unavailable: {why}" for name, why in _BROKEN.items()}


def method_class(name: str) -> type[TokenReduction]:
    """The class of method ``name``; a name an entry point carries loads that entry point
    only, another name every entry point and plugin file. ValueError (one line) for an
    unknown or broken method."""
    _builtin()
    if name not in _REGISTRY and name not in _LOADED:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            _load_entry_point(ep)
    if name in _REGISTRY:
        return _REGISTRY[name]
    registry, broken = methods(), broken_methods()
    if name in registry:
        return registry[name]
    if name in broken:
        raise ValueError(broken[name])
    unavailable = "".join(f"; {line}" for line in broken.values())
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(registry)}{unavailable}")


def method_config(name: str, **options) -> Any:
    """The method's ``Config`` from option values (``None`` values are left at their
    default). Unknown option names raise a ValueError listing the valid ones."""
    cls = method_class(name)
    valid = set(_option_names(cls))
    unknown = sorted(k for k, v in options.items() if k not in valid and (valid or v is not None))
    if unknown:
        if not valid:
            raise ValueError(f"method {name!r} takes no options, got {unknown}")
        raise ValueError(f"method {name!r} has no option(s) {unknown}; valid: {sorted(valid)}")
    return cls.Config(**{k: v for k, v in options.items() if v is not None})


def build_method(name: str, backbone: ViTConfig, dataset: DatasetSpec, **options) -> TokenReduction:
    """Instantiate method ``name`` for a backbone/dataset; ``options`` are Config fields."""
    return method_class(name).from_config(method_config(name, **options), backbone, dataset)


def required_training(name: str, backbone: ViTConfig, dataset: DatasetSpec, **options) -> list:
    """The :class:`~algm.reduction.TrainingTask` list method ``name`` still needs, once the
    parts the package ships (:func:`algm.shipped.install_tasks`) are in the cache."""
    from algm.shipped import install_tasks

    return install_tasks(method_class(name).required_training(method_config(name, **options), backbone, dataset))


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--method``; :func:`add_method_options` adds the chosen method's options."""
    parser.add_argument_group("token reduction").add_argument(
        "--method", default="none", type=method_name,
        help=f"token-reduction method: {', '.join(method_names())}, or one a --plugin file "
             f"registers (default: none); --method M --help lists M's options")


def add_method_options(parser: argparse.ArgumentParser, method: str) -> None:
    """Add the options of ``method`` (a name from :func:`chosen_method`; an unknown or
    broken one adds none and ``--method`` then reports it)."""
    try:
        method_class(method)
    except ValueError:
        return
    group = parser.add_argument_group(f"{method} options")
    for f in fields(method_class(method).Config):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        default = f.default if f.default is not MISSING else None
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None,
            help=f"{help_text} (default: {default if default is not None else 'per config'})",
            **meta,
        )


def method_name(text: str) -> str:
    """argparse type of ``--method``: a registered (and importable) method."""
    try:
        method_class(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def chosen_method(argv: list[str]) -> str | None:
    """The value of ``--method`` in a command line (``--method M`` or ``--method=M``; the
    last one, as argparse keeps it), read before parsing so that the parser holds that
    method's options only."""
    chosen = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--method" and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif arg.startswith("--method="):
            chosen = arg.split("=", 1)[1]
    return chosen


def plugin_files(argv: list[str]) -> list[str]:
    """The values of every ``--plugin`` in a command line, read before parsing (as
    :func:`chosen_method`) so that a plugin's method and its options exist when the
    parser is built."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def plugin_file(text: str) -> str:
    """argparse type of ``--plugin``: an existing file."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def option_owners(flag: str) -> list[str]:
    """The methods that have the command-line option ``flag`` (``--tau`` -> ["algm"])."""
    name = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    return [m for m, cls in methods().items() if name in _option_names(cls)]


def method_options(args: argparse.Namespace, name: str) -> dict:
    """The options of method ``name`` set on the command line."""
    own = _option_names(method_class(name))
    return {k: getattr(args, k) for k in own if getattr(args, k, None) is not None}
