import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from safe.core.errors import SafeError
from safe.data.collate import AudioItems, Items, VQAItems, collate_samples
from safe.data.datasets import (
    AudioCapsDataset,
    BadSampleError,
    VQADataset,
    WavCapsDataset,
)
from safe.data.manifest import ManifestError


def _write_manifest(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def audio_root(tmp_path, tone_writer):
    root = tmp_path / "data"
    audio = root / "audiocaps" / "audio"
    for i in range(4):
        tone_writer(audio / f"clip{i}.flac", 1.5, 22050, freq=300 + 100 * i)
    train = [{"id": f"r{i}{j}", "audio_path": f"audio/clip{i}.flac", "youtube_id": f"y{i}", "start_time": 0,
              "caption": f"caption {i} {j}"} for i in range(4) for j in range(2)]
    _write_manifest(root / "audiocaps" / "audiocaps_train.jsonl", train)
    # Val in the one-caption-per-row spelling: must be grouped to 5 references per clip.
    val = [{"id": f"v{i}{j}", "audio_path": f"audio/clip{i}.flac", "youtube_id": f"y{i}", "start_time": 30.0,
            "caption": f"ref {i} {j}"} for j in range(5) for i in range(3)]
    _write_manifest(root / "audiocaps" / "audiocaps_val.jsonl", val)
    return root


def test_train_rows_one_caption_each(audio_root):
    ds = AudioCapsDataset(audio_root, "train", sample_rate=16000, clip_seconds=1.0)
    assert len(ds) == 8 and ds.training
    item = ds[3]
    assert item["kind"] == "audio" and item["audio"].shape == (16000,) and item["caption"] == "caption 1 1"


def test_val_rows_grouped_to_all_references(audio_root):
    ds = AudioCapsDataset(audio_root, "val", sample_rate=16000, clip_seconds=1.0)
    assert len(ds) == 3 and not ds.training
    for i in range(3):
        assert ds[i]["references"] == [f"ref {i} {j}" for j in range(5)]
    # Evaluation takes the first window, so two reads are identical.
    np.testing.assert_array_equal(ds[0]["audio"], ds[0]["audio"])


def test_training_crops_depend_on_seed_and_epoch_only(audio_root):
    a = AudioCapsDataset(audio_root, "train", sample_rate=16000, clip_seconds=0.5, seed=1)
    b = AudioCapsDataset(audio_root, "train", sample_rate=16000, clip_seconds=0.5, seed=1)
    np.testing.assert_array_equal(a[0]["audio"], b[0]["audio"])
    crops = set()
    for epoch in range(10):                  # the training stream indexes by (epoch, index)
        crops.add(a[(epoch, 0)]["audio"].tobytes())
    assert len(crops) >= 3  # a new window draw each epoch


def test_missing_and_corrupt_files_are_counted_skips(audio_root):
    (audio_root / "audiocaps" / "audio" / "clip1.flac").unlink()
    (audio_root / "audiocaps" / "audio" / "clip2.flac").write_bytes(b"garbage" * 100)
    ds = AudioCapsDataset(audio_root, "train", sample_rate=16000, clip_seconds=1.0)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_samples, num_workers=2)
    batches = list(loader)
    skipped = [s for b in batches for s in b.skipped]
    kept = sum(b.size for b in batches)
    assert kept == 4 and len(skipped) == 4  # nothing lost: every row is either loaded or reported
    assert {s["id"] for s in skipped} == {"r10", "r11", "r20", "r21"}
    assert any("does not exist" in s["reason"] for s in skipped)
    assert any("cannot decode" in s["reason"] for s in skipped)
    for batch in batches:  # skipped samples are never replaced by silence
        if batch.size:
            assert batch.audio.abs().amax(dim=1).min() > 0.1


def test_error_policy_raises(audio_root):
    (audio_root / "audiocaps" / "audio" / "clip0.flac").unlink()
    ds = AudioCapsDataset(audio_root, "train", sample_rate=16000, clip_seconds=1.0, on_bad_sample="error")
    with pytest.raises(BadSampleError, match="r00"):
        ds[0]
    with pytest.raises(SafeError, match="on_bad_sample"):
        AudioCapsDataset(audio_root, "train", on_bad_sample="ignore")


