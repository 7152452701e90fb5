"""`safe data download` / `python -m experiments.full_training.download_data`: stage datasets in the README's
data layout.

Every URL (http, https, file, or a local path) is fetched into `<destination>/.safe-downloads/<dataset>/`
as `<name>.part`, resumed with an HTTP Range request after a dropped connection, retried with bounded
exponential backoff, checked against an optional SHA-256, then either extracted safely (safe.staging.extract)
into `<destination>/<dataset>/` or, for a plain file, moved there. A small JSON marker per completed URL makes
a re-run skip what is already in place. The run ends with a report of what the layout holds and what is
missing.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safe.core.diskspace import DiskFullError, check_free_space, disk_full_error, is_disk_full
from safe.core.errors import SafeError
from safe.core.files import atomic_write_text
from safe.staging.extract import (
    DEFAULT_MAX_BYTES,
    archive_kind,
    clean_stale_temps,
    extract_archive,
    parse_size,
)

DATASETS = ("audiocaps", "vqa", "wavcaps")
DEFAULT_DESTINATION = "experiments/full_training/data"
STATE_DIR = ".safe-downloads"
CHUNK = 1 << 20
MAX_BACKOFF = 60.0
# HTTP statuses worth retrying; any other 4xx is the user's URL and retrying cannot help.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(SafeError):
    """A URL that could not be fetched (after retries where retrying makes sense)."""


class _Retryable(Exception):
    """A transient failure: the `.part` file is kept and the next attempt resumes it."""


@dataclass
class Source:
    dataset: str
    url: str
    sha256: str | None = None

    @property
    def name(self) -> str:
        path = urllib.parse.urlparse(self.url).path if "://" in self.url else self.url
        name = urllib.parse.unquote(Path(path).name)
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
        return name or "download"

    @property
    def key(self) -> str:
        # Markers, archives and partial files are per URL: the short hash keeps two URLs with one file name
        # apart, so a `.part` is only ever resumed from the URL that started it. The name stays last, for its suffix.
        return f"{hashlib.sha1(self.url.encode()).hexdigest()[:10]}-{self.name}"


@dataclass
class Options:
    retries: int = 5
    backoff: float = 2.0
    timeout: float = 60.0
    progress: bool = False
    keep_archives: bool = False
    force: bool = False
    max_extract_bytes: int = DEFAULT_MAX_BYTES


# ---------------------------------------------------------------------------------------------------- fetching


def _sha256_of(path: Path) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest


def _progress(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False, mininterval=1.0)


def _copy(response, out, digest, bar, expected: int | None, done: int) -> int:
    """Stream `response` into `out`; a body shorter than announced is a dropped connection (retryable)."""
    while True:
        try:
            chunk = response.read(CHUNK)
        except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as exc:
            raise _Retryable(f"connection dropped after {done:,} bytes ({exc.__class__.__name__})") from None
        if not chunk:
            break
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        bar.update(len(chunk))
    if expected is not None and done < expected:
        raise _Retryable(f"connection closed after {done:,} of {expected:,} bytes")
    return done


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if "://" not in url:
        return Path(url)
    return None


def _attempt(url: str, part: Path, opts: Options, desc: str) -> "hashlib._Hash":
    """One try at completing `part`; returns the SHA-256 of the whole file. Resumes what `part` holds."""
    have = part.stat().st_size if part.exists() else 0
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"{url} is not a file; check the path.")
        size = local.stat().st_size
        if have > size:
            part.unlink()
            have = 0
        _check_room(part, size, have)
        digest = _sha256_of(part) if have else hashlib.sha256()
        with _removed_when_the_disk_fills(part, size), open(local, "rb") as source, open(part, "ab") as out, \
                _progress(size, have, desc, opts.progress) as bar:
            source.seek(have)
            _copy(source, out, digest, bar, size, have)
        return digest

    request = urllib.request.Request(url, headers={"User-Agent": "safe-download/1", "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=opts.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send: either the part is already whole, or it is longer than the file.
            whole = re.search(r"/(\d+)", exc.headers.get("Content-Range", "") or "")
            if whole and int(whole.group(1)) == have:
                return _sha256_of(part)
            part.unlink()
            raise _Retryable("the partial file did not match the server's file; starting over") from None
        if exc.code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; check the URL.") from None
    except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Retryable(f"cannot connect ({reason})") from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if have and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", "") or "")
            if not start or int(start.group(1)) != have:
                part.unlink()
                raise _Retryable("the server resumed at an unexpected offset; starting over")
            digest = _sha256_of(part)
            mode, total = "ab", (have + length if length is not None else None)
        else:
            # A 200 answer to a Range request means the server cannot resume: start from the beginning.
            have, digest, mode, total = 0, hashlib.sha256(), "wb", length
        _check_room(part, total, have)
        with _removed_when_the_disk_fills(part, total), open(part, mode) as out, \
                _progress(total, have, desc, opts.progress) as bar:
            _copy(response, out, digest, bar, total, have)
    return digest


def _check_room(part: Path, total: int | None, have: int) -> None:
    """Refuse before writing when the announced size cannot fit (a partial file already there is kept)."""
    if total is not None:
        note = f"the partial file {part.name} is kept, so the same command resumes it" if have else None
        check_free_space(part.parent, total - have, note)


@contextmanager
def _removed_when_the_disk_fills(part: Path, total: int | None):
    """A write that fills the disk removes its partial file: keeping it would keep the disk full."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DiskFullError) or not is_disk_full(exc):
            raise
        part.unlink(missing_ok=True)
        raise disk_full_error(part.parent, total, "the partial download was removed") from None


