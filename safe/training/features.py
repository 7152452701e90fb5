"""Audio inputs of a collated batch as frozen-encoder features, through the feature cache (docs/design.md, "Caches
and their keys").

Decoded clips are encoded once by the frozen encoder, averaged to the projector's pre-pool grid and written to the
cache; cached ones are read back already on that grid. The model then receives `audio_features`, so the encoder is
never run twice on the same clip and crop.
"""

from __future__ import annotations

import torch

from safe.data.collate import AudioItems
from safe.data.feature_cache import FeatureCache
from safe.models.projector import pre_pool, pre_pool_grid


def run_grid(config) -> int | None:
    """The pre-pool grid of the run's projector (what its feature-cache entries hold)."""

    preset = config.model
    return pre_pool_grid(preset.num_audio_tokens, preset.pre_pool_steps)


def run_feature_cache(config, encoder, memory_mb: float | None = None, **kwargs) -> FeatureCache:
    """The feature cache a run with ``config`` reads and writes (`safe train`, `safe cache-features`)."""
    data = config.data
    return FeatureCache.for_encoder(encoder, data.feature_cache_dir,
                                    data.feature_cache_memory_mb if memory_mb is None else memory_mb,
                                    data_root=data.data_root, grid=run_grid(config), **kwargs)


def attach_feature_cache(config, encoder, datasets) -> FeatureCache | None:
    """The run's feature cache (None when --no-feature-cache), handed to the audio ``datasets`` that read it."""
    if not config.data.feature_cache:
        return None
    cache = run_feature_cache(config, encoder)
    for dataset in datasets:
        if dataset is not None:
            dataset.feature_cache = cache
    return cache


def batch_features(collated: AudioItems, model, cache: FeatureCache | None) -> torch.Tensor:
    """[B, T, D] encoder features for an audio batch, in batch order (on the cache's grid when there is a cache)."""
    grid = cache.grid if cache is not None else None
    projector = getattr(model, "projector", None)
    if cache is not None and projector is not None and projector.grid != grid:
        raise RuntimeError(f"feature cache grid {grid} differs from the projector's {projector.grid}")
    parts = {}
    if collated.audio is not None:
        encoded = pre_pool(model.audio_features(collated.audio), grid)
        for row, position in enumerate(collated.audio_index):
            parts[position] = encoded[row]
            if cache is not None:
                cache.put(collated.audio_paths[position], collated.windows[position], encoded[row])
    if collated.features is not None:
        for row, position in enumerate(collated.feature_index):
            parts[position] = collated.features[row].to(model.device)
    return torch.stack([parts[i] for i in range(collated.size)])


def audio_batch(model, collated: AudioItems, cache: FeatureCache | None, with_answers: bool = True):
    """A SafeBatch for audio captioning whose audio arrives as encoder features."""
    batch = model.builder.caption_batch(None, collated.captions if with_answers else None,
                                        batch_size=collated.size, ids=collated.ids)
    return batch.with_audio(audio_features=batch_features(collated, model, cache))
