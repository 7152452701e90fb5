"""Safe archive extraction: hostile archives are refused whole and nothing lands outside the destination."""

import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from safe.staging import extract as extract_module
from safe.staging.extract import UnsafeArchiveError, extract_archive, parse_size, scan_archive

REPO = Path(__file__).resolve().parents[1]


def _tar(path: Path, members: list[tuple], mode: str = "w") -> Path:
    """members: (name, kind, payload) with kind in file/dir/symlink/hardlink/chr."""
    with tarfile.open(path, mode) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _zip(path: Path, members: list[tuple]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, kind, payload in members:
            if kind == "symlink":
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, payload)
            else:
                zf.writestr(name, payload)
    return path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path):
    """<tmp>/dest is the destination; anything written elsewhere under <tmp>/ would be an escape."""
    (tmp_path / "dest").mkdir()
    return tmp_path


def _assert_refused(archive: Path, sandbox: Path, match: str, **kwargs):
    before = _tree(sandbox)
    with pytest.raises(UnsafeArchiveError, match=match):
        extract_archive(archive, sandbox / "dest", **kwargs)
    assert _tree(sandbox) == before  # nothing written anywhere: not outside, not a half tree inside


def test_good_tar_gz_extracts_with_inside_links_and_strip(sandbox):
    archive = _tar(sandbox / "audiocaps.tar.gz", [
        ("audiocaps/", "dir", None),
        ("audiocaps/audiocaps_train.jsonl", "file", '{"id": 1}\n'),
        ("audiocaps/audio/a.wav", "file", b"RIFF...."),
        ("audiocaps/audio/alias.wav", "symlink", "a.wav"),
        ("audiocaps/audio/copy.wav", "hardlink", "audiocaps/audio/a.wav"),
    ], "w:gz")
    names = extract_archive(archive, sandbox / "dest", strip_folder="audiocaps")
    dest = sandbox / "dest"
    assert names == ["audio", "audiocaps_train.jsonl"]
    assert (dest / "audiocaps_train.jsonl").read_text() == '{"id": 1}\n'
    assert (dest / "audio" / "alias.wav").is_symlink() and (dest / "audio" / "alias.wav").read_bytes() == b"RIFF...."
    copy = dest / "audio" / "copy.wav"
    assert copy.read_bytes() == b"RIFF...." and not copy.is_symlink()
    assert not list(dest.glob(".safe-extract-*"))


def test_two_archives_merge_into_one_folder(sandbox):
    a = _zip(sandbox / "part1.zip", [("audio/x.wav", "file", "x"), ("m.jsonl", "file", "old")])
    b = _tar(sandbox / "part2.tar", [("audio/y.wav", "file", "y"), ("m.jsonl", "file", "new")])
    extract_archive(a, sandbox / "dest")
    extract_archive(b, sandbox / "dest")
    assert _tree(sandbox / "dest") == {"audio", "audio/x.wav", "audio/y.wav", "m.jsonl"}
    assert (sandbox / "dest" / "m.jsonl").read_text() == "new"


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "..\\evil.txt"])
def test_tar_dotdot_refused(sandbox, name):
    archive = _tar(sandbox / "a.tar", [("fine.txt", "file", "fine"), (name, "file", "evil")])
    _assert_refused(archive, sandbox, r"'\.\.'")


def test_absolute_paths_refused_in_tar_and_zip(sandbox):
    _assert_refused(_tar(sandbox / "a.tar", [(str(sandbox / "evil.txt"), "file", "evil")]), sandbox, "absolute")
    _assert_refused(_zip(sandbox / "a.zip", [("/evil.txt", "file", "evil")]), sandbox, "absolute")
    _assert_refused(_zip(sandbox / "b.zip", [("C:/evil.txt", "file", "evil")]), sandbox, "absolute")


def test_zip_dotdot_refused(sandbox):
    archive = _zip(sandbox / "a.zip", [("ok.txt", "file", "ok"), ("../evil.txt", "file", "x")])
    _assert_refused(archive, sandbox, r"'\.\.'")


@pytest.mark.parametrize("target", ["/etc", "../..", "../../outside", "../sub/../../x"])
def test_escaping_symlinks_refused(sandbox, target):
    _assert_refused(_tar(sandbox / "a.tar", [("sub/", "dir", None), ("sub/link", "symlink", target)]), sandbox,
                    "symlink")


