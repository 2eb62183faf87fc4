"""The pod-scale launchers compose the training command every host runs: a TPU VM slice's `--worker=all` ssh and
a SLURM job's `srun`, each with `--distributed`, checked with stand-ins for gcloud and srun that record their
arguments. The recipes they launch validate, and an unknown machine is refused."""

import os
import stat
import subprocess

import pytest
from conftest import REPO

from configs import base, llama3_8b_es, salamandra_7b_es
from llm import config_validation

RECORDER = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$RECORD"\nprintf -- "----\\n" >> "$RECORD"\n'


def _launch(tmp_path, tool, command):
    """Runs `command` with a recording `tool` first on the PATH; returns each call's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / tool).write_text(RECORDER)
    (bin_dir / tool).chmod(stat.S_IRWXU)
    record = tmp_path / "record.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record), TPU_NAME="es-v5p",
               ZONE="us-east5-a", REPO_URL="https://example.org/spanish-llm.git")  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [call.strip().split("\n") for call in record.read_text().split("----\n") if call.strip()]


def test_the_tpu_vm_launcher_installs_then_trains_on_every_host_with_distributed(tmp_path):
    args = ["configs/llama3_8b_es.py:v5p-64", "/mnt/shared/runs/l8b", "/mnt/shared/data", "--config.seed=3"]
    install, train = _launch(tmp_path, "gcloud", ["bash", "scripts/launch/tpu_vm.sh", *args])
    for call in (install, train):
        assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "es-v5p"]
        assert "--worker=all" in call and "--zone=us-east5-a" in call
    assert "git clone --quiet https://example.org/spanish-llm.git" in install[-1] and "jax[tpu]==0.10.2" in install[-1]
    command = train[-1].split()
    assert command[:5] == ["--command=cd", "spanish-llm", "&&", ".venv/bin/python", "scripts/train.py"]
    assert "--config=configs/llama3_8b_es.py:v5p-64" in command
    for flag in ("--workdir=/mnt/shared/runs/l8b", "--config.data.path=/mnt/shared/data", "--distributed"):
        assert flag in command
    assert command[-1] == "--config.seed=3"


def test_the_slurm_script_runs_one_training_process_per_task_with_distributed(tmp_path):
    args = ["configs/salamandra_7b_es.py:8xh100", "/shared/runs/s7b", "/shared/data", "--config.seed=3"]
    (call,) = _launch(tmp_path, "srun", ["bash", "scripts/launch/slurm_h100.sbatch", *args])
    assert call == [
        ".venv/bin/python", "scripts/train.py", "--config=configs/salamandra_7b_es.py:8xh100",
        "--workdir=/shared/runs/s7b", "--config.data.path=/shared/data", "--distributed", "--config.seed=3",
    ]  # fmt: skip
    with open(os.path.join(REPO, "scripts/launch/slurm_h100.sbatch"), encoding="utf-8") as f:
        directives = [line.strip() for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=8" in directives and "#SBATCH --gpus-per-node=8" in directives


@pytest.mark.parametrize("module", [llama3_8b_es, salamandra_7b_es])
@pytest.mark.parametrize("machine", sorted(base.MACHINES))
def test_every_recipe_validates_on_every_machine_and_an_unknown_machine_is_refused(module, machine):
    config = module.get_config(machine)
    config_validation.validate(config)
    assert config.mesh_shape == base.MACHINES[machine]["mesh_shape"]
    with pytest.raises(ValueError, match="Unknown machine 'v4-8' .* one of \\['8xh100', 'v5p-64'\\]"):
        module.get_config("v4-8")


def test_the_launchers_refuse_missing_arguments(tmp_path):
    result = subprocess.run(["bash", "scripts/launch/slurm_h100.sbatch", "configs/llama3_8b_es.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
    env = {k: v for k, v in os.environ.items() if k != "TPU_NAME"}
    result = subprocess.run(["bash", "scripts/launch/tpu_vm.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "set TPU_NAME" in result.stderr
