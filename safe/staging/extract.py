"""Safe extraction of .tar/.tar.gz/.tgz/.tar.bz2/.tar.xz/.zip archives (issue 3).

An archive is checked as a whole before anything is written: absolute names, `..` components, device files,
FIFOs, links whose target leaves the extraction folder and a declared total size over the limit (archive
bombs) refuse the whole archive. Writing then goes into a fresh temporary folder inside the destination,
checking at every step that the real path of what is written stays inside that folder (links created earlier
cannot redirect later members) and counting the bytes actually written. Only a complete extraction is moved
into place; anything else leaves the destination as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from safe.core.diskspace import disk_full_error, free_bytes, is_disk_full, on_disk
from safe.core.errors import SafeError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
TEMP_PREFIX = ".safe-extract-"
DEFAULT_MAX_BYTES = 1 << 40  # 1 TiB: larger than any dataset archive here, far smaller than a bomb
DEFAULT_MAX_MEMBERS = 5_000_000
CHUNK = 1 << 20


class UnsafeArchiveError(SafeError):
    """An archive refused as a whole (escaping path, link, device file, size limit) or unreadable."""


@dataclass
class Member:
    """One archive entry, normalised: `parts` are the path components inside the extraction folder."""

    parts: tuple[str, ...]
    kind: str  # "file", "dir", "symlink", "hardlink"
    size: int = 0
    link: str = ""  # symlink target text, or the normalised member path a hardlink copies
    handle: Any = None  # TarInfo or ZipInfo


def archive_kind(path: str | Path) -> str | None:
    """'tar', 'zip' or None, from the name first and from the magic bytes for unknown names."""
    name = str(path).lower()
    if name.endswith(".zip"):
        return "zip"
    if any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    if name.endswith((".json", ".jsonl", ".csv", ".txt", ".wav", ".flac", ".mp3", ".ogg", ".jpg", ".png")):
        return None
    try:
        if zipfile.is_zipfile(path):
            return "zip"
        with open(path, "rb") as handle:
            head = handle.read(265)
        # gzip, bzip2, xz magic, or the ustar signature of an uncompressed tar.
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[257:262] == b"ustar":
            return "tar"
    except OSError:
        return None
    return None


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5T' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise SafeError(f"Cannot read the size {text!r}; write a byte count or a number with K, M, G or T.")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _normalise(name: str, archive: Path) -> tuple[str, ...]:
    """Path components of a member name, refusing absolute names and `..` (backslashes count as separators)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"{archive.name} has an absolute member path {name!r}; refusing the whole archive.")
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive.name} has a member path with '..' ({name!r}); refusing the whole archive.")
    return tuple(parts)


def _link_stays_inside(parts: tuple[str, ...], target: str) -> bool:
    """Whether a symlink at `parts` pointing to `target` resolves (lexically) inside the extraction root."""
    if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target):
        return False
    depth = list(parts[:-1])
    for piece in re.split(r"[\\/]+", target):
        if piece in ("", "."):
            continue
        if piece == "..":
            if not depth:
                return False
            depth.pop()
        else:
            depth.append(piece)
    return True


def _tar_members(archive: Path, tar: tarfile.TarFile) -> Iterator[Member]:
    for info in tar:
        parts = _normalise(info.name, archive)
        if not parts:
            continue
        if info.isdir():
            yield Member(parts, "dir", handle=info)
        elif info.isreg():
            yield Member(parts, "file", size=info.size, handle=info)
        elif info.issym():
            if not _link_stays_inside(parts, info.linkname):
                raise UnsafeArchiveError(
                    f"{archive.name}: symlink {info.name!r} -> {info.linkname!r} points outside the extraction "
                    "folder; refusing the whole archive."
                )
            yield Member(parts, "symlink", link=info.linkname, handle=info)
        elif info.islnk():
            try:
                target = _normalise(info.linkname, archive)
            except UnsafeArchiveError:
                raise UnsafeArchiveError(
                    f"{archive.name}: hard link {info.name!r} -> {info.linkname!r} points outside the extraction "
                    "folder; refusing the whole archive."
                ) from None
            yield Member(parts, "hardlink", size=info.size, link="/".join(target), handle=info)
        else:
            raise UnsafeArchiveError(
                f"{archive.name}: member {info.name!r} is a device file or FIFO; refusing the whole archive."
            )


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> Iterator[Member]:
    for info in zf.infolist():
        parts = _normalise(info.filename, archive)
        if not parts:
            continue
        mode = info.external_attr >> 16
        if info.is_dir():
            yield Member(parts, "dir", handle=info)
        elif stat.S_ISLNK(mode):
            target = zf.read(info).decode("utf-8", "replace")
            if not _link_stays_inside(parts, target):
                raise UnsafeArchiveError(
                    f"{archive.name}: symlink {info.filename!r} -> {target!r} points outside the extraction "
                    "folder; refusing the whole archive."
                )
            yield Member(parts, "symlink", link=target, handle=info)
        elif mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise UnsafeArchiveError(
                f"{archive.name}: member {info.filename!r} is a device file or FIFO; refusing the whole archive."
            )
        else:
            yield Member(parts, "file", size=info.file_size, handle=info)


