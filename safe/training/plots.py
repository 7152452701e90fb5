"""PNG curves of a run (loss from train_log.jsonl, metrics from metrics.json history)."""

from __future__ import annotations

import json
from pathlib import Path

from safe.training.outputs import read_log

LOSS_KEYS = ("caption_loss", "kl_loss", "fisher_penalty")
METRIC_KEYS = ("audio_cider", "audio_cider_muted", "vl_base_accuracy", "vl_safe_distractor_accuracy")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on cluster nodes), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder created) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def _curves(records: list[dict], keys: tuple[str, ...], ylabel: str, title: str, path: Path, marker=None) -> bool:
    """One line per key that has a value somewhere; False (nothing written) when there is nothing to draw."""
    plt = pyplot()
    if not records:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in records]
    for key in keys:
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], marker=marker, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)
    return True


def write_plots(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    train = [r for r in read_log(run_dir) if r.get("event") == "train"]
    metrics_path = run_dir / "metrics.json"
    history = json.loads(metrics_path.read_text()).get("history", []) if metrics_path.exists() else []
    written = []
    if _curves(train, LOSS_KEYS, "loss", run_dir.name, out / "loss.png"):
        written.append(out / "loss.png")
    if _curves(history, METRIC_KEYS, "score (0-100)", run_dir.name, out / "metrics.png", marker="o"):
        written.append(out / "metrics.png")
    return written
