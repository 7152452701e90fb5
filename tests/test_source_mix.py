"""`--source-weights`: the training audio stream draws its sources by weight, on the toy world's real AudioCaps,
WavCaps and Clotho files through real DataLoader batches; the order is seeded, resumes mid-epoch and does not
depend on the world size."""

import numpy as np
import pytest

from safe.core.errors import SafeError
from safe.data.datasets import AudioCapsDataset, ClothoDataset, WavCapsDataset
from safe.data.mixing import SourceMix, parse_source_weights
from safe.training.config import build_config
from safe.training.data import BatchStream, EpochConcatDataset, epoch_order, load_run_data, rank_batches

WEIGHTS = {"audiocaps": 1.0, "wavcaps": 0.5, "clotho": 0.3}


def sources(world):
    audio = dict(sample_rate=16000, clip_seconds=4.0, training=True, seed=3)
    parts = [AudioCapsDataset(world, "train", **audio), WavCapsDataset(world, "train", **audio),
             ClothoDataset(world, "train", **audio)]
    mix = SourceMix(list(WEIGHTS), [len(p) for p in parts], list(WEIGHTS.values()))
    return EpochConcatDataset(parts), mix, parts


def source_by_path(parts) -> dict[str, str]:
    return {str(item["path"]): name for name, part in zip(WEIGHTS, parts) for item in part.items}


def test_realised_mix_matches_the_weights_within_sampling_error(toy_world):
    data, mix, parts = sources(toy_world)
    shares = np.array(list(WEIGHTS.values())) / sum(WEIGHTS.values())
    assert mix.requested() == pytest.approx(dict(zip(WEIGHTS, shares)))
    # Sizes are 120/24/45 rows, so by row count AudioCaps would be 63 %; the weights ask for 56/28/17 %.
    epochs = 40
    counts = sum(mix.counts(epoch_order(len(data), seed=5, stream=0, epoch=e, mix=mix)) for e in range(epochs))
    n = epochs * len(data)
    sigma = np.sqrt(shares * (1 - shares) / n)
    assert np.all(np.abs(counts / n - shares) < 4 * sigma), (counts / n, shares)
    # Within one epoch a source hands out its rows evenly: no row twice before every row once.
    order = epoch_order(len(data), seed=5, stream=0, epoch=0, mix=mix)
    for part in range(3):
        start, end = mix.ends[part] - mix.sizes[part], mix.ends[part]
        per_row = np.bincount(order[(order >= start) & (order < end)] - start, minlength=mix.sizes[part])
        assert per_row.max() - per_row.min() <= 1


def test_the_stream_trains_on_what_the_mix_reports(toy_world):
    data, mix, parts = sources(toy_world)
    paths = source_by_path(parts)
    stream = BatchStream(data, 8, seed=1, stream=0, num_workers=2, mix=mix)
    seen = dict.fromkeys(WEIGHTS, 0)
    try:
        for _ in range(stream.batches_per_epoch + 5):  # past an epoch boundary
            batch = stream.next()
            assert not batch.skipped
            for path in batch.audio_paths:
                seen[paths[path]] += 1
    finally:
        stream.close()
    assert stream.epoch == 1
    report = stream.source_mix()
    assert {name: figures["drawn"] for name, figures in report.items()} == seen
    rows = {name: figures["rows"] for name, figures in report.items()}
    assert rows == {"audiocaps": 120, "wavcaps": 24, "clotho": 45}
    assert sum(f["realised"] for f in report.values()) == pytest.approx(1.0)


def take(stream, n):
    return [batch.ids for batch in (stream.next() for _ in range(n))]


def test_a_weighted_stream_resumes_mid_epoch_and_on_another_world_size(toy_world):
    data, mix, _ = sources(toy_world)
    first = BatchStream(data, 8, seed=2, stream=0, num_workers=0, mix=mix)
    take(first, 30)  # into the second epoch (24 batches an epoch)
    state = first.state()
    expected_ids, expected_mix = take(first, 10), None
    expected_mix = first.source_mix()

    resumed = BatchStream(data, 8, seed=2, stream=0, num_workers=0, mix=mix)
    resumed.load_state(state)
    assert take(resumed, 10) == expected_ids and resumed.source_mix() == expected_mix

    # The same checkpoint on two ranks of batch 4: together they read exactly the positions of one rank of 8.
    ranks = [BatchStream(data, 4, seed=2, stream=0, num_workers=0, rank=r, world_size=2, mix=mix) for r in range(2)]
    for stream in ranks:
        stream.load_state(state)
    pairs = zip(take(ranks[0], 10), take(ranks[1], 10))
    assert [a + b for a, b in pairs] == expected_ids
    assert ranks[0].source_mix() == ranks[1].source_mix() == expected_mix
    # And the global batches themselves, straight from the order: world-size independent.
    single = rank_batches(len(data), 8, 2, 0, epoch=3, mix=mix)
    split = [rank_batches(len(data), 4, 2, 0, epoch=3, rank=r, world_size=2, mix=mix) for r in range(2)]
    assert [a + b for a, b in zip(*split)] == single


