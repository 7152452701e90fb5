"""A full disk is one sentence naming the path and the space needed, in download, extraction, synth,
cache-features and a run's checkpoint, metrics and log writes; a failed download does not keep the disk full.

Each test mounts a real tmpfs of a few MB (we run as root; skipped with the reason where mounting is not
permitted) and writes to it for real, through the commands' own processes where there is a command.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers.tiny_model import tiny_safe_model, trainer_state

from safe.core.errors import SafeError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name: str, size: str) -> Path:
        disk = tmp_path / name
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs here ({done.stderr.strip() or 'mount failed'}); the disk-full "
                        "tests need root (or CAP_SYS_ADMIN)")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def small_disk(mount_tmpfs):
    return mount_tmpfs("disk", "2m")


def fill(disk: Path, leave: int) -> None:
    """Take all of the disk's free space but `leave` bytes."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\1" * max(0, free - leave))


def run_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def one_sentence(text: str) -> None:
    assert "Traceback" not in text and "Errno" not in text and "os error" not in text, text


# ----------------------------------------------------------------------------------------------------- download


class Handler(BaseHTTPRequestHandler):
    """/len/NAME announces its Content-Length; /nolen/NAME does not (the body ends when the connection closes)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        body = self.server.files[name]
        self.send_response(200)
        if mode == "len":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_a_download_larger_than_the_free_space_is_refused_before_writing(server, small_disk):
    server.files["audio.tar.gz"] = os.urandom(3 << 20)
    dest = small_disk / "data"
    done = run_cli("data", "download", "--audiocaps-url", f"{server.url}/len/audio.tar.gz", "--destination",
                   str(dest), "--backoff", "0.01")
    assert done.returncode == 1, done.stdout + done.stderr
    one_sentence(done.stderr)
    assert "Not enough disk space" in done.stderr and str(dest / ".safe-downloads" / "audiocaps") in done.stderr
    assert "3.0 MiB" in done.stderr  # what the download needs
    assert shutil.disk_usage(small_disk).used < 64 << 10  # nothing of it was written


def test_a_download_that_fills_the_disk_is_removed_and_reported(server, small_disk):
    server.files["audio.tar.gz"] = os.urandom(3 << 20)
    dest = small_disk / "data"
    done = run_cli("data", "download", "--audiocaps-url", f"{server.url}/nolen/audio.tar.gz", "--destination",
                   str(dest), "--backoff", "0.01")
    assert done.returncode == 1, done.stdout + done.stderr
    one_sentence(done.stderr)
    assert "Not enough disk space" in done.stderr and "partial download was removed" in done.stderr
    assert str(dest / ".safe-downloads" / "audiocaps") in done.stderr
    assert not list(dest.rglob("*.part"))
    assert shutil.disk_usage(small_disk).used < 64 << 10  # the disk is not left full


def _many_small_files(count: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for n in range(count):
            info = tarfile.TarInfo(f"audiocaps/audio/{n}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buffer.getvalue()


def test_extraction_counts_the_blocks_files_take(tmp_path, small_disk):
    # 700 one-byte files declare 700 bytes but take a 4 KiB block each: 2.7 MiB, more than the 2 MiB disk.
    archive = tmp_path / "audiocaps.tar.gz"
    archive.write_bytes(_many_small_files(700))
    dest = small_disk / "data"
    done = run_cli("data", "download", "--audiocaps-url", archive.as_uri(), "--destination", str(dest))
    assert done.returncode == 1, done.stdout + done.stderr
    one_sentence(done.stderr)
    assert "Not enough disk space" in done.stderr and str(dest / "audiocaps") in done.stderr
    assert "is kept" in done.stderr  # the downloaded archive: a re-run does not fetch it again
    assert not list((dest / "audiocaps").glob(".safe-extract-*"))


def test_extraction_that_runs_out_of_space_midway_is_one_sentence(tmp_path, small_disk, monkeypatch):
    from safe.staging import extract

    # Another process takes the space between the check and the writes: the check is told there is plenty.
    monkeypatch.setattr(extract, "free_bytes", lambda path: 1 << 40)
    archive = tmp_path / "audiocaps.tar.gz"
    archive.write_bytes(_many_small_files(700))
    with pytest.raises(SafeError) as caught:
        extract.extract_archive(archive, small_disk / "out")
    one_sentence(str(caught.value))
    assert "Not enough disk space" in str(caught.value) and str(small_disk / "out") in str(caught.value)
    assert not list((small_disk / "out").iterdir())  # the partial extraction is gone
    assert shutil.disk_usage(small_disk).used < 64 << 10


# -------------------------------------------------------------------------------------------------------- synth


def test_synth_refuses_a_disk_too_small_for_the_world(small_disk):
    done = run_cli("data", "synth", "--out", str(small_disk / "world"))
    assert done.returncode == 2, done.stdout + done.stderr
    one_sentence(done.stderr)
    assert "Not enough disk space" in done.stderr and str(small_disk / "world") in done.stderr
    assert "MiB" in done.stderr
    assert shutil.disk_usage(small_disk).used < 64 << 10


def test_synth_that_runs_out_of_space_midway_removes_the_partial_world(small_disk, monkeypatch):
    from safe.toy import world as synth

    monkeypatch.setitem(synth.WORLD_BYTES, "small", 1)  # an estimate that is wrong: the writes hit the full disk
    out = small_disk / "world"
    with pytest.raises(SafeError) as caught:
        synth.synthesize_toy_world(out, seed=0, size="small")
    one_sentence(str(caught.value))
    assert "Not enough disk space" in str(caught.value) and str(out) in str(caught.value)
    assert not out.exists() or not any(out.iterdir())  # so the same command runs again once there is room
    assert shutil.disk_usage(small_disk).used < 64 << 10


# ----------------------------------------------------------------------------------------------- cache-features


def test_cache_features_on_a_full_disk_is_one_sentence(mount_tmpfs, toy_world):
    cache = mount_tmpfs("disk", "1m") / "cache"  # shards hold the toy world's 79 windows (2 MiB) without waste
    done = run_cli("cache-features", "--data-root", str(toy_world), "--feature-cache-dir", str(cache),
                   "--num-workers", "0", "--no-progress", "--windows", "all")
    assert done.returncode == 2, done.stdout + done.stderr
    one_sentence(done.stderr)
    assert "Not enough disk space" in done.stderr and str(cache) in done.stderr
    assert "windows to encode: about" in done.stdout  # the estimate, said before refusing to start
    assert not [p for p in cache.rglob("*") if p.is_file()]  # refused before writing anything


def test_a_feature_cache_write_on_a_full_disk_is_one_sentence(small_disk, tone_writer):
    import torch

    from safe.data.feature_cache import FeatureCache

    clip = small_disk / "a.wav"
    tone_writer(clip, 0.5, 16000)
    cache = FeatureCache(small_disk / "cache", "enc", 16000, 4.0)
    fill(small_disk, 0)
    with pytest.raises(SafeError) as caught:
        cache.put(clip, 0, torch.ones(64, 128))
        cache.flush()
    one_sentence(str(caught.value))
    assert "Not enough disk space" in str(caught.value) and str(small_disk / "cache") in str(caught.value)
    assert not [p for p in (small_disk / "cache").rglob("*") if p.is_file()]


# -------------------------------------------------------------------------------------- a run's checkpoint writes


@pytest.fixture(scope="module")
def model():
    return tiny_safe_model()


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(mount_tmpfs, model):
    from safe.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    disk = mount_tmpfs("runs", "16m")
    run_dir = disk / "run"
    state = trainer_state(model)
    first = save_checkpoint(run_dir, 1, model, state, {})
    fill(disk, 256 << 10)
    with pytest.raises(SafeError) as caught:
        save_checkpoint(run_dir, 2, model, state, {})
    message = str(caught.value)
    one_sentence(message)
    assert "Not enough disk space" in message and str(run_dir / "checkpoints") in message and "MiB" in message
    assert latest_checkpoint(run_dir) == first  # the previous checkpoint is still the latest, and whole
    assert load_checkpoint(first, model)["step"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", first.name]


def test_trainable_weights_on_a_full_disk_are_one_sentence(small_disk, model):
    fill(small_disk, 0)
    with pytest.raises(SafeError) as caught:
        model.save_trainable(small_disk / "weights")
    one_sentence(str(caught.value))
    assert "Not enough disk space" in str(caught.value) and str(small_disk / "weights") in str(caught.value)
    assert not [p for p in (small_disk / "weights").iterdir()]


def test_metrics_and_log_writes_on_a_full_disk_lose_nothing(small_disk):
    from safe.training.outputs import RunLogger, read_log, write_json_atomic

    run_dir = small_disk / "run"
    write_json_atomic(run_dir / "metrics.json", {"history": [1, 2]})
    logger = RunLogger(run_dir)
    logger.log({"event": "train", "step": 1})
    fill(small_disk, 0)
    with pytest.raises(SafeError) as caught:
        write_json_atomic(run_dir / "metrics.json", {"history": list(range(100_000))})
    one_sentence(str(caught.value))
    assert "Not enough disk space" in str(caught.value) and str(run_dir / "metrics.json") in str(caught.value)
    assert json.loads((run_dir / "metrics.json").read_text()) == {"history": [1, 2]}  # the last good state
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "train_log.jsonl"]
    with pytest.raises(SafeError, match="Not enough disk space") as caught:
        logger.log({"event": "train", "step": 2, "note": "x" * 8192})
    assert str(run_dir / "train_log.jsonl") in str(caught.value)
    assert [r["step"] for r in read_log(run_dir)] == [1]  # no half-written line left behind
