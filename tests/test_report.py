"""`safe report` refuses to mislead: a warning when the runs were evaluated on different items (counts or ids), the
report written next to the runs, and plots with each loss on its own axes (KL and Fisher on log scales), whole-number
step axes, legends outside the data and every point named by its run. Real run folders, the real command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safe.training.outputs import RunLogger, write_json_atomic
from safe.training.plots import loss_figure
from safe.training.report import comparison_figure, find_runs, learning_curves_figure, run_row

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, name: str, audio_ids, vl_ids, kl=True) -> Path:
    run = root / name
    step = 5
    validation = {"step": step, "audio_cider": 50.0, "audio_listen_gain": 20.0, "vl_distractor_delta": -1.0,
                  "audio_samples": len(audio_ids), "vl_samples": len(vl_ids), "vl_base_accuracy": 90.0}
    write_json_atomic(run / "metrics.json", {
        "validation": validation, "history": [{**validation, "step": 3}, validation],
        "training": {"variant": name.split("_", 2)[-1], "step": step}, "throughput": {}})
    write_json_atomic(run / "predictions" / f"step_{step:08d}" / "evaluated_ids.json", {
        "eval_seed": 0, "audio_split": "val", "audio_ids": list(audio_ids), "vl_split": "val",
        "vl_question_ids": list(vl_ids)})
    logger = RunLogger(run)
    for s in range(1, step + 1):
        logger.log({"event": "train", "step": s, "caption_loss": 3.0 - 0.4 * s,
                    "kl_loss": (0.0 if s == 1 else 1e-3 / s) if kl else 0.0, "fisher_penalty": 0.0})
    return run


def report(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "safe", "report", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_runs_on_the_same_items_report_without_warning_next_to_the_runs(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "20260101_000000_no_retention", range(16), range(30), kl=False)
    make_run(runs, "20260101_000100_soft_retention", range(16), range(30))
    done = report(runs, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower() and "Warning" not in done.stdout
    assert (runs / "report" / "comparison.md").is_file() and not (tmp_path / "report").exists()
    assert find_runs([runs]) == sorted(p for p in runs.iterdir() if p.name != "report")  # the report is no run
    header = (runs / "report" / "comparison.csv").read_text().splitlines()[0].split(",")
    assert "audio_n" in header and "vl_n" in header


@pytest.mark.parametrize("other, said", [
    ((range(16), range(10)), "VQA questions: 20260101_000000_no_retention 30, 20260101_000100_soft_retention 10"),
    ((range(100, 116), range(30)), "clips captioned: the same number but not the same items"),
])
def test_runs_evaluated_on_different_items_get_a_warning(tmp_path, other, said):
    runs = tmp_path / "runs"
    make_run(runs, "20260101_000000_no_retention", range(16), range(30))
    make_run(runs, "20260101_000100_soft_retention", *other)
    done = report(runs)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and said in warning[0] and "do not compare" in warning[0]
    assert "--max-audio-eval-samples N --max-vl-eval-samples M" in warning[0]
    assert (runs / "report" / "comparison.md").read_text().startswith("> **Warning:** These runs were not evaluated")


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_plots_give_each_loss_its_axes_whole_steps_and_legends_outside(tmp_path):
    runs = [make_run(tmp_path, "20260101_000000_no_retention", range(16), range(30), kl=False),
            make_run(tmp_path, "20260101_000100_soft_retention", range(16), range(30))]
    fig = learning_curves_figure(runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    caption, kl, cider = fig.axes
    assert caption.get_yscale() == "linear" and kl.get_yscale() == "log" and "KL" in kl.get_ylabel()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    legend = cider.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [run.name for run in runs]
    assert not _overlaps(legend.get_window_extent(renderer), cider.get_window_extent(renderer))

    scatter = comparison_figure([run_row(run) for run in runs])
    scatter.canvas.draw()
    ax = scatter.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"1: {runs[0].name}", f"2: {runs[1].name}"]                   # each point named by its run
    assert not _overlaps(ax.get_legend().get_window_extent(scatter.canvas.get_renderer()),
                         ax.get_window_extent(scatter.canvas.get_renderer()))


def test_a_run_loss_plot_puts_kl_on_its_own_log_axis(tmp_path):
    run = make_run(tmp_path, "20260101_000100_soft_retention", range(4), range(4))
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    fig = loss_figure(records, run.name)
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log"]          # no Fisher: it stayed 0 all along
    kl_line = fig.axes[1].get_lines()[0]
    assert min(y for y in kl_line.get_ydata() if y == y) > 0                   # the step-1 zero is not drawn
    assert all(float(t).is_integer() for t in fig.axes[1].get_xticks())
