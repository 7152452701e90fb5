"""`safe export --run RUN --out DIR [--push-to-hub REPO]`: a run's checkpoint as a shareable adapter folder.

The folder holds the trainable weights and their config exactly as a checkpoint does (`SAFEModel.from_pretrained`
loads it), a model card (`README.md`), and the run's `config.json` and `metrics.json` as `training_config.json` and
`metrics.json`. No model is loaded: the files are copied, so exporting a 13B run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safe.core.errors import SafeError
from safe.core.files import atomic_write, atomic_write_text
from safe.models.pretrained import CARD_FILE
from safe.models.safe_model import CONFIG_FILE, TRAINABLE_FILE


def _copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), needed=source.stat().st_size)


def _evaluations(run_dir: Path, config, step: int) -> list[tuple[str, dict]]:
    """The training-time evaluation of the exported step, then every `safe eval` of that checkpoint."""
    found = []
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    at_step = [h for h in metrics.get("history", []) if h.get("step") == step]
    if at_step:
        data = config.data
        found.append((f"Training-time evaluation at step {step}", {
            "metrics": at_step[-1], "audio_set": f"{data.audio_eval_dataset} {data.audio_eval_split}",
            "vl_set": f"VQA v2 {data.vl_eval_split}"}))
    for path in sorted(run_dir.glob("eval_*.json")):
        written = json.loads(path.read_text())
        evaluated = re.fullmatch(r"step_(\d+)(?:_\d+)?", Path(written.get("checkpoint", "")).name)
        if evaluated is None or int(evaluated.group(1)) != step:
            continue  # an evaluation of another checkpoint
        found.append((f"`safe eval`: {written.get('dataset')} {written.get('split')} ({path.name})", {
            "metrics": written.get("validation", {}), "audio_set": f"{written.get('dataset')} {written.get('split')}",
            "vl_set": f"VQA v2 {written.get('vl_split')}"}))
    return found


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> Path:
    """Write the adapter folder of ``run_dir``'s checkpoint (default: the latest) into ``out_dir``."""
    from safe.model_card import model_card
    from safe.training.load_run import run_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config, source = run_checkpoint(run_dir, checkpoint)
    if out_dir.resolve() == run_dir.resolve() or out_dir.resolve().is_relative_to(source.resolve()):
        raise SafeError(f"--out {out_dir} is inside the run or its checkpoint; pick a folder of its own.")
    step = json.loads((source / "meta.json").read_text())["step"]
    for name in (TRAINABLE_FILE, CONFIG_FILE):
        _copy(source / name, out_dir / name)
    _copy(run_dir / "config.json", out_dir / "training_config.json")
    if (run_dir / "metrics.json").is_file():
        _copy(run_dir / "metrics.json", out_dir / "metrics.json")
    adapter = json.loads((source / CONFIG_FILE).read_text())
    parameters = sum(int(_numel(shape)) for shape in adapter.get("shapes", {}).values())
    card = model_card(run_dir.name, json.loads((run_dir / "config.json").read_text()), adapter, step,
                      _evaluations(run_dir, config, step), parameters)
    atomic_write_text(out_dir / CARD_FILE, card)
    return out_dir


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to a hub model repository (created if needed); returns its URL."""
    from safe.models.loading import _offline

    if _offline():
        raise SafeError(f"The hub is offline here (HF_HUB_OFFLINE=1); the export is in {folder}: upload it from a "
                        f"machine with network access with `hf upload {repo_id} {folder}`.")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload SAFE adapter")
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SafeError(f"Could not push {folder} to the hub repository {repo_id} ({detail}); log in with "
                        f"`hf auth login` (a token with write access) and run `hf upload {repo_id} {folder}`.") \
            from None
    return str(url)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.json + checkpoints/)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the adapter into")
    parser.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub model repository")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, args.checkpoint)
    print(f"adapter written to {out} (load it with SAFEModel.from_pretrained('{out}') or safe caption --run {out})")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0
