"""Use a trained model: load a run or an exported adapter, caption audio files, answer visual questions.

The Python API the README documents (`load_model`, `load_run_model`, `caption_files`, `answer`) and `safe caption`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from safe.data.audio import load_audio
from safe.data.images import load_image
from safe.training.load_run import load_run_model, run_checkpoint

__all__ = ["answer", "caption_files", "load_model", "load_run_model", "run_checkpoint"]


def load_model(source: str | Path, checkpoint: str | None = None, device: str | None = None):
    """A trained SAFE model from a run folder (its latest checkpoint, or ``checkpoint``), an adapter folder written
    by `safe export` / save_pretrained, or a hub id holding one."""
    from safe.models.loading import looks_like_path
    from safe.models.pretrained import from_pretrained
    from safe.models.safe_model import CONFIG_FILE

    path = Path(source)
    is_export = (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file()
    if checkpoint is None and (is_export or not looks_like_path(str(source))):
        return from_pretrained(source, device=device)
    return load_run_model(source, checkpoint, device)[0]


def _waveforms(model, files: list[str]) -> torch.Tensor:
    encoder = model.audio_encoder
    clips = [torch.from_numpy(load_audio(f, encoder.sample_rate, encoder.clip_seconds)) for f in files]
    return torch.stack(clips)


def caption_files(model, files: list[str], gate: float = 1.0, max_new_tokens: int = 32, num_beams: int = 1,
                  batch_size: int = 16) -> list[str]:
    captions = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        audio = _waveforms(model, chunk)
        batch = model.builder.caption_batch(audio if gate else None, batch_size=len(chunk)).to(model.device)
        captions += model.generate(batch, gate=gate, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return captions


def answer(model, image: str, question: str, audio: str | None = None, gate: float = 1.0,
           max_new_tokens: int = 16) -> str:
    waveform = _waveforms(model, [audio]) if audio else None
    batch = model.builder.vqa_batch([load_image(image)], [question], audio=waveform).to(model.device)
    return model.generate(batch, gate=gate, max_new_tokens=max_new_tokens)[0]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.json + checkpoints/), or an adapter folder "
                        "from `safe export`, or a hub id holding one")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    parser.add_argument("--audio", nargs="+", required=True, help="audio files (WAV, FLAC, OGG, MP3)")
    parser.add_argument("--gate", type=float, default=1.0, help="0 gives the base model's (muted) caption")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.run, args.checkpoint, args.device)
    for path, caption in zip(args.audio, caption_files(model, args.audio, args.gate, args.max_new_tokens,
                                                        args.num_beams)):
        print(f"{path}\t{caption}")
    return 0
