"""`safe train` / `run_full_training.py`: the user's flags mapped onto RunConfig (flags override --config YAML)."""

from __future__ import annotations

import argparse
import os

from safe.config import VARIANTS, build_config, explicit_settings, load_yaml, preset_train_defaults

ALL = "all"  # an evaluation limit meaning the whole split (None in the config)


def eval_limit(text: str):
    """A sample count, or 'all' for the whole split."""
    if text.strip().lower() == "all":
        return ALL
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1 (or 'all')")
    return value


def _bool_flag(parser, name: str, help_text: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=None, help=help_text)


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="YAML file of settings; command-line flags override it")
    add("--variant", help=f"retention variant: {', '.join(VARIANTS)} (default soft_retention)")
    add("--data-root", help="data folder in the layout of the README (default experiments/full_training/data)")
    _bool_flag(parser, "use-wavcaps", "add WavCaps training rows")
    add("--wavcaps-ratio", type=float, help="fraction of WavCaps rows used (a fixed, seeded subset)")
    add("--wavcaps-blacklist", help="file of clip ids WavCaps must not train on (WavCaps' own blacklist JSON, a JSON "
        "list or one id per line); AudioCaps val/test clips are always dropped")
    add("--source-weights", help="share of the training audio stream per source, e.g. audiocaps=1,wavcaps=0.5"
        "[,clotho=0.3] (default: every row alike); clotho trains on clotho_train.jsonl")
    add("--output-root", help="where run folders are created (default experiments/full_training/runs)")
    add("--run-name", help="run folder name (default <YYYYmmdd_HHMMSS>_<variant>)")
    add("--seed", type=int)
    add("--model-config", "--preset", dest="model_config",
        help="model preset: tiny, llava-1.5-7b, llava-1.5-13b (aliases: demo, full)")
    add("--base-model", help="hub id or local path of the base LLaVA, overriding the preset")
    add("--audio-encoder", help="clap, whisper, or a hub id / local path of the audio encoder")
    add("--fusion", choices=("xattn", "prefix"))
    add("--lora-rank", type=int)
    add("--xattn-gate", choices=("layer", "token"), help="xattn gate: one scalar per layer (layer) or a per-token gate "
        "on the query state (token)")
    add("--num-audio-tokens", type=int)
    _bool_flag(parser, "system-prompt", "llava-1.5 presets: LLaVA-1.5's vicuna_v1 system message before every prompt "
               "(default on)")
    _bool_flag(parser, "pad-to-square", "llava-1.5 presets: pad images to square with the mean colour, as LLaVA-1.5 "
               "(default on; off = centre crop)")
    add("--train-batch-size", type=int)
    add("--val-batch-size", type=int)
    add("--num-workers", type=int)
    add("--num-epochs", type=int)
    add("--max-steps", type=int, help="optimizer steps (overrides --num-epochs)")
    add("--lr-projector", type=float)
    add("--lr-adapter", type=float)
    add("--weight-decay", type=float)
    add("--warmup-steps", type=int)
    add("--gradient-accumulation-steps", type=int)
    add("--max-vl-eval-samples", type=eval_limit, help="VQA questions per evaluation, or 'all': a seeded random "
        "subset spread over images when the split is larger (default 500)")
    add("--max-audio-eval-samples", type=eval_limit, help="clips per evaluation, or 'all': a seeded random subset "
        "when the split is larger (default 500)")
    add("--eval-seed", type=int, help="seed of the evaluation subsets and distractor clips (default 0: the same in "
        "every run, so runs compare item for item)")
    add("--audio-eval-split", help="audio split evaluated during training: val (default) or test")
    add("--vl-eval-split", help="VQA split evaluated during training (default val)")
    add("--audio-eval-dataset", choices=("audiocaps", "clotho"), help="audio evaluation set (default audiocaps)")
    add("--eval-every", type=int, help="evaluate every N optimizer steps (default: at the end)")
    add("--save-every", type=int, help="checkpoint every N optimizer steps (default: with each evaluation)")
    add("--generation-max-new-tokens", type=int)
    add("--num-beams", type=int)
    add("--kl-weight", type=float)
    add("--kl-temperature", type=float)
    add("--fisher-weight", type=float)
    add("--fisher-refresh", type=int)
    add("--fisher-samples", type=int, help="per-sample gradients per Fisher estimate (default 64)")
    add("--fisher-kind", choices=("true", "empirical"),
        help="Fisher from answers sampled from the model (true, default) or the base's answers (empirical)")
    add("--null-space-rank", type=int)
    add("--null-space-refresh", type=int)
    add("--null-space-samples", type=int, help="per-sample VL gradients per null-space basis (default 16)")
    add("--protect-from-gate", type=float, help="Fisher and null space start once max|tanh alpha| reaches this "
        "(default 0.01)")
    add("--distractor-prob", type=float)
    add("--vl-fraction", type=float, help="share of micro-batches that are VL retention batches")
    _bool_flag(parser, "base-work-cache", "cache the base's answers and teacher logits on the VQA training questions "
               "once per base, shared by every variant and run (default on; `safe cache-base` fills it ahead)")
    add("--base-work-cache-dir", help="base-work cache folder (default $SAFE_CACHE_DIR/base_work)")
    add("--teacher-top-k", type=int, help="cache the teacher's top K logits + tail mass instead of all of them "
        "(default 0: exact); the KL's error bound is logged")
    add("--on-bad-sample", choices=("skip", "error"))
    _bool_flag(parser, "feature-cache", "cache frozen audio-encoder outputs on disk (default on)")
    add("--feature-cache-dir", help="feature cache folder (default $SAFE_CACHE_DIR/features)")
    add("--feature-cache-memory-mb", type=float,
        help="in-memory layer over the feature cache in the training process (default 1024; 0 = off)")
    add("--log-every", type=int, help="log training figures every N optimizer steps")
    _bool_flag(parser, "length-grouping", "batch training items of similar text length together: less padding, "
               "less varied batches (default off)")
    _bool_flag(parser, "activation-checkpointing",
               "recompute the frozen decoder layers' activations in the backward: less memory, one extra forward")
    _bool_flag(parser, "allow-outside-paths", "accept absolute or escaping media paths in manifests")
    _bool_flag(parser, "progress", "show a progress bar")
    _bool_flag(parser, "tensorboard", "write TensorBoard event files (default: on when installed)")
    add("--wandb-project", help="also log to this Weights & Biases project")
    add("--resume", nargs="?", const="auto",
        help="continue the latest run of this variant under --output-root, or the run folder given")
    add("--dry-run", action="store_true", help="build the model on the meta device, print parameters, memory, tokens, "
        "steps and time, check the data, and exit without training")


