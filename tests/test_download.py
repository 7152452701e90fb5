"""`safe data download` / experiments.full_training.download_data against a local HTTP server (real sockets)."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = ["--backoff", "0.01", "--timeout", "10"]


class Handler(BaseHTTPRequestHandler):
    """/files/NAME serves with Range; /drop/NAME drops the first connection mid-file; /drop-norange/NAME drops
    once and then ignores Range; /always-drop/NAME never finishes; anything else is a 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        match = re.fullmatch(r"/([a-z-]+)/(.+)", self.path)
        mode, name = match.groups() if match else ("", "")
        body = server.files.get(name)
        if body is None or mode not in ("files", "drop", "drop-norange", "always-drop"):
            self.send_error(404, "Not Found")
            return
        key = (mode, name)
        first = key not in server.seen
        server.seen.add(key)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and mode != "drop-norange":
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if mode == "always-drop" or (mode in ("drop", "drop-norange") and first):
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return  # the client sees fewer bytes than Content-Length announced
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


def _targz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zipbytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _audiocaps_archive() -> bytes:
    # Incompressible payload so the archive is large enough to be cut mid-file.
    return _targz({"audiocaps/audiocaps_train.jsonl": b'{"id": "1", "audio_path": "audio/a.wav", "caption": "x"}\n',
                   "audiocaps/audio/a.wav": os.urandom(300_000)})


