"""The training rules' launcher prefix: one process, torchrun on one node, srun + torchrun across nodes.

No GPUs here: the several-process case runs for real as 2 CPU processes (gloo) through the exact
prefix a ``gpu: 2`` rule gets; the multi-node line is run by bash against stand-in Slurm commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctgen.training.launch import launch_prefix
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume

from tests.ctgen.tiny import TOKENIZER, TRAIN, WINDOW


def test_cpu_and_one_gpu_run_a_single_process():
    assert launch_prefix(0) == launch_prefix(1) == launch_prefix(1, 1) == launch_prefix(1, 1, 8) == "ctgen"


def test_each_process_gets_its_share_of_the_jobs_threads():
    """Snakemake exports OMP_NUM_THREADS = the job's threads, which torchrun keeps: 4 ranks of an 8-thread job
    would each use 8. Each gets 2."""
    words = launch_prefix(4, 1, 8).split()
    assert words[:2] == ["env", "OMP_NUM_THREADS=2"] and words[2:5] == ["python", "-m", "torch.distributed.run"]
    assert launch_prefix(4, 1, 2).split()[1] == "OMP_NUM_THREADS=1"  # never 0
    # and the DataLoader workers the rest of that share: 8 threads, 4 GPUs -> 1 each; none on the CPU
    from ctgen.training.launch import data_workers

    assert (data_workers(8, 4), data_workers(8, 1), data_workers(2, 4), data_workers(8, 0)) == (1, 7, 0, 0)


def test_several_gpus_run_torchrun_standalone_one_process_each():
    words = launch_prefix(4).split()
    assert words[:3] == ["python", "-m", "torch.distributed.run"] and words[-2:] == ["-m", "ctgen.cli"]
    assert "--nproc-per-node=4" in words and "--standalone" in words
    assert any(w.startswith("--signals-to-handle=") and "SIGUSR1" in w for w in words)  # Slurm's time-limit signal
    assert "srun" not in words and not any("rdzv" in w for w in words)


def _fake_slurm(bin_dir: Path) -> dict:
    """srun/squeue/scontrol stand-ins: srun prints its argv one per line; the allocation is node[01-02]."""
    bin_dir.mkdir()
    scripts = {"srun": 'printf "%s\\n" "$@"',
               "squeue": 'echo "$@" >> "$(dirname "$0")/squeue.args"; echo "node[01-02]"',
               "scontrol": '[ "$1 $2 $3" = "show hostnames node[01-02]" ] && printf "node01\\nnode02\\n"'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def test_several_nodes_srun_one_torchrun_per_node_with_a_c10d_rendezvous(tmp_path):
    prefix = launch_prefix(4, nodes=2, threads=16)
    env = _fake_slurm(tmp_path / "bin")
    # as a rule's shell runs it (set -euo pipefail), in a job step that kept only SLURM_JOB_ID
    res = subprocess.run(["bash", "-c", f"set -euo pipefail; {prefix} train tokenizer --config c.yaml"],
                         env={**env, "SLURM_JOB_ID": "42"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert "--overlap" in argv and "--nodes=2" in argv and "--ntasks-per-node=1" in argv  # one torchrun per node
    # the step asks for each node's GPUs and CPUs (a nested step would get one CPU and no GPU option)
    assert "--gpus-per-node=4" in argv and "--cpus-per-task=16" in argv
    assert argv[argv.index("python") - 2:argv.index("python")] == ["env", "OMP_NUM_THREADS=4"]
    assert argv[argv.index("python"):argv.index("python") + 3] == ["python", "-m", "torch.distributed.run"]
    assert {"--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:20042",
            "--rdzv-id=42"} <= set(argv)
    assert "--standalone" not in argv and argv[-5:] == ["ctgen.cli", "train", "tokenizer", "--config", "c.yaml"]
    assert "-j 42" in (tmp_path / "bin/squeue.args").read_text()  # the node list came from the job id
    # a node list left in the environment is used as is
    res = subprocess.run(["bash", "-c", f"set -euo pipefail; {prefix} train x"], capture_output=True, text=True,
                         env={**env, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[01-02]"})
    assert "--rdzv-endpoint=node01:20007" in res.stdout.split() and "--rdzv-id=7" in res.stdout.split()
    # each job its own rendezvous port (two multi-node jobs sharing a first host would both bind 29500)
    # outside a Slurm job the multi-node line refuses, and says why
    res = subprocess.run(["bash", "-c", f"set -euo pipefail; {prefix} train x"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "runs inside a Slurm job" in res.stderr


def test_a_cpu_multi_node_step_asks_for_no_gpus(tmp_path):
    """gpu: 0 on several nodes: the srun step asked --gpus-per-node=1, which Slurm refuses on CPU-only nodes."""
    prefix = launch_prefix(0, nodes=2, threads=8)
    res = subprocess.run(["bash", "-c", f"set -euo pipefail; {prefix} train x"], capture_output=True, text=True,
                         env={**_fake_slurm(tmp_path / "bin"), "SLURM_JOB_ID": "42"})
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert not any(a.startswith("--gpus") for a in argv), argv
    assert "--cpus-per-task=8" in argv and "--nproc-per-node=1" in argv and "--nnodes=2" in argv


@pytest.fixture
def tiny_shards(tmp_path) -> str:
    """4 smooth int16 HU volumes (16 x 16 x 8) in 2 shards, as the workflow writes them."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    samples = []
    for i in range(4):
        hu = (-1000 + 1100 * np.exp(-((x - 0.2 * i) ** 2 + y ** 2 + z ** 2) * 3)).transpose(2, 1, 0).astype(np.int16)
        prompt = f"{50 + i} years old female: no acute findings."
        samples.append({"key": f"train_{i}_a_1", "volume": Volume.from_3d(hu, np.diag([2.0, 2.0, 5.0, 1.0]), source=f"v{i}"),
                        "prompt": prompt, "prompts": {"generatect": prompt}, "meta": {}, "labels": np.zeros(18, np.uint8)})
    write_shards(samples, tmp_path / "c000", prefix="train-c000", shard_size=2, split="train")
    merge_manifests([tmp_path / "c000" / "train-c000.manifest.json"], tmp_path / "manifest.json", split="train")
    return str(tmp_path / "manifest.json")


