"""PNG curves of a run (losses from train_log.jsonl, metrics from metrics.json's history), and the plotting rules
every SAFE figure follows: each loss on its own axes (KL and the Fisher penalty on log scales: they live orders of
magnitude below the caption loss), whole-number step axes, legends outside the data.
"""

from __future__ import annotations

import json
from pathlib import Path

from safe.core.files import atomic_write
from safe.training.outputs import read_log

# (key, axis label, log scale)
LOSSES = (("caption_loss", "caption loss (label-smoothed CE)", False),
          ("kl_loss", "KL to the base (log scale)", True),
          ("fisher_penalty", "Fisher penalty (log scale)", True))
TITLES = {"caption_loss": "Caption loss", "kl_loss": "KL retention", "fisher_penalty": "Fisher penalty",
          "audio_cider": "Audio captioning"}
METRIC_KEYS = ("audio_cider", "audio_cider_muted", "vl_base_accuracy", "vl_safe_distractor_accuracy")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on cluster nodes), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def step_axis(ax) -> None:
    """Optimizer steps are whole numbers: no 2.5 on the axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")


def legend_outside(ax, **kwargs) -> None:
    """The legend to the right of the axes, never over a curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def loss_axes(plt, present: list[tuple[str, str, bool]], width: float = 5.0):
    """One row of axes, one per loss present."""
    fig, axes = plt.subplots(1, len(present), figsize=(width * len(present), 3.8), squeeze=False)
    for ax, (_, label, log) in zip(axes[0], present):
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log", nonpositive="mask")  # a zero (before the mechanism starts) is not drawn
        step_axis(ax)
    return fig, list(axes[0])


def positive_or_nan(values: list, log: bool) -> list[float]:
    return [float("nan") if v is None or (log and v <= 0) else float(v) for v in values]


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically; legends outside the axes kept in) and free it."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    pyplot().close(fig)
    return path


def losses_present(records: list[dict]) -> list[tuple[str, str, bool]]:
    """The losses with a value somewhere (a KL of exactly 0 all along, as in no_retention, is absent)."""
    return [entry for entry in LOSSES if any(r.get(entry[0]) for r in records)]


def loss_figure(records: list[dict], title: str):
    present = losses_present(records)
    if not records or not present:
        return None
    plt = pyplot()
    fig, axes = loss_axes(plt, present)
    steps = [r["step"] for r in records]
    for ax, (key, _, log) in zip(axes, present):
        ax.plot(steps, positive_or_nan([r.get(key) for r in records], log))
        ax.set_title(TITLES[key])
    fig.suptitle(title)
    return fig


def metrics_figure(history: list[dict], title: str):
    if not history:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for key in METRIC_KEYS:
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", label=key)
    ax.set_ylabel("score (0-100)")
    ax.set_title(title)
    step_axis(ax)
    legend_outside(ax)
    return fig


def write_plots(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    train = [r for r in read_log(run_dir) if r.get("event") == "train"]
    metrics_path = run_dir / "metrics.json"
    history = json.loads(metrics_path.read_text()).get("history", []) if metrics_path.exists() else []
    written = []
    for name, fig in (("loss.png", loss_figure(train, run_dir.name)), ("metrics.png", metrics_figure(history,
                                                                                                     run_dir.name))):
        if fig is not None:
            written.append(save_figure(fig, out / name))
    return written
