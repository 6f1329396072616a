"""``algm-bench fetch`` against an HTTP server on 127.0.0.1 that each test starts itself.

Never touches the internet: HTTP goes to the local server, Google Drive downloads go to
a monkeypatched ``gdown.download``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gdown
import pytest
import yaml

import algm.cli
from algm import fetch as zoo
from algm.commands.fetch import DEFAULT_MANIFEST

CHECKPOINT = bytes(range(256)) * 256  # 64 KiB, enough to resume half-way
VARIANT = b"net_kwargs: {backbone: vit_small_patch16_384, n_cls: 150}\ndataset_kwargs: {dataset: ade20k}\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes), honouring ``Range: bytes=N-`` when
    ``server.ranges``; with ``server.cut_after`` set, drops the connection after that many
    body bytes (once). Logs (path, Range header, status, body bytes sent)."""

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            self.server.log.append((self.path, None, 404, 0))
            return
        asked = self.headers.get("Range")
        start = int(re.match(r"bytes=(\d+)-", asked).group(1)) if asked and self.server.ranges else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.server.log.append((self.path, asked, 416, 0))
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        sent = body[start:start + self.server.cut_after] if self.server.cut_after else body[start:]
        self.server.cut_after = None
        self.wfile.write(sent)
        self.close_connection = True
        self.server.log.append((self.path, asked, 206 if start else 200, len(sent)))

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.log, httpd.ranges, httpd.cut_after = {}, [], True, None
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def checkpoint_entry(backbone, urls, method="none", sha=None):
    return {"dataset": "ade20k", "backbone": backbone, "method": method, "published_in": "a test",
            "files": {name: {"url": url, "sha256": (sha or {}).get(name)} for name, url in urls.items()}}


def write_manifest(path: Path, checkpoints=(), data=()) -> Path:
    path.write_text(yaml.safe_dump({"checkpoints": list(checkpoints), "data": list(data)}))
    return path


def serve_model(server, backbone="vit-s16", method="none"):
    base = f"/{backbone}/{method}"
    server.files[f"{base}/checkpoint.pth"] = CHECKPOINT
    server.files[f"{base}/variant.yml"] = VARIANT
    return {"checkpoint.pth": server.url(f"{base}/checkpoint.pth"),
            "variant.yml": server.url(f"{base}/variant.yml")}


def lock_of(root: Path) -> dict:
    return json.loads((root / zoo.LOCK_NAME).read_text())


def test_full_download_into_layout_pins_the_lock(server, tmp_path):
    manifest = write_manifest(tmp_path / "zoo.yaml", [
        checkpoint_entry("vit-s16", serve_model(server, "vit-s16")),
        checkpoint_entry("vit-b16", serve_model(server, "vit-b16")),
    ])
    root = tmp_path / "ckpt"
    fetched = zoo.fetch("ade20k", manifest, backbones=["vit-s16"], checkpoints_root=root, progress=False)

    folder = root / "ade20k" / "vit-s16" / "none"
    assert [f.path for f in fetched] == [folder / "checkpoint.pth", folder / "variant.yml"]
    assert {f.status for f in fetched} == {"downloaded"}
    assert (folder / "checkpoint.pth").read_bytes() == CHECKPOINT
    assert (folder / "variant.yml").read_bytes() == VARIANT
    assert not (root / "ade20k" / "vit-b16").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no partial or temp file
    lock = lock_of(root)
    assert lock["ade20k/vit-s16/none/checkpoint.pth"]["sha256"] == sha256(CHECKPOINT)
    assert lock["ade20k/vit-s16/none/variant.yml"]["sha256"] == sha256(VARIANT)
    assert fetched[0].sha256 == sha256(CHECKPOINT)

    # Files in place are checked against the lock, not downloaded again.
    requests_before = len(server.log)
    again = zoo.fetch("ade20k", manifest, backbones=["vit-s16"], checkpoints_root=root, progress=False)
    assert {f.status for f in again} == {"present"}
    assert len(server.log) == requests_before


def test_resume_asks_only_for_the_missing_bytes(server, tmp_path):
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    folder = root / "ade20k" / "vit-s16" / "none"
    folder.mkdir(parents=True)
    half = len(CHECKPOINT) // 2 + 17
    (folder / ".checkpoint.pth.part").write_bytes(CHECKPOINT[:half])  # an interrupted download

    zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    assert (folder / "checkpoint.pth").read_bytes() == CHECKPOINT
    assert not (folder / ".checkpoint.pth.part").exists()
    (entry,) = [e for e in server.log if e[0].endswith("checkpoint.pth")]
    assert entry[1:] == (f"bytes={half}-", 206, len(CHECKPOINT) - half)


