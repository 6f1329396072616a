"""Download the public checkpoints and data sets of a manifest (``suites/zoo.yaml``).

Checkpoints land in ``<checkpoints root>/<dataset>/<backbone>/<method>/<file>`` (the
layout ``bench --checkpoints`` reads: ``method`` is ``none`` for the Segmenter baseline,
else the method the weights were trained with); data lands in ``<data root>/``, the root
``algm.data.datasets`` reads: a zip extracted there so that ``<data root>/<extracts_to>``
exists, or (``converts``: a folder of the zip in its publisher's layout) converted into
ours right in the data root (:data:`LAYOUTS`: CamVid from the SegNet tutorial).

Sources: ``http(s)://`` URLs through pooch, Google Drive links through gdown, and local
files (``file://`` URLs or plain paths, relative ones to the manifest's folder) for
users who downloaded by hand. pooch downloads into a fresh temporary file each time, so
HTTP goes through :class:`ResumingHTTPDownloader`, a pooch downloader that keeps the
bytes received so far in ``.<name>.part`` beside the target and asks for the rest with a
``Range`` request; gdown resumes Drive downloads itself.

Checksums: a file must match the manifest's ``sha256`` (else its ``sha1``) where given;
otherwise the sha256 of its first download is pinned in ``<root>/zoo.lock.json`` and
checked from then on. pooch checks the hash before it moves the download into place, so
a corrupted download leaves nothing at the target (nor a partial file to resume). A
converted data set is also checked file by file against its ``checksums`` list
(``sha256sum`` lines, e.g. ``suites/camvid-labels.sha256``) before any of it reaches the
data root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, NamedTuple
from urllib.parse import unquote, urlparse

import gdown
import pooch
import requests
from tqdm import tqdm

from algm.atomic import write_json
from algm.cache import cache_dir
from algm.data.datasets import resolve_root
from algm.files import file_sha256, read_text
from algm.safe_yaml import brief, clip, load_yaml

LOCK_NAME = "zoo.lock.json"
HASH_DIGITS = {"sha256": 64, "sha1": 40}
CHECKPOINTS_ENV = "ALGM_BENCH_CHECKPOINTS"
TIMEOUT_S = 30  # per connect / per read; a silent server is "offline", not a hang
CHUNK = 1 << 16  # bytes per read; a dropped connection loses at most the chunk in flight


class FetchError(ConnectionError):
    """A download that could not complete; the message names the URL and the manual step."""


@dataclass(frozen=True)
class Item:
    """One file of the manifest: its source and where it lands (``root / relpath``).

    ``url`` None: no public download (``note`` says how to get it). ``extracts_to``: the
    file is a zip holding that folder, to be extracted into ``root``. ``converts``: the
    zip's folder to convert into ``layout`` (a key of :data:`LAYOUTS`) at ``root``, every
    file listed in ``checksums`` (a path) checked first."""

    url: str | None
    root: Path
    relpath: str
    sha256: str | None = None
    sha1: str | None = None
    extracts_to: str | None = None
    note: str | None = None
    converts: str | None = None
    layout: str | None = None
    checksums: str | None = None

    @property
    def target(self) -> Path:
        return self.root / self.relpath


@dataclass(frozen=True)
class Fetched:
    """A file, extracted folder or converted data root in place. ``status``: downloaded,
    present, extracted or converted; ``sha256`` of the file (None for data found already
    in place)."""

    path: Path
    sha256: str | None
    status: str


def checkpoints_dir(path: str | Path | None = None) -> Path:
    """The checkpoints root: ``path``, else ``$ALGM_BENCH_CHECKPOINTS``, else ``<cache>/checkpoints``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CHECKPOINTS_ENV) or cache_dir("checkpoints"))


def layout_dir(root: str | Path, dataset: str, backbone: str, method: str) -> Path:
    """The folder holding ``checkpoint.pth`` and ``variant.yml`` of one model."""
    return Path(root) / dataset / backbone / method