CONTROL_FLAGS = {"config", "command", "subcommand", "_module", "verbose", "dry_run"}


def config_from_args(args: argparse.Namespace):
    values = {k: v for k, v in vars(args).items() if k not in CONTROL_FLAGS}
    unlimited = {k for k, v in values.items() if v == ALL}
    values = {k: None if k in unlimited else v for k, v in values.items()}
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else None
    if values.get("resume") is None and "preset" not in explicit_settings(yaml_values, values):
        # An unnamed preset follows the data: the toy model on a toy world, LLaVA-1.5-7B on real data (a resumed
        # run keeps its own). Chosen before the config is built, so the preset's own defaults apply.
        from safe.config import DEFAULT_DATA_ROOT
        from safe.training.preset_guard import default_preset_for

        root = values.get("data_root") or (yaml_values or {}).get("data_root") or \
            ((yaml_values or {}).get("data") or {}).get("data_root") or DEFAULT_DATA_ROOT
        chosen = default_preset_for(root)
        if chosen is not None:
            values["model_config"] = chosen
            if _is_rank_zero():
                print(f"model: {chosen} (the default on real data; --model-config chooses another, tiny included)")
    config = build_config(yaml_values, values)
    for key in unlimited:  # set after the merge: a None flag means "not given"
        setattr(config.data, key, None)
    return config


def _say_preset_defaults(args: argparse.Namespace, config) -> None:
    """Name the preset's training defaults this run takes (they are in config.json as resolved values)."""
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else None
    taken = preset_train_defaults(config.model.preset, explicit_settings(yaml_values, vars(args)))
    if taken and config.train.resume is None and _is_rank_zero():
        flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in taken.items())
        print(f"{config.model.preset} preset defaults: {flags} (set any of them to override)")


def run(args: argparse.Namespace) -> int:
    from safe.training.distributed import shutdown
    from safe.training.trainer import train  # heavy imports only when training

    config = config_from_args(args)
    _say_preset_defaults(args, config)
    if args.dry_run:
        from safe.training.dry_run import dry_run

        return dry_run(config)
    try:
        result = train(config)
    finally:
        shutdown()
    if not _is_rank_zero():
        return 0
    print(f"run folder: {result['run_dir']} ({result['status']} at step {result['step']})")
    from safe.eval.summary import summary_lines

    print("\n".join(summary_lines(result.get("validation") or {})))
    return 0


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; one process speaks for the run
