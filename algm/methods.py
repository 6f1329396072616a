"""Registry of token-reduction methods and their knobs.

A method is a :class:`~algm.reduction.TokenReduction` subclass with a frozen config
dataclass ``Config``. Config fields are declared with :func:`option`, which records the
command-line help, so the CLI and the suites build every method the same way::

    method = build_method("algm", backbone_cfg, dataset_spec, tau=0.9)

Fields left at ``None`` take the per-backbone / per-dataset default the method chooses
in ``from_config`` (e.g. ALGM's tau table).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import MISSING, field, fields
from typing import Any

from algm.config import DatasetSpec, ViTConfig
from algm.reduction import NoReduction, TokenReduction

METHODS: dict[str, str] = {
    "none": "algm.reduction:NoReduction",
    "algm": "algm.algm:ALGM",
    "tome": "baselines.tome:ToMe",
    "cts": "baselines.cts:CTS",
    "prune": "baselines.prune:TokenPruning",
}


def option(default: Any = None, help: str = "", **argparse_kwargs) -> Any:
    """A config field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def method_class(name: str) -> type[TokenReduction]:
    try:
        target = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def build_method(name: str, backbone: ViTConfig, dataset: DatasetSpec, **options) -> TokenReduction:
    """Instantiate method ``name`` for a backbone/dataset; ``options`` are Config fields.

    Unknown option names raise a ValueError listing the valid ones.
    """
    cls = method_class(name)
    if cls is NoReduction:
        if any(v is not None for v in options.values()):
            raise ValueError(f"method 'none' takes no options, got {sorted(options)}")
        return NoReduction()
    valid = {f.name for f in fields(cls.Config)}
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; valid: {sorted(valid)}")
    config = cls.Config(**{k: v for k, v in options.items() if v is not None})
    return cls.from_config(config, backbone, dataset)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--method`` and every method's options (shared names are added once)."""
    group = parser.add_argument_group("token reduction")
    group.add_argument("--method", default="none", choices=list(METHODS),
                       help="token-reduction method (default: none)")
    seen: dict[str, str] = {}
    for name in METHODS:
        cls = method_class(name)
        if cls is NoReduction:
            continue
        for f in fields(cls.Config):
            if f.name in seen:
                continue
            seen[f.name] = name
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
    own = set() if method_class(name) is NoReduction else {f.name for f in fields(method_class(name).Config)}
    every = {f.name for m in METHODS if method_class(m) is not NoReduction for f in fields(method_class(m).Config)}
    given = {k: getattr(args, k) for k in every if getattr(args, k, None) is not None}
    stray = sorted(k for k in given if k not in own)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(f"{flags} do(es) not apply to method {name!r}")
    return given