def fetch(dataset: str, manifest: str | Path, backbones: list[str] | None = None, data: bool = False,
          checkpoints_root: str | Path | None = None, data_root: str | Path | None = None,
          progress: bool = True) -> list[Fetched]:
    """Put the manifest's checkpoints of ``dataset`` (only ``backbones`` if given) and,
    with ``data``, its data set in place; return what is in place, in manifest order.

    Raises FetchError (offline, HTTP error), ValueError (checksum mismatch, bad manifest
    or selection) and FileNotFoundError (no public download, missing local source)."""
    items = select(load_manifest(manifest), Path(manifest).resolve().parent, dataset, backbones,
                   checkpoints_root=checkpoints_dir(checkpoints_root),
                   data_root=resolve_root(dataset, data_root) if data else None)
    return [fetch_item(item, progress) for item in items]


def load_manifest(path: str | Path) -> dict:
    """The manifest YAML (:func:`algm.safe_yaml.load_yaml`), its entries checked for the
    keys :func:`select` reads and their types: names and URLs are strings, checksums
    hex strings of the right length. Errors are one line naming the file and entry."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} not found")
    manifest = load_yaml(path, "manifest")
    if manifest is None:
        return {}
    try:
        _check_manifest(manifest)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return manifest


def _check_manifest(manifest) -> None:
    """ValueError naming the first entry of a parsed manifest that :func:`select` cannot use."""
    if not isinstance(manifest, dict):
        raise ValueError(f"expected a mapping with checkpoints and data, got {type(manifest).__name__}")
    required = {"checkpoints": ("dataset", "backbone", "method", "files"), "data": ("dataset", "url")}
    for section, keys in required.items():
        entries = manifest.get(section) or []
        if not isinstance(entries, list):
            raise ValueError(f"{section} must be a list of entries, got {brief(entries)}")
        for i, entry in enumerate(entries):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a mapping, got {brief(entry)}")
            needed = keys + (("file",) if section == "data" and entry.get("url") else ())
            missing = [k for k in needed if k not in entry]
            if missing:
                raise ValueError(f"{where} lacks {', '.join(missing)}")
            for key in ("dataset", "backbone", "method", "file", "extracts_to", "converts", "checksums"):
                if key in entry and not (isinstance(entry[key], str) and entry[key]):
                    raise ValueError(f"{where}.{key} must be a name, got {brief(entry[key])}")
            if "converts" in entry or "checksums" in entry:
                _check_conversion(entry, where)
            files = entry.get("files", {}) if section == "checkpoints" else {"": entry}
            if not isinstance(files, dict):
                raise ValueError(f"{where}.files must map file names to sources, got {brief(files)}")
            for name, spec in files.items():
                spot = f"{where}.files.{name}" if name else where
                if not isinstance(name, str) or not isinstance(spec, dict):
                    raise ValueError(f"{spot} must map a file name to its url and checksum, got {brief(spec)}")
                if spec.get("url") is not None and not isinstance(spec["url"], str):
                    raise ValueError(f"{spot}.url must be a string, got {brief(spec['url'])}")
                for algorithm, digits in HASH_DIGITS.items():
                    _check_hash(spec.get(algorithm), algorithm, digits, spot)


def _check_conversion(entry: dict, where: str) -> None:
    """A data entry with ``converts`` names a dataset :data:`LAYOUTS` can build, its
    ``checksums`` list and no ``extracts_to``; ``checksums`` comes only with ``converts``."""
    if "converts" not in entry:
        raise ValueError(f"{where}.checksums applies to converted data only; it lacks converts")
    if entry["dataset"] not in LAYOUTS:
        raise ValueError(f"{where}.converts: no conversion into the {entry['dataset']} layout; "
                         f"there is one for: {', '.join(LAYOUTS)}")
    if "checksums" not in entry:
        raise ValueError(f"{where} converts {entry['converts']} but lacks checksums (the list of "
                         f"files the conversion must produce)")
    if "extracts_to" in entry:
        raise ValueError(f"{where} has both converts and extracts_to; give one")


def _check_hash(value, algorithm: str, digits: int, where: str) -> None:
    """None, or a string of ``digits`` hex digits (an unquoted all-digit hash is a YAML number)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{where}.{algorithm} must be a quoted string of {digits} hex digits, got the "
                         f"{type(value).__name__} {brief(value)} (quote it)")
    if not re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", value):
        raise ValueError(f"{where}.{algorithm} must be {digits} hex digits, got {brief(value)}")