def _download(*args, module=True, cwd=REPO):
    """Run the seed entry point (module or script path) or `safe data download`."""
    if module == "cli":
        command = [sys.executable, "-m", "safe.cli", "data", "download"]
    elif module:
        command = [sys.executable, "-m", "experiments.full_training.download_data"]
    else:
        command = [sys.executable, str(REPO / "experiments" / "full_training" / "download_data.py")]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_resume_after_dropped_connection_then_idempotent_rerun(server, tmp_path):
    archive = _audiocaps_archive()
    server.files["audiocaps.tar.gz"] = archive
    digest = hashlib.sha256(archive).hexdigest()
    dest = tmp_path / "data"
    result = _download("--audiocaps-url", f"{server.url}/drop/audiocaps.tar.gz", "--destination", str(dest),
                       "--sha256", digest, *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    ranges = [r for path, r in server.requests if path.startswith("/drop/")]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_at < len(archive)  # the second request asked only for the rest
    assert "retry 1/" in result.stderr
    # The archive's single top folder 'audiocaps/' is stripped into <dest>/audiocaps/.
    assert (dest / "audiocaps" / "audio" / "a.wav").stat().st_size == 300_000
    assert (dest / "audiocaps" / "audiocaps_train.jsonl").is_file()
    state = dest / ".safe-downloads" / "audiocaps"
    assert not list(state.glob("*.part")) and not list(state.glob("*.tar.gz"))  # archive removed by default
    marker = json.loads(next(state.glob("*.json")).read_text())
    assert marker["sha256"] == digest
    # Final report: what the layout holds and what is missing.
    assert "ok      audiocaps/audiocaps_train.jsonl: 1 rows" in result.stdout
    assert "MISSING vqa/vqa_train.jsonl" in result.stdout and "MISSING audiocaps/audiocaps_val.jsonl" in result.stdout

    count = len(server.requests)
    again = _download("--audiocaps-url", f"{server.url}/drop/audiocaps.tar.gz", "--destination", str(dest), *FAST)
    assert again.returncode == 0 and "already in place" in again.stdout
    assert len(server.requests) == count  # nothing fetched again

    # Deleting what was extracted makes the next run stage it again.
    (dest / "audiocaps" / "audio" / "a.wav").unlink()
    (dest / "audiocaps" / "audio").rmdir()
    third = _download("--audiocaps-url", f"{server.url}/drop/audiocaps.tar.gz", "--destination", str(dest), *FAST)
    assert third.returncode == 0 and (dest / "audiocaps" / "audio" / "a.wav").is_file()


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    archive = _audiocaps_archive()
    server.files["a.tar.gz"] = archive
    dest = tmp_path / "data"
    result = _download("--audiocaps-url", f"{server.url}/drop-norange/a.tar.gz", "--destination", str(dest),
                       "--sha256", f"a.tar.gz={hashlib.sha256(archive).hexdigest()}", *FAST, module=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (dest / "audiocaps" / "audio" / "a.wav").stat().st_size == 300_000


def test_404_fails_fast_without_retries(server, tmp_path):
    result = _download("--vqa-url", f"{server.url}/files/missing.zip", "--destination", str(tmp_path / "d"),
                       "--retries", "3", *FAST)
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr and "check the URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(server.requests) == 1


def test_wrong_checksum_is_refused_and_nothing_is_extracted(server, tmp_path):
    server.files["a.tar.gz"] = _audiocaps_archive()
    dest = tmp_path / "d"
    result = _download("--audiocaps-url", f"{server.url}/files/a.tar.gz", "--destination", str(dest),
                       "--sha256", "0" * 64, *FAST, module="cli")
    assert result.returncode == 1
    assert "SHA-256" in result.stderr and "0" * 64 in result.stderr
    assert not (dest / "audiocaps").exists()
    assert not list((dest / ".safe-downloads").rglob("*.part"))


def test_retries_are_bounded_and_keep_the_partial_file(server, tmp_path):
    server.files["a.tar.gz"] = _audiocaps_archive()
    dest = tmp_path / "d"
    result = _download("--audiocaps-url", f"{server.url}/always-drop/a.tar.gz", "--destination", str(dest),
                       "--retries", "2", *FAST)
    assert result.returncode == 1
    assert "failed 3 times" in result.stderr and "resumes it" in result.stderr
    assert len(server.requests) == 3
    assert list((dest / ".safe-downloads" / "audiocaps").glob("*.part"))


def test_several_urls_file_urls_plain_files_and_keep_archives(server, tmp_path):
    """Comma-separated lists per dataset; file:// and http; a zip and a tar merge; a plain manifest is placed."""
    part1 = tmp_path / "vqa_images_1.zip"
    part1.write_bytes(_zipbytes({"images/train2014/COCO_train2014_000000000001.jpg": b"jpg1"}))
    server.files["vqa_images_2.tar.gz"] = _targz({"vqa/images/val2014/COCO_val2014_000000000002.jpg": b"jpg2"})
    server.files["vqa_train.jsonl"] = b'{"question_id": 1}\n'
    dest = tmp_path / "out"
    urls = ",".join([part1.as_uri(), f"{server.url}/files/vqa_images_2.tar.gz", f"{server.url}/files/vqa_train.jsonl"])
    result = _download("--vqa-url", urls, "--keep-archives", *FAST, "--destination", "out", module=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    vqa = dest / "vqa"
    assert (vqa / "images" / "train2014" / "COCO_train2014_000000000001.jpg").read_bytes() == b"jpg1"
    assert (vqa / "images" / "val2014" / "COCO_val2014_000000000002.jpg").read_bytes() == b"jpg2"
    assert (vqa / "vqa_train.jsonl").read_text() == '{"question_id": 1}\n'
    kept = sorted(p.name for p in (dest / ".safe-downloads" / "vqa").iterdir() if p.suffix != ".json")
    assert len(kept) == 2 and kept[0].endswith(("vqa_images_1.zip", "vqa_images_2.tar.gz"))
    assert "ok      vqa/vqa_train.jsonl: 1 rows" in result.stdout and "MISSING vqa/vqa_val.jsonl" in result.stdout


def test_user_mistakes_are_one_sentence(tmp_path):
    none = _download("--destination", str(tmp_path / "d"), module="cli")
    assert none.returncode == 2 and "--audiocaps-url" in none.stderr and "Traceback" not in none.stderr
    bad_sha = _download("--audiocaps-url", "file:///nowhere/a.tar,file:///nowhere/b.tar", "--sha256", "abc",
                        "--destination", str(tmp_path / "d"))
    assert bad_sha.returncode == 2 and "one per URL" in bad_sha.stderr
    missing = _download("--audiocaps-url", (tmp_path / "nope.tar").as_uri(), "--destination", str(tmp_path / "d"))
    assert missing.returncode == 1 and "is not a file" in missing.stderr
