"""The one YAML reader of every user-supplied YAML file (suites, manifests, ``variant.yml``).

It is PyYAML's safe loader with three changes: aliases (``*name``) are refused, so a
"billion laughs" document cannot expand without bound (none of these files needs
them); a key given twice in a mapping is an error instead of silently dropping the
first; and ``!!python/tuple`` builds a tuple (Segmenter writes ``image_size`` so). The
file is read through :func:`algm.files.read_text` (regular file, size cap, UTF-8).
Errors are one line naming the file and the place. :func:`brief` bounds any value an
error message shows.
"""

from __future__ import annotations

import reprlib
from pathlib import Path

import yaml

from algm.files import read_text

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6
_BRIEF.maxlevel = 3
MESSAGE_LIMIT = 400  # characters of an error text quoted inside another one


def brief(value: object) -> str:
    """``repr(value)``, shortened with ``...`` where long (bounded work, not only output)."""
    return _BRIEF.repr(value)


def clip(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """``str(text)`` on one line, cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases, with duplicate keys refused and ``!!python/tuple``."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key {brief(key)} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_constructor("tag:yaml.org,2002:python/tuple",
                        lambda loader, node: tuple(loader.construct_sequence(node)))


def load_yaml(path: str | Path, what: str = "YAML file"):
    """The parsed content of a YAML file; ValueError (one line naming the file) for one
    that is not YAML, uses aliases or repeats a key; the errors of
    :func:`~algm.files.read_text` for one that is no regular UTF-8 file."""
    text = read_text(path, what)
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {problem(err)}") from None


def problem(err: yaml.YAMLError) -> str:
    """'<problem> (line L, column C)' of a YAML error, on one line."""
    what = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if what is None:
        return clip(err)
    return clip(what) + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