def select(manifest: dict, base: Path, dataset: str, backbones: list[str] | None,
           checkpoints_root: Path, data_root: Path | None) -> list[Item]:
    """The items to fetch: checkpoints of ``dataset`` (of ``backbones`` if given), then
    its data if ``data_root`` is given. ``base`` resolves relative local sources."""
    entries = [e for e in manifest.get("checkpoints") or [] if e["dataset"] == dataset]
    if not entries and data_root is None:
        raise ValueError(f"the manifest has no checkpoints for {dataset}")
    if backbones is not None:
        known = sorted({e["backbone"] for e in entries})
        unknown = [b for b in backbones if b not in known]
        if unknown:
            raise ValueError(f"no {dataset} checkpoints for {', '.join(unknown)} in the manifest; "
                             f"it has: {', '.join(known) or 'none'}")
        entries = [e for e in entries if e["backbone"] in backbones]
    items = [Item(_resolve(spec.get("url"), base), checkpoints_root,
                  layout_dir("", e["dataset"], e["backbone"], e["method"]).joinpath(name).as_posix(),
                  spec.get("sha256"), spec.get("sha1"),
                  note=e.get("note") or f"published in {e.get('published_in', 'the manifest')}")
             for e in entries for name, spec in e["files"].items()]
    if data_root is not None:
        found = [e for e in manifest.get("data") or [] if e["dataset"] == dataset]
        if not found:
            raise ValueError(f"the manifest has no data entry for {dataset}")
        for e in found:
            if e["url"] is None:
                raise FileNotFoundError(f"{dataset} data has no public download: {e.get('note')}; "
                                        f"put it under {data_root} by hand")
            items.append(Item(_resolve(e["url"], base), data_root, e["file"], e.get("sha256"),
                              e.get("sha1"), e.get("extracts_to"), e.get("note"), converts=e.get("converts"),
                              layout=dataset if e.get("converts") else None,
                              checksums=_resolve(e.get("checksums"), base)))
    for item in items:  # every path this fetch writes, checked before anything is downloaded
        inside(item.root, item.relpath)
        if item.extracts_to:
            inside(item.root, item.extracts_to)
    return items


def inside(root: Path, relpath: str) -> Path:
    """``root / relpath`` resolved (symlinks followed), or a ValueError if that leaves
    ``root`` or climbs (``..``) at all: a manifest's names become paths, and a manifest
    may come from anyone."""
    base = Path(root).resolve()
    target = (base / relpath).resolve()
    if (Path(relpath).is_absolute() or ".." in Path(relpath).parts or target == base
            or not target.is_relative_to(base)):
        raise ValueError(f"the manifest names the path {brief(relpath)}, which leaves {root}; refusing "
                         f"to write outside it")
    return target


def fetch_item(item: Item, progress: bool = True) -> Fetched:
    """Download (or check) one item and extract or convert it if it is a zip."""
    if item.converts:
        return _fetch_converted(item, progress)
    if item.extracts_to and (item.root / item.extracts_to).is_dir():
        return Fetched(item.root / item.extracts_to, None, "present")  # extracted whole or not at all
    fetched = _ensure_file(item, progress)
    if item.extracts_to:
        return Fetched(extract(item.target, item.root, item.extracts_to), fetched.sha256, "extracted")
    return fetched


def _fetch_converted(item: Item, progress: bool) -> Fetched:
    """The data root in the item's layout, converted from its zip unless already there.
    A layout only partly there (a copy made by hand, an interrupted move) is refused
    before any download: it is not ours to overwrite."""
    layout = LAYOUTS[item.layout]
    present = [name for name in layout.entries if (item.root / name).exists()]
    if len(present) == len(layout.entries):
        return Fetched(item.root, None, "present")
    if present:
        missing = [name for name in layout.entries if name not in present]
        raise ValueError(f"{item.root} holds {present[0]} but not all of the {item.layout} layout "
                         f"({', '.join(missing)} missing); move it away or delete it, then fetch again")
    checksums = read_checksums(item.checksums)  # a bad list fails before the download
    fetched = _ensure_file(item, progress)
    convert(fetched.path, item.root, item.converts, layout, checksums, item.checksums)
    return Fetched(item.root, fetched.sha256, "converted")


