"""Every retention variant, fusion mode and gate learns: the test that would have caught a variant that keeps the
model at the base ("perfect retention" because nothing was learned).

Each run trains the tiny preset for a few dozen steps on the small toy world and checks, from its own log: the
caption loss falls, the gate opens (max|tanh α| moves well off 0), and the variant's mechanisms really ran (the
Fisher estimated on the requested samples, a null-space basis of the requested rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safe.training.config import build_config
from safe.training.trainer import Trainer

pytestmark = pytest.mark.slow

STEPS = 40
SETTINGS = {"model_config": "tiny", "train_batch_size": 8, "val_batch_size": 8, "num_workers": 0,
            "max_audio_eval_samples": 4, "max_vl_eval_samples": 4, "generation_max_new_tokens": 6,
            "progress": False, "max_steps": STEPS, "log_every": 1, "lr_projector": 3e-3, "lr_adapter": 3e-3,
            "warmup_steps": 2, "fisher_refresh": 10, "fisher_samples": 8, "null_space_refresh": 10,
            "null_space_samples": 8, "null_space_rank": 4, "protect_from_gate": 0.002}


def _run(toy_world, out: Path, **overrides) -> tuple[list[dict], dict]:
    values = {**SETTINGS, "data_root": str(toy_world), "output_root": str(out), **overrides}
    if overrides.get("variant") in ("no_retention", "soft_retention", "fisher_retention"):
        values.pop("null_space_rank")  # the variant's own default (0, or 8 for the null-space ones)
    result = Trainer(build_config(cli_values=values)).fit()
    run_dir = Path(result["run_dir"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return log, json.loads((run_dir / "metrics.json").read_text())


def _assert_learns(log: list[dict], gate_floor: float = 0.01) -> None:
    train = [r for r in log if r["event"] == "train"]
    assert len(train) == STEPS
    first = sum(r["caption_loss"] for r in train[:5]) / 5
    last = sum(r["caption_loss"] for r in train[-5:]) / 5
    assert last < first - 0.3, (first, last)                     # the caption loss falls
    if train[-1]["max_abs_tanh_alpha"] is not None:
        assert train[0]["max_abs_tanh_alpha"] < 0.005
        assert train[-1]["max_abs_tanh_alpha"] >= gate_floor     # the gate opens


@pytest.mark.parametrize("variant", ["no_retention", "soft_retention", "fisher_retention", "nullspace_retention",
                                     "full_retention"])
def test_every_variant_learns_to_caption_and_opens_the_gate(toy_world, tmp_path, variant):
    log, metrics = _run(toy_world, tmp_path, variant=variant)
    _assert_learns(log)
    events = [r for r in log if r["event"] in ("fisher_refresh", "null_space_refresh")]
    if "fisher" in variant or variant == "full_retention":
        fisher = [r for r in events if r["event"] == "fisher_refresh"]
        assert fisher and all(r["samples"] == 8 for r in fisher)
    if variant in ("nullspace_retention", "full_retention"):
        null = [r for r in events if r["event"] == "null_space_refresh"]
        assert null and all(r["rank"] == 4 for r in null)        # rank r is r
        assert null[0]["step"] > 0                               # not at the closed gate
    if variant != "no_retention":
        assert metrics["training"]["vl_samples"] > 0
        cache = metrics["training"]["base_work_cache"]  # KL targets came from, or went to, the base-work cache
        assert cache["hits"] + cache["stored"] > 0
    assert metrics["validation"]["gate0_exact"] is True


@pytest.mark.parametrize("fusion,lora_rank,gate", [("prefix", 0, "layer"), ("xattn", 4, "layer"),
                                                   ("xattn", 0, "token"), ("prefix", 4, "layer")])
def test_fusion_modes_lora_and_token_gate_learn(toy_world, tmp_path, fusion, lora_rank, gate):
    log, metrics = _run(toy_world, tmp_path, variant="soft_retention", fusion=fusion, lora_rank=lora_rank,
                        xattn_gate=gate)
    _assert_learns(log)
    assert metrics["validation"]["gate0_exact"] is True
