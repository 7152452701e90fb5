"""The training batch streams: persistent loader workers see each epoch's crops, worker count never changes the
data, and a stream resumes mid-epoch. Real toy-world files, real DataLoader worker processes."""

from safe.data.datasets import AudioCapsDataset, WavCapsDataset
from safe.training.data import BatchStream, EpochConcatDataset


def dataset(world):
    return AudioCapsDataset(world, "train", sample_rate=16000, clip_seconds=4.0, training=True, seed=3)


def take(stream, n):
    return [(batch.ids, batch.windows) for batch in (stream.next() for _ in range(n))]


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


def test_length_grouping_cuts_padding_and_keeps_every_item_once(toy_world):
    import numpy as np

    from safe.training.data import item_lengths, rank_batches

    data = dataset(toy_world)
    lengths = np.asarray(item_lengths(data))
    assert len(lengths) == len(data) and lengths.min() < lengths.max()

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in map(np.asarray, batches))

    plain = rank_batches(len(data), 8, seed=0, stream=0, epoch=0)
    grouped = rank_batches(len(data), 8, seed=0, stream=0, epoch=0, lengths=lengths)
    assert padding(grouped) < 0.5 * padding(plain)
    full = [i for b in grouped for i in b][:len(data)]
    assert sorted(full) == list(range(len(data)))         # a permutation: every item once per epoch
    assert grouped != rank_batches(len(data), 8, seed=0, stream=0, epoch=1, lengths=lengths)  # reshuffled per epoch
    # World-size independent: two ranks of batch 4 read exactly the positions one rank of batch 8 reads.
    two = [rank_batches(len(data), 4, 0, 0, 0, rank=r, world_size=2, lengths=lengths) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == grouped


def test_length_grouped_stream_batches_similar_captions(toy_world):
    stream = BatchStream(dataset(toy_world), 8, seed=1, stream=0, num_workers=0, length_grouping=True)
    spans = []
    for _ in range(stream.batches_per_epoch):
        words = [len(c.split()) for c in stream.next().captions]
        spans.append(max(words) - min(words))
    plain = BatchStream(dataset(toy_world), 8, seed=1, stream=0, num_workers=0)
    plain_spans = []
    for _ in range(plain.batches_per_epoch):
        words = [len(c.split()) for c in plain.next().captions]
        plain_spans.append(max(words) - min(words))
    assert sum(spans) < 0.5 * sum(plain_spans)
