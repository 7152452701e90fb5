"""Cross-run comparison: one row per run from its config.json + metrics.json; markdown, CSV and PNG.

Used by `safe sweep` at the end of a sweep and by `safe report RUNS...`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from safe.errors import SafeError

# (column, source, key, what it means in one line): source is "validation", "training" or "throughput" in
# metrics.json. The meanings are printed under the table, so a reader never has to guess.
COLUMNS = [
    ("run", None, None, "run folder"),
    ("variant", "training", "variant", "retention variant"),
    ("steps", "training", "step", "optimizer steps trained"),
    ("cider_d", "validation", "audio_cider", "CIDEr-D of the captions, each clip with its own audio (0-100)"),
    ("cider_shuffled", "validation", "audio_cider_shuffled",
     "CIDEr-D when each clip is captioned with another clip's audio (a seeded derangement)"),
    ("listen_gain", "validation", "audio_listen_gain",
     "cider_d - cider_shuffled: what the model gets from listening to the clip (> 0: it listens)"),
    ("listen_gain_ci", "validation", "audio_listen_gain_ci", "paired bootstrap 95 % interval of listen_gain"),
    ("cider_muted", "validation", "audio_cider_muted", "CIDEr-D of the base answering the caption prompt without audio"),
    ("audio_gain", "validation", "audio_gain", "cider_d - cider_muted: gain over the base (style and listening)"),
    ("spider", "validation", "audio_spider", "SPIDEr = (CIDEr-D + SPICE) / 2 (null without the SPICE jars)"),
    ("meteor", "validation", "audio_meteor", "METEOR 1.5 (0-100)"),
    ("audio_n", "validation", "audio_samples", "clips captioned"),
    ("vqa_base", "validation", "vl_base_accuracy", "VQA accuracy of the base (gate 0), official metric (0-100)"),
    ("vqa_safe", "validation", "vl_safe_accuracy", "VQA accuracy of SAFE without audio (equals the base by design)"),
    ("vqa_distractor", "validation", "vl_safe_distractor_accuracy",
     "VQA accuracy of SAFE with an unrelated clip attached (clips never trained on)"),
    ("vl_distractor_delta", "validation", "vl_distractor_delta",
     "vqa_distractor - vqa_safe (same run, same batches): what a distractor clip costs (0 = retained)"),
    ("vl_distractor_delta_ci", "validation", "vl_distractor_delta_ci",
     "paired bootstrap 95 % interval of vl_distractor_delta"),
    ("vl_n", "validation", "vl_samples", "VQA questions evaluated"),
    ("max_tanh_alpha", "training", "max_abs_tanh_alpha", "largest |tanh(alpha)| of the fusion gates (0 = closed)"),
    ("gate0_exact", "validation", "gate0_exact", "gate 0 / no audio gives logits bit-identical to the base"),
    ("samples_per_s", "throughput", "samples_per_second", "training samples per second"),
]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders given directly, or found one level below a runs folder (those with a metrics.json)."""
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.json").is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p.parent for p in path.glob("*/metrics.json")))
        else:
            raise SafeError(f"{path} is neither a run folder (with metrics.json) nor a folder of runs.")
    if not runs:
        raise SafeError(f"No run with a metrics.json under {', '.join(map(str, paths))}; train one first.")
    return runs


def run_row(run_dir: Path) -> dict:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except json.JSONDecodeError as exc:
        raise SafeError(f"{run_dir / 'metrics.json'} is not valid JSON ({exc.msg}).") from None
    row = {}
    for column, source, key, _ in COLUMNS:
        row[column] = run_dir.name if source is None else metrics.get(source, {}).get(key)
    return row


def _format(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    names = [c for c, _, _, _ in COLUMNS]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_format(row[n]) for n in names) + " |" for row in rows]
    lines += ["", "Columns:"] + [f"- `{name}`: {meaning}" for name, _, _, meaning in COLUMNS[1:]]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[c for c, _, _, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def comparison_plot(rows: list[dict], path: Path) -> Path:
    """Retention (distractor VQA delta) against listening (listening gain), one point per run."""
    from safe.training.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        if row["listen_gain"] is None or row["vl_distractor_delta"] is None:
            continue
        ax.scatter(row["listen_gain"], row["vl_distractor_delta"], s=60)
        ax.annotate(row["variant"] or row["run"], (row["listen_gain"], row["vl_distractor_delta"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("listening gain: CIDEr-D own audio − shuffled audio")
    ax.set_ylabel("VQA accuracy with distractor audio − without (points)")
    ax.set_title("Retention vs listening")
    return save_figure(fig, path)


def learning_curves_plot(runs: list[Path], path: Path) -> Path:
    """Caption loss per optimizer step (left) and CIDEr-D per evaluation (right), one line per run."""
    from safe.training.outputs import read_log
    from safe.training.plots import pyplot, save_figure

    plt = pyplot()

    fig, (loss_ax, cider_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        train = [r for r in read_log(run) if r.get("event") == "train"]
        loss_ax.plot([r["step"] for r in train], [r.get("caption_loss") for r in train], label=run.name)
        history = json.loads((run / "metrics.json").read_text()).get("history", [])
        cider_ax.plot([h["step"] for h in history], [h.get("audio_cider") for h in history], marker="o",
                      label=run.name)
    loss_ax.set(xlabel="optimizer step", ylabel="caption loss (label-smoothed CE)", title="Training loss")
    cider_ax.set(xlabel="optimizer step", ylabel="CIDEr-D (0-100)", title="Audio captioning")
    loss_ax.legend(fontsize=7)
    cider_ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_report(runs: list[Path], out_dir: Path) -> dict:
    rows = [run_row(run) for run in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(markdown_table(rows))
    (out_dir / "comparison.csv").write_text(csv_table(rows))
    comparison_plot(rows, out_dir / "comparison.png")
    learning_curves_plot(runs, out_dir / "learning_curves.png")
    return {"rows": rows, "markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv",
            "png": out_dir / "comparison.png", "curves": out_dir / "learning_curves.png"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: ./report)")


def run(args: argparse.Namespace) -> int:
    report = write_report(find_runs(args.runs), args.out or Path("report"))
    print(report["markdown"].read_text(), end="")
    print(f"written: {report['markdown']}, {report['csv']}, {report['png']}, {report['curves']}")
    return 0