def fetch(source: Source, target: Path, opts: Options) -> str:
    """Download `source.url` to `target` (atomic rename from `.part`); return its SHA-256 hex digest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    failures = 0
    while True:
        try:
            digest = _attempt(source.url, part, opts, source.name)
            break
        except _Retryable as exc:
            failures += 1
            if failures > opts.retries:
                raise DownloadError(
                    f"{source.url} failed {failures} times (last: {exc}); the partial file {part} is kept, so "
                    "re-running the same command resumes it."
                ) from None
            wait = min(MAX_BACKOFF, opts.backoff * 2 ** (failures - 1))
            print(f"  {source.name}: {exc}; retry {failures}/{opts.retries} in {wait:.2g} s", file=sys.stderr)
            time.sleep(wait)
    actual = digest.hexdigest()
    if source.sha256 and actual != source.sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{source.url} has SHA-256 {actual}, not the expected {source.sha256}; the download was deleted, so "
            "check the URL and the checksum, then run again."
        )
    os.replace(part, target)
    return actual


# ------------------------------------------------------------------------------------------ staging one source


def _marker_path(root: Path, source: Source) -> Path:
    return root / STATE_DIR / source.dataset / f"{source.key}.json"


def _already_done(root: Path, source: Source) -> bool:
    marker = _marker_path(root, source)
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("url") != source.url:
        return False
    if source.sha256 and info.get("sha256") != source.sha256.lower():
        return False
    # The entries it put in place must still be there, or the source is staged again.
    return all(os.path.lexists(root / source.dataset / name) for name in info.get("entries", []))


def stage(root: Path, source: Source, opts: Options) -> str:
    """Fetch, verify, extract or place one source; returns a one-line description of what happened."""
    if not opts.force and _already_done(root, source):
        return f"{source.dataset}: {source.name} already in place (skipped; --force to redo)"
    downloads = root / STATE_DIR / source.dataset
    archive = downloads / source.key
    if archive.exists() and not opts.force and (
            not source.sha256 or _sha256_of(archive).hexdigest() == source.sha256.lower()):
        sha = _sha256_of(archive).hexdigest()  # a kept archive from an earlier run: no need to fetch it again
    else:
        archive.unlink(missing_ok=True)
        sha = fetch(source, archive, opts)
    folder = root / source.dataset
    clean_stale_temps(folder)
    if archive_kind(archive):
        try:
            entries = extract_archive(archive, folder, strip_folder=source.dataset,
                                      max_bytes=opts.max_extract_bytes, show_progress=opts.progress)
        except DiskFullError as exc:
            raise disk_full_error(exc.path, exc.needed, f"the downloaded archive {archive} is kept, so the re-run "
                                  "does not fetch it again") from None
        except SafeError:
            if not opts.keep_archives:
                archive.unlink(missing_ok=True)  # a refused or corrupt archive is fetched afresh next time
            raise
        what = f"extracted {len(entries)} top-level entr{'y' if len(entries) == 1 else 'ies'}"
        if not opts.keep_archives:
            archive.unlink()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(archive, folder / source.name)  # a plain file (manifest, CSV, JSON) is the data itself
        entries = [source.name]
        what = "placed"
    atomic_write_text(_marker_path(root, source), json.dumps({
        "url": source.url, "sha256": sha, "entries": entries, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
        indent=1))
    return f"{source.dataset}: {source.name} {what} into {folder} (sha256 {sha[:12]}…)"


# ------------------------------------------------------------------------------------------------- command line


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def build_sources(args: argparse.Namespace) -> list[Source]:
    sources = [Source(dataset, url) for dataset in DATASETS for url in _split(getattr(args, f"{dataset}_url"))]
    if not sources:
        raise SafeError("Give at least one of --audiocaps-url, --vqa-url or --wavcaps-url (comma-separated URLs).")
    # --sha256: either one entry per URL in order (audiocaps, vqa, wavcaps; '-' for none) or NAME=HEX entries.
    entries = [item.strip() for item in (args.sha256 or "").split(",")] if args.sha256 else []
    named = {}
    positional = []
    for entry in entries:
        if "=" in entry:
            name, digest = entry.split("=", 1)
            named[name.strip()] = digest.strip()
        else:
            positional.append(entry)
    if positional and len(positional) != len(sources):
        raise SafeError(
            f"--sha256 has {len(positional)} positional checksums for {len(sources)} URLs; give one per URL in "
            "the order audiocaps, vqa, wavcaps ('-' for none) or use NAME=HEX entries."
        )
    for index, source in enumerate(sources):
        digest = named.get(source.name) or named.get(source.url) or (positional[index] if positional else "")
        if digest and digest != "-":
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise SafeError(f"--sha256 entry {digest!r} is not a 64-digit hex SHA-256.")
            source.sha256 = digest.lower()
    unknown = set(named) - {s.name for s in sources} - {s.url for s in sources}
    if unknown:
        raise SafeError(f"--sha256 names {', '.join(sorted(unknown))}, which match no URL's file name.")
    return sources


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audiocaps-url", help="comma-separated http(s)/file URLs (archives or plain files)")
    parser.add_argument("--vqa-url", help="comma-separated URLs for VQA v2 manifests/images")
    parser.add_argument("--wavcaps-url", help="comma-separated URLs for WavCaps (optional)")
    parser.add_argument("--destination", default=DEFAULT_DESTINATION,
                        help=f"data root to fill (default: {DEFAULT_DESTINATION})")
    parser.add_argument("--sha256", help="expected SHA-256s: one per URL in order (audiocaps, vqa, wavcaps; "
                        "'-' for none) or NAME=HEX entries, comma-separated")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded archives after extraction")
    parser.add_argument("--retries", type=int, default=int(os.environ.get("SAFE_DOWNLOAD_RETRIES", 5)),
                        help="retries per URL after a transient failure (default 5)")
    parser.add_argument("--backoff", type=float, default=float(os.environ.get("SAFE_DOWNLOAD_BACKOFF", 2.0)),
                        help="first retry delay in seconds, doubled each retry up to 60 (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default 60)")
    parser.add_argument("--max-extract-bytes", default=None,
                        help="refuse archives that would extract more than this (e.g. 500G; default 1T)")
    parser.add_argument("--force", action="store_true", help="download and extract again even if already done")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="progress bars (auto: only on a terminal)")


def run(args: argparse.Namespace) -> int:
    sources = build_sources(args)
    if args.retries < 0 or args.backoff < 0:
        raise SafeError("--retries and --backoff must not be negative.")
    progress = {"on": True, "off": False, "auto": sys.stderr.isatty()}[args.progress]
    opts = Options(retries=args.retries, backoff=args.backoff, timeout=args.timeout, progress=progress,
                   keep_archives=args.keep_archives, force=args.force,
                   max_extract_bytes=(parse_size(args.max_extract_bytes) if args.max_extract_bytes
                                      else DEFAULT_MAX_BYTES))
    root = Path(args.destination)
    root.mkdir(parents=True, exist_ok=True)
    print(f"Staging {len(sources)} source(s) into {root.resolve()}")
    failures = []
    for source in sources:
        try:
            print("  " + stage(root, source, opts))
        except SafeError as exc:
            # Keep going so that one bad URL does not stop the others; the exit code still reports it.
            failures.append(str(exc))
            print(f"  FAILED {source.dataset}: {exc}", file=sys.stderr)
    from safe.staging.validate import layout_report

    lines, _missing = layout_report(root, wanted={s.dataset for s in sources})
    print("\n".join(lines))
    if failures:
        print(f"{len(failures)} of {len(sources)} source(s) failed; fix them and run the same command again "
              "(finished sources are skipped, partial downloads resume).", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "safe data download") -> int:
    from safe.core.commands import standalone

    return standalone(__name__, argv, prog, "Download and safely extract the SAFE datasets.")

