"""Manifest content is checked where it is loaded and by `safe data validate`: field types, duplicate ids, one
audio file per val/test clip, UTF-8. Each bad case is an error naming file and line, never a silent merge or a
traceback. Real manifest files; the validator runs as a real process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safe.data.datasets import AudioCapsDataset, VQADataset, WavCapsDataset
from safe.data.manifest import ManifestError, iter_jsonl, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def clip(n: int, **extra) -> dict:
    return {"id": f"ac_{n}", "audio_path": f"audio/{n}.wav", "youtube_id": f"yt{n:09d}", "start_time": 0.0, **extra}


def vqa(n: int, **extra) -> dict:
    return {"question_id": n, "image_path": f"images/{n}.png", "question": "what color is the circle?",
            "answers": ["red"] * 10, **extra}


def write_manifest(root: Path, dataset: str, split: str, rows: list[dict]) -> Path:
    path = root / dataset / f"{dataset}_{split}.jsonl"
    write_jsonl(path, rows)
    return path


def load(root: Path, dataset: str, split: str):
    if dataset == "audiocaps":
        return AudioCapsDataset(root, split)
    if dataset == "wavcaps":
        return WavCapsDataset(root, split)
    return VQADataset(root, split)


@pytest.mark.parametrize("dataset, split, rows, line, words", [
    # A string of captions used to become one reference per character (CIDEr against letters).
    ("audiocaps", "val", [clip(1, captions=["a dog barks"] * 5), clip(2, captions="a cat meows")], 2,
     "captions must be a non-empty list of non-empty strings"),
    # No references: the final evaluation used to raise IndexError after the whole run had trained.
    ("audiocaps", "val", [clip(1, captions=[])], 1, "captions must be a non-empty list of non-empty strings"),
    ("audiocaps", "val", [clip(1, captions=["ok", 3])], 1, "captions must be a non-empty list of non-empty strings"),
    ("audiocaps", "train", [clip(1, caption="fine"), clip(2, caption=5)], 2, "caption must be a non-empty string"),
    ("audiocaps", "train", [clip(1, caption="  ")], 1, "caption must be a non-empty string"),
    ("audiocaps", "train", [clip(1, caption="x", id=None)], 1, "id must be a non-empty string or an integer"),
    ("audiocaps", "train", [clip(1, caption="x", start_time="0")], 1, "start_time must be a number"),
    ("wavcaps", "train", [{"id": "w1", "audio_path": "a.wav", "caption": ["x"]}], 1,
     "caption must be a non-empty string"),
    ("wavcaps", "train", [{"id": "w1", "audio_path": "a.wav", "caption": "x", "duration": "long"}], 1,
     "duration must be a number"),
    ("vqa", "train", [vqa(1), vqa(2, question=7)], 2, "question must be a non-empty string"),
    ("vqa", "train", [vqa(1, answers=[1] * 10)], 1, "answers must be a non-empty list of strings"),
    ("vqa", "train", [vqa(1, answers="red")], 1, "answers must be a non-empty list of strings"),
    ("vqa", "val", [vqa(1), {**vqa(2), "question_id": 2.5}], 2, "question_id must be a non-empty string or an integer"),
    ("vqa", "val", [{**vqa(1), "question_id": True}], 1, "question_id must be a non-empty string or an integer"),
])
def test_wrong_field_types_are_errors_naming_file_and_line(tmp_path, dataset, split, rows, line, words):
    path = write_manifest(tmp_path, dataset, split, rows)
    with pytest.raises(ManifestError) as caught:
        load(tmp_path, dataset, split)
    assert f"{path}:{line}:" in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize("dataset, split, rows, words", [
    # Duplicate question ids would share KL targets and cached base answers.
    ("vqa", "train", [vqa(1), vqa(2), vqa(1, question="is there a blue square?")], "question_id 1 repeats line 1"),
    ("vqa", "val", [vqa(1), vqa(2), {**vqa(3), "question_id": "2"}], "question_id '2' repeats line 2"),
    ("wavcaps", "train", [{"id": "w1", "audio_path": "a.wav", "caption": "x"},
                          {"id": "w2", "audio_path": "b.wav", "caption": "y"},
                          {"id": "w1", "audio_path": "c.wav", "caption": "z"}], "id 'w1' repeats line 1"),
    # One row per clip (`captions`): the same clip id twice is a duplicate clip.
    ("audiocaps", "val", [clip(1, captions=["a"]), clip(2, captions=["b"]), clip(1, captions=["c"])],
     "id 'ac_1' repeats line 1"),
    # One row per caption: an id may repeat, but always for the same clip.
    ("audiocaps", "train", [clip(1, caption="a"), clip(1, caption="b"), {**clip(2, caption="c"), "id": "ac_1"}],
     "id 'ac_1' names another clip at line 1"),
])
def test_duplicate_ids_are_errors_naming_both_lines(tmp_path, dataset, split, rows, words):
    path = write_manifest(tmp_path, dataset, split, rows)
    with pytest.raises(ManifestError) as caught:
        load(tmp_path, dataset, split)
    assert f"{path}:3:" in str(caught.value) and words in str(caught.value)


def test_val_rows_of_one_clip_with_two_audio_files_are_an_error(tmp_path):
    # Same youtube_id + start_time, other file: these used to be merged into one clip with 10 references.
    rows = [clip(1, caption="a dog barks", id="c1"), clip(2, caption="a cat", id="c2"),
            {**clip(1, caption="a dog barks loudly", id="c3"), "audio_path": "audio/other.wav"}]
    path = write_manifest(tmp_path, "audiocaps", "val", rows)
    with pytest.raises(ManifestError) as caught:
        AudioCapsDataset(tmp_path, "val")
    message = str(caught.value)
    assert f"{path}:3:" in message and "audio/other.wav" in message and "audio/1.wav" in message and "line 1" in message


def test_well_formed_rows_still_load(tmp_path):
    """One caption per row (ids repeating for one clip), grouped val rows, integer ids and WavCaps ids repeating
    across subsets are fine."""
    write_manifest(tmp_path, "audiocaps", "train", [clip(1, caption="a"), clip(1, caption="b"), clip(2, caption="c")])
    write_manifest(tmp_path, "audiocaps", "val", [clip(1, caption="a", id=1), clip(1, caption="b", id=2),
                                                  clip(2, caption="c", id=3)])
    write_manifest(tmp_path, "vqa", "val", [vqa(1), vqa(2, answers=["", "red"] * 5, answer_type=None)])
    write_manifest(tmp_path, "wavcaps", "train", [  # WavCaps ids repeat across subsets
        {"id": "1", "audio_path": "a/1.wav", "caption": "x", "subset": "FreeSound", "duration": None},
        {"id": "1", "audio_path": "b/1.wav", "caption": "y", "subset": "SoundBible", "duration": 2}])
    assert len(AudioCapsDataset(tmp_path, "train")) == 3
    val = AudioCapsDataset(tmp_path, "val")
    assert [item["references"] for item in val.items] == [["a", "b"], ["c"]]
    assert len(VQADataset(tmp_path, "val")) == 2
    assert len(WavCapsDataset(tmp_path, "train")) == 2


def test_a_non_utf8_manifest_names_file_and_line(tmp_path):
    path = write_manifest(tmp_path, "audiocaps", "train", [clip(1, caption="a"), clip(2, caption="b")])
    with open(path, "ab") as handle:
        handle.write(json.dumps(clip(3, caption="caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ManifestError) as caught:
        AudioCapsDataset(tmp_path, "train")
    assert f"{path}:3:" in str(caught.value) and "UTF-8" in str(caught.value)
    with pytest.raises(ManifestError, match=r":3: .*UTF-8"):
        read_jsonl(path)


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\r\n{"a": "\xc3\xa9"}\r\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (2, {"a": "\u00e9"})]


# ------------------------------------------------------------------------------------------ safe data validate


def _validate(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safe.cli", "data", "validate", "--data-root", str(root),
                           "--sample", "0"], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.fixture
def world(toy_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(toy_world, root, symlinks=True)
    return root


def _edit(path: Path, change) -> list[dict]:
    rows = read_jsonl(path)
    change(rows)
    write_jsonl(path, rows)
    return rows


def test_validate_reports_types_duplicates_and_split_clips(world):
    def val_change(rows):
        rows[0]["captions"] = "a single string"
        rows[2]["audio_path"] = rows[3]["audio_path"]  # clip 3 now shares clip 4's file ...
        rows[2]["youtube_id"], rows[2]["start_time"] = rows[4]["youtube_id"], rows[4]["start_time"]  # ... and 5's id

    _edit(world / "audiocaps" / "audiocaps_val.jsonl", val_change)

    def vqa_change(rows):
        rows[5]["question_id"] = rows[1]["question_id"]
        rows[6]["question"] = 42

    _edit(world / "vqa" / "vqa_val.jsonl", vqa_change)
    result = _validate(world)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "Traceback" not in result.stderr
    assert "audiocaps_val.jsonl:1: captions must be a non-empty list of non-empty strings" in out
    assert "audiocaps_val.jsonl:5:" in out and "line 3" in out  # the clip of line 5 with line 3's other file
    assert "vqa_val.jsonl:6: question_id" in out and "repeats line 2" in out
    assert "vqa_val.jsonl:7: question must be a non-empty string" in out


def test_validate_names_file_and_line_of_a_non_utf8_manifest(world):
    path = world / "vqa" / "vqa_train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"what", b"wh\xe4t", 1)
    path.write_bytes(b"".join(lines))
    result = _validate(world)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "UnicodeDecodeError" not in result.stdout + result.stderr
    assert "vqa_train.jsonl:4:" in result.stdout and "UTF-8" in result.stdout
