"""`safe metrics fetch-spice`: put the Stanford CoreNLP 3.6.0 jars that SPICE needs into the user cache.

The CoreNLP 2015-12-09 release zip (the one pycocoevalcap's own downloader uses) is fetched through the project's
downloader (safe.staging.download: `.part` file resumed with HTTP Range after a dropped connection, retries with
backoff, optional SHA-256 check), then only the two jars are taken out of it, each checked to be a readable jar,
and moved into place atomically. `--url` points at a mirror or a local copy (any zip holding both jars).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

from safe.core.errors import SafeError
from safe.eval.spice import CORENLP_JARS, user_jar_dir
from safe.staging.download import CHUNK, Options, Source, fetch

DEFAULT_URL = "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
MAX_JAR_BYTES = 2 << 30  # the models jar is ~360 MB; anything claiming more is not that jar
MARKER = "fetched.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _take_jars(archive: Path, dest: Path) -> dict[str, str]:
    """Copy the two CoreNLP jars out of `archive` into `dest`; returns {name: sha256}. Only those two members are
    read, and they are written under fixed names, so the archive's other paths never touch the disk."""
    if not zipfile.is_zipfile(archive):
        raise SafeError(f"{archive.name} is not a zip archive; pass --url of the CoreNLP 2015-12-09 zip (or a zip "
                        "holding both jars).")
    written = {}
    with zipfile.ZipFile(archive) as zf:
        for name in CORENLP_JARS:
            members = [m for m in zf.infolist() if not m.is_dir() and m.filename.rsplit("/", 1)[-1] == name]
            if len(members) != 1:
                raise SafeError(f"{archive.name} holds {len(members)} copies of {name}, not one; pass --url of the "
                                "CoreNLP 2015-12-09 zip.")
            member = members[0]
            if member.file_size > MAX_JAR_BYTES:
                raise SafeError(f"{name} in {archive.name} claims {member.file_size:,} bytes; refusing it.")
            temp = dest / f".{name}.tmp"
            try:
                with zf.open(member) as source, open(temp, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                if not zipfile.is_zipfile(temp):
                    raise SafeError(f"{name} in {archive.name} is not a jar; the archive is damaged, fetch it again.")
                os.replace(temp, dest / name)
            except (zipfile.BadZipFile, OSError) as exc:
                raise SafeError(f"cannot read {name} from {archive.name} ({exc}); fetch it again.") from None
            finally:
                temp.unlink(missing_ok=True)
            written[name] = _sha256(dest / name)
    return written


def fetch_spice(url: str, dest: Path, sha256: str | None, opts: Options, force: bool = False,
                keep_archive: bool = False) -> str:
    """Fetch and install the jars into `dest`; returns a one-line description of what happened."""
    dest.mkdir(parents=True, exist_ok=True)
    if not force and all((dest / name).is_file() for name in CORENLP_JARS):
        return f"the CoreNLP 3.6.0 jars are already in {dest} (--force fetches them again)"
    source = Source("spice", url, sha256)
    downloads = dest / ".downloads"
    archive = downloads / source.key
    if force:
        archive.unlink(missing_ok=True)
    if archive.is_file() and (not sha256 or _sha256(archive) == sha256):
        digest = _sha256(archive)  # kept from an earlier run (--keep-archive)
    else:
        archive.unlink(missing_ok=True)
        digest = fetch(source, archive, opts)  # resumes downloads/<key>.part; refuses a checksum mismatch
    jars = _take_jars(archive, dest)
    (dest / MARKER).write_text(json.dumps({"url": url, "archive_sha256": digest, "jars": jars,
                                           "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    if not keep_archive:
        archive.unlink()
    return (f"installed {', '.join(CORENLP_JARS)} into {dest} (archive sha256 {digest}); the caption metrics now "
            "report SPICE and SPIDEr")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"the CoreNLP zip, a mirror or a file (default {DEFAULT_URL})")
    parser.add_argument("--sha256", help="expected SHA-256 of the zip; a mismatch deletes the download")
    parser.add_argument("--force", action="store_true", help="fetch and install again even if the jars are there")
    parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded zip")
    parser.add_argument("--retries", type=int, default=5, help="retries after a transient failure (default 5)")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default 60)")


def run(args: argparse.Namespace) -> int:
    if args.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise SafeError(f"--sha256 {args.sha256!r} is not a 64-digit hex SHA-256.")
    if args.retries < 0 or args.backoff < 0:
        raise SafeError("--retries and --backoff must not be negative.")
    opts = Options(retries=args.retries, backoff=args.backoff, timeout=args.timeout)
    # Into the user cache, where the caption metrics look ($SAFE_CACHE_DIR/spice moves both).
    print(fetch_spice(args.url, user_jar_dir(), args.sha256.lower() if args.sha256 else None, opts, args.force,
                      args.keep_archive))
    return 0
