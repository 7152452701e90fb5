"""PNG curves of a run (loss from train_log.jsonl, metrics from metrics.json history)."""

from __future__ import annotations

import json
from pathlib import Path

from safe.training.outputs import read_log

METRIC_KEYS = ("audio_cider", "audio_cider_muted", "vl_base_accuracy", "vl_safe_distractor_accuracy")


def write_plots(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    train = [r for r in read_log(run_dir) if r.get("event") == "train"]
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in train]
        for key in ("caption_loss", "kl_loss", "fisher_penalty"):
            values = [r.get(key) for r in train]
            if any(v for v in values if v is not None):
                ax.plot(steps, [v if v is not None else float("nan") for v in values], label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(run_dir.name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        written.append(out / "loss.png")
    metrics_path = run_dir / "metrics.json"
    history = json.loads(metrics_path.read_text()).get("history", []) if metrics_path.exists() else []
    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [h["step"] for h in history]
        for key in METRIC_KEYS:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(steps, [v if v is not None else float("nan") for v in values], marker="o", label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("score (0-100)")
        ax.set_title(run_dir.name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=100)
        plt.close(fig)
        written.append(out / "metrics.png")
    return written
