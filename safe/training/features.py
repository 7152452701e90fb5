"""Audio inputs of a collated batch as frozen-encoder features, through the feature cache (DESIGN §10).

Decoded clips are encoded once by the frozen encoder and written to the cache; cached ones are read back. The
model then receives `audio_features`, so the encoder is never run twice on the same clip and crop.
"""

from __future__ import annotations

import torch

from safe.data.feature_cache import FeatureCache


def attach_feature_cache(config, encoder, datasets) -> FeatureCache | None:
    """The run's feature cache (None when --no-feature-cache), handed to the audio ``datasets`` that read it."""
    if not config.data.feature_cache:
        return None
    cache = FeatureCache.for_encoder(encoder, config.data.feature_cache_dir, config.data.feature_cache_memory_mb)
    for dataset in datasets:
        if dataset is not None:
            dataset.feature_cache = cache
    return cache


def batch_features(collated: dict, model, cache: FeatureCache | None) -> torch.Tensor:
    """[B, T, D] encoder features for an audio batch, in batch order."""
    parts = {}
    if collated["audio"] is not None:
        encoded = model.audio_features(collated["audio"])
        for row, position in enumerate(collated["audio_index"]):
            parts[position] = encoded[row]
            if cache is not None:
                cache.put(collated["audio_paths"][position], collated["windows"][position], encoded[row])
    if collated["features"] is not None:
        for row, position in enumerate(collated["feature_index"]):
            parts[position] = collated["features"][row].to(model.device)
    return torch.stack([parts[i] for i in range(collated["size"])])


def audio_batch(model, collated: dict, cache: FeatureCache | None, with_answers: bool = True):
    """A SafeBatch for audio captioning whose audio arrives as encoder features."""
    batch = model.builder.caption_batch(None, collated["captions"] if with_answers else None,
                                        batch_size=collated["size"], ids=collated["ids"])
    return batch.with_audio(audio_features=batch_features(collated, model, cache))
