"""`safe ask`: a visual question to a trained run, with or without an audio clip; `--gate 0` is the base."""

from __future__ import annotations

import argparse

from safe.inference import answer, load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.json + checkpoints/), or an adapter folder "
                        "from `safe export`, or a hub id holding one")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--audio", help="an audio clip heard with the question (optional)")
    parser.add_argument("--gate", type=float, default=1.0, help="0 shows the base model's answer")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.run, args.checkpoint, args.device)
    print(answer(model, args.image, args.question, args.audio, args.gate, args.max_new_tokens))
    return 0
