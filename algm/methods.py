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
in ``from_config``. Option names are shared by all methods on one command line, so a
method whose option name another method already uses is refused at registration.

Built-in methods and methods of other installed packages are found through the entry
point group ``algm_bench.methods`` (each entry names a module that registers methods
when imported); see this repository's ``pyproject.toml``.
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
_discovered = False


def option(default: Any = None, help: str = "", **argparse_kwargs) -> Any:
    """A config field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def register_method(cls: type[TokenReduction]) -> type[TokenReduction]:
    """Class decorator: add a method to the registry under ``cls.name``.

    Fails if the name is taken by another class, if ``Config`` is not a dataclass, or if
    one of its option names is already an option of another method."""
    name = cls.name
    if not isinstance(cls, type) or not issubclass(cls, TokenReduction):
        raise TypeError(f"register_method takes a TokenReduction subclass, got {cls!r}")
    if not is_dataclass(cls.Config):
        raise TypeError(f"method {name!r}: Config must be a dataclass")
    old = _REGISTRY.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is taken by {old.__module__}.{old.__qualname__}")
    for other_name, other in _REGISTRY.items():
        if other_name == name:
            continue
        clash = sorted(set(_option_names(cls)) & set(_option_names(other)))
        if clash:
            flags = ", ".join("--" + c.replace("_", "-") for c in clash)
            raise ValueError(f"method {name!r}: option(s) {flags} already belong to method "
                             f"{other_name!r}; give them names of their own (e.g. prefixed)")
    _REGISTRY[name] = cls
    return cls


register_method(NoReduction)


def _option_names(cls: type[TokenReduction]) -> list[str]:
    return [f.name for f in fields(cls.Config)]


def _discover() -> None:
    """Import every module named in the ``algm_bench.methods`` entry-point group once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def methods() -> dict[str, type[TokenReduction]]:
    """``{name: class}`` of every registered method, ``none`` first."""
    _discover()
    return dict(_REGISTRY)


def method_class(name: str) -> type[TokenReduction]:
    registry = methods()
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(registry)}") from None


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
    """Add ``--method`` and every method's options."""
    registry = methods()
    group = parser.add_argument_group("token reduction")
    group.add_argument("--method", default="none", choices=list(registry),
                       help="token-reduction method (default: none)")
    for name, cls in registry.items():
        for f in fields(cls.Config):
            meta = dict(f.metadata)
            help_text = meta.pop("help", "")
            default = f.default if f.default is not MISSING else None
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, default=None,
                help=f"[{name}] {help_text} (default: {default if default is not None else 'per config'})",
                **meta,
            )


def method_options(args: argparse.Namespace, name: str) -> dict:
    """The options of method ``name`` set on the command line.

    An option set for a different method is an error rather than silently ignored.
    """
    registry = methods()
    own = set(_option_names(method_class(name)))
    every = {f for cls in registry.values() for f in _option_names(cls)}
    given = {k: getattr(args, k) for k in every if getattr(args, k, None) is not None}
    stray = sorted(k for k in given if k not in own)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(f"{flags} do(es) not apply to method {name!r}")
    return given
