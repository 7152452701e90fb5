"""`safe eval --run RUN [--checkpoint DIR]`: evaluate a run's checkpoint on the validation sets (DESIGN §6)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from safe.training.outputs import write_json_atomic


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.json + checkpoints/)")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    parser.add_argument("--data-root", help="evaluate on another data root than the run's")
    parser.add_argument("--max-audio-eval-samples", type=int)
    parser.add_argument("--max-vl-eval-samples", type=int)
    parser.add_argument("--device")


def run(args: argparse.Namespace) -> int:
    from safe.eval.evaluator import Evaluator
    from safe.inference import load_run_model, run_checkpoint
    from safe.training.data import load_run_data
    from safe.training.features import attach_feature_cache

    config, checkpoint = run_checkpoint(args.run, args.checkpoint)
    for key in ("data_root", "max_audio_eval_samples", "max_vl_eval_samples"):
        if getattr(args, key) is not None:
            setattr(config.data, key, getattr(args, key))
    model, _ = load_run_model(args.run, str(checkpoint), args.device)
    encoder = model.audio_encoder
    data = load_run_data(config, encoder.sample_rate, encoder.clip_seconds)
    step = json.loads((checkpoint / "meta.json").read_text())["step"]
    evaluator = Evaluator.for_run(model, data, config, None, torch.device(model.device))
    # The run's feature cache, as in training: clips encoded then (val, distractors) are not encoded again.
    evaluator.feature_cache = attach_feature_cache(config, encoder, [data.audio_val, data.eval_distractors])
    metrics = evaluator.run(step)
    out = Path(args.run) / f"eval_{checkpoint.name}.json"
    write_json_atomic(out, {"checkpoint": str(checkpoint), "validation": metrics})
    print(json.dumps(metrics, indent=2))
    print(f"written to {out}")
    return 0