def test_zip_escaping_symlink_refused(sandbox):
    _assert_refused(_zip(sandbox / "a.zip", [("link", "symlink", "../../etc/passwd")]), sandbox, "symlink")


def test_write_through_chained_links_refused(sandbox):
    # Each link looks harmless alone (l1 -> d/.. is the root while d does not exist, d -> . is the root), but
    # together l1 resolves to the parent of the extraction folder: the real-path check at write time stops it.
    archive = _tar(sandbox / "a.tar", [("l1", "symlink", "d/.."), ("d", "symlink", "."), ("l1/evil.txt", "file", "x")])
    _assert_refused(archive, sandbox, "outside|through a link")
    assert not (sandbox / "evil.txt").exists()


def test_hardlink_escaping_or_dangling_refused(sandbox):
    _assert_refused(_tar(sandbox / "a.tar", [("h", "hardlink", "../../etc/passwd")]), sandbox, "hard link")
    _assert_refused(_tar(sandbox / "b.tar", [("h", "hardlink", "etc/passwd")]), sandbox, "earlier file")


def test_device_file_refused(sandbox):
    _assert_refused(_tar(sandbox / "a.tar", [("ok.txt", "file", "ok"), ("null", "chr", None)]), sandbox, "device")


def test_archive_bomb_refused_by_declared_and_streamed_size(sandbox):
    zeros = b"\0" * (3 << 20)
    bomb = _tar(sandbox / "bomb.tar.gz", [("a.bin", "file", zeros)], "w:gz")
    assert bomb.stat().st_size < 50_000  # tiny archive, large content
    _assert_refused(bomb, sandbox, "archive bomb", max_bytes=parse_size("1M"))
    zbomb = _zip(sandbox / "bomb.zip", [("a.bin", "file", zeros), ("b.bin", "file", zeros)])
    _assert_refused(zbomb, sandbox, "archive bomb", max_bytes=parse_size("5M"))


def test_size_limit_also_counts_bytes_actually_written(sandbox, monkeypatch):
    archive = _tar(sandbox / "a.tar", [("a.bin", "file", b"x" * 5000)])
    members = scan_archive(archive)
    for member in members:
        member.size = 1  # a lying header: the streaming count must still stop it
    monkeypatch.setattr(extract_module, "scan_archive", lambda *a, **k: members)
    _assert_refused(archive, sandbox, "while extracting", max_bytes=1000)


def test_interrupted_extraction_leaves_no_half_dataset(sandbox, monkeypatch):
    archive = _tar(sandbox / "a.tar", [(f"audio/{i}.wav", "file", "x" * 10) for i in range(5)])
    original = extract_module._Writer.file
    calls = {"n": 0}

    def failing(self, parts, source, mode=0o644):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk unplugged")
        return original(self, parts, source, mode)

    monkeypatch.setattr(extract_module._Writer, "file", failing)
    _assert_refused(archive, sandbox, "could not be extracted")
    assert calls["n"] == 3


def test_truncated_archive_is_reported(sandbox):
    good = _tar(sandbox / "a.tar.gz", [("a.bin", "file", os.urandom(200_000))], "w:gz")
    cut = sandbox / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:50_000])
    _assert_refused(cut, sandbox, "corrupt or truncated")


def test_parse_size():
    assert parse_size("1M") == 1 << 20 and parse_size("2G") == 2 << 30 and parse_size("123") == 123
    assert parse_size("1.5k") == 1536


def test_download_command_refuses_hostile_archive(sandbox):
    archive = _tar(sandbox / "evil.tar", [("ok.txt", "file", "ok"), ("../../evil.txt", "file", "x")])
    dest = sandbox / "dest"
    result = subprocess.run(
        [sys.executable, "-m", "safe.cli", "data", "download", "--audiocaps-url", archive.as_uri(),
         "--destination", str(dest), "--retries", "0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refusing the whole archive" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (sandbox / "evil.txt").exists() and not (sandbox.parent / "evil.txt").exists()
    assert not (dest / "audiocaps").exists() or not any((dest / "audiocaps").iterdir())
