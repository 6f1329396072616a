"""Subcommands of the ``algm-bench`` CLI; each module exposes ``register(subparsers)``."""
