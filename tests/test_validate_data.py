"""`safe data validate`: the toy world is clean; each planted problem (and each kind of leakage) is reported."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safe.data.leakage import id_keys, read_blacklist
from safe.data.manifest import read_jsonl, write_jsonl
from safe.staging.validate import layout_report

REPO = Path(__file__).resolve().parents[1]


def _validate(*args):
    return subprocess.run([sys.executable, "-m", "safe.cli", "data", "validate", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_toy_world_passes_cleanly(toy_world):
    result = _validate("--data-root", str(toy_world))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "READY" in result.stdout and "leakage: none found" in result.stdout
    assert "ERROR" not in result.stdout and "warning" not in result.stdout


@pytest.fixture
def broken(toy_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(toy_world, root, symlinks=True)
    return root


def _edit(path: Path, change):
    rows = read_jsonl(path)
    change(rows)
    write_jsonl(path, rows)
    return rows


def test_planted_problems_and_leakage_are_reported(broken, tmp_path):
    train = read_jsonl(broken / "audiocaps" / "audiocaps_train.jsonl")
    leaked = train[0]

    def val_change(rows):
        rows.append({**{k: leaked[k] for k in ("audio_path", "youtube_id", "start_time")}, "id": "leak",
                     "captions": ["x"] * 5})  # a train clip in val
        rows[1]["captions"] = []  # a val clip without references

    val = _edit(broken / "audiocaps" / "audiocaps_val.jsonl", val_change)
    test_rows = read_jsonl(broken / "audiocaps" / "audiocaps_test.jsonl")
    (broken / "audiocaps" / test_rows[0]["audio_path"]).unlink()  # missing media
    _edit(broken / "vqa" / "vqa_train.jsonl", lambda rows: rows[3].update(answers=rows[3]["answers"][:9]))

    def wavcaps_change(rows):
        rows[0]["id"] = f"Y{val[0]['youtube_id']}"  # AudioSet-style id of an AudioCaps val clip
    wavcaps = _edit(broken / "wavcaps" / "wavcaps_train.jsonl", wavcaps_change)
    blacklist = tmp_path / "blacklist_exclude_test_ac.json"  # the shape of WavCaps' own blacklist files
    blacklist.write_text(json.dumps({"AudioSet": [], "FreeSound": [f"{wavcaps[2]['id']}.wav"]}))

    result = _validate("--data-root", str(broken), "--blacklist", str(blacklist))
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "NOT READY" in out
    assert "leakage: 1 clip(s) and 1 audio file(s) are in audiocaps train and val" in out
    assert "audiocaps_val.jsonl: 1 row(s) with bad content" in out and "1 clip(s) have no reference caption" in out
    assert f"audiocaps_test.jsonl: 1 of {len(test_rows)} row(s) point at missing media" in out
    assert "vqa_train.jsonl: 1 row(s) with bad content" in out and "expected 10 answer strings, got 9" in out
    assert "leakage: 2 WavCaps row(s) are AudioCaps val/test clips or blacklisted" in out
    assert f"({wavcaps[0]['id']})" in out and f"({wavcaps[2]['id']})" in out


def test_malformed_manifest_names_file_and_line(broken):
    path = broken / "vqa" / "vqa_val.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    result = _validate("--data-root", str(broken), "--sample", "0")
    assert result.returncode == 1
    assert "vqa_val.jsonl:3: malformed JSON" in result.stdout


def test_missing_root_and_missing_manifests(tmp_path):
    gone = _validate("--data-root", str(tmp_path / "nope"))
    assert gone.returncode == 2 and "does not exist" in gone.stderr and "Traceback" not in gone.stderr
    (tmp_path / "empty").mkdir()
    empty = _validate("--data-root", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "No audiocaps train manifest" in empty.stdout


def test_layout_report_points_at_converters(tmp_path):
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json").write_text("{}")
    lines, missing = layout_report(tmp_path, wanted={"vqa", "wavcaps"})
    text = "\n".join(lines)
    assert "vqa/vqa_train.jsonl" in missing and "wavcaps/wavcaps_train.jsonl" in missing
    assert "audiocaps/audiocaps_test.jsonl" not in missing and "absent  audiocaps/audiocaps_test.jsonl" in text
    assert "safe data prepare vqa" in text


def test_id_forms_and_blacklist_formats(tmp_path):
    assert "abcdefghijk" in id_keys("Yabcdefghijk_30.000_40.000.wav")
    assert "ab_cdefghij" in id_keys("ab_cdefghij_30000.flac")
    text = tmp_path / "b.txt"
    text.write_text("# ids\nabcdefghijk, extra\n\nY12345678901\n")
    assert read_blacklist(text) == {"abcdefghijk", "Y12345678901"}
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps(["a", 5]))
    assert read_blacklist(listed) == {"a", "5"}
