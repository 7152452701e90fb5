import json

import pytest

from safe.data.manifest import (
    ManifestError,
    find_split,
    read_jsonl,
    resolve_media_path,
    write_jsonl,
)


def test_write_then_read_round_trip(tmp_path):
    rows = [{"id": 1, "caption": "a dog barks"}, {"id": 2, "caption": "ünïcode ok"}]
    write_jsonl(tmp_path / "m.jsonl", rows)
    assert read_jsonl(tmp_path / "m.jsonl") == rows
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2,\n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl:3: malformed JSON"):
        read_jsonl(path)


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(ManifestError, match=r"list\.jsonl:1: expected a JSON object"):
        read_jsonl(path)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_find_split_accepts_both_spellings(tmp_path):
    (tmp_path / "audiocaps").mkdir()
    (tmp_path / "audiocaps" / "val.jsonl").write_text("")
    assert find_split(tmp_path, "audiocaps", "val").name == "val.jsonl"
    (tmp_path / "audiocaps" / "audiocaps_val.jsonl").write_text("")
    assert find_split(tmp_path, "audiocaps", "val").name == "audiocaps_val.jsonl"
    with pytest.raises(ManifestError, match="make demo"):
        find_split(tmp_path, "audiocaps", "train")


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "data"
    (root / "wavcaps" / "audio" / "FreeSound").mkdir(parents=True)
    (root / "wavcaps" / "audio" / "FreeSound" / "1.flac").write_bytes(b"x")
    (root / "legacy").mkdir()
    (root / "legacy" / "2.wav").write_bytes(b"x")
    manifest = root / "wavcaps" / "wavcaps_train.jsonl"
    manifest.write_text(json.dumps({"id": 1}) + "\n")
    return root, manifest


def test_relative_to_manifest_folder(layout):
    root, manifest = layout
    path = resolve_media_path("audio/FreeSound/1.flac", manifest, root)
    assert path == (root / "wavcaps" / "audio" / "FreeSound" / "1.flac").absolute()


def test_data_root_fallback_for_old_files(layout):
    root, manifest = layout
    assert resolve_media_path("legacy/2.wav", manifest, root) == (root / "legacy" / "2.wav").absolute()


def test_missing_file_resolves_to_manifest_relative_path(layout):
    root, manifest = layout
    assert resolve_media_path("audio/x.wav", manifest, root) == (root / "wavcaps" / "audio" / "x.wav").absolute()


def test_escaping_and_absolute_paths_are_refused(layout, tmp_path):
    root, manifest = layout
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"x")
    with pytest.raises(ManifestError, match="escapes the data root"):
        resolve_media_path("../../secret.wav", manifest, root)
    with pytest.raises(ManifestError, match="absolute media path"):
        resolve_media_path(str(outside), manifest, root)
    # ... unless the user says so explicitly.
    assert resolve_media_path("../../secret.wav", manifest, root, allow_outside=True) == outside.absolute()
    assert resolve_media_path(str(outside), manifest, root, allow_outside=True) == outside


def test_dotdot_that_stays_inside_is_fine(layout):
    root, manifest = layout
    assert resolve_media_path("../legacy/2.wav", manifest, root) == (root / "legacy" / "2.wav").absolute()
