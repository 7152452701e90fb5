"""Cross-run comparison: one row per run from its config.json + metrics.json; markdown, CSV and PNG.

Used by `safe sweep` at the end of a sweep and by `safe report RUNS...`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

from safe.core.errors import SafeError

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
    ("cider_muted", "validation", "audio_cider_muted",
     "CIDEr-D of the base answering the caption prompt without audio"),
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
    ("max_tanh_alpha", "training", "max_abs_tanh_alpha",
     "largest |gate| of the fusion gates: |tanh(alpha)|, per-token gates over the last batch (0 = closed)"),
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


def evaluated_ids(run_dir: Path, step) -> dict | None:
    """The items the run's final evaluation scored (predictions/step_<N>/evaluated_ids.json), when written."""
    if step is None:
        return None
    path = run_dir / "predictions" / f"step_{int(step):08d}" / "evaluated_ids.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differences(runs: list[Path], counts: list, id_sets: list, what: str) -> str | None:
    named = [(run.name, n) for run, n in zip(runs, counts) if n is not None]
    if len({n for _, n in named}) > 1:
        return f"{what}: " + ", ".join(f"{name} {n}" for name, n in named)
    known = [(run.name, ids) for run, ids in zip(runs, id_sets) if ids is not None]
    if len({ids for _, ids in known}) > 1:
        return f"{what}: the same number but not the same items ({', '.join(name for name, _ in known)})"
    return None


def comparability_warning(runs: list[Path], rows: list[dict]) -> str | None:
    """One sentence when the rows were not evaluated on the same clips and questions (their numbers then differ by
    the items as much as by the runs), else None."""
    sets = []
    for run, row in zip(runs, rows):
        metrics = json.loads((run / "metrics.json").read_text()).get("validation", {})
        ids = evaluated_ids(run, metrics.get("step")) or {}
        sets.append(ids)
    audio = _differences(runs, [row["audio_n"] for row in rows],
                         [(s.get("audio_split"), tuple(sorted(map(str, s["audio_ids"])))) if "audio_ids" in s else None
                          for s in sets], "clips captioned")
    vqa = _differences(runs, [row["vl_n"] for row in rows],
                       [(s.get("vl_split"), tuple(sorted(map(str, s["vl_question_ids"]))))
                        if "vl_question_ids" in s else None for s in sets], "VQA questions")
    found = [d for d in (audio, vqa) if d]
    if not found:
        return None
    return ("These runs were not evaluated on the same items, so their rows do not compare (" + "; ".join(found) +
            "); evaluate them alike, e.g. `safe eval --run RUN --max-audio-eval-samples N --max-vl-eval-samples M` "
            "with the same N, M and --eval-seed for every run.")


def comparison_figure(rows: list[dict]):
    """Retention (distractor VQA delta) against listening (listening gain), one numbered point per run; the legend
    outside the axes names each run."""
    from safe.training.plots import legend_outside, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*Xh<>"
    placed: dict[tuple, int] = {}
    for index, row in enumerate(rows, start=1):
        if row["listen_gain"] is None or row["vl_distractor_delta"] is None:
            continue
        point = (row["listen_gain"], row["vl_distractor_delta"])
        ax.scatter(*point, s=60, marker=markers[(index - 1) % len(markers)], label=f"{index}: {row['run']}")
        stacked = placed.get(point, 0)  # runs on the same spot get their numbers one above the other
        placed[point] = stacked + 1
        ax.annotate(str(index), point, textcoords="offset points", xytext=(6, 4 + 10 * stacked), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("listening gain: CIDEr-D own audio − shuffled audio")
    ax.set_ylabel("VQA accuracy with distractor audio − without (points)")
    ax.set_title("Retention vs listening")
    legend_outside(ax)
    return fig


def learning_curves_figure(runs: list[Path]):
    """Each loss on its own axes (KL and Fisher on log scales) and CIDEr-D per evaluation; one line per run, named
    by its run folder."""
    from safe.training.outputs import read_log
    from safe.training.plots import LOSSES, TITLES, legend_outside, loss_axes, positive_or_nan, pyplot

    plt = pyplot()
    logs = {run: [r for r in read_log(run) if r.get("event") == "train"] for run in runs}
    present = [entry for entry in LOSSES if any(r.get(entry[0]) for records in logs.values() for r in records)]
    present = present or [LOSSES[0]]
    fig, axes = loss_axes(plt, present + [("audio_cider", "CIDEr-D (0-100)", False)], width=4.2)
    for run, records in logs.items():
        steps = [r["step"] for r in records]
        for ax, (key, _, log) in zip(axes, present):
            ax.plot(steps, positive_or_nan([r.get(key) for r in records], log), label=run.name)
        history = json.loads((run / "metrics.json").read_text()).get("history", [])
        axes[-1].plot([h["step"] for h in history], [h.get("audio_cider") for h in history], marker="o",
                      label=run.name)
    for ax, (key, _, _) in zip(axes, present + [("audio_cider", "", False)]):
        ax.set_title(TITLES.get(key, key))
    legend_outside(axes[-1])
    return fig


def write_report(runs: list[Path], out_dir: Path) -> dict:
    from safe.core.files import atomic_write_text
    from safe.training.plots import save_figure

    rows = [run_row(run) for run in runs]
    warning = comparability_warning(runs, rows)
    markdown = (f"> **Warning:** {warning}\n\n" if warning else "") + markdown_table(rows)
    atomic_write_text(out_dir / "comparison.md", markdown)
    atomic_write_text(out_dir / "comparison.csv", csv_table(rows))
    save_figure(comparison_figure(rows), out_dir / "comparison.png")
    save_figure(learning_curves_figure(runs), out_dir / "learning_curves.png")
    return {"rows": rows, "warning": warning, "markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv",
            "png": out_dir / "comparison.png", "curves": out_dir / "learning_curves.png"}


def default_out(runs: list[Path]) -> Path:
    """Next to the runs: `report/` in the folder that holds them (their common parent)."""
    return Path(os.path.commonpath([str(run.resolve().parent) for run in runs])) / "report"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: report/ in the folder holding the runs)")


def run(args: argparse.Namespace) -> int:
    runs = find_runs(args.runs)
    report = write_report(runs, args.out or default_out(runs))
    print(report["markdown"].read_text(), end="")
    print(f"written: {report['markdown']}, {report['csv']}, {report['png']}, {report['curves']}")
    if report["warning"]:
        print(f"warning: {report['warning']}", file=sys.stderr)
    return 0
