"""benchmarks/gpu_check.py: its whole code path on CPU with --cpu-smoke (the GPU run is manual), its MFU formula on a
hand-checked example, and the GPU peak table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_check


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    (shape,) = record["shapes"]
    assert shape["shape"] == "smoke" and record["machine"] and not shape["skipped"]
    assert shape["audio_features"][1:] == [64, 128]  # CLAP's 2 x 32 patch grid, before the projector's pre-pool
    configs = {(r["fusion"], r["activation_checkpointing"], r["step"]) for r in shape["results"]}
    assert configs == {(fusion, ckpt, step) for fusion in ("xattn", "prefix") for ckpt in (False, True)
                       for step in ("caption", "vl_teacher_uncached", "vl_teacher_cached")}
    for r in shape["results"]:
        assert r["step_ms"] > 0 and r["limit_ms"] > 0 and r["tokens_per_s"] > 0 and r["n_trainable"] > 0
        assert 0 < r["mfu"] < r["dense_6n_equivalent_mfu"] < 1  # the frozen count is below the dense 6N one
        assert r["f"] == 1.0 if r["fusion"] == "prefix" else 0 < r["f"] < 1
    vl = {r["step"]: r for r in shape["results"] if r["fusion"] == "xattn" and not r["activation_checkpointing"]}
    assert vl["vl_teacher_uncached"]["flops_frozen_base"] > vl["vl_teacher_cached"]["flops_frozen_base"]
    assert vl["vl_teacher_cached"]["tokens"] > 4 * vl["caption"]["tokens"] / 10  # image tokens + text
    assert "MFU" in done.stdout and "tokens/s" in done.stdout and "6N dense equivalent" in done.stdout


def test_mfu_formula_on_a_hand_checked_example(gpu_check):
    counts = {"n": 1000, "n_above_first_adapter": 750, "n_trainable": 10, "n_vision": 300}
    # Caption: (2N + 2N·f + 6·N_trainable) per token = 2000 + 1500 + 60 = 3560; dense 6·(N + N_tr) = 6060.
    assert gpu_check.step_flops(counts, "caption", 40, 0, 0, False) == {"frozen": 3560 * 40, "dense_6n": 6060 * 40}
    # VL, teacher cached: + the vision tower's forward, 2·300 per patch, 4 patches, 2 images = 4800.
    assert gpu_check.step_flops(counts, "vl", 10, 2, 4, False) == {"frozen": 35600 + 4800, "dense_6n": 60600 + 4800}
    # Uncached: the teacher adds its forward (2N per token) and a second vision pass.
    assert gpu_check.step_flops(counts, "vl", 10, 2, 4, True) == {"frozen": 35600 + 9600 + 20000,
                                                                   "dense_6n": 60600 + 9600 + 20000}


def test_f_is_the_share_of_the_llm_above_the_first_adapter(gpu_check):
    import torch

    shape = gpu_check.SHAPES["smoke"]
    base, encoder = gpu_check.build(shape, torch.device("cpu"), torch.float32)
    model = gpu_check.safe_model(base, encoder, shape, "xattn")
    counts = gpu_check.flop_counts(model, base, "xattn")
    layer = sum(p.numel() for p in base.model.language_model.layers[0].parameters())
    head = sum(p.numel() for p in [*base.lm_head.parameters(), *base.model.language_model.norm.parameters()])
    assert model.fusion.layer_ids == (1, 3)  # adapters after layers 1 and 3 of 4: layers 2 and 3 are above
    assert counts["n"] == 4 * layer + head and counts["n_above_first_adapter"] == 2 * layer + head
    model.fusion.detach()


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989.4e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
                                        ("Some Future GPU", None)])
def test_the_peak_table_tells_gpus_apart(gpu_check, name, peak):
    assert gpu_check.peak_flops(name) == peak
