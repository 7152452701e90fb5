"""Clotho: `safe data prepare clotho` on the official CSV + audio-folder layout (real files, real subprocesses),
the dataset that reads its manifests, `safe data validate` on it, and the toy world's Clotho folder."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safe.data.datasets import ClothoDataset
from safe.data.manifest import read_jsonl

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
# Official names hold spaces, commas, quotes and non-ASCII letters.
ODD = 'Water dripping, birds "far" away, café.wav'


def _safe(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "safe.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _write_csv(path: Path, rows: list[list[str]], header=COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _caps(tag: str) -> list[str]:
    return [f"{tag} caption number {i}, with a comma" for i in range(1, 6)]


@pytest.fixture
def official(tmp_path, tone_writer):
    """The official layout: CSVs in one folder, development/validation/evaluation audio in another."""
    csvs, audio = tmp_path / "csv", tmp_path / "downloads" / "clotho_audio"
    tone_writer(audio / "development" / ODD, 21.0, 44100, 300)
    tone_writer(audio / "development" / "plain.wav", 15.5, 44100, 400)
    tone_writer(audio / "validation" / "val clip, one.wav", 18.0, 44100, 500)
    tone_writer(audio / "evaluation" / "eval clip, one.wav", 30.0, 44100, 600, channels=2)
    tone_writer(audio / "evaluation" / "eval clip two.wav", 25.0, 44100, 700)
    (audio / "evaluation" / "broken, file.wav").write_bytes(b"RIFF not really a wav")
    _write_csv(csvs / "clotho_captions_development.csv", [[ODD, *_caps("dev odd")], ["plain.wav", *_caps("dev")],
                                                          ["gone, missing.wav", *_caps("gone")]])
    _write_csv(csvs / "clotho_captions_validation.csv", [["val clip, one.wav", *_caps("val")]])
    _write_csv(csvs / "clotho_captions_evaluation.csv", [["eval clip, one.wav", *_caps("eval one")],
                                                         ["eval clip two.wav", *_caps("eval two")],
                                                         ["broken, file.wav", *_caps("broken")]])
    return csvs, audio


def test_prepare_clotho_from_the_official_layout(official, tmp_path):
    csvs, audio = official
    root = tmp_path / "data"
    result = _safe("data", "prepare", "clotho", "--csv-dir", csvs, "--audio-dir", audio, "--data-root", root)
    assert result.returncode == 0, result.stderr
    out = root / "clotho"
    train, val, test = (read_jsonl(out / f"clotho_{s}.jsonl") for s in ("train", "val", "test"))
    # development -> train, one row per caption; the odd name survives byte for byte.
    assert [r["caption"] for r in train] == _caps("dev odd") + _caps("dev")
    assert train[0]["file_name"] == ODD and train[0]["id"] == f"{ODD}#1"
    assert train[0]["audio_path"] == f"audio_source/development/{ODD}"  # relative, through a link inside out/
    assert (out / "audio_source").is_symlink()
    assert train[0]["duration"] == pytest.approx(21.0)
    # validation -> val, evaluation -> test: one row per clip with its 5 references.
    assert [(r["id"], r["captions"]) for r in val] == [("val clip, one.wav", _caps("val"))]
    assert [r["id"] for r in test] == ["eval clip, one.wav", "eval clip two.wav"]
    # Missing and undecodable audio are listed, never silently dropped.
    report = json.loads((out / "prepare_clotho_report.json").read_text())
    assert report["splits"]["train"]["missing"] == [{"file_name": "gone, missing.wav", "reason": "no audio file"}]
    [broken] = report["splits"]["test"]["missing"]
    assert broken["file_name"] == "broken, file.wav" and broken["reason"].startswith("undecodable")
    assert "2 source row(s) had no usable media" in result.stdout
    strict = _safe("data", "prepare", "clotho", "--csv-dir", csvs, "--audio-dir", audio, "--data-root", root,
                   "--strict")
    assert strict.returncode == 1 and "--strict" in strict.stderr

    # The dataset reads what the converter wrote: evaluation hears the first window of the long clips.
    test_set = ClothoDataset(root, "test", sample_rate=16000, clip_seconds=10.0, training=False)
    assert len(test_set) == 2 and test_set[0]["references"] == _caps("eval one")
    sample = test_set[0]
    assert sample["window"] == 0 and sample["audio"].shape == (160000,)
    train_set = ClothoDataset(root, "train", sample_rate=16000, clip_seconds=10.0, training=True, seed=1)
    assert len(train_set) == 10 and train_set[0]["references"] == [_caps("dev odd")[0]]
    windows = {train_set[(epoch, 0)]["window"] for epoch in range(12)}
    assert len(windows) > 1  # training draws among the windows of a 21 s clip

    # `safe data validate` checks the Clotho manifests (the root lacks AudioCaps and VQA, so it is not ready).
    check = _safe("data", "validate", "--data-root", root)
    assert "clotho/clotho_test.jsonl: 2 rows, 2 clips, media 2/2 present" in check.stdout, check.stdout


def test_clotho_csv_mistakes_are_one_sentence(official, tmp_path):
    csvs, audio = official
    bad = tmp_path / "bad"
    _write_csv(bad / "clotho_captions_evaluation.csv", [["x.wav", "a", "b"]], header=["file_name", "caption_1",
                                                                                       "caption_2"])
    result = _safe("data", "prepare", "clotho", "--csv-dir", bad, "--audio-dir", audio, "--data-root", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lacks the column(s) caption_3, caption_4, caption_5" in result.stderr
    (bad / "clotho_captions_evaluation.csv").write_bytes((",".join(COLUMNS) + "\n").encode()
                                                         + "caf\u00e9.wav,a,b,c,d,e\n".encode("latin-1"))
    result = _safe("data", "prepare", "clotho", "--csv-dir", bad, "--audio-dir", audio, "--data-root", tmp_path / "o")
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _safe("data", "prepare", "clotho", "--csv-dir", empty, "--audio-dir", audio, "--data-root", tmp_path / "o")
    assert result.returncode == 2 and "No clotho_captions_" in result.stderr
    result = _safe("data", "prepare", "clotho", "--csv-dir", csvs, "--audio-dir", empty, "--data-root", tmp_path / "o")
    assert result.returncode == 2 and "needs the audio folder" in result.stderr and "Traceback" not in result.stderr


def test_validate_reports_clotho_leakage_and_missing_references(toy_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(toy_world, root, symlinks=True)
    test_rows = read_jsonl(root / "clotho" / "clotho_test.jsonl")
    train_rows = read_jsonl(root / "clotho" / "clotho_train.jsonl")
    train_rows.append({**train_rows[0], "id": "leak#1", "audio_path": test_rows[0]["audio_path"]})
    test_rows[1]["captions"] = test_rows[1]["captions"][:2]
    from safe.data.manifest import write_jsonl

    write_jsonl(root / "clotho" / "clotho_train.jsonl", train_rows)
    write_jsonl(root / "clotho" / "clotho_test.jsonl", test_rows)
    result = _safe("data", "validate", "--data-root", root)
    assert result.returncode == 1
    assert "leakage: 1 audio file(s) are in clotho train and test" in result.stdout
    assert "clotho/clotho_test.jsonl: 1 of 6 clips have fewer than 5 references" in result.stdout


def test_toy_world_clotho_folder_is_the_official_layout_and_converts_identically(toy_world, tmp_path):
    folder = toy_world / "clotho"
    with open(folder / "clotho_captions_development.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == COLUMNS and all(len(r) == 6 for r in rows)
    assert any("," in r[0] and " " in r[0] for r in rows[1:])  # names that need the csv module
    for official in ("development", "validation", "evaluation"):
        assert any((folder / official).glob("*.wav"))
    # The manifests the toy world ships are exactly what `safe data prepare clotho` makes from its official files.
    root = tmp_path / "root"
    shutil.copytree(toy_world / "clotho", root / "clotho", ignore=shutil.ignore_patterns("*.jsonl"))
    result = _safe("data", "prepare", "clotho", "--csv-dir", root / "clotho", "--audio-dir", root / "clotho",
                   "--data-root", root)
    assert result.returncode == 0, result.stderr
    for split in ("train", "val", "test"):
        assert (root / "clotho" / f"clotho_{split}.jsonl").read_bytes() == \
            (folder / f"clotho_{split}.jsonl").read_bytes(), split
    longest = max(r["duration"] for r in read_jsonl(folder / "clotho_test.jsonl"))
    assert longest > 4.0  # longer than the tiny encoder's window, as real Clotho clips are longer than CLAP's


def test_a_missing_clotho_split_says_how_to_make_it(tmp_path):
    from safe.core.errors import SafeError

    with pytest.raises(SafeError, match="No clotho test manifest .* `safe data prepare clotho --csv-dir"):
        ClothoDataset(tmp_path, "test", training=False)