def test_a_dropped_connection_keeps_the_bytes_and_the_next_run_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CHUNK", 1024)  # whole chunks reach the disk; the one in flight is lost
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    folder = root / "ade20k" / "vit-s16" / "none"
    server.cut_after = 10_000

    with pytest.raises(zoo.FetchError, match="run fetch again"):
        zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)
    kept = (folder / ".checkpoint.pth.part").read_bytes()
    assert 10_000 - 1024 < len(kept) <= 10_000 and CHECKPOINT.startswith(kept)
    assert not (folder / "checkpoint.pth").exists()

    zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)
    assert (folder / "checkpoint.pth").read_bytes() == CHECKPOINT
    assert [e[1:] for e in server.log if e[0].endswith("checkpoint.pth")] == [
        (None, 200, 10_000), (f"bytes={len(kept)}-", 206, len(CHECKPOINT) - len(kept))]


def test_resume_from_a_server_without_ranges_downloads_everything(server, tmp_path):
    server.ranges = False
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    folder = root / "ade20k" / "vit-s16" / "none"
    folder.mkdir(parents=True)
    (folder / ".checkpoint.pth.part").write_bytes(CHECKPOINT[:1000])

    zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    assert (folder / "checkpoint.pth").read_bytes() == CHECKPOINT  # the 200 body replaced the partial


def test_a_complete_partial_is_kept_when_the_server_says_416(server, tmp_path):
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    folder = root / "ade20k" / "vit-s16" / "none"
    folder.mkdir(parents=True)
    (folder / ".checkpoint.pth.part").write_bytes(CHECKPOINT)

    zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    assert (folder / "checkpoint.pth").read_bytes() == CHECKPOINT
    assert [e[2] for e in server.log if e[0].endswith("checkpoint.pth")] == [416]


def test_corrupted_download_against_the_manifest_checksum_leaves_nothing(server, tmp_path):
    urls = serve_model(server)
    server.files["/vit-s16/none/checkpoint.pth"] = CHECKPOINT[:-1] + b"\x00"  # one byte off
    manifest = write_manifest(tmp_path / "zoo.yaml", [
        checkpoint_entry("vit-s16", urls, sha={"checkpoint.pth": sha256(CHECKPOINT)})])
    root = tmp_path / "ckpt"

    with pytest.raises(ValueError, match=r"checkpoint\.pth.*checksum"):
        zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    folder = root / "ade20k" / "vit-s16" / "none"
    assert list(folder.iterdir()) == []  # no target, no partial, no temporary file
    assert not (root / zoo.LOCK_NAME).exists()


def test_corrupted_download_against_the_pinned_checksum_leaves_nothing(server, tmp_path):
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)
    target = root / "ade20k" / "vit-s16" / "none" / "checkpoint.pth"
    target.unlink()
    server.files["/vit-s16/none/checkpoint.pth"] = b"not the pinned file"

    with pytest.raises(ValueError, match=re.escape(str(target))):
        zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    assert sorted(p.name for p in target.parent.iterdir()) == ["variant.yml"]
    assert lock_of(root)["ade20k/vit-s16/none/checkpoint.pth"]["sha256"] == sha256(CHECKPOINT)


def test_a_file_in_place_that_differs_from_the_lock_is_an_error_and_kept(server, tmp_path):
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)
    target = root / "ade20k" / "vit-s16" / "none" / "checkpoint.pth"
    target.write_bytes(b"edited by hand")

    with pytest.raises(ValueError, match="pinned in .*delete it"):
        zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)
    assert target.read_bytes() == b"edited by hand"


def ade_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ADEChallengeData2016/images/validation/ADE_val_00000001.jpg", b"jpeg")
        zf.writestr("ADEChallengeData2016/annotations/validation/ADE_val_00000001.png", b"png")
    return buffer.getvalue()


