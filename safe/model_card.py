"""The model card (README.md) of an exported adapter, as the Hugging Face hub shows it: what the adapter is, what it
was trained on and how, how well it does with the number of clips and questions behind every figure, how to use it.
"""

from __future__ import annotations

from safe.eval.summary import format_value
from safe.models.loading import looks_like_path

# (key, what it is); audio_* figures are counted in clips, vl_* in questions.
CARD_METRICS = [
    ("audio_cider", "CIDEr-D"),
    ("audio_spider", "SPIDEr"),
    ("audio_meteor", "METEOR"),
    ("audio_cider_muted", "CIDEr-D of the base without audio"),
    ("audio_cider_shuffled", "CIDEr-D with another clip's audio"),
    ("audio_listen_gain", "listening gain (CIDEr-D − another clip's audio)"),
    ("vl_base_accuracy", "VQA accuracy of the base (gate 0)"),
    ("vl_safe_distractor_accuracy", "VQA accuracy with an unrelated clip attached"),
    ("vl_distractor_delta", "distractor delta (with clip − without)"),
    ("gate0_exact", "gate 0 is the base, bit for bit"),
]


def _evaluated_on(key: str, metrics: dict, audio_set: str, vl_set: str) -> str:
    if key.startswith("audio_"):
        return f"{metrics.get('audio_samples', '?')} clips of {audio_set}"
    if key.startswith("vl_"):
        return f"{metrics.get('vl_samples', '?')} questions of {vl_set}"
    return "checked at every evaluation"


def evaluation_rows(metrics: dict, audio_set: str, vl_set: str) -> list[str]:
    return [f"| {label} | {format_value(metrics[key])} | {_evaluated_on(key, metrics, audio_set, vl_set)} |"
            for key, label in CARD_METRICS if metrics.get(key) is not None]


def _front_matter(base: str, tags: list[str]) -> list[str]:
    lines = ["---", "library_name: safe"]
    if not looks_like_path(base) and base != "tiny" and not base.startswith("tiny:"):
        lines.append(f"base_model: {base}")  # the hub links the card to its base
    return lines + ["tags:", *[f"- {t}" for t in tags], "---", ""]


def model_card(run_name: str, run_config: dict, adapter: dict, step: int, evaluations: list[tuple[str, dict]],
               parameters: int) -> str:
    """``run_config``: the run's config.json; ``adapter``: the export's safe_config.json; ``evaluations``: (title,
    {"metrics", "audio_set", "vl_set"}) for the training-time evaluation at ``step`` and each `safe eval` file."""
    config = run_config.get("config", {})
    data, model, train, retention = (config.get(k, {}) for k in ("data", "model", "train", "retention"))
    preset = adapter.get("preset", {})
    base, encoder = adapter.get("base_model", "?"), adapter.get("audio_encoder", "?")
    variant = train.get("variant", "?")
    layers = adapter.get("xattn_layers")
    fusion = f"cross-attention after decoder layers {layers} ({adapter.get('xattn_gate')} gate)" \
        if adapter.get("fusion") == "xattn" else "audio tokens spliced into the prompt (prefix)"
    sources = "AudioCaps train" + (f" + WavCaps ({format_value(data.get('wavcaps_ratio'))} of its rows)"
                                   if data.get("use_wavcaps") else "")
    if data.get("source_weights"):
        sources += f", source weights {data['source_weights']}"
    retained = "VQA v2 train questions, each with a distractor clip" if retention.get("use_vl") else "none"
    command = run_config.get("environment", {}).get("command")
    lines = _front_matter(base, ["safe", "audio", "audio-captioning", "llava", variant])
    lines += [
        f"# SAFE adapter: {variant} on {preset.get('preset') or preset.get('name', base)}",
        "",
        "Audio for a frozen vision-language model, trained with SAFE Stage A: a projector from "
        f"a frozen audio encoder to {adapter.get('num_audio_tokens')} LLM-width tokens and a gated fusion adapter. "
        f"This folder holds only those weights ({parameters:,} parameters); the base model and the audio encoder "
        "are loaded from where they are named below. At gate 0, or without audio, the model is the base, bit for bit.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| audio encoder | `{encoder}` |",
        f"| fusion | {fusion}; LoRA rank {adapter.get('lora_rank', 0)} |",
        f"| retention variant | `{variant}` (KL weight {format_value(retention.get('kl_weight'))}, Fisher weight "
        f"{format_value(retention.get('fisher_weight'))}, null-space rank {retention.get('null_space_rank')}) |",
        f"| audio training data | {sources}, from `{data.get('data_root')}` |",
        f"| retention data | {retained} |",
        f"| training | {step} optimizer steps, batch {train.get('train_batch_size')} per GPU × "
        f"{run_config.get('distributed', {}).get('world_size', 1)} GPU(s) × {train.get('gradient_accumulation_steps')} "
        f"accumulation, learning rates {train.get('lr_projector'):g} (projector) / {train.get('lr_adapter'):g} "
        f"(adapter), seed {train.get('seed')} |",
        f"| run | `{run_name}`, checkpoint at step {step} |",
        "",
        "## Evaluation",
        "",
        "Scores on the 0–100 scale; each with the number of clips or questions it was computed on (a figure on a "
        "subset is not the paper's whole-split figure).",
    ]
    for title, evaluation in evaluations:
        rows = evaluation_rows(evaluation["metrics"], evaluation["audio_set"], evaluation["vl_set"])
        lines += ["", f"### {title}", "", "| metric | value | evaluated on |", "|---|---|---|", *rows]
    if not evaluations:
        lines += ["", "No evaluation was recorded for this checkpoint."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from safe.inference import answer, caption_files",
        "from safe.models import SAFEModel",
        "",
        'model = SAFEModel.from_pretrained("THIS_FOLDER_OR_REPO")   # loads the base named above',
        'print(caption_files(model, ["clip.wav"]))',
        'print(answer(model, "photo.jpg", "What is making the sound?", audio="clip.wav"))',
        "```",
        "",
        "or `safe caption --run THIS_FOLDER --audio clip.wav` and `safe ask --run THIS_FOLDER --image photo.jpg "
        "--question Q [--audio clip.wav]`.",
        "",
        "## Training command",
        "",
        "```bash",
        command or "# not recorded (a run made before SAFE recorded its command); see training_config.json",
        "```",
        "",
        "The full resolved configuration of the run is in `training_config.json`, its metrics in `metrics.json`.",
        "",
    ]
    return "\n".join(lines)