def test_without_weights_the_order_is_the_plain_permutation(toy_world):
    data, _, parts = sources(toy_world)
    plain = SourceMix(list(WEIGHTS), [len(p) for p in parts], None)
    expected = np.random.default_rng([4, 0, 2]).permutation(len(data))
    assert np.array_equal(epoch_order(len(data), 4, 0, 2, mix=plain), expected)
    assert np.array_equal(epoch_order(len(data), 4, 0, 2), expected)
    assert plain.requested()["audiocaps"] == pytest.approx(120 / 189)


def test_load_run_data_builds_the_weighted_sources(toy_world):
    config = build_config(cli_values={"data_root": str(toy_world), "use_wavcaps": True, "variant": "no_retention",
                                      "source_weights": "audiocaps=1,wavcaps=0.5,clotho=0.3"})
    assert config.data.source_weights == WEIGHTS  # written to config.json as a mapping
    data = load_run_data(config, 16000, 4.0)
    assert data.source_mix.names == list(WEIGHTS) and data.source_mix.sizes == [120, 24, 45]
    assert len(data.audio_train) == 189
    only_clotho = build_config(cli_values={"data_root": str(toy_world), "variant": "no_retention",
                                           "source_weights": "clotho=1"})
    data = load_run_data(only_clotho, 16000, 4.0)
    assert data.source_mix.names == ["clotho"] and isinstance(data.audio_train, ClothoDataset)
    assert len(data.distractor_pool) == 48  # distractors stay AudioCaps training clips


@pytest.mark.parametrize("value, message", [
    ("audiocaps=1,esc50=2", "the training sources are audiocaps, wavcaps, clotho"),
    ("audiocaps", "is not NAME=WEIGHT"),
    ("audiocaps=much", "is not a number"),
    ("audiocaps=-1", "weights must be >= 0"),
    ("audiocaps=0", "at least one source needs a positive weight"),
    ("audiocaps=1,audiocaps=2", "names audiocaps twice"),
])
def test_bad_weights_are_one_sentence(value, message):
    with pytest.raises(SafeError, match=message):
        parse_source_weights(value)


def test_weights_and_wavcaps_switch_must_agree():
    with pytest.raises(SafeError, match="names wavcaps but WavCaps is off; add --use-wavcaps"):
        build_config(cli_values={"source_weights": "audiocaps=1,wavcaps=0.5"})
    with pytest.raises(SafeError, match="gives wavcaps no weight"):
        build_config(cli_values={"source_weights": "audiocaps=1", "use_wavcaps": True})
    assert build_config(yaml_values={"data": {"source_weights": {"audiocaps": 2, "clotho": 1}}}).data.source_weights \
        == {"audiocaps": 2.0, "clotho": 1.0}


@pytest.mark.slow
def test_weighted_training_resumes_from_two_processes_on_one(toy_world, tmp_path):
    """torchrun with 2 CPU processes for 2 steps (global batch 8), then a resume on 1 process (global batch 4):
    the realised mix in metrics.json counts exactly the first 2*8 + 2*4 positions of the weighted order."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    values = {"data_root": str(toy_world), "output_root": str(tmp_path / "runs"), "model_config": "tiny",
              "variant": "no_retention", "use_wavcaps": True, "source_weights": "audiocaps=1,wavcaps=0.5,clotho=0.3",
              "train_batch_size": 4, "val_batch_size": 8, "num_workers": 0, "max_audio_eval_samples": 4,
              "max_vl_eval_samples": 4, "generation_max_new_tokens": 4, "progress": False, "max_steps": 4}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}

    def run(nproc, *extra):
        config = tmp_path / "config.json"
        config.write_text(json.dumps(values))
        result = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={nproc}",
                                 str(repo / "tests" / "helpers" / "dist_worker.py"), str(config),
                                 str(tmp_path / f"dump{nproc}"), *extra], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]

    run(2, "2")  # stop after 2 of 4 steps
    run_dir = next((tmp_path / "runs").iterdir())
    values["resume"] = str(run_dir)
    run(1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["status"] == "completed" and metrics["training"]["world_size"] == 1
    data = load_run_data(build_config(cli_values=values), 16000, 4.0)
    order = epoch_order(len(data.audio_train), 42, 0, 0, mix=data.source_mix)
    expected = data.source_mix.counts(order[: 2 * 8 + 2 * 4])
    assert [metrics["training"]["source_mix"][name]["drawn"] for name in WEIGHTS] == expected.tolist()