def test_the_data_zip_is_checked_and_extracted_into_the_data_root(server, tmp_path):
    archive = ade_zip()
    server.files["/ADEChallengeData2016.zip"] = archive
    manifest = write_manifest(tmp_path / "zoo.yaml", data=[{
        "dataset": "ade20k", "file": "ADEChallengeData2016.zip", "url": server.url("/ADEChallengeData2016.zip"),
        "sha256": None, "sha1": hashlib.sha1(archive).hexdigest(), "extracts_to": "ADEChallengeData2016"}])
    data_root = tmp_path / "data"

    fetched = zoo.fetch("ade20k", manifest, data=True, checkpoints_root=tmp_path / "ckpt",
                        data_root=data_root, progress=False)

    assert [(f.path, f.status) for f in fetched] == [(data_root / "ADEChallengeData2016", "extracted")]
    base = data_root / "ADEChallengeData2016"
    assert (base / "images" / "validation" / "ADE_val_00000001.jpg").read_bytes() == b"jpeg"
    assert (base / "annotations" / "validation" / "ADE_val_00000001.png").read_bytes() == b"png"
    assert lock_of(data_root)["ADEChallengeData2016.zip"]["sha256"] == sha256(archive)
    assert sorted(p.name for p in data_root.iterdir()) == ["ADEChallengeData2016", "ADEChallengeData2016.zip",
                                                           zoo.LOCK_NAME]
    requests_before = len(server.log)
    again = zoo.fetch("ade20k", manifest, data=True, checkpoints_root=tmp_path / "ckpt",
                      data_root=data_root, progress=False)
    assert again[0].status == "present" and len(server.log) == requests_before