def _ensure_file(item: Item, progress: bool) -> Fetched:
    """The item's file in place, checked against the manifest or lock hash, and pinned."""
    lock = Lock(item.root)
    pinned = lock.pinned(item.relpath)
    expected = _expected_hash(item, pinned)
    status = "present" if item.target.is_file() else "downloaded"
    if status == "downloaded":
        download(item, expected, progress)
    sha256 = pooch.file_hash(str(item.target))
    if status == "present" and expected is not None:
        algorithm, digest = expected.split(":")
        actual = sha256 if algorithm == "sha256" else pooch.file_hash(str(item.target), alg=algorithm)
        if actual != digest:
            raise ValueError(f"{item.target} does not match its {algorithm} {digest} "
                             f"({'pinned in ' + str(lock.path) if pinned else 'from the manifest'}); "
                             f"delete it to download it again")
    if pinned is None:
        lock.pin(item.relpath, sha256, item.url)
    return Fetched(item.target, sha256, status)


def _expected_hash(item: Item, pinned: str | None) -> str | None:
    """pooch's ``known_hash``: the manifest sha256, else the pinned one, else the manifest sha1."""
    if item.sha256 or pinned:
        return f"sha256:{(item.sha256 or pinned).lower()}"
    return f"sha1:{item.sha1.lower()}" if item.sha1 else None


def download(item: Item, known_hash: str | None, progress: bool = True) -> Path:
    """Download ``item.url`` to ``item.target``; pooch moves it there only if it matches
    ``known_hash`` ("alg:hex", None: anything)."""
    target = item.target
    manual = f"download it by hand to {target}" + (
        f" (or extract it so that {item.root / item.extracts_to} exists)" if item.extracts_to else "")
    if item.url is None:
        raise FileNotFoundError(f"{target}: no public download ({item.note}); {manual}")
    target.parent.mkdir(parents=True, exist_ok=True)
    downloader = _downloader(item.url, target, progress)
    try:
        with _quiet_pooch():
            pooch.retrieve(item.url, known_hash=known_hash, fname=target.name, path=target.parent,
                           downloader=downloader)
    except (requests.RequestException, gdown.exceptions.DownloadError) as err:
        raise FetchError(f"cannot download {item.url} ({_reason(err)}); {manual}, "
                         f"then run fetch again") from err
    except ValueError as err:  # pooch's checksum mismatch; it deleted the download
        raise ValueError(f"{target}: the download from {item.url} failed its checksum, nothing "
                         f"was kept: {err}") from err
    return target


def _downloader(url: str, target: Path, progress: bool):
    """The pooch downloader for ``url``'s kind of source."""
    if gdown.parse_url.is_google_drive_url(url):
        return DriveDownloader(target, progress)
    if urlparse(url).scheme in ("http", "https"):
        return ResumingHTTPDownloader(target, progress)
    return LocalCopier(_local_path(url))


class ResumingHTTPDownloader:
    """pooch downloader for ``target``'s URL that keeps the received bytes in
    ``.<name>.part`` beside it between calls and asks only for the rest (``Range:
    bytes=<size>-``); a server that ignores the range (200) sends the whole file again.
    The finished file moves to pooch's output file, which pooch checks and renames."""

    def __init__(self, target: Path, progress: bool = True):
        self.name = target.name
        self.partial = target.with_name(f".{target.name}.part")
        self.progress = progress

    def __call__(self, url: str, output_file: str, pooch_instance=None) -> None:
        offset = self.partial.stat().st_size if self.partial.exists() else 0
        # identity: byte offsets must count the bytes on disk, not a decoded stream.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            if offset and (response.status_code == 416 or (response.status_code == 206
                                                           and _range_start(response) != offset)):
                if response.status_code == 416 and _range_total(response) == offset:
                    os.replace(self.partial, output_file)  # the partial already holds it all
                    return
                self.partial.unlink()  # longer than the file, or a range we did not ask for
                return self(url, output_file, pooch_instance)
            response.raise_for_status()
            resumed = offset if response.status_code == 206 else 0
            length = int(response.headers.get("content-length", 0))
            with open(self.partial, "ab" if resumed else "wb") as out, \
                    tqdm(total=resumed + length or None, initial=resumed, unit="B", unit_scale=True,
                         desc=self.name, disable=not self.progress) as bar:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(self.partial, output_file)


