"""The training batch streams: persistent loader workers see each epoch's crops, worker count never changes the
data, and a stream resumes mid-epoch. Real toy-world files, real DataLoader worker processes."""

from safe.data.datasets import AudioCapsDataset, WavCapsDataset
from safe.training.data import BatchStream, EpochConcatDataset


def dataset(world):
    return AudioCapsDataset(world, "train", sample_rate=16000, clip_seconds=4.0, training=True, seed=3)


def take(stream, n):
    return [(batch["ids"], batch["windows"]) for batch in (stream.next() for _ in range(n))]


def test_workers_give_the_same_batches_and_crops_as_the_main_process_over_epochs(toy_world):
    per_epoch = BatchStream(dataset(toy_world), 8, seed=1, stream=0, num_workers=0).batches_per_epoch
    serial = BatchStream(dataset(toy_world), 8, seed=1, stream=0, num_workers=0)
    workers = BatchStream(dataset(toy_world), 8, seed=1, stream=0, num_workers=2)
    try:
        a, b = take(serial, 3 * per_epoch), take(workers, 3 * per_epoch)
    finally:
        workers.close()
    assert a == b and workers.epoch == 2  # the third epoch (0-based) was read to its end
    # Persistent workers still draw new crops each epoch: some clip's window changes between epochs.
    windows = [{i: w for ids, ws in a[e * per_epoch:(e + 1) * per_epoch] for i, w in zip(ids, ws)} for e in range(3)]
    assert any(windows[0][k] != windows[1][k] or windows[1][k] != windows[2][k] for k in windows[0])


def test_a_stream_resumes_mid_epoch_from_its_state(toy_world):
    first = BatchStream(dataset(toy_world), 8, seed=2, stream=0, num_workers=2)
    try:
        take(first, 4)
        state = first.state()
        expected = take(first, 5)
    finally:
        first.close()
    resumed = BatchStream(dataset(toy_world), 8, seed=2, stream=0, num_workers=2)
    resumed.load_state(state)
    try:
        assert take(resumed, 5) == expected
    finally:
        resumed.close()


def test_concatenated_parts_get_epoch_and_local_index(toy_world):
    audiocaps = dataset(toy_world)
    wavcaps = WavCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=4.0, training=True, seed=3)
    both = EpochConcatDataset([audiocaps, wavcaps])
    for epoch in (0, 5):
        for part, local, index in ((audiocaps, 2, 2), (wavcaps, 1, len(audiocaps) + 1)):
            got, expected = both[(epoch, index)], part[(epoch, local)]
            assert got["id"] == expected["id"] and got["window"] == expected["window"]
            assert (got["audio"] == expected["audio"]).all()