def test_the_two_gpu_command_line_trains_with_two_processes(tiny_shards, tmp_path):
    cfg = tmp_path / "tokenizer.yaml"
    cfg.write_text(yaml.safe_dump({"model": TOKENIZER, "train": {**TRAIN, "max_steps": 2, "ckpt_every": 2, "grad_accum": 2},
                                   "data": {"lowres_scale": 2, "hu_window": list(WINDOW)}}))
    out = tmp_path / "tokenizer"
    # exactly the rule's shell line with gpu: 2 (torchrun --standalone, 2 processes; gloo, as there is no GPU);
    # grad_accum counts micro-steps over all processes, so it must be a multiple of the 2 processes
    line = (f"{launch_prefix(2)} train tokenizer --config {cfg} --manifests {tiny_shards} --out {out}"
            f" --checkpoints {tmp_path / 'ckpt'}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "-c", f"set -euo pipefail; {line}"], env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["device"] == "cpu"
    assert (out / "model.safetensors").is_file()
    assert "DDP rank 1/2" in res.stdout + res.stderr  # the second process joined the group


def test_a_gpu_with_no_data_workers_is_named_at_training_start():
    """A GPU job of 1 thread (the demo config's threads on the Slurm profile's GPU) gets no data workers: the
    training log says so, with the setting to change; the CPU and a GPU with workers say nothing."""
    import torch

    from ctgen.training.launch import data_workers
    from ctgen.training.loop import starved_gpu_advice

    advice = starved_gpu_advice(torch.device("cuda", 0), data_workers(1, 1))
    assert advice and "no data workers" in advice and "models.resources.<model>.threads" in advice
    assert starved_gpu_advice(torch.device("cuda", 0), data_workers(8, 1)) is None
    assert starved_gpu_advice(torch.device("cpu"), data_workers(1, 0)) is None