class DriveDownloader:
    """pooch downloader for a Google Drive link: gdown writes ``.<name>.gdown`` beside
    ``target`` (resuming its own ``.part`` file there), then it moves to pooch's output file."""

    def __init__(self, target: Path, progress: bool = True):
        self.staged = target.with_name(f".{target.name}.gdown")
        self.progress = progress

    def __call__(self, url: str, output_file: str, pooch_instance=None) -> None:
        gdown.download(url, str(self.staged), quiet=not self.progress, resume=True, timeout=TIMEOUT_S)
        os.replace(self.staged, output_file)


class LocalCopier:
    """pooch downloader for a file already on disk (downloaded by hand)."""

    def __init__(self, source: Path):
        self.source = source

    def __call__(self, url: str, output_file: str, pooch_instance=None) -> None:
        if not self.source.is_file():
            raise FileNotFoundError(f"local source {self.source} (manifest url {url!r}) not found")
        shutil.copyfile(self.source, output_file)


@dataclass(frozen=True)
class ExtractLimits:
    """What extracting one archive may write: ``max_bytes`` in all, at most ``max_ratio``
    times the archive's own size (a zip bomb expands a thousandfold), ``max_members``
    files. The data sets' zips are images: about as large extracted as packed."""

    max_bytes: int = 256 << 30
    max_ratio: float = 50.0
    max_members: int = 1_000_000

    def bytes_for(self, archive: Path) -> int:
        return int(min(self.max_bytes, self.max_ratio * max(archive.stat().st_size, 1 << 20)))


