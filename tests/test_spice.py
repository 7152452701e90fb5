"""`safe metrics fetch-spice` against a real local HTTP server with a small stand-in CoreNLP zip, and the caption
metrics picking the fetched jars up (a real Java process; the stand-in jars hold no CoreNLP classes, so SPICE
itself fails and the metrics say so)."""

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from safe.eval import spice

REPO = Path(__file__).resolve().parents[1]
FAST = ["--backoff", "0.01", "--timeout", "10"]
JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class Handler(BaseHTTPRequestHandler):
    """/files/NAME serves with Range support; /drop/NAME cuts the first response in half."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        match = re.fullmatch(r"/(files|drop)/(.+)", self.path)
        body = server.files.get(match.group(2)) if match else None
        if body is None:
            self.send_error(404, "Not Found")
            return
        first = self.path not in server.seen
        server.seen.add(self.path)
        start = 0
        if self.headers.get("Range"):
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if match.group(1) == "drop" and first:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.seen = {}, [], set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _jar(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        jar.writestr("stand_in.bin", payload)
    return buffer.getvalue()


def stand_in_zip(with_models: bool = True) -> tuple[bytes, dict[str, bytes]]:
    """The release zip's layout (one folder, the jars inside), with incompressible stand-in jars."""
    jars = {name: _jar(os.urandom(150_000)) for name in (JARS if with_models else JARS[:1])}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("stanford-corenlp-full-2015-12-09/README.txt", "stand-in")
        for name, data in jars.items():
            zf.writestr(f"stanford-corenlp-full-2015-12-09/{name}", data)
    return buffer.getvalue(), jars


def fetch_spice(cache: Path, *args):
    env = {**os.environ, "SAFE_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "safe", "metrics", "fetch-spice", *map(str, args), *FAST],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def test_fetch_resumes_after_a_dropped_connection_and_installs_the_jars(server, tmp_path):
    archive, jars = stand_in_zip()
    server.files["corenlp.zip"] = archive
    digest = hashlib.sha256(archive).hexdigest()
    result = fetch_spice(tmp_path, "--url", f"{server.url}/drop/corenlp.zip", "--sha256", digest)
    assert result.returncode == 0, result.stderr
    ranges = [r for path, r in server.requests if path == "/drop/corenlp.zip"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(archive) // 2}-"  # resumed, not restarted
    for name, data in jars.items():
        assert (tmp_path / "spice" / name).read_bytes() == data
    assert digest in result.stdout
    assert not list((tmp_path / "spice" / ".downloads").iterdir())  # archive and .part cleaned up
    assert not (tmp_path / "spice" / "README.txt").exists()  # only the two jars leave the archive
    again = fetch_spice(tmp_path, "--url", f"{server.url}/files/corenlp.zip")
    assert again.returncode == 0 and "already in" in again.stdout
    assert not any(path == "/files/corenlp.zip" for path, _ in server.requests)


def test_checksum_mismatch_is_refused_and_nothing_is_installed(server, tmp_path):
    archive, _ = stand_in_zip()
    server.files["corenlp.zip"] = archive
    result = fetch_spice(tmp_path, "--url", f"{server.url}/files/corenlp.zip", "--sha256", "0" * 64)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not the expected" in result.stderr
    assert not any((tmp_path / "spice" / name).exists() for name in JARS)
    assert not list((tmp_path / "spice" / ".downloads").glob("*.part"))  # the bad download was deleted
    bad = fetch_spice(tmp_path, "--sha256", "xyz")
    assert bad.returncode == 2 and "is not a 64-digit hex SHA-256" in bad.stderr


def test_an_archive_without_the_jars_is_a_clear_error(server, tmp_path):
    archive, _ = stand_in_zip(with_models=False)
    server.files["partial.zip"] = archive
    result = fetch_spice(tmp_path, "--url", f"{server.url}/files/partial.zip")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds 0 copies of stanford-corenlp-3.6.0-models.jar" in result.stderr
    server.files["notzip.zip"] = b"<html>a mirror's error page</html>"
    result = fetch_spice(tmp_path, "--url", f"{server.url}/files/notzip.zip")
    assert result.returncode == 2 and "is not a zip archive" in result.stderr


@pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")
def test_caption_metrics_use_the_fetched_jars(tmp_path, monkeypatch):
    from safe.eval import captions

    monkeypatch.setenv("SAFE_CACHE_DIR", str(tmp_path))
    java = shutil.which("java")
    if spice.corenlp_dir() is None:  # nothing fetched, none in pycocoevalcap either: null with the fix
        score, note = captions._spice_score(java, {0: ["a dog barks"]}, {0: ["a dog barks"]})
        assert score is None and "safe metrics fetch-spice" in note
    _, jars = stand_in_zip()
    (tmp_path / "spice").mkdir()
    for name, data in jars.items():
        (tmp_path / "spice" / name).write_bytes(data)
    assert spice.corenlp_dir() == tmp_path / "spice" and captions.spice_jars_present()
    classpath = spice.command(java, spice.corenlp_dir(), "in.json", "out.json")[3].split(os.pathsep)
    assert [str(tmp_path / "spice" / name) for name in JARS] == classpath[1:3]
    # A real SPICE run on the stand-ins: Java starts, cannot find CoreNLP's classes, and the metric says so.
    score, note = captions._spice_score(java, {0: ["a dog barks"]}, {0: ["a dog barks"]})
    assert score is None and "SPICE failed" in note and "edu/stanford/nlp" in note