def scan_archive(archive: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_members: int = DEFAULT_MAX_MEMBERS) -> list[Member]:
    """Check every member before anything is written; raise UnsafeArchiveError on the first problem."""
    archive = Path(archive)
    kind = archive_kind(archive)
    if kind is None:
        raise UnsafeArchiveError(f"{archive.name} is not a tar or zip archive.")
    members: list[Member] = []
    total = 0
    seen_files: set[tuple[str, ...]] = set()
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                iterator = list(_zip_members(archive, zf))
        else:
            with tarfile.open(archive, "r:*") as tar:
                iterator = list(_tar_members(archive, tar))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UnsafeArchiveError(f"{archive.name} is corrupt or truncated ({exc}); download it again.") from None
    for member in iterator:
        if member.kind == "hardlink" and tuple(member.link.split("/")) not in seen_files:
            raise UnsafeArchiveError(
                f"{archive.name}: hard link {'/'.join(member.parts)!r} -> {member.link!r} does not refer to an "
                "earlier file of the archive; refusing the whole archive."
            )
        if member.kind in ("file", "hardlink"):
            seen_files.add(member.parts)
            total += member.size
        members.append(member)
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{archive.name} would extract more than the limit of {max_bytes:,} bytes (archive bomb guard); "
                "raise --max-extract-bytes if the archive is genuine."
            )
        if len(members) > max_members:
            raise UnsafeArchiveError(f"{archive.name} has more than {max_members:,} members; refusing it.")
    return members


class _Writer:
    """Writes members under `root`, re-checking real paths so no link can redirect a write outside it."""

    def __init__(self, root: Path, max_bytes: int, archive: Path):
        self.root = Path(os.path.realpath(root))
        self.max_bytes = max_bytes
        self.archive = archive
        self.written = 0

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def _refuse(self, parts: tuple[str, ...], why: str) -> None:
        raise UnsafeArchiveError(f"{self.archive.name}: member {'/'.join(parts)!r} {why}; refusing the whole archive.")

    def parent(self, parts: tuple[str, ...]) -> str:
        """Create the member's parent folders one by one; every existing step must really be inside root."""
        current = str(self.root)
        for piece in parts[:-1]:
            current = os.path.join(current, piece)
            if os.path.lexists(current):
                if not self._inside(current) or not os.path.isdir(current):
                    self._refuse(parts, "would be written through a link that leaves the extraction folder")
            else:
                os.mkdir(current)
        return os.path.join(current, parts[-1])

    def _clear(self, path: str, parts: tuple[str, ...]) -> None:
        # A later member replaces an earlier file or link of the same name (tar semantics); never a folder.
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.lexists(path):
            self._refuse(parts, "would replace a folder")

    def directory(self, parts: tuple[str, ...]) -> None:
        path = self.parent(parts)
        if os.path.lexists(path):
            if not (os.path.isdir(path) and self._inside(path)):
                self._refuse(parts, "is a folder that clashes with a link or file")
            return
        os.mkdir(path)

    def file(self, parts: tuple[str, ...], source: IO[bytes], mode: int = 0o644) -> None:
        path = self.parent(parts)
        self._clear(path, parts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode & 0o755 | 0o600)
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise UnsafeArchiveError(
                        f"{self.archive.name} wrote more than the limit of {self.max_bytes:,} bytes while extracting "
                        "(archive bomb guard); raise --max-extract-bytes if the archive is genuine."
                    )
                out.write(chunk)

    def symlink(self, parts: tuple[str, ...], target: str) -> None:
        path = self.parent(parts)
        self._clear(path, parts)
        if not self._inside(os.path.join(os.path.dirname(path), target)):
            self._refuse(parts, f"is a symlink to {target!r}, which resolves outside the extraction folder")
        os.symlink(target, path)

    def hardlink(self, parts: tuple[str, ...], target: str) -> None:
        # Copy the earlier member's content instead of linking: a real hard link could alias a file outside.
        source = os.path.join(str(self.root), *target.split("/"))
        if not self._inside(source) or not os.path.isfile(source):
            self._refuse(parts, f"is a hard link to {target!r}, which is not a file inside the extraction folder")
        with open(source, "rb") as handle:
            self.file(parts, handle)