def extract(archive: Path, root: Path, folder: str, limits: ExtractLimits = ExtractLimits()) -> Path:
    """Unzip ``archive`` so that ``root/folder`` appears whole or not at all: it is
    extracted beside it first and renamed into place (an interrupted extraction must
    not look finished). The archive's declared sizes and member count are checked
    against ``limits`` first, and the bytes written while extracting too; the first
    breach stops with a ValueError and leaves nothing."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    try:
        _unzip(archive, staging, folder, limits)
        os.replace(staging / folder, root / folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / folder


def _unzip(archive: Path, staging: Path, folder: str, limits: ExtractLimits) -> None:
    """The members of ``archive`` under ``folder`` (and no others) written under ``staging``,
    within ``limits``; a ValueError if the zip is damaged or lacks the folder."""
    try:
        with zipfile.ZipFile(archive) as zf:
            _extract_all(zf, staging, archive, limits, folder)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive} is not a valid zip ({err}); delete it to download it again") from err
    if not (staging / folder).is_dir():
        raise ValueError(f"{archive} does not hold the folder {folder}/ the manifest expects")


def _extract_all(zf: zipfile.ZipFile, staging: Path, archive: Path, limits: ExtractLimits,
                 folder: str | None = None) -> None:
    """Write every member of ``zf`` (only those under ``folder`` if given) under ``staging``
    as plain files and folders (symlink members become files holding their target, as
    ``zipfile`` writes them)."""
    prefix = folder.rstrip("/") + "/" if folder else ""
    members = [m for m in zf.infolist() if m.filename.startswith(prefix)]
    budget = limits.bytes_for(archive)
    declared = sum(m.file_size for m in members)
    if len(members) > limits.max_members:
        raise ValueError(f"{archive} holds {len(members)} files, over the limit of {limits.max_members}; "
                         f"refusing to extract it")
    if declared > budget:
        raise ValueError(f"{archive} would extract to {declared / 2**20:.0f} MiB, over the limit of "
                         f"{budget / 2**20:.0f} MiB; refusing to extract it")
    written = 0
    for member in members:
        target = _member_path(staging, member.filename, archive)
        if member.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > budget:  # a header that under-states its size
                    raise ValueError(f"{archive} extracts to more than the limit of {budget / 2**20:.0f} "
                                     f"MiB; refusing to extract it")
                out.write(chunk)


def _member_path(staging: Path, name: str, archive: Path) -> Path:
    """Where a member lands under ``staging``; an absolute or ``..`` name is refused."""
    parts = Path(name.replace("\\", "/")).parts
    if not parts or Path(name).is_absolute() or ".." in parts or ":" in parts[0]:
        raise ValueError(f"{archive} holds the member {brief(name)}, which leaves the folder it "
                         f"extracts to; refusing to extract it")
    return staging.joinpath(*parts)


class Layout(NamedTuple):
    """A dataset's layout built from its publisher's: ``convert(source, out, checksums,
    where, listed_in)`` builds in ``out`` the ``entries`` to put at the data root, which
    move there in this order (the split lists last: the data looks complete only once
    they are all in)."""

    entries: tuple[str, ...]
    convert: Callable[[Path, Path, dict[str, str], str, str], None]


def convert(archive: Path, root: Path, folder: str, layout: Layout, checksums: dict[str, str],
            listed_in: str, limits: ExtractLimits = ExtractLimits()) -> Path:
    """Build ``layout`` at ``root`` from the zip's ``folder``: extracted (within ``limits``)
    and converted in a staging folder inside ``root``, every file of ``checksums`` (read
    from ``listed_in``) checked there, and only then moved into place. A failure is a
    ValueError naming the file, and ``root`` is left as it was."""
    staging = Path(tempfile.mkdtemp(prefix=".convert.", dir=root))
    where = f"{archive}: {folder}"  # the files named in errors, as the zip holds them
    try:
        _unzip(archive, staging / "zip", folder, limits)
        out = staging / "out"
        out.mkdir()
        layout.convert(staging / "zip" / folder, out, checksums, where, listed_in)
        check_checksums(out, checksums, where, listed_in)
        for name in layout.entries:
            os.replace(out / name, root / name)
    except ValueError as err:
        raise ValueError(f"{err}; nothing was converted into {root}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def read_checksums(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of a ``sha256sum`` list (``<64 hex>  <path>`` lines, ``#``
    comments and blank lines skipped); a bad line, or a path that is absolute or climbs,
    is a ValueError naming the file and line."""
    checksums = {}
    for number, line in enumerate(read_text(path, "checksum list").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](\S.*)", line.rstrip())
        relpath = PurePosixPath(match[2]) if match else None
        if relpath is None or relpath.is_absolute() or ".." in relpath.parts:
            raise ValueError(f"{path}, line {number}: expected '<sha256>  <relative path>', "
                             f"got {brief(line)}")
        checksums[relpath.as_posix()] = match[1].lower()
    return checksums


def check_checksums(folder: Path, checksums: dict[str, str], where: str, listed_in: str | Path) -> None:
    """Every file of ``checksums`` is under ``folder`` with its sha256; else a ValueError
    naming the first that is not, as ``<where>/<relative path>``."""
    for relpath, digest in checksums.items():
        path = folder / relpath
        if not path.is_file():
            raise ValueError(f"{where}/{relpath} is missing (listed in {listed_in})")
        actual = file_sha256(path)
        if actual != digest:
            raise ValueError(f"{where}/{relpath} does not match its sha256 in {listed_in} "
                             f"(got {actual[:12]}..., expected {digest[:12]}...)")


CAMVID_SPLITS = ("train", "val", "test")


