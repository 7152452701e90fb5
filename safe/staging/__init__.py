"""Offline tools that stage a data root before training: download and safe extraction, converting the official
AudioCaps/VQA/WavCaps/Clotho files to manifests, WavCaps path repair, and whole-root validation."""
