"""fix_wavcaps_paths.py / validate_wavcaps.py (and their `safe data` twins) on a deliberately messy WavCaps tree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safe.data.datasets import WavCapsDataset
from safe.data.manifest import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def _script(name, *args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "safe.cli", "data", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.fixture
def messy(tmp_path, tone_writer):
    """data/wavcaps with FLAC files listed as WAV, stale absolute paths, a symlinked subset folder, a symlink
    cycle, stems colliding across subsets, an ambiguous stem inside one subset and a file that is not there."""
    wavcaps = tmp_path / "data" / "wavcaps"
    audio = wavcaps / "audio"
    tone_writer(audio / "FreeSound" / "batch1" / "1.flac", 1.0, 32000, 300)
    tone_writer(audio / "FreeSound" / "batch1" / "2.flac", 1.2, 22050, 350)
    tone_writer(audio / "SoundBible" / "1.flac", 0.8, 44100, 500)  # same stem as FreeSound/1
    elsewhere = tmp_path / "other_disk" / "bbc"
    tone_writer(elsewhere / "07070076.flac", 1.0, 48000, 700)
    os.symlink(elsewhere, audio / "BBC_Sound_Effects")  # subset folder on another disk
    os.symlink("..", audio / "FreeSound" / "loop")  # a cycle back to audio/
    tone_writer(audio / "AudioSet_SL" / "x" / "Yabc.flac", 1.0, 16000, 800)
    tone_writer(audio / "AudioSet_SL" / "y" / "Yabc.flac", 1.0, 16000, 900)  # two candidates in one subset
    os.symlink(tmp_path / "nowhere.flac", audio / "FreeSound" / "dangling.flac")
    rows = [
        {"id": "1", "audio_path": "/old/cluster/WavCaps/FreeSound/1.wav", "caption": "a door creaks",
         "subset": "FreeSound", "duration": 1.0},
        {"id": "2", "audio_path": "FreeSound/2.wav", "caption": "rain falls", "duration": 1.2},
        {"id": "1", "audio_path": "audio/SoundBible/1.wav", "caption": "a bell rings", "subset": "SoundBible",
         "duration": 0.8},
        {"id": "07070076", "audio_path": "BBC_Sound_Effects/07070076.wav", "caption": "a car passes",
         "subset": "BBC_Sound_Effects", "duration": 1.0},
        {"id": "Yabc", "audio_path": "Yabc.wav", "caption": "which one", "subset": "AudioSet_SL", "duration": 1.0},
        {"id": "999", "audio_path": "FreeSound/999.wav", "caption": "never downloaded", "subset": "FreeSound",
         "duration": 1.0},
    ]
    manifest = wavcaps / "wavcaps_train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return wavcaps


def test_fix_then_validate_makes_every_row_load(messy):
    manifest = messy / "wavcaps_train.jsonl"
    original = manifest.read_bytes()

    before = _script("validate_wavcaps.py", "--wavcaps-dir", str(messy), "--test-loading", "--num-samples", "3")
    assert before.returncode == 1
    assert "No samples were processed" in before.stdout and "fix_wavcaps_paths.py" in before.stdout

    dry = _script("fix_wavcaps_paths.py", "--wavcaps-dir", str(messy), "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "6 rows: 4 matched (4 paths rewritten, 4 extensions fixed" in dry.stdout
    assert "1 unmatched, 1 ambiguous" in dry.stdout
    assert "1 symlinked folders followed, 1 cycles/aliases skipped, 1 broken links" in dry.stdout
    assert manifest.read_bytes() == original and not Path(str(manifest) + ".bak").exists()

    fixed = _cli("fix-wavcaps", "--wavcaps-dir", str(messy))
    assert fixed.returncode == 1 and "--drop-unmatched" in fixed.stderr
    rows = read_jsonl(manifest)
    assert [r["audio_path"] for r in rows[:4]] == [
        "audio/FreeSound/batch1/1.flac", "audio/FreeSound/batch1/2.flac", "audio/SoundBible/1.flac",
        "audio/BBC_Sound_Effects/07070076.flac"]
    assert rows[1]["subset"] == "FreeSound"  # filled in from the folder
    assert rows[4]["audio_path"] == "Yabc.wav" and rows[5]["audio_path"] == "FreeSound/999.wav"  # kept, listed
    assert Path(str(manifest) + ".bak").read_bytes() == original
    listed = Path(str(manifest) + ".unmatched.txt").read_text()
    assert "wavcaps_train.jsonl:5: ambiguous" in listed and "wavcaps_train.jsonl:6: unmatched" in listed

    partial = _script("validate_wavcaps.py", "--wavcaps-dir", str(messy))
    assert partial.returncode == 1 and "2 of 6 rows would be skipped" in partial.stdout

    final = _script("fix_wavcaps_paths.py", "--wavcaps-dir", str(messy), "--drop-unmatched", "--validate-audio")
    assert final.returncode == 0, final.stdout + final.stderr
    assert len(read_jsonl(manifest)) == 4

    check = _script("validate_wavcaps.py", "--wavcaps-dir", str(messy), "--test-loading", "--num-samples", "10",
                    "--sample-rate", "16000")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "4 of 4 sampled rows decoded" in check.stdout and "OK: every WavCaps row would load" in check.stdout
    quick = _cli("validate-wavcaps", "--wavcaps-dir", str(messy), "--quick")
    assert quick.returncode == 0 and "4 exist;" in quick.stdout

    dataset = WavCapsDataset(messy.parent, "train", sample_rate=16000, clip_seconds=1.0, on_bad_sample="error")
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["caption"] for item in items] == ["a door creaks", "rain falls", "a bell rings", "a car passes"]
    assert all(item["kind"] == "audio" and item["audio"].shape == (16000,) for item in items)


def test_validate_audio_flags_corrupt_files_and_output_flag(messy):
    (messy / "audio" / "FreeSound" / "batch1" / "2.flac").write_bytes(b"fLaC but not really")
    out = messy / "wavcaps_train.fixed.jsonl"
    result = _script("fix_wavcaps_paths.py", "--wavcaps-dir", str(messy), "--validate-audio", "--output", str(out))
    assert result.returncode == 1
    assert "1 undecodable" in result.stdout and "undecodable: audio/FreeSound/batch1/2.flac" in result.stdout
    assert read_jsonl(out)[0]["audio_path"] == "audio/FreeSound/batch1/1.flac"
    assert not Path(str(messy / "wavcaps_train.jsonl") + ".bak").exists()  # the source manifest was not touched
    header = _script("validate_wavcaps.py", "--wavcaps-dir", str(messy), "--manifest", str(out))
    assert header.returncode == 1 and "unreadable" in header.stdout


def test_folder_not_named_wavcaps_and_missing_manifest(tmp_path, tone_writer):
    folder = tmp_path / "WavCaps_2024"
    tone_writer(folder / "audio" / "FreeSound" / "5.flac", 0.5, 16000, 440)
    (folder / "wavcaps_train.jsonl").write_text(json.dumps(
        {"id": "5", "audio_path": "audio/FreeSound/5.flac", "caption": "beep", "subset": "FreeSound"}) + "\n")
    ok = _script("validate_wavcaps.py", "--wavcaps-dir", str(folder), "--test-loading", "--num-samples", "2",
                 "--sample-rate", "16000")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 of 1 sampled rows decoded" in ok.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _script("fix_wavcaps_paths.py", "--wavcaps-dir", str(empty))
    assert missing.returncode == 2 and "safe data prepare wavcaps" in missing.stderr
    assert "Traceback" not in missing.stderr
