"""Metrics for people: the short summary `safe train` ends with and the table `safe eval` prints.

Scores are on the 0-100 scale (docs/metrics.md); every figure is shown with the number of items behind it, so a
number is never read without its sample count.
"""

from __future__ import annotations

# (key, label) in reading order: what was heard, how well it listens, what the VQA answers kept.
ROWS = [
    ("step", "step"),
    ("audio_samples", "clips captioned"),
    ("audio_cider", "CIDEr-D"),
    ("audio_spider", "SPIDEr"),
    ("audio_spice", "SPICE"),
    ("audio_meteor", "METEOR"),
    ("audio_rouge_l", "ROUGE-L"),
    ("audio_bleu_4", "BLEU-4"),
    ("audio_cider_muted", "CIDEr-D, base without audio"),
    ("audio_gain", "audio gain (CIDEr-D - muted)"),
    ("audio_cider_shuffled", "CIDEr-D, another clip's audio"),
    ("audio_listen_gain", "listening gain (CIDEr-D - shuffled)"),
    ("audio_listen_gain_ci", "listening gain, 95 % interval"),
    ("vl_samples", "VQA questions"),
    ("vl_base_accuracy", "VQA base (gate 0)"),
    ("vl_safe_accuracy", "VQA SAFE, no audio"),
    ("vl_safe_distractor_accuracy", "VQA SAFE, distractor clip"),
    ("vl_distractor_delta", "distractor delta"),
    ("vl_distractor_delta_ci", "distractor delta, 95 % interval"),
    ("gate0_exact", "gate 0 is the base, bit for bit"),
    ("audio_metrics_note", "note"),
]


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def metrics_table(metrics: dict) -> str:
    """A two-column plain-text table of the known keys present in ``metrics``, in reading order."""
    rows = [(label, format_value(metrics[key])) for key, label in ROWS if key in metrics]
    if not rows:
        return "(no metrics)\n"
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label:<{width}}  {value}\n" for label, value in rows)


def summary_lines(metrics: dict) -> list[str]:
    """Three lines: captioning with its controls, VQA retention, the gate-0 check; each with its sample count."""
    get = metrics.get
    if not metrics:
        return ["no evaluation ran (the run stopped before its first evaluation)"]
    lines = [f"captions ({format_value(get('audio_samples'))} clips): CIDEr-D {format_value(get('audio_cider'))}, "
             f"base without audio {format_value(get('audio_cider_muted'))}, "
             f"another clip's audio {format_value(get('audio_cider_shuffled'))} "
             f"(listening gain {format_value(get('audio_listen_gain'))})"]
    lines.append(f"VQA ({format_value(get('vl_samples'))} questions): base {format_value(get('vl_base_accuracy'))}, "
                 f"with a distractor clip {format_value(get('vl_safe_distractor_accuracy'))} "
                 f"(delta {format_value(get('vl_distractor_delta'))})")
    lines.append(f"gate 0 is the base, bit for bit: {format_value(get('gate0_exact'))}")
    return lines