def test_empty_split_and_escaping_path_are_clear_errors(audio_root):
    (audio_root / "audiocaps" / "audiocaps_test.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="split is empty"):
        AudioCapsDataset(audio_root, "test")
    _write_manifest(audio_root / "audiocaps" / "audiocaps_test.jsonl",
                    [{"id": "x", "audio_path": "../../../etc/passwd", "captions": ["a"]}])
    with pytest.raises(ManifestError, match=r"audiocaps_test\.jsonl:1: .*escapes the data root"):
        AudioCapsDataset(audio_root, "test")


def test_row_missing_a_key_names_file_and_line(audio_root):
    _write_manifest(audio_root / "audiocaps" / "audiocaps_test.jsonl", [{"id": "x", "captions": ["a"]}])
    with pytest.raises(ManifestError, match=r"audiocaps_test\.jsonl:1: audiocaps row lacks audio_path"):
        AudioCapsDataset(audio_root, "test")


@pytest.fixture
def wavcaps_root(tmp_path, tone_writer):
    root = tmp_path / "data"
    rows = []
    for i in range(40):
        ext = "flac" if i % 2 else "wav"
        rel = f"audio/FreeSound/{i % 3}/{i}.{ext}"
        tone_writer(root / "wavcaps" / rel, 0.2, 16000)
        rows.append({"id": str(i), "audio_path": rel, "caption": f"sound {i}", "subset": "FreeSound",
                     "duration": 0.2})
    _write_manifest(root / "wavcaps" / "wavcaps_train.jsonl", rows)
    return root


def test_wavcaps_ratio_is_a_fixed_seeded_subset(wavcaps_root):
    def ids(**kw):
        return [item["id"] for item in WavCapsDataset(wavcaps_root, "train", clip_seconds=0.2, **kw).items]

    assert len(ids()) == 40
    half = ids(ratio=0.5, seed=3)
    assert len(half) == 20 and half == ids(ratio=0.5, seed=3)
    assert half != ids(ratio=0.5, seed=4)
    assert len(ids(ratio=0.25, seed=3)) == 10
    with pytest.raises(SafeError, match="wavcaps-ratio"):
        ids(ratio=0.0)
    ds = WavCapsDataset(wavcaps_root, "train", sample_rate=16000, clip_seconds=0.2)
    assert all(ds[i]["kind"] == "audio" for i in range(len(ds)))


def test_vqa_dataset_and_collate(tmp_path):
    root = tmp_path / "data"
    images = root / "vqa" / "images" / "val2014"
    images.mkdir(parents=True)
    Image.new("L", (8, 8), 128).save(images / "a.png")  # greyscale on disk, RGB when loaded
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rows = [{"question_id": 1, "image_path": "images/val2014/a.png", "question": "what?", "answers": ["x"] * 10,
             "multiple_choice_answer": "x", "answer_type": "other", "question_type": "what"},
            {"question_id": 2, "image_path": "images/val2014/broken.png", "question": "why?",
             "answers": ["y"] * 10, "multiple_choice_answer": "y", "answer_type": "other", "question_type": "why"}]
    _write_manifest(root / "vqa" / "vqa_val.jsonl", rows)
    ds = VQADataset(root, "val")
    batch = collate_samples([ds[0], ds[1]])
    assert isinstance(batch, VQAItems) and batch.ids == [1] and batch.images[0].mode == "RGB"
    assert batch.answers == [["x"] * 10] and batch.skipped[0]["id"] == 2
    # A batch of bad items only: its records and nothing else, so the loop counts them and moves on.
    only_bad = collate_samples([ds[1], ds[1]])
    assert type(only_bad) is Items and only_bad.size == 0 and [s["id"] for s in only_bad.skipped] == [2, 2]


def test_a_vqa_row_is_a_batch_of_one(toy_world):
    batch = collate_samples([VQADataset(toy_world, "val")[i] for i in range(3)])
    row = batch.row(1)
    assert isinstance(row, VQAItems) and row.size == 1 and row.skipped == [] and row.images is not None
    assert (row.ids, row.questions, row.answers) == (batch.ids[1:2], batch.questions[1:2], batch.answers[1:2])
    assert row.images[0] is batch.images[1] and row.pixel_values is None


def test_vqa_images_preprocessed_in_loader_workers_equal_the_batch_processor(toy_world):
    from safe.models.batching import BatchBuilder
    from safe.models.tiny_base import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer(["what color is the circle ? red"]))
    plain = VQADataset(toy_world, "val", max_samples=6)
    prepared = VQADataset(toy_world, "val", max_samples=6)
    prepared.image_processor = processor.image_processor
    loader = DataLoader(prepared, batch_size=6, num_workers=2, collate_fn=collate_samples)
    (from_workers,) = list(loader)
    from_images = collate_samples([plain[i] for i in range(6)])
    assert from_workers.images is None and from_workers.pixel_values.shape[0] == 6
    builder = BatchBuilder(processor.tokenizer, processor.image_processor, 9)
    a = builder.from_collated(from_workers, with_answers=True)
    b = builder.from_collated(from_images, with_answers=True)
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.input_ids, b.input_ids)


def test_collate_refuses_mixed_batches(audio_root, tmp_path):
    audio_item = AudioCapsDataset(audio_root, "train", sample_rate=16000, clip_seconds=0.1)[0]
    batch = collate_samples([audio_item, audio_item])
    assert isinstance(batch, AudioItems) and batch.audio is not None and batch.audio.shape == (2, 1600)
    assert batch.audio_index == [0, 1] and batch.features is None and batch.size == 2
    with pytest.raises(ValueError, match="homogeneous"):
        collate_samples([audio_item, {"kind": "vl", "id": 1}])


def test_toy_world_loads_with_zero_skips(toy_world):
    datasets = [
        AudioCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=4.0),
        AudioCapsDataset(toy_world, "val", sample_rate=16000, clip_seconds=4.0),
        AudioCapsDataset(toy_world, "test", sample_rate=16000, clip_seconds=4.0),
        WavCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=4.0),
        VQADataset(toy_world, "train"),
        VQADataset(toy_world, "val"),
    ]
    for ds in datasets:
        loader = DataLoader(ds, batch_size=8, collate_fn=collate_samples)
        batches = list(loader)
        assert sum(len(b.skipped) for b in batches) == 0
        assert sum(b.size for b in batches) == len(ds)
    val = datasets[1]
    assert all(len(item["references"]) == 5 for item in val.items)