def _write_members(archive: Path, members: list[Member], root: Path, max_bytes: int, progress=None) -> None:
    writer = _Writer(root, max_bytes, archive)
    kind = archive_kind(archive)
    opener = zipfile.ZipFile(archive) if kind == "zip" else tarfile.open(archive, "r:*")
    with opener as container:
        for member in members:
            if member.kind == "dir":
                writer.directory(member.parts)
            elif member.kind == "symlink":
                writer.symlink(member.parts, member.link)
            elif member.kind == "hardlink":
                writer.hardlink(member.parts, member.link)
            else:
                if isinstance(container, zipfile.ZipFile):  # kind == "zip"
                    mode = (member.handle.external_attr >> 16) & 0o777 or 0o644
                    source = container.open(member.handle)
                else:
                    mode = member.handle.mode
                    extracted = container.extractfile(member.handle)
                    assert extracted is not None  # a regular file member
                    source = extracted
                with source:
                    writer.file(member.parts, source, mode)
            if progress is not None:
                progress.update(1)


def _merge_into(source: Path, destination: Path) -> None:
    """Move the entries of `source` into `destination`: new entries are renamed, folders merged, files replaced."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        target = destination / entry.name
        if not os.path.lexists(target):
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge_into(entry, target)
        elif target.is_dir() and not target.is_symlink():
            raise SafeError(f"Cannot put file {entry.name} in place of the folder {target}; move that folder away.")
        else:
            os.replace(entry, target)


def clean_stale_temps(destination: str | Path) -> None:
    """Remove temporary folders an interrupted run left behind (they never hold a complete dataset)."""
    destination = Path(destination)
    if destination.is_dir():
        for entry in destination.glob(TEMP_PREFIX + "*"):
            shutil.rmtree(entry, ignore_errors=True)


def extract_archive(
    archive: str | Path,
    destination: str | Path,
    *,
    strip_folder: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    show_progress: bool = False,
) -> list[str]:
    """Extract `archive` into `destination` and return the top-level names it put there.

    `strip_folder`: when every member lies under one folder of that name (case-insensitive), its content goes
    straight into `destination` (an `audiocaps.tar.gz` holding `audiocaps/...` lands in `<root>/audiocaps/`).
    """
    archive = Path(archive)
    destination = Path(destination)
    members = scan_archive(archive, max_bytes=max_bytes, max_members=max_members)
    destination.mkdir(parents=True, exist_ok=True)
    # Every file and folder takes whole blocks: a million 1-byte files need 4 GB, not 1 MB.
    needed = sum(on_disk(m.size) if m.kind in ("file", "hardlink") else on_disk(0) for m in members)
    free = free_bytes(destination)
    if free is not None and needed > free:
        raise disk_full_error(destination, needed)
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=destination))
    try:
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(members), desc=f"extract {archive.name}", unit="file", leave=False)
        try:
            _write_members(archive, members, temp, max_bytes, progress)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            if is_disk_full(exc):
                shutil.rmtree(temp, ignore_errors=True)  # first, so the message counts the space it gives back
                raise disk_full_error(destination, needed) from None
            raise UnsafeArchiveError(f"{archive.name} could not be extracted ({exc}); download it again.") from None
        finally:
            if progress is not None:
                progress.close()
        top = temp
        entries = list(temp.iterdir())
        if strip_folder and len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() \
                and entries[0].name.lower() == strip_folder.lower():
            top = entries[0]
        names = sorted(entry.name for entry in top.iterdir())
        _merge_into(top, destination)
        return names
    finally:
        shutil.rmtree(temp, ignore_errors=True)
