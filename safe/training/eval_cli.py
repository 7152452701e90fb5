"""`safe eval --run RUN [--split test] [--dataset audiocaps|clotho]`: evaluate a run's checkpoint.

Writes `eval_<dataset>_<split>_<checkpoint>.json` into the run folder: the checkpoint, what was evaluated, and a
`validation` block with the keys of metrics.json's, computed by the evaluator training uses. Unset options keep
the run's own settings, so `safe eval --run RUN --split test` equals a training-time evaluation with
`--audio-eval-split test`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from safe.core.settings import ALL
from safe.training.config import eval_limit
from safe.training.outputs import write_json_atomic


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.json + checkpoints/)")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    parser.add_argument("--split", help="audio split: val or test (default: the run's, normally val)")
    parser.add_argument("--dataset", choices=("audiocaps", "clotho"),
                        help="audio evaluation set (default: the run's, normally audiocaps)")
    parser.add_argument("--vl-split", help="VQA split (default: the run's, normally val)")
    parser.add_argument("--data-root", help="evaluate on another data root than the run's")
    parser.add_argument("--max-audio-eval-samples", type=eval_limit,
                        help="clips to evaluate, or 'all' (default: the run's; papers report whole splits)")
    parser.add_argument("--max-vl-eval-samples", type=eval_limit, help="VQA questions, or 'all' (default: the run's)")
    parser.add_argument("--device")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from safe.training.data import load_run_data
    from safe.training.evaluator import Evaluator
    from safe.training.features import attach_feature_cache
    from safe.training.load_run import load_run_model, run_checkpoint

    config, checkpoint = run_checkpoint(args.run, args.checkpoint)
    chosen = {"data_root": args.data_root, "audio_eval_split": args.split, "audio_eval_dataset": args.dataset,
              "vl_eval_split": args.vl_split, "max_audio_eval_samples": args.max_audio_eval_samples,
              "max_vl_eval_samples": args.max_vl_eval_samples}
    for key, value in chosen.items():
        if value is not None:
            setattr(config.data, key, None if value == ALL else value)
    config.data = config.data.validate()
    model, _ = load_run_model(args.run, str(checkpoint), args.device)
    encoder = model.audio_encoder
    data = load_run_data(config, encoder.sample_rate, encoder.clip_seconds)
    step = json.loads((checkpoint / "meta.json").read_text())["step"]
    evaluator = Evaluator.for_run(model, data, config, None, torch.device(model.device))
    # The run's feature cache, as in training: clips encoded then (val, distractors) are not encoded again.
    evaluator.feature_cache = attach_feature_cache(config, encoder, [data.audio_val, data.eval_distractors])
    metrics = evaluator.run(step)
    dataset, split = config.data.audio_eval_dataset, config.data.audio_eval_split
    out = Path(args.run) / f"eval_{dataset}_{split}_{checkpoint.name}.json"
    write_json_atomic(out, {"checkpoint": str(checkpoint), "dataset": dataset, "split": split,
                            "vl_split": config.data.vl_eval_split, "audio_manifest": str(data.audio_val.manifest_path),
                            "validation": metrics})
    if args.json:  # stdout stays pure JSON for scripts
        print(json.dumps(metrics, indent=2))
        print(f"written to {out}", file=sys.stderr)
    else:
        from safe.eval.summary import metrics_table

        print(f"{dataset} {split} ({checkpoint.name}):")
        print(metrics_table(metrics), end="")
        print(f"written to {out}")
    return 0