def test_a_zip_without_the_expected_folder_extracts_nothing(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("other/file.txt", b"x")
    server.files["/ade.zip"] = buffer.getvalue()
    manifest = write_manifest(tmp_path / "zoo.yaml", data=[{
        "dataset": "ade20k", "file": "ade.zip", "url": server.url("/ade.zip"), "extracts_to": "ADEChallengeData2016"}])
    data_root = tmp_path / "data"

    with pytest.raises(ValueError, match="does not hold the folder ADEChallengeData2016"):
        zoo.fetch("ade20k", manifest, data=True, data_root=data_root, checkpoints_root=tmp_path, progress=False)
    assert sorted(p.name for p in data_root.iterdir()) == ["ade.zip", zoo.LOCK_NAME]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_manifest(tmp_path: Path) -> tuple[Path, str]:
    url = f"http://127.0.0.1:{free_port()}/seg_small_mask/checkpoint.pth"  # nothing listens there
    return write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", {"checkpoint.pth": url})]), url


def test_offline_fails_with_one_line_naming_the_url_and_the_manual_step(tmp_path):
    manifest, url = offline_manifest(tmp_path)
    root = tmp_path / "ckpt"
    target = root / "ade20k" / "vit-s16" / "none" / "checkpoint.pth"

    with pytest.raises(zoo.FetchError) as caught:
        zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    message = str(caught.value)
    assert "\n" not in message
    assert url in message and f"download it by hand to {target}" in message
    assert "Connection refused" in message
    assert not target.exists()


def test_offline_cli_exits_2_with_one_line(tmp_path, capsys):
    manifest, url = offline_manifest(tmp_path)
    code = algm.cli.main(["fetch", "--dataset", "ade20k", "--manifest", str(manifest),
                          "--checkpoints", str(tmp_path / "ckpt"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("algm-bench fetch: error:") and url in err


def test_cli_prints_each_file_with_its_hash(server, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", serve_model(server))])
    root = tmp_path / "ckpt"
    assert algm.cli.main(["fetch", "--dataset", "ade20k", "--backbones", "vit-s16", "--manifest",
                          str(manifest), "--checkpoints", str(root), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    target = root / "ade20k" / "vit-s16" / "none" / "checkpoint.pth"
    assert lines[0] == f"downloaded {target}  sha256 {sha256(CHECKPOINT)[:12]}"


def test_drive_links_go_through_gdown(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, output, quiet, resume, timeout):
        calls.append((url, resume))
        Path(output).write_bytes(CHECKPOINT)
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    url = "https://drive.google.com/file/d/1bPAu8ej0p1ypubbpFN5hJ-EyC-rCCdsw/view?usp=sharing"
    manifest = write_manifest(tmp_path / "zoo.yaml", [
        checkpoint_entry("vit-s16", {"checkpoint.pth": url}, method="algm")])
    root = tmp_path / "ckpt"

    (fetched,) = zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    assert calls == [(url, True)]
    assert fetched.path == root / "ade20k" / "vit-s16" / "algm" / "checkpoint.pth"
    assert fetched.path.read_bytes() == CHECKPOINT
    assert lock_of(root)["ade20k/vit-s16/algm/checkpoint.pth"]["sha256"] == sha256(CHECKPOINT)
    assert sorted(p.name for p in fetched.path.parent.iterdir()) == ["checkpoint.pth"]


def test_local_files_are_sources_too(tmp_path):
    (tmp_path / "by_hand").mkdir()
    (tmp_path / "by_hand" / "checkpoint.pth").write_bytes(CHECKPOINT)
    (tmp_path / "by_hand" / "variant.yml").write_bytes(VARIANT)
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", {
        "checkpoint.pth": (tmp_path / "by_hand" / "checkpoint.pth").as_uri(),  # file://
        "variant.yml": "by_hand/variant.yml"})])  # relative to the manifest's folder
    root = tmp_path / "ckpt"

    fetched = zoo.fetch("ade20k", manifest, checkpoints_root=root, progress=False)

    assert [f.path.read_bytes() for f in fetched] == [CHECKPOINT, VARIANT]


def test_bad_selections_are_clear_errors(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "zoo.yaml", [checkpoint_entry("vit-s16", {"checkpoint.pth": "x"})], data=[
        {"dataset": "cityscapes", "url": None, "note": "register at cityscapes-dataset.com"}])
    with pytest.raises(ValueError, match="the manifest has no checkpoints for camvid"):
        zoo.fetch("camvid", manifest, checkpoints_root=tmp_path)
    with pytest.raises(ValueError, match="no ade20k checkpoints for vit-h14.*it has: vit-s16"):
        zoo.fetch("ade20k", manifest, backbones=["vit-h14"], checkpoints_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no public download: register at cityscapes-dataset.com"):
        zoo.fetch("cityscapes", manifest, data=True, checkpoints_root=tmp_path, data_root=tmp_path)
    write_manifest(tmp_path / "bad.yaml", [{"dataset": "ade20k", "backbone": "vit-s16"}])
    with pytest.raises(ValueError, match=r"checkpoints\[0\] lacks method, files"):
        zoo.fetch("ade20k", tmp_path / "bad.yaml", checkpoints_root=tmp_path)


def test_roots_default_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CHECKPOINTS_ENV, str(tmp_path / "env"))
    assert zoo.checkpoints_dir() == tmp_path / "env"
    assert zoo.checkpoints_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(zoo.CHECKPOINTS_ENV)
    monkeypatch.setenv("ALGM_BENCH_CACHE", str(tmp_path / "cache"))
    assert zoo.checkpoints_dir() == tmp_path / "cache" / "checkpoints"


def test_the_zoo_lists_the_published_ade20k_checkpoints_and_data():
    manifest = zoo.load_manifest(DEFAULT_MANIFEST)
    ade = {(e["backbone"], e["method"]): e for e in manifest["checkpoints"] if e["dataset"] == "ade20k"}
    assert set(ade) == {(b, m) for b in ("vit-ti16", "vit-s16", "vit-b16", "vit-l16") for m in ("none", "algm")}
    segmenter = "https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints/ade20k/{}/{}"
    names = {"vit-ti16": "seg_tiny_mask", "vit-s16": "seg_small_mask", "vit-b16": "seg_base_mask",
             "vit-l16": "seg_large_mask_640"}
    for (backbone, method), entry in ade.items():
        assert set(entry["files"]) == {"checkpoint.pth", "variant.yml"}
        for name, spec in entry["files"].items():
            if method == "none":
                assert spec["url"] == segmenter.format(names[backbone], name)
            else:
                assert gdown.parse_url.parse_url(spec["url"])[0]  # a Drive file id
    (data,) = [e for e in manifest["data"] if e["dataset"] == "ade20k"]
    assert data["url"] == "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
    assert data["extracts_to"] == "ADEChallengeData2016"


# ------------------------------------------------------------------ hostile manifests (issue 27)
def _listing(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize("edit", [
    lambda ckpt, data: ckpt.update(backbone="../../../../outside"),
    lambda ckpt, data: ckpt.update(method="/tmp/absolute"),
    lambda ckpt, data: ckpt["files"].update({"../../escape.pth": dict(ckpt["files"]["checkpoint.pth"])}),
    lambda ckpt, data: data.update(file="../outside.zip"),
    lambda ckpt, data: data.update(extracts_to="../ADEChallengeData2016"),
])
def test_a_manifest_path_leaving_its_root_is_refused_before_any_download(server, tmp_path, capsys, edit):
    ckpt = checkpoint_entry("vit-s16", serve_model(server))
    server.files["/ade.zip"] = ade_zip()
    data = {"dataset": "ade20k", "file": "ade.zip", "url": server.url("/ade.zip"), "extracts_to": "ADEChallengeData2016"}
    edit(ckpt, data)
    (tmp_path / "m").mkdir()
    manifest = write_manifest(tmp_path / "m" / "zoo.yaml", [ckpt], [data])
    roots = tmp_path / "roots"
    argv = ["fetch", "--dataset", "ade20k", "--manifest", str(manifest), "--checkpoints", str(roots / "c" / "k"),
            "--data", "--data-root", str(roots / "d" / "a"), "--no-progress"]
    assert algm.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"algm-bench fetch: error: the manifest names the path '.*', which leaves .*; refusing "
                        r"to write outside it\n", err)
    assert server.log == []  # nothing downloaded
    assert _listing(tmp_path) == [tmp_path / "m", manifest]  # nothing written (outside or in), nothing pinned


@pytest.mark.parametrize("sha, message", [
    ("0" * 64, "checkpoints[0].files.checkpoint.pth.sha256 must be a quoted string of 64 hex digits, got the "
               "int 0 (quote it)"),
    ("'abc'", "checkpoints[0].files.checkpoint.pth.sha256 must be 64 hex digits, got 'abc'"),
])
def test_a_checksum_must_be_a_hex_string_of_its_length(server, tmp_path, sha, message):
    urls = serve_model(server)
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(f"checkpoints:\n- {{dataset: ade20k, backbone: vit-s16, method: none, files: "
                        f"{{checkpoint.pth: {{url: '{urls['checkpoint.pth']}', sha256: {sha}}}}}}}\n")
    with pytest.raises(ValueError) as err:
        zoo.fetch("ade20k", manifest, checkpoints_root=tmp_path / "ckpt", progress=False)
    assert str(err.value) == f"{manifest}: {message}"
    assert server.log == [] and not (tmp_path / "ckpt").exists()


def test_a_manifest_with_aliases_is_refused(tmp_path):
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text("a: &a [x, x, x]\nb: &b [*a, *a, *a]\ncheckpoints: []\n")
    with pytest.raises(ValueError, match=r"^.*zoo.yaml: not valid YAML: aliases \(\*name\) are not allowed here"):
        zoo.load_manifest(manifest)


def _zip(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_from_its_declared_sizes_and_leaves_nothing(tmp_path):
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_zip({"ADEChallengeData2016/zeros.bin": bytes(64 << 20)}))  # 64 MiB from ~64 KiB
    root = tmp_path / "data"
    root.mkdir()
    manifest = write_manifest(tmp_path / "zoo.yaml", data=[{
        "dataset": "ade20k", "file": "bomb.zip", "url": str(bomb), "extracts_to": "ADEChallengeData2016"}])
    with pytest.raises(ValueError) as err:
        zoo.fetch("ade20k", manifest, data=True, data_root=root, checkpoints_root=tmp_path / "c", progress=False)
    assert str(err.value) == (f"{root / 'bomb.zip'} would extract to 64 MiB, over the limit of 50 MiB; "
                              f"refusing to extract it")
    assert sorted(p.name for p in root.iterdir()) == ["bomb.zip", zoo.LOCK_NAME]  # no folder, no staging


def test_extraction_limits_members_and_bytes_written(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({f"ADEChallengeData2016/{i}.txt": b"x" * 100 for i in range(5)}))
    with pytest.raises(ValueError, match=r"holds 5 files, over the limit of 4; refusing to extract it$"):
        zoo.extract(archive, tmp_path, "ADEChallengeData2016", zoo.ExtractLimits(max_members=4))
    with pytest.raises(ValueError, match=r"would extract to 0 MiB, over the limit of 0 MiB"):
        zoo.extract(archive, tmp_path, "ADEChallengeData2016", zoo.ExtractLimits(max_bytes=499))
    archive.write_bytes(_zip({"ADEChallengeData2016/../../evil.txt": b"x"}))
    with pytest.raises(ValueError, match=r"holds the member 'ADEChallengeData2016/../../evil.txt', which leaves"):
        zoo.extract(archive, tmp_path, "ADEChallengeData2016")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]
