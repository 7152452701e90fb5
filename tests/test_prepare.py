"""`safe data prepare {audiocaps,vqa,wavcaps}` on real-format fixtures with real audio and image files."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from safe.data.datasets import AudioCapsDataset, VQADataset, WavCapsDataset
from safe.data.manifest import read_jsonl

REPO = Path(__file__).resolve().parents[1]

# Real YouTube ids are 11 characters of [A-Za-z0-9_-]; one here contains '_' and one starts with 'Y'.
YID = {"plain": "aaaaaaaaaa1", "ypref": "bbbbbbbbbb2", "seg": "cccccccccc3", "gone": "dddddddddd4",
       "under": "ab_cd-efgh5", "valfull": "eeeeeeeeee6", "valclip": "Yffffffff_7"}


def _prepare(*args):
    return subprocess.run([sys.executable, "-m", "safe.cli", "data", "prepare", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _write_csv(path: Path, rows: list[tuple]):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        writer.writerows(rows)


@pytest.fixture
def audiocaps_sources(tmp_path, tone_writer):
    csv_dir, audio = tmp_path / "csv", tmp_path / "downloads" / "audio"
    csv_dir.mkdir()
    tone_writer(audio / "train" / f"{YID['plain']}.wav", 10.0, 16000, 300)
    tone_writer(audio / "train" / f"Y{YID['ypref']}.flac", 30.0, 22050, 0.37)  # full video; slow sine = unique samples
    tone_writer(audio / f"{YID['seg']}_30000_40000.wav", 10.0, 16000, 500)
    tone_writer(audio / f"{YID['seg']}_0_10000.wav", 10.0, 16000, 700)  # another segment of the same video
    tone_writer(audio / f"Y{YID['under']}_0.000_10.000.wav", 10.0, 16000, 600)
    tone_writer(audio / "val" / f"{YID['valfull']}.wav", 25.0, 16000, 0.21)  # full video, start 20 -> 5 s clip
    tone_writer(audio / "val" / f"{YID['valclip']}.ogg", 10.0, 16000, 800)
    _write_csv(csv_dir / "train.csv", [
        (101, YID["plain"], 0, "a tone hums"), (102, YID["plain"], 0, "a steady tone"),
        (103, YID["ypref"], 12, "a slow wave"), (104, YID["seg"], 30, "a high tone"),
        (105, YID["gone"], 5, "nobody has this clip"), (106, YID["under"], 0, "an underscore id"),
    ])
    _write_csv(csv_dir / "val.csv", [(200 + i, YID["valfull"], 20, f"val full ref {i}") for i in range(5)]
               + [(300 + i, YID["valclip"], 0, f"val clip ref {i}") for i in range(5)])
    return csv_dir, audio


def test_audiocaps_conversion(audiocaps_sources, tmp_path):
    csv_dir, audio = audiocaps_sources
    out = tmp_path / "data" / "audiocaps"
    result = _prepare("audiocaps", "--csv-dir", str(csv_dir), "--audio-dir", str(audio), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    train = read_jsonl(out / "audiocaps_train.jsonl")
    assert [r["id"] for r in train] == ["101", "102", "103", "104", "106"]  # one row per caption, 105 missing
    by_id = {r["id"]: r for r in train}
    assert by_id["104"]["audio_path"] == f"audio_source/{YID['seg']}_30000_40000.wav"  # the matching segment
    assert by_id["106"]["audio_path"] == f"audio_source/Y{YID['under']}_0.000_10.000.wav"
    assert by_id["101"]["audio_path"] == f"audio_source/train/{YID['plain']}.wav"
    assert by_id["103"]["audio_path"] == f"audio/train/{YID['ypref']}_12000.flac"
    # The full video was cut to [12 s, 22 s], same samples as the source.
    source, rate = sf.read(str(audio / "train" / f"Y{YID['ypref']}.flac"), dtype="float32")
    cut, cut_rate = sf.read(str(out / by_id["103"]["audio_path"]), dtype="float32")
    assert cut_rate == rate == 22050 and len(cut) == 10 * rate
    np.testing.assert_allclose(cut, source[12 * rate: 22 * rate], atol=1e-4)
    # The missing row is counted, printed and listed in the report file.
    assert "1 source row(s) had no usable media" in result.stdout and YID["gone"] in result.stdout
    report = json.loads((out / "prepare_audiocaps_report.json").read_text())
    assert report["splits"]["train"]["missing"] == [
        {"audiocap_id": "105", "youtube_id": YID["gone"], "start_time": 5.0, "reason": "no audio file"}]
    val = read_jsonl(out / "audiocaps_val.jsonl")
    assert [len(r["captions"]) for r in val] == [5, 5]
    assert sf.info(str(out / val[0]["audio_path"])).duration == pytest.approx(5.0)  # 25 s video, start 20

    # The loaders read every row: train one item per caption, val one item per clip with all references.
    train_set = AudioCapsDataset(tmp_path / "data", "train", sample_rate=16000, clip_seconds=10.0,
                                 on_bad_sample="error")
    assert len(train_set) == 5 and all(train_set[i]["kind"] == "audio" for i in range(len(train_set)))
    val_set = AudioCapsDataset(tmp_path / "data", "val", sample_rate=16000, clip_seconds=10.0, on_bad_sample="error")
    assert [len(val_set[i]["references"]) for i in range(2)] == [5, 5]

    # Re-running is idempotent; --strict turns the missing row into a failure.
    again = _prepare("audiocaps", "--csv-dir", str(csv_dir), "--audio-dir", str(audio), "--out", str(out), "--strict")
    assert again.returncode == 1 and "--strict" in again.stderr
    assert read_jsonl(out / "audiocaps_train.jsonl") == train


def test_audiocaps_bad_csv_is_one_sentence(tmp_path):
    (tmp_path / "train.csv").write_text("youtube_id,caption\nabc,hello\n")
    (tmp_path / "audio").mkdir()
    result = _prepare("audiocaps", "--csv-dir", str(tmp_path), "--audio-dir", str(tmp_path / "audio"),
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "lacks the column(s) audiocap_id, start_time" in result.stderr
    assert "Traceback" not in result.stderr


def _vqa_json(folder: Path, subtype: str, questions: list[tuple[int, int, str]]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps({
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
        "questions": [{"image_id": image, "question": text, "question_id": qid} for qid, image, text in questions]}))
    annotations = []
    for qid, image, _ in questions:
        answers = ["yes"] * 7 + ["no", "yeah", "yes"]
        annotations.append({"question_type": "is the", "multiple_choice_answer": "yes", "image_id": image,
                            "answer_type": "yes/no", "question_id": qid,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]})
    (folder / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps({
        "info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations}))


def test_vqa_conversion_keeps_all_ten_answers(tmp_path):
    jsons, images = tmp_path / "vqa_json", tmp_path / "coco"
    _vqa_json(jsons, "train2014", [(10, 1, "Is the square red?"), (11, 1, "Is it round?"), (20, 2, "Is it blue?"),
                                   (30, 3, "No image for me?")])
    _vqa_json(jsons, "val2014", [(50, 5, "Is the sky green?")])
    for subtype, image_id in (("train2014", 1), ("train2014", 2), ("val2014", 5)):
        path = images / subtype / f"COCO_{subtype}_{image_id:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (200, 20 * image_id, 30)).save(path)
    out = tmp_path / "data" / "vqa"
    result = _prepare("vqa", "--questions-dir", str(jsons), "--images-dir", str(images), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    train = read_jsonl(out / "vqa_train.jsonl")
    assert [r["question_id"] for r in train] == [10, 11, 20]
    row = train[0]
    assert row["image_path"] == "images/train2014/COCO_train2014_000000000001.jpg"
    assert row["answers"] == ["yes"] * 7 + ["no", "yeah", "yes"]
    assert (row["multiple_choice_answer"], row["answer_type"], row["question_type"]) == ("yes", "yes/no", "is the")
    report = json.loads((out / "prepare_vqa_report.json").read_text())
    assert report["splits"]["train"]["missing"][0]["question_id"] == 30
    assert "no image COCO_train2014_000000000003.jpg" in result.stdout
    dataset = VQADataset(tmp_path / "data", "val", on_bad_sample="error")
    item = dataset[0]
    assert item["image"].size == (32, 24) and len(item["answers"]) == 10


def test_wavcaps_conversion_from_official_json(tmp_path, tone_writer):
    jsons = tmp_path / "json_files"
    entries = {
        "FreeSound/fsd_final.json": [("1", "a door creaks"), ("2", "rain falls"), ("3", "never downloaded")],
        "SoundBible/sb_final.json": [("1", "a bell rings")],
    }
    for rel, items in entries.items():
        path = jsons / rel
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"num_captions_per_audio": 1, "data": [
            {"id": i, "caption": c, "audio": "wav_path", "duration": 1.0, "download_link": "x"} for i, c in items]}))
    (jsons / "blacklist").mkdir()
    (jsons / "blacklist" / "blacklist_exclude_all_ac.json").write_text(json.dumps({"AudioSet": [], "FreeSound": []}))
    out = tmp_path / "data" / "wavcaps"
    tone_writer(out / "audio" / "FreeSound" / "1.flac", 1.0, 32000, 300)
    tone_writer(out / "audio" / "FreeSound" / "2.flac", 1.0, 32000, 400)
    tone_writer(out / "audio" / "SoundBible" / "1.flac", 1.0, 44100, 500)  # same stem, other subset
    result = _prepare("wavcaps", "--json-dir", str(jsons), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_jsonl(out / "wavcaps_train.jsonl")
    assert [(r["id"], r["audio_path"], r["subset"]) for r in rows] == [
        ("1", "audio/FreeSound/1.flac", "FreeSound"), ("2", "audio/FreeSound/2.flac", "FreeSound"),
        ("SoundBible/1", "audio/SoundBible/1.flac", "SoundBible")]
    assert rows[2]["caption"] == "a bell rings"
    assert "Skipped 1 JSON file(s)" in result.stdout  # the blacklist is not metadata
    assert "1 source row(s) had no usable media" in result.stdout
    dataset = WavCapsDataset(tmp_path / "data", "train", sample_rate=16000, clip_seconds=1.0, on_bad_sample="error")
    assert [dataset[i]["caption"] for i in range(3)] == ["a door creaks", "rain falls", "a bell rings"]
