"""The sharded store under the feature and base-work caches: many entries in few files, an index that finds each,
aliases, writers that share a folder without sharing a file, the newest copy of an entry first."""

import numpy as np

from safe.data import shard_store
from safe.data.shard_store import ShardStore, entry_id


def blob(i: int) -> bytes:
    return f"entry {i} ".encode() * (1 + i % 5)


def test_a_large_index_is_loaded_into_sorted_arrays_and_finds_every_entry(tmp_path):
    writer = ShardStore(tmp_path, shard_bytes=1 << 30)
    count = shard_store.RECENT_ROWS + 1000
    for i in range(count):
        writer.put(entry_id(str(i).encode()), blob(i))
    writer.flush()
    assert len(writer.files()) == 2                       # one shard, one index, for 51,000 entries
    reader = ShardStore(tmp_path)
    reader.refresh()
    assert len(reader._rows) == count and not reader._recent  # straight into the arrays, not a dict of rows
    assert np.all(np.diff(reader._rows["hi"].astype(np.float64)) >= 0)
    for i in (0, 1, 777, count - 1):
        assert reader.get(entry_id(str(i).encode())) == blob(i)
    assert reader.get(entry_id(b"never written")) is None


def test_writers_share_a_folder_aliases_find_the_same_bytes_and_the_newest_copy_wins(tmp_path):
    first, second = ShardStore(tmp_path), ShardStore(tmp_path)
    first.put(entry_id(b"a"), b"old bytes")
    first.flush()
    second.put(entry_id(b"b"), b"other")
    second.alias(entry_id(b"b-elsewhere"), entry_id(b"b"))
    second.put(entry_id(b"a"), b"new bytes")               # the same entry recomputed later
    second.flush()
    names = {p.name.split("-")[-2] for p in ShardStore(tmp_path).files()}
    assert len(names) == 2                                 # each writer its own files
    reader = ShardStore(tmp_path)
    assert reader.get(entry_id(b"a")) == b"new bytes"
    assert reader.get(entry_id(b"b-elsewhere")) == reader.get(entry_id(b"b")) == b"other"
    assert len(list(tmp_path.glob("*.shard"))) == 2        # the alias copied nothing