def _segnet_camvid(source: Path, out: Path, checksums: dict[str, str], where: str, listed_in: str) -> None:
    """Our CamVid layout (:mod:`algm.data.datasets`) in ``out`` from the SegNet tutorial's
    ``CamVid/`` folder ``source``: its ``{split}/<name>.png`` images (kept as PNG, which the
    loader reads where there is no ``.jpg``) and ``{split}annot/<name>.png`` labels moved
    as they are, each ``{split}.txt`` (``/SegNet/CamVid/train/<name>.png
    /SegNet/CamVid/trainannot/<name>.png`` lines) rewritten as frame names. A list must
    name exactly the frames whose labels ``checksums`` lists (the committed list: 367
    train, 101 val, 233 test frames), each with its image; the labels themselves are
    checked by :func:`convert`."""
    for split in CAMVID_SPLITS:
        listing = f"{where}/{split}.txt"
        names = _segnet_names(source / f"{split}.txt", listing)
        labelled = sorted(PurePosixPath(p).stem for p in checksums
                          if PurePosixPath(p).parent.as_posix() == f"{split}annot" and p.endswith(".png"))
        _same_frames(names, labelled, listing, listed_in)
        for name in names:
            if not (source / split / f"{name}.png").is_file():
                raise ValueError(f"{where}/{split}/{name}.png is missing (a frame of {split}.txt)")
        for folder in (split, f"{split}annot"):
            if (source / folder).is_dir():
                os.replace(source / folder, out / folder)
            else:  # no labels at all: the checksum check names the first missing one
                (out / folder).mkdir()
        (out / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))


def _segnet_names(path: Path, where: str) -> list[str]:
    """The frame names of a SegNet split list: the common stem of each ``<image>.png
    <label>.png`` line."""
    if not path.is_file():
        raise ValueError(f"{where} is missing")
    names = []
    for number, line in enumerate(read_text(path, "split list").splitlines(), 1):
        fields = line.split()
        stems = {PurePosixPath(field).stem for field in fields}
        if fields and (len(fields) != 2 or len(stems) != 1):
            raise ValueError(f"{where}, line {number}: expected '<image>.png <label>.png' of one frame, "
                             f"got {brief(line)}")
        names.extend(stems)
    return names


def _same_frames(names: list[str], labelled: list[str], where: str, listed_in: str) -> None:
    """A split list names each labelled frame once and nothing else; else a ValueError
    with the counts and the first difference."""
    if sorted(names) == labelled:
        return
    missing, extra = sorted(set(labelled) - set(names)), sorted(set(names) - set(labelled))
    detail = (f"without {missing[0]}" if missing else f"with {extra[0]}, which has no label there" if extra
              else "a frame twice")
    raise ValueError(f"{where} lists {len(names)} frames, {listed_in} has labels for {len(labelled)} "
                     f"({detail})")


# dataset -> the layout its data entry's ``converts`` folder is converted into
LAYOUTS: dict[str, Layout] = {
    "camvid": Layout(tuple(f"{split}{kind}" for kind in ("", "annot") for split in CAMVID_SPLITS)
                     + tuple(f"{split}.txt" for split in CAMVID_SPLITS), _segnet_camvid),
}


class Lock:
    """``<root>/zoo.lock.json``: ``{relpath: {"sha256", "url"}}``, the hash each file
    had on its first download (written atomically on every pin)."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        try:
            self.entries = json.loads(read_text(self.path, "lock file")) if self.path.exists() else {}
            if not isinstance(self.entries, dict):
                raise ValueError("not a mapping")
            for relpath, entry in self.entries.items():
                _check_hash(entry.get("sha256") if isinstance(entry, dict) else entry, "sha256", 64, relpath)
        except (ValueError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{self.path} is damaged ({clip(err)}); fix or delete it") from None

    def pinned(self, relpath: str) -> str | None:
        return self.entries.get(relpath, {}).get("sha256")

    def pin(self, relpath: str, sha256: str, url: str | None) -> None:
        self.entries[relpath] = {"sha256": sha256, "url": url}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.entries)


def _resolve(url: str | None, base: Path) -> str | None:
    """A plain relative path in the manifest is relative to the manifest's folder."""
    if url is None or urlparse(url).scheme or Path(url).is_absolute():
        return url
    return str(base / url)


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # (one letter: a Windows drive)
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r} in {url!r}: use http(s), "
                         f"a Google Drive link, file:// or a local path")
    return Path(url)


def _range_start(response: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _range_total(response: requests.Response) -> int | None:
    match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _reason(err: Exception) -> str:
    """A few words for a failed request: "Connection refused", "timed out", "HTTP 404 Not Found"."""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    if isinstance(err, requests.Timeout):
        return "timed out"
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
    return match.group(1).strip() if match else (str(err).splitlines() or [type(err).__name__])[0]


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch logs each download and, without a known hash, advice for its own API; our
    callers print their own lines."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
