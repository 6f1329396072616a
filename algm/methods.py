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
when imported); see this repository's ``pyproject.toml``. A module that fails to import
breaks only its own methods: choosing one reports the failure in one line.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields, is_dataclass
from importlib.metadata import entry_points
from typing import Any

from algm.config import DatasetSpec, ViTConfig
from algm.reduction import NoReduction, TokenReduction

ENTRY_POINT_GROUP = "algm_bench.methods"

_REGISTRY: dict[str, type[TokenReduction]] = {}
_BROKEN: dict[str, str] = {}  # entry-point name -> one line: why its module did not import
_discovered = False


def option(default: Any = None, help: str = "", **argparse_kwargs) -> Any:
    """A config field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def register_method(cls: type[TokenReduction]) -> type[TokenReduction]:
    """Class decorator: add a method to the registry under ``cls.name``.

    Fails if the name is taken by another class or if ``Config`` is not a dataclass."""
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


register_method(NoReduction)


def _option_names(cls: type[TokenReduction]) -> list[str]:
    return [f.name for f in fields(cls.Config)]


def _discover() -> None:
    """Import every module named in the ``algm_bench.methods`` entry-point group once; a
    module that fails (import error, a clashing name) is recorded, not raised."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a third-party plugin may fail in any way
            first = (str(err).splitlines() or [""])[0][:300]
            _BROKEN[ep.name] = f"its module {ep.value} failed to import ({type(err).__name__}: {first})"


def methods() -> dict[str, type[TokenReduction]]:
    """``{name: class}`` of every registered method, ``none`` first."""
    _discover()
    return dict(_REGISTRY)


def broken_methods() -> dict[str, str]:
    """``{name: one line}`` of the plugin methods whose module failed to import."""
    _discover()
    return {name: f"method {name!r} is unavailable: {why}" for name, why in _BROKEN.items()}


def method_class(name: str) -> type[TokenReduction]:
    registry = methods()
    if name in registry:
        return registry[name]
    broken = broken_methods()
    if name in broken:
        raise ValueError(broken[name])
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(registry)}")


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
    """The :class:`~algm.reduction.TrainingTask` list method ``name`` still needs."""
    return method_class(name).required_training(method_config(name, **options), backbone, dataset)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--method``; :func:`add_method_options` adds the chosen method's options."""
    parser.add_argument_group("token reduction").add_argument(
        "--method", default="none", type=_method_name,
        help=f"token-reduction method: {', '.join(methods())} (default: none); "
             f"--method M --help lists M's options")


def add_method_options(parser: argparse.ArgumentParser, method: str) -> None:
    """Add the options of ``method`` (a name from :func:`chosen_method`; an unknown or
    broken one adds none and ``--method`` then reports it)."""
    if method not in methods():
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


def _method_name(text: str) -> str:
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


def option_owners(flag: str) -> list[str]:
    """The methods that have the command-line option ``flag`` (``--tau`` -> ["algm"])."""
    name = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    return [m for m, cls in methods().items() if name in _option_names(cls)]


def method_options(args: argparse.Namespace, name: str) -> dict:
    """The options of method ``name`` set on the command line."""
    own = _option_names(method_class(name))
    return {k: getattr(args, k) for k in own if getattr(args, k, None) is not None}
