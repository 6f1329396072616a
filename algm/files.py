"""Reading files that a user or a cache hands us, without surprises.

A path that is not a regular file is refused before it is opened: a FIFO blocks
forever and a device such as ``/dev/zero`` never ends. Text must be UTF-8 and every
read is capped in size, so a hostile or damaged file fails with one line naming it
instead of hanging, exhausting memory or printing a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import stat
from pathlib import Path

TEXT_LIMIT = 16 << 20  # bytes; suites, manifests, variants, split lists and JSON entries are far smaller

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); else FileNotFoundError (missing),
    IsADirectoryError (a folder) or ValueError (a FIFO, device or socket), each one line
    naming ``what`` and the path."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise ValueError(f"{path}: not a regular file ({kind}); the {what} must be a file (reading this "
                         f"could block or never end)")
    return path


def read_bytes(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT) -> bytes:
    """The content of a regular file of at most ``limit`` bytes (ValueError naming it otherwise)."""
    path = regular_file(path, what)
    with path.open("rb") as f:
        data = f.read(limit + 1)  # the size read, not the size stat claims (a file may grow)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit >> 20} MiB, too large for a {what}; refusing to read it")
    return data


def read_text(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT) -> str:
    """:func:`read_bytes` decoded as UTF-8; a ValueError names the file and the first bad byte."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         f"is this {what} a binary file?") from None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """Hex sha256 of a checkpoint file, hashed once per process for each version of the
    file (checkpoints are large and a suite builds several models from one)."""
    info = Path(path).stat()
    return _sha256(str(Path(path).resolve()), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed anew
    return file_sha256(Path(path))
